//! A container in a connect loop must not blind the collector to the others: the kernel's
//! per-cgroup rate limit drops and counts its excess, its records carry the count, and a
//! quiet container next to it is reported in full.

mod support;

use std::{path::Path, time::Duration};

use egress_testkit::{
    collector::RunningCollector,
    docker::{self, Container, Pod},
};
use serde_json::Value;
use support::host::{require_root, sink_port};

const COLLECTOR: &str = env!("CARGO_BIN_EXE_egress-collector");

#[test]
fn a_flooding_container_is_limited_and_counted_while_a_quiet_one_is_reported_in_full() {
    require_root();
    docker::ensure_image().expect("test image");
    let gateway = docker::bridge_gateway().expect("gateway");
    let (noisy_port, quiet_port) = (sink_port(), sink_port());
    const QUIET: u32 = 20;
    // Four connect loops in parallel, as fast as the shell forks (the image has only sh,
    // nc, sleep: no clock, so the count is fixed).
    const WORKERS: u64 = 4;
    const PER_WORKER: u64 = 150;
    let noisy_script = format!(
        "w=0; while [ $w -lt {WORKERS} ]; do (i=0; while [ $i -lt {PER_WORKER} ]; do \
         nc -w 1 {gateway} {noisy_port} </dev/null; i=$((i+1)); done) & w=$((w+1)); done; wait"
    );
    let quiet_script = format!(
        "i=0; while [ $i -lt {QUIET} ]; do nc -w 1 {gateway} {quiet_port} </dev/null; \
         sleep 0.2; i=$((i+1)); done"
    );
    let noisy_pod = Pod::new("flood", "load", "loop", Some("besteffort"), 41);
    let quiet_pod = Pod::new("calm", "shop", "web", Some("burstable"), 42);
    let noisy = Container::create(&noisy_pod, &noisy_script).expect("create noisy");
    let quiet = Container::create(&quiet_pod, &quiet_script).expect("create quiet");

    // A limit low enough that the loop exceeds it many times over.
    let collector = RunningCollector::start(
        Path::new(COLLECTOR),
        &["--cgroup-rate-limit", "20", "--cgroup-burst", "20"],
        Duration::from_secs(60),
    )
    .expect("collector starts");
    let quiet_run = std::thread::spawn(move || {
        quiet.run_to_completion().expect("quiet runs");
        quiet
    });
    noisy.run_to_completion().expect("noisy runs");
    let _quiet = quiet_run.join().expect("quiet thread");
    std::thread::sleep(Duration::from_millis(500));
    let (ok, stdout, stderr) = collector
        .stop(Duration::from_secs(30))
        .expect("collector stops");
    assert!(ok, "collector failed:\n{}", stderr.join("\n"));

    let attempts = WORKERS * PER_WORKER;
    let records: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let to = |port: u16| -> Vec<&Value> {
        records
            .iter()
            .filter(|r| r["attributes"]["destination.port"] == port)
            .collect()
    };
    let (noisy_records, quiet_records) = (to(noisy_port), to(quiet_port));
    assert_eq!(
        quiet_records.len() as u32,
        QUIET,
        "every connection of the quiet container is reported"
    );
    assert!(
        quiet_records
            .iter()
            .all(|r| r["resource"]["k8s.pod.name"] == quiet_pod.name.as_str()),
        "and attributed to its pod"
    );
    let carried: u64 = noisy_records
        .iter()
        .filter_map(|r| r["attributes"]["egress.rate_limited.before"].as_u64())
        .sum();
    let seen = noisy_records.len() as u64;
    let limited_total = stderr
        .iter()
        .rev()
        .find(|l| l.contains("Collector statistics.") || l.contains("Events were lost"))
        .and_then(|l| l.split("rate_limited=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.trim_matches('"').parse::<u64>().ok())
        .unwrap_or_else(|| panic!("rate_limited in the statistics:\n{}", stderr.join("\n")));
    eprintln!(
        "noisy: {attempts} attempts, {seen} reported, {carried} carried on records, {limited_total} counted"
    );
    assert!(
        seen < attempts,
        "the limit held the loop back ({seen} of {attempts})"
    );
    assert!(carried > 0, "records carry the drops before them");
    // Every attempt is a record, a drop carried on a later record, or a counted drop.
    assert!(
        seen + carried <= attempts && attempts <= seen + limited_total,
        "seen {seen} + carried {carried} <= attempts {attempts} <= seen + counted {limited_total}"
    );
}
