//! docker's daemon.json, config.v2.json and hostconfig.json: an error, never a panic.
#![no_main]

use egress_collector::enrich::runtime::docker;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = docker::data_root_from_daemon_json(data);
    // The same bytes as config.v2.json, and split in two as config + hostconfig.
    let _ = docker::parse(data, None);
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let (config, rest) = data.split_at(split);
    if let Ok(metadata) = docker::parse(config, Some(rest)) {
        // Whatever the labels held, the metadata serialises back to valid JSON.
        let _ = format!("{metadata:?}");
    }
});
