//! Which program follows the TCP state changes on this machine's kernel: the BTF-enabled
//! raw tracepoint (`tp_btf`, plain loads from typed pointers) where it loads, and the raw
//! tracepoint when it is refused (forced here by the `EGRESS_TEST_REFUSE_TP_BTF` test
//! hook). Either way every connection is reported once, with its close and exact bytes:
//! the two programs share the state machine but read the kernel differently.

mod support;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use egress_testkit::{
    collector::RunningCollector,
    records::{attr, parse, records_to},
};
use support::host::require_root;

const COLLECTOR: &str = env!("CARGO_BIN_EXE_egress-collector");
const CONNECTIONS: usize = 10;
const PAYLOAD: usize = 1000;

/// `bpf_prog_type` of BTF-enabled programs (fentry, fexit, tp_btf), uapi/linux/bpf.h.
const BPF_PROG_TYPE_TRACING: u32 = 26;
/// The kernel keeps 15 bytes of a program's name.
const BTF_PROGRAM: &str = "tp_btf_inet_soc";

fn tp_btf_loaded() -> bool {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .any(|p| {
            p.name_as_str() == Some(BTF_PROGRAM) && p.program_type() as u32 == BPF_PROG_TYPE_TRACING
        })
}

/// A listener that reads each connection to its end.
fn sink() -> (SocketAddr, thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let addr = listener.local_addr().expect("address");
    let server = thread::spawn(move || {
        for _ in 0..CONNECTIONS {
            let (mut s, _) = listener.accept().expect("accept");
            let mut all = Vec::new();
            s.read_to_end(&mut all).expect("read");
        }
    });
    (addr, server)
}

/// Runs the collector (through `wrapper`), makes the connections, and checks the records;
/// returns the collector's log.
fn connections_reported_once(wrapper: &[&str]) -> Vec<String> {
    let collector = RunningCollector::start_wrapped(
        wrapper,
        std::path::Path::new(COLLECTOR),
        &[
            "--stdout",
            "--probe",
            "tracepoint",
            "--close-records",
            "--stats-interval",
            "1h",
        ],
        Duration::from_secs(60),
    )
    .expect("collector starts");
    let tp_btf_attached = tp_btf_loaded();
    let (addr, server) = sink();
    let mut ports = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut stream = TcpStream::connect(addr).expect("connect");
        ports.push(stream.local_addr().expect("local address").port());
        stream.write_all(&[7u8; PAYLOAD]).expect("write");
        drop(stream);
    }
    server.join().expect("server");
    thread::sleep(Duration::from_millis(300));
    let (clean, stdout, stderr) = collector.stop(Duration::from_secs(30)).expect("stop");
    assert!(clean, "collector failed:\n{}", stderr.join("\n"));
    let records = parse(&stdout);
    let connects = records_to(&records, addr, "tcp_connect");
    let closes = records_to(&records, addr, "tcp_close");
    let mut problems = Vec::new();
    for port in &ports {
        let of_port = |r: &&&serde_json::Value| attr(r, "source.port") == *port;
        let connect: Vec<_> = connects.iter().filter(of_port).collect();
        let close: Vec<_> = closes.iter().filter(of_port).collect();
        match connect.as_slice() {
            [r] if attr(r, "egress.connection.state") == "established" => {}
            other => problems.push(format!("port {port}: connect records {other:?}")),
        }
        match close.as_slice() {
            [r] if attr(r, "egress.tcp.bytes.sent") == PAYLOAD as u64 => {}
            other => problems.push(format!("port {port}: close records {other:?}")),
        }
    }
    assert!(
        problems.is_empty(),
        "{}\nrecords: {}",
        problems.join("\n"),
        records.len()
    );
    // Seen while it ran: the program is gone once the collector stopped.
    let mut log = stderr;
    log.push(format!(
        "test: tp_btf program loaded while running: {tp_btf_attached}"
    ));
    log
}

fn capturing_line(log: &[String]) -> &str {
    log.iter()
        .find(|l| l.contains("Capturing egress connections."))
        .expect("the collector says it captures")
}

#[test]
fn tp_btf_follows_the_state_changes_and_the_raw_tracepoint_takes_over_when_it_is_refused() {
    require_root();
    let log = connections_reported_once(&[]);
    let line = capturing_line(&log);
    assert!(
        line.contains("tcp_state=tp_btf"),
        "this kernel loads tp_btf programs, so the collector uses one: {line}"
    );
    assert!(
        log.iter()
            .any(|l| l == "test: tp_btf program loaded while running: true"),
        "no {BTF_PROGRAM} program of type tracing was loaded while the collector ran"
    );

    let log = connections_reported_once(&["env", "EGRESS_TEST_REFUSE_TP_BTF=1"]);
    let line = capturing_line(&log);
    assert!(
        line.contains("tcp_state=raw_tracepoint"),
        "with tp_btf refused, the raw tracepoint follows the state changes: {line}"
    );
    assert!(
        log.iter()
            .any(|l| l.contains("No BTF-enabled raw tracepoint for TCP state changes")),
        "the fallback is logged"
    );
}
