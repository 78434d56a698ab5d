//! Who made the connection: `task -> cgroup -> container -> pod`.
//!
//! The container id comes from the cgroup leaf name the kernel captured with the event
//! (so a process that has exited, or a container already stopped, is still attributed);
//! the pod comes from the runtime's own files, read once per container and cached. Runs
//! on its own thread: file reads on a cache miss never hold up capture.
//!
//! Public items: [`Enricher`] (the stage, reporting through
//! `telemetry::enrich::EnrichTelemetry`), [`Record`] and [`Resource`] (what it hands
//! to export), [`HostIdentity`], [`CgroupRoots`], and its parts: [`container_ref`]
//! (a container's identity from a cgroup path: `crate::cgroup_names`), [`cgroup_index`] (cgroup id -> path),
//! [`cache`] (container identities), [`runtime`] (docker, containerd, CRI-O files),
//! [`exclude`] (excluded namespaces, handed to the kernel through `probe::feedback`),
//! [`watch`] (directory changes).

pub mod cache;
pub mod cgroup_index;
pub use crate::cgroup_names as container_ref;
pub mod exclude;
pub mod runtime;
pub mod watch;

use std::{
    collections::BTreeMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, mpsc as std_mpsc},
    time::{Duration, Instant},
};

use opentelemetry_semantic_conventions::attribute as semconv;
use tokio::sync::mpsc;

use self::{
    cache::{ContainerCache, Identity},
    cgroup_index::CgroupPaths,
    container_ref::ContainerRef,
    exclude::NamespaceFilter,
    runtime::{RuntimeFiles, on_host},
    watch::DirChange,
};
use crate::{
    config::settings::CacheSettings,
    events::{Connection, text::Text},
    telemetry::enrich::{EnrichEvent, EnrichTelemetry},
};

/// Resource attributes shared by every connection of one workload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Resource {
    pub attributes: BTreeMap<&'static str, String>,
}

/// A connection and the workload it belongs to.
#[derive(Debug, Clone)]
pub struct Record {
    pub connection: Connection,
    pub resource: Arc<Resource>,
    /// Made from the host's network namespace by a container (`hostNetwork: true` pods):
    /// the UTS nodename is then the node's, not the pod's.
    pub host_network: bool,
    /// The task's cgroup path in the hierarchy the probes read, when it still existed.
    pub cgroup_path: Option<Text>,
}

impl Record {
    /// A record as capture hands it on: enrichment fills in its workload in place
    /// ([`Enricher::enrich`]); until then it is `unattributed`'s. Records are large: made
    /// once, where the connection is decoded, not copied into another batch per stage.
    pub fn captured(connection: Connection, unattributed: &Arc<Resource>) -> Self {
        Self {
            connection,
            resource: Arc::clone(unattributed),
            host_network: false,
            cgroup_path: None,
        }
    }
}

/// The node this collector runs on.
#[derive(Debug, Clone)]
pub struct HostIdentity {
    pub host_name: String,
    /// `K8S_NODE_NAME` (downward API), when set.
    pub node_name: Option<String>,
    /// Inode of the host's network namespace, to recognise host-network containers.
    pub net_ns: Option<u64>,
}

impl HostIdentity {
    /// Reads the host's identity; `host_root` is where the host's filesystem is mounted.
    pub fn detect(host_root: &Path) -> Self {
        // /proc/sys/kernel/hostname shows the reader's own UTS namespace, whichever procfs
        // it is read through: in a pod, the pod's name. The node's file comes first.
        let read_name = |path: PathBuf| {
            std::fs::read_to_string(path)
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
        };
        let host_name = read_name(on_host(host_root, "/etc/hostname"))
            .or_else(|| read_name(PathBuf::from("/proc/sys/kernel/hostname")))
            .unwrap_or_default();
        let node_name = std::env::var("K8S_NODE_NAME")
            .ok()
            .filter(|s| !s.is_empty());
        // PID 1's namespace is the host's when the host's /proc is visible (reading it
        // needs CAP_SYS_PTRACE in a container). Our own is the host's only when we run on
        // the host itself; in a pod it is the pod's, and guessing it would mark the pod's
        // own connections host-network. Runtime metadata still marks host-network
        // containers without it.
        let net_ns = std::fs::metadata(on_host(host_root, "/proc/1/ns/net"))
            .ok()
            .or_else(|| {
                (host_root == Path::new("/"))
                    .then(|| std::fs::metadata("/proc/self/ns/net").ok())
                    .flatten()
            })
            .map(|m| m.ino());
        Self {
            host_name,
            node_name,
            net_ns,
        }
    }

    fn attributes(&self) -> BTreeMap<&'static str, String> {
        let mut attributes = BTreeMap::new();
        attributes.insert(semconv::HOST_NAME, self.host_name.clone());
        if let Some(node) = &self.node_name {
            attributes.insert(semconv::K8S_NODE_NAME, node.clone());
        }
        attributes
    }
}

pub struct Enricher {
    host: Arc<Resource>,
    host_net_ns: Option<u64>,
    containers: ContainerCache,
    cgroup_index: CgroupPaths,
    /// Hybrid hosts whose programs read a v1 hierarchy: the unified one, asked when the
    /// v1 cgroup names no container.
    unified_paths: Option<CgroupPaths>,
    changes: std_mpsc::Receiver<DirChange>,
    last_sweep: Instant,
    removal_grace: Duration,
    namespace_filter: Option<NamespaceFilter>,
    telemetry: EnrichTelemetry,
    /// Where the ids of containers that went away are sent (the OTLP exporter ends their
    /// metric series).
    departures: Option<tokio::sync::mpsc::UnboundedSender<String>>,
    parsed: ParsedPaths,
}

/// Slots of [`ParsedPaths`]: more than the cgroups one node's connections come from at
/// once; a path that lost its slot is parsed again.
const PARSED_SLOTS: usize = 256;

/// What each cgroup path says about its container ([`container_ref::parse`]), kept by
/// the path's shared text: a node's connections come from a few cgroups, whose records
/// share one text per path, so each is parsed once, not once per connection.
struct ParsedPaths {
    slots: Vec<Option<(Text, Option<Arc<ContainerRef>>)>>,
}

impl Default for ParsedPaths {
    fn default() -> Self {
        Self {
            slots: vec![None; PARSED_SLOTS],
        }
    }
}

impl ParsedPaths {
    fn parse(&mut self, path: &Text) -> Option<Arc<ContainerRef>> {
        // The text's address, less the bits every allocation shares.
        let slot = &mut self.slots[(path.addr() >> 4) % PARSED_SLOTS];
        match slot {
            Some((text, container)) if Text::ptr_eq(text, path) => container.clone(),
            _ => {
                let container = container_ref::parse(path).map(Arc::new);
                *slot = Some((path.clone(), container.clone()));
                container
            }
        }
    }
}

const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// How often changes are applied when no connection arrives.
const APPLY_EVERY: Duration = Duration::from_secs(1);

/// Where the cgroup hierarchies are mounted, under the host root.
#[derive(Debug, Clone, Default)]
pub struct CgroupRoots {
    /// The hierarchy the probes read cgroup names from.
    pub probed: Option<PathBuf>,
    /// The unified hierarchy, on hybrid hosts whose probes read a v1 one.
    pub unified: Option<PathBuf>,
}

impl Enricher {
    /// `changes` reports container directories appearing and going (see [`watch::spawn`]).
    /// Each cgroup hierarchy is walked once here, then followed by a watcher thread.
    pub fn new(
        host: &HostIdentity,
        cgroups: CgroupRoots,
        files: RuntimeFiles,
        settings: CacheSettings,
        changes: std_mpsc::Receiver<DirChange>,
        telemetry: EnrichTelemetry,
    ) -> Self {
        let attributes = host.attributes();
        let removal_grace = settings.removal_grace;
        Self {
            host: Arc::new(Resource {
                attributes: attributes.clone(),
            }),
            host_net_ns: host.net_ns,
            containers: ContainerCache::new(files, attributes, settings, telemetry.clone()),
            cgroup_index: CgroupPaths::watch(cgroups.probed, telemetry.clone()),
            unified_paths: cgroups
                .unified
                .map(|root| CgroupPaths::watch(Some(root), telemetry.clone())),
            changes,
            last_sweep: Instant::now(),
            removal_grace,
            namespace_filter: None,
            telemetry,
            departures: None,
            parsed: ParsedPaths::default(),
        }
    }

    /// Sends the id of each container whose runtime directory goes away to `departures`.
    pub fn with_departures(
        mut self,
        departures: tokio::sync::mpsc::UnboundedSender<String>,
    ) -> Self {
        self.departures = Some(departures);
        self
    }

    /// Drops the records of excluded Kubernetes namespaces.
    pub fn with_namespace_filter(mut self, filter: NamespaceFilter) -> Self {
        self.namespace_filter = Some(filter);
        self
    }

    /// Sets the record's workload (resource, host network, cgroup path) in place. `now`
    /// is read once per batch by the caller.
    pub fn enrich(&mut self, record: &mut Record, now: Instant) {
        let connection = &record.connection;
        let cgroup = &connection.cgroup;
        let mut cgroup_path = self
            .cgroup_index
            .resolve_shared(cgroup.leaf_id, &cgroup.leaf_name, &cgroup.parent_name, now)
            .cloned();
        // The full path when the cgroup still exists; else the two names the kernel kept.
        let mut container = match &cgroup_path {
            Some(path) => self.parsed.parse(path),
            None => container_ref::parse(&format!("{}/{}", cgroup.parent_name, cgroup.leaf_name))
                .map(Arc::new),
        };
        // A hybrid host: the v1 cgroup names no container, the unified one may (a runtime
        // that places containers in the unified tree only).
        if container.is_none()
            && let Some(unified) = &mut self.unified_paths
            && let Some(path) = unified.known_shared(cgroup.id, now)
            && let Some(found) = self.parsed.parse(path)
        {
            self.telemetry.emit(EnrichEvent::HybridUnified);
            cgroup_path = Some(path.clone());
            container = Some(found);
        }
        let Some(container) = container else {
            record.resource = Arc::clone(&self.host);
            record.host_network = false;
            record.cgroup_path = cgroup_path;
            return;
        };
        let in_host_netns = self.host_net_ns == Some(u64::from(connection.namespaces.net));
        let Identity {
            resource,
            host_network,
        } = self.containers.identity(&container, now);
        record.resource = resource;
        record.host_network = host_network || in_host_netns;
        record.cgroup_path = cgroup_path;
    }

    fn apply_changes(&mut self) {
        let now = Instant::now();
        while let Ok(change) = self.changes.try_recv() {
            match change {
                DirChange::Created(id) => self.containers.container_created(&id, now),
                DirChange::Read(id, metadata) => self.containers.prefill(id, &metadata, now),
                DirChange::Removed(id) => {
                    self.containers.container_removed(&id, now);
                    if let Some(departures) = &self.departures {
                        // The exporter may have stopped (shutdown): nothing to end then.
                        let _ = departures.send(id);
                    }
                }
            }
        }
        self.cgroup_index.apply_changes(now);
        if let Some(unified) = &mut self.unified_paths {
            unified.apply_changes(now);
        }
        if now.duration_since(self.last_sweep) >= SWEEP_EVERY {
            self.containers.sweep(now);
            self.cgroup_index.sweep(now, self.removal_grace);
            if let Some(unified) = &mut self.unified_paths {
                unified.sweep(now, self.removal_grace);
            }
            self.last_sweep = now;
        }
    }

    /// Until the reader's channel closes (on shutdown, after its final drain). Blocking:
    /// run it with `spawn_blocking` (it waits on the runtime's timer). Changes (departures,
    /// cgroups) are applied with each batch and at least every [`APPLY_EVERY`] without
    /// one, so a quiet node still ends gone containers' series and sweeps its indexes.
    pub fn run_blocking(
        mut self,
        mut input: mpsc::Receiver<Vec<Record>>,
        out: mpsc::Sender<crate::export::Records>,
    ) {
        let runtime = tokio::runtime::Handle::current();
        loop {
            let mut records =
                match runtime.block_on(tokio::time::timeout(APPLY_EVERY, input.recv())) {
                    Ok(Some(batch)) => {
                        // A lagging enrichment (test hook): records reach it late.
                        crate::testhook::slow_if("enrich");
                        batch
                    }
                    Ok(None) => break,
                    Err(_) => {
                        self.apply_changes();
                        continue;
                    }
                };
            self.apply_changes();
            let now = Instant::now();
            for record in &mut records {
                self.enrich(record, now);
            }
            if let Some(filter) = &mut self.namespace_filter {
                records.retain(|r| filter.keep(r));
            }
            if records.is_empty() {
                continue;
            }
            // Shared from here on: the sinks each take a reference.
            if out.blocking_send(Arc::new(records)).is_err() {
                break;
            }
        }
        crate::testhook::hang_if("enrich");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_is_parsed_once_and_every_path_gets_its_own_container() {
        let id = "b5fa49123b796b99fe605af0f8d019f3b3a8cb445b529b892e0d3788682469af";
        let mut parsed = ParsedPaths::default();
        // More paths than slots: some share one.
        let paths: Vec<Text> = (0..2 * PARSED_SLOTS)
            .map(|i| match i % 3 {
                0 => Text::from(format!("/kubepods/pod{i}/{id}")),
                1 => Text::from(format!("/docker/{i}{}", &id[1..])),
                _ => Text::from(format!("/user.slice/session-{i}.scope")),
            })
            .collect();
        for _ in 0..2 {
            for path in &paths {
                let expected = container_ref::parse(path);
                assert_eq!(parsed.parse(path).as_deref(), expected.as_ref(), "{path}");
            }
        }
        let path = &paths[0];
        let first = parsed.parse(path).expect("a container");
        let before = crate::alloc_counting::allocations();
        let again = parsed.parse(&path.clone()).expect("a container");
        assert_eq!(crate::alloc_counting::allocations(), before);
        assert!(Arc::ptr_eq(&first, &again), "parsed once");
    }
}
