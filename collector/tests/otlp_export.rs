//! OTLP export end to end: the real collector, real containers, a real OTLP receiver on
//! loopback (gRPC and HTTP/protobuf, gzip, headers), and an endpoint that goes away.

mod support;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use egress_testkit::{
    collector::RunningCollector,
    docker::{self, Container, Pod},
    otlp_run::{OtlpRun, Protocol},
    ports::unused_port,
};
use opentelemetry_proto::tonic::{
    common::v1::any_value::Value as V,
    metrics::v1::{metric::Data, number_data_point},
};
use support::{
    host::{require_root, sink_port},
    receiver::{self, Received, Shared, int_attr, resource_attributes, runtime, str_attr},
};

const COLLECTOR: &str = env!("CARGO_BIN_EXE_egress-collector");
const TENANT: &str = "egress-e2e";

/// Log records to `port`, by the `k8s.pod.name` of their resource (one entry per record).
fn logs_by_pod(received: &Received, port: u16) -> BTreeMap<String, Vec<BTreeMap<String, String>>> {
    let mut by_pod: BTreeMap<String, Vec<BTreeMap<String, String>>> = BTreeMap::new();
    for request in &received.logs {
        for rl in &request.resource_logs {
            let resource = resource_attributes(&rl.resource);
            let pod = str_attr(resource, "k8s.pod.name").unwrap_or_default();
            for sl in &rl.scope_logs {
                for log in &sl.log_records {
                    if int_attr(&log.attributes, "destination.port") == Some(i64::from(port)) {
                        assert_eq!(log.event_name, "egress.connection");
                        // The body is the line Loki shows, built from the same attributes.
                        let body = match log.body.as_ref().and_then(|b| b.value.as_ref()) {
                            Some(V::StringValue(s)) => s.clone(),
                            other => panic!("the body is a string, got {other:?}"),
                        };
                        let want = format!(
                            "{}/{pod} ({}) nc[{}] → {}:{port} tcp established",
                            str_attr(resource, "k8s.namespace.name").unwrap_or_default(),
                            str_attr(resource, "k8s.container.name").unwrap_or_default(),
                            int_attr(&log.attributes, "process.pid").unwrap_or_default(),
                            str_attr(&log.attributes, "destination.address").unwrap_or_default(),
                        );
                        assert_eq!(body, want);
                        assert!(
                            str_attr(&log.attributes, "thread.name").is_none()
                                && int_attr(&log.attributes, "egress.namespace.net").is_none(),
                            "the default attribute set leaves the forensic fields out"
                        );
                        let resource_map = resource
                            .iter()
                            .filter_map(|kv| {
                                str_attr(resource, &kv.key).map(|v| (kv.key.clone(), v))
                            })
                            .collect();
                        by_pod.entry(pod.clone()).or_default().push(resource_map);
                    }
                }
            }
        }
    }
    by_pod
}

/// The last exported cumulative `egress.connections` to `port`, by pod.
fn connection_sums(received: &Received, port: u16) -> BTreeMap<String, i64> {
    let mut sums = BTreeMap::new();
    for request in &received.metrics {
        for rm in &request.resource_metrics {
            let resource = resource_attributes(&rm.resource);
            let Some(pod) = str_attr(resource, "k8s.pod.name") else {
                continue;
            };
            for metric in rm.scope_metrics.iter().flat_map(|sm| &sm.metrics) {
                let (true, Some(Data::Sum(sum))) =
                    (metric.name == "egress.connections", &metric.data)
                else {
                    continue;
                };
                let total: i64 = sum
                    .data_points
                    .iter()
                    .filter(|p| {
                        int_attr(&p.attributes, "destination.port") == Some(i64::from(port))
                    })
                    .filter_map(|p| match p.value {
                        Some(number_data_point::Value::AsInt(v)) => Some(v),
                        _ => None,
                    })
                    .sum();
                sums.insert(pod.clone(), total);
            }
        }
    }
    sums
}

/// The last value of a health metric (summed over the points matching `reason`).
fn health(received: &Received, name: &str, reason: Option<&str>) -> Option<i64> {
    let mut last = None;
    for request in &received.metrics {
        for rm in &request.resource_metrics {
            let resource = resource_attributes(&rm.resource);
            if str_attr(resource, "service.name").as_deref() != Some("egress-collector") {
                continue;
            }
            for metric in rm
                .scope_metrics
                .iter()
                .flat_map(|sm| &sm.metrics)
                .filter(|m| m.name == name)
            {
                let points = match &metric.data {
                    Some(Data::Sum(s)) => &s.data_points,
                    Some(Data::Gauge(g)) => &g.data_points,
                    _ => continue,
                };
                let value = points
                    .iter()
                    .filter(|p| {
                        reason
                            .is_none_or(|r| str_attr(&p.attributes, "reason").as_deref() == Some(r))
                    })
                    .filter_map(|p| match p.value {
                        Some(number_data_point::Value::AsInt(v)) => Some(v),
                        _ => None,
                    })
                    .sum();
                last = Some(value);
            }
        }
    }
    last
}

fn two_pods_connect(port: u16, per_pod: u32) -> [(Pod, Container); 2] {
    docker::ensure_image().expect("test image");
    let gateway = docker::bridge_gateway().expect("gateway");
    let script = format!(
        "i=0; while [ $i -lt {per_pod} ]; do echo x | nc -w 2 {gateway} {port}; i=$((i+1)); done"
    );
    let pods = [
        Pod::new("checkout", "shop", "api", Some("burstable"), 21),
        Pod::new("ledger", "bank", "worker", Some("besteffort"), 22),
    ];
    pods.map(|pod| {
        let container = Container::create(&pod, &script).expect("docker create");
        (pod, container)
    })
}

fn two_containers_to_otlp(protocol: Protocol) {
    require_root();
    const PER_POD: u32 = 5;
    let port = sink_port();
    let pods = two_pods_connect(port, PER_POD);
    let run = OtlpRun::start_serving(
        protocol,
        Path::new(COLLECTOR),
        &[
            "--otlp-protocol",
            protocol.flag(),
            "--otlp-compression",
            "gzip",
            "--otlp-header",
            &format!("x-tenant={TENANT}"),
        ],
    );
    for (_, container) in &pods {
        container.run_to_completion().expect("container runs");
    }
    std::thread::sleep(Duration::from_millis(1500));
    let finished = run.stop();
    let (received, stderr) = (finished.received, finished.stderr);
    assert!(
        finished.stdout.is_empty(),
        "with an endpoint, stdout stays empty unless --stdout"
    );

    let logs = logs_by_pod(&received, port);
    assert_eq!(
        logs.len(),
        2,
        "two resources; stderr:\n{}",
        stderr.join("\n")
    );
    for (pod, container) in &pods {
        let records = logs
            .get(&pod.name)
            .unwrap_or_else(|| panic!("no records for {}", pod.name));
        assert_eq!(records.len(), PER_POD as usize, "{}", pod.name);
        for resource in records {
            assert_eq!(resource.get("k8s.namespace.name"), Some(&pod.namespace));
            assert_eq!(resource.get("k8s.pod.uid"), Some(&pod.uid));
            assert_eq!(resource.get("container.id"), Some(&container.id));
            assert_eq!(resource.get("k8s.container.name"), Some(&pod.container));
            assert!(
                resource.get("service.name").is_none(),
                "the collector's identity is not the workload's"
            );
        }
    }
    let sums = connection_sums(&received, port);
    for (pod, _) in &pods {
        assert_eq!(
            sums.get(&pod.name),
            Some(&i64::from(PER_POD)),
            "egress.connections of {}",
            pod.name
        );
    }
    let tenant_seen = received
        .headers
        .iter()
        .any(|(k, v)| k == "x-tenant" && v == TENANT);
    assert!(tenant_seen, "the custom header reached the receiver");
    let gzip_seen = received
        .headers
        .iter()
        .any(|(k, v)| (k == "grpc-encoding" || k == "content-encoding") && v == "gzip");
    assert!(gzip_seen, "requests were gzip-compressed");
    assert!(health(&received, "egress_collector.events.captured", None).is_some_and(|n| n >= 10));
    assert!(
        health(
            &received,
            "egress_collector.events.possibly_lost",
            Some("program_recursion_miss")
        )
        .is_some_and(|n| n >= 0),
        "the programs' recursion misses are exported as possible loss"
    );
}

#[test]
fn grpc_two_containers_arrive_under_their_resources() {
    two_containers_to_otlp(Protocol::Grpc);
}

#[test]
fn http_protobuf_two_containers_arrive_under_their_resources() {
    two_containers_to_otlp(Protocol::HttpProtobuf);
}

/// Connections from this process to `port`; returns their source ports.
fn connect_times(port: u16, n: usize) -> Vec<u16> {
    (0..n)
        .map(|_| {
            let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("connect");
            stream.local_addr().expect("addr").port()
        })
        .collect()
}

fn source_ports_received(received: &Received, port: u16) -> Vec<u16> {
    received
        .log_records()
        .filter(|l| int_attr(&l.attributes, "destination.port") == Some(i64::from(port)))
        .filter(|l| int_attr(&l.attributes, "process.pid") == Some(i64::from(std::process::id())))
        .filter_map(|l| int_attr(&l.attributes, "source.port").map(|p| p as u16))
        .collect()
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_outage_loses_nothing_within_the_queue_bound_and_counts_what_it_drops() {
    require_root();
    const QUEUE: usize = 60;
    let rt = runtime();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, unused_port()));
    let collector = RunningCollector::start_with(
        Path::new(COLLECTOR),
        &[
            "--otlp-endpoint",
            &format!("http://{addr}"),
            "--export-interval",
            "1s",
            "--batch-size",
            "10",
            "--batch-timeout",
            "100ms",
            "--queue-records",
            &QUEUE.to_string(),
        ],
        Duration::from_secs(60),
    )
    .expect("collector starts");
    let port = sink_port();
    let received: Shared = Arc::new(Mutex::new(Received::default()));

    // Phase 1: the endpoint is down while 30 connections happen; all arrive once it is up.
    let first = connect_times(port, 30);
    std::thread::sleep(Duration::from_secs(2));
    let receiver = rt.block_on(receiver::grpc(addr, Arc::clone(&received)));
    wait_for("the queued records", Duration::from_secs(60), || {
        source_ports_received(&received.lock().expect("lock"), port).len() >= first.len()
    });
    let mut got = source_ports_received(&received.lock().expect("lock"), port);
    got.sort_unstable();
    let mut want = first.clone();
    want.sort_unstable();
    assert_eq!(
        got, want,
        "every record captured during the outage arrives, once"
    );

    // Phase 2: down again, and more connections than the queue holds.
    drop(receiver);
    std::thread::sleep(Duration::from_millis(500));
    let second = connect_times(port, 3 * QUEUE);
    std::thread::sleep(Duration::from_secs(2));
    let _receiver = rt.block_on(receiver::grpc(addr, Arc::clone(&received)));
    std::thread::sleep(Duration::from_secs(1));
    let (ok, _, stderr) = collector
        .stop(Duration::from_secs(30))
        .expect("collector stops");
    assert!(ok, "collector failed:\n{}", stderr.join("\n"));

    let received = received.lock().expect("lock");
    let arrived: Vec<u16> = source_ports_received(&received, port)
        .into_iter()
        .filter(|p| second.contains(p))
        .collect();
    let dropped = health(
        &received,
        "egress_collector.events.lost",
        Some("export_queue_full"),
    )
    .expect("lost metric");
    assert!(
        arrived.len() <= QUEUE,
        "no more than the queue holds survives: {}",
        arrived.len()
    );
    assert!(dropped > 0, "the drop counter says records were dropped");
    // Other processes on the host may share the queue, so the drop count covers at least ours.
    assert!(
        arrived.len() as i64 + dropped >= second.len() as i64,
        "arrived {} + dropped {dropped} < {}",
        arrived.len(),
        second.len()
    );
    // Conservation: every captured record was exported or counted as lost.
    let captured = health(&received, "egress_collector.events.captured", None).expect("captured");
    let exported = health(&received, "egress_collector.records.exported", None).expect("exported");
    let lost = health(&received, "egress_collector.events.lost", None).expect("lost");
    // What the kernel could not hand over (another process's flood on a shared host) was
    // lost before capture: not part of this balance.
    let before_capture: i64 = [
        "kernel_ring_buffer_full",
        "kernel_state_map_full",
        "cgroup_rate_limited",
    ]
    .into_iter()
    .filter_map(|reason| health(&received, "egress_collector.events.lost", Some(reason)))
    .sum();
    assert_eq!(
        captured,
        exported + lost - before_capture,
        "captured {captured} = exported {exported} + lost {lost} - lost before capture {before_capture}"
    );
}
