//! Container id -> workload identity, read once per container from the runtime's files.
//! A hit does no file I/O. The cache is bounded; failed lookups are retried later (or at
//! once when the container's directory appears) and logged once per container.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Instant,
};

use opentelemetry_semantic_conventions::attribute as semconv;

use super::{
    Resource,
    container_ref::ContainerRef,
    runtime::{ContainerMetadata, RuntimeFiles},
};
use crate::config::settings::CacheSettings;
use crate::telemetry::enrich::{EnrichEvent, EnrichTelemetry};

/// What the pipeline attaches to each connection of one container.
#[derive(Debug, Clone)]
pub struct Identity {
    pub resource: Arc<Resource>,
    /// The runtime runs the container in the host's network namespace.
    pub host_network: bool,
}

struct Entry {
    identity: Identity,
    last_used: Instant,
    /// When a failed lookup may be tried again; `None` once metadata was found.
    retry_at: Option<Instant>,
    failure_logged: bool,
    removed_at: Option<Instant>,
}

pub struct ContainerCache {
    files: RuntimeFiles,
    host: BTreeMap<&'static str, String>,
    settings: CacheSettings,
    entries: HashMap<String, Entry>,
    telemetry: EnrichTelemetry,
}

fn resource_of(
    host: &BTreeMap<&'static str, String>,
    container: &ContainerRef,
    metadata: Option<&ContainerMetadata>,
) -> Resource {
    let mut attributes = host.clone();
    attributes.insert(semconv::CONTAINER_ID, container.id.clone());
    let mut put = |key: &'static str, value: Option<&String>| {
        if let Some(value) = value {
            attributes.insert(key, value.clone());
        }
    };
    if let Some(m) = metadata {
        put(semconv::CONTAINER_NAME, m.name.as_ref());
        put(semconv::CONTAINER_IMAGE_NAME, m.image.as_ref());
        put(semconv::K8S_POD_NAME, m.pod_name.as_ref());
        put(semconv::K8S_NAMESPACE_NAME, m.pod_namespace.as_ref());
        put(semconv::K8S_CONTAINER_NAME, m.container_name.as_ref());
        put(
            semconv::K8S_POD_UID,
            m.pod_uid.as_ref().or(container.pod_uid.as_ref()),
        );
        if let Some(runtime) = m.runtime {
            attributes.insert(semconv::CONTAINER_RUNTIME_NAME, runtime.as_str().to_owned());
        }
    } else {
        put(semconv::K8S_POD_UID, container.pod_uid.as_ref());
    }
    Resource { attributes }
}

impl ContainerCache {
    pub fn new(
        files: RuntimeFiles,
        host: BTreeMap<&'static str, String>,
        settings: CacheSettings,
        telemetry: EnrichTelemetry,
    ) -> Self {
        Self {
            files,
            host,
            settings,
            entries: HashMap::new(),
            telemetry,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn identity(&mut self, container: &ContainerRef, now: Instant) -> Identity {
        let mut failure_logged = false;
        if let Some(entry) = self.entries.get_mut(&container.id) {
            if entry.retry_at.is_none_or(|at| now < at) {
                entry.last_used = now;
                return entry.identity.clone();
            }
            failure_logged = entry.failure_logged;
        }
        let (identity, retry_at) = match self.files.lookup(&container.id, container.runtime_hint) {
            Ok(metadata) => {
                let resource = resource_of(&self.host, container, Some(&metadata));
                (
                    Identity {
                        resource: Arc::new(resource),
                        host_network: metadata.host_network,
                    },
                    None,
                )
            }
            Err(e) => {
                self.telemetry.emit(EnrichEvent::LookupFailed {
                    reason: e.reason(),
                    container: &container.id,
                    error: &e,
                    first: !failure_logged,
                });
                failure_logged = true;
                let resource = resource_of(&self.host, container, None);
                (
                    Identity {
                        resource: Arc::new(resource),
                        host_network: false,
                    },
                    Some(now + self.settings.retry_after),
                )
            }
        };
        if self.entries.len() >= self.settings.capacity && !self.entries.contains_key(&container.id)
        {
            self.evict_least_recently_used();
        }
        self.entries.insert(
            container.id.clone(),
            Entry {
                identity: identity.clone(),
                last_used: now,
                retry_at,
                failure_logged,
                removed_at: None,
            },
        );
        identity
    }

    /// A new container's metadata, read as its directory appeared (`watch`): cached
    /// before its first connection, so a container whose files are gone by the time its
    /// records are enriched is still attributed. A container already known keeps its entry.
    pub fn prefill(&mut self, id: String, metadata: &ContainerMetadata, now: Instant) {
        let removed_at = match self.entries.get(&id) {
            Some(entry) if entry.retry_at.is_none() => return,
            // A failed lookup's entry: its removal, if seen, still counts for the sweep.
            Some(entry) => entry.removed_at,
            None => None,
        };
        let container = ContainerRef {
            id,
            runtime_hint: None,
            pod_uid: None,
        };
        let identity = Identity {
            resource: Arc::new(resource_of(&self.host, &container, Some(metadata))),
            host_network: metadata.host_network,
        };
        if self.entries.len() >= self.settings.capacity && !self.entries.contains_key(&container.id)
        {
            self.evict_least_recently_used();
        }
        self.entries.insert(
            container.id,
            Entry {
                identity,
                last_used: now,
                retry_at: None,
                failure_logged: false,
                removed_at,
            },
        );
        self.telemetry.emit(EnrichEvent::ContainerReadAtCreation);
    }

    fn evict_least_recently_used(&mut self) {
        let oldest = self
            .entries
            .iter()
            .min_by_key(|(_, e)| e.last_used)
            .map(|(id, _)| id.clone());
        if let Some(id) = oldest {
            self.entries.remove(&id);
            self.telemetry.emit(EnrichEvent::ContainerCacheEvicted);
        }
    }

    /// A container directory appeared: a failed lookup for it is retried at the next event.
    pub fn container_created(&mut self, id: &str, now: Instant) {
        if let Some(entry) = self.entries.get_mut(id) {
            entry.removed_at = None;
            if entry.retry_at.is_some() {
                entry.retry_at = Some(now);
            }
        }
    }

    /// A container directory went away: forget it after the grace time.
    pub fn container_removed(&mut self, id: &str, now: Instant) {
        if let Some(entry) = self.entries.get_mut(id) {
            entry.removed_at.get_or_insert(now);
        }
    }

    /// Drops the containers removed longer than the grace time ago.
    pub fn sweep(&mut self, now: Instant) {
        let grace = self.settings.removal_grace;
        self.entries
            .retain(|_, e| e.removed_at.is_none_or(|at| now.duration_since(at) < grace));
    }
}

#[cfg(test)]
mod tests;
