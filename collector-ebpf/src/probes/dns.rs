//! DNS answers as the workload read them: the socket receives (`sock_recv_length`)
//! where the kernel has that tracepoint and the registers can be read back, else
//! syscall tracepoints on read, recvfrom and recvmsg, limited to descriptors marked when
//! they sent to port 53 (`DNS_SOCKETS`).
//!
//! Why here (docs/dns.md has the figures): on this project's CI kernels only
//! tracepoints exist; `skb:skb_copy_datagram_iovec` misses small datagrams (udp_recvmsg
//! copies a linear skb with `copy_linear_skb`), and no net tracepoint carries the
//! payload as the reader gets it. The syscall tracepoints see glibc/musl (recvfrom,
//! recvmsg), Go (read on a connected socket) and DNS over TCP (read), in the reading
//! task, so cgroup and network namespace are the workload's. On x86_64 only the exits
//! are hooked (the arguments are read back from the registers the task saved at entry),
//! and where the kernel has `sock_recv_length` not even those: its BTF-enabled program
//! runs for socket receives only, reading the same registers. A receive that returned
//! more than 2 bytes, by a process that never marked a socket, costs one helper call and
//! one array load; a process that did pays a hash lookup per such receive. Not seen:
//! io_uring receives (no syscall), readv/recvmmsg.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_boot_ns, bpf_probe_read_user},
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};
use egress_shared::{DNS_PAYLOAD_MAX, DnsFlags, EventKind};

use crate::{
    emit,
    maps::{
        DNS_PROCESSES, DNS_READS, DNS_SCRATCH, DNS_SOCKETS, DnsRead, DnsSocket, EVENTS, config,
    },
    read::Reader,
    sock::{self, IPPROTO_TCP},
    task,
};

/// `struct syscall_trace_enter`: 8-byte `trace_entry`, `int nr`, padding, then the six
/// arguments as `unsigned long` (the same on every 64-bit kernel since 2.6.33);
/// `struct syscall_trace_exit`: `long ret` at the same place as the first argument.
const ARG0: usize = 16;
const ARG1: usize = 24;
pub(crate) const RET: usize = 16;

pub const DNS_PORT: u16 = 53;

/// A field of the syscall record, loaded directly from the context (a tracepoint program
/// may read its record at any aligned offset past the first 8 bytes): one instruction,
/// where `TracePointContext::read_at` is a helper call (measured: 83 -> 126 ns per run
/// when one was added to every read's exit).
#[inline(always)]
pub(crate) fn arg(ctx: &TracePointContext, at: usize) -> u64 {
    // SAFETY: within the syscall record (see ARG0), 8-byte aligned.
    unsafe { core::ptr::read((ctx.as_ptr() as *const u8).add(at).cast::<u64>()) }
}

/// The word and bit of `DNS_PROCESSES` for the process of `pid_tgid`.
#[inline(always)]
fn process_bit(pid_tgid: u64) -> (u32, u64) {
    let tgid = (pid_tgid >> 32) as u32;
    ((tgid >> 6) & 1023, 1 << (tgid & 63))
}

/// Whether the process of `pid_tgid` (`bpf_get_current_pid_tgid()`) has marked a DNS
/// socket (see `DNS_PROCESSES`).
#[inline(always)]
pub fn process_marked(pid_tgid: u64) -> bool {
    let (word, bit) = process_bit(pid_tgid);
    DNS_PROCESSES.get(word).is_some_and(|bits| bits & bit != 0)
}

#[inline(always)]
fn key(pid_tgid: u64, fd: u64) -> u64 {
    (pid_tgid & 0xffff_ffff_0000_0000) | (fd & 0xffff_ffff)
}

/// Marks descriptor `fd` (socket `sk`) of the current process as DNS: its next reads are
/// copied. Called where a send or connect to port 53 is seen with its descriptor.
#[inline(always)]
pub fn mark(fd: u64, sk: u64) {
    if config!(dns) == 0 {
        return;
    }
    let entry = DnsSocket {
        sk,
        sent_ns: unsafe { bpf_ktime_get_boot_ns() },
    };
    let _ = DNS_SOCKETS.insert(&key(bpf_get_current_pid_tgid(), fd), &entry, 0);
    mark_process();
}

/// Sets the current process's bit in `DNS_PROCESSES`: its reads are looked at from now on.
#[inline(always)]
pub fn mark_process() {
    let (word, bit) = process_bit(bpf_get_current_pid_tgid());
    if let Some(slot) = DNS_PROCESSES.get_ptr_mut(word) {
        // SAFETY: a map value; see DNS_PROCESSES on the race.
        unsafe { *slot |= bit };
    }
}

#[inline(always)]
fn enter(ctx: &TracePointContext, is_msghdr: bool) {
    // The early exit every read on the node takes: has this process marked a socket?
    let pid_tgid = bpf_get_current_pid_tgid();
    if !process_marked(pid_tgid) {
        return;
    }
    let fd = arg(ctx, ARG0);
    // SAFETY: a plain value copied out at once.
    let Some(marked) = (unsafe { DNS_SOCKETS.get(&key(pid_tgid, fd)) }) else {
        return;
    };
    let buf = arg(ctx, ARG1);
    let read = DnsRead {
        sk: marked.sk,
        fd,
        buf,
        is_msghdr: is_msghdr as u64,
        sent_ns: marked.sent_ns,
    };
    let _ = DNS_READS.insert(&(pid_tgid as u32), &read, 0);
}

/// hook: tracepoint `syscalls:sys_enter_read` (fd, buf, count).
#[tracepoint(category = "syscalls", name = "sys_enter_read")]
pub fn tp_dns_enter_read(ctx: TracePointContext) -> u32 {
    enter(&ctx, false);
    0
}

/// hook: tracepoint `syscalls:sys_enter_recvfrom` (fd, ubuf, size, flags, addr, addr_len).
#[tracepoint(category = "syscalls", name = "sys_enter_recvfrom")]
pub fn tp_dns_enter_recvfrom(ctx: TracePointContext) -> u32 {
    enter(&ctx, false);
    0
}

/// hook: tracepoint `syscalls:sys_enter_recvmsg` (fd, msg, flags).
#[tracepoint(category = "syscalls", name = "sys_enter_recvmsg")]
pub fn tp_dns_enter_recvmsg(ctx: TracePointContext) -> u32 {
    enter(&ctx, true);
    0
}

/// hook: tracepoints `syscalls:sys_exit_read` and `sys_exit_recvfrom` (ret): copies what
/// a marked read returned into the buffer (the second argument).
#[tracepoint]
pub fn tp_dns_exit_read(ctx: TracePointContext) -> u32 {
    exit(&ctx, false);
    0
}

/// hook: tracepoint `syscalls:sys_exit_recvmsg` (ret): the same, through the `msghdr`.
#[tracepoint]
pub fn tp_dns_exit_recvmsg(ctx: TracePointContext) -> u32 {
    exit(&ctx, true);
    0
}

/// The read's descriptor and buffer: from the registers the task saved at syscall
/// entry (they hold the arguments until the exit; the return value goes elsewhere), or
/// from what the entry hook saved where those offsets are unknown.
#[inline(always)]
fn arguments(pid_tgid: u64, is_msghdr: bool) -> Option<DnsRead> {
    let fd_at = config!(dns_regs_fd);
    if fd_at == 0 {
        let tid = pid_tgid as u32;
        // SAFETY: copied out before removal.
        let read = unsafe { DNS_READS.get(&tid) }.copied()?;
        let _ = DNS_READS.remove(&tid);
        return Some(read);
    }
    let regs = crate::read::Probe::current_pt_regs();
    let fd: u64 = crate::read::kernel(regs, fd_at).ok()?;
    // SAFETY: a plain value copied out at once.
    let marked = unsafe { DNS_SOCKETS.get(&key(pid_tgid, fd)) }?;
    Some(DnsRead {
        sk: marked.sk,
        fd,
        buf: crate::read::kernel(regs, config!(dns_regs_buf)).ok()?,
        is_msghdr: is_msghdr as u64,
        sent_ns: marked.sent_ns,
    })
}

#[inline(always)]
fn exit(ctx: &TracePointContext, is_msghdr: bool) {
    // The return value first: a load from the record. A failed read (EAGAIN on a
    // non-blocking socket above all), or at most the 2-byte length a resolver reads on
    // its own before a TCP message: no DNS message.
    let ret = arg(ctx, RET) as i64;
    if ret <= 2 {
        return;
    }
    // Then the early exit of every other read on the node: whether this process has
    // marked a socket (a helper call and an array load).
    let pid_tgid = bpf_get_current_pid_tgid();
    if !process_marked(pid_tgid) {
        return;
    }
    let Some(read) = arguments(pid_tgid, is_msghdr) else {
        return;
    };
    // The descriptor may name another socket by now (closed and reused).
    if sock::from_fd(read.fd) != Ok(read.sk) {
        let _ = DNS_SOCKETS.remove(&key(pid_tgid, read.fd));
        return;
    }
    copy_answer(&read, ret as u64, false);
}

/// x86_64's read(2), recvfrom(2) and recvmsg(2): the receives whose answer
/// [`tp_dns_sock_recv`] copies (the registers are only read back there).
const NR_READ_X86_64: u32 = 0;
const NR_RECVFROM_X86_64: u32 = 45;
const NR_RECVMSG_X86_64: u32 = 47;

/// hook: BTF-enabled raw tracepoint `sock_recv_length(struct sock *sk, int ret, int
/// flags)` (kernels since 2023; this host's 6.18), which every socket receive passes in
/// the receiving task once the data is in the caller's buffer. Where it exists and the
/// registers can be read back (the syscall's number among them), the
/// answers are taken here instead of at the exits of read(2), recvfrom(2) and
/// recvmsg(2): those ran for every read of every file and pipe on the node (~115 ns
/// each on the Zen 4 host, docs/dns.md), this for socket receives only. The same early
/// returns first: a result of at most 2 bytes, a process that never marked a socket.
#[btf_tracepoint(function = "sock_recv_length")]
pub fn tp_dns_sock_recv(ctx: BtfTracePointContext) -> i32 {
    let ret = ctx.arg::<u64>(1) as i32 as i64;
    if ret <= 2 {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    if !process_marked(pid_tgid) {
        return 0;
    }
    received(
        crate::maps::address_number(ctx.arg::<u64>(0)),
        ret,
        pid_tgid,
    );
    0
}

/// A receive of `ret` bytes on socket `sk` by a process that marked a DNS socket: copied
/// if the syscall is one of the three and its descriptor is marked for this socket. The
/// descriptor's lookup first: most receives of such a process (its other sockets) miss
/// there, before the syscall number's read.
#[inline(always)]
fn received(sk: u64, ret: i64, pid_tgid: u64) {
    let regs = crate::read::Probe::current_pt_regs();
    let Ok(fd) = crate::read::kernel::<u64>(regs, config!(dns_regs_fd)) else {
        return;
    };
    // SAFETY: a plain value copied out at once.
    let Some(marked) = (unsafe { DNS_SOCKETS.get(&key(pid_tgid, fd)) }).copied() else {
        return;
    };
    let is_msghdr = match emit::syscall_nr(regs) {
        Some(NR_READ_X86_64 | NR_RECVFROM_X86_64) => false,
        Some(NR_RECVMSG_X86_64) => true,
        // readv, recvmmsg, io_uring, a kernel socket's receive (`fd` is then no
        // descriptor of this receive): not seen, as at the exits.
        _ => return,
    };
    // The descriptor names another socket by now (closed and reused): the tracepoint's
    // own socket tells, where the exits walked fd -> socket.
    if marked.sk != sk {
        let _ = DNS_SOCKETS.remove(&key(pid_tgid, fd));
        return;
    }
    let Ok(buf) = crate::read::kernel::<u64>(regs, config!(dns_regs_buf)) else {
        return;
    };
    let read = DnsRead {
        sk,
        fd,
        buf,
        is_msghdr: is_msghdr as u64,
        sent_ns: marked.sent_ns,
    };
    copy_answer(&read, ret as u64, false);
}

/// A send to port 53 that succeeded (`ret` > 0): copies the query, so lookups that get
/// no answer are visible too. `user_addr` is the `msghdr` (sendmsg; the first of
/// sendmmsg), or 0 for sendto, whose buffer is read back from the saved registers.
#[inline(always)]
pub fn query(fd: u64, sk: u64, user_addr: u64, is_msghdr: bool, ret: i64) {
    if config!(dns) == 0 || ret <= 0 {
        return;
    }
    let buf = if is_msghdr {
        user_addr
    } else {
        let buf_at = config!(dns_regs_buf);
        if buf_at == 0 {
            return;
        }
        match crate::read::kernel::<u64>(crate::read::Probe::current_pt_regs(), buf_at) {
            Ok(buf) => buf,
            Err(_) => return,
        }
    };
    let read = DnsRead {
        sk,
        fd,
        buf,
        is_msghdr: is_msghdr as u64,
        sent_ns: 0,
    };
    // sendmmsg returns a count of messages: the first iovec's length bounds the copy.
    let returned = if is_msghdr { u64::MAX } else { ret as u64 };
    copy_answer(&read, returned, true);
}

#[inline(always)]
fn copy_answer(read: &DnsRead, returned: u64, is_query: bool) {
    let (src, len) = if read.is_msghdr != 0 {
        // struct user_msghdr: msg_iov at 16; the first iovec holds the message.
        let iov: u64 = unsafe { bpf_probe_read_user((read.buf + 16) as *const u64) }.unwrap_or(0);
        if iov == 0 {
            return;
        }
        let base: u64 = unsafe { bpf_probe_read_user(iov as *const u64) }.unwrap_or(0);
        let iov_len: u64 = unsafe { bpf_probe_read_user((iov + 8) as *const u64) }.unwrap_or(0);
        (base, returned.min(iov_len))
    } else {
        (read.buf, returned)
    };
    emit_message(read.sk, src, len, read.sent_ns, is_query, is_query as u32);
}

/// Copies the DNS message of `len` bytes at user address `src`, which socket `sk` received
/// (or sent, `is_query`), into a [`egress_shared::DnsEvent`] of the current task. Every
/// hook family ends here, so user space reads one record whatever hooked it. `slot`: the
/// calling program's `DNS_SCRATCH` slot.
#[inline(always)]
pub fn emit_message(sk: u64, src: u64, len: u64, sent_ns: u64, is_query: bool, slot: u32) {
    let Some(slot) = DNS_SCRATCH.get_ptr_mut(slot) else {
        return;
    };
    // SAFETY: the per-CPU slot is ours for the rest of this program run.
    let ev = unsafe { &mut *slot };
    ev.head = egress_shared::ConnectEvent::zeroed();
    ev.flags = 0;
    let mut len = len;
    if src == 0 {
        return;
    }
    if len > DNS_PAYLOAD_MAX as u64 {
        len = DNS_PAYLOAD_MAX as u64;
        ev.flags |= DnsFlags::TRUNCATED;
    }
    // Bounded for the verifier (1 ..= DNS_PAYLOAD_MAX) on the value the helper gets: read
    // back through a volatile load and checked right before the call. Otherwise LLVM may
    // bound one copy in a register and hand the helper another reloaded from the stack,
    // whose bounds 6.1's verifier does not carry over from the check ("R2 min value is
    // negative": it refused the receive fexits so; 6.12's links the two copies).
    // SAFETY: a read of a local.
    let n = unsafe { core::ptr::read_volatile(&len) };
    if n == 0 || n > DNS_PAYLOAD_MAX as u64 {
        return;
    }
    let copied = unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_user(
            ev.payload.as_mut_ptr().cast(),
            n as u32,
            src as *const core::ffi::c_void,
        )
    };
    if copied != 0 {
        emit::count(egress_shared::Counter::KernelReadFailed);
        return;
    }
    ev.payload_len = n as u16;
    let slot = if is_query {
        crate::maps::Slot::CallExit
    } else {
        crate::maps::Slot::DnsAnswer
    };
    if !task::fill(&mut ev.head, slot) {
        emit::count(egress_shared::Counter::KernelReadFailed);
    }
    if sock::fill(&mut ev.head, sk).is_err() {
        emit::count(egress_shared::Counter::KernelReadFailed);
    }
    if ev.head.protocol == IPPROTO_TCP {
        ev.flags |= DnsFlags::TCP;
    }
    if is_query {
        ev.flags |= DnsFlags::QUERY;
    }
    ev.head.kind = EventKind::DnsAnswer as u8;
    ev.head.sock_id = sk;
    ev.latency_ns = ev
        .head
        .boot_time_ns
        .wrapping_sub(sent_ns)
        .min(u32::MAX as u64) as u32;
    if EVENTS
        .output::<egress_shared::DnsEvent>(&*ev, emit::wakeup_flags())
        .is_err()
    {
        emit::count(egress_shared::Counter::RingBufferFull);
    }
}
