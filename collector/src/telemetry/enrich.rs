//! What the enrich stage reports, as typed internal events: lookups of container
//! metadata that failed, what the caches and the cgroup index did, and records dropped
//! for an excluded namespace. Each event's counter, level and words live here; the stage
//! holds an [`EnrichTelemetry`], which reports these events and nothing else.
//!
//! The stage decides *when* (a container's failed lookup is logged once, at its first
//! failure); this module decides *what it means*.

use std::{fmt::Display, sync::Arc};

use super::Stats;

/// What happened in enrichment.
pub enum EnrichEvent<'a> {
    /// Container metadata could not be read (the connections still go out, with the
    /// container id only); `first` for the container's first failure, which is logged.
    LookupFailed {
        reason: &'static str,
        container: &'a str,
        error: &'a dyn Display,
        first: bool,
    },
    /// A container's metadata read when its directory appeared, before any connection.
    ContainerReadAtCreation,
    /// The container cache was full: its least recently used entry was dropped.
    ContainerCacheEvicted,
    /// The cgroup index was full: a cgroup was not added.
    CgroupIndexFull,
    /// A cgroup with no path: attributed from the kernel's two names.
    CgroupUnresolved,
    /// A cgroup found by its names before the watcher reported it.
    CgroupLookedUp,
    /// Attributed through the unified hierarchy of a hybrid host.
    HybridUnified,
    /// A record of an excluded namespace dropped, standing for `connections`.
    Filtered { connections: u64 },
    /// The kernel did not take an excluded cgroup; user space filters it instead.
    ExclusionNotHandedToKernel { error: &'a dyn Display },
}

/// The enrich stage's handle on the collector's counters: it reports [`EnrichEvent`]s.
#[derive(Clone, Default)]
pub struct EnrichTelemetry {
    stats: Arc<Stats>,
}

impl EnrichTelemetry {
    pub fn new(stats: Arc<Stats>) -> Self {
        Self { stats }
    }

    /// Counts `event`, and logs it where an operator should see it.
    pub fn emit(&self, event: EnrichEvent<'_>) {
        let stats = &self.stats;
        match event {
            EnrichEvent::LookupFailed {
                reason,
                container,
                error,
                first,
            } => {
                stats.record_enrichment_failed(reason);
                if first {
                    tracing::warn!(
                        container.id = %container,
                        reason,
                        error = %error,
                        "No pod metadata for a container; its connections carry the container id only."
                    );
                }
            }
            EnrichEvent::ContainerReadAtCreation => {
                stats.record_enrichment_event("container_read_at_creation");
            }
            EnrichEvent::ContainerCacheEvicted => {
                stats.record_enrichment_event("container_cache_evicted");
            }
            EnrichEvent::CgroupIndexFull => stats.record_enrichment_event("cgroup_index_full"),
            EnrichEvent::CgroupUnresolved => stats.record_enrichment_event("cgroup_unresolved"),
            EnrichEvent::CgroupLookedUp => stats.record_enrichment_event("cgroup_looked_up"),
            EnrichEvent::HybridUnified => stats.record_enrichment_event("hybrid_unified"),
            EnrichEvent::Filtered { connections } => stats.record_filtered(connections as usize),
            EnrichEvent::ExclusionNotHandedToKernel { error } => {
                // Still filtered, in user space instead of in the kernel.
                tracing::warn!(error = %error, "Cannot hand an excluded cgroup to the kernel; filtering it in user space.");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_event_moves_its_own_counter_and_no_other() {
        let stats = Arc::new(Stats::default());
        let enrich = EnrichTelemetry::new(Arc::clone(&stats));
        for first in [true, false] {
            enrich.emit(EnrichEvent::LookupFailed {
                reason: "not_found",
                container: "abc",
                error: &"no config",
                first,
            });
        }
        for event in [
            EnrichEvent::ContainerReadAtCreation,
            EnrichEvent::ContainerCacheEvicted,
            EnrichEvent::CgroupIndexFull,
            EnrichEvent::CgroupUnresolved,
            EnrichEvent::CgroupUnresolved,
            EnrichEvent::CgroupLookedUp,
            EnrichEvent::HybridUnified,
            EnrichEvent::ExclusionNotHandedToKernel { error: &"EPERM" },
        ] {
            enrich.emit(event);
        }
        enrich.emit(EnrichEvent::Filtered { connections: 4 });
        let s = stats.snapshot_user();
        assert_eq!(
            s.enrichment_failed.clone().into_iter().collect::<Vec<_>>(),
            [("not_found", 2)]
        );
        assert_eq!(
            s.enrichment_events.clone().into_iter().collect::<Vec<_>>(),
            [
                ("cgroup_index_full", 1),
                ("cgroup_looked_up", 1),
                ("cgroup_unresolved", 2),
                ("container_cache_evicted", 1),
                ("container_read_at_creation", 1),
                ("hybrid_unified", 1),
            ]
        );
        assert_eq!(s.filtered, 4);
        assert_eq!(
            (s.captured, s.exported, s.dropped()),
            (0, 0, 0),
            "enrichment counts nothing of another stage"
        );
        assert!(s.dns.is_empty() && s.decode_failed.is_empty());
    }
}
