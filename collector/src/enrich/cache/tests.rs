//! The cache on a host root in a temp dir holding files dockerd wrote (the fixtures).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use super::*;
use crate::{enrich::runtime, telemetry::Stats};

const ID: &str = "a84caa1530973e062aa698124808daf69856e2c5329d9ec6fc0ab9bda5a06c17";
const CONFIG: &[u8] = include_bytes!("../runtime/fixtures/docker-config.v2.json");

struct HostRoot(PathBuf);

impl HostRoot {
    fn new(name: &str) -> Self {
        let root = std::env::temp_dir().join(format!("egress-cache-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("temp dir");
        Self(root)
    }

    fn container_dir(&self, id: &str) -> PathBuf {
        self.0.join("var/lib/docker/containers").join(id)
    }

    fn write_config(&self, id: &str, bytes: &[u8]) {
        std::fs::create_dir_all(self.container_dir(id)).expect("container dir");
        std::fs::write(self.container_dir(id).join("config.v2.json"), bytes).expect("write");
    }

    fn cache(&self, settings: CacheSettings) -> (ContainerCache, Arc<Stats>) {
        let (files, _) = RuntimeFiles::discover(Path::new(&self.0), &Default::default());
        let stats = Arc::new(Stats::default());
        let host = BTreeMap::from([(semconv::HOST_NAME, "node-1".to_owned())]);
        (
            ContainerCache::new(
                files,
                host,
                settings,
                EnrichTelemetry::new(Arc::clone(&stats)),
            ),
            stats,
        )
    }
}

impl Drop for HostRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn container(id: &str) -> ContainerRef {
    ContainerRef {
        id: id.to_owned(),
        runtime_hint: None,
        pod_uid: Some("from-the-path".into()),
    }
}

fn attr(identity: &Identity, key: &str) -> Option<String> {
    identity.resource.attributes.get(key).cloned()
}

fn failures(stats: &Stats) -> BTreeMap<&'static str, u64> {
    stats.snapshot_user().enrichment_failed
}

#[test]
fn reads_once_then_serves_from_memory() {
    let root = HostRoot::new("once");
    root.write_config(ID, CONFIG);
    let (mut cache, _) = root.cache(CacheSettings::default());
    let now = Instant::now();
    let first = cache.identity(&container(ID), now);
    assert_eq!(
        attr(&first, semconv::K8S_POD_NAME).as_deref(),
        Some("shop-7d9f")
    );
    assert_eq!(
        attr(&first, semconv::K8S_POD_UID).as_deref(),
        Some("35b82523-06c1-48e7-9e61-2521a89b703b")
    );
    assert_eq!(attr(&first, semconv::CONTAINER_ID).as_deref(), Some(ID));
    assert_eq!(
        attr(&first, semconv::CONTAINER_RUNTIME_NAME).as_deref(),
        Some("docker")
    );
    assert_eq!(attr(&first, semconv::HOST_NAME).as_deref(), Some("node-1"));
    // The files are gone; a hit must not need them.
    std::fs::remove_dir_all(root.container_dir(ID)).expect("remove");
    let second = cache.identity(&container(ID), now + Duration::from_secs(3600));
    assert!(Arc::ptr_eq(&first.resource, &second.resource));
}

#[test]
fn a_failed_lookup_keeps_the_container_id_and_retries_when_the_directory_appears() {
    let root = HostRoot::new("retry");
    let (mut cache, stats) = root.cache(CacheSettings::default());
    let now = Instant::now();
    let missing = cache.identity(&container(ID), now);
    assert_eq!(attr(&missing, semconv::CONTAINER_ID).as_deref(), Some(ID));
    assert_eq!(
        attr(&missing, semconv::K8S_POD_UID).as_deref(),
        Some("from-the-path")
    );
    assert_eq!(attr(&missing, semconv::K8S_POD_NAME), None);
    // Within the retry time, no new read (and no new failure).
    cache.identity(&container(ID), now + Duration::from_secs(1));
    assert_eq!(failures(&stats).get("not_found"), Some(&1));
    root.write_config(ID, CONFIG);
    cache.container_created(ID, now + Duration::from_secs(2));
    let found = cache.identity(&container(ID), now + Duration::from_secs(2));
    assert_eq!(
        attr(&found, semconv::K8S_POD_NAME).as_deref(),
        Some("shop-7d9f")
    );
}

#[test]
fn broken_and_oversized_files_are_counted_not_fatal() {
    let root = HostRoot::new("broken");
    let (mut cache, stats) = root.cache(CacheSettings::default());
    let now = Instant::now();
    let broken = "b".repeat(64);
    root.write_config(&broken, &CONFIG[..CONFIG.len() / 3]);
    let big = "c".repeat(64);
    root.write_config(
        &big,
        &vec![b' '; (runtime::MAX_METADATA_BYTES + 1) as usize],
    );
    for id in [&broken, &big] {
        let identity = cache.identity(&container(id), now);
        assert_eq!(
            attr(&identity, semconv::CONTAINER_ID).as_deref(),
            Some(id.as_str())
        );
    }
    let counted = failures(&stats);
    assert_eq!(counted.get("malformed"), Some(&1));
    assert_eq!(counted.get("too_large"), Some(&1));
}

#[test]
fn removed_containers_go_after_the_grace_time_and_the_size_is_bounded() {
    let root = HostRoot::new("bounded");
    let settings = CacheSettings {
        capacity: 2,
        removal_grace: Duration::from_secs(60),
        ..Default::default()
    };
    let (mut cache, stats) = root.cache(settings);
    let now = Instant::now();
    for (i, id) in ["1", "2", "3"].iter().map(|c| c.repeat(64)).enumerate() {
        cache.identity(&container(&id), now + Duration::from_secs(i as u64));
    }
    assert_eq!(cache.len(), 2);
    assert_eq!(
        stats
            .snapshot_user()
            .enrichment_events
            .get("container_cache_evicted"),
        Some(&1),
        "each eviction is counted"
    );
    let id = "3".repeat(64);
    cache.container_removed(&id, now);
    cache.sweep(now + Duration::from_secs(59));
    assert_eq!(cache.len(), 2);
    cache.sweep(now + Duration::from_secs(61));
    assert_eq!(cache.len(), 1);
}

#[test]
fn metadata_read_at_creation_serves_a_container_whose_files_are_gone() {
    let host = HostRoot::new("prefill");
    let (mut cache, stats) = host.cache(CacheSettings::default());
    let now = Instant::now();
    host.write_config(ID, CONFIG);
    let (files, _) = RuntimeFiles::discover(Path::new(&host.0), &Default::default());
    let metadata = files.lookup(ID, None).expect("the fixture reads");
    cache.prefill(ID.to_owned(), &metadata, now);
    std::fs::remove_dir_all(host.container_dir(ID)).expect("files gone");
    let identity = cache.identity(&container(ID), now);
    assert_eq!(attr(&identity, semconv::K8S_POD_NAME), metadata.pod_name);
    assert!(metadata.pod_name.is_some());
    assert!(failures(&stats).is_empty(), "no lookup failed");
    assert_eq!(
        stats
            .snapshot_user()
            .enrichment_events
            .get("container_read_at_creation"),
        Some(&1)
    );
}

#[test]
fn a_container_already_known_keeps_its_entry_when_read_at_creation() {
    let host = HostRoot::new("prefill-known");
    let (mut cache, _) = host.cache(CacheSettings::default());
    let now = Instant::now();
    host.write_config(ID, CONFIG);
    let first = cache.identity(&container(ID), now);
    let other = runtime::ContainerMetadata {
        pod_name: Some("another".into()),
        ..Default::default()
    };
    cache.prefill(ID.to_owned(), &other, now);
    let again = cache.identity(&container(ID), now);
    assert!(Arc::ptr_eq(&first.resource, &again.resource));
}

#[test]
fn a_container_removed_before_its_metadata_read_is_still_swept() {
    let host = HostRoot::new("prefill-removed");
    let settings = CacheSettings::default();
    let grace = settings.removal_grace;
    let (mut cache, _) = host.cache(settings);
    let now = Instant::now();
    // A failed lookup (no files yet), then its removal, then the read made at creation.
    cache.identity(&container(ID), now);
    cache.container_removed(ID, now);
    let metadata = runtime::ContainerMetadata {
        pod_name: Some("short-lived".into()),
        ..Default::default()
    };
    cache.prefill(ID.to_owned(), &metadata, now);
    assert_eq!(cache.len(), 1);
    cache.sweep(now + grace + Duration::from_secs(1));
    assert!(
        cache.is_empty(),
        "the removal seen before the read still ends the entry"
    );
}
