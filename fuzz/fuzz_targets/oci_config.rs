//! OCI bundle config.json (containerd) and CRI-O's userdata/config.json.
#![no_main]

use egress_collector::enrich::runtime::{containerd, crio, oci::OciSpec};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = containerd::parse(data);
    let _ = crio::parse(data);
    if let Ok(spec) = OciSpec::parse(data) {
        let _ = spec.shares_host_network();
        let _ = spec.annotation("io.kubernetes.cri.sandbox-name");
    }
});
