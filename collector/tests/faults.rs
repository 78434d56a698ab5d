//! Faults around the collector's own life: a restart loses none of the connections made
//! while it ran and leaves nothing loaded; bad configuration stops it at start, in one
//! line naming the setting, before anything is attached.

mod support;

use std::{
    net::{Ipv4Addr, TcpStream},
    path::Path,
    process::Command,
    time::Duration,
};

use egress_testkit::collector::RunningCollector;
use support::host::{our_programs, our_programs_settled_at, require_root, sink_port};

const COLLECTOR: &str = env!("CARGO_BIN_EXE_egress-collector");

/// Connects `n` times to `port`; returns the source ports used.
fn connect(port: u16, n: usize) -> Vec<u64> {
    (0..n)
        .map(|_| {
            let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("connect");
            u64::from(stream.local_addr().expect("addr").port())
        })
        .collect()
}

fn source_ports(stdout: &str, port: u16) -> Vec<u64> {
    let mut ports: Vec<u64> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["attributes"]["destination.port"] == port)
        .filter_map(|r| r["attributes"]["source.port"].as_u64())
        .collect();
    ports.sort_unstable();
    ports
}

#[test]
fn a_restart_loses_no_connection_made_while_running_and_leaves_nothing_loaded() {
    require_root();
    let port = sink_port();
    let before = our_programs();
    for round in 0..2 {
        let collector = RunningCollector::start(Path::new(COLLECTOR), &[], Duration::from_secs(60))
            .expect("collector starts");
        let mut made = connect(port, 25);
        made.sort_unstable();
        // SIGTERM right away: what was captured must still be drained and written.
        let (ok, stdout, stderr) = collector
            .terminate(Duration::from_secs(30))
            .expect("collector stops");
        assert!(
            ok,
            "round {round}: collector failed:\n{}",
            stderr.join("\n")
        );
        let seen: Vec<u64> = source_ports(&stdout, port)
            .into_iter()
            .filter(|p| made.contains(p))
            .collect();
        assert_eq!(
            seen, made,
            "round {round}: every connection made while it ran, once"
        );
        assert_eq!(
            our_programs_settled_at(before),
            before,
            "round {round}: nothing stays loaded after exit"
        );
    }
}

#[test]
fn bad_configuration_fails_in_one_line_naming_the_setting_and_attaches_nothing() {
    require_root();
    let dir = std::env::temp_dir().join(format!("egress-bad-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let garbage = dir.join("garbage.toml");
    std::fs::write(&garbage, "[otlp\nendpoint = ").expect("write");
    let unknown = dir.join("unknown.toml");
    std::fs::write(&unknown, "[otlp]\nendpoit = \"http://x:4317\"\n").expect("write");
    // (flags, environment, the setting the error must name)
    type Case<'a> = (Vec<String>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec![
                "--otlp-endpoint=http://x:4317".into(),
                "--otlp-compression=zstd".into(),
            ],
            vec![],
            "--otlp-compression",
        ),
        (
            vec![],
            vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://x:4318"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ],
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
        (
            vec![],
            vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://collector")],
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ),
        (
            vec![format!("--config={}", garbage.display())],
            vec![],
            "garbage.toml",
        ),
        (
            vec![format!("--config={}", unknown.display())],
            vec![],
            "endpoit",
        ),
        (
            vec!["--ring-buffer-bytes=5000".into()],
            vec![],
            "--ring-buffer-bytes",
        ),
        (
            vec!["--cgroup-burst=4294967295".into()],
            vec![],
            "--cgroup-burst",
        ),
        (
            vec![],
            vec![("EGRESS_CGROUP_RATE_LIMIT", "2000000")],
            "--cgroup-rate-limit",
        ),
        (
            vec!["--health-address=everywhere".into()],
            vec![],
            "--health-address",
        ),
    ];
    let before = our_programs();
    for (args, env, setting) in cases {
        let output = Command::new(COLLECTOR)
            .arg("run")
            .args(&args)
            .envs(env.iter().copied())
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success(),
            "{args:?} {env:?} must fail:\n{stderr}"
        );
        let first = stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        assert!(
            first.contains("error") && first.contains(setting),
            "{args:?} {env:?}: the first line names {setting}:\n{stderr}"
        );
        assert!(
            !stderr.contains("panicked"),
            "{args:?} {env:?}: no panic:\n{stderr}"
        );
        assert!(
            !stderr.contains("Capturing egress connections."),
            "{args:?} {env:?}: nothing attached:\n{stderr}"
        );
        assert_eq!(
            our_programs_settled_at(before),
            before,
            "{args:?} {env:?}: nothing loaded"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
