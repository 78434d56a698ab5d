//! Container metadata from the container runtime's own files, found under the host root.
//! No runtime API and no API server: docker's `config.v2.json`, containerd's and CRI-O's
//! OCI `config.json`. The runtime is detected per container.

pub mod containerd;
pub mod crio;
pub mod docker;
pub mod oci;

use std::{
    io::Read,
    path::{Path, PathBuf},
};

use super::container_ref::RuntimeHint;
use crate::config::settings::RuntimeLocations;

/// Metadata files larger than this are refused (a real config.v2.json is a few KiB).
pub const MAX_METADATA_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    Docker,
    Containerd,
    CriO,
}

impl Runtime {
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Docker => "docker",
            Runtime::Containerd => "containerd",
            Runtime::CriO => "cri-o",
        }
    }
}

/// What the runtime's files say about a container and its pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerMetadata {
    pub runtime: Option<Runtime>,
    pub name: Option<String>,
    pub image: Option<String>,
    pub pod_name: Option<String>,
    pub pod_namespace: Option<String>,
    pub pod_uid: Option<String>,
    pub container_name: Option<String>,
    /// The container shares the host's network namespace (`hostNetwork: true`).
    pub host_network: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("no runtime has metadata for container {id}")]
    NotFound { id: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is larger than {MAX_METADATA_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("{path} is not valid {runtime} metadata: {source}")]
    Parse {
        path: PathBuf,
        runtime: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

impl LookupError {
    /// A short label for counting by reason.
    pub fn reason(&self) -> &'static str {
        match self {
            LookupError::NotFound { .. } => "not_found",
            LookupError::Read { .. } => "unreadable",
            LookupError::TooLarge { .. } => "too_large",
            LookupError::Parse { .. } => "malformed",
        }
    }
}

/// `container.image.name` is the image without tag or digest:
/// `registry:5000/team/app:1.2@sha256:…` -> `registry:5000/team/app`.
pub fn image_name(reference: &str) -> String {
    let without_digest = reference.split('@').next().unwrap_or(reference);
    let last_slash = without_digest.rfind('/').map_or(0, |i| i + 1);
    match without_digest[last_slash..].find(':') {
        Some(colon) => without_digest[..last_slash + colon].to_owned(),
        None => without_digest.to_owned(),
    }
}

/// Reads at most [`MAX_METADATA_BYTES`]; `Ok(None)` when the file does not exist.
pub fn read_bounded(path: &Path) -> Result<Option<Vec<u8>>, LookupError> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(LookupError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    let mut bytes = Vec::new();
    file.take(MAX_METADATA_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| LookupError::Read {
            path: path.to_owned(),
            source,
        })?;
    if bytes.len() as u64 > MAX_METADATA_BYTES {
        return Err(LookupError::TooLarge {
            path: path.to_owned(),
        });
    }
    Ok(Some(bytes))
}

/// `path` (absolute on the host) under the host root.
pub fn on_host(host_root: &Path, path: impl AsRef<Path>) -> PathBuf {
    let path = path.as_ref();
    host_root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Where each runtime keeps its files on this host.
#[derive(Debug, Clone)]
pub struct RuntimeFiles {
    docker: docker::DockerFiles,
    containerd: containerd::ContainerdFiles,
    crio: crio::CrioFiles,
}

/// A problem found while discovering the runtimes; the collector goes on with defaults.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}; using the default docker data-root {default}")]
pub struct DiscoveryProblem {
    pub path: PathBuf,
    pub reason: String,
    pub default: &'static str,
}

impl RuntimeFiles {
    pub fn discover(
        host_root: &Path,
        locations: &RuntimeLocations,
    ) -> (Self, Option<DiscoveryProblem>) {
        let (docker, problem) = match &locations.docker_data_root {
            Some(data_root) => (docker::DockerFiles::at(host_root, data_root), None),
            None => docker::DockerFiles::discover(host_root),
        };
        let files = Self {
            docker,
            containerd: containerd::ContainerdFiles::new(
                host_root,
                &locations.containerd_state_dirs,
                &locations.containerd_namespaces,
            ),
            crio: crio::CrioFiles::new(host_root, locations.crio_run_root.as_deref()),
        };
        (files, problem)
    }

    /// Metadata of container `id`, asking the runtime the cgroup named first. Once per
    /// container (the cache keeps the answer), so a span each is cheap.
    #[tracing::instrument(name = "container.metadata.lookup", skip(self, hint), fields(container.id = id))]
    pub fn lookup(
        &self,
        id: &str,
        hint: Option<RuntimeHint>,
    ) -> Result<ContainerMetadata, LookupError> {
        let order: [Runtime; 3] = match hint {
            Some(RuntimeHint::Containerd) => [Runtime::Containerd, Runtime::Docker, Runtime::CriO],
            Some(RuntimeHint::CriO) | Some(RuntimeHint::Podman) => {
                [Runtime::CriO, Runtime::Containerd, Runtime::Docker]
            }
            Some(RuntimeHint::Docker) | None => {
                [Runtime::Docker, Runtime::Containerd, Runtime::CriO]
            }
        };
        for runtime in order {
            let found = match runtime {
                Runtime::Docker => self.docker.lookup(id)?,
                Runtime::Containerd => self.containerd.lookup(id)?,
                Runtime::CriO => self.crio.lookup(id)?,
            };
            if let Some(metadata) = found {
                return Ok(metadata);
            }
        }
        Err(LookupError::NotFound { id: id.to_owned() })
    }

    /// Directories whose entries appear and disappear with containers.
    pub fn watched_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = vec![self.docker.containers_dir()];
        dirs.extend(self.containerd.task_dirs());
        dirs.extend(self.crio.containers_dirs().iter().cloned());
        dirs
    }

    /// containerd's task directories (every state directory's), for the start-up log.
    pub fn containerd_task_roots(&self) -> &[PathBuf] {
        self.containerd.task_roots()
    }

    pub fn docker_data_root(&self) -> &Path {
        self.docker.data_root()
    }
}

#[cfg(test)]
mod tests {
    use super::image_name;

    #[test]
    fn image_names_lose_tag_and_digest_but_keep_the_registry_port() {
        assert_eq!(
            image_name("egress-test/busybox:latest"),
            "egress-test/busybox"
        );
        assert_eq!(image_name("busybox"), "busybox");
        assert_eq!(
            image_name("registry:5000/team/app:1.2"),
            "registry:5000/team/app"
        );
        assert_eq!(
            image_name("registry:5000/team/app"),
            "registry:5000/team/app"
        );
        assert_eq!(image_name("app@sha256:abcd"), "app");
        assert_eq!(image_name("r.io/app:1@sha256:abcd"), "r.io/app");
    }
}

#[cfg(test)]
mod fuzz {
    use crate::mutate::mutations;

    const DOCKER: &[u8] = include_bytes!("fixtures/docker-config.v2.json");
    const HOSTCONFIG: &[u8] = include_bytes!("fixtures/docker-hostconfig.json");
    const OCI: &[u8] = br#"{"annotations":{"io.kubernetes.pod.name":"p","io.kubernetes.cri.sandbox-name":"p"},"linux":{"namespaces":[{"type":"network"}]}}"#;

    #[test]
    fn metadata_parsers_never_panic() {
        for input in mutations(DOCKER, 20_000) {
            let _ = super::docker::parse(&input, Some(HOSTCONFIG));
            let _ = super::docker::parse(DOCKER, Some(&input));
        }
        for input in mutations(OCI, 20_000) {
            let _ = super::containerd::parse(&input);
            let _ = super::crio::parse(&input);
        }
        for input in mutations(br#"{"data-root":"/srv/docker","graph":"/old"}"#, 20_000) {
            let _ = super::docker::data_root_from_daemon_json(&input);
        }
        for input in mutations(b"registry:5000/team/app:1.2@sha256:abcd", 20_000) {
            let _ = super::image_name(&String::from_utf8_lossy(&input));
        }
    }
}
