//! The programs' two clocks. An event's own time is CLOCK_BOOTTIME
//! (`bpf_ktime_get_boot_ns`), which user space turns into wall time. The decisions that
//! only compare their times with each other (the per-cgroup rate limit, the age of a
//! cached identity) go by [`decision_ns`] instead: the kernel's tick count, where tracing
//! programs may read it. The clock is an ordered TSC read, which waits for every load
//! issued before it, and was the largest single cost of an attempt the rate limit drops
//! (docs/kernel.md, "The tick clock for the decisions"); the tick count is one plain
//! load (the verifier inlines the helper on 64-bit JITs).
//!
//! The two are different time bases: a time of one is never compared with the other.

use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_boot_ns};

use crate::maps::config;

/// CLOCK_BOOTTIME in ns: when an event happened.
#[inline(always)]
pub fn boot_ns() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_boot_ns() }
}

/// The time the decisions go by, in ns from an arbitrary origin, in steps of one tick
/// (1-42 ms): `jiffies` times the tick length user space read
/// (`ProbeConfig::coarse_tick_ns`), else (the kernel refuses `bpf_jiffies64` to tracing
/// programs, the tick could not be read, or the burst is under two ticks of events)
/// [`boot_ns`].
#[inline(always)]
pub fn decision_ns() -> u64 {
    let tick_ns = config!(coarse_tick_ns) as u64;
    if tick_ns == 0 {
        return boot_ns();
    }
    // SAFETY: a helper without arguments (tracing programs: 5.9+; user space loaded a
    // program that calls it before it set `coarse_tick_ns`). The verifier inlines it
    // into a load of `jiffies_64` on 64-bit JITs.
    unsafe { bpf_jiffies64() }.wrapping_mul(tick_ns)
}

/// [`decision_ns`] for an event whose own time `now` was read already: `now` itself
/// where the decisions go by the clock (no second read).
#[inline(always)]
pub fn decision_ns_at(now: u64) -> u64 {
    if config!(coarse_tick_ns) == 0 {
        now
    } else {
        decision_ns()
    }
}

/// An event's own time, given the [`decision_ns`] read for it: the same value where the
/// decisions go by the clock (no second read).
#[inline(always)]
pub fn event_ns(decision_ns: u64) -> u64 {
    if config!(coarse_tick_ns) == 0 {
        decision_ns
    } else {
        boot_ns()
    }
}
