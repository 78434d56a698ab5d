//! The collector with only CAP_BPF and CAP_PERFMON (every other capability dropped, as the
//! DaemonSet runs it) still captures and attributes; and it leaves nothing loaded behind.

mod support;

use std::{path::Path, time::Duration};

use egress_testkit::{
    collector::RunningCollector,
    docker::{self, Container, Pod},
};
use serde_json::Value;
use support::host::{
    ensure_tracefs, our_programs, our_programs_settled_at, require_root, sink_port,
};

const COLLECTOR: &str = env!("CARGO_BIN_EXE_egress-collector");

/// Effective capabilities of `pid`, as the hex mask in /proc.
fn effective_caps(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .expect("CapEff")
}

const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

#[test]
fn bpf_and_perfmon_are_enough_and_nothing_stays_attached() {
    require_root();
    ensure_tracefs();
    docker::ensure_image().expect("test image");
    let gateway = docker::bridge_gateway().expect("gateway");
    let port = sink_port();
    let pod = Pod::new("audited", "secure", "app", Some("burstable"), 51);
    let container = Container::create(
        &pod,
        &format!("nc -w 1 {gateway} {port} </dev/null; nc -w 1 {gateway} {port} </dev/null"),
    )
    .expect("create");

    let before = our_programs();
    let collector = RunningCollector::start_wrapped(
        &[
            "setpriv",
            "--inh-caps=-all",
            "--ambient-caps=-all",
            "--bounding-set=-all,+bpf,+perfmon",
            "--",
        ],
        Path::new(COLLECTOR),
        &["--stdout"],
        Duration::from_secs(60),
    )
    .expect("collector starts with BPF and PERFMON only");
    assert_eq!(
        effective_caps(collector.pid()),
        (1 << CAP_BPF) | (1 << CAP_PERFMON),
        "the collector runs with exactly CAP_BPF and CAP_PERFMON"
    );
    assert!(our_programs() > before, "its programs are loaded");
    container.run_to_completion().expect("container runs");
    std::thread::sleep(Duration::from_millis(500));
    let (ok, stdout, stderr) = collector
        .stop(Duration::from_secs(30))
        .expect("collector stops");
    assert!(ok, "collector failed:\n{}", stderr.join("\n"));

    let records: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .filter(|r: &Value| r["attributes"]["destination.port"] == port)
        .collect();
    assert_eq!(records.len(), 2, "both connections:\n{stdout}");
    for record in &records {
        assert_eq!(record["resource"]["k8s.pod.name"], pod.name.as_str());
        assert_eq!(record["resource"]["container.id"], container.id.as_str());
    }
    assert_eq!(
        our_programs_settled_at(before),
        before,
        "every program is detached and unloaded on exit"
    );
}
