//! `/metrics` on the health address, scraped by a real Prometheus (Debian's `prometheus`,
//! installed by scripts/setup.sh) on loopback, its values read back through the query API.

mod support;

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use egress_testkit::{collector::RunningCollector, ports::unused_port};
use serde_json::Value;
use support::host::{require_root, sink_port};

const COLLECTOR: &str = env!("CARGO_BIN_EXE_egress-collector");
const CONNECTIONS: usize = 25;

/// Status, headers and body of `GET path`.
fn get(port: u16, path: &str) -> Option<(u16, String, String)> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    Some((status, head.to_owned(), body.to_owned()))
}

/// Percent-encodes a PromQL query for a URL.
fn encode(query: &str) -> String {
    query
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"_.-~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The instant vector `query` returns: (labels, value) per series.
fn query(port: u16, promql: &str) -> Vec<(Value, f64)> {
    let path = format!("/api/v1/query?query={}", encode(promql));
    let Some((200, _, body)) = get(port, &path) else {
        return Vec::new();
    };
    let json: Value = serde_json::from_str(&body).expect("query API answers JSON");
    assert_eq!(json["status"], "success", "{body}");
    json["data"]["result"]
        .as_array()
        .map(|series| {
            series
                .iter()
                .map(|s| {
                    let value = s["value"][1]
                        .as_str()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(f64::NAN);
                    (s["metric"].clone(), value)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Prometheus on `port`, scraping `target` every second; killed on drop.
struct Prometheus {
    child: Child,
    dir: PathBuf,
}

impl Prometheus {
    fn start(port: u16, target: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("egress-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: egress-collector\n    \
                 static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("write config");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "prometheus runs: install it with scripts/setup.sh (Debian package prometheus)",
            );
        Self { child, dir }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls until `done` returns a value, or panics after `timeout` with `what`.
fn wait_for<T>(what: &str, timeout: Duration, mut done: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = done() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn a_real_prometheus_scrapes_the_self_metrics() {
    require_root();
    let health_port = unused_port();
    let target = format!("127.0.0.1:{health_port}");
    let collector = RunningCollector::start(
        Path::new(COLLECTOR),
        &["--health-address", &target],
        Duration::from_secs(60),
    )
    .expect("collector starts");

    // The page itself: the text format, counters with _total, reasons as labels.
    let (status, head, text) = get(health_port, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert!(
        text.contains("# TYPE egress_collector_events_captured_total counter"),
        "{text}"
    );
    assert!(
        text.contains("egress_collector_events_lost_total{reason=\"export_queue_full\"} "),
        "{text}"
    );

    let sink = sink_port();
    for _ in 0..CONNECTIONS {
        let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, sink)).expect("connect");
    }

    let prometheus_port = unused_port();
    let _prometheus = Prometheus::start(prometheus_port, &target);
    let up = wait_for(
        "Prometheus to scrape the collector",
        Duration::from_secs(60),
        || {
            query(prometheus_port, "up{job=\"egress-collector\"}")
                .into_iter()
                .find(|(_, v)| *v == 1.0)
        },
    );
    assert_eq!(up.0["instance"], target.as_str());
    // Our connections at least (other processes on the host count too).
    let captured = wait_for(
        "our connections in egress_collector_events_captured_total",
        Duration::from_secs(30),
        || {
            query(prometheus_port, "egress_collector_events_captured_total")
                .into_iter()
                .map(|(_, v)| v)
                .find(|v| *v >= CONNECTIONS as f64)
        },
    );
    let exported = query(prometheus_port, "egress_collector_records_exported_total");
    assert_eq!(exported.len(), 1, "one series: {exported:?}");
    assert!(exported[0].1 <= captured, "exported never exceeds captured");
    let lost = query(prometheus_port, "egress_collector_events_lost_total");
    let reasons: Vec<&str> = lost
        .iter()
        .filter_map(|(labels, _)| labels["reason"].as_str())
        .collect();
    for reason in [
        "kernel_ring_buffer_full",
        "pipeline_queue_full",
        "export_queue_full",
        "export_failed",
    ] {
        assert!(reasons.contains(&reason), "{reason} in {reasons:?}");
    }
    let queue = query(prometheus_port, "egress_collector_queue_length");
    assert_eq!(queue.len(), 1, "the gauge keeps its name: {queue:?}");

    let (ok, _, stderr) = collector
        .stop(Duration::from_secs(30))
        .expect("collector stops");
    assert!(ok, "collector failed:\n{}", stderr.join("\n"));
}
