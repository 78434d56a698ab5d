//! The part of an OCI runtime `config.json` (containerd and CRI-O bundles) we read.

use std::collections::HashMap;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct OciSpec {
    pub hostname: Option<String>,
    pub annotations: HashMap<String, String>,
    pub linux: Option<OciLinux>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct OciLinux {
    pub namespaces: Vec<OciNamespace>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct OciNamespace {
    #[serde(rename = "type")]
    pub kind: String,
    pub path: Option<String>,
}

impl OciSpec {
    pub fn parse(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    pub fn annotation(&self, key: &str) -> Option<String> {
        self.annotations.get(key).filter(|v| !v.is_empty()).cloned()
    }

    /// A container without a network namespace of its own runs in the host's.
    pub fn shares_host_network(&self) -> bool {
        self.linux
            .as_ref()
            .is_some_and(|linux| !linux.namespaces.iter().any(|ns| ns.kind == "network"))
    }
}
