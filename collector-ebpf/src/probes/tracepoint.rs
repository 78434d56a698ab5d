//! Tracepoints: for kernels without kprobes and fentry (this project's CI host). Stable
//! ABI, slightly more work: the TCP source port is read when connect() returns, and the
//! socket of a syscall is found through its file descriptor.

use aya_ebpf::{
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};
use egress_shared::EventKind;

use crate::{
    emit,
    maps::{CallState, Slot, USER_ADDR_MSGHDR, USER_ADDR_SOCKADDR, config},
    read,
    sock::{self, Dest, IPPROTO_TCP},
};

const TCP_SYN_SENT: i32 = 2;
const TCP_CLOSE: i32 = 7;

#[inline(always)]
fn field<T>(ctx: &TracePointContext, offset: u32) -> Option<T> {
    // SAFETY: the offset comes from the tracepoint's own format file.
    unsafe { ctx.read_at::<T>(offset as usize).ok() }
}

/// hook: tracepoint `sock:inet_sock_set_state` (skaddr, oldstate, newstate, protocol…).
/// CLOSE -> SYN_SENT happens in the connecting task, so its identity is captured there;
/// SYN_SENT -> anything completes an attempt not completed by a connect() exit
/// (io_uring, kernel sockets).
#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn tp_inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let Some(protocol) = field::<u16>(&ctx, config!(tracepoints.state_protocol)) else {
        return 0;
    };
    if protocol != IPPROTO_TCP as u16 {
        return 0;
    }
    let (Some(sk), Some(old), Some(new)) = (
        field::<u64>(&ctx, config!(tracepoints.state_skaddr)),
        field::<i32>(&ctx, config!(tracepoints.state_oldstate)),
        field::<i32>(&ctx, config!(tracepoints.state_newstate)),
    ) else {
        return 0;
    };
    if old == TCP_CLOSE && new == TCP_SYN_SENT {
        emit::tcp_syn_sent(sk, Slot::SockState);
    } else if old == TCP_SYN_SENT {
        // On the way to CLOSE the port is released (inet_num zeroed) before this fires;
        // the record's sport (inet_sport) still names it.
        let sport = field::<u16>(&ctx, config!(tracepoints.state_sport)).unwrap_or(0);
        emit::tcp_complete(sk, sport);
    }
    0
}

/// hook: raw tracepoint `inet_sock_set_state(const struct sock *sk, int oldstate, int
/// newstate)`: the same event as `tp_inet_sock_set_state`, preferred to it. A tracepoint
/// program makes the kernel assemble the event's record (addresses, ports) on each of a
/// connection's ~10 state changes, client and server side, before the program can even
/// look at the states; a raw one gets the arguments as they are, and reads the socket
/// only on the two transitions it reports.
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn raw_tp_inet_sock_set_state(ctx: RawTracePointContext) -> i32 {
    let old = ctx.arg::<u64>(1) as i32;
    let new = ctx.arg::<u64>(2) as i32;
    let opening = old == TCP_CLOSE && new == TCP_SYN_SENT;
    if !opening && old != TCP_SYN_SENT {
        return 0;
    }
    let sk = ctx.arg::<u64>(0);
    if sock::protocol(sk) != Ok(IPPROTO_TCP) {
        return 0;
    }
    if opening {
        emit::tcp_syn_sent(sk, Slot::RawSockState);
    } else {
        // inet_sport (network order) still names the port after inet_num is released.
        let sport = read::kernel::<u16>(sk, config!(offsets.inet_sport)).map_or(0, u16::from_be);
        emit::tcp_complete(sk, sport);
    }
    0
}

/// hook: tracepoint `syscalls:sys_enter_connect` (fd, uservaddr, addrlen).
#[tracepoint(category = "syscalls", name = "sys_enter_connect")]
pub fn tp_sys_enter_connect(ctx: TracePointContext) -> u32 {
    let fd = config!(tracepoints.connect_fd);
    let addr = config!(tracepoints.connect_addr);
    remember(&ctx, fd, addr, USER_ADDR_SOCKADDR, EventKind::UdpConnect);
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
    remember(&ctx, fd, msg, USER_ADDR_MSGHDR, EventKind::UdpSend);
    0
}

/// hook: tracepoint `syscalls:sys_exit_connect`, and `sys_exit_sendto`, `sys_exit_sendmsg`,
/// `sys_exit_sendmmsg`: the socket is bound now, so its source port is known.
#[tracepoint]
pub fn tp_sys_exit(_ctx: TracePointContext) -> u32 {
    let Some(state) = emit::take_call() else {
        return 0;
    };
    let Ok(sk) = sock::from_fd(state.fd) else {
        return 0;
    };
    let dest = match state.user_addr_kind {
        USER_ADDR_SOCKADDR => sock::dest_from_user(state.user_addr),
        USER_ADDR_MSGHDR => sock::dest_from_user_msghdr(state.user_addr),
        _ => Dest::NONE,
    };
    if state.event_kind == EventKind::UdpConnect as u32 {
        emit::connect_exit(sk, &dest, Slot::CallExit);
    } else {
        emit::udp(sk, &dest, EventKind::UdpSend, false, Slot::CallExit);
    }
    0
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
