//! containerd (CRI): the OCI bundle `config.json` under
//! `<state>/io.containerd.runtime.v2.task/<namespace>/<id>/`, whose annotations the CRI
//! plugin sets (`io.kubernetes.cri.sandbox-name`, `…sandbox-namespace`, `…sandbox-uid`,
//! `…container-name`, `…image-name`). The state directory is `/run/containerd` for a
//! stock containerd and `/run/k3s/containerd` for the one k3s and RKE2 embed.

use std::path::{Path, PathBuf};

use super::{ContainerMetadata, LookupError, Runtime, oci::OciSpec, on_host, read_bounded};

/// containerd's `state` directories: its own default, and k3s's and RKE2's.
pub const DEFAULT_STATE_DIRS: [&str; 2] = ["/run/containerd", "/run/k3s/containerd"];
/// Task directories under a state directory: the v2 shim API, and the v1 one (<1.6).
const TASK_SUBDIRS: [&str; 2] = [
    "io.containerd.runtime.v2.task",
    "io.containerd.runtime.v1.linux",
];
/// Kubernetes' namespace first; docker's own containerd uses `moby`.
pub const DEFAULT_NAMESPACES: [&str; 2] = ["k8s.io", "moby"];

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
    /// `<state>/io.containerd.runtime.v2.task` (and v1) under the host root.
    task_roots: Vec<PathBuf>,
    namespaces: Vec<String>,
}

impl ContainerdFiles {
    /// `state_dirs` and `namespaces` as configured; empty means the defaults.
    pub fn new(host_root: &Path, state_dirs: &[PathBuf], namespaces: &[String]) -> Self {
        let state_dirs: Vec<PathBuf> = if state_dirs.is_empty() {
            DEFAULT_STATE_DIRS.iter().map(PathBuf::from).collect()
        } else {
            state_dirs.to_vec()
        };
        let task_roots = state_dirs
            .iter()
            .flat_map(|state| TASK_SUBDIRS.iter().map(move |sub| state.join(sub)))
            .map(|dir| on_host(host_root, dir))
            .collect();
        let namespaces = if namespaces.is_empty() {
            DEFAULT_NAMESPACES
                .iter()
                .map(|ns| (*ns).to_owned())
                .collect()
        } else {
            namespaces.to_vec()
        };
        Self {
            task_roots,
            namespaces,
        }
    }

    pub fn task_roots(&self) -> &[PathBuf] {
        &self.task_roots
    }

    /// Every namespace directory that exists, preferred ones first, state directory by
    /// state directory.
    pub fn task_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        for root in &self.task_roots {
            for ns in &self.namespaces {
                dirs.push(root.join(ns));
            }
            if let Ok(entries) = std::fs::read_dir(root) {
                for entry in entries.flatten() {
                    let name = entry.file_name();
                    if !self.namespaces.iter().any(|ns| name == ns.as_str()) {
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

    const ID: &str = "b5fa49123b796b99fe605af0f8d019f3b3a8cb445b529b892e0d3788682469af";

    fn host_root(name: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!("egress-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        root
    }

    fn bundle(root: &Path, task_dir: &str, namespace: &str) {
        let dir = on_host(root, task_dir).join(namespace).join(ID);
        std::fs::create_dir_all(&dir).expect("bundle dir");
        std::fs::write(dir.join("config.json"), CRI_CONTAINER).expect("config.json");
    }

    #[test]
    fn k3s_and_rke2_bundles_are_found_without_configuration() {
        let root = host_root("k3s-tasks");
        bundle(
            &root,
            "/run/k3s/containerd/io.containerd.runtime.v2.task",
            "k8s.io",
        );
        let files = ContainerdFiles::new(&root, &[], &[]);
        let m = files.lookup(ID).expect("readable").expect("found");
        assert_eq!(m.pod_name.as_deref(), Some("shop-7d9f"));
        assert_eq!(m.pod_namespace.as_deref(), Some("prod"));
        assert!(files.task_dirs().contains(&on_host(
            &root,
            "/run/k3s/containerd/io.containerd.runtime.v2.task/k8s.io"
        )));
        std::fs::remove_dir_all(&root).expect("clean up");
    }

    #[test]
    fn configured_state_dirs_and_namespaces_replace_the_defaults() {
        let root = host_root("containerd-configured");
        bundle(
            &root,
            "/var/lib/rancher/state/io.containerd.runtime.v2.task",
            "tenant",
        );
        bundle(
            &root,
            "/run/containerd/io.containerd.runtime.v2.task",
            "k8s.io",
        );
        let state = [PathBuf::from("/var/lib/rancher/state")];
        let files = ContainerdFiles::new(&root, &state, &["tenant".to_owned()]);
        assert_eq!(
            files.task_dirs().first(),
            Some(&on_host(
                &root,
                "/var/lib/rancher/state/io.containerd.runtime.v2.task/tenant"
            ))
        );
        assert!(files.lookup(ID).expect("readable").is_some());
        // The default directory is not searched once others are configured.
        std::fs::remove_dir_all(on_host(&root, "/var/lib/rancher")).expect("rm");
        assert_eq!(files.lookup(ID).expect("readable"), None);
        // A namespace not listed is still searched, after the listed ones.
        bundle(
            &root,
            "/var/lib/rancher/state/io.containerd.runtime.v2.task",
            "other",
        );
        assert!(files.lookup(ID).expect("readable").is_some());
        std::fs::remove_dir_all(&root).expect("clean up");
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
