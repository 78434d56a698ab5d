//! UDP payload bytes per reported flow window, on this machine's kernel (tracepoint
//! mode): known datagrams sent with sendto, sendmsg (two iovecs) and sendmmsg (three
//! messages) over three windows; each flow record carries the bytes sent since the
//! flow's previous record, and `egress.network.io` their sum. Bytes sent after a flow's
//! last record reach the metric through the sweep of `UDP_FLOWS`, while the collector
//! runs and at its shutdown.

mod support;

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use egress_testkit::{
    otlp_run::{OtlpRun, Protocol},
    ports::unused_port,
    traffic,
};
use support::{
    host::{last_stat, require_root},
    receiver::{Received, int_attr, int_value, str_attr},
};

const COLLECTOR: &str = env!("CARGO_BIN_EXE_egress-collector");

/// A loopback UDP socket on a port no other test of this process is given, even after
/// this one is closed: the tests run at once under one pid, each with a collector that
/// sees the others' datagrams, and tell flows apart by port.
fn udp_socket() -> UdpSocket {
    UdpSocket::bind((Ipv4Addr::LOCALHOST, unused_port())).expect("udp bind")
}

/// One sendmsg of `parts` as that many iovecs (one datagram); returns the bytes sent.
fn sendmsg_parts(socket: &UdpSocket, to: SocketAddr, parts: &[usize]) -> usize {
    let sent = traffic::sendmsg_parts(socket, to, parts).expect("sendmsg");
    assert_eq!(sent, parts.iter().sum::<usize>(), "sendmsg");
    sent
}

/// One sendmmsg of one datagram per entry of `sizes`; returns the bytes sent.
fn sendmmsg_sizes(socket: &UdpSocket, to: SocketAddr, sizes: &[usize]) -> usize {
    let sent = traffic::sendmmsg_sizes(socket, to, sizes).expect("sendmmsg");
    assert_eq!(sent, sizes.iter().sum::<usize>(), "sendmmsg");
    sent
}

fn send_to(socket: &UdpSocket, to: SocketAddr, n: usize) -> usize {
    socket.send_to(&vec![1u8; n], to).expect("sendto")
}

/// The last cumulative UDP transmit value of `egress.network.io` for `port`.
fn udp_transmitted(received: &Received, port: u16) -> Option<i64> {
    received
        .sum_points("egress.network.io")
        .filter(|p| {
            int_attr(&p.attributes, "destination.port") == Some(port.into())
                && str_attr(&p.attributes, "network.transport").as_deref() == Some("udp")
                && str_attr(&p.attributes, "network.io.direction").as_deref() == Some("transmit")
        })
        .filter_map(int_value)
        .last()
}

/// The collector in tracepoint mode with 1 s UDP flow windows, exporting to a receiver
/// on loopback.
fn start() -> OtlpRun {
    start_with_window("1s")
}

fn start_with_window(window: &str) -> OtlpRun {
    require_root();
    OtlpRun::start(
        std::path::Path::new(COLLECTOR),
        &[
            "--probe",
            "tracepoint",
            "--udp-flow-window",
            window,
            "--stats-interval",
            "1h",
        ],
    )
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
    let run = start();
    let sink = udp_socket();
    let to = sink.local_addr().expect("addr");
    let socket = udp_socket();
    assert_eq!(send_to(&socket, to, 100), 100);
    thread::sleep(Duration::from_millis(100));
    assert_eq!(sendmsg_parts(&socket, to, &[30, 70]), 100);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = run.peek(|received| udp_transmitted(received, to.port()));
        if now == Some(200) {
            break;
        }
        if Instant::now() > deadline {
            let stderr = run.stop().stderr;
            panic!(
                "the bytes after the flow's record never reached the metric: {now:?}\n{}",
                stderr.join("\n")
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(send_to(&socket, to, 5), 5);

    let late_sink = udp_socket();
    let late_to = late_sink.local_addr().expect("addr");
    let late = udp_socket();
    assert_eq!(send_to(&late, late_to, 50), 50);
    assert_eq!(send_to(&late, late_to, 25), 25);
    // The records reach user space before the stop (the ring is drained every 250 ms).
    thread::sleep(Duration::from_millis(500));
    let received = run.stop().received;
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
    udp_bytes_are_carried_and_counted(start(), false);
}

/// The same where the sends' entry hooks save their arguments (kernels before 5.15,
/// other architectures), forced on this kernel by a test hook.
#[test]
fn udp_bytes_are_carried_and_counted_where_entry_hooks_save_the_arguments() {
    require_root();
    let run = OtlpRun::start_wrapped(
        Protocol::Grpc,
        &["env", "EGRESS_TEST_NO_EXIT_REGS=1"],
        std::path::Path::new(COLLECTOR),
        &[
            "--probe",
            "tracepoint",
            "--udp-flow-window",
            "1s",
            "--stats-interval",
            "1h",
        ],
    );
    udp_bytes_are_carried_and_counted(run, true);
}

/// Sendto, sendmsg and sendmmsg over three flow windows: one record per window with the
/// bytes since the previous one, and every byte in the metric. `entry_hooks`: the
/// sends' entry hooks ran (call state saved), else none did (arguments read back at the
/// exits): the collector's statistics tell which path was taken.
fn udp_bytes_are_carried_and_counted(run: OtlpRun, entry_hooks: bool) {
    let sink = udp_socket();
    let to = sink.local_addr().expect("addr");
    let socket = udp_socket();
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
    let finished = run.stop();
    let calls_saved = last_stat(&finished.stderr, "calls_saved");
    if entry_hooks {
        assert!(
            calls_saved.is_some_and(|n| n >= 6),
            "calls_saved {calls_saved:?}"
        );
    } else {
        assert_eq!(calls_saved, Some(0), "no entry hook saves call state");
    }
    let received = finished.received;
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

/// A sendto(2) whose syscall number and descriptor have their upper halves set: the
/// kernel takes `eax` and the `int` fd's low half alone, so the send runs and its exit
/// tracepoint fires, while the saved registers (`orig_ax`, `di`) keep all 64 bits. Its
/// flow is reported like any other (comparing or indexing with all 64 bits would let a
/// process send unseen).
#[cfg(target_arch = "x86_64")]
#[test]
fn a_send_whose_syscall_number_and_fd_have_their_upper_halves_set_is_reported() {
    let run = start();
    let sink = udp_socket();
    let SocketAddr::V4(to) = sink.local_addr().expect("addr") else {
        panic!("an IPv4 sink");
    };
    let socket = udp_socket();
    assert_eq!(send_to_with_upper_half_set(&socket, to, 42), 42);
    thread::sleep(Duration::from_millis(1500));
    let received = run.stop().received;
    let records = flow_records(&received, &socket);
    assert_eq!(carried(&records), [Some(42)], "{records:?}");
}

/// sendto(2) of `n` bytes to `to`, made with 1 << 32 added to the syscall number (`rax`)
/// and to the descriptor (`rdi`).
#[cfg(target_arch = "x86_64")]
fn send_to_with_upper_half_set(socket: &UdpSocket, to: SocketAddrV4, n: usize) -> i64 {
    use std::os::fd::AsRawFd;
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: to.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*to.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let payload = vec![1u8; n];
    let mut rax = (1u64 << 32) | libc::SYS_sendto as u64;
    // SAFETY: sendto(2) on a socket this test owns, with a buffer and an address that
    // outlive the call; the syscall instruction clobbers rcx and r11 only.
    unsafe {
        std::arch::asm!(
            "syscall",
            inout("rax") rax,
            in("rdi") (1u64 << 32) | socket.as_raw_fd() as u64,
            in("rsi") payload.as_ptr(),
            in("rdx") n,
            in("r10") 0u64,
            in("r8") &raw const addr,
            in("r9") std::mem::size_of::<libc::sockaddr_in>(),
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    rax as i64
}

/// Threads of one process sending on one socket (one flow) across many 1 ms windows: each
/// window is started by one datagram only, so no two records of the flow are less than
/// half a window apart (two CPUs finding the window over at once must not both report
/// it), and the metric still says every byte sent.
#[test]
fn concurrent_senders_start_each_window_of_their_flow_once() {
    const WINDOW_NS: u64 = 1_000_000;
    let run = start_with_window("1ms");
    let sink = udp_socket();
    let to = sink.local_addr().expect("addr");
    let socket = udp_socket();
    let until = Instant::now() + Duration::from_secs(3);
    let total: usize = thread::scope(|scope| {
        let senders: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    let mut sent = 0;
                    while Instant::now() < until {
                        sent += send_to(&socket, to, 3);
                    }
                    sent
                })
            })
            .collect();
        senders.into_iter().map(|s| s.join().expect("sender")).sum()
    });
    thread::sleep(Duration::from_millis(500));
    let received = run.stop().received;
    let records = flow_records(&received, &socket);
    assert!(
        records.len() > 100,
        "records of many windows: {}",
        records.len()
    );
    let doubles: Vec<_> = records
        .windows(2)
        .filter(|pair| pair[1].0 - pair[0].0 < WINDOW_NS / 2)
        .map(|pair| (pair[0].0, pair[1].0))
        .collect();
    assert!(
        doubles.is_empty(),
        "{} of {} windows reported twice: {doubles:?}",
        doubles.len(),
        records.len()
    );
    assert_eq!(udp_transmitted(&received, to.port()), Some(total as i64));
}
