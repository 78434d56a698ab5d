//! The maps user space writes back into the kernel, each behind a small handle so the
//! stages that use them (`events`, `enrich`) never touch aya:
//! [`AggregateWindows`] (the repeats counted per aggregation window, read and deleted once
//! a window closes) and [`ExcludedCgroups`] (cgroups the programs drop, added to once a
//! container's namespace is known to be excluded).

use std::collections::HashMap;

use aya::maps::{Array, MapData, MapError, PerCpuArray, PerCpuHashMap};
use egress_shared::{AggregateKey, RepeatSlot};

/// The programs' `AGGREGATES` (repeats per aggregate key, per CPU), `REPEAT_SLOTS` (repeats
/// counted in place, per CPU) and `AGGREGATES_READ` (the last window read, after which
/// the programs may give its slots to other keys).
pub struct AggregateWindows {
    map: PerCpuHashMap<MapData, AggregateKey, u64>,
    slots: PerCpuArray<MapData, RepeatSlot>,
    read: Array<MapData, u64>,
}

impl AggregateWindows {
    pub(super) fn new(
        map: PerCpuHashMap<MapData, AggregateKey, u64>,
        slots: PerCpuArray<MapData, RepeatSlot>,
        read: Array<MapData, u64>,
    ) -> Self {
        Self { map, slots, read }
    }

    /// The repeats counted for each aggregate of the windows `after + 1 ..= last`, summed
    /// over CPUs, the map and the slots (0 where unreadable), removed from the map; then,
    /// if every slot was read, tells the programs those windows are read, so their slots
    /// may take other keys (a slot is never read twice: a window is closed once). A
    /// closed window is never written again.
    pub fn take_through(&mut self, after: u32, last: u32) -> HashMap<AggregateKey, u64> {
        let mut taken: HashMap<AggregateKey, u64> = HashMap::new();
        let keys: Vec<AggregateKey> = (self.map.keys())
            .filter_map(Result::ok)
            .filter(|key| key.window <= last)
            .collect();
        for key in keys {
            let repeats: u64 = match self.map.get(&key, 0) {
                Ok(per_cpu) => per_cpu.iter().sum(),
                Err(_) => 0,
            };
            let _ = self.map.remove(&key);
            *taken.entry(key).or_default() += repeats;
        }
        let mut all_read = true;
        for index in 0..RepeatSlot::PER_CPU {
            let Ok(per_cpu) = self.slots.get(&index, 0) else {
                all_read = false;
                continue;
            };
            for slot in per_cpu.iter().filter(|s| s.counts_between(after, last)) {
                *taken.entry(slot.key).or_default() += slot.repeats;
            }
        }
        // A slot that could not be read keeps its window from reuse: the programs give
        // no slot of a window later than the last one read to another key.
        if all_read {
            let _ = self.read.set(0, u64::from(last), 0);
        }
        taken
    }
}

/// The programs' `EXCLUDED_CGROUPS`: connections of these cgroup ids are dropped in the
/// kernel.
pub struct ExcludedCgroups(aya::maps::HashMap<MapData, u64, u8>);

/// The kernel refused an entry (the map is full, or gone).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct ExcludeError(#[from] MapError);

impl ExcludedCgroups {
    pub(super) fn new(map: aya::maps::HashMap<MapData, u64, u8>) -> Self {
        Self(map)
    }

    /// Has the kernel drop the connections of `cgroup` from now on.
    pub fn exclude(&mut self, cgroup: u64) -> Result<(), ExcludeError> {
        self.0.insert(cgroup, 1, 0)?;
        Ok(())
    }
}
