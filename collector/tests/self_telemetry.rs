//! `--self-telemetry`: the collector's own logs and spans reach the same OTLP endpoint,
//! under the collector's resource, never under a workload's.

mod support;

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use egress_testkit::collector::RunningCollector;
use opentelemetry_proto::tonic::{
    common::v1::{KeyValue, any_value::Value as V},
    resource::v1::Resource,
};
use support::{
    host::require_root,
    receiver::{self, Received, Receiver, Shared},
};

const COLLECTOR: &str = env!("CARGO_BIN_EXE_egress-collector");

fn attr(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            V::StringValue(s) => Some(s.clone()),
            V::IntValue(i) => Some(i.to_string()),
            _ => None,
        }
    })
}

fn service(resource: &Option<Resource>) -> Option<String> {
    attr(&resource.as_ref()?.attributes, "service.name")
}

type ReceiverStart = std::pin::Pin<Box<dyn std::future::Future<Output = Receiver>>>;

fn own_logs_and_spans_arrive(protocol: &str, start: fn(SocketAddr, Shared) -> ReceiverStart) {
    require_root();
    let rt = receiver::runtime();
    let received: Shared = Arc::new(Mutex::new(Received::default()));
    let receiver = rt.block_on(start(
        "127.0.0.1:0".parse().expect("addr"),
        received.clone(),
    ));
    let collector = RunningCollector::start_with(
        Path::new(COLLECTOR),
        &[
            "--otlp-endpoint",
            &format!("http://{}", receiver.addr),
            "--otlp-protocol",
            protocol,
            "--self-telemetry",
            "--batch-timeout",
            "200ms",
        ],
        Duration::from_secs(60),
    )
    .expect("collector starts");
    let sink = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("listen");
    let port = sink.local_addr().expect("addr").port();
    drop(TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("connect"));
    std::thread::sleep(Duration::from_millis(800));
    let (ok, _, stderr) = collector
        .stop(Duration::from_secs(30))
        .expect("collector stops");
    assert!(ok, "collector failed:\n{}", stderr.join("\n"));
    let received = received.lock().expect("lock");

    // Its own log lines, the shutdown's last one included (flushed on exit).
    let own_logs: Vec<String> = received
        .logs
        .iter()
        .flat_map(|r| &r.resource_logs)
        .filter(|rl| service(&rl.resource).as_deref() == Some("egress-collector"))
        .flat_map(|rl| &rl.scope_logs)
        .flat_map(|sl| &sl.log_records)
        .filter_map(|l| match l.body.as_ref()?.value.as_ref()? {
            V::StringValue(s) => Some(s.clone()),
            _ => None,
        })
        .collect();
    for line in ["Capturing egress connections.", "Stopped."] {
        assert!(
            own_logs.iter().any(|l| l == line),
            "{protocol}: own log {line:?} missing from {own_logs:?}"
        );
    }

    // Its spans: attaching the probes, with the mode chosen.
    let spans: Vec<_> = received
        .traces
        .iter()
        .flat_map(|r| &r.resource_spans)
        .inspect(|rs| assert_eq!(service(&rs.resource).as_deref(), Some("egress-collector")))
        .flat_map(|rs| &rs.scope_spans)
        .flat_map(|ss| &ss.spans)
        .collect();
    let attach = spans
        .iter()
        .find(|s| s.name == "probe.attach")
        .unwrap_or_else(|| panic!("{protocol}: no probe.attach span in {spans:?}"));
    assert!(
        ["kprobe", "fentry", "tracepoint"].contains(
            &attr(&attach.attributes, "probe.mode")
                .unwrap_or_default()
                .as_str()
        ),
        "{protocol}: probe.mode attribute: {:?}",
        attach.attributes
    );

    // The workload records keep their own resources: the test's connection is there,
    // and no workload resource claims to be the collector.
    let workload: Vec<_> = received
        .logs
        .iter()
        .flat_map(|r| &r.resource_logs)
        .filter(|rl| service(&rl.resource).is_none())
        .flat_map(|rl| &rl.scope_logs)
        .flat_map(|sl| &sl.log_records)
        .filter(|l| attr(&l.attributes, "destination.port") == Some(port.to_string()))
        .collect();
    assert_eq!(workload.len(), 1, "{protocol}: the test's one connection");
}

#[test]
fn grpc_carries_the_collectors_own_logs_and_spans() {
    own_logs_and_spans_arrive("grpc", |addr, shared| {
        Box::pin(receiver::grpc(addr, shared))
    });
}

#[test]
fn http_carries_the_collectors_own_logs_and_spans() {
    own_logs_and_spans_arrive("http/protobuf", |addr, shared| {
        Box::pin(receiver::http(addr, shared))
    });
}
