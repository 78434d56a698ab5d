//! Cgroup paths and leaf names as the kernel and cgroupfs give them.
#![no_main]

use egress_collector::enrich::container_ref;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Some(found) = container_ref::parse(&text) {
        // A container id found in a path is always one of its segments' content.
        let _ = format!("{found:?}");
    }
    let _ = container_ref::container_id_of_leaf(&text);
});
