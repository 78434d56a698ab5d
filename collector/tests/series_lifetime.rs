//! Memory under container churn: a container's `egress.connections` series is exported
//! with its last counts after the container is removed, then ends, so the number of series
//! the collector holds and exports returns to where it was. Real docker containers, the
//! real collector, a real OTLP receiver.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr, TcpStream},
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
    ports::unused_port,
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
    lifetime(Scenario {
        name: "busy",
        host_traffic: true,
        outage: false,
    });
}

/// No traffic on the node but the containers' own: departures still reach the exporter
/// (enrichment applies them on a timer, not only when connections arrive).
#[test]
fn on_a_quiet_node_a_removed_containers_series_still_ends() {
    lifetime(Scenario {
        name: "quiet",
        host_traffic: false,
        outage: false,
    });
}

/// The receiver is down while the containers connect and are removed, for longer than
/// two export intervals: their last counts arrive once it is back, then the series end.
#[test]
fn a_removed_containers_last_counts_survive_an_endpoint_outage() {
    lifetime(Scenario {
        name: "outage",
        host_traffic: true,
        outage: true,
    });
}

/// Every address but `kept`: the 32 prefixes that cover the rest of IPv4, and all IPv6.
fn everything_but(kept: Ipv4Addr) -> String {
    let bits = u32::from(kept);
    let mut cidrs: Vec<String> = (0..32)
        .map(|len| {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            let flipped = (bits & mask) | (!bits & (1 << (31 - len)));
            format!("{}/{}", Ipv4Addr::from(flipped), len + 1)
        })
        .collect();
    cidrs.push("::/0".to_owned());
    cidrs.join(",")
}

struct Scenario {
    /// Distinguishes the pods (docker names, uids) of scenarios that run at once.
    name: &'static str,
    /// Host connections every 100 ms throughout (drives the pipeline).
    host_traffic: bool,
    /// The receiver is down from before the containers start until after they are gone.
    outage: bool,
}

fn lifetime(scenario: Scenario) {
    require_root();
    docker::ensure_image().expect("test image");
    let mut rt = Some(runtime());
    let received: Shared = Arc::new(Mutex::new(Received::default()));
    // A port outside the ephemeral range, handed to no other test of this process: the
    // outage frees it for seconds, and a port-0 bind elsewhere could take it meanwhile.
    let mut otlp = Some(rt.as_ref().expect("runtime").block_on(receiver::grpc(
        SocketAddr::from((Ipv4Addr::LOCALHOST, unused_port())),
        Arc::clone(&received),
    )));
    let addr = otlp.as_ref().expect("receiver").addr;
    let port = sink_port();
    let gateway = docker::bridge_gateway().expect("gateway");
    let endpoint = format!("http://{addr}");
    let mut args = vec![
        "--otlp-endpoint".to_owned(),
        endpoint,
        "--export-interval".to_owned(),
        "1s".to_owned(),
        "--stats-interval".to_owned(),
        "1s".to_owned(),
    ];
    if !scenario.host_traffic {
        // Every destination but the containers' own is dropped in the kernel, so that
        // other traffic on this shared machine does not drive the pipeline either.
        args.push("--exclude-cidr".to_owned());
        args.push(everything_but(gateway.parse().expect("an IPv4 gateway")));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let collector =
        RunningCollector::start_with(Path::new(COLLECTOR), &args, Duration::from_secs(60))
            .expect("collector starts");
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let host_port = sink_port();
    let host_traffic = scenario.host_traffic;
    let traffic = thread::spawn(move || {
        while host_traffic && !flag.load(Ordering::Relaxed) {
            let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, host_port));
            thread::sleep(Duration::from_millis(100));
        }
    });

    let (seen, baseline) = wait_for_export(&received, "a first export", 1, |_| true);
    let baseline = series_in(&baseline, port).1;
    if scenario.outage {
        // Down for real: the server, its connections and its runtime are gone.
        drop(otlp.take());
        if let Some(rt) = rt.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
    let script = format!(
        "i=0; while [ $i -lt {PER_CONTAINER} ]; do echo x | nc -w 2 {gateway} {port}; i=$((i+1)); done"
    );
    // Each scenario its own range of pod uids: the tests of this file run in parallel.
    let seq_base =
        0x40 + 0x10 * u32::from(scenario.host_traffic) + 0x20 * u32::from(scenario.outage);
    let containers: Vec<Container> = (0..CONTAINERS)
        .map(|n| {
            let pod = Pod::new(
                &format!("churn-{}{n}", scenario.name),
                "churn",
                "app",
                Some("besteffort"),
                seq_base + n,
            );
            let container = Container::create(&pod, &script).expect("docker create");
            container.run_to_completion().expect("container runs");
            container
        })
        .collect();
    let ids: BTreeSet<String> = containers.iter().map(|c| c.id.clone()).collect();
    let seen = if scenario.outage {
        drop(containers); // docker rm -f
        // Well past two export intervals with the endpoint down.
        thread::sleep(Duration::from_secs(6));
        let new_rt = runtime();
        otlp = Some(new_rt.block_on(receiver::grpc(addr, Arc::clone(&received))));
        rt = Some(new_rt);
        let (seen, _) = wait_for_export(&received, "the gone containers' last counts", seen, |r| {
            let (series, _) = series_in(r, port);
            ids.iter().all(|id| series.get(id) == Some(&PER_CONTAINER))
        });
        seen
    } else {
        let (seen, _) = wait_for_export(&received, "every container's counts", seen, |r| {
            let (series, _) = series_in(r, port);
            ids.iter().all(|id| series.get(id) == Some(&PER_CONTAINER))
        });
        drop(containers); // docker rm -f
        seen
    };
    let during = {
        let received = received.lock().expect("lock");
        received
            .metrics
            .iter()
            .rev()
            .find(|r| !series_in(r, port).0.is_empty())
            .map(|r| series_in(r, port).1)
            .unwrap_or_default()
    };
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
    // The last plain statistics line (a loss line, e.g. another collector's recursion
    // misses on this shared machine, carries no workload count).
    let plain: Vec<String> = stderr
        .iter()
        .filter(|l| l.contains("Collector statistics."))
        .cloned()
        .collect();
    let held = last_stat(&plain, "metric_workloads").expect("metric_workloads in the statistics");
    for lost in stderr.iter().filter(|l| l.contains("Events were lost")) {
        eprintln!("{lost}");
    }
    eprintln!(
        "workloads exported: {baseline} before, {during} with the containers, {after_workloads} after; \
         the collector holds {held}"
    );
    drop(otlp);
    drop(rt);
}
