//! The maps user space writes back into the kernel, each behind a small handle so the
//! stages that use them (`events`, `enrich`) never touch aya:
//! [`AggregateWindows`] (the repeats counted per aggregation window, read and deleted once
//! a window closes) and [`ExcludedCgroups`] (cgroups the programs drop, added to once a
//! container's namespace is known to be excluded).

use aya::maps::{HashMap, MapData, MapError, PerCpuHashMap};
use egress_shared::AggregateKey;

/// The programs' `AGGREGATES`: repeats per aggregate key, per CPU.
pub struct AggregateWindows(PerCpuHashMap<MapData, AggregateKey, u64>);

impl AggregateWindows {
    pub(super) fn new(map: PerCpuHashMap<MapData, AggregateKey, u64>) -> Self {
        Self(map)
    }

    /// The aggregates of windows up to `last` (inclusive).
    pub fn keys_through(&self, last: u32) -> Vec<AggregateKey> {
        self.0
            .keys()
            .filter_map(Result::ok)
            .filter(|key| key.window <= last)
            .collect()
    }

    /// The repeats counted for `key` (summed over CPUs; 0 when unreadable), removing it
    /// from the map: a closed window is never written again.
    pub fn take(&mut self, key: &AggregateKey) -> u64 {
        let repeats = match self.0.get(key, 0) {
            Ok(per_cpu) => per_cpu.iter().sum(),
            Err(_) => 0,
        };
        let _ = self.0.remove(key);
        repeats
    }
}

/// The programs' `EXCLUDED_CGROUPS`: connections of these cgroup ids are dropped in the
/// kernel.
pub struct ExcludedCgroups(HashMap<MapData, u64, u8>);

/// The kernel refused an entry (the map is full, or gone).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct ExcludeError(#[from] MapError);

impl ExcludedCgroups {
    pub(super) fn new(map: HashMap<MapData, u64, u8>) -> Self {
        Self(map)
    }

    /// Has the kernel drop the connections of `cgroup` from now on.
    pub fn exclude(&mut self, cgroup: u64) -> Result<(), ExcludeError> {
        self.0.insert(cgroup, 1, 0)?;
        Ok(())
    }
}
