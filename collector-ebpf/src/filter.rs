//! What users exclude (destinations, cgroups) and the aggregation of repeats, decided in
//! the kernel so an unwanted or repeated connection costs a map lookup, not a record.

use aya_ebpf::{bindings::BPF_NOEXIST, maps::lpm_trie::Key};
use core::ptr::NonNull;

use egress_shared::{AggregateKey, ConnectEvent, Counter, ExcludedPrefixes, Prefix, RepeatSlot};

use crate::{
    clock,
    emit::{self, count},
    maps::{
        AGGREGATES, AGGREGATES_READ, EXCLUDED_CGROUPS, EXCLUDED_V4, EXCLUDED_V6, REPEAT_SLOTS,
        Words, config,
    },
    read::Reader,
    sock::{AF_INET, AF_INET6, is_v4_mapped},
};

/// Early decision, once the destination is known: false when the destination is
/// excluded or the connection repeats one already reported in its window (each counted).
/// Sets `ev.tgid`, which the aggregate key needs before the task is read.
#[inline(always)]
pub fn wanted(ev: &mut ConnectEvent) -> bool {
    let mut key = AggregateKey::of(ev, 0);
    // The Probe reader's ids are the helpers': no task needed.
    let wanted = wanted_key::<crate::read::Probe>(&mut key, 0);
    ev.tgid = key.tgid;
    wanted
}

/// [`wanted`] from what it looks at alone (destination, protocol, kind), before any
/// record is claimed: a connection dropped here costs neither a record's zeroing nor its
/// slot. Sets `key.tgid`.
#[inline(always)]
pub fn wanted_key<R: Reader>(key: &mut AggregateKey, task: u64) -> bool {
    if excluded_destination(key.family, &key.dst_addr) {
        count(Counter::Filtered);
        return false;
    }
    key.tgid = (R::pid_tgid(task) >> 32) as u32;
    if repeat_in_window(key) {
        count(Counter::Aggregated);
        return false;
    }
    true
}

#[inline(always)]
fn excluded_destination(family: u16, a: &[u8; 16]) -> bool {
    if config!(exclude_addresses) == 0 {
        return false;
    }
    if family == AF_INET || (family == AF_INET6 && is_v4_mapped(a)) {
        let v4 = if family == AF_INET {
            [a[0], a[1], a[2], a[3]]
        } else {
            [a[12], a[13], a[14], a[15]]
        };
        if config!(excluded_v4.in_trie) == 0 {
            return excluded_inline(&raw const crate::maps::CONFIG.excluded_v4, &v4);
        }
        EXCLUDED_V4.get(Key::new(32, v4)).is_some()
    } else if family == AF_INET6 {
        if config!(excluded_v6.in_trie) == 0 {
            return excluded_inline(&raw const crate::maps::CONFIG.excluded_v6, a);
        }
        EXCLUDED_V6.get(Key::new(128, *a)).is_some()
    } else {
        false
    }
}

/// Whether `address` is in one of the prefixes the configuration holds (`ExcludedV4`,
/// `ExcludedV6`, at `table` in `CONFIG`): read one by one with volatile loads, as every
/// configuration field (the compiler would otherwise fold the zeroed initialiser in).
#[inline(always)]
fn excluded_inline<P: Prefix, const N: usize>(
    table: *const ExcludedPrefixes<P, N>,
    address: &P::Address,
) -> bool {
    // SAFETY: `table` is a field of the frozen configuration, valid and aligned; every
    // element read is in bounds (`i < N`).
    unsafe {
        let count = core::ptr::read_volatile(&raw const (*table).count);
        for i in 0..N {
            if i as u32 >= count {
                return false;
            }
            let prefix = core::ptr::read_volatile(&raw const (*table).prefixes[i]);
            if prefix.holds(address) {
                return true;
            }
        }
    }
    false
}

/// The cgroup that names the event's container, the key of the per-cgroup maps: the leaf
/// of the configured hierarchy (`IdentityEvent::cgroup_leaf_id`) where known, else the v2
/// cgroup id.
#[inline(always)]
pub fn cgroup_key(leaf_id: u64, cgroup_id: u64) -> u64 {
    if leaf_id != 0 { leaf_id } else { cgroup_id }
}

/// A cgroup (by [`cgroup_key`]) user space excluded (a Kubernetes namespace it was told
/// to ignore).
#[inline(always)]
pub fn excluded_cgroup(key: u64) -> bool {
    if config!(exclude_cgroups) == 0 {
        return false;
    }
    // SAFETY: the value is not read, only its presence.
    unsafe { EXCLUDED_CGROUPS.get(&key).is_some() }
}

/// CLOCK_BOOTTIME minus the decisions' clock (`clock::decision_ns`), as an aggregate's
/// opening last measured it (see [`window_clock`]); wrapping arithmetic (the tick count
/// runs ahead).
static WINDOW_CLOCK_OFFSET: Words<1> = Words::new();

/// Now, on the aggregation windows' clock: CLOCK_BOOTTIME (which user space closes the
/// windows by), read as the decisions' tick count plus [`WINDOW_CLOCK_OFFSET`] where the
/// decisions go by it. A repeat then costs one plain load for its time, where
/// `bpf_ktime_get_boot_ns` is an ordered TSC read that waits for every load before it
/// (~45 ns per dropped repeat in a profile). It is within two ticks of the clock (the
/// count lags by up to one, the count the offset was measured with lagged by up to one,
/// and a new measure is kept only beyond two), so a repeat that close to a window's
/// boundary may be counted in the other window's aggregate, or miss it and be reported
/// on its own; user space closes a window once the current one is two further on, at
/// least a whole window (1 s) after it ended. After a resume (the count stops while the
/// machine sleeps) the repeats take earlier windows until the next opening measures the
/// offset again: one that misses its aggregate is admitted, opens one and measures it.
#[inline(always)]
fn window_clock() -> u64 {
    if config!(coarse_tick_ns) == 0 {
        return clock::boot_ns();
    }
    let offset = WINDOW_CLOCK_OFFSET.get_ptr_mut(0).map_or(0, emit::load);
    clock::decision_ns().wrapping_add(offset)
}

/// [`window_clock`] at an aggregate's opening, whose CLOCK_BOOTTIME `boot_ns` is known:
/// measures the offset again where it moved by more than two ticks (the first opening,
/// a resume), else keeps it, so the openings and the repeats of one window agree.
#[inline(always)]
fn window_clock_at(boot_ns: u64) -> u64 {
    let tick_ns = config!(coarse_tick_ns) as u64;
    if tick_ns == 0 {
        return boot_ns;
    }
    let Some(offset) = WINDOW_CLOCK_OFFSET.get_ptr_mut(0) else {
        return boot_ns;
    };
    let decision = clock::decision_ns();
    let measured = boot_ns.wrapping_sub(decision);
    let kept = emit::load(offset);
    if (measured.wrapping_sub(kept) as i64).unsigned_abs() > 2 * tick_ns {
        emit::store(offset, measured);
        return boot_ns;
    }
    decision.wrapping_add(kept)
}

/// Counts the connection of `key` into its window's aggregate if one is open (sets the
/// key's window): in this CPU's slot for the key if it holds it (the usual repeat), else
/// in [`AGGREGATES`] ([`repeat_elsewhere`]).
#[inline(always)]
fn repeat_in_window(key: &mut AggregateKey) -> bool {
    let window_ns = config!(aggregate_window_ns);
    if window_ns == 0 {
        return false;
    }
    key.window = AggregateKey::window_of(window_clock(), window_ns);
    let slot = REPEAT_SLOTS
        .get_ptr_mut(RepeatSlot::index_of(key, config!(repeat_slot_mask)))
        .and_then(NonNull::new);
    if let Some(slot) = slot
        && holds(slot.as_ptr(), key)
    {
        // This CPU's slot, but two programs can interleave on one CPU: an atomic add.
        // SAFETY: a map value's field.
        emit::atomic_add(unsafe { &raw mut (*slot.as_ptr()).repeats }, 1);
        return true;
    }
    repeat_elsewhere(key, slot)
}

/// Whether the repeat slot `slot` counts `key`'s repeats: its window, then the key a word
/// at a time.
#[inline(always)]
fn holds(slot: *mut RepeatSlot, key: &AggregateKey) -> bool {
    let words = key.words();
    // SAFETY: a map value's fields, read by pointer (another program on this CPU may be
    // claiming the slot).
    unsafe {
        let held = (&raw mut (*slot).key).cast::<u64>();
        emit::load(&raw mut (*slot).window) == key.window as u64
            && emit::load(held) == words[0]
            && emit::load(held.add(1)) == words[1]
            && emit::load(held.add(2)) == words[2]
            && emit::load(held.add(3)) == words[3]
    }
}

/// [`repeat_in_window`] where this CPU's slot is not `key`'s: counted in `key`'s aggregate
/// in [`AGGREGATES`] if one is open, and the slot claimed for it where it may be
/// ([`claim`]), so this CPU's next repeats go there. Out of line: the usual repeat returns
/// before this.
#[inline(never)]
fn repeat_elsewhere(key: &AggregateKey, slot: Option<NonNull<RepeatSlot>>) -> bool {
    let Some(repeats) = AGGREGATES.get_ptr_mut(key) else {
        return false;
    };
    // This CPU's slot, but two programs can interleave on one CPU: an atomic add.
    crate::emit::atomic_add(repeats, 1);
    if let Some(slot) = slot {
        claim(slot.as_ptr(), key);
    }
    true
}

/// Claims the repeat slot `slot` for `key` if its window has been read by user space
/// ([`AGGREGATES_READ`]) or it was never used: its window swapped to
/// `RepeatSlot::CLAIMING` (one program at a time), the key and a zero count written, its
/// window last. A slot holding a window user space has yet to read is left alone: its
/// count is not lost, the key's repeats go to the map.
#[inline(always)]
fn claim(slot: *mut RepeatSlot, key: &AggregateKey) {
    if config!(fetching_atomics) == 0 {
        return;
    }
    // SAFETY: a map value's fields, reached by pointer.
    let window = unsafe { &raw mut (*slot).window };
    let held = emit::load(window);
    let read_through = AGGREGATES_READ.get_ptr_mut(0).map_or(0, emit::load);
    if held == RepeatSlot::CLAIMING || (held != 0 && held > read_through) {
        return;
    }
    if !emit::compare_exchange(window, held, RepeatSlot::CLAIMING) {
        return;
    }
    let words = key.words();
    // SAFETY: as above; the slot is this program's until its window is written.
    unsafe {
        let to = (&raw mut (*slot).key).cast::<u64>();
        for (i, word) in words.iter().enumerate() {
            emit::store(to.add(i), *word);
        }
        emit::store(&raw mut (*slot).repeats, 0);
    }
    // The window last (a full barrier; the fence keeps the compiler's order).
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
    emit::exchange(window, key.window as u64);
}

/// Opens the aggregate of `ev`'s window, about to be submitted at `now_boot_ns`
/// (CLOCK_BOOTTIME, read for the record): later repeats are counted there. The record
/// names its window either way, so it carries a count; if the map is full or another
/// CPU opened the window first, that record is reported on its own (and the repeats go
/// to whichever aggregate exists).
#[inline(always)]
pub fn open_aggregate(ev: &mut ConnectEvent, now_boot_ns: u64) {
    let window_ns = config!(aggregate_window_ns);
    if window_ns == 0 {
        return;
    }
    let window = AggregateKey::window_of(window_clock_at(now_boot_ns), window_ns);
    let _ = AGGREGATES.insert(&AggregateKey::of(ev, window), &0u64, BPF_NOEXIST as u64);
    ev.aggregate_window = window;
}
