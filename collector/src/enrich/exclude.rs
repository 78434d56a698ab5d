//! Kubernetes namespaces users exclude (`--exclude-namespace`). The namespace is only
//! known once a record is attributed, so the first records of such a container are
//! dropped here; its cgroup is then handed to the kernel, which drops the rest before
//! they cost a record.

use std::collections::HashSet;

use opentelemetry_semantic_conventions::attribute as semconv;

use super::Record;
use crate::{
    probe::feedback::ExcludedCgroups,
    telemetry::enrich::{EnrichEvent, EnrichTelemetry},
};

pub struct NamespaceFilter {
    namespaces: HashSet<String>,
    /// The programs' `EXCLUDED_CGROUPS`.
    kernel: ExcludedCgroups,
    telemetry: EnrichTelemetry,
    warned: bool,
}

impl NamespaceFilter {
    pub fn new(namespaces: &[String], kernel: ExcludedCgroups, telemetry: EnrichTelemetry) -> Self {
        Self {
            namespaces: namespaces.iter().cloned().collect(),
            kernel,
            telemetry,
            warned: false,
        }
    }

    /// False for a record of an excluded namespace (counted as filtered).
    pub fn keep(&mut self, record: &Record) -> bool {
        let Some(namespace) = record.resource.attributes.get(semconv::K8S_NAMESPACE_NAME) else {
            return true;
        };
        if !self.namespaces.contains(namespace) {
            return true;
        }
        // The connections it stands for (more than one for an aggregate's closing record).
        self.telemetry.emit(EnrichEvent::Filtered {
            connections: record.connection.count,
        });
        // The key the programs use: the cgroup whose name the kernel read. Handed over
        // only when it (or its parent, for a child cgroup of the container) names the
        // container: on a hybrid host a container found through the unified hierarchy
        // shares its v1 cgroup with others, which must not be dropped with it.
        let cgroup = &record.connection.cgroup;
        let names = format!("{}/{}", cgroup.parent_name, cgroup.leaf_name);
        if super::container_ref::parse(&names).is_none() {
            return false;
        }
        let key = if cgroup.leaf_id != 0 {
            cgroup.leaf_id
        } else {
            cgroup.id
        };
        if let Err(e) = self.kernel.exclude(key)
            && !self.warned
        {
            self.telemetry
                .emit(EnrichEvent::ExclusionNotHandedToKernel { error: &e });
            self.warned = true;
        }
        false
    }
}
