//! An event becomes exactly the expected log record, resource and data points.

use std::collections::BTreeMap;

use egress_shared::EventKind;
use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value::Value as V};

use super::*;
use crate::events::{
    Connection, Transport,
    decode::{Cgroup, Namespaces, Process},
};

pub(crate) fn connection(port: u16) -> Connection {
    Connection {
        time_unix_nano: 1_700_000_000_000_000_000,
        kind: EventKind::TcpConnect,
        transport: Transport::Tcp,
        source: "10.0.0.2:40000".parse().expect("addr"),
        destination: format!("93.184.216.34:{port}").parse().expect("addr"),
        process: Process {
            pid: 42,
            tid: 43,
            parent_pid: 1,
            vpid: 7,
            uid: 1000,
            gid: 1000,
            name: "curl".into(),
            thread_name: "curl".into(),
        },
        namespaces: Namespaces {
            net: 11,
            uts: 12,
            mnt: 13,
            pid: 14,
            ipc: 15,
            cgroup: 16,
        },
        nodename: "shop-7d9f".into(),
        cgroup: Cgroup {
            id: 99,
            leaf_id: 100,
            leaf_name: "abc".into(),
            parent_name: "podx".into(),
        },
        rate_limited_before: 0,
        count: 1,
        aggregate: None,
        outcome: None,
        close: None,
        delivery: crate::events::Delivery::Both,
        server: None,
        dns: None,
        dns_sock: 0,
        udp_bytes: None,
    }
}

pub(crate) fn resource(pod: &str) -> Arc<Resource> {
    let mut attributes = BTreeMap::new();
    attributes.insert(semconv::K8S_POD_NAME, pod.to_owned());
    attributes.insert(semconv::CONTAINER_ID, format!("{pod}-container"));
    Arc::new(Resource { attributes })
}

pub(crate) fn record(resource: &Arc<Resource>, port: u16) -> Record {
    Record {
        connection: connection(port),
        resource: Arc::clone(resource),
        host_network: false,
        cgroup_path: None,
    }
}

fn attr<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a V> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

#[test]
fn a_connection_becomes_one_info_log_record() {
    let shop = resource("shop");
    let log = log_record(&record(&shop, 443), 5, AttributeSet::Full);
    assert_eq!(log.time_unix_nano, 1_700_000_000_000_000_000);
    assert_eq!(log.observed_time_unix_nano, 5);
    assert_eq!(log.severity_number, SeverityNumber::Info as i32);
    assert_eq!(log.severity_text, "INFO");
    assert_eq!(log.event_name, "egress.connection");
    let a = &log.attributes;
    assert_eq!(
        attr(a, "destination.address"),
        Some(&V::StringValue("93.184.216.34".into()))
    );
    assert_eq!(attr(a, "destination.port"), Some(&V::IntValue(443)));
    assert_eq!(attr(a, "source.port"), Some(&V::IntValue(40000)));
    assert_eq!(
        attr(a, "network.transport"),
        Some(&V::StringValue("tcp".into()))
    );
    assert_eq!(attr(a, "process.pid"), Some(&V::IntValue(42)));
    assert_eq!(
        attr(a, "process.executable.name"),
        Some(&V::StringValue("curl".into()))
    );
    assert_eq!(attr(a, "egress.network.host"), Some(&V::BoolValue(false)));
    assert_eq!(
        attr(a, "egress.event"),
        Some(&V::StringValue("tcp_connect".into()))
    );
    // The same attributes as the stdout line, one for one.
    assert_eq!(
        a.len(),
        crate::export::attributes::of(&record(&shop, 443)).len()
    );
}

#[test]
fn records_are_grouped_by_workload() {
    let shop = resource("shop");
    let db = resource("db");
    let shop_again = Arc::new((*shop).clone());
    let batch = [
        record(&shop, 1),
        record(&db, 2),
        record(&shop, 3),
        record(&shop_again, 4),
    ];
    let request = logs_request(&batch, 0, AttributeSet::Full);
    assert_eq!(
        request.resource_logs.len(),
        2,
        "equal resources share one ResourceLogs"
    );
    let pod = |rl: &ResourceLogs| {
        let resource = rl.resource.as_ref().expect("resource");
        attr(&resource.attributes, "k8s.pod.name").cloned()
    };
    assert_eq!(
        pod(&request.resource_logs[0]),
        Some(V::StringValue("shop".into()))
    );
    assert_eq!(request.resource_logs[0].scope_logs[0].log_records.len(), 3);
    assert_eq!(
        pod(&request.resource_logs[1]),
        Some(V::StringValue("db".into()))
    );
    assert_eq!(request.resource_logs[1].scope_logs[0].log_records.len(), 1);
    let scope = request.resource_logs[0].scope_logs[0]
        .scope
        .as_ref()
        .expect("scope");
    assert_eq!(scope.name, "egress-collector");
}

fn sum_points(rm: &ResourceMetrics) -> Vec<(Vec<KeyValue>, i64)> {
    let metric = &rm.scope_metrics[0].metrics[0];
    assert_eq!(metric.name, "egress.connections");
    let Some(metric::Data::Sum(sum)) = &metric.data else {
        panic!("a sum")
    };
    assert!(sum.is_monotonic);
    assert_eq!(
        sum.aggregation_temporality,
        AggregationTemporality::Cumulative as i32
    );
    sum.data_points
        .iter()
        .map(|p| {
            let Some(number_data_point::Value::AsInt(v)) = p.value else {
                panic!("an int")
            };
            (p.attributes.clone(), v)
        })
        .collect()
}

#[test]
fn connection_counts_are_cumulative_per_workload_and_port() {
    let shop = resource("shop");
    let db = resource("db");
    let mut counts = ConnectionCounts::new(10, false);
    for port in [443, 443, 80] {
        counts.record(&record(&shop, port));
    }
    counts.record(&record(&db, 5432));
    let metrics = counts.resource_metrics(20);
    assert_eq!(metrics.len(), 2);
    let shop_metrics = metrics
        .iter()
        .find(|rm| {
            attr(&rm.resource.as_ref().expect("r").attributes, "k8s.pod.name")
                == Some(&V::StringValue("shop".into()))
        })
        .expect("shop");
    let mut points = sum_points(shop_metrics);
    points.sort_by_key(|(a, _)| format!("{:?}", attr(a, "destination.port")));
    assert_eq!(points.len(), 2);
    let total: i64 = points.iter().map(|(_, v)| v).sum();
    assert_eq!(total, 3);
    for (attributes, _) in &points {
        assert!(
            attr(attributes, "destination.address").is_none(),
            "addresses are off by default"
        );
        assert_eq!(
            attr(attributes, "network.type"),
            Some(&V::StringValue("ipv4".into()))
        );
    }
    counts.record(&record(&shop, 443));
    let again: i64 = sum_points(
        counts
            .resource_metrics(30)
            .iter()
            .find(|rm| {
                rm.resource.as_ref().expect("r").attributes.len() == 2 && sum_points(rm).len() == 2
            })
            .expect("shop"),
    )
    .iter()
    .map(|(_, v)| v)
    .sum();
    assert_eq!(again, 4, "cumulative: totals only grow");
}

#[test]
fn destination_addresses_when_asked_and_an_overflow_series_beyond_the_limit() {
    let shop = resource("shop");
    let mut counts = ConnectionCounts::new(0, true);
    for port in 0..(MAX_SERIES_PER_RESOURCE as u16 + 5) {
        counts.record(&record(&shop, port));
    }
    let points = sum_points(&counts.resource_metrics(1)[0]);
    assert_eq!(points.len(), MAX_SERIES_PER_RESOURCE + 1);
    let overflow: Vec<_> = points
        .iter()
        .filter(|(a, _)| attr(a, "otel.metric.overflow").is_some())
        .collect();
    assert_eq!(overflow.len(), 1);
    assert_eq!(overflow[0].1, 5);
    let with_address = points
        .iter()
        .filter(|(a, _)| attr(a, "destination.address").is_some())
        .count();
    assert_eq!(with_address, MAX_SERIES_PER_RESOURCE);
    let _ = AnyValue::default();
}

/// One export interval whose export succeeded.
fn interval(counts: &mut ConnectionCounts, now: u64) -> usize {
    counts.interval_passed();
    counts.exported(now)
}

#[test]
fn a_gone_containers_series_ends_after_two_quiet_exports_and_a_later_one_starts_afresh() {
    let shop = resource("shop");
    let db = resource("db");
    let mut counts = ConnectionCounts::new(10, false);
    counts.record(&record(&shop, 443));
    counts.record(&record(&db, 5432));
    counts.container_gone("shop-container");
    counts.container_gone("no-such-container");
    let total_of = |counts: &ConnectionCounts, pod: &str| -> Option<(u64, i64)> {
        let metrics = counts.resource_metrics(99);
        let rm = metrics.iter().find(|rm| {
            attr(&rm.resource.as_ref().expect("r").attributes, "k8s.pod.name")
                == Some(&V::StringValue(pod.into()))
        })?;
        let Some(metric::Data::Sum(sum)) = &rm.scope_metrics[0].metrics[0].data else {
            panic!("a sum")
        };
        let start = sum.data_points[0].start_time_unix_nano;
        Some((start, sum_points(rm).iter().map(|(_, v)| v).sum()))
    };
    // First export after the departure: still there; a late record keeps it one more.
    assert_eq!(total_of(&counts, "shop"), Some((10, 1)));
    assert_eq!(interval(&mut counts, 20), 0);
    counts.record(&record(&shop, 443));
    assert_eq!(total_of(&counts, "shop"), Some((10, 2)));
    assert_eq!(interval(&mut counts, 30), 0);
    // Two exports with nothing new: ended; the present workload stays.
    assert_eq!(total_of(&counts, "shop"), Some((10, 2)));
    assert_eq!(interval(&mut counts, 40), 1);
    assert_eq!(total_of(&counts, "shop"), None);
    assert_eq!(counts.workloads(), 1);
    assert_eq!(total_of(&counts, "db"), Some((10, 1)));
    // A record after the end (a reused id, a record delayed past the departure's memory)
    // starts a new cumulative series, later than the old one, which stays.
    counts.record(&record(&shop, 443));
    assert_eq!(total_of(&counts, "shop"), Some((40, 1)));
    assert_eq!(total_of(&counts, "db"), Some((10, 1)), "unchanged");
    for now in [50, 60, 70] {
        assert_eq!(interval(&mut counts, now), 0);
    }
    assert_eq!(counts.workloads(), 2);
}

#[test]
fn a_departure_before_the_containers_first_record_still_ends_its_series() {
    let shop = resource("shop");
    let mut counts = ConnectionCounts::new(10, false);
    counts.container_gone("shop-container");
    counts.record(&record(&shop, 443));
    assert_eq!(interval(&mut counts, 20), 0, "exported once more");
    assert_eq!(interval(&mut counts, 30), 1);
    assert_eq!(counts.workloads(), 0);
}

#[test]
fn a_gone_series_waits_for_successful_exports_and_the_oldest_beyond_the_bound_are_dropped() {
    let mut counts = ConnectionCounts::new(10, false).with_max_gone(2);
    let pods = ["a", "b", "c", "d"];
    let resources: Vec<_> = pods.iter().map(|p| resource(p)).collect();
    for r in &resources {
        counts.record(&record(r, 443));
    }
    // The endpoint is down: intervals pass, no export succeeds, nothing ends.
    assert_eq!(counts.container_gone("a-container"), 0);
    assert_eq!(counts.container_gone("b-container"), 0);
    for _ in 0..10 {
        counts.interval_passed();
    }
    assert_eq!(counts.workloads(), 4, "kept while no export succeeds");
    // A third departure passes the bound: the oldest gone one is dropped (counted).
    assert_eq!(counts.container_gone("c-container"), 1);
    assert_eq!(counts.workloads(), 3);
    let pods_left: Vec<_> = counts
        .resource_metrics(20)
        .iter()
        .filter_map(
            |rm| match attr(&rm.resource.as_ref().expect("r").attributes, "k8s.pod.name") {
                Some(V::StringValue(s)) => Some(s.clone()),
                _ => None,
            },
        )
        .collect();
    assert!(!pods_left.contains(&"a".to_owned()), "{pods_left:?}");
    // The endpoint is back: two successful exports end the gone series, not the present.
    assert_eq!(counts.exported(30), 0);
    assert_eq!(counts.exported(40), 2);
    assert_eq!(counts.workloads(), 1);
}

/// Every data point as text, with its resource and metric, in a fixed order.
fn points_text(metrics: &[ResourceMetrics]) -> Vec<String> {
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;
    let mut points = Vec::new();
    for rm in metrics {
        let resource = format!("{:?}", rm.resource);
        for metric in rm.scope_metrics.iter().flat_map(|sm| &sm.metrics) {
            let each: Vec<String> = match &metric.data {
                Some(Data::Sum(sum)) => sum.data_points.iter().map(|p| format!("{p:?}")).collect(),
                Some(Data::Histogram(h)) => {
                    h.data_points.iter().map(|p| format!("{p:?}")).collect()
                }
                other => vec![format!("{other:?}")],
            };
            points.extend(
                each.into_iter()
                    .map(|p| format!("{resource} {} {p}", metric.name)),
            );
        }
    }
    points.sort();
    points
}

#[test]
fn a_batch_counts_as_its_records_one_by_one() {
    use crate::events::Delivery;
    let mut batch = crate::export::otlp::encode::tests::every_kind();
    let mut more = batch.clone();
    more.reverse();
    for (i, r) in more.iter_mut().enumerate() {
        r.connection.delivery = [Delivery::Both, Delivery::LogOnly, Delivery::MetricsOnly][i % 3];
    }
    batch.extend(more);
    let mut by_batch = ConnectionCounts::new(10, true);
    by_batch.record_counted(&batch);
    let mut one_by_one = ConnectionCounts::new(10, true);
    for r in batch.iter().filter(|r| r.connection.counted()) {
        one_by_one.record(r);
    }
    let (batched, single) = (
        points_text(&by_batch.resource_metrics(20)),
        points_text(&one_by_one.resource_metrics(20)),
    );
    assert!(batched.len() > 10, "{batched:?}");
    assert_eq!(batched, single);
}
