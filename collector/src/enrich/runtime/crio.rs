//! CRI-O: `/run/containers/storage/overlay-containers/<id>/userdata/config.json`, an OCI
//! config whose annotations carry the pod (`io.kubernetes.pod.*`) and CRI-O's own keys.

use std::path::{Path, PathBuf};

use super::{ContainerMetadata, LookupError, Runtime, oci::OciSpec, on_host, read_bounded};

const CONTAINERS_DIR: &str = "/run/containers/storage/overlay-containers";

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
    containers_dir: PathBuf,
}

impl CrioFiles {
    pub fn new(host_root: &Path) -> Self {
        Self {
            containers_dir: on_host(host_root, CONTAINERS_DIR),
        }
    }

    pub fn containers_dir(&self) -> PathBuf {
        self.containers_dir.clone()
    }

    pub fn lookup(&self, id: &str) -> Result<Option<ContainerMetadata>, LookupError> {
        let path = self.containers_dir.join(id).join("userdata/config.json");
        match read_bounded(&path)? {
            Some(bytes) => parse(&bytes)
                .map(Some)
                .map_err(|source| LookupError::Parse {
                    path,
                    runtime: "cri-o",
                    source,
                }),
            None => Ok(None),
        }
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
    fn explicit_false_wins_over_namespaces() {
        let bundle = CRIO_CONTAINER.replace(r#"HostNetwork": "true""#, r#"HostNetwork": "false""#);
        assert!(!parse(bundle.as_bytes()).expect("valid").host_network);
        assert!(parse(b"nope").is_err());
    }
}
