//! UDP payload bytes per reported flow window, on this machine's kernel (tracepoint
//! mode): known datagrams sent with sendto, sendmsg (two iovecs) and sendmmsg (three
//! messages) over three windows; each flow record carries the bytes sent since the
//! flow's previous record, and `egress.network.io` their sum. Bytes sent after a flow's
//! last record reach the metric through the sweep of `UDP_FLOWS`, while the collector
//! runs and at its shutdown.

mod support;

use std::{
    mem::zeroed,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use egress_testkit::{collector::RunningCollector, traffic};
use opentelemetry_proto::tonic::{
    common::v1::{KeyValue, any_value::Value as V},
    metrics::v1::{metric::Data, number_data_point},
};
use support::{
    host::require_root,
    receiver::{self, Received, Shared, int_attr, runtime},
};

const COLLECTOR: &str = env!("CARGO_BIN_EXE_egress-collector");

fn sockaddr(to: SocketAddr) -> libc::sockaddr_in {
    let SocketAddr::V4(v4) = to else {
        unreachable!("IPv4 only")
    };
    libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*v4.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// One sendmsg of `parts` as that many iovecs (one datagram); returns the bytes sent.
fn sendmsg_parts(socket: &UdpSocket, to: SocketAddr, parts: &[usize]) -> usize {
    let sent = traffic::sendmsg_parts(socket, to, parts).expect("sendmsg");
    assert_eq!(sent, parts.iter().sum::<usize>(), "sendmsg");
    sent
}

/// One sendmmsg of one datagram per entry of `sizes`; returns the bytes sent.
fn sendmmsg_sizes(socket: &UdpSocket, to: SocketAddr, sizes: &[usize]) -> usize {
    let mut sin = sockaddr(to);
    let mut buffers: Vec<Vec<u8>> = sizes.iter().map(|n| vec![4u8; *n]).collect();
    let mut iov: Vec<libc::iovec> = buffers
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: mmsghdr is plain old data; every pointer in it outlives the call.
    let sent = unsafe {
        let mut msgs: Vec<libc::mmsghdr> = (0..sizes.len()).map(|_| zeroed()).collect();
        for (m, iov) in msgs.iter_mut().zip(iov.iter_mut()) {
            m.msg_hdr.msg_name = (&mut sin as *mut libc::sockaddr_in).cast();
            m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as u32;
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
        }
        let n = libc::sendmmsg(socket.as_raw_fd(), msgs.as_mut_ptr(), msgs.len() as u32, 0);
        assert_eq!(n, sizes.len() as i32, "sendmmsg");
        msgs.iter().map(|m| m.msg_len as usize).sum::<usize>()
    };
    assert_eq!(sent, sizes.iter().sum::<usize>());
    sent
}

fn send_to(socket: &UdpSocket, to: SocketAddr, n: usize) -> usize {
    socket.send_to(&vec![1u8; n], to).expect("sendto")
}

fn str_attr(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            V::StringValue(s) => Some(s.clone()),
            _ => None,
        }
    })
}

/// The last cumulative UDP transmit value of `egress.network.io` for `port`.
fn udp_transmitted(received: &Received, port: u16) -> Option<i64> {
    let mut last = None;
    for rm in received.metrics.iter().flat_map(|r| &r.resource_metrics) {
        for m in rm.scope_metrics.iter().flat_map(|s| &s.metrics) {
            let Some(Data::Sum(sum)) = (m.name == "egress.network.io")
                .then_some(m.data.as_ref())
                .flatten()
            else {
                continue;
            };
            for p in &sum.data_points {
                let ours = int_attr(&p.attributes, "destination.port") == Some(port.into())
                    && str_attr(&p.attributes, "network.transport").as_deref() == Some("udp")
                    && str_attr(&p.attributes, "network.io.direction").as_deref()
                        == Some("transmit");
                if let (true, Some(number_data_point::Value::AsInt(v))) = (ours, p.value) {
                    last = Some(v);
                }
            }
        }
    }
    last
}

/// A receiver on loopback (with its runtime) and the collector in tracepoint mode with
/// 1 s UDP flow windows, exporting to it every second.
struct Setup {
    _rt: tokio::runtime::Runtime,
    received: Shared,
    receiver: receiver::Receiver,
    collector: RunningCollector,
}

fn start() -> Setup {
    require_root();
    let rt = runtime();
    let received: Shared = Arc::new(Mutex::new(Received::default()));
    let receiver = rt.block_on(receiver::grpc(
        "127.0.0.1:0".parse().expect("addr"),
        Arc::clone(&received),
    ));
    let endpoint = format!("http://{}", receiver.addr);
    let collector = RunningCollector::start_with(
        std::path::Path::new(COLLECTOR),
        &[
            "--probe",
            "tracepoint",
            "--otlp-endpoint",
            &endpoint,
            "--udp-flow-window",
            "1s",
            "--export-interval",
            "1s",
            "--batch-timeout",
            "200ms",
            "--stats-interval",
            "1h",
        ],
        Duration::from_secs(60),
    )
    .expect("collector starts");
    Setup {
        _rt: rt,
        received,
        receiver,
        collector,
    }
}

impl Setup {
    /// Stops the collector (it must stop cleanly) and the receiver; what it received.
    fn stop(self) -> Shared {
        let (clean, _, stderr) = self.collector.stop(Duration::from_secs(30)).expect("stop");
        assert!(clean, "collector failed:\n{}", stderr.join("\n"));
        drop(self.receiver);
        self.received
    }
}

/// This test's records of flows from `socket`: (time, `egress.event`, bytes carried),
/// in time order.
fn flow_records(
    received: &Received,
    socket: &UdpSocket,
) -> Vec<(u64, Option<String>, Option<i64>)> {
    let pid = i64::from(std::process::id());
    let source_port = i64::from(socket.local_addr().expect("addr").port());
    let mut records: Vec<_> = received
        .log_records()
        .filter(|r| int_attr(&r.attributes, "process.pid") == Some(pid))
        .filter(|r| int_attr(&r.attributes, "source.port") == Some(source_port))
        .map(|r| {
            (
                r.time_unix_nano,
                str_attr(&r.attributes, "egress.event"),
                int_attr(&r.attributes, "egress.udp.bytes.sent"),
            )
        })
        .collect();
    records.sort();
    records
}

fn carried(records: &[(u64, Option<String>, Option<i64>)]) -> Vec<Option<i64>> {
    records.iter().map(|(_, _, b)| *b).collect()
}

/// A flow that sends 100 B (reported), then 30 + 70 B within its window and nothing
/// more: the metric reaches 200 while the collector runs (the sweep, two windows after
/// the record, takes the 100 B the flow's next record would have carried); a datagram
/// sent after the sweep is reported again, carrying its own 5 B only. A second flow
/// sends 50 B then 25 B and the collector stops at once: the shutdown sweep flushes
/// them (75). Only the two datagrams that opened windows make log records.
#[test]
fn udp_bytes_after_a_flows_last_record_reach_the_metric() {
    let setup = start();
    let sink = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("sink");
    let to = sink.local_addr().expect("addr");
    let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).expect("bind");
    assert_eq!(send_to(&socket, to, 100), 100);
    thread::sleep(Duration::from_millis(100));
    assert_eq!(sendmsg_parts(&socket, to, &[30, 70]), 100);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = udp_transmitted(&setup.received.lock().expect("lock"), to.port());
        if now == Some(200) {
            break;
        }
        if Instant::now() > deadline {
            let (_, _, stderr) = setup.collector.stop(Duration::from_secs(30)).expect("stop");
            panic!(
                "the bytes after the flow's record never reached the metric: {now:?}\n{}",
                stderr.join("\n")
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(send_to(&socket, to, 5), 5);

    let late_sink = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("sink");
    let late_to = late_sink.local_addr().expect("addr");
    let late = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).expect("bind");
    assert_eq!(send_to(&late, late_to, 50), 50);
    assert_eq!(send_to(&late, late_to, 25), 25);
    // The records reach user space before the stop (the ring is drained every 100 ms).
    thread::sleep(Duration::from_millis(500));
    let received = setup.stop();
    let received = received.lock().expect("lock");
    assert_eq!(
        carried(&flow_records(&received, &socket)),
        [Some(100), Some(5)],
        "the sweep adds no log record; the flow's next datagram is reported again"
    );
    assert_eq!(udp_transmitted(&received, to.port()), Some(205));
    assert_eq!(carried(&flow_records(&received, &late)), [Some(50)]);
    assert_eq!(
        udp_transmitted(&received, late_to.port()),
        Some(75),
        "the shutdown sweep flushes the bytes after the last record"
    );
}

/// Three windows of one flow (a 1 s window, 1.3 s apart): the records carry 100 (the
/// first datagram), 165 (the rest of window 1: sendmsg 30 + 70, sendmmsg 10 + 20 + 30;
/// then window 2's first datagram, 5) and 18 (window 2's 11, window 3's 7); the metric
/// says 283, every byte sent.
#[test]
fn udp_bytes_are_carried_by_flow_records_and_counted_in_network_io() {
    let setup = start();
    let sink = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("sink");
    let to = sink.local_addr().expect("addr");
    let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let mut total = 0;
    total += send_to(&socket, to, 100);
    total += sendmsg_parts(&socket, to, &[30, 70]);
    total += sendmmsg_sizes(&socket, to, &[10, 20, 30]);
    thread::sleep(Duration::from_millis(1300));
    total += send_to(&socket, to, 5);
    total += send_to(&socket, to, 11);
    thread::sleep(Duration::from_millis(1300));
    total += send_to(&socket, to, 7);
    assert_eq!(total, 283);
    thread::sleep(Duration::from_millis(1500));
    let received = setup.stop();
    let received = received.lock().expect("lock");
    let records = flow_records(&received, &socket);
    assert_eq!(
        carried(&records),
        [Some(100), Some(165), Some(18)],
        "one record per window, with the bytes since the previous one: {records:?}"
    );
    assert!(
        records
            .iter()
            .all(|(_, e, _)| e.as_deref() == Some("udp_send"))
    );
    assert_eq!(udp_transmitted(&received, to.port()), Some(283));
}
