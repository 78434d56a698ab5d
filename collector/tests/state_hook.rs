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

/// A listener that reads each connection to its end. The listener is returned: while
/// the caller holds it, no other test of this process (the same pid) is given its port.
fn sink() -> (SocketAddr, thread::JoinHandle<()>, TcpListener) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let addr = listener.local_addr().expect("address");
    let accepting = listener.try_clone().expect("listener clone");
    let server = thread::spawn(move || {
        for _ in 0..CONNECTIONS {
            let (mut s, _) = accepting.accept().expect("accept");
            let mut all = Vec::new();
            s.read_to_end(&mut all).expect("read");
        }
    });
    (addr, server, listener)
}

/// The collector in tracepoint mode with close records, on stdout, started through
/// `wrapper` (e.g. `env` with a test hook).
fn start_collector(wrapper: &[&str]) -> RunningCollector {
    RunningCollector::start_wrapped(
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
    .expect("collector starts")
}

/// Runs the collector (through `wrapper`), makes the connections, and checks the records;
/// returns the collector's log.
fn connections_reported_once(wrapper: &[&str]) -> Vec<String> {
    let collector = start_collector(wrapper);
    let tp_btf_attached = tp_btf_loaded();
    let (addr, server, _listener) = sink();
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
fn tp_btf_follows_the_state_changes_and_each_fallback_takes_over_when_the_one_before_is_refused() {
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

    // Each fallback in turn: tp_btf refused, then the raw tracepoint too (kernels without
    // raw tracepoints), where the tracepoint's kernel-built record carries the states, the
    // protocol and the socket.
    for (refused, hook, fallback) in [
        (
            "1",
            "raw_tracepoint",
            "No BTF-enabled raw tracepoint for TCP state changes",
        ),
        (
            "raw",
            "tracepoint",
            "No raw tracepoint for TCP state changes; using the tracepoint",
        ),
    ] {
        let env = format!("EGRESS_TEST_REFUSE_TP_BTF={refused}");
        let log = connections_reported_once(&["env", &env]);
        let line = capturing_line(&log);
        assert!(
            line.contains(&format!("tcp_state={hook}")),
            "with {env}, {hook} follows the state changes: {line}"
        );
        assert!(
            log.iter().any(|l| l.contains(fallback)),
            "with {env}, the fallback is logged ({fallback})"
        );
    }
}

/// Where each record goes, and its state: enough to tell duplicates apart.
fn summary(records: &[&serde_json::Value]) -> String {
    let each: Vec<String> = records
        .iter()
        .map(|r| {
            format!(
                "[to {}:{} {}]",
                attr(r, "destination.address"),
                attr(r, "destination.port"),
                attr(r, "egress.connection.state")
            )
        })
        .collect();
    format!("{} {}", records.len(), each.join(" "))
}

/// `IPPROTO_MPTCP` (uapi/linux/in.h): 262, whose low byte is TCP's 6.
const IPPROTO_MPTCP: libc::c_int = 262;

/// An MPTCP socket connected to `addr`, or nothing when this kernel has no MPTCP
/// (not built, or `net.mptcp.enabled=0`).
fn mptcp_connect(addr: std::net::SocketAddrV4) -> Option<TcpStream> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket syscalls on a descriptor this function owns.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            IPPROTO_MPTCP,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is a new socket owned by nothing else.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `sin` is a valid sockaddr_in of the length given.
    let rc = unsafe {
        libc::connect(
            fd,
            (&raw const sin).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "MPTCP connect: {}", std::io::Error::last_os_error());
    Some(stream)
}

/// An MPTCP connect opens two sockets that both go CLOSE -> SYN_SENT: the MPTCP socket
/// (`sk_protocol` 262) and its first subflow, a TCP socket, which is the attempt on the
/// wire. Only the subflow is a TCP attempt: read as a byte, 262 would pass for TCP and the
/// MPTCP socket would give every connection a second record, to 0.0.0.0:0 (it has no
/// destination of its own at SYN_SENT). Both state-change programs that read the socket
/// (tp_btf and the raw tracepoint) are checked.
#[test]
fn an_mptcp_connect_is_reported_once_by_its_tcp_subflow() {
    require_root();
    // MPTCP sockets are refused while net.mptcp.enabled is 0: switched on (a host setting
    // that changes nothing for plain TCP sockets); a kernel without MPTCP fails here.
    std::fs::write("/proc/sys/net/mptcp/enabled", "1")
        .expect("net.mptcp.enabled (a kernel with CONFIG_MPTCP)");
    // SAFETY: a socket created and closed at once, to prove MPTCP works here.
    let probe = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, IPPROTO_MPTCP) };
    assert!(
        probe >= 0,
        "an MPTCP socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: closes the descriptor just created.
    unsafe { libc::close(probe) };
    for (wrapper, program) in [
        (&[][..], "tp_btf"),
        (
            &["env", "EGRESS_TEST_REFUSE_TP_BTF=1"][..],
            "raw_tracepoint",
        ),
    ] {
        let collector = start_collector(wrapper);
        let (addr, server, _listener) = sink();
        let std::net::SocketAddr::V4(addr_v4) = addr else {
            unreachable!("the sink listens on IPv4")
        };
        let mut ports = Vec::new();
        for _ in 0..CONNECTIONS {
            let mut stream = mptcp_connect(addr_v4).expect("MPTCP socket");
            ports.push(stream.local_addr().expect("local address").port());
            stream.write_all(&[7u8; PAYLOAD]).expect("write");
            drop(stream);
        }
        server.join().expect("server");
        thread::sleep(Duration::from_millis(300));
        let (clean, stdout, stderr) = collector.stop(Duration::from_secs(30)).expect("stop");
        assert!(clean, "collector failed:\n{}", stderr.join("\n"));
        assert!(
            capturing_line(&stderr).contains(&format!("tcp_state={program}")),
            "{}",
            capturing_line(&stderr)
        );
        let records = parse(&stdout);
        let mut problems = Vec::new();
        for port in &ports {
            // This socket's records: to the listener, or to nowhere (the MPTCP socket's).
            let of_socket = |kind: &str| -> Vec<&serde_json::Value> {
                records
                    .iter()
                    .filter(|r| {
                        attr(r, "egress.event") == kind
                            && attr(r, "source.port") == *port
                            && [addr.port(), 0].contains(
                                &(attr(r, "destination.port").as_u64().unwrap_or(1) as u16),
                            )
                    })
                    .collect()
            };
            match of_socket("tcp_connect").as_slice() {
                [r] if attr(r, "destination.port") == addr.port()
                    && attr(r, "egress.connection.state") == "established" => {}
                other => problems.push(format!(
                    "{program}, port {port}: connect records {}",
                    summary(other)
                )),
            }
            match of_socket("tcp_close").as_slice() {
                [r] if attr(r, "destination.port") == addr.port() => {}
                other => problems.push(format!(
                    "{program}, port {port}: close records {}",
                    summary(other)
                )),
            }
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }
}

/// The names of the programs process `pid` holds (by the program ids in its fds' info),
/// truncated by the kernel to 15 bytes.
fn programs_held_by(pid: u32) -> Vec<String> {
    let ids = support::host::ids_held_by(pid, "prog_id");
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| ids.contains(&p.id()))
        .filter_map(|p| p.name_as_str().map(str::to_owned))
        .collect()
}

/// A reset is only ever reported on a close record, so the hook on the resets this host
/// sends costs every RST it sends a program run only where closes are followed
/// (`--close-records`, or OTLP's spans and durations): not with the default flags. No
/// program runs on the resets it receives (the peer's reset is known from the close's
/// `sk_err`), with any flags.
#[test]
fn the_reset_hook_is_attached_only_where_closes_are_followed() {
    require_root();
    let resets = |names: &[String]| {
        names
            .iter()
            .filter(|n| n.starts_with("raw_tp_tcp_rec") || n.starts_with("raw_tp_tcp_sen"))
            .cloned()
            .collect::<Vec<_>>()
    };
    for (args, want) in [
        (&[][..], &[][..]),
        (&["--close-records"][..], &["raw_tp_tcp_send"][..]),
    ] {
        let collector = RunningCollector::start(
            std::path::Path::new(COLLECTOR),
            args,
            Duration::from_secs(60),
        )
        .expect("collector starts");
        let names = programs_held_by(collector.pid());
        let (ok, _, stderr) = collector.stop(Duration::from_secs(30)).expect("stops");
        assert!(ok, "collector failed:\n{}", stderr.join("\n"));
        assert!(
            names.iter().any(|n| n.contains("inet_so")),
            "{args:?}: the state program is among {names:?}"
        );
        // The kernel keeps the first 15 characters of a program's name.
        assert_eq!(resets(&names), want, "{args:?}: programs {names:?}");
    }
}
