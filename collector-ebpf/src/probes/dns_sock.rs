//! DNS in the kprobe and fentry families: below the syscalls, keyed by socket.
//!
//! Marking: the families' own UDP send and connect hooks (`kprobe`, `fentry`) and the TCP
//! state change (every family, at SYN_SENT) mark a socket whose destination port is 53
//! in `DNS_SOCKS`, and its process in `DNS_PROCESSES`. The UDP send hooks copy the query.
//!
//! Answers: `udp_recvmsg`, `udpv6_recvmsg` (AF_INET6 sockets, IPv4-mapped peers
//! included, never reach the first) and `tcp_recvmsg`, at return (kretprobe, after a
//! kprobe that saves the arguments; fexit, which has both). Every receive on the node
//! pays the process bit (one array load; fexit looks at the return value before it); a
//! process that marked a socket pays a hash lookup by socket. After the copy the message's iterator points just past the
//! message in the caller's buffer: that is where the bytes are read from ([`consumed`]),
//! whatever the syscall (read, recvfrom, recvmsg, recvmmsg, readv) or io_uring. The
//! task is the receiving one, so cgroup and network namespace are the workload's.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_boot_ns},
    macros::{fexit, kprobe, kretprobe},
    programs::{FExitContext, ProbeContext, RetProbeContext},
};

use super::dns::{DNS_PORT, emit_message, mark_process, process_marked};
use crate::{
    maps::{DNS_RECVS, DNS_SOCKS, DnsRecv, DnsSock, config},
    read,
    sock::{AF_INET, AF_INET6, Dest, is_v4_mapped},
};

/// `sizeof(struct iovec)` (user ABI, 64-bit).
const IOVEC_SIZE: u64 = 16;

/// `ntohs(sk->sk_dport)`.
#[inline(always)]
fn dest_port(sk: u64) -> u16 {
    read::kernel::<u16>(sk, config!(offsets.skc_dport)).map_or(0, u16::from_be)
}

/// Marks `sk` as DNS if `port` is 53: its answers are copied from now on.
#[inline(always)]
fn mark(sk: u64, port: u16) {
    if config!(dns) == 0 || port != DNS_PORT || sk == 0 {
        return;
    }
    let entry = DnsSock {
        sent_ns: unsafe { bpf_ktime_get_boot_ns() },
        // UDP has its port by now (autobind on the first send or connect); a TCP socket
        // at SYN_SENT does not yet: 0, and the peer's port is checked instead.
        local_port: read::kernel(sk, config!(offsets.skc_num)).unwrap_or(0),
        _pad: [0; 6],
    };
    let _ = DNS_SOCKS.insert(&sk, &entry, 0);
    mark_process();
}

/// A TCP socket entering SYN_SENT, in the connecting task (every family).
#[inline(always)]
pub fn tcp_connecting(sk: u64) {
    if config!(dns) == 0 {
        return;
    }
    mark(sk, dest_port(sk));
}

/// The destination port of a UDP send or connect: the caller's, else the connected one.
#[inline(always)]
fn udp_port(sk: u64, dest: &Dest) -> u16 {
    if dest.is_some() {
        dest.port
    } else {
        dest_port(sk)
    }
}

/// A UDP connect on `sk` returned (kprobe and fentry families).
#[inline(always)]
pub fn udp_connected(sk: u64, dest: &Dest, ret: i64) {
    if config!(dns) == 0 || ret != 0 {
        return;
    }
    mark(sk, udp_port(sk, dest));
}

/// A UDP send on `sk` through kernel `msghdr` `msg` returned `ret`: marks the socket and
/// copies the query. `v6_outer`: the hook is udpv6_sendmsg, which hands IPv4 and
/// IPv4-mapped destinations to udp_sendmsg, whose own hook copies them.
#[inline(always)]
pub fn udp_sent(sk: u64, dest: &Dest, msg: u64, ret: i64, v6_outer: bool) {
    if config!(dns) == 0 || ret <= 0 {
        return;
    }
    let port = udp_port(sk, dest);
    if port != DNS_PORT {
        return;
    }
    if v6_outer && goes_to_udp_sendmsg(sk, dest) {
        return;
    }
    mark(sk, port);
    if let Some((src, n)) = consumed(msg, ret as u64) {
        emit_message(sk, src, n, 0, true, 1);
    }
}

/// Whether udpv6_sendmsg handed this send to udp_sendmsg: an IPv4 or IPv4-mapped
/// destination, given or connected.
#[inline(always)]
fn goes_to_udp_sendmsg(sk: u64, dest: &Dest) -> bool {
    if dest.family == AF_INET {
        return true;
    }
    if dest.family == AF_INET6 {
        return is_v4_mapped(&dest.addr);
    }
    let mut daddr = [0u8; 16];
    read::kernel_buf(sk, config!(offsets.skc_v6_daddr), &mut daddr).is_ok() && is_v4_mapped(&daddr)
}

/// Where the last `n` bytes that went through `msg`'s iterator are, in the caller's
/// memory: (address, length). After the kernel copied a message, the iterator stands just
/// past it: `ubuf + iov_offset` for one buffer (ITER_UBUF: read, recvfrom since 6.4,
/// io_uring); for an iovec array, `iov_offset` into the current segment, or, when the
/// message filled its segment to the end, the iterator moved on to the next one and the
/// message ends with the segment before. A message spread over several segments (musl's
/// TCP reads: the 2-byte length, then the body) yields the part in the last one.
#[inline(always)]
fn consumed(msg: u64, n: u64) -> Option<(u64, u64)> {
    if config!(dns_iter.usable) == 0 || msg == 0 {
        return None;
    }
    let iter = msg + config!(dns_iter.msghdr_msg_iter) as u64;
    let kind = read::kernel::<u8>(iter, config!(dns_iter.iter_type)).ok()? as u32;
    let offset: u64 = read::kernel(iter, config!(dns_iter.iov_offset)).ok()?;
    let ptr: u64 = read::kernel(iter, config!(dns_iter.iter_ptr)).ok()?;
    if kind == config!(dns_iter.iter_ubuf) {
        let n = n.min(offset);
        return Some((ptr + offset - n, n));
    }
    if kind != config!(dns_iter.iter_iovec) || ptr == 0 {
        return None;
    }
    if offset > 0 {
        let base: u64 = read::kernel(ptr, 0).ok()?;
        let n = n.min(offset);
        return Some((base + offset - n, n));
    }
    let segment = ptr.wrapping_sub(IOVEC_SIZE);
    let base: u64 = read::kernel(segment, 0).ok()?;
    let len: u64 = read::kernel(segment, 8).ok()?;
    let n = n.min(len);
    Some((base + len - n, n))
}

/// The mark of `sk`, if it is still the socket that was marked: a UDP socket keeps its
/// local port, a TCP one its peer's port 53 (a freed socket's address reused by another
/// socket fails the check and loses the mark).
#[inline(always)]
fn marked(sk: u64) -> Option<DnsSock> {
    // SAFETY: a plain value copied out at once.
    let mark = unsafe { DNS_SOCKS.get(&sk) }.copied()?;
    let same = if mark.local_port != 0 {
        read::kernel::<u16>(sk, config!(offsets.skc_num)) == Ok(mark.local_port)
    } else {
        dest_port(sk) == DNS_PORT
    };
    if !same {
        let _ = DNS_SOCKS.remove(&sk);
        return None;
    }
    Some(mark)
}

/// A receive on a marked socket returned `ret` (bytes, or the datagram's length with
/// MSG_TRUNC); `len` is the caller's buffer size.
#[inline(always)]
fn received(sk: u64, msg: u64, len: u64, ret: i64, sent_ns: u64, slot: u32) {
    // Errors, and a resolver reading a TCP message's 2-byte length on its own (glibc).
    if ret <= 2 {
        return;
    }
    if let Some((src, n)) = consumed(msg, (ret as u64).min(len)) {
        emit_message(sk, src, n, sent_ns, false, slot);
    }
}

/// hook: `int udp_recvmsg(struct sock *sk, struct msghdr *msg, size_t len, int flags,
/// int *addr_len)`, and `udpv6_recvmsg`, `tcp_recvmsg` (the same five arguments since
/// 5.19; before, a `noblock` argument came fourth). Saves the call for its return
/// when the socket is marked.
#[kprobe]
pub fn kprobe_dns_recvmsg(ctx: ProbeContext) -> u32 {
    // The early exit of every receive on the node.
    let pid_tgid = bpf_get_current_pid_tgid();
    if !process_marked(pid_tgid) {
        return 0;
    }
    let (Some(sk), Some(msg), Some(len)) =
        (ctx.arg::<u64>(0), ctx.arg::<u64>(1), ctx.arg::<u64>(2))
    else {
        return 0;
    };
    let Some(mark) = marked(sk) else {
        return 0;
    };
    let recv = DnsRecv {
        sk,
        msg,
        len,
        sent_ns: mark.sent_ns,
    };
    let _ = DNS_RECVS.insert(&(pid_tgid as u32), &recv, 0);
    0
}

/// hook: return of the three functions above.
#[kretprobe]
pub fn kretprobe_dns_recvmsg(ctx: RetProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !process_marked(pid_tgid) {
        return 0;
    }
    let tid = pid_tgid as u32;
    // SAFETY: copied out before removal.
    let Some(recv) = (unsafe { DNS_RECVS.get(&tid) }).copied() else {
        return 0;
    };
    let _ = DNS_RECVS.remove(&tid);
    let ret = ctx.ret::<i32>() as i64;
    received(recv.sk, recv.msg, recv.len, ret, recv.sent_ns, 0);
    0
}

#[inline(always)]
fn fexit_recv(ctx: &FExitContext, slot: u32) {
    // The return value first, one load from the context (`FExitContext::ret` is a helper
    // call): it follows the five arguments these functions have had since 5.19 (`noblock`
    // dropped); this hook runs on 6.0+ only (`ITER_UBUF`, see attach_dns). Errors (EAGAIN
    // on non-blocking sockets above all) and 2-byte reads leave at once.
    let ret = ctx.arg::<u64>(5) as i32 as i64;
    if ret <= 2 {
        return;
    }
    // Then the early exit of every other receive on the node.
    if !process_marked(bpf_get_current_pid_tgid()) {
        return;
    }
    let sk: u64 = ctx.arg(0);
    let Some(mark) = marked(sk) else {
        return;
    };
    received(sk, ctx.arg(1), ctx.arg(2), ret, mark.sent_ns, slot);
}

/// hook: `int udp_recvmsg(struct sock *sk, struct msghdr *msg, size_t len, int flags,
/// int *addr_len)` (see `kprobe_dns_recvmsg`).
#[fexit(function = "udp_recvmsg")]
#[inline(always)]
pub fn fexit_dns_udp_recvmsg(ctx: FExitContext) -> u32 {
    // A scratch slot of its own: on preemptible kernels another of these can run on this
    // CPU while this one is preempted (docs/kernel.md).
    fexit_recv(&ctx, 2);
    0
}

/// hook: `int udpv6_recvmsg(...)`, the same arguments.
#[fexit(function = "udpv6_recvmsg")]
#[inline(always)]
pub fn fexit_dns_udpv6_recvmsg(ctx: FExitContext) -> u32 {
    // A scratch slot of its own: on preemptible kernels another of these can run on this
    // CPU while this one is preempted (docs/kernel.md).
    fexit_recv(&ctx, 3);
    0
}

/// hook: `int tcp_recvmsg(...)`, the same arguments: DNS over TCP.
#[fexit(function = "tcp_recvmsg")]
#[inline(always)]
pub fn fexit_dns_tcp_recvmsg(ctx: FExitContext) -> u32 {
    // A scratch slot of its own: on preemptible kernels another of these can run on this
    // CPU while this one is preempted (docs/kernel.md).
    fexit_recv(&ctx, 4);
    0
}
