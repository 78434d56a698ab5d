//! Tracepoints: for kernels without kprobes and fentry (this project's CI host). Stable
//! ABI, slightly more work: the socket of a UDP syscall is found through its file
//! descriptor. TCP goes through the state changes (`tcp_state`), as in every family.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use egress_shared::EventKind;

use crate::{
    emit,
    maps::{CallState, Slot, USER_ADDR_MSGHDR, USER_ADDR_SOCKADDR, config},
    read,
    sock::{self, Dest},
};

#[inline(always)]
fn field<T>(ctx: &TracePointContext, offset: u32) -> Option<T> {
    // SAFETY: the offset comes from the tracepoint's own format file.
    unsafe { ctx.read_at::<T>(offset as usize).ok() }
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
pub fn tp_sys_exit(ctx: TracePointContext) -> u32 {
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
    let port = if dest.is_some() {
        dest.port
    } else {
        read::kernel::<u16>(sk, config!(offsets.skc_dport)).map_or(0, u16::from_be)
    };
    if port == super::dns::DNS_PORT {
        super::dns::mark(state.fd, sk);
        if state.event_kind == EventKind::UdpSend as u32 {
            // struct syscall_trace_exit: `long ret` at 16.
            // SAFETY: within the syscall exit record.
            let ret = unsafe { ctx.read_at::<i64>(16) }.unwrap_or(0);
            let msghdr = state.user_addr_kind == USER_ADDR_MSGHDR;
            let user_addr = if msghdr { state.user_addr } else { 0 };
            super::dns::query(state.fd, sk, user_addr, msghdr, ret);
        }
    }
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
