//! The programs' counters (`COUNTERS`, per CPU) and what the kernel counts about the
//! programs themselves, read into plain [`KernelFigures`] for the collector's telemetry.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use aya::maps::{MapData, PerCpuArray};
use egress_shared::{COUNTER_COUNT, Counter};

use super::{programs::ProgramCounts, state_maps::CallsMap};
use crate::telemetry::KernelFigures;

/// The programs' per-CPU counters, summed over CPUs, and what the kernel counts about
/// the programs themselves.
pub struct KernelCounters {
    map: PerCpuArray<MapData, u64>,
    programs: ProgramCounts,
    calls: CallsMap,
    /// The highest eviction count reported, so the count never goes back.
    calls_evicted: AtomicU64,
    /// `IDENTITIES` (also u32-keyed), for the identities the cache forgot.
    identities: CallsMap,
    identities_evicted: AtomicU64,
}

impl KernelCounters {
    pub fn new(
        map: PerCpuArray<MapData, u64>,
        programs: ProgramCounts,
        calls: CallsMap,
        identities: CallsMap,
    ) -> Self {
        Self {
            map,
            programs,
            calls,
            calls_evicted: AtomicU64::new(0),
            identities,
            identities_evicted: AtomicU64::new(0),
        }
    }

    fn counter(&self, counter: Counter) -> u64 {
        self.map
            .get(&(counter as u32), 0)
            .map_or(0, |values| values.iter().sum())
    }

    /// Entries of `CALLS` evicted before their exit took them: every entry saved is
    /// taken, still in the map, or evicted. Read in this order (saved, then the map, then
    /// taken), a call made or finished during the reading can only lower the figure, so
    /// it never reports an eviction that did not happen; the highest figure is kept.
    pub fn calls_evicted(&self) -> u64 {
        let saved = self.counter(Counter::CallsSaved);
        let present = self.calls.entries();
        let taken = self.counter(Counter::CallsTaken);
        let evicted = saved.saturating_sub(present).saturating_sub(taken);
        self.calls_evicted.fetch_max(evicted, Relaxed).max(evicted)
    }

    /// Identities the cache forgot: every identity cached (a new entry of `IDENTITIES`, a
    /// slot of `IDENTITY_SLOTS` taken) is still in the map, still in its slot, or was
    /// evicted by the LRU or taken over in its slot by another process (the programs
    /// never delete one, and a slot once filled stays held: `identity_slots_filled` of
    /// them). The programs count an identity after it is in the map or its slot, and a
    /// slot filled before the identity cached; read in the other order (the count, then
    /// the map, then the slots filled), an identity cached during the reading can only
    /// lower the figure; the highest figure is kept. A process whose identity moved from
    /// the map to a slot leaves its old entry, whose eviction is counted later although
    /// the process is still cached (a cost figure, not a loss).
    pub fn identities_evicted(&self) -> u64 {
        let cached = self.counter(Counter::IdentitiesCached);
        let present = self.identities.entries() + self.counter(Counter::IdentitySlotsFilled);
        let evicted = cached.saturating_sub(present);
        self.identities_evicted
            .fetch_max(evicted, Relaxed)
            .max(evicted)
    }

    /// 0 on kernels that do not count them (before 5.12).
    pub fn recursion_misses(&self) -> u64 {
        self.programs.recursion_misses().unwrap_or(0)
    }

    /// Everything at once, for a [`Snapshot`](crate::telemetry::Snapshot).
    pub fn figures(&self) -> KernelFigures {
        KernelFigures {
            counters: self.read(),
            recursion_misses: self.recursion_misses(),
            calls_evicted: self.calls_evicted(),
            identities_evicted: self.identities_evicted(),
        }
    }

    pub fn read(&self) -> [u64; COUNTER_COUNT as usize] {
        let mut totals = [0; COUNTER_COUNT as usize];
        for counter in Counter::ALL {
            if let Ok(values) = self.map.get(&(counter as u32), 0) {
                totals[counter as usize] = values.iter().sum();
            }
        }
        totals
    }
}
