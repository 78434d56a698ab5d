//! /proc/cgroups and /proc/self/mountinfo, split at the first NUL of the input.
#![no_main]

use egress_collector::probe::cgroups;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (proc_cgroups, mountinfo) = text.split_once('\0').unwrap_or((&text, ""));
    let _ = cgroups::v1_controllers(proc_cgroups);
    let _ = cgroups::has_cgroup2_mount(mountinfo);
    let _ = cgroups::hierarchy_mount(mountinfo, Some("memory"));
    let _ = cgroups::classify(proc_cgroups, mountinfo);
});
