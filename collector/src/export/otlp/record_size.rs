//! What a record costs a backend that bills ingested bytes: bytes per log record of each
//! attribute set, as the exporter encodes them (`logs_request`, 512 records a request,
//! the transport's gzip level), over varied records like a busy node's: many pods in
//! several namespaces, several processes each, hundreds of destinations, random
//! ephemeral ports and ids. Identical records would compress to almost nothing.
//!
//! `cargo test -p egress-collector --lib record_size -- --nocapture` prints the table;
//! with `EGRESS_RECORD_SIZE_REPORT=BENCHMARKS.md` it also replaces the report's
//! `record-size` section (the `<!-- section:… -->` markers `egress-bench run` keeps).

use std::{collections::BTreeMap, io::Write, sync::Arc};

use egress_shared::EventKind;
use opentelemetry_semantic_conventions::attribute as semconv;
use prost::Message;

use super::mapping::logs_request;
use crate::{
    dns::cache::{Match, ServerName},
    enrich::{Record, Resource},
    events::{
        Connection, Transport,
        decode::{Cgroup, Namespaces, Process},
        outcome::{ConnectionState, Outcome},
    },
    export::attributes::{AttributeSet, of},
};

/// xorshift64*: deterministic, so the figures are the same on every run.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn hex(&mut self, len: usize) -> String {
        (0..len)
            .map(|_| char::from_digit(self.below(16) as u32, 16).unwrap_or('0'))
            .collect()
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

struct Pod {
    resource: Arc<Resource>,
    processes: Vec<Process>,
    namespaces: Namespaces,
    cgroup: Cgroup,
    cgroup_path: String,
    address: String,
}

fn pods(random: &mut Random, count: usize) -> Vec<Pod> {
    let namespaces = [
        "payments",
        "checkout",
        "search",
        "ledger",
        "kube-system",
        "monitoring",
    ];
    let apps = [
        ("api", &["python3", "gunicorn"][..]),
        ("worker", &["java"][..]),
        ("frontend", &["node", "nginx"][..]),
        ("gateway", &["envoy", "pilot-agent"][..]),
        ("exporter", &["prometheus-expo"][..]),
        ("cron", &["sh", "curl", "aws"][..]),
    ];
    let node = "ip-10-0-12-34.eu-west-1.compute.internal";
    (0..count)
        .map(|i| {
            let namespace = namespaces[i % namespaces.len()];
            let (app, commands) = apps[random.below(apps.len() as u64) as usize];
            let pod_name = format!("{app}-{}-{}", random.hex(10), random.hex(5));
            let uid = format!(
                "{}-{}-{}-{}-{}",
                random.hex(8),
                random.hex(4),
                random.hex(4),
                random.hex(4),
                random.hex(12)
            );
            let container_id = random.hex(64);
            let mut attributes = BTreeMap::new();
            for (key, value) in [
                (semconv::HOST_NAME, node.to_owned()),
                (semconv::K8S_NODE_NAME, node.to_owned()),
                (semconv::K8S_NAMESPACE_NAME, namespace.to_owned()),
                (semconv::K8S_POD_NAME, pod_name.clone()),
                (semconv::K8S_POD_UID, uid.clone()),
                (semconv::K8S_CONTAINER_NAME, app.to_owned()),
                (semconv::CONTAINER_ID, container_id.clone()),
                (semconv::CONTAINER_NAME, app.to_owned()),
                (
                    semconv::CONTAINER_IMAGE_NAME,
                    format!("registry.example.com/{namespace}/{app}"),
                ),
                (semconv::CONTAINER_RUNTIME_NAME, "containerd".to_owned()),
            ] {
                attributes.insert(key, value);
            }
            let processes = commands
                .iter()
                .map(|name| {
                    let pid = 1000 + random.below(4_000_000) as u32;
                    Process {
                        pid,
                        tid: pid + random.below(64) as u32,
                        parent_pid: pid.saturating_sub(1 + random.below(50) as u32),
                        vpid: 1 + random.below(40) as u32,
                        uid: [0, 1000, 65532][random.below(3) as usize],
                        gid: [0, 1000, 65532][random.below(3) as usize],
                        name: (*name).into(),
                        thread_name: random
                            .pick(&[name, "tokio-runtime-w", "http-nio-8080-e", "grpc-default-e"])
                            .into(),
                    }
                })
                .collect();
            let inode = |random: &mut Random| 4_026_531_840 + random.below(200_000) as u32;
            let slice = format!("kubepods-burstable-pod{}.slice", uid.replace('-', "_"));
            let scope = format!("cri-containerd-{container_id}.scope");
            Pod {
                resource: Arc::new(Resource { attributes }),
                processes,
                namespaces: Namespaces {
                    net: inode(random),
                    uts: inode(random),
                    mnt: inode(random),
                    pid: inode(random),
                    ipc: inode(random),
                    cgroup: inode(random),
                },
                cgroup: Cgroup {
                    id: 10_000 + random.below(2_000_000),
                    leaf_id: 10_000 + random.below(2_000_000),
                    leaf_name: scope.as_str().into(),
                    parent_name: slice.as_str().into(),
                },
                cgroup_path: format!("/kubepods.slice/kubepods-burstable.slice/{slice}/{scope}"),
                address: format!("10.244.{}.{}", random.below(16), 2 + random.below(250)),
                // The UTS nodename is the pod's name.
            }
        })
        .collect()
}

/// `count` records of `pods`, interleaved as a node's traffic is.
fn records(random: &mut Random, pods: &[Pod], count: usize) -> Vec<Record> {
    // Public and in-cluster destinations, each with its usual port and transport.
    let destinations: Vec<(String, u16, Transport)> = (0..300)
        .map(|i| match i % 10 {
            0..=4 => (
                format!(
                    "{}.{}.{}.{}",
                    [52, 54, 104, 140, 151, 35][random.below(6) as usize],
                    random.below(256),
                    random.below(256),
                    1 + random.below(254)
                ),
                [443, 443, 443, 80][random.below(4) as usize],
                Transport::Tcp,
            ),
            5..=7 => (
                format!("10.96.{}.{}", random.below(256), 1 + random.below(254)),
                [5432, 6379, 9092, 8080, 443][random.below(5) as usize],
                Transport::Tcp,
            ),
            8 => ("10.96.0.10".to_owned(), 53, Transport::Udp),
            _ => (
                format!(
                    "2600:1f18:{:x}::{:x}",
                    random.below(65536),
                    random.below(65536)
                ),
                443,
                Transport::Tcp,
            ),
        })
        .collect();
    let start = 1_764_000_000_000_000_000u64;
    (0..count)
        .map(|i| {
            let pod = &pods[random.below(pods.len() as u64) as usize];
            let process = &pod.processes[random.below(pod.processes.len() as u64) as usize];
            let (address, port, transport) =
                &destinations[random.below(destinations.len() as u64) as usize];
            let destination = if address.contains(':') {
                format!("[{address}]:{port}")
            } else {
                format!("{address}:{port}")
            };
            let source = if address.contains(':') {
                format!(
                    "[fd00:10:244::{:x}]:{}",
                    random.below(65536),
                    32768 + random.below(28232)
                )
            } else {
                format!("{}:{}", pod.address, 32768 + random.below(28232))
            };
            Record {
                connection: Connection {
                    time_unix_nano: start + i as u64 * 1_000_000 + random.below(1_000_000),
                    kind: match transport {
                        Transport::Tcp => EventKind::TcpConnect,
                        Transport::Udp => EventKind::UdpSend,
                    },
                    transport: *transport,
                    source: source.parse().expect("source address"),
                    destination: destination.parse().expect("destination address"),
                    process: process.clone(),
                    namespaces: pod.namespaces,
                    nodename: pod.resource.attributes[semconv::K8S_POD_NAME]
                        .as_str()
                        .into(),
                    cgroup: pod.cgroup.clone(),
                    rate_limited_before: 0,
                    count: 1,
                    aggregate: None,
                    // TCP records carry how the attempt went, as they do now.
                    outcome: (*transport == Transport::Tcp).then(|| Outcome {
                        state: ConnectionState::Established,
                        error_type: None,
                        handshake_ns: 200_000 + random.below(50_000_000),
                        syn_retransmits: 0,
                        sock_id: random.below(u64::MAX),
                        connect_boot_ns: start,
                    }),
                    close: None,
                    delivery: crate::events::Delivery::Both,
                    // Names as the DNS capture gives them: most destinations were resolved.
                    server: (random.below(4) != 0).then(|| ServerName {
                        name: format!(
                            "api-{}.service{}.example.com",
                            random.below(40),
                            random.below(8)
                        )
                        .into(),
                        cname_chain: Arc::from([]),
                        matched: Match::Container,
                    }),
                    dns: None,
                    dns_sock: 0,
                    udp_bytes: None,
                },
                resource: Arc::clone(&pod.resource),
                host_network: false,
                cgroup_path: Some(pod.cgroup_path.as_str().into()),
            }
        })
        .collect()
}

/// Bytes per record, (protobuf, gzip), over requests of `batch` records.
fn bytes_per_record(records: &[Record], batch: usize, set: AttributeSet) -> (f64, f64) {
    let (mut raw, mut gzip) = (0usize, 0usize);
    for chunk in records.chunks(batch) {
        let encoded = logs_request(chunk, 1_764_000_100_000_000_000, set).encode_to_vec();
        // The transport's level (transport.rs).
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(&encoded).expect("gzip");
        gzip += encoder.finish().expect("gzip").len();
        raw += encoded.len();
    }
    let n = records.len() as f64;
    (raw as f64 / n, gzip as f64 / n)
}

#[test]
fn record_size_per_attribute_set() {
    const RECORDS: usize = 51_200;
    let mut random = Random(0x9e37_79b9_7f4a_7c15);
    let pods = pods(&mut random, 40);
    let records = records(&mut random, &pods, RECORDS);
    let mut table = String::from(
        "| attribute set | attributes per record | protobuf bytes/record | gzip bytes/record | GB/day at 1k records/s (protobuf / gzip) |\n\
         |---|---|---|---|---|\n",
    );
    let mut previous = (0.0, 0.0);
    for set in [
        AttributeSet::Minimal,
        AttributeSet::Default,
        AttributeSet::Full,
    ] {
        let (raw, gzip) = bytes_per_record(&records, 512, set);
        let attributes = of(&records[0])
            .iter()
            .filter(|(key, _)| set.keeps(key))
            .count();
        let per_day = |bytes: f64| bytes * 1000.0 * 86_400.0 / 1e9;
        table.push_str(&format!(
            "| `{}` | {attributes} | {raw:.0} | {gzip:.0} | {:.1} / {:.1} |\n",
            set.as_str(),
            per_day(raw),
            per_day(gzip)
        ));
        assert!(
            raw > previous.0 && gzip > previous.1,
            "each set costs more than the smaller one"
        );
        assert!(gzip < raw, "gzip shrinks varied records too");
        previous = (raw, gzip);
    }
    println!("{table}");
    if let Ok(path) = std::env::var("EGRESS_RECORD_SIZE_REPORT") {
        put_section(
            std::path::Path::new(&path),
            &format!("{SECTION_TEXT}\n{table}"),
        );
    }
}

const SECTION_TEXT: &str = "## Bytes per record, by attribute set\n\n\
    Generated by `EGRESS_RECORD_SIZE_REPORT=BENCHMARKS.md cargo test -p egress-collector --lib record_size`.\n\n\
    What a backend that bills ingested bytes counts: OTLP log records as the exporter\n\
    encodes them (`--attributes minimal|default|full`), 512 to a request, gzip at the\n\
    transport's level, over 51,200 varied records (40 pods in 6 namespaces, 1-3\n\
    processes each, 300 destinations, random ephemeral ports, ids and pids). Every record\n\
    carries its one-line body (about 80 bytes before compression) whatever the set; the\n\
    resource (pod, container, node) is sent once per pod per request and is included.\n";

/// Replaces (or appends) the `record-size` section of the report at `path`.
fn put_section(path: &std::path::Path, body: &str) {
    let (open, close) = (
        "<!-- section:record-size -->",
        "<!-- /section:record-size -->",
    );
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let section = format!("{open}\n{}\n{close}", body.trim_end());
    let new = match (old.find(open), old.find(close)) {
        (Some(start), Some(end)) if start < end => {
            format!("{}{section}{}", &old[..start], &old[end + close.len()..])
        }
        _ => format!("{}\n{section}\n", old.trim_end()),
    };
    std::fs::write(path, new).expect("write the report");
}
