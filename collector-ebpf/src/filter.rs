//! What users exclude (destinations, cgroups) and the aggregation of repeats, decided in
//! the kernel so an unwanted or repeated connection costs a map lookup, not a record.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_boot_ns, maps::lpm_trie::Key};
use egress_shared::{AggregateKey, ConnectEvent, Counter};

use crate::{
    emit::count,
    maps::{AGGREGATES, EXCLUDED_CGROUPS, EXCLUDED_V4, EXCLUDED_V6, config},
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
        EXCLUDED_V4.get(Key::new(32, v4)).is_some()
    } else if family == AF_INET6 {
        EXCLUDED_V6.get(Key::new(128, *a)).is_some()
    } else {
        false
    }
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

/// Counts the connection of `key` into its window's aggregate if one is open (sets the
/// key's window).
#[inline(always)]
fn repeat_in_window(key: &mut AggregateKey) -> bool {
    let window_ns = config!(aggregate_window_ns);
    if window_ns == 0 {
        return false;
    }
    let now = unsafe { bpf_ktime_get_boot_ns() };
    key.window = AggregateKey::window_of(now, window_ns);
    let Some(repeats) = AGGREGATES.get_ptr_mut(key) else {
        return false;
    };
    // This CPU's slot, but two programs can interleave on one CPU: an atomic add.
    crate::emit::atomic_add(repeats, 1);
    true
}

/// Opens the aggregate of `ev`'s window, about to be submitted: later repeats are
/// counted there. The record names its window either way, so it carries a count; if the
/// map is full or another CPU opened the window first, that record is reported on its own
/// (and the repeats go to whichever aggregate exists).
#[inline(always)]
pub fn open_aggregate(ev: &mut ConnectEvent) {
    let window_ns = config!(aggregate_window_ns);
    if window_ns == 0 {
        return;
    }
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let window = AggregateKey::window_of(now, window_ns);
    let _ = AGGREGATES.insert(&AggregateKey::of(ev, window), &0u64, BPF_NOEXIST as u64);
    ev.aggregate_window = window;
}
