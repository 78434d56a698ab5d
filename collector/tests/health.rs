//! `--health-address`: the endpoints kubelet probes, on the real collector.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpStream},
    path::Path,
    process::Command,
    time::Duration,
};

use egress_testkit::{collector::RunningCollector, ports::unused_port};

const COLLECTOR: &str = env!("CARGO_BIN_EXE_egress-collector");

/// Status code and body of `GET path`.
fn get(port: u16, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn health_and_readiness_are_served_and_a_taken_address_fails_the_start() {
    // SAFETY: trivial getter.
    assert_eq!(unsafe { libc::geteuid() }, 0, "run as root: loads eBPF");
    let port = unused_port();
    let address = format!("127.0.0.1:{port}");
    let collector = RunningCollector::start(
        Path::new(COLLECTOR),
        &["--health-address", &address],
        Duration::from_secs(60),
    )
    .expect("collector starts");

    let (status, body) = get(port, "/readyz");
    assert_eq!(status, 200, "ready once capturing: {body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(json["status"], "ok");
    assert!(json["probe"].is_string(), "names the hook mode: {body}");
    assert!(
        ["tp_btf", "raw_tracepoint", "tracepoint"]
            .contains(&json["tcp_state"].as_str().unwrap_or("")),
        "names the program that follows TCP state changes: {body}"
    );
    assert_eq!(get(port, "/healthz").0, 200);
    assert_eq!(get(port, "/nothing").0, 404);

    // A second collector on the same address stops at start, in one line, attaching nothing.
    let second = Command::new(COLLECTOR)
        .args(["run", "--stdout", "--health-address", &address])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success());
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("egress-collector: error:") && last.contains(&address),
        "one-line error naming the address, got:\n{stderr}"
    );

    let (ok, _, stderr) = collector
        .stop(Duration::from_secs(30))
        .expect("collector stops");
    assert!(ok, "collector failed:\n{}", stderr.join("\n"));
}
