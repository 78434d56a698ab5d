//! Assembling, de-duplicating and submitting events; the counters.

use core::ptr::NonNull;

use aya_ebpf::{
    bindings::BPF_NOEXIST, helpers::bpf_get_current_task, maps::ring_buf::RingBufEntry,
};
use egress_shared::{
    AggregateKey, CloseFlags, ConnState, ConnectEvent, Counter, EventKind, FlowKey, FlowState,
    MAX_CGROUP_BURST, MAX_CGROUP_RATE, ResetBy, TcpCloseEvent, flow::sweep,
};

use crate::{
    clock, filter,
    maps::{
        BOOT_OFFSET, Bucket, BucketSlot, CALL_HINT_SLOTS, CALL_HINTS, CALLS, CGROUP_BUCKET_SLOTS,
        CGROUP_BUCKETS, CONNECT_EXIT_MARKS, COUNTERS, CachedIdentity, CallState, EVENTS,
        FLOW_SWEPT, OPEN_SLOT_BITS, OPEN_SLOTS, OPEN_SPILLS, OPEN_TCP, OpenConn, PENDING_SLOT_BITS,
        PENDING_SLOTS, PENDING_SPILLED, PENDING_SPILLS, PENDING_TCP, SCRATCH, Slot,
        TCP_CONNECT_MARKS, UDP_FLOWS, config,
    },
    read::{self, Probe, Reader},
    sock::{self, Dest, IPPROTO_TCP, IPPROTO_UDP},
    task,
};

/// Adds to a counter with an atomic add: two programs interleaving on one CPU (see
/// [`SCRATCH`]) must not lose each other's increments.
#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        atomic_add(slot, 1);
    }
}

/// `*ptr += value` as one BPF atomic add (`lock xadd`). The result is not used, so it
/// compiles to the plain add every kernel since 5.8 has, not a fetching one (5.12+).
#[inline(always)]
pub fn atomic_add(ptr: *mut u64, value: u64) {
    // SAFETY: `ptr` is an 8-byte aligned u64 in a map value, valid for this program run.
    // The BPF target has no compare-and-swap, so `AtomicU64` offers no `fetch_add`: the
    // intrinsic underneath it is what LLVM lowers to the BPF atomic add.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            ptr, value,
        );
    }
}

#[inline(always)]
pub fn load(ptr: *mut u64) -> u64 {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(ptr) }
}

#[inline(always)]
pub fn store(ptr: *mut u64, value: u64) {
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(ptr, value) }
}

/// This program's zeroed per-CPU event to fill (one slot per program, see [`SCRATCH`]).
#[inline(always)]
fn scratch(slot: Slot) -> Option<&'static mut ConnectEvent> {
    let slot = SCRATCH.get_ptr_mut(slot as u32)?;
    // SAFETY: this program's slot on this CPU is ours for the rest of this run: the
    // program cannot re-enter itself on this CPU (the kernel's recursion guard). An
    // aligned map value of plain integers.
    unsafe {
        crate::words::zero(slot);
        Some(&mut *slot)
    }
}

const NANO: u64 = 1_000_000_000;

/// `*ptr = value`, returning the value before, as one BPF atomic exchange (kernel 5.12+).
#[inline(always)]
pub fn exchange(ptr: *mut u64, value: u64) -> u64 {
    // SAFETY: as for [`atomic_add`].
    unsafe {
        core::intrinsics::atomic_xchg::<u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            ptr, value,
        )
    }
}

/// `*ptr = new` if `*ptr` is still `old`, as one BPF compare-and-exchange (kernel 5.12+);
/// true if it was.
#[inline(always)]
pub fn compare_exchange(ptr: *mut u64, old: u64, new: u64) -> bool {
    compare_exchange_value(ptr, old, new).is_ok()
}

/// The per-cgroup rate limit: `Some(dropped before)` admits the event, `None` drops it.
///
/// All CPUs share one bucket per cgroup ([`bucket_of`]: its slot, or its entry in the LRU
/// map), so the limit is the configured rate whatever CPUs a cgroup's tasks run on
/// (per-CPU buckets would need a share of the rate each, and would hold a one-CPU process
/// to rate / CPUs). Races must err on the side of fewer
/// events, never more, and never count a drop twice. Two ways, chosen by user space
/// before load (`fetching_atomics`; the verifier prunes the path not taken, so the object
/// loads on kernels that lack the instruction):
///
/// - kernels 5.12+ (compare-and-exchange, exchange): the cell-rate form of a token bucket
///   (GCRA), one word per cgroup: `last_ns` is the theoretical arrival time, when the
///   bucket would be full again. An event admitted at `now` moves it from `t` to
///   `max(t, now) + interval` (interval = 1 s / rate, rounded up); the event is dropped if
///   that lands more than `burst` intervals after `now` (the bucket is empty). The move is
///   one compare-and-exchange, so two CPUs never admit on the same credit (one that loses
///   the race reads again; after a few losses it drops); a drop writes nothing. The same
///   limit and burst as refilling tokens, for one locked instruction per admitted event
///   instead of three or four. Drops: `exchange(dropped, 0)` hands each drop to exactly
///   one record (a plain read first: none to carry is the usual case).
/// - kernels 5.8-5.11 have only the plain atomic add (no fetching add either: LLVM
///   refuses to use the result of an add for our `-mcpu=generic` object anyway): tokens
///   in nano-events. A CPU takes its token (atomic subtract) before it looks, and gives it
///   back if the count went below zero: two CPUs racing for the last token may both drop;
///   neither can take a token that is not there. Refill credits the time since `last_ns`
///   and advances `last_ns` by exactly that (an add): k CPUs crediting one interval push
///   `last_ns` up to k-1 intervals ahead of the clock and nothing is credited until the
///   clock catches up (the limit is then tighter than configured, not looser), then takes
///   back what the bucket holds beyond the burst. A bucket idle long enough to be full is
///   reset with stores (a race there passes at most one extra event per CPU, once).
///   Drops: two CPUs can read the same count and both carry it; a record carries only a
///   positive count, so the count goes negative instead of wrapping and the next drops
///   are not carried until it is positive again (the sum carried drifts by that race; the
///   kernel counter stays exact).
///
/// The arithmetic is 64-bit: user space caps rate and burst at `MAX_CGROUP_RATE` and
/// `MAX_CGROUP_BURST` and the programs clamp them again, so `burst x interval` (at most
/// 10^15 ns) and the token counts (nano-events, at most the burst plus one credit per
/// CPU) cannot overflow.
///
/// `now` is the decisions' clock (`clock::decision_ns`), read once per event: the
/// buckets' times are on that clock only.
#[inline(always)]
fn admit(cgroup: u64, now: u64) -> Option<u32> {
    let rate = (config!(cgroup_rate) as u64).min(MAX_CGROUP_RATE as u64);
    if rate == 0 {
        return Some(0);
    }
    let burst_events = (config!(cgroup_burst) as u64).clamp(1, MAX_CGROUP_BURST as u64);
    let exact = config!(fetching_atomics) != 0;
    // No bucket to be had (no memory): the event is not the limit's to drop.
    let Some(bucket) = bucket_of(cgroup, now, burst_events, exact) else {
        return Some(0);
    };
    let bucket = bucket.as_ptr();
    // SAFETY: a valid map value; fields are reached by pointer, never by reference,
    // since other CPUs change them at the same time.
    let (tokens, last_ns, dropped) = unsafe {
        (
            &raw mut (*bucket).nano_tokens,
            &raw mut (*bucket).last_ns,
            &raw mut (*bucket).dropped,
        )
    };
    let admitted = if exact {
        admit_cell_rate(last_ns, now, rate, burst_events)
    } else {
        admit_tokens(tokens, last_ns, now, rate, burst_events * NANO)
    };
    if !admitted {
        atomic_add(dropped, 1);
        return None;
    }
    if exact {
        // Nothing to carry (the usual case) is read, not exchanged: a drop counted after
        // the load is carried by the cgroup's next record.
        if load(dropped) == 0 {
            return Some(0);
        }
        let carried = exchange(dropped, 0);
        return Some(carried.min(u32::MAX as u64) as u32);
    }
    let carried = load(dropped);
    if (carried as i64) <= 0 {
        return Some(0);
    }
    atomic_add(dropped, carried.wrapping_neg());
    Some(carried.min(u32::MAX as u64) as u32)
}

/// How long a bucket slot's cgroup must have been idle (its bucket full, nothing to
/// carry) before another cgroup of its slot may claim it: a removed container's slot
/// goes back into use; a live one's next event then finds its bucket (full either way) in
/// `CGROUP_BUCKETS`.
const BUCKET_SLOT_IDLE_NS: u64 = 10 * NANO;

/// The bucket of `cgroup` (see [`admit`]): on 5.12+ its slot in `CGROUP_BUCKET_SLOTS`
/// where it holds it (a hash, an array element and one load: the usual case), else
/// [`bucket_elsewhere`]. `None` only when no bucket can be had (no memory).
#[inline(always)]
fn bucket_of(cgroup: u64, now: u64, burst_events: u64, exact: bool) -> Option<NonNull<Bucket>> {
    let slot = if exact {
        CGROUP_BUCKET_SLOTS
            .get_ptr_mut(egress_shared::slot_of(cgroup, config!(bucket_slot_mask)))
            .and_then(NonNull::new)
    } else {
        None
    };
    if let Some(slot) = slot {
        // SAFETY: a map value; fields reached by pointer (other CPUs swap the key).
        let (key, bucket) = unsafe {
            let slot = slot.as_ptr();
            (&raw mut (*slot).cgroup, &raw mut (*slot).bucket)
        };
        if load(key) == cgroup {
            return NonNull::new(bucket);
        }
    }
    bucket_elsewhere(cgroup, now, burst_events, slot)
}

/// [`bucket_of`] where `slot` (the cgroup's bucket slot, on 5.12+) is not the cgroup's:
/// its entry in `CGROUP_BUCKETS` if it has one (it keeps that bucket: with a second one
/// in the slot it could pass twice its burst); else the slot if free or claimable
/// ([`bucket_slot_claimable`]), claimed with one compare-and-exchange; else a new entry.
/// Out of line: a cgroup in its slot (the usual case) returns before this.
///
/// Races: two CPUs claiming one slot for two cgroups leave it to one (the other goes to
/// the map). A CPU of the idle cgroup that read its key just before the claim admits
/// that event on the slot's bucket, shared with the new cgroup for that moment (which
/// gets fewer events, never more), and the idle cgroup's next events find a new full
/// bucket in the map: it was full already (idle for 10 s), so the idle cgroup gets at
/// most one event per CPU beyond its burst, once. A drop counted in that moment is
/// carried by the new cgroup's next record (the counter stays exact).
#[inline(never)]
fn bucket_elsewhere(
    cgroup: u64,
    now: u64,
    burst_events: u64,
    slot: Option<NonNull<BucketSlot>>,
) -> Option<NonNull<Bucket>> {
    if let Some(bucket) = CGROUP_BUCKETS.get_ptr_mut(&cgroup) {
        return NonNull::new(bucket);
    }
    if let Some(slot) = slot {
        let slot = slot.as_ptr();
        // SAFETY: as in `bucket_of`.
        let (key, bucket) = unsafe { (&raw mut (*slot).cgroup, &raw mut (*slot).bucket) };
        let held = load(key);
        if held == cgroup {
            return NonNull::new(bucket);
        }
        // A free slot's bucket is full (its arrival time 0), as is an idle one's.
        if bucket_slot_claimable(bucket, held, now) && compare_exchange(key, held, cgroup) {
            // Drops the idle cgroup never carried (its container gone, say) are not this
            // one's to carry; they stay counted in `Counter::RateLimited`.
            // SAFETY: as above.
            exchange(unsafe { &raw mut (*bucket).dropped }, 0);
            return NonNull::new(bucket);
        }
        if load(key) == cgroup {
            return NonNull::new(bucket);
        }
    }
    // Full either way: tokens at the burst, or an arrival time of now.
    let fresh = Bucket {
        nano_tokens: burst_events * NANO,
        last_ns: now,
        dropped: 0,
    };
    // NOEXIST: a CPU that loses the race to create it uses the winner's bucket.
    let _ = CGROUP_BUCKETS.insert(&cgroup, &fresh, BPF_NOEXIST as u64);
    CGROUP_BUCKETS.get_ptr_mut(&cgroup).and_then(NonNull::new)
}

/// Whether a bucket slot whose key is `held` (another cgroup's, or 0) may be claimed:
/// free, or its bucket full for [`BUCKET_SLOT_IDLE_NS`] (its arrival time that far
/// behind `now`). Drops it has yet to carry do not keep it (a removed container's last
/// drops would hold its slot for good): the claim clears them.
#[inline(always)]
fn bucket_slot_claimable(bucket: *mut Bucket, held: u64, now: u64) -> bool {
    if held == 0 {
        return true;
    }
    // SAFETY: a map value's field, reached by pointer.
    let arrival = load(unsafe { &raw mut (*bucket).last_ns });
    now.wrapping_sub(arrival) as i64 >= BUCKET_SLOT_IDLE_NS as i64
}

/// 5.12+: the cell-rate test (see [`admit`]) on the arrival time at `tat`.
#[inline(always)]
fn admit_cell_rate(tat: *mut u64, now: u64, rate: u64, burst_events: u64) -> bool {
    // Rounded up: the limit errs below the configured rate (by under 0.1 %), never above
    // in the long run (on the tick count a window sees a tick's worth more or fewer).
    let interval = NANO.div_ceil(rate);
    let tolerance = burst_events * interval;
    let mut prev = load(tat);
    for _ in 0..4 {
        let next = prev.max(now) + interval;
        if next - now > tolerance {
            return false;
        }
        match compare_exchange_value(tat, prev, next) {
            Ok(()) => return true,
            // Another CPU moved it: try again from what it found.
            Err(found) => prev = found,
        }
    }
    // Four CPUs' admissions won the race meanwhile: this one errs on the side of fewer.
    false
}

/// 5.8-5.11: the token count (see [`admit`]).
#[inline(always)]
fn admit_tokens(tokens: *mut u64, last_ns: *mut u64, now: u64, rate: u64, burst: u64) -> bool {
    // Time to fill an empty bucket: past it, the bucket is full whatever it held.
    let fill_ns = burst / rate;
    let last = load(last_ns);
    if now > last {
        let elapsed = now - last;
        if elapsed >= fill_ns {
            store(last_ns, now);
            store(tokens, burst);
        } else {
            // elapsed x rate < burst <= 10^15: no overflow.
            atomic_add(last_ns, elapsed);
            atomic_add(tokens, elapsed * rate);
            let over = load(tokens) as i64 - burst as i64;
            if over > 0 {
                atomic_add(tokens, (over as u64).min(elapsed * rate).wrapping_neg());
            }
        }
    }
    atomic_add(tokens, NANO.wrapping_neg());
    if (load(tokens) as i64) < 0 {
        atomic_add(tokens, NANO);
        return false;
    }
    true
}

/// `*ptr = new` if `*ptr` is still `old`, as one BPF compare-and-exchange (kernel 5.12+);
/// else the value found there.
#[inline(always)]
fn compare_exchange_value(ptr: *mut u64, old: u64, new: u64) -> Result<(), u64> {
    // SAFETY: as for [`atomic_add`].
    let (found, exchanged) = unsafe {
        core::intrinsics::atomic_cxchg::<
            u64,
            { core::intrinsics::AtomicOrdering::Relaxed },
            { core::intrinsics::AtomicOrdering::Relaxed },
        >(ptr, old, new)
    };
    if exchanged { Ok(()) } else { Err(found) }
}

/// The per-cgroup decisions for the cgroup `key` (see `filter::cgroup_key`):
/// `Some(dropped before)` admits the event; `None` (counted) when it goes no further.
#[inline(always)]
fn admit_cgroup(key: u64, now: u64) -> Option<u32> {
    if filter::excluded_cgroup(key) {
        count(Counter::Filtered);
        return None;
    }
    let admitted = admit(key, now);
    if admitted.is_none() {
        count(Counter::RateLimited);
    }
    admitted
}

// bpf_ringbuf_query / bpf_ringbuf_output flags (uapi/linux/bpf.h).
const BPF_RB_AVAIL_DATA: u64 = 0;
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;

/// Wake the reader only once `wakeup_bytes` wait (it also drains on a timer).
#[inline(always)]
pub fn wakeup_flags() -> u64 {
    let threshold = config!(wakeup_bytes) as u64;
    if threshold == 0 {
        0
    } else if EVENTS.query(BPF_RB_AVAIL_DATA) >= threshold {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

/// [`wakeup_flags`] for a record reserved at `record` (its address as a number, see
/// `maps::address_number`) of `len` bytes, without asking the ring: wake the reader when
/// the record spans a multiple of `wakeup_bytes` in the ring's address space
/// (`egress_shared::ring::spans_boundary`), so once per `wakeup_bytes` written, as often
/// as the threshold wakes a reader that lags. A boundary spanned by a record submitted
/// with [`wakeup_flags`] (DNS records) wakes no one: the threshold or the
/// reader's timer takes over.
#[inline(always)]
fn wakeup_flags_at(record: u64, len: u64) -> u64 {
    let every = config!(wakeup_bytes) as u64;
    if every == 0 {
        0
    } else if egress_shared::ring::spans_boundary(record, len, every) {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

/// Copies `ev` into a record of the ring buffer and submits it, waking the reader by
/// the record's place ([`wakeup_flags_at`]); false if the ring is full.
#[inline(always)]
pub fn output<T: 'static>(ev: &T) -> bool {
    // The kernel rounds a record up to 8 bytes: a boundary in that padding would be
    // spanned by no record `spans_boundary` is asked about.
    const { assert!(core::mem::size_of::<T>() % 8 == 0) };
    let Some(mut entry) = EVENTS.reserve::<T>(0) else {
        return false;
    };
    let record = entry.as_mut_ptr();
    // SAFETY: a reserved record of `T`'s size, and `ev` a valid `T`.
    unsafe { core::ptr::copy_nonoverlapping(ev, record, 1) };
    let at = crate::maps::address_number(record as u64);
    entry.submit(wakeup_flags_at(at, core::mem::size_of::<T>() as u64));
    true
}

/// Submits an admitted event (see [`identify`]).
#[inline(always)]
fn submit(ev: &mut ConnectEvent) {
    // The record's time was read just before (`publish_time`).
    let now = ev.boot_time_ns;
    filter::open_aggregate(ev, now);
    if !output(&*ev) {
        // An aggregate this record opened stays: user space finds its repeats without
        // their opening record when the window closes and counts them as lost.
        count(Counter::RingBufferFull);
    }
}

/// What the per-cgroup decisions (exclusion, rate limit) found before any record is
/// claimed: [`decide`], then [`identify`]. Every field is written (no `Option` with a
/// payload): `Early` is handed by reference to an out-of-line function, and LLVM would
/// store the undefined payload's register, which the verifier refuses to read.
struct Early {
    /// The current task (`Reader::current_task`).
    task: u64,
    /// When the decisions were taken, on their clock (`clock::decision_ns`).
    decision_ns: u64,
    pid_tgid: u64,
    cgroup_id: u64,
    check: task::Check,
    /// The process's cached identity, if it still holds.
    cached: Option<&'static CachedIdentity>,
    /// When `cached` was filled (0 without one).
    cached_ns: u64,
    /// Admitted already, with `dropped_before`; else not decided yet (cgroup v1 and no
    /// cached identity: the key is known once the task is walked).
    admitted: bool,
    /// The drops counted before this event (`egress.rate_limited.before`).
    dropped_before: u32,
    /// The cgroup key `admitted` was decided for.
    decided_key: u64,
}

/// The per-cgroup decisions, taken before any record is claimed or written wherever the
/// cgroup key allows: on cgroup v2 from the task's cgroup id (before anything else is
/// read), on v1 from the process's cached identity (the leaf of a v1 hierarchy). A
/// dropped event then costs a few loads (or helpers) and a lookup or two, not a record.
/// `None` (counted): dropped.
#[inline(always)]
fn decide<R: Reader>(task: u64) -> Option<Early> {
    let now = clock::decision_ns();
    let pid_tgid = R::pid_tgid(task);
    let cgroup_id = R::cgroup_id(task);
    let (mut admitted, mut dropped_before, mut decided_key) = (false, 0, 0);
    if task::key_known_early() {
        dropped_before = admit_cgroup(cgroup_id, now)?;
        (admitted, decided_key) = (true, cgroup_id);
    }
    let check = task::check::<R>(task);
    let (cached, cached_ns) =
        match task::cached::<R>((pid_tgid >> 32) as u32, cgroup_id, &check, now) {
            Some((identity, filled_ns)) => (Some(identity), filled_ns),
            None => (None, 0),
        };
    if !admitted && let Some(identity) = cached {
        decided_key = filter::cgroup_key(identity.cgroup_leaf_id, cgroup_id);
        dropped_before = admit_cgroup(decided_key, now)?;
        admitted = true;
    }
    Some(Early {
        task,
        decision_ns: now,
        pid_tgid,
        cgroup_id,
        check,
        cached,
        cached_ns,
        admitted,
        dropped_before,
        decided_key,
    })
}

/// The task part of `ev` once [`decide`] let it through: the cached identity where it
/// still holds, else a walk of the task (and, where that was the only way to the
/// cgroup key, the decisions after it). False (counted) when the event goes no further.
#[inline(always)]
fn identify<R: Reader>(ev: &mut ConnectEvent, slot: Slot, early: &Early) -> bool {
    task::fill_thread::<R>(ev, early.task, early.pid_tgid, early.cgroup_id);
    let now = clock::event_ns(early.decision_ns);
    if let Some(cached) = early.cached
        && task::unchanged(cached, early.cached_ns, (early.pid_tgid >> 32) as u32)
    {
        ev.identity_ns = early.cached_ns;
        ev.rate_limited_before = early.dropped_before;
        publish_time(ev, now);
        return true;
    }
    // None cached, or reused for another insert while it was read: walked.
    let walked = task::walk(ev, slot, &early.check, now, early.decision_ns);
    if !walked.complete {
        count(Counter::KernelReadFailed);
    }
    // Decided already, unless the walk found another key than the decision's (a cached
    // identity the LRU reused for another process while it was read): decided again for
    // the right cgroup (the first decision's token stays spent: fewer events, never more).
    let key = filter::cgroup_key(walked.cgroup_leaf_id, ev.cgroup_id);
    let admitted = match early.admitted {
        true if !walked.complete || key == early.decided_key => early.dropped_before,
        _ => match admit_cgroup(key, early.decision_ns) {
            Some(dropped) => dropped,
            None => return false,
        },
    };
    ev.rate_limited_before = admitted;
    publish_time(ev, now);
    true
}

/// Writes the event's time, last: a record assembled in its `PENDING_SLOTS` slot keeps
/// the released slot's `u64::MAX` until then, so the `--pending-report` reader, which
/// trusts a slot whose time is set, never sees it before its identity is written. An
/// exchange where the kernel has one (5.12+, where slots are used): a full barrier, so
/// the identity's stores are visible first on every architecture.
#[inline(always)]
fn publish_time(ev: &mut ConnectEvent, now: u64) {
    let time = &raw mut ev.boot_time_ns;
    if config!(fetching_atomics) != 0 {
        exchange(time, now);
    } else {
        store(time, now);
    }
}

#[inline(always)]
fn fill_sock(ev: &mut ConnectEvent, sk: u64) {
    if sock::fill(ev, sk).is_err() {
        count(Counter::KernelReadFailed);
    }
}

/// A UDP connect or send on `sk`; `dest` is the caller's destination, if it named one.
/// `v4_mapped_reported_inside`: the hook is udpv6_sendmsg, which hands IPv4-mapped
/// destinations to udp_sendmsg, whose own hook reports them. `bytes`: the payload the
/// send put in datagrams (0 for a connect or a failed send).
#[inline(always)]
pub fn udp(
    sk: u64,
    dest: &Dest,
    kind: EventKind,
    v4_mapped_reported_inside: bool,
    bytes: u64,
    slot: Slot,
) {
    match sock::protocol(sk) {
        Ok(IPPROTO_UDP) => {}
        Ok(_) => return,
        Err(_) => {
            count(Counter::KernelReadFailed);
            return;
        }
    }
    let Some(ev) = scratch(slot) else { return };
    ev.kind = kind as u8;
    fill_sock(ev, sk);
    if dest.is_some() {
        sock::set_dest(ev, sk, dest);
    }
    // An IPv4 flow on an IPv6 socket: its destination was IPv4-mapped (made IPv4 by
    // `sock`), so udpv6_sendmsg handed it to udp_sendmsg.
    if v4_mapped_reported_inside && ev.family == sock::AF_INET {
        return;
    }
    if ev.dst_port == 0 && ev.dst_addr == [0; 16] {
        // No destination: nothing leaves (EDESTADDRREQ, or a disconnect).
        return;
    }
    // Cheap part first: a datagram of a flow already reported costs one map lookup.
    ev.flow_netns = current_netns();
    let key = flow_key(ev);
    let Some((carried, window_ns)) = first_in_window(&key, bytes) else {
        count(Counter::UdpFlowSuppressed);
        return;
    };
    ev.handshake_ns = carried;
    if !filter::wanted(ev) {
        return;
    }
    let Some(early) = decide::<Probe>(Probe::current_task()) else {
        return;
    };
    if !identify::<Probe>(ev, slot, &early) {
        return;
    }
    mark_reported(&key, window_ns);
    submit(ev);
}

#[inline(always)]
fn current_netns() -> u32 {
    let task = unsafe { bpf_get_current_task() };
    let Ok(nsproxy) = read::pointer(task, config!(offsets.task_nsproxy)) else {
        return 0;
    };
    let Ok(net) = read::pointer(nsproxy, config!(offsets.nsproxy_net_ns)) else {
        return 0;
    };
    read::kernel(net, config!(offsets.net_ns_inum)).unwrap_or(0)
}

#[inline(always)]
fn flow_key(ev: &ConnectEvent) -> FlowKey {
    FlowKey {
        netns: ev.flow_netns,
        family: ev.family,
        protocol: ev.protocol as u16,
        src_port: ev.src_port,
        dst_port: ev.dst_port,
        tgid: (aya_ebpf::helpers::bpf_get_current_pid_tgid() >> 32) as u32,
        src_addr: ev.src_addr,
        dst_addr: ev.dst_addr,
    }
}

/// Counts `bytes` on the flow; if its last record is more than a window old (or it has
/// none), starts a new window and returns the bytes the new record carries (those the
/// flow sent since its previous record, this datagram's included) and the window's
/// start. `None`: a datagram of a flow reported in this window.
#[inline(always)]
fn first_in_window(key: &FlowKey, bytes: u64) -> Option<(u64, u64)> {
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_boot_ns() };
    let Some(flow) = UDP_FLOWS.get_ptr_mut(key) else {
        // Written a word at a time: as a struct literal, LLVM merged its two zero fields
        // into a byte-loop `memset` call (see `words`).
        let mut fresh = core::mem::MaybeUninit::<FlowState>::uninit();
        // SAFETY: a local FlowState of three u64s (aligned; all-zero is a value), whole
        // once zeroed.
        let fresh = unsafe {
            crate::words::zero(fresh.as_mut_ptr());
            (*fresh.as_mut_ptr()).last_ns = now;
            &*fresh.as_ptr()
        };
        // NOEXIST: of two CPUs inserting a new flow at once, one reports it; the other
        // finds the winner's entry and counts its datagram there, as any later one.
        return match UDP_FLOWS.insert(key, fresh, BPF_NOEXIST as u64) {
            Err(e) if e as i64 == -EEXIST => {
                if let Some(flow) = UDP_FLOWS.get_ptr_mut(key)
                    && bytes > 0
                {
                    // SAFETY: a valid map value, reached by pointer (see below).
                    atomic_add(unsafe { &raw mut (*flow).bytes }, bytes);
                }
                None
            }
            // LRU: a full map forgets the oldest flow, which at worst reports it again.
            // No entry to be had (no memory): reported, as if new, every time.
            _ => Some((bytes, now)),
        };
    };
    // SAFETY: a valid map value; fields are reached by pointer, since sends of the flow
    // on other CPUs change them at the same time.
    let (last_ns, counted) = unsafe { (&raw mut (*flow).last_ns, &raw mut (*flow).bytes) };
    // Signed: another CPU may have started the window after this CPU read the clock,
    // and stored a `last_ns` later than `now`: that datagram is inside the window.
    let prev = load(last_ns);
    let elapsed = now.wrapping_sub(prev) as i64;
    if elapsed < 0 || (elapsed as u64) < config!(udp_flow_window_ns) {
        if bytes > 0 {
            atomic_add(counted, bytes);
        }
        return None;
    }
    // Start the window: with a compare-and-exchange where the kernel has one (5.12+), so
    // of two CPUs finding the window over at once only one reports the flow, and it alone
    // marks the window reported (the other's mark would leave `reported_ns` naming a
    // window that never started, and the sweep would drop the flow's last bytes). The
    // other's datagram is in the window just started. Before 5.12 both may report it.
    if config!(fetching_atomics) != 0 {
        if !compare_exchange(last_ns, prev, now) {
            if bytes > 0 {
                atomic_add(counted, bytes);
            }
            return None;
        }
    } else {
        store(last_ns, now);
    }
    // Take what the window counted: with an exchange where the kernel has one (5.12+),
    // else by subtracting what was read (an add racing in between stays for the next
    // record either way). The sweep takes with an exchange too (5.12+ only): each byte
    // goes to one of them.
    let before = if config!(fetching_atomics) != 0 {
        exchange(counted, 0)
    } else {
        let before = load(counted);
        atomic_add(counted, before.wrapping_neg());
        before
    };
    Some((before.wrapping_add(bytes), now))
}

/// Notes that the record of the flow's window starting at `window_ns` goes out (it passed
/// the filters and the rate limit): the bytes the sweep finds after it are reported. A
/// second lookup, on a window's first datagram only.
#[inline(always)]
fn mark_reported(key: &FlowKey, window_ns: u64) {
    if let Some(flow) = UDP_FLOWS.get_ptr_mut(key) {
        // SAFETY: a valid map value, reached by pointer.
        store(unsafe { &raw mut (*flow).reported_ns }, window_ns);
    }
}

/// The sweep of one flow (`probes::udp_sweep`, run by user space with the key): a flow
/// whose window started at least `min_age_ns` ago gives up the bytes counted since its
/// record, and its entry. Returns an `egress_shared::flow::sweep` value.
///
/// The bytes are taken with an exchange, as a new window's record takes them
/// ([`first_in_window`]), so a datagram racing the sweep has its bytes carried by one
/// of the two, never both nor neither. Kernels without exchange (before 5.12) are not
/// swept: a subtract there could race the record's own subtract into a double count.
/// Deleting the entry is what the window's end already meant: the flow's next datagram
/// makes a record either way. Only a datagram that starts a new window in the instant
/// between the age check and the delete loses its entry (the next datagram reports the
/// flow again).
#[inline(always)]
pub fn sweep_flow(key: &FlowKey, min_age_ns: u64) -> u32 {
    if config!(fetching_atomics) == 0 {
        return sweep::KEPT;
    }
    let Some(flow) = UDP_FLOWS.get_ptr_mut(key) else {
        return sweep::KEPT;
    };
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_boot_ns() };
    // SAFETY: a valid map value, reached by pointer: the flow's sends change it.
    let (last_ns, counted, reported_ns) = unsafe {
        (
            &raw mut (*flow).last_ns,
            &raw mut (*flow).bytes,
            &raw mut (*flow).reported_ns,
        )
    };
    let last = load(last_ns);
    let age = now.wrapping_sub(last) as i64;
    if age < 0 || (age as u64) < min_age_ns {
        return sweep::KEPT;
    }
    let reported = load(reported_ns) == last;
    let taken = exchange(counted, 0);
    let _ = UDP_FLOWS.remove(key);
    if !reported {
        return sweep::UNREPORTED;
    }
    if taken < u64::from(sweep::IN_MAP - sweep::BASE) {
        return sweep::BASE + taken as u32;
    }
    if let Some(slot) = FLOW_SWEPT.get_ptr_mut(0) {
        store(slot, taken);
    }
    sweep::IN_MAP
}

/// `-EEXIST`, from an insert with `BPF_NOEXIST` on a key that is there.
const EEXIST: i64 = 17;
/// `-ENOENT`, from a removal of a key that is not there.
const ENOENT: i64 = 2;

/// Saves what a call's entry knows for its exit. A new entry is counted (`CallsSaved`),
/// a replaced one is not: kprobe mode's udpv6_sendmsg -> udp_sendmsg saves twice for one
/// call, and the inner exit takes it. With `CallsTaken`, user space finds the entries the
/// LRU evicted (see `maps::CALLS`).
#[inline(always)]
pub fn remember_call(state: &CallState) {
    let tid = aya_ebpf::helpers::bpf_get_current_pid_tgid() as u32;
    if let Some(hint) = CALL_HINTS.get_ptr_mut(tid % CALL_HINT_SLOTS) {
        atomic_add(hint, 1);
    }
    match CALLS.insert(&tid, state, BPF_NOEXIST as u64) {
        Ok(()) => count(Counter::CallsSaved),
        Err(e) if e as i64 == -EEXIST => {
            if CALLS.insert(&tid, state, 0).is_err() {
                count(Counter::StateMapFull);
            }
        }
        Err(_) => count(Counter::StateMapFull),
    }
}

/// Takes back what the entry of the current thread's call saved.
#[inline(always)]
pub fn take_call() -> Option<CallState> {
    let tid = aya_ebpf::helpers::bpf_get_current_pid_tgid() as u32;
    // No thread of this slot ever saved state: nothing to look up (see CALL_HINTS).
    if CALL_HINTS
        .get(tid % CALL_HINT_SLOTS)
        .is_none_or(|hint| *hint == 0)
    {
        return None;
    }
    // SAFETY: copied out before removal.
    let state = unsafe { *CALLS.get(&tid)? };
    if CALLS.remove(&tid).is_ok() {
        count(Counter::CallsTaken);
    }
    Some(state)
}

/// A TCP socket entered SYN_SENT, in the connecting task (every hook family): the
/// attempt's identity is captured here, and every decision that can drop it is taken
/// here, cheapest first (destination, aggregation, then cgroup exclusion and the rate
/// limit), so a dropped attempt keeps no slot and never enters PENDING_TCP, and its later
/// transitions miss there. Its source port is chosen just after, so the event waits (in
/// its `PENDING_SLOTS` slot, where it was assembled, or in PENDING_TCP) for the socket's
/// next state change.
///
/// `sk` and `sk_id` as for [`tcp_complete`].
#[inline(always)]
pub fn tcp_syn_sent<R: Reader>(sk: u64, sk_id: u64, slot: Slot) {
    // A connection still kept under this socket's address is stale (its CLOSE was
    // skipped: a program run the kernel did not make): let it go, or another socket's
    // CLOSE at this address would be reported in its name. One array load.
    if config!(track_closes) != 0 && take_open(sk_id).is_some() {
        count(Counter::CloseUntracked);
    }
    let mut dest = Dest::NONE;
    if sock::tcp_dest::<R>(sk, &mut dest).is_err() {
        count(Counter::KernelReadFailed);
    }
    // Read once: what follows takes the ids and registers from it (plain loads where `R`
    // reads directly, see `Reader::pid_tgid`).
    let task = R::current_task();
    // Port 53: the socket is marked for the kprobe and fentry families' receive hooks
    // (which read the port again: only a DNS connect pays that read), and the connect's
    // descriptor for the tracepoint family's (by the mark below where the registers are
    // read back; else from the call state the connect's entry saved for TCP to port 53
    // only, whose exit then finds nothing to do).
    let dns = dest.port == crate::probes::dns::DNS_PORT;
    if dns {
        crate::probes::dns_sock::tcp_connecting(sk_id);
        if config!(regs_syscall_nr) == 0
            && let Some(call) = take_call()
            && (call.fd != 0 || call.sk == 0)
        {
            crate::probes::dns::mark(call.fd, sk_id);
        }
    }
    mark_tcp_connect::<R>(sk, sk_id, task, dns);
    // Destination filters and aggregation before a record is claimed: an attempt they
    // drop costs no zeroing and no slot.
    let mut key = AggregateKey {
        tgid: 0,
        window: 0,
        family: dest.family,
        dst_port: dest.port,
        protocol: IPPROTO_TCP,
        kind: EventKind::TcpConnect as u8,
        _pad: [0; 2],
        dst_addr: dest.addr,
    };
    if !filter::wanted_key::<R>(&mut key, task) {
        abandon(sk_id);
        return;
    }
    // The per-cgroup decisions too, where the key is known by now: an attempt they drop
    // claims no slot either.
    let Some(early) = decide::<R>(task) else {
        abandon(sk_id);
        return;
    };
    // No record only if the program's own scratch slot cannot be had (an array lookup
    // in bounds: never in practice).
    let Some((ev, in_slot)) = attempt_record(sk_id, slot) else {
        return;
    };
    ev.kind = EventKind::TcpConnect as u8;
    ev.protocol = IPPROTO_TCP;
    ev.family = dest.family;
    ev.dst_port = dest.port;
    ev.dst_addr = dest.addr;
    identify_attempt::<R>(ev, sk_id, slot, in_slot, &early);
}

/// The admitted attempt `ev` on `sk_id`, identified where it waits for its completion.
/// Out of line, like the rest of the admitted paths: a dropped attempt's run then stays
/// within a few lines of code instead of jumping over this. (The destination is written
/// before: handed by reference, it would be zeroed in memory by a `memset` call.)
#[inline(never)]
fn identify_attempt<R: Reader>(
    ev: &mut ConnectEvent,
    sk_id: u64,
    slot: Slot,
    in_slot: bool,
    early: &Early,
) {
    if !identify::<R>(ev, slot, early) {
        // Dropped after all: its own slot is given back (a record in the scratch slot
        // holds nothing; an older attempt at this address was reported when the record
        // was claimed).
        if in_slot {
            release(ev, sk_id);
        }
        return;
    }
    if !in_slot {
        ev.sock_id = sk_id;
        spill(sk_id, ev);
    }
}

/// A new attempt on `sk` that goes unreported (filtered, or not admitted), before it
/// claims a slot: an older attempt kept for the same socket address, whose completion
/// the kernel skipped (a program run that would nest in another on one CPU is not run),
/// must not be completed in this one's name (its process and destination on this
/// socket's record): it is reported now ([`report_unseen_in_slot`]). One array load when
/// there is none. Before 5.12 every attempt waits in `PENDING_TCP`, where a
/// stale one is left to the LRU (a delete per dropped attempt costs more than it saves).
#[inline(always)]
fn abandon(sk: u64) {
    if config!(fetching_atomics) == 0 {
        return;
    }
    let index = pending_slot(sk);
    let Some(slot) = PENDING_SLOTS.get_ptr_mut(index) else {
        return;
    };
    // SAFETY: a map value; the tag is reached by pointer, other CPUs swap it.
    if load(unsafe { &raw mut (*slot).sock_id }) == sk {
        report_unseen_in_slot(slot, sk);
    }
    report_stale_spilled(sk);
}

/// An older attempt of the address `sk` waiting in `PENDING_TCP` when a new one begins
/// there (see [`report_unseen_in_slot`]), reported. One load of a word that stays 0
/// while nothing is spilled; only where spills are counted (5.12+).
#[inline(always)]
fn report_stale_spilled(sk: u64) {
    if config!(fetching_atomics) != 0
        && may_have_spilled(pending_slot(sk))
        && let Some(pending) = PENDING_TCP.get_ptr(&sk)
    {
        report_unseen_spilled(pending, sk);
    }
}

/// An older attempt of the socket address `sk`, found still waiting in its slot by a new
/// attempt at that address: its completion's program run was skipped (the kernel does
/// not make a run that would nest in another on one CPU, and counts it in the
/// program's `recursion_misses`), so its socket was freed and the address reused
/// without it. Reported now, its outcome unseen (`ConnState::Unseen`), rather than
/// overwritten unreported. Out of line: rare.
#[inline(never)]
fn report_unseen_in_slot(slot: *mut ConnectEvent, sk: u64) {
    report_unseen(Kept::Slot(slot), sk);
}

/// [`report_unseen_in_slot`] of an attempt kept in `PENDING_TCP`.
#[inline(never)]
fn report_unseen_spilled(pending: *const ConnectEvent, sk: u64) {
    report_unseen(Kept::Spilled(pending), sk);
}

/// Reports the attempt `kept` for `sk` as it was assembled at SYN_SENT (no source port,
/// no handshake), marked unseen, and gives it up; nothing of the socket is read (it is
/// another one now).
#[inline(always)]
fn report_unseen(kept: Kept, sk: u64) {
    let Some((mut entry, flags)) = take_kept(kept, sk) else {
        return;
    };
    // SAFETY: a reserved record of this type, written whole by `take_kept`.
    unsafe { (*entry.as_mut_ptr()).state = ConnState::Unseen as u8 };
    entry.submit(flags);
}

/// The attempt `kept` for `sk`, copied into a record reserved in the ring buffer, and
/// given up where it waited: the record and its wake-up flags, for the caller to finish
/// and submit. Once: a run that loses the race to give it up discards its copy (`None`),
/// as does a full ring (counted, the attempt given up all the same).
#[inline(always)]
fn take_kept(kept: Kept, sk: u64) -> Option<(RingBufEntry<ConnectEvent>, u64)> {
    let (entry, flags) = copy_kept(kept, sk)?;
    given_up(entry, flags, kept, sk)
}

/// The attempt `kept` for `sk`, copied into a record reserved in the ring buffer (still
/// kept: see [`given_up`]), and the record's wake-up flags. A full ring gives the attempt
/// up (counted) and returns `None`.
#[inline(always)]
fn copy_kept(kept: Kept, sk: u64) -> Option<(RingBufEntry<ConnectEvent>, u64)> {
    let Some(mut entry) = EVENTS.reserve::<ConnectEvent>(0) else {
        if give_up(kept, sk) {
            count(Counter::RingBufferFull);
        }
        return None;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: both pointers are valid (a map value this socket holds, a reserved record
    // of its size); the copy happens before the attempt is given up.
    unsafe { core::ptr::copy_nonoverlapping(kept.record(), ev, 1) };
    let record = crate::maps::address_number(ev as u64);
    Some((
        entry,
        wakeup_flags_at(record, core::mem::size_of::<ConnectEvent>() as u64),
    ))
}

/// Gives up the attempt `kept` for `sk` once its copy `entry` is made ([`copy_kept`]):
/// the record back if this run did, else it is discarded (`None`).
#[inline(always)]
fn given_up(
    entry: RingBufEntry<ConnectEvent>,
    flags: u64,
    kept: Kept,
    sk: u64,
) -> Option<(RingBufEntry<ConnectEvent>, u64)> {
    if !give_up(kept, sk) {
        // A discarded record keeps its place in the ring until the reader passes it: it
        // wakes the reader for a boundary it spans, as a submitted one.
        entry.discard(flags);
        return None;
    }
    Some((entry, flags))
}

/// Whether an attempt of the [`PENDING_SLOTS`] slot `index` may be in `PENDING_TCP`: one
/// load of a word every CPU reads while no attempt is there at all, else the slot's
/// count (see `maps::PENDING_SPILLED`).
#[inline(always)]
fn may_have_spilled(index: u32) -> bool {
    PENDING_SPILLED.get(0).is_none_or(|spilled| *spilled != 0)
        && PENDING_SPILLS.get(index).is_some_and(|spills| *spills != 0)
}

/// Counts (`delta` 1) or uncounts (`delta` -1) an attempt of the slot `index` in
/// `PENDING_TCP`, in the slot's count and in their sum.
#[inline(always)]
fn count_spilled(index: u32, delta: u64) {
    if let Some(spills) = PENDING_SPILLS.get_ptr_mut(index) {
        atomic_add(spills, delta);
    }
    if let Some(spilled) = PENDING_SPILLED.get_ptr_mut(0) {
        atomic_add(spilled, delta);
    }
}

/// The [`PENDING_SLOTS`] slot of `sk`: a multiplicative hash of the address (socket
/// addresses are slab objects, their low bits alike).
#[inline(always)]
fn pending_slot(sk: u64) -> u32 {
    (sk.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - PENDING_SLOT_BITS)) as u32
}

/// Where the attempt on `sk` is assembled: in place in its [`PENDING_SLOTS`] slot, claimed
/// now, if the slot is free (or already this socket's: an attempt whose completion was
/// skipped), so an admitted attempt is neither zeroed in a scratch record nor copied
/// (144 bytes each way); else in the program's [`SCRATCH`] slot, for [`spill`]. True when
/// in place. A dropped attempt gives its slot back ([`abandon`]).
///
/// In place, the slot's time is `u64::MAX` (as a release leaves it, see
/// `maps::PENDING_SLOTS`; 0 in a slot never used) until the attempt's own is written, so
/// `--pending-report` never takes the half-written slot for an old attempt; the tag
/// (`sock_id`) keeps `sk`.
#[inline(always)]
fn attempt_record(sk: u64, scratch_slot: Slot) -> Option<(&'static mut ConnectEvent, bool)> {
    // An older attempt at this address, spilled, whose completion was skipped: reported
    // before this one is kept, in its slot or beside it in `PENDING_TCP`.
    report_stale_spilled(sk);
    if config!(fetching_atomics) != 0
        && let Some(slot) = PENDING_SLOTS.get_ptr_mut(pending_slot(sk))
    {
        // SAFETY: a map value; the tag is reached by pointer, other CPUs swap it.
        let tag = unsafe { &raw mut (*slot).sock_id };
        let mut held = load(tag);
        if held == sk {
            // Still this address's older attempt, whose completion was skipped: reported
            // and released first, then claimed as a free slot.
            report_unseen_in_slot(slot, sk);
            held = load(tag);
        }
        if held == 0 && compare_exchange(tag, 0, sk) {
            // SAFETY: the slot is this socket's until its completion or `abandon`
            // releases it (both run after this program, the socket being locked); an
            // aligned map value of plain integers. Every word but the first (the time,
            // `u64::MAX` since its release) and the last (the tag) is zeroed.
            unsafe {
                crate::words::zero_between(slot, 1, ATTEMPT_WORDS - 1);
                return Some((&mut *slot, true));
            }
        }
    }
    scratch(scratch_slot).map(|ev| (ev, false))
}

/// `ConnectEvent` in 8-byte words: the time first, the tag (`sock_id`) last.
const ATTEMPT_WORDS: usize = core::mem::size_of::<ConnectEvent>() / 8;
const _: () = assert!(core::mem::offset_of!(ConnectEvent, boot_time_ns) == 0);
const _: () = assert!(core::mem::offset_of!(ConnectEvent, sock_id) == (ATTEMPT_WORDS - 1) * 8);

/// Keeps the admitted attempt `ev` on `sk`, whose slot another socket holds (or the
/// kernel lacks compare-and-exchange), in `PENDING_TCP` (see `maps::PENDING_SLOTS`).
#[inline(always)]
fn spill(sk: u64, ev: &ConnectEvent) {
    let counted = config!(fetching_atomics) != 0;
    // (Where spills are counted (5.12+), an older attempt of this address in
    // `PENDING_TCP` was reported when this one's record was claimed, so the insert
    // replaces none; before 5.12 it replaces a stale one unreported.)
    // Counted before the insert: a completion that finds the entry finds it counted.
    if counted {
        count_spilled(pending_slot(sk), 1);
    }
    if PENDING_TCP.insert(&sk, ev, 0).is_err() {
        count(Counter::StateMapFull);
        if counted {
            count_spilled(pending_slot(sk), 1u64.wrapping_neg());
        }
    }
}

/// x86_64's connect(2): the registers are only handed to the programs there (see
/// `ProbeConfig::regs_syscall_nr`).
const NR_CONNECT_X86_64: u32 = 42;

/// The number of the current syscall, from the task's saved registers `regs` at
/// `regs_syscall_nr` (x86_64: `orig_ax`): its low 32 bits, as the kernel takes them
/// (entry_64.S sign-extends `eax`; `syscall_get_nr` returns an int). `orig_ax` keeps the
/// whole `rax` the task passed: a process that sets its upper half still runs the same
/// syscall, and its exit tracepoint fires, so comparing all 64 bits would let it send
/// unseen.
#[inline(always)]
pub fn syscall_nr(regs: u64) -> Option<u32> {
    // Little-endian (x86_64 alone sets `regs_syscall_nr`): the low half comes first.
    read::kernel::<u32>(regs, config!(regs_syscall_nr)).ok()
}

/// `O_NONBLOCK` in a file's `f_flags` (the same value on every architecture that reads
/// the registers back: x86_64 alone).
const O_NONBLOCK: u32 = 0o4000;

/// `sock.sk_sndtimeo` without `SO_SNDTIMEO`: `MAX_SCHEDULE_TIMEOUT` (`LONG_MAX`).
const NO_SEND_TIMEOUT: u64 = i64::MAX as u64;

/// Tells this thread's connect() exit that the connect was TCP (see `TCP_CONNECT_MARKS`)
/// where that exit is attached and reads its arguments back (`CONNECT_EXIT_MARKS`), and
/// marks the descriptor of a connect to port 53 (`dns`) for the DNS reads: the exit of a
/// connect that returns `-EINPROGRESS` returns before it could. Only a connect that waits
/// for the handshake's end ([`connect_waits`]) is marked TCP: any other may return that
/// value, on which its exit returns without taking a mark (no datagram connect returns
/// it), or takes the slow, exact way. `sk` is the socket `R` reads, `sk_id` its number,
/// `task` the current task.
#[inline(always)]
fn mark_tcp_connect<R: Reader>(sk: u64, sk_id: u64, task: u64, dns: bool) {
    let nr_at = config!(regs_syscall_nr);
    if nr_at == 0 || !connect_exit_marks() {
        return;
    }
    let waits = connect_waits::<R>(sk);
    if !waits && !dns {
        return;
    }
    let regs = R::pt_regs(task);
    // The low half, as in `syscall_nr` (which reads with the helper; `R` may not). Not
    // connect(2): a Fast Open send, an io_uring connect; their exits take no mark.
    if R::kernel::<u32>(regs, nr_at) != Ok(NR_CONNECT_X86_64) {
        return;
    }
    if dns {
        if let Ok(fd) = R::kernel::<u64>(regs, config!(dns_regs_fd)) {
            crate::probes::dns::mark(fd, sk_id);
        }
        if !waits {
            return;
        }
    }
    let pid_tgid = R::pid_tgid(task);
    if let Some(mark) = TCP_CONNECT_MARKS.get_ptr_mut(pid_tgid as u32 % CALL_HINT_SLOTS) {
        store(mark, pid_tgid);
    }
}

/// Whether the tracepoint family's connect() exit takes the marks (`CONNECT_EXIT_MARKS`):
/// an array load the verifier inlines.
#[inline(always)]
fn connect_exit_marks() -> bool {
    CONNECT_EXIT_MARKS.get(0).is_some_and(|on| *on != 0)
}

/// Whether a connect(2) on the socket `sk` waits for the end of the handshake, and so
/// never returns `-EINPROGRESS`: its file is blocking (`sk->sk_socket->file->f_flags`
/// without `O_NONBLOCK`, lines connect(2) has just used) and it has no send timeout
/// (`SO_SNDTIMEO`: a blocking connect returns `-EINPROGRESS` when it expires). False for
/// a socket without a file (the kernel's own, an MPTCP subflow, whose caller's connect
/// returns what its own socket does).
#[inline(always)]
fn connect_waits<R: Reader>(sk: u64) -> bool {
    let flags = R::kernel::<u64>(sk, config!(offsets.sk_socket))
        .and_then(|socket| R::kernel::<u64>(socket, config!(offsets.socket_file)))
        .and_then(|file| R::kernel::<u32>(file, config!(offsets.file_f_flags)));
    flags.is_ok_and(|flags| flags & O_NONBLOCK == 0)
        && R::kernel::<u64>(sk, config!(offsets.sk_sndtimeo)) == Ok(NO_SEND_TIMEOUT)
}

/// Whether this thread's connect() was marked TCP by its SYN_SENT; clears the mark.
#[inline(always)]
pub fn take_tcp_connect_mark() -> bool {
    let pid_tgid = aya_ebpf::helpers::bpf_get_current_pid_tgid();
    let Some(mark) = TCP_CONNECT_MARKS.get_ptr_mut(pid_tgid as u32 % CALL_HINT_SLOTS) else {
        return false;
    };
    if load(mark) != pid_tgid {
        return false;
    }
    store(mark, 0);
    true
}

/// The attempt on `sk` left SYN_SENT for `established` (true) or CLOSE: completes and
/// submits it, once (whoever releases its slot or removes its entry reports it). It was
/// admitted (filters, rate limit) at SYN_SENT. Runs in softirq or in any task: nothing
/// here reads the current task. The record is assembled in place in the ring buffer, not
/// in a per-CPU slot: this runs in softirq (SYN_SENT -> ESTABLISHED) as well as in tasks,
/// and raw tracepoints had no recursion guard before 6.2.
///
/// `sk` is what `R` reads the socket from; `sk_id` its address as a plain number, which
/// keys the maps (the same value; see `maps::address_number`).
#[inline(always)]
pub fn tcp_complete<R: Reader>(sk: u64, sk_id: u64, established: bool, clock_fresh: bool) {
    if config!(fetching_atomics) != 0 {
        let index = pending_slot(sk_id);
        let Some(slot) = PENDING_SLOTS.get_ptr_mut(index) else {
            return;
        };
        // SAFETY: a map value; the tag is reached by pointer, other CPUs swap it.
        let tag = unsafe { &raw mut (*slot).sock_id };
        if load(tag) == sk_id {
            complete_in_slot::<R>(slot, sk, sk_id, established, clock_fresh);
            return;
        }
        // Not in its slot: in PENDING_TCP only if an attempt of this slot went there.
        if !may_have_spilled(index) {
            return;
        }
    }
    complete_spilled::<R>(sk, sk_id, established, clock_fresh);
}

/// Whether an attempt on `sk_id` may be waiting for its completion ([`tcp_complete`]
/// finds it): its slot holds it, or an attempt of its slot went to `PENDING_TCP`, or the
/// kernel has no compare-and-exchange (every attempt waits in `PENDING_TCP`). Three
/// loads at most (the slot's tag, the spill counts' sum, the slot's count); false for an
/// attempt that was dropped.
#[inline(always)]
pub fn attempt_may_be_kept(sk_id: u64) -> bool {
    if config!(fetching_atomics) == 0 {
        return true;
    }
    let index = pending_slot(sk_id);
    let Some(slot) = PENDING_SLOTS.get_ptr_mut(index) else {
        return true;
    };
    // SAFETY: a map value; the tag is reached by pointer, other CPUs swap it.
    load(unsafe { &raw mut (*slot).sock_id }) == sk_id || may_have_spilled(index)
}

/// [`tcp_complete`] of an attempt in its `PENDING_SLOTS` slot `slot`. Out of line: an
/// attempt that was dropped (it has no slot) returns within a few lines of code.
#[inline(never)]
fn complete_in_slot<R: Reader>(
    slot: *mut ConnectEvent,
    sk: u64,
    sk_id: u64,
    established: bool,
    clock_fresh: bool,
) {
    complete_kept::<R>(Kept::Slot(slot), sk, sk_id, established, clock_fresh);
}

/// [`tcp_complete`] of an attempt kept in `PENDING_TCP` (spilled, or on a kernel
/// without compare-and-exchange), if there is one.
#[inline(never)]
fn complete_spilled<R: Reader>(sk: u64, sk_id: u64, established: bool, clock_fresh: bool) {
    let Some(pending) = PENDING_TCP.get_ptr(&sk_id) else {
        return;
    };
    complete_kept::<R>(Kept::Spilled(pending), sk, sk_id, established, clock_fresh);
}

/// Where a pending attempt is kept (its record there), to be given up by whoever reports
/// it.
#[derive(Clone, Copy)]
enum Kept {
    Slot(*mut ConnectEvent),
    Spilled(*const ConnectEvent),
}

impl Kept {
    /// The attempt's record where it is kept.
    #[inline(always)]
    fn record(self) -> *const ConnectEvent {
        match self {
            Kept::Slot(slot) => slot.cast_const(),
            Kept::Spilled(pending) => pending,
        }
    }
}

/// Gives the attempt on `sk` up from where it was `kept`; true if this call did.
#[inline(always)]
fn give_up(kept: Kept, sk: u64) -> bool {
    match kept {
        Kept::Slot(slot) => release(slot, sk),
        Kept::Spilled(_) => take_spilled(sk),
    }
}

/// Reports the attempt `kept` where it waits: copied into the ring buffer
/// ([`copy_kept`]), completed, given up ([`given_up`]) and submitted.
///
/// Given up only after the completion's reads: the release is a locked instruction,
/// which waits until every store before it is done, and the copy's stores go to ring
/// lines the reader last read a whole ring ago. Right after the copy it stalled for
/// them (~168 ns of ~1,100 per connection on an AMD Zen 5 host, docs/kernel.md, "The
/// release after the copy"); after the socket's reads, which loads may do before
/// earlier stores complete, they are mostly done. (A run that then loses the give-up,
/// which only an LRU eviction of a spilled attempt makes possible, has done those reads
/// for nothing, and may have counted a failed one.)
#[inline(always)]
fn complete_kept<R: Reader>(kept: Kept, sk: u64, sk_id: u64, established: bool, clock_fresh: bool) {
    if skipped_by_test_hook(kept) {
        return;
    }
    let Some((mut entry, flags)) = copy_kept(kept, sk_id) else {
        return;
    };
    // SAFETY: a reserved record of this type, written whole by `copy_kept`.
    let ev = unsafe { &mut *entry.as_mut_ptr() };
    let connect_ns = ev.boot_time_ns;
    let now = complete::<R>(ev, sk, established, clock_fresh);
    let ports = open_ports(ev);
    let Some((mut entry, flags)) = given_up(entry, flags, kept, sk_id) else {
        return;
    };
    // SAFETY: as above. Opened only once the record is this run's to submit.
    filter::open_aggregate(unsafe { &mut *entry.as_mut_ptr() }, now);
    entry.submit(flags);
    track_open(sk_id, established, connect_ns, now, ports);
}

/// The test hook `skip_completions_to_port`: whether this completion is one it skips, as
/// the kernel skips a nested run. Pruned by the verifier where it is 0 (always, outside
/// tests).
#[inline(always)]
fn skipped_by_test_hook(kept: Kept) -> bool {
    let port = config!(skip_completions_to_port);
    if port == 0 {
        return false;
    }
    // SAFETY: a map value this socket holds.
    u32::from(unsafe { (*kept.record()).dst_port }) == port
}

/// What [`OpenConn::ports`] holds for the connection `ev` reports (read before the
/// record is submitted, and only where closes are tracked).
#[inline(always)]
fn open_ports(ev: &ConnectEvent) -> u32 {
    if config!(track_closes) == 0 {
        return 0;
    }
    port_pair(ev.src_port, ev.dst_port)
}

/// Source and destination port (host order) as [`OpenConn::ports`] keeps them.
#[inline(always)]
fn port_pair(src: u16, dst: u16) -> u32 {
    (u32::from(src) << 16) | u32::from(dst)
}

/// Whether the tracked connection `open` is another socket's than the one closing with
/// these ports: only when both sides know both ports (a port the completion could not
/// read is 0).
#[inline(always)]
fn ports_differ(open: &OpenConn, src: u16, dst: u16) -> bool {
    let known = open.ports >> 16 != 0 && open.ports & 0xffff != 0;
    known && port_pair(src, dst) != open.ports
}

/// Gives `sk`'s slot back; true if this call did (and so reports the attempt). The
/// slot's time is cleared first (see `maps::PENDING_SLOTS`).
#[inline(always)]
fn release(slot: *mut ConnectEvent, sk: u64) -> bool {
    // SAFETY: a map value; fields reached by pointer.
    unsafe {
        store(&raw mut (*slot).boot_time_ns, u64::MAX);
        compare_exchange(&raw mut (*slot).sock_id, sk, 0)
    }
}

/// Removes `sk`'s attempt from `PENDING_TCP`; true if this call did.
#[inline(always)]
fn take_spilled(sk: u64) -> bool {
    if PENDING_TCP.remove(&sk).is_err() {
        return false;
    }
    if config!(fetching_atomics) != 0 {
        count_spilled(pending_slot(sk), 1u64.wrapping_neg());
    }
    true
}

/// What the attempt's record learns at completion: source, handshake time, outcome.
/// Returns the time of completion (the caller opens the aggregate with it, see
/// `filter::open_aggregate`). `clock_fresh` as for [`completion_time`].
#[inline(always)]
fn complete<R: Reader>(
    ev: &mut ConnectEvent,
    sk: u64,
    established: bool,
    clock_fresh: bool,
) -> u64 {
    if sock::fill_tcp_source::<R>(ev, sk).is_err() {
        count(Counter::KernelReadFailed);
    }
    // `inet_sock` and `tcp_sock` fields lie beyond `struct sock`.
    let tp = R::tcp_sock(sk);
    if ev.src_port == 0 {
        // On the way to CLOSE the port is released (inet_num zeroed) before this runs;
        // inet_sport (network order) still names it.
        ev.src_port = R::kernel::<u16>(tp, config!(offsets.inet_sport)).map_or(0, u16::from_be);
    }
    let now = completion_time::<R>(tp, ev.boot_time_ns, clock_fresh);
    ev.handshake_ns = now.wrapping_sub(ev.boot_time_ns);
    ev.syn_retransmits = R::kernel(tp, config!(offsets.tcp_total_retrans)).unwrap_or(0);
    if established {
        ev.state = ConnState::Established as u8;
    } else {
        ev.state = ConnState::Failed as u8;
        ev.sk_err = R::kernel::<i32>(sk, config!(offsets.sk_err)).unwrap_or(0) as u32;
        ev.sk_err_soft = R::kernel::<i32>(sk, config!(offsets.sk_err_soft)).unwrap_or(0) as u32;
    }
    now
}

/// The time (CLOCK_BOOTTIME) of a completion of an attempt made at `started`.
/// `clock_fresh`: the transition comes from a segment the kernel is processing now
/// (SYN_SENT -> ESTABLISHED: `tcp_rcv_state_process` refreshes the socket's clock cache
/// before it looks at the SYN-ACK), so `tcp_clock_cache` (monotonic) plus [`BOOT_OFFSET`]
/// is the time within the segment's processing, for a load instead of a clock read
/// (~85 ns on an AMD host: the TSC read under `bpf_ktime_get_boot_ns` waits for the loads
/// before it). A failed attempt reads the clock: a timeout or a reset refreshes the cache
/// too, but this program cannot tell them from the application's close or an ICMP
/// error, which do not (and a cache refreshed by `tcp_connect`, after the attempt's
/// start, would pass the check below). So does a cache that reads as 0 or as earlier
/// than the attempt: a kernel without the field, a TCP_REPAIR socket (established
/// without a segment), an offset a resume made too small by more than the handshake.
#[inline(always)]
fn completion_time<R: Reader>(tp: u64, started: u64, clock_fresh: bool) -> u64 {
    let cache_at = config!(offsets.tcp_clock_cache);
    if clock_fresh
        && cache_at != 0
        && let Ok(cached) = R::kernel::<u64>(tp, cache_at)
        && let Some(offset) = BOOT_OFFSET.get(0)
    {
        let now = cached.wrapping_add(*offset);
        if cached != 0 && now >= started {
            return now;
        }
    }
    unsafe { aya_ebpf::helpers::bpf_ktime_get_boot_ns() }
}

/// An established connection whose close is to be reported is kept: in its
/// `OPEN_SLOTS` slot if that is free (or already this socket's: a connection on the same
/// address whose close was never seen), else in `OPEN_TCP`.
#[inline(always)]
fn track_open(sk: u64, established: bool, connect_ns: u64, established_ns: u64, ports: u32) {
    if !established || config!(track_closes) == 0 {
        return;
    }
    let open = OpenConn {
        connect_ns,
        established_ns,
        reset: ResetBy::NONE,
        _pad: [0; 3],
        ports,
    };
    let mut spills = None;
    if config!(fetching_atomics) != 0 {
        let index = open_slot(sk);
        if let Some(slot) = OPEN_SLOTS.get_ptr_mut(index) {
            // SAFETY: a map value; the tag is reached by pointer, other CPUs swap it.
            let tag = unsafe { &raw mut (*slot).sock_id };
            let held = load(tag);
            if held == sk || (held == 0 && compare_exchange(tag, 0, sk)) {
                // SAFETY: the slot is this socket's until its CLOSE releases it, and that
                // runs after this (the socket's transitions are serialised by its lock).
                unsafe { (*slot).open = open };
                return;
            }
        }
        spills = OPEN_SPILLS.get_ptr_mut(index);
    }
    // A new entry adds to its slot's spills; one that replaces a stale entry of the same
    // address does not (the count would never come back to 0).
    match OPEN_TCP.insert(&sk, &open, BPF_NOEXIST as u64) {
        Ok(()) => {
            if let Some(spills) = spills {
                atomic_add(spills, 1);
            }
        }
        Err(e) if e as i64 == -EEXIST => {
            if OPEN_TCP.insert(&sk, &open, 0).is_err() {
                count(Counter::CloseUntracked);
            }
        }
        Err(_) => count(Counter::CloseUntracked),
    }
}

/// The [`OPEN_SLOTS`] slot of `sk` (the hash of [`pending_slot`], more bits).
#[inline(always)]
fn open_slot(sk: u64) -> u32 {
    (sk.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - OPEN_SLOT_BITS)) as u32
}

/// Where a tracked connection is kept.
enum OpenAt {
    /// Its `OPEN_SLOTS` slot: the slot's tag and the connection.
    Slot(*mut u64, *mut OpenConn),
    /// `OPEN_TCP`, and (5.12+) the spill count of the slot it would have had. A
    /// `NonNull`, whose `None` is a null pointer: an `Option` of a raw pointer leaves
    /// its payload undefined there, and LLVM kept that register for a later store that
    /// the verifier refused (`!read_ok`) once this ran in an out-of-line function.
    Spilled(*mut OpenConn, Option<NonNull<u64>>),
}

/// Where the tracked connection `sk` is, if it is one: one inline array load for every
/// other socket on 5.12+ (a hash lookup before).
#[inline(always)]
fn find_open(sk: u64) -> Option<OpenAt> {
    if config!(fetching_atomics) == 0 {
        return OPEN_TCP
            .get_ptr_mut(&sk)
            .map(|open| OpenAt::Spilled(open, None));
    }
    let index = open_slot(sk);
    let slot = OPEN_SLOTS.get_ptr_mut(index)?;
    // SAFETY: a map value; the tag is reached by pointer, other CPUs swap it.
    let tag = unsafe { &raw mut (*slot).sock_id };
    if load(tag) == sk {
        // SAFETY: this socket's slot, its transitions serialised (see `track_open`).
        return Some(OpenAt::Slot(tag, unsafe { &raw mut (*slot).open }));
    }
    let spills = OPEN_SPILLS.get_ptr_mut(index)?;
    if load(spills) == 0 {
        return None;
    }
    OPEN_TCP
        .get_ptr_mut(&sk)
        .map(|open| OpenAt::Spilled(open, NonNull::new(spills)))
}

/// The tracked connection `sk`, if it is one, taken out of its slot or `OPEN_TCP` (see
/// [`find_open`]).
#[inline(always)]
fn take_open(sk: u64) -> Option<OpenConn> {
    match find_open(sk)? {
        OpenAt::Slot(tag, open) => {
            // SAFETY: this socket's slot: copied before the release.
            let open = unsafe { *open };
            compare_exchange(tag, sk, 0).then_some(open)
        }
        OpenAt::Spilled(open, spills) => {
            // SAFETY: a valid map value, copied before removal.
            let open = unsafe { *open };
            match OPEN_TCP.remove(&sk) {
                Ok(()) => {}
                // Taken out since it was found, by the run that handles it.
                Err(e) if e as i64 == -ENOENT => return None,
                // The bucket's lock refused (-EBUSY before 6.15, a deadlock or a timeout
                // after): the entry stays, and is counted once it is found stale.
                Err(_) => return None,
            }
            if let Some(spills) = spills {
                atomic_add(spills.as_ptr(), 1u64.wrapping_neg());
            }
            Some(open)
        }
    }
}

/// A socket reached CLOSE from `old_state` (not SYN_SENT): if it is a connection this
/// collector reported, its life as `tcp_sock` counted it goes out. One array load for
/// every other socket (servers, unreported ones; see [`take_open`]). `sk` and `sk_id` as for [`tcp_complete`].
#[inline(always)]
pub fn tcp_closed<R: Reader>(sk: u64, sk_id: u64, old_state: u8) {
    let Some(open) = take_open(sk_id) else {
        return;
    };
    // `tcp_sock` fields lie beyond `struct sock`.
    let tp = R::tcp_sock(sk);
    // The port is released (inet_num zeroed) before CLOSE; inet_sport still names it.
    let sport = R::kernel::<u16>(tp, config!(offsets.inet_sport));
    let dport = R::kernel::<u16>(sk, config!(offsets.skc_dport));
    match (sport, dport) {
        // Another socket at the address of a tracked connection whose CLOSE was never
        // seen (a run the kernel skipped or did not make): not reported in its name.
        (Ok(sport), Ok(dport)) if ports_differ(&open, u16::from_be(sport), u16::from_be(dport)) => {
            count(Counter::CloseUntracked);
            return;
        }
        (Ok(_), Ok(_)) => {}
        // Unchecked: reported, as before the check existed.
        _ => count(Counter::KernelReadFailed),
    }
    let mut ev = TcpCloseEvent::zeroed();
    ev.sock_id = sk_id;
    ev.connect_ns = open.connect_ns;
    ev.established_ns = open.established_ns;
    ev.close_ns = unsafe { aya_ebpf::helpers::bpf_ktime_get_boot_ns() };
    ev.old_state = old_state;
    ev.reset = open.reset;
    let mut failed = false;
    let mut read_u64 = |base: u64, offset: u32| -> u64 {
        R::kernel::<u64>(base, offset).unwrap_or_else(|_| {
            failed = true;
            0
        })
    };
    ev.bytes_acked = read_u64(tp, config!(offsets.tcp_bytes_acked));
    ev.bytes_received = read_u64(tp, config!(offsets.tcp_bytes_received));
    let sent_at = config!(offsets.tcp_bytes_sent);
    if sent_at != 0 {
        ev.bytes_sent = read_u64(tp, sent_at);
        ev.flags |= CloseFlags::BYTES_SENT_KNOWN;
    }
    let sk_flags = read_u64(sk, config!(offsets.sk_flags));
    if (sk_flags >> (config!(offsets.sock_done_bit) & 63)) & 1 == 1 {
        ev.flags |= CloseFlags::FIN_RECEIVED;
    }
    ev.total_retrans = R::kernel(tp, config!(offsets.tcp_total_retrans)).unwrap_or(0);
    ev.srtt_us_x8 = R::kernel(tp, config!(offsets.tcp_srtt_us)).unwrap_or(0);
    // Counted when unread: user space tells a peer's reset from this host's by it.
    ev.sk_err = R::kernel::<i32>(sk, config!(offsets.sk_err)).unwrap_or_else(|_| {
        failed = true;
        0
    }) as u32;
    if failed {
        count(Counter::KernelReadFailed);
    }
    if !output(&ev) {
        count(Counter::RingBufferFull);
    }
}

/// `tcp:tcp_send_reset` on `sk`: marks a tracked connection reset by this host.
/// A reset from the peer is not hooked: `tcp_reset()` sets the socket's error before it
/// moves the socket to CLOSE, and user space reads it from the close event's `sk_err`.
#[inline(always)]
pub fn tcp_reset_sent(sk: u64) {
    if sk == 0 {
        return;
    }
    let (Some(OpenAt::Slot(_, open)) | Some(OpenAt::Spilled(open, _))) = find_open(sk) else {
        return;
    };
    // SAFETY: a valid map value; a byte store.
    unsafe {
        if (*open).reset == ResetBy::NONE {
            (*open).reset = ResetBy::LOCAL;
        }
    }
}

/// Tracepoint mode: what to do at the exit of a connect() on `sk`. TCP connects removed
/// their call state at SYN_SENT; one that failed before SYN_SENT (no route, bad
/// address) fires no state change and is not an attempt on the wire.
#[inline(always)]
pub fn connect_exit(sk: u64, dest: &Dest, slot: Slot) {
    match sock::protocol(sk) {
        Ok(IPPROTO_UDP) => udp(sk, dest, EventKind::UdpConnect, false, 0, slot),
        Ok(_) => {}
        Err(_) => count(Counter::KernelReadFailed),
    }
}
