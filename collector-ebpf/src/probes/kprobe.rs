//! kprobes: the design's first choice for UDP: calls are followed from entry (arguments)
//! to return (source port chosen by autobind). TCP goes through the state changes
//! (`tcp_state`), attached in this family too.

use aya_ebpf::{
    macros::{kprobe, kretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use egress_shared::EventKind;

use super::dns_sock;
use crate::{
    emit,
    maps::{CallState, Slot, config},
    read,
    sock::{self, Dest},
};

/// hook: `int udp_sendmsg(struct sock *sk, struct msghdr *msg, size_t len)` and
/// `int udpv6_sendmsg(...)` (same arguments). `msg->msg_name` is the kernel copy of the
/// caller's destination, NULL on a connected socket.
#[kprobe]
pub fn kprobe_udp_sendmsg(ctx: ProbeContext) -> u32 {
    let (Some(sk), Some(msg)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) else {
        return 0;
    };
    let name = read::kernel::<u64>(msg, config!(offsets.msghdr_msg_name)).unwrap_or(0);
    let dest = if name == 0 {
        Dest::NONE
    } else {
        sock::dest_from_kernel(name)
    };
    remember(sk, dest, EventKind::UdpSend, msg);
    0
}

/// hook: `int ip4_datagram_connect(struct sock *sk, struct sockaddr *uaddr, int addr_len)`
/// and `ip6_datagram_connect` (same arguments): connect() on a UDP socket (ping and raw
/// sockets share them; the protocol is checked at return).
#[kprobe]
pub fn kprobe_udp_connect(ctx: ProbeContext) -> u32 {
    let (Some(sk), Some(uaddr)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) else {
        return 0;
    };
    remember(sk, sock::dest_from_kernel(uaddr), EventKind::UdpConnect, 0);
    0
}

/// hook: return of the four UDP functions above. udpv6_sendmsg calls udp_sendmsg for
/// IPv4-mapped destinations; the inner call takes the saved state, so it is reported once.
#[kretprobe]
pub fn kretprobe_udp(ctx: RetProbeContext) -> u32 {
    if let Some(state) = emit::take_call() {
        let kind = EventKind::from_raw(state.event_kind as u8).unwrap_or(EventKind::UdpSend);
        let ret = ctx.ret::<i32>() as i64;
        // udp_sendmsg and udpv6_sendmsg return the payload bytes sent.
        let bytes = if kind == EventKind::UdpSend {
            ret.max(0) as u64
        } else {
            0
        };
        emit::udp(state.sk, &state.dest, kind, false, bytes, Slot::CallExit);
        if kind == EventKind::UdpConnect {
            dns_sock::udp_connected(state.sk, &state.dest, ret);
        } else {
            dns_sock::udp_sent(state.sk, &state.dest, state.user_addr, ret, false);
        }
    }
    0
}

/// `msg`: the kernel `msghdr` of a send, for its return to copy a DNS query from (kprobe
/// mode keeps it in `user_addr`, which only tracepoint mode uses otherwise); 0 for connects.
#[inline(always)]
fn remember(sk: u64, dest: Dest, kind: EventKind, msg: u64) {
    emit::remember_call(&CallState {
        sk,
        fd: 0,
        user_addr: msg,
        user_addr_kind: 0,
        event_kind: kind as u32,
        dest,
    });
}
