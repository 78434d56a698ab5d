//! docker: `<data-root>/containers/<id>/config.v2.json` (labels, name, image) and
//! `hostconfig.json` (network mode). The data-root comes from `/etc/docker/daemon.json`
//! (`data-root`, legacy `graph`), default `/var/lib/docker`.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use super::{ContainerMetadata, DiscoveryProblem, LookupError, Runtime, on_host, read_bounded};

pub const DEFAULT_DATA_ROOT: &str = "/var/lib/docker";
const DAEMON_JSON: &str = "/etc/docker/daemon.json";

#[derive(Debug, Default, Deserialize)]
struct DaemonJson {
    #[serde(rename = "data-root")]
    data_root: Option<String>,
    /// Deprecated since docker 17.05; still honoured by older daemons.
    graph: Option<String>,
}

/// The data-root a daemon.json names (host path), or `None` when it names none.
pub fn data_root_from_daemon_json(bytes: &[u8]) -> Result<Option<String>, serde_json::Error> {
    let daemon: DaemonJson = serde_json::from_slice(bytes)?;
    Ok(daemon
        .data_root
        .or(daemon.graph)
        .filter(|p| p.starts_with('/')))
}

/// Only `ID` is required: a file without it is not a container's config.
#[derive(Debug, Deserialize)]
struct ConfigV2 {
    #[serde(rename = "ID")]
    #[allow(dead_code)]
    id: String,
    #[serde(rename = "Name", default)]
    name: String,
    #[serde(rename = "Config", default)]
    config: Config,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Config {
    #[serde(rename = "Image")]
    image: String,
    #[serde(rename = "Labels")]
    labels: Option<HashMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct HostConfig {
    #[serde(rename = "NetworkMode")]
    network_mode: String,
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// Metadata from the bytes of `config.v2.json` and, if present, `hostconfig.json`.
pub fn parse(
    config_v2: &[u8],
    hostconfig: Option<&[u8]>,
) -> Result<ContainerMetadata, serde_json::Error> {
    let config: ConfigV2 = serde_json::from_slice(config_v2)?;
    // A broken hostconfig.json costs only the network mode.
    let network_mode = hostconfig
        .and_then(|bytes| serde_json::from_slice::<HostConfig>(bytes).ok())
        .map(|h| h.network_mode)
        .unwrap_or_default();
    let labels = config.config.labels.unwrap_or_default();
    let label = |key: &str| labels.get(key).filter(|v| !v.is_empty()).cloned();
    Ok(ContainerMetadata {
        runtime: Some(Runtime::Docker),
        name: non_empty(config.name.trim_start_matches('/').to_owned()),
        image: non_empty(super::image_name(&config.config.image)),
        pod_name: label("io.kubernetes.pod.name"),
        pod_namespace: label("io.kubernetes.pod.namespace"),
        pod_uid: label("io.kubernetes.pod.uid"),
        container_name: label("io.kubernetes.container.name"),
        host_network: network_mode == "host",
    })
}

#[derive(Debug, Clone)]
pub struct DockerFiles {
    host_root: PathBuf,
    /// As the host sees it (e.g. `/var/lib/docker`).
    data_root: PathBuf,
}

impl DockerFiles {
    pub fn discover(host_root: &Path) -> (Self, Option<DiscoveryProblem>) {
        let path = on_host(host_root, DAEMON_JSON);
        let problem = |reason: String| DiscoveryProblem {
            path: path.clone(),
            reason,
            default: DEFAULT_DATA_ROOT,
        };
        let (data_root, problem) = match read_bounded(&path) {
            Ok(None) => (None, None),
            Ok(Some(bytes)) => match data_root_from_daemon_json(&bytes) {
                Ok(root) => (root, None),
                Err(e) => (None, Some(problem(format!("not valid JSON ({e})")))),
            },
            Err(e) => (None, Some(problem(e.to_string()))),
        };
        let data_root = PathBuf::from(data_root.unwrap_or_else(|| DEFAULT_DATA_ROOT.to_owned()));
        (
            Self {
                host_root: host_root.to_owned(),
                data_root,
            },
            problem,
        )
    }

    /// A data-root set by configuration (host path): daemon.json is not read.
    pub fn at(host_root: &Path, data_root: &Path) -> Self {
        Self {
            host_root: host_root.to_owned(),
            data_root: data_root.to_owned(),
        }
    }

    pub fn data_root(&self) -> &Path {
        &self.data_root
    }

    pub fn containers_dir(&self) -> PathBuf {
        on_host(&self.host_root, self.data_root.join("containers"))
    }

    pub fn lookup(&self, id: &str) -> Result<Option<ContainerMetadata>, LookupError> {
        let dir = self.containers_dir().join(id);
        let config_path = dir.join("config.v2.json");
        let Some(config) = read_bounded(&config_path)? else {
            return Ok(None);
        };
        let hostconfig = read_bounded(&dir.join("hostconfig.json")).ok().flatten();
        parse(&config, hostconfig.as_deref())
            .map(Some)
            .map_err(|source| LookupError::Parse {
                path: config_path,
                runtime: "docker",
                source,
            })
    }
}

#[cfg(test)]
mod tests;
