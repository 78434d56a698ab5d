//! Claims about settings and outputs, on the real binary: a container's environment never
//! reaches any output; a flag beats the environment variable for the same setting;
//! `--exclude-loopback` drops loopback destinations (and counts them), nothing else.

mod support;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use egress_testkit::{collector::RunningCollector, docker, ports::unused_port};
use prost::Message;
use support::{
    host::{last_stat, require_root, sink_port},
    receiver::{self, Received, Shared, int_attr, runtime},
};

const COLLECTOR: &str = env!("CARGO_BIN_EXE_egress-collector");
const PASSWORD: &str = "hunter2-db-password-7f3a9c";
const TOKEN: &str = "ghp_s3cretTokenValue0123456789abcdef";

fn docker_cli(args: &[&str]) -> String {
    let output = Command::new("docker").args(args).output().expect("docker");
    assert!(
        output.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Records on stdout to `port`.
fn stdout_records(stdout: &str, port: u16) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["attributes"]["destination.port"] == port)
        .collect()
}

/// Every byte the receiver got, as protobuf.
fn received_bytes(received: &Received) -> Vec<u8> {
    let mut bytes = Vec::new();
    for r in &received.logs {
        bytes.extend(r.encode_to_vec());
    }
    for r in &received.metrics {
        bytes.extend(r.encode_to_vec());
    }
    for r in &received.traces {
        bytes.extend(r.encode_to_vec());
    }
    for (k, v) in &received.headers {
        bytes.extend(k.as_bytes());
        bytes.extend(v.as_bytes());
    }
    bytes
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[test]
fn a_containers_environment_never_appears_in_any_output() {
    require_root();
    docker::ensure_image().expect("test image");
    let rt = runtime();
    let received: Shared = Arc::new(Mutex::new(Received::default()));
    let otlp = rt.block_on(receiver::grpc(
        "127.0.0.1:0".parse().expect("addr"),
        Arc::clone(&received),
    ));
    let endpoint = format!("http://{}", otlp.addr);
    let port = sink_port();
    let gateway = docker::bridge_gateway().expect("gateway");
    // Everything out: records on stdout and OTLP, metrics, the collector's own logs and
    // spans over OTLP too, debug logs on stderr.
    let collector = RunningCollector::start_with(
        Path::new(COLLECTOR),
        &[
            "--stdout",
            "--otlp-endpoint",
            &endpoint,
            "--self-telemetry",
            "--export-interval",
            "1s",
            "--batch-timeout",
            "200ms",
            "--log-level",
            "debug",
        ],
        Duration::from_secs(60),
    )
    .expect("collector starts");
    let pid = std::process::id();
    let name = format!("k8s_app_secrets-{pid}_vault_{pid:08x}-0001-4000-8000-000000000001_0");
    let _ = Command::new("docker").args(["rm", "-f", &name]).output();
    let password = format!("DB_PASSWORD={PASSWORD}");
    let token = format!("API_TOKEN={TOKEN}");
    let pod_name = format!("io.kubernetes.pod.name=secrets-{pid}");
    let pod_uid = format!("io.kubernetes.pod.uid={pid:08x}-0001-4000-8000-000000000001");
    let script =
        format!("echo x | nc -w 2 {gateway} {port}; sleep 3; echo x | nc -w 2 {gateway} {port}");
    let id = docker_cli(&[
        "create",
        "--name",
        &name,
        "--env",
        &password,
        "--env",
        &token,
        "--label",
        &pod_name,
        "--label",
        "io.kubernetes.pod.namespace=vault",
        "--label",
        &pod_uid,
        "--label",
        "io.kubernetes.container.name=app",
        docker::IMAGE,
        "sh",
        "-c",
        &script,
    ]);
    docker_cli(&["start", &id]);
    // The secrets are in the files the collector reads: docker's Config.Env and, while
    // the container runs, the OCI bundle's process.env.
    let config_v2 =
        std::fs::read_to_string(format!("/var/lib/docker/containers/{id}/config.v2.json"))
            .expect("docker's container config");
    assert!(config_v2.contains(PASSWORD) && config_v2.contains(TOKEN));
    // containerd's own state, or dockerd's private containerd (docker 20.10).
    let oci = [
        "/run/containerd/io.containerd.runtime.v2.task/moby",
        "/run/docker/containerd/daemon/io.containerd.runtime.v2.task/moby",
    ]
    .iter()
    .find_map(|dir| std::fs::read_to_string(format!("{dir}/{id}/config.json")).ok())
    .expect("the OCI bundle while it runs");
    assert!(oci.contains(PASSWORD) && oci.contains(TOKEN), "process.env");
    docker_cli(&["wait", &id]);
    std::thread::sleep(Duration::from_secs(2));
    let (ok, stdout, stderr) = collector
        .stop(Duration::from_secs(30))
        .expect("collector stops");
    let _ = Command::new("docker").args(["rm", "-f", &id]).output();
    assert!(ok, "collector failed:\n{}", stderr.join("\n"));

    // The container's records went out, attributed: the files were read.
    let records = stdout_records(&stdout, port);
    assert_eq!(records.len(), 2, "{}", stderr.join("\n"));
    for r in &records {
        assert_eq!(r["resource"]["container.id"], id.as_str());
        assert_eq!(r["resource"]["k8s.pod.name"], format!("secrets-{pid}"));
    }
    let received = received.lock().expect("lock");
    let otlp_records = received
        .log_records()
        .filter(|r| int_attr(&r.attributes, "destination.port") == Some(i64::from(port)))
        .count();
    assert_eq!(otlp_records, 2);
    assert!(!received.metrics.is_empty() && !received.logs.is_empty());
    let bytes = received_bytes(&received);
    let log = stderr.join("\n");
    for secret in [PASSWORD, TOKEN, "DB_PASSWORD", "API_TOKEN"] {
        assert!(!stdout.contains(secret), "{secret} on stdout");
        assert!(!log.contains(secret), "{secret} in the logs");
        assert!(!contains(&bytes, secret), "{secret} over OTLP");
    }
    drop(otlp);
}

#[test]
fn a_flag_beats_the_environment_variable_for_the_same_setting() {
    require_root();
    let rt = runtime();
    let received: Shared = Arc::new(Mutex::new(Received::default()));
    let otlp = rt.block_on(receiver::grpc(
        "127.0.0.1:0".parse().expect("addr"),
        Arc::clone(&received),
    ));
    // Nothing listens there.
    let dead = unused_port();
    let endpoint = format!("http://{}", otlp.addr);
    let collector = RunningCollector::start_wrapped(
        &[
            "env",
            &format!("OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:{dead}"),
            "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf",
            "EGRESS_EXCLUDE_LOOPBACK=true",
            "EGRESS_LOG_FORMAT=json",
        ],
        Path::new(COLLECTOR),
        &[
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            "grpc",
            "--exclude-loopback=false",
            "--log-format",
            "text",
            "--batch-timeout",
            "200ms",
        ],
        Duration::from_secs(60),
    )
    .expect("collector starts");
    let port = sink_port();
    drop(TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("connect"));
    std::thread::sleep(Duration::from_secs(2));
    let (ok, _, stderr) = collector
        .stop(Duration::from_secs(30))
        .expect("collector stops");
    let log = stderr.join("\n");
    assert!(ok, "{log}");
    assert!(
        stderr.iter().all(|l| !l.starts_with('{')),
        "--log-format text beats EGRESS_LOG_FORMAT:\n{log}"
    );
    let arrived = received
        .lock()
        .expect("lock")
        .log_records()
        .filter(|r| int_attr(&r.attributes, "destination.port") == Some(i64::from(port)))
        .count();
    assert_eq!(
        arrived, 1,
        "--otlp-endpoint and --otlp-protocol beat OTEL_EXPORTER_OTLP_*, and \
         --exclude-loopback=false beats EGRESS_EXCLUDE_LOOPBACK:\n{log}"
    );
    drop(otlp);
}

/// An address of this host that is not loopback (the docker bridge's gateway).
fn host_address() -> IpAddr {
    docker::bridge_gateway()
        .expect("gateway")
        .parse()
        .expect("an address")
}

#[test]
fn exclude_loopback_drops_loopback_destinations_and_counts_them_and_nothing_else() {
    require_root();
    let v4 = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("listen");
    let port = v4.local_addr().expect("addr").port();
    // Another port than the IPv4 one (the kernel may give the same number to both
    // families): records are told apart by it.
    let (v6, port6) = loop {
        let v6 = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).expect("listen on ::1");
        let port6 = v6.local_addr().expect("addr").port();
        if port6 != port {
            break (v6, port6);
        }
    };
    for listener in [v4, v6] {
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                drop(stream);
            }
        });
    }
    let collector = RunningCollector::start(
        Path::new(COLLECTOR),
        &["--exclude-loopback", "--stats-interval", "1h"],
        Duration::from_secs(60),
    )
    .expect("collector starts");
    const N: usize = 10;
    let outside = SocketAddr::new(host_address(), port);
    for _ in 0..N {
        drop(TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("127.0.0.1"));
        drop(TcpStream::connect((Ipv4Addr::new(127, 0, 0, 2), port)).expect("127.0.0.2"));
        drop(TcpStream::connect((Ipv6Addr::LOCALHOST, port6)).expect("::1"));
        drop(TcpStream::connect(outside).expect("the host's own address"));
    }
    std::thread::sleep(Duration::from_millis(500));
    let (ok, stdout, stderr) = collector
        .stop(Duration::from_secs(30))
        .expect("collector stops");
    let log = stderr.join("\n");
    assert!(ok, "{log}");
    let to_port = stdout_records(&stdout, port);
    let destinations: Vec<&str> = to_port
        .iter()
        .filter_map(|r| r["attributes"]["destination.address"].as_str())
        .collect();
    assert_eq!(
        destinations.len(),
        N,
        "only the non-loopback connections: {destinations:?}"
    );
    let outside_ip = outside.ip().to_string();
    assert!(
        destinations.iter().all(|d| *d == outside_ip),
        "{destinations:?}"
    );
    assert!(
        stdout_records(&stdout, port6).is_empty(),
        "::1 is loopback too"
    );
    let filtered = last_stat(&stderr, "filtered").expect("the kernel's filtered counter");
    assert!(
        filtered >= 3 * N as u64,
        "every dropped connection is counted filtered ({filtered}):\n{log}"
    );
}
