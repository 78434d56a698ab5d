//! The TCP state machine, the same in every hook family: one attempt per socket opened
//! at CLOSE -> SYN_SENT (in the connecting task: the identity is captured there),
//! completed at the next transition (usually in softirq: no task is read), and, for a
//! reported connection that was established, closed at -> CLOSE with what `tcp_sock`
//! counted. A reset this host sends before CLOSE is noted on the way by
//! `tcp:tcp_send_reset`; a reset from the peer needs no hook (its error is on the socket).

use aya_ebpf::{
    macros::{btf_tracepoint, raw_tracepoint, tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
};

use crate::{
    emit,
    maps::{
        SIMULTANEOUS_MARKED, SIMULTANEOUS_OPEN_SLOTS, SIMULTANEOUS_OPENS, Slot, address_number,
        config,
    },
    read::{Direct, Probe, Reader},
    sock::{self, IPPROTO_TCP},
};

const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const TCP_CLOSE: i32 = 7;

/// The transitions the state machine acts on; every other one returns at once.
/// SYN_RECV -> ESTABLISHED is every accepted connection's too: it costs them the load of
/// one word (`SIMULTANEOUS_MARKED`, while no simultaneous open is in flight), not a hash
/// lookup. Every move out of SYN_RECV counts: a simultaneous open the application closes
/// before it is established leaves by SYN_RECV -> FIN_WAIT1, and must still complete
/// (failed) and free its mark and slot.
/// Other moves to CLOSE (both ends of every connection) only when closes are reported.
#[inline(always)]
fn interesting(old: i32, new: i32) -> bool {
    (old == TCP_CLOSE && new == TCP_SYN_SENT)
        || old == TCP_SYN_SENT
        || old == TCP_SYN_RECV
        || (new == TCP_CLOSE && config!(track_closes) != 0)
}

/// The `SIMULTANEOUS_OPENS` slot of a socket (a fold of its address).
#[inline(always)]
fn simultaneous_slot(sk: u64) -> u32 {
    ((sk >> 6) ^ (sk >> 16)) as u32 % SIMULTANEOUS_OPEN_SLOTS
}

/// Whether any socket may be marked by [`mark_simultaneous`]: one load of a word that
/// stays zero but for a simultaneous open in flight (see `maps::SIMULTANEOUS_MARKED`);
/// always true where marks are not counted (before 5.12).
#[inline(always)]
fn any_simultaneous() -> bool {
    config!(fetching_atomics) == 0
        || SIMULTANEOUS_MARKED
            .get_ptr_mut(0)
            .is_none_or(|marked| emit::load(marked) != 0)
}

/// SYN_SENT -> SYN_RECV: a SYN crossed ours (simultaneous open); the attempt stays
/// pending (its `PENDING_SLOTS` slot or `PENDING_TCP`) and completes at SYN_RECV -> ESTABLISHED (or CLOSE).
#[inline(always)]
fn mark_simultaneous(sk: u64) {
    let Some(mark) = SIMULTANEOUS_OPENS.get_ptr_mut(simultaneous_slot(sk)) else {
        return;
    };
    if config!(fetching_atomics) == 0 {
        // SAFETY: an 8-byte aligned global word, valid for this run.
        unsafe { core::ptr::write_volatile(mark, sk) };
        return;
    }
    // A slot that held another socket's mark (lost now, as before) was counted already.
    if emit::exchange(mark, sk) == 0
        && let Some(marked) = SIMULTANEOUS_MARKED.get_ptr_mut(0)
    {
        emit::atomic_add(marked, 1);
    }
}

/// Whether `sk` is marked by [`mark_simultaneous`] (the mark stays); the caller looked at
/// [`any_simultaneous`] first.
#[inline(always)]
fn marked_simultaneous(sk: u64) -> bool {
    SIMULTANEOUS_OPENS
        .get(simultaneous_slot(sk))
        .is_some_and(|mark| *mark == sk)
}

/// Whether `sk` was marked by [`mark_simultaneous`]; clears the mark.
#[inline(always)]
fn take_simultaneous(sk: u64) -> bool {
    if !any_simultaneous() {
        return false;
    }
    let Some(mark) = SIMULTANEOUS_OPENS.get_ptr_mut(simultaneous_slot(sk)) else {
        return false;
    };
    if emit::load(mark) != sk {
        return false;
    }
    if config!(fetching_atomics) == 0 {
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(mark, 0) };
        return true;
    }
    // Cleared once, by whichever run takes it, and uncounted by that run alone.
    if !emit::compare_exchange(mark, sk, 0) {
        return false;
    }
    if let Some(marked) = SIMULTANEOUS_MARKED.get_ptr_mut(0) {
        emit::atomic_add(marked, 1u64.wrapping_neg());
    }
    true
}

/// One transition of a TCP socket; `slot` is the program's scratch slot. `R` reads the
/// socket `sk`; `sk_id` is its address as a plain number (see [`address_number`]), which keys
/// the maps.
///
/// Out of line (a BPF-to-BPF call): most runs of the programs (the server's side, the FIN
/// states) return on the state check before this, and with this body inlined their
/// return was a jump from the program's first lines to its epilogue, which the x86 JIT
/// emits at the first `exit` in program order, placed ~10 KB further on by LLVM.
#[inline(never)]
fn transition<R: Reader>(sk: u64, sk_id: u64, old: i32, new: i32, slot: Slot) {
    if old == TCP_CLOSE && new == TCP_SYN_SENT {
        // In the connecting task (a connect to port 53 marks the socket for DNS there).
        emit::tcp_syn_sent::<R>(sk, sk_id, slot);
    } else if old == TCP_SYN_SENT {
        if new == TCP_ESTABLISHED || new == TCP_CLOSE {
            // Established by the SYN-ACK being processed: the socket's clock is fresh (a
            // TCP_REPAIR socket is not, and fails the completion's check).
            let established = new == TCP_ESTABLISHED;
            emit::tcp_complete::<R>(sk, sk_id, established, established);
        } else if new == TCP_SYN_RECV {
            mark_simultaneous(sk_id);
        }
    } else if old == TCP_SYN_RECV && take_simultaneous(sk_id) {
        // The second half of a simultaneous open (ESTABLISHED; CLOSE on a reset or a
        // timeout; FIN_WAIT1 when the application closed it first). An accepted
        // connection is never marked: it goes on below.
        emit::tcp_complete::<R>(sk, sk_id, new == TCP_ESTABLISHED, false);
    } else if new == TCP_CLOSE && config!(track_closes) != 0 {
        emit::tcp_closed::<R>(sk, sk_id, old as u8);
    }
}

/// hook: BTF-enabled raw tracepoint `inet_sock_set_state(const struct sock *sk, int
/// oldstate, int newstate)` (5.5+ with BTF; 5.11+ for the task's typed pointer):
/// preferred to the raw tracepoint below, in every family. The same arguments, but `sk`
/// is a typed pointer: the socket's and the task's fields are read with plain loads
/// (`read::Direct`) instead of a helper call each.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn tp_btf_inet_sock_set_state(ctx: BtfTracePointContext) -> i32 {
    state_change::<Direct>(
        ctx.arg::<u64>(0),
        ctx.arg::<u64>(1) as i32,
        ctx.arg::<u64>(2) as i32,
    );
    0
}

/// What both programs that get the arguments as they are do (`R`: how they read).
#[inline(always)]
fn state_change<R: Reader>(sk: u64, old: i32, new: i32) {
    if !interesting(old, new) {
        return;
    }
    // Only the opening needs the protocol: later transitions look the socket up in maps
    // that hold TCP sockets only, which costs no more than reading it.
    let opening = old == TCP_CLOSE && new == TCP_SYN_SENT;
    if opening && sock::protocol_by::<R>(sk) != Ok(IPPROTO_TCP) {
        return;
    }
    // An accepted connection leaving SYN_RECV, with no simultaneous open in flight: one
    // load, before the socket's number.
    let closes = new == TCP_CLOSE && config!(track_closes) != 0;
    if old == TCP_SYN_RECV && !closes && !any_simultaneous() {
        return;
    }
    // A typed pointer (plain loads) needs its number (`address_number`); a raw one is one.
    let sk_id = if R::DIRECT { address_number(sk) } else { sk };
    // A completion or an accepted connection with nothing kept for it (a dropped
    // attempt, an accepted connection: most of these runs) ends here, before the call
    // to the out-of-line body: a call and its return cost ~10 ns with today's return
    // thunks. The body looks again (the same lines, in cache by then).
    if old == TCP_SYN_SENT && (new == TCP_ESTABLISHED || new == TCP_CLOSE) {
        if !emit::attempt_may_be_kept(sk_id) {
            return;
        }
    } else if old == TCP_SYN_RECV && !closes && !marked_simultaneous(sk_id) {
        return;
    }
    // One of the two programs is attached: they share the scratch slot.
    transition::<R>(sk, sk_id, old, new, Slot::RawSockState);
}

/// hook: raw tracepoint `inet_sock_set_state(const struct sock *sk, int oldstate, int
/// newstate)`: preferred to the tracepoint below, in every family. A tracepoint program
/// makes the kernel assemble the event's record (addresses, ports) on each of a
/// connection's ~10 state changes, client and server side, before the program can even
/// look at the states; a raw one gets the arguments as they are, and reads the socket
/// only on the transitions the state machine acts on.
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn raw_tp_inet_sock_set_state(ctx: RawTracePointContext) -> i32 {
    state_change::<Probe>(
        ctx.arg::<u64>(0),
        ctx.arg::<u64>(1) as i32,
        ctx.arg::<u64>(2) as i32,
    );
    0
}

#[inline(always)]
fn field<T>(ctx: &TracePointContext, offset: u32) -> Option<T> {
    // SAFETY: the offset comes from the tracepoint's own format file.
    unsafe { ctx.read_at::<T>(offset as usize).ok() }
}

/// hook: tracepoint `sock:inet_sock_set_state` (skaddr, oldstate, newstate, protocol,
/// sport…): the fallback where raw tracepoints are refused.
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
    if !interesting(old, new) {
        return 0;
    }
    transition::<Probe>(sk, sk, old, new, Slot::SockState);
    0
}

/// hook: raw tracepoint `tcp_send_reset(const struct sock *sk, const struct sk_buff *skb,
/// ...)` (4.15+; sk is NULL for a reply to an unknown segment): this host sent a RST.
#[raw_tracepoint(tracepoint = "tcp_send_reset")]
pub fn raw_tp_tcp_send_reset(ctx: RawTracePointContext) -> i32 {
    emit::tcp_reset_sent(ctx.arg::<u64>(0));
    0
}
