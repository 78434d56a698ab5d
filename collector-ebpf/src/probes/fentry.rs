//! fexit: the same UDP hooks as the kprobes, through BPF trampolines (cheaper, and fexit
//! sees arguments and return together, so no state is carried). TCP goes through the
//! state changes (`tcp_state`), attached in this family too.

use aya_ebpf::{macros::fexit, programs::FExitContext};
use egress_shared::EventKind;

use super::dns_sock;
use crate::{
    emit,
    maps::{Slot, config},
    read,
    sock::{self, Dest},
};

/// hook: `int udp_sendmsg(struct sock *sk, struct msghdr *msg, size_t len)`.
#[fexit(function = "udp_sendmsg")]
pub fn fexit_udp_sendmsg(ctx: FExitContext) -> u32 {
    udp_send(&ctx, false, Slot::UdpSend);
    0
}

/// hook: `int udpv6_sendmsg(struct sock *sk, struct msghdr *msg, size_t len)`; IPv4-mapped
/// destinations are reported by the inner udp_sendmsg.
#[fexit(function = "udpv6_sendmsg")]
pub fn fexit_udpv6_sendmsg(ctx: FExitContext) -> u32 {
    udp_send(&ctx, true, Slot::UdpSendV6);
    0
}

/// hook: `int ip4_datagram_connect(struct sock *sk, struct sockaddr *uaddr, int addr_len)`.
#[fexit(function = "ip4_datagram_connect")]
pub fn fexit_ip4_datagram_connect(ctx: FExitContext) -> u32 {
    let dest = sock::dest_from_kernel(ctx.arg::<u64>(1));
    emit::udp(
        ctx.arg::<u64>(0),
        &dest,
        EventKind::UdpConnect,
        false,
        0,
        Slot::UdpConnect,
    );
    dns_sock::udp_connected(ctx.arg::<u64>(0), &dest, ret3(&ctx));
    0
}

/// hook: `int ip6_datagram_connect(struct sock *sk, struct sockaddr *uaddr, int addr_len)`.
#[fexit(function = "ip6_datagram_connect")]
pub fn fexit_ip6_datagram_connect(ctx: FExitContext) -> u32 {
    let dest = sock::dest_from_kernel(ctx.arg::<u64>(1));
    emit::udp(
        ctx.arg::<u64>(0),
        &dest,
        EventKind::UdpConnect,
        false,
        0,
        Slot::UdpConnectV6,
    );
    dns_sock::udp_connected(ctx.arg::<u64>(0), &dest, ret3(&ctx));
    0
}

/// The return value of a three-argument function: the slot after its arguments (not the
/// `bpf_get_func_ret` helper, which would keep this family off kernels before 5.17).
#[inline(always)]
fn ret3(ctx: &FExitContext) -> i64 {
    ctx.arg::<u64>(3) as i32 as i64
}

#[inline(always)]
fn udp_send(ctx: &FExitContext, v4_mapped_reported_inside: bool, slot: Slot) {
    let (sk, msg) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1));
    let name = read::kernel::<u64>(msg, config!(offsets.msghdr_msg_name)).unwrap_or(0);
    let dest = if name == 0 {
        Dest::NONE
    } else {
        sock::dest_from_kernel(name)
    };
    // udp_sendmsg and udpv6_sendmsg return the payload bytes sent.
    let bytes = ret3(ctx).max(0) as u64;
    emit::udp(
        sk,
        &dest,
        EventKind::UdpSend,
        v4_mapped_reported_inside,
        bytes,
        slot,
    );
    dns_sock::udp_sent(sk, &dest, msg, ret3(ctx), v4_mapped_reported_inside);
}
