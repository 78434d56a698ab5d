//! Memory under container churn: a container's `egress.connections` series is exported
//! with its last counts after the container is removed, then ends, so the number of series
//! the collector holds and exports returns to where it was. Real docker containers, the
//! real collector, a real OTLP receiver.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, TcpStream},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use egress_testkit::{
    collector::RunningCollector,
    docker::{self, Container, Pod},
};
use opentelemetry_proto::tonic::{
    collector::metrics::v1::ExportMetricsServiceRequest,
    common::v1::any_value::Value as V,
    metrics::v1::{metric::Data, number_data_point},
};
use support::{
    host::{last_stat, require_root, sink_port},
    receiver::{self, Received, Shared, int_attr, runtime},
};

const COLLECTOR: &str = env!("CARGO_BIN_EXE_egress-collector");
const CONTAINERS: u32 = 3;
const PER_CONTAINER: i64 = 3;

/// `egress.connections` to `port` in one export, by `container.id`; and how many
/// workloads the export carried in all.
fn series_in(request: &ExportMetricsServiceRequest, port: u16) -> (BTreeMap<String, i64>, usize) {
    let mut by_container = BTreeMap::new();
    let mut workloads = 0;
    for rm in &request.resource_metrics {
        let attributes = rm
            .resource
            .as_ref()
            .map(|r| &r.attributes[..])
            .unwrap_or(&[]);
        let string = |key: &str| {
            attributes.iter().find(|kv| kv.key == key).and_then(|kv| {
                match kv.value.as_ref()?.value.as_ref()? {
                    V::StringValue(s) => Some(s.clone()),
                    _ => None,
                }
            })
        };
        if string("service.name").as_deref() == Some("egress-collector") {
            continue;
        }
        workloads += 1;
        let Some(id) = string("container.id") else {
            continue;
        };
        for metric in rm.scope_metrics.iter().flat_map(|sm| &sm.metrics) {
            let (true, Some(Data::Sum(sum))) = (metric.name == "egress.connections", &metric.data)
            else {
                continue;
            };
            let total: i64 = sum
                .data_points
                .iter()
                .filter(|p| int_attr(&p.attributes, "destination.port") == Some(i64::from(port)))
                .filter_map(|p| match p.value {
                    Some(number_data_point::Value::AsInt(v)) => Some(v),
                    _ => None,
                })
                .sum();
            if total > 0 {
                by_container.insert(id.clone(), total);
            }
        }
    }
    (by_container, workloads)
}

/// Waits until the latest export satisfies `done`; returns it.
fn wait_for_export(
    received: &Shared,
    what: &str,
    after: usize,
    done: impl Fn(&ExportMetricsServiceRequest) -> bool,
) -> (usize, ExportMetricsServiceRequest) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        {
            let received = received.lock().expect("lock");
            if received.metrics.len() > after
                && let Some(last) = received.metrics.last()
                && done(last)
            {
                return (received.metrics.len(), last.clone());
            }
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_removed_containers_series_is_exported_with_its_last_counts_then_ends() {
    require_root();
    docker::ensure_image().expect("test image");
    let rt = runtime();
    let received: Shared = Arc::new(Mutex::new(Received::default()));
    let otlp = rt.block_on(receiver::grpc(
        "127.0.0.1:0".parse().expect("addr"),
        Arc::clone(&received),
    ));
    let port = sink_port();
    let gateway = docker::bridge_gateway().expect("gateway");
    let endpoint = format!("http://{}", otlp.addr);
    let collector = RunningCollector::start_with(
        Path::new(COLLECTOR),
        &[
            "--otlp-endpoint",
            &endpoint,
            "--export-interval",
            "1s",
            "--stats-interval",
            "1s",
        ],
        Duration::from_secs(60),
    )
    .expect("collector starts");
    // Host traffic throughout: enrichment applies what it learns with each batch.
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let host_port = sink_port();
    let traffic = thread::spawn(move || {
        while !flag.load(Ordering::Relaxed) {
            let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, host_port));
            thread::sleep(Duration::from_millis(100));
        }
    });

    let (seen, baseline) = wait_for_export(&received, "a first export", 1, |_| true);
    let baseline = series_in(&baseline, port).1;
    let script = format!(
        "i=0; while [ $i -lt {PER_CONTAINER} ]; do echo x | nc -w 2 {gateway} {port}; i=$((i+1)); done"
    );
    let containers: Vec<Container> = (0..CONTAINERS)
        .map(|n| {
            let pod = Pod::new(
                &format!("churn{n}"),
                "churn",
                "app",
                Some("besteffort"),
                40 + n,
            );
            let container = Container::create(&pod, &script).expect("docker create");
            container.run_to_completion().expect("container runs");
            container
        })
        .collect();
    let ids: BTreeSet<String> = containers.iter().map(|c| c.id.clone()).collect();
    let (seen, during) = wait_for_export(&received, "every container's counts", seen, |r| {
        let (series, _) = series_in(r, port);
        ids.iter().all(|id| series.get(id) == Some(&PER_CONTAINER))
    });
    let during = series_in(&during, port).1;
    drop(containers); // docker rm -f
    let _ = wait_for_export(&received, "the series to end", seen, |r| {
        let (series, _) = series_in(r, port);
        ids.iter().all(|id| !series.contains_key(id))
    });
    // Two more exports: the series stay ended.
    let (_, after) = wait_for_export(
        &received,
        "later exports",
        {
            let n = received.lock().expect("lock").metrics.len();
            n + 1
        },
        |r| {
            let (series, _) = series_in(r, port);
            ids.iter().all(|id| !series.contains_key(id))
        },
    );
    let after_workloads = series_in(&after, port).1;
    stop.store(true, Ordering::Relaxed);
    let _ = traffic.join();
    let (ok, _, stderr) = collector
        .stop(Duration::from_secs(30))
        .expect("collector stops");
    assert!(ok, "collector failed:\n{}", stderr.join("\n"));

    // Each container's last export carried its full count.
    let received = received.lock().expect("lock");
    for id in &ids {
        let last = received
            .metrics
            .iter()
            .rev()
            .find_map(|r| series_in(r, port).0.get(id).copied());
        assert_eq!(last, Some(PER_CONTAINER), "{id}: last counts exported");
    }
    // Totals include other engineers' containers on this host, which come and go: the
    // claim checked above is on ours; these figures are for the report.
    let held = last_stat(&stderr, "metric_workloads").expect("metric_workloads in the statistics");
    eprintln!(
        "workloads exported: {baseline} before, {during} with the containers, {after_workloads} after; \
         the collector holds {held}"
    );
    drop(otlp);
}
