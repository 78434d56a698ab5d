//! CRI-O: `<run root>/overlay-containers/<id>/userdata/config.json` (run root
//! `/run/containers/storage` unless storage.conf moves it), an OCI config whose
//! annotations carry the pod (`io.kubernetes.pod.*`) and CRI-O's own keys. Another
//! storage driver names the directory after itself (`<driver>-containers`).

use std::path::{Path, PathBuf};

use super::{ContainerMetadata, LookupError, Runtime, oci::OciSpec, on_host, read_bounded};

pub const DEFAULT_RUN_ROOT: &str = "/run/containers/storage";
const DEFAULT_DRIVER_DIR: &str = "overlay-containers";

pub fn parse(bytes: &[u8]) -> Result<ContainerMetadata, serde_json::Error> {
    let spec = OciSpec::parse(bytes)?;
    let a = |key: &str| spec.annotation(key);
    let host_network = match a("io.kubernetes.cri-o.HostNetwork").as_deref() {
        Some(value) => value == "true",
        None => spec.shares_host_network(),
    };
    Ok(ContainerMetadata {
        runtime: Some(Runtime::CriO),
        name: a("io.kubernetes.cri-o.Name"),
        image: a("io.kubernetes.cri-o.ImageName").map(|i| super::image_name(&i)),
        pod_name: a("io.kubernetes.pod.name"),
        pod_namespace: a("io.kubernetes.pod.namespace"),
        pod_uid: a("io.kubernetes.pod.uid"),
        container_name: a("io.kubernetes.container.name"),
        host_network,
    })
}

#[derive(Debug, Clone)]
pub struct CrioFiles {
    /// `overlay-containers` first, then any other `<driver>-containers` there was at start.
    containers_dirs: Vec<PathBuf>,
}

impl CrioFiles {
    /// `run_root` as configured (host path); `None` means [`DEFAULT_RUN_ROOT`].
    pub fn new(host_root: &Path, run_root: Option<&Path>) -> Self {
        let run_root = on_host(host_root, run_root.unwrap_or(Path::new(DEFAULT_RUN_ROOT)));
        let mut containers_dirs = vec![run_root.join(DEFAULT_DRIVER_DIR)];
        if let Ok(entries) = std::fs::read_dir(&run_root) {
            let mut others: Vec<PathBuf> = entries
                .flatten()
                .filter(|e| {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    name.ends_with("-containers") && name != DEFAULT_DRIVER_DIR
                })
                .map(|e| e.path())
                .collect();
            others.sort();
            containers_dirs.extend(others);
        }
        Self { containers_dirs }
    }

    pub fn containers_dirs(&self) -> &[PathBuf] {
        &self.containers_dirs
    }

    pub fn lookup(&self, id: &str) -> Result<Option<ContainerMetadata>, LookupError> {
        for dir in &self.containers_dirs {
            let path = dir.join(id).join("userdata/config.json");
            if let Some(bytes) = read_bounded(&path)? {
                return parse(&bytes)
                    .map(Some)
                    .map_err(|source| LookupError::Parse {
                        path,
                        runtime: "cri-o",
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

    // Shaped like CRI-O's userdata/config.json (annotation keys from CRI-O's
    // pkg/annotations and Kubernetes' kubelet types); trimmed.
    const CRIO_CONTAINER: &str = r#"{
      "ociVersion": "1.0.2-dev",
      "hostname": "node-agent-x1",
      "annotations": {
        "io.kubernetes.pod.name": "node-agent-x1",
        "io.kubernetes.pod.namespace": "kube-system",
        "io.kubernetes.pod.uid": "9d1c0f7e-1111-4222-8333-944455556666",
        "io.kubernetes.container.name": "agent",
        "io.kubernetes.cri-o.Name": "k8s_agent_node-agent-x1_kube-system_9d1c0f7e-1111-4222-8333-944455556666_0",
        "io.kubernetes.cri-o.ImageName": "registry.example/agent:3",
        "io.kubernetes.cri-o.HostNetwork": "true",
        "io.kubernetes.cri-o.ContainerType": "container"
      },
      "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}
    }"#;

    #[test]
    fn pod_annotations_and_host_network() {
        let m = parse(CRIO_CONTAINER.as_bytes()).expect("valid");
        assert_eq!(m.runtime, Some(Runtime::CriO));
        assert_eq!(m.pod_name.as_deref(), Some("node-agent-x1"));
        assert_eq!(m.pod_namespace.as_deref(), Some("kube-system"));
        assert_eq!(
            m.pod_uid.as_deref(),
            Some("9d1c0f7e-1111-4222-8333-944455556666")
        );
        assert_eq!(m.container_name.as_deref(), Some("agent"));
        assert_eq!(m.image.as_deref(), Some("registry.example/agent"));
        assert!(m.host_network);
    }

    #[test]
    fn the_run_root_and_storage_driver_directories_are_followed() {
        const ID: &str = "b5fa49123b796b99fe605af0f8d019f3b3a8cb445b529b892e0d3788682469af";
        let root = std::env::temp_dir().join(format!("egress-crio-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let userdata = root
            .join("srv/crio/btrfs-containers")
            .join(ID)
            .join("userdata");
        std::fs::create_dir_all(&userdata).expect("dirs");
        std::fs::write(userdata.join("config.json"), CRIO_CONTAINER).expect("write");
        assert_eq!(
            CrioFiles::new(&root, None).lookup(ID).expect("readable"),
            None
        );
        let files = CrioFiles::new(&root, Some(Path::new("/srv/crio")));
        let m = files.lookup(ID).expect("readable").expect("found");
        assert_eq!(m.pod_name.as_deref(), Some("node-agent-x1"));
        assert_eq!(
            files.containers_dirs(),
            [
                root.join("srv/crio/overlay-containers"),
                root.join("srv/crio/btrfs-containers")
            ]
        );
        std::fs::remove_dir_all(&root).expect("clean up");
    }

    #[test]
    fn explicit_false_wins_over_namespaces() {
        let bundle = CRIO_CONTAINER.replace(r#"HostNetwork": "true""#, r#"HostNetwork": "false""#);
        assert!(!parse(bundle.as_bytes()).expect("valid").host_network);
        assert!(parse(b"nope").is_err());
    }
}
