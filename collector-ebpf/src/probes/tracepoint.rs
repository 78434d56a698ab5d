//! Tracepoints: for kernels without kprobes and fentry (this project's CI host). Stable
//! ABI, slightly more work: the socket of a UDP syscall is found through its file
//! descriptor. TCP goes through the state changes (`tcp_state`), as in every family.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use egress_shared::EventKind;

use crate::{
    emit,
    maps::{CallState, Slot, USER_ADDR_MMSGHDR, USER_ADDR_MSGHDR, USER_ADDR_SOCKADDR, config},
    read::{self, Reader},
    sock::{self, Dest, IPPROTO_TCP, IPPROTO_UDP},
};

#[inline(always)]
fn field<T>(ctx: &TracePointContext, offset: u32) -> Option<T> {
    // SAFETY: the offset comes from the tracepoint's own format file.
    unsafe { ctx.read_at::<T>(offset as usize).ok() }
}

/// hook: tracepoint `syscalls:sys_enter_connect` (fd, uservaddr, addrlen). Serves UDP
/// connect() (no tracepoint fires inside a UDP connect) and marks DNS sockets. TCP
/// connects are followed by the socket's state changes instead, so the socket's protocol
/// is looked at first (fd -> file -> socket, ~9 reads) and a TCP connect saves no call
/// state (a hash insert that cost ~700 ns here), unless it goes to port 53, whose
/// descriptor SYN_SENT marks for DNS.
#[tracepoint(category = "syscalls", name = "sys_enter_connect")]
pub fn tp_sys_enter_connect(ctx: TracePointContext) -> u32 {
    let (Some(fd), Some(user_addr)) = (
        field::<u64>(&ctx, config!(tracepoints.connect_fd)),
        field::<u64>(&ctx, config!(tracepoints.connect_addr)),
    ) else {
        return 0;
    };
    let Ok(sk) = sock::from_fd(fd) else {
        return 0;
    };
    match sock::protocol(sk) {
        Ok(IPPROTO_UDP) => {}
        Ok(IPPROTO_TCP)
            if config!(dns) != 0
                && sock::dest_from_user(user_addr).port == super::dns::DNS_PORT => {}
        // TCP (the state changes report it), and sockets that are neither (unix, raw):
        // their connect reports nothing.
        _ => return 0,
    }
    emit::remember_call(&CallState {
        sk,
        fd,
        user_addr,
        user_addr_kind: USER_ADDR_SOCKADDR,
        event_kind: EventKind::UdpConnect as u32,
        dest: Dest::NONE,
    });
    0
}

/// hook: tracepoint `syscalls:sys_enter_sendto` (fd, buff, len, flags, addr, addr_len).
#[tracepoint(category = "syscalls", name = "sys_enter_sendto")]
pub fn tp_sys_enter_sendto(ctx: TracePointContext) -> u32 {
    let fd = config!(tracepoints.sendto_fd);
    let addr = config!(tracepoints.sendto_addr);
    remember(&ctx, fd, addr, USER_ADDR_SOCKADDR, EventKind::UdpSend);
    0
}

/// hook: tracepoint `syscalls:sys_enter_sendmsg` (fd, msg, flags).
#[tracepoint(category = "syscalls", name = "sys_enter_sendmsg")]
pub fn tp_sys_enter_sendmsg(ctx: TracePointContext) -> u32 {
    let fd = config!(tracepoints.sendmsg_fd);
    let msg = config!(tracepoints.sendmsg_msg);
    remember(&ctx, fd, msg, USER_ADDR_MSGHDR, EventKind::UdpSend);
    0
}

/// hook: tracepoint `syscalls:sys_enter_sendmmsg` (fd, mmsg, vlen, flags). The first
/// message's destination stands for the batch (an `mmsghdr` starts with its `msghdr`).
#[tracepoint(category = "syscalls", name = "sys_enter_sendmmsg")]
pub fn tp_sys_enter_sendmmsg(ctx: TracePointContext) -> u32 {
    let fd = config!(tracepoints.sendmmsg_fd);
    let msg = config!(tracepoints.sendmmsg_msg);
    remember(&ctx, fd, msg, USER_ADDR_MMSGHDR, EventKind::UdpSend);
    0
}

/// What connect(2) returns for a non-blocking TCP connect that sent its SYN.
const EINPROGRESS: i64 = 115;

/// hook: tracepoint `syscalls:sys_exit_connect`. Where the registers can be read back
/// (`regs_syscall_nr`), the only connect hook: a TCP connect that returns `-EINPROGRESS`
/// (non-blocking, or past its send timeout; no datagram connect returns it: its state
/// changes report it) returns on that value, one that waited, marked by its SYN_SENT, on
/// an array load; anything else finds its socket from the arguments the task saved at
/// entry (fd, uservaddr in `di`, `si`). Elsewhere, what the entry hook saved.
#[tracepoint]
pub fn tp_sys_exit_connect(ctx: TracePointContext) -> u32 {
    if config!(regs_syscall_nr) != 0
        && (syscall_ret(&ctx) == -EINPROGRESS || emit::take_tcp_connect_mark())
    {
        return 0;
    }
    connect_exit(&ctx);
    0
}

/// The value a syscall returned, from its exit record: a load from the context, where
/// `read_at` calls a helper (see `dns::arg`).
#[inline(always)]
fn syscall_ret(ctx: &TracePointContext) -> i64 {
    super::dns::arg(ctx, super::dns::RET) as i64
}

/// A connect() exit not marked TCP (or any, where nothing is marked), out of line: where
/// SYN_SENT marks (`regs_syscall_nr`), every TCP connect's exit returns on the mark, and
/// with this body inlined that return jumped to an epilogue JITed ~8 KB further on.
#[inline(never)]
fn connect_exit(ctx: &TracePointContext) {
    let state = if config!(regs_syscall_nr) != 0 {
        let regs = read::Probe::current_pt_regs();
        let (Ok(fd), Ok(user_addr)) = (
            read::kernel::<u64>(regs, config!(dns_regs_fd)),
            read::kernel::<u64>(regs, config!(dns_regs_buf)),
        ) else {
            return;
        };
        CallState {
            sk: 0,
            fd,
            user_addr,
            user_addr_kind: USER_ADDR_SOCKADDR,
            event_kind: EventKind::UdpConnect as u32,
            dest: Dest::NONE,
        }
    } else {
        let Some(state) = emit::take_call() else {
            return;
        };
        state
    };
    exit(ctx, &state, Slot::ConnectExit);
}

/// hook: tracepoint `syscalls:sys_exit_sendto`, `sys_exit_sendmsg`, `sys_exit_sendmmsg`:
/// the socket is bound now, so its source port is known. Where the registers can be read
/// back (`regs_sendto_addr`), the only send hook: the syscall's number and arguments come
/// from the task's saved registers; elsewhere, what the entry hook saved.
#[tracepoint]
pub fn tp_sys_exit(ctx: TracePointContext) -> u32 {
    let state = if config!(regs_sendto_addr) != 0 {
        match send_from_regs() {
            Some(state) => state,
            None => return 0,
        }
    } else {
        match emit::take_call() {
            Some(state) => state,
            None => return 0,
        }
    };
    exit(&ctx, &state, Slot::CallExit);
    0
}

/// x86_64's sendto(2), sendmsg(2), sendmmsg(2) (the registers are only handed to the
/// programs there, see `ProbeConfig::regs_sendto_addr`).
const NR_SENDTO_X86_64: u32 = 44;
const NR_SENDMSG_X86_64: u32 = 46;
const NR_SENDMMSG_X86_64: u32 = 307;

/// The send whose exit this is, from the task's saved registers: the syscall number
/// says which send, the first argument is the descriptor, the destination (sendto's
/// fifth argument) or message header (sendmsg's and sendmmsg's second) the rest.
#[inline(always)]
fn send_from_regs() -> Option<CallState> {
    let regs = read::Probe::current_pt_regs();
    let nr = emit::syscall_nr(regs)?;
    let (addr_at, user_addr_kind) = match nr {
        NR_SENDTO_X86_64 => (config!(regs_sendto_addr), USER_ADDR_SOCKADDR),
        NR_SENDMSG_X86_64 => (config!(dns_regs_buf), USER_ADDR_MSGHDR),
        NR_SENDMMSG_X86_64 => (config!(dns_regs_buf), USER_ADDR_MMSGHDR),
        _ => return None,
    };
    let fd = read::kernel::<u64>(regs, config!(dns_regs_fd)).ok()?;
    let user_addr = read::kernel::<u64>(regs, addr_at).ok()?;
    Some(CallState {
        sk: 0,
        fd,
        user_addr,
        user_addr_kind,
        event_kind: EventKind::UdpSend as u32,
        dest: Dest::NONE,
    })
}

#[inline(always)]
fn exit(ctx: &TracePointContext, state: &CallState, slot: Slot) {
    // connect() found its socket at entry; the syscall holds the file (and so the
    // socket) until it returns.
    let sk = if state.sk != 0 {
        state.sk
    } else {
        match sock::from_fd(state.fd) {
            Ok(sk) => sk,
            Err(_) => return,
        }
    };
    let dest = match state.user_addr_kind {
        USER_ADDR_SOCKADDR => sock::dest_from_user(state.user_addr),
        // An mmsghdr array starts with its first message's msghdr.
        USER_ADDR_MSGHDR | USER_ADDR_MMSGHDR => sock::dest_from_user_msghdr(state.user_addr),
        _ => Dest::NONE,
    };
    let port = if dest.is_some() {
        dest.port
    } else {
        read::kernel::<u16>(sk, config!(offsets.skc_dport)).map_or(0, u16::from_be)
    };
    let ret = syscall_ret(ctx);
    if port == super::dns::DNS_PORT {
        super::dns::mark(state.fd, sk);
        if state.event_kind == EventKind::UdpSend as u32 {
            let msghdr = matches!(state.user_addr_kind, USER_ADDR_MSGHDR | USER_ADDR_MMSGHDR);
            let user_addr = if msghdr { state.user_addr } else { 0 };
            super::dns::query(state.fd, sk, user_addr, msghdr, ret);
        }
    }
    if state.event_kind == EventKind::UdpConnect as u32 {
        emit::connect_exit(sk, &dest, slot);
    } else {
        emit::udp(
            sk,
            &dest,
            EventKind::UdpSend,
            false,
            sent_bytes(state, ret),
            slot,
        );
    }
}

/// Most messages of one sendmmsg whose bytes are counted (a bounded loop, one user read
/// each); the bytes of later ones are not (docs/connections.md).
const MMSG_COUNTED: u64 = 64;
/// `struct mmsghdr` on 64-bit: its `msghdr` (56 bytes), then `unsigned int msg_len`.
const MMSGHDR_SIZE: u64 = 64;
const MMSGHDR_MSG_LEN: u64 = 56;

/// The payload a send syscall put in datagrams, from what it returned: sendto and
/// sendmsg return the bytes (so no iovec needs summing), sendmmsg the number of messages
/// sent, each of whose `msg_len` the kernel wrote back into the caller's array.
#[inline(always)]
fn sent_bytes(state: &CallState, ret: i64) -> u64 {
    if ret <= 0 {
        return 0;
    }
    if state.user_addr_kind != USER_ADDR_MMSGHDR {
        return ret as u64;
    }
    let mut total = 0u64;
    for i in 0..MMSG_COUNTED {
        if i >= ret as u64 {
            break;
        }
        let at = state.user_addr + i * MMSGHDR_SIZE + MMSGHDR_MSG_LEN;
        // SAFETY: bpf_probe_read_user checks the address and fails instead of faulting.
        match unsafe { aya_ebpf::helpers::bpf_probe_read_user(at as *const u32) } {
            Ok(len) => total += u64::from(len),
            Err(_) => break,
        }
    }
    total
}

#[inline(always)]
fn remember(ctx: &TracePointContext, fd_at: u32, addr_at: u32, addr_kind: u32, kind: EventKind) {
    let (Some(fd), Some(user_addr)) = (field::<u64>(ctx, fd_at), field::<u64>(ctx, addr_at)) else {
        return;
    };
    emit::remember_call(&CallState {
        sk: 0,
        fd,
        user_addr,
        user_addr_kind: addr_kind,
        event_kind: kind as u32,
        dest: Dest::NONE,
    });
}
