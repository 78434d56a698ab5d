//! containerd (CRI): the OCI bundle `config.json` under
//! `/run/containerd/io.containerd.runtime.v2.task/<namespace>/<id>/`, whose annotations the
//! CRI plugin sets (`io.kubernetes.cri.sandbox-name`, `…sandbox-namespace`, `…sandbox-uid`,
//! `…container-name`, `…image-name`).

use std::path::{Path, PathBuf};

use super::{ContainerMetadata, LookupError, Runtime, oci::OciSpec, on_host, read_bounded};

const TASK_DIRS: [&str; 2] = [
    "/run/containerd/io.containerd.runtime.v2.task",
    "/run/containerd/io.containerd.runtime.v1.linux",
];
/// Kubernetes' namespace first; docker's own containerd uses `moby`.
const PREFERRED_NAMESPACES: [&str; 2] = ["k8s.io", "moby"];

pub fn parse(bytes: &[u8]) -> Result<ContainerMetadata, serde_json::Error> {
    let spec = OciSpec::parse(bytes)?;
    let a = |key: &str| spec.annotation(key);
    Ok(ContainerMetadata {
        runtime: Some(Runtime::Containerd),
        name: a("io.kubernetes.cri.container-name"),
        image: a("io.kubernetes.cri.image-name").map(|i| super::image_name(&i)),
        pod_name: a("io.kubernetes.cri.sandbox-name"),
        pod_namespace: a("io.kubernetes.cri.sandbox-namespace"),
        pod_uid: a("io.kubernetes.cri.sandbox-uid"),
        container_name: a("io.kubernetes.cri.container-name"),
        host_network: spec.shares_host_network(),
    })
}

#[derive(Debug, Clone)]
pub struct ContainerdFiles {
    task_dirs: Vec<PathBuf>,
}

impl ContainerdFiles {
    pub fn new(host_root: &Path) -> Self {
        Self {
            task_dirs: TASK_DIRS.iter().map(|d| on_host(host_root, d)).collect(),
        }
    }

    /// Every namespace directory that exists, preferred ones first.
    pub fn task_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        for root in &self.task_dirs {
            for ns in PREFERRED_NAMESPACES {
                dirs.push(root.join(ns));
            }
            if let Ok(entries) = std::fs::read_dir(root) {
                for entry in entries.flatten() {
                    let name = entry.file_name();
                    if !PREFERRED_NAMESPACES.iter().any(|ns| name == *ns) {
                        dirs.push(entry.path());
                    }
                }
            }
        }
        dirs
    }

    pub fn lookup(&self, id: &str) -> Result<Option<ContainerMetadata>, LookupError> {
        for dir in self.task_dirs() {
            let path = dir.join(id).join("config.json");
            if let Some(bytes) = read_bounded(&path)? {
                return parse(&bytes)
                    .map(Some)
                    .map_err(|source| LookupError::Parse {
                        path,
                        runtime: "containerd",
                        source,
                    });
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Shaped like the bundle config.json containerd's CRI plugin writes for a pod's
    // container (annotation keys from containerd's pkg/cri/annotations); trimmed.
    const CRI_CONTAINER: &str = r#"{
      "ociVersion": "1.1.0",
      "process": {"args": ["/app"], "cwd": "/"},
      "hostname": "shop-7d9f",
      "annotations": {
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.container-name": "web",
        "io.kubernetes.cri.image-name": "registry.example/shop:1.2",
        "io.kubernetes.cri.sandbox-id": "5f0c1e0b0c0d4f9a8e2b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f",
        "io.kubernetes.cri.sandbox-name": "shop-7d9f",
        "io.kubernetes.cri.sandbox-namespace": "prod",
        "io.kubernetes.cri.sandbox-uid": "35b82523-06c1-48e7-9e61-2521a89b703b"
      },
      "linux": {"namespaces": [
        {"type": "pid"}, {"type": "ipc", "path": "/proc/4242/ns/ipc"},
        {"type": "uts", "path": "/proc/4242/ns/uts"}, {"type": "mount"},
        {"type": "network", "path": "/proc/4242/ns/net"}
      ]}
    }"#;

    #[test]
    fn cri_annotations_give_the_pod() {
        let m = parse(CRI_CONTAINER.as_bytes()).expect("valid");
        assert_eq!(m.runtime, Some(Runtime::Containerd));
        assert_eq!(m.pod_name.as_deref(), Some("shop-7d9f"));
        assert_eq!(m.pod_namespace.as_deref(), Some("prod"));
        assert_eq!(
            m.pod_uid.as_deref(),
            Some("35b82523-06c1-48e7-9e61-2521a89b703b")
        );
        assert_eq!(m.container_name.as_deref(), Some("web"));
        assert_eq!(m.image.as_deref(), Some("registry.example/shop"));
        assert!(!m.host_network);
    }

    #[test]
    fn no_network_namespace_means_host_network() {
        let host = CRI_CONTAINER.replace(
            r#",
        {"type": "network", "path": "/proc/4242/ns/net"}"#,
            "",
        );
        assert!(parse(host.as_bytes()).expect("valid").host_network);
    }

    #[test]
    fn a_bundle_without_kubernetes_annotations_is_still_a_container() {
        let m = parse(br#"{"ociVersion":"1.0.2","linux":{"namespaces":[{"type":"network"}]}}"#)
            .expect("valid");
        assert_eq!(m.runtime, Some(Runtime::Containerd));
        assert_eq!(m.pod_name, None);
        assert!(parse(b"{\"annotations\": 7}").is_err());
        assert!(parse(&CRI_CONTAINER.as_bytes()[..40]).is_err());
    }
}
