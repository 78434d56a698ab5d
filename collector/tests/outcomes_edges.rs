//! The rarer ways a TCP connection goes, on this machine's kernel (tracepoint mode): a
//! reset this host sends while closing (unread data, `SO_LINGER` 0) and a simultaneous
//! open (both sides connect() to each other at once), a TCP Fast Open send, whose
//! SYN_SENT comes inside sendto() rather than connect(), and non-blocking connects, whose
//! exits return `-EINPROGRESS`.

mod support;

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use egress_testkit::{
    collector::RunningCollector,
    records::{attr, parse, records_to},
};
use serde_json::Value;
use support::host::{require_root, sh};

const COLLECTOR: &str = env!("CARGO_BIN_EXE_egress-collector");

fn start(extra: &[&str]) -> RunningCollector {
    let mut args = vec!["--probe", "tracepoint", "--stats-interval", "1h"];
    args.extend_from_slice(extra);
    RunningCollector::start(
        std::path::Path::new(COLLECTOR),
        &args,
        Duration::from_secs(60),
    )
    .expect("collector starts")
}

fn set_linger_zero(fd: i32) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket the caller owns.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as u32,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER");
}

/// A server that accepts one connection, writes `greeting` bytes, and returns what its
/// read after that gave (the client's abortive close must reset it). The listener is
/// returned too: while the caller holds it, no later server is given the same port, so
/// each case's records are told apart by their destination.
fn resetting_client(
    greeting: usize,
    abort: impl FnOnce(TcpStream) + Send + 'static,
) -> (SocketAddr, std::io::Result<usize>, TcpListener) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("listen");
    let addr = listener.local_addr().expect("addr");
    let client = thread::spawn(move || {
        let stream = TcpStream::connect(addr).expect("connect");
        // Wait until the greeting is in the receive buffer, without reading it.
        let mut peek = [0u8; 1];
        if greeting > 0 {
            stream.peek(&mut peek).expect("peek");
            thread::sleep(Duration::from_millis(50));
        }
        abort(stream);
    });
    let (mut s, _) = listener.accept().expect("accept");
    s.write_all(&vec![5u8; greeting]).expect("greet");
    client.join().expect("client");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut buf = [0u8; 16];
    (addr, s.read(&mut buf), listener)
}

/// close() with unread data and close() with `SO_LINGER` 0 send a RST after the socket
/// reached CLOSE: both close records say `reset` by `local`, as one the peer sent says
/// `peer`; an orderly close says neither.
#[test]
fn a_reset_this_host_sends_while_closing_is_reported_local() {
    require_root();
    let collector = start(&["--close-records", "--pending-report", "30s"]);
    let (unread, unread_read, _unread_listener) = resetting_client(100, drop);
    let (linger, linger_read, _linger_listener) = resetting_client(0, |s| {
        set_linger_zero(s.as_raw_fd());
        drop(s);
    });
    let (orderly, orderly_read, _orderly_listener) = resetting_client(0, drop);
    thread::sleep(Duration::from_millis(300));
    let (clean, stdout, stderr) = collector.stop(Duration::from_secs(30)).expect("stop");
    assert!(clean, "collector failed:\n{}", stderr.join("\n"));
    // The kernel did send the RSTs: the server's read failed with ECONNRESET.
    for (what, read) in [("unread data", &unread_read), ("SO_LINGER 0", &linger_read)] {
        assert_eq!(
            read.as_ref().map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionReset),
            "{what}: the server should see the reset"
        );
    }
    assert_eq!(orderly_read.as_ref().ok(), Some(&0), "orderly close: EOF");
    let records = parse(&stdout);
    let mut problems = Vec::new();
    for (what, dest, reset, error) in [
        (
            "unread data",
            unread,
            Value::from("local"),
            Value::from("reset"),
        ),
        ("SO_LINGER 0", linger, "local".into(), "reset".into()),
        ("orderly", orderly, Value::Null, Value::Null),
    ] {
        let closes = records_to(&records, dest, "tcp_close");
        let [close] = closes.as_slice() else {
            problems.push(format!("{what}: {} close records, want 1", closes.len()));
            continue;
        };
        for (key, want) in [("egress.tcp.reset", &reset), ("error.type", &error)] {
            if attr(close, key) != want {
                problems.push(format!(
                    "{what}: {key} is {}, want {want}",
                    attr(close, key)
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{}\nrecords of this process:\n{}",
        problems.join("\n"),
        records
            .iter()
            .filter(|r| attr(r, "process.pid") == std::process::id())
            .map(|r| r["attributes"].to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// A TCP Fast Open send (sendto with `MSG_FASTOPEN`) takes its socket to SYN_SENT inside
/// sendto(), not connect(): the connect exit's TCP mark must not be left for that
/// thread, or the thread's next connect(), of a UDP socket, would be taken for TCP and
/// never reported. Both are reported, from the one thread.
#[test]
fn a_fast_open_send_leaves_the_threads_next_udp_connect_reported() {
    require_root();
    let fast_open = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_fastopen").expect("sysctl");
    assert!(
        fast_open.trim().parse::<u32>().expect("a number") & 1 == 1,
        "net.ipv4.tcp_fastopen has the client side off: {fast_open}"
    );
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("listen");
    let port = listener.local_addr().expect("addr").port();
    // Held for the test: no other socket gets its port.
    let udp = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("udp bind");
    let udp_port = udp.local_addr().expect("addr").port();
    // `full`: the records carry the thread id.
    let collector = start(&["--attributes", "full"]);
    // One thread: the fast open send, then the UDP connect (no datagram: the connect is
    // all there is to report).
    let script = format!(
        "import socket, threading\n\
         t = socket.socket()\n\
         t.sendto(b'x', socket.MSG_FASTOPEN, ('127.0.0.1', {port}))\n\
         u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         u.connect(('127.0.0.1', {udp_port}))\n\
         print(threading.get_native_id(), flush=True)\n"
    );
    let (tid, records) = run_on_one_thread(&script, collector);
    let of_thread: Vec<&Value> = records
        .iter()
        .filter(|r| attr(r, "thread.id") == tid)
        .collect();
    for (event, destination) in [("tcp_connect", port), ("udp_connect", udp_port)] {
        assert!(
            of_thread.iter().any(|r| attr(r, "egress.event") == event
                && attr(r, "destination.address") == "127.0.0.1"
                && attr(r, "destination.port") == destination),
            "no {event} record to 127.0.0.1:{destination} of thread {tid}: {of_thread:#?}"
        );
    }
    drop(listener);
}

/// A non-blocking connect(2) returns `-EINPROGRESS`, on which its exit returns without
/// a mark (SYN_SENT makes none for a non-blocking socket): its outcome still comes from
/// the state changes, and a blocking connect and UDP connects after it on the same thread
/// are each reported (no mark is left behind, none is missing).
#[test]
fn non_blocking_connects_are_reported_and_leave_the_threads_udp_connects_reported() {
    require_root();
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let (_refusing, refused) = bound_not_listening();
    // Held for the test: no other socket gets their ports.
    let udp = [(); 2].map(|()| std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("udp"));
    let [first_udp, second_udp] = udp.each_ref().map(|u| u.local_addr().expect("addr").port());
    let collector = start(&["--attributes", "full"]);
    let script = format!(
        "import errno, select, socket, threading\n\
         def non_blocking(port):\n    \
         s = socket.socket(); s.setblocking(False)\n    \
         rc = s.connect_ex(('127.0.0.1', port))\n    \
         assert rc == errno.EINPROGRESS, rc\n    \
         select.select([], [s], [], 5)\n    \
         err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR); s.close(); return err\n\
         assert non_blocking({port}) == 0\n\
         assert non_blocking({refused}) == errno.ECONNREFUSED\n\
         socket.socket(socket.AF_INET, socket.SOCK_DGRAM).connect(('127.0.0.1', {first_udp}))\n\
         socket.create_connection(('127.0.0.1', {port})).close()\n\
         socket.socket(socket.AF_INET, socket.SOCK_DGRAM).connect(('127.0.0.1', {second_udp}))\n\
         print(threading.get_native_id(), flush=True)\n"
    );
    let (tid, records) = run_on_one_thread(&script, collector);
    let of_thread = |event: &str, destination: u16| -> Vec<&Value> {
        records
            .iter()
            .filter(|r| {
                attr(r, "thread.id") == tid
                    && attr(r, "egress.event") == event
                    && attr(r, "destination.address") == "127.0.0.1"
                    && attr(r, "destination.port") == destination
            })
            .collect()
    };
    let accepted = of_thread("tcp_connect", port);
    let states: Vec<&Value> = accepted
        .iter()
        .map(|r| attr(r, "egress.connection.state"))
        .collect();
    assert_eq!(
        states,
        [&Value::from("established"); 2],
        "the non-blocking and the blocking connect, each established: {accepted:#?}"
    );
    let refusals = of_thread("tcp_connect", refused);
    assert!(
        refusals.len() == 1 && attr(refusals[0], "error.type") == "refused",
        "the refused non-blocking connect, once, refused: {refusals:#?}"
    );
    for destination in [first_udp, second_udp] {
        assert_eq!(
            of_thread("udp_connect", destination).len(),
            1,
            "the UDP connect to {destination}, once"
        );
    }
    drop(listener);
}

/// A blocking connect with a send timeout (`SO_SNDTIMEO`) returns `-EINPROGRESS` once
/// the timeout expires, as a non-blocking one does: its exit returns on that value, so
/// its SYN_SENT must not mark it either, or the mark would stay and the thread's next
/// UDP connect would be taken for TCP and go unreported.
#[test]
fn a_connect_past_its_send_timeout_leaves_the_threads_udp_connect_reported() {
    require_root();
    // Held for the test: no other socket gets its port.
    let udp = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("udp bind");
    let udp_port = udp.local_addr().expect("addr").port();
    let collector = start(&["--attributes", "full"]);
    // A listener whose accept queue is full (backlog 0, one connection waiting in it):
    // the kernel drops the next SYN, whose connect stays in SYN_SENT past its timeout.
    let script = format!(
        "import errno, socket, struct, threading\n\
         l = socket.socket(); l.bind(('127.0.0.1', 0)); l.listen(0)\n\
         waiting = socket.create_connection(l.getsockname())\n\
         s = socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack('ll', 0, 200000))\n\
         rc = s.connect_ex(l.getsockname())\n\
         assert rc == errno.EINPROGRESS, rc\n\
         socket.socket(socket.AF_INET, socket.SOCK_DGRAM).connect(('127.0.0.1', {udp_port}))\n\
         print(threading.get_native_id(), flush=True)\n"
    );
    let (tid, records) = run_on_one_thread(&script, collector);
    let udp_connects = records
        .iter()
        .filter(|r| {
            attr(r, "thread.id") == tid
                && attr(r, "egress.event") == "udp_connect"
                && attr(r, "destination.port") == udp_port
        })
        .count();
    assert_eq!(
        udp_connects, 1,
        "the UDP connect after the timed-out one, once"
    );
    drop(udp);
}

/// Runs the python `script`, which prints the id of the thread that did its work, then
/// stops `collector`: that id and the collector's records.
fn run_on_one_thread(script: &str, collector: RunningCollector) -> (u64, Vec<Value>) {
    let output = Command::new("python3")
        .args(["-c", script])
        .output()
        .expect("python3 runs");
    assert!(output.status.success(), "the script failed: {output:?}");
    let tid: u64 = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("the thread printed its id");
    thread::sleep(Duration::from_millis(300));
    let (clean, stdout, stderr) = collector.stop(Duration::from_secs(30)).expect("stop");
    assert!(clean, "collector failed:\n{}", stderr.join("\n"));
    (tid, parse(&stdout))
}

/// A network namespace with loopback up; removed on drop.
struct Netns(String);

impl Netns {
    fn new(name: String) -> Self {
        sh(&["ip", "netns", "add", &name]);
        let ns = Netns(name);
        sh(&["ip", "-n", &ns.0, "link", "set", "lo", "up"]);
        ns
    }

    fn exec(&self, args: &[&str]) {
        let mut all = vec!["ip", "netns", "exec", &self.0];
        all.extend_from_slice(args);
        sh(&all);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A tracefs instance recording `sock:inet_sock_set_state` of two ports; removed on drop.
struct StateTrace(std::path::PathBuf);

impl StateTrace {
    fn new(ports: [u16; 2]) -> Self {
        let dir = std::path::PathBuf::from(format!(
            "/sys/kernel/tracing/instances/egress-simopen-{}",
            std::process::id()
        ));
        std::fs::create_dir(&dir).expect("tracefs instance");
        let event = dir.join("events/sock/inet_sock_set_state");
        std::fs::write(
            event.join("filter"),
            format!("sport == {} || sport == {}", ports[0], ports[1]),
        )
        .expect("filter");
        std::fs::write(event.join("enable"), "1").expect("enable");
        StateTrace(dir)
    }

    fn text(&self) -> String {
        std::fs::read_to_string(self.0.join("trace")).expect("read trace")
    }
}

impl Drop for StateTrace {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.join("events/sock/inet_sock_set_state/enable"), "0");
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A non-blocking TCP socket bound to `from`, connect()ing to `to` (SYN sent).
fn bound_connect(from: SocketAddrV4, to: SocketAddrV4) -> i32 {
    let sin = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = size_of::<libc::sockaddr_in>() as u32;
    // SAFETY: plain socket calls on a socket this function owns.
    unsafe {
        let fd = libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        );
        assert!(fd >= 0, "socket");
        let local = sin(from);
        let rc = libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len);
        assert_eq!(rc, 0, "bind {from}");
        let remote = sin(to);
        let rc = libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len);
        assert!(
            rc == -1 && *libc::__errno_location() == libc::EINPROGRESS,
            "connect should be in progress"
        );
        fd
    }
}

/// Whether `fd` finished connecting (writable, no error) within `timeout`.
fn connected(fd: i32, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: poll and getsockopt on a socket the caller owns.
    unsafe {
        if libc::poll(&mut pfd, 1, timeout.as_millis() as i32) != 1 {
            return false;
        }
        let mut err = 0i32;
        let mut len = size_of::<i32>() as u32;
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut i32).cast(),
            &mut len,
        );
        err == 0
    }
}

/// Two sockets bound to fixed ports connect() to each other at once: each SYN reaches a
/// socket in SYN_SENT, which goes to SYN_RECV and answers with a SYN-ACK. On loopback
/// the first SYN would find the other socket still closed (refused), so the SYNs are
/// dropped in a private namespace until both sockets are in SYN_SENT, and the drop is
/// lifted: the retransmitted SYNs cross. The state changes the kernel traced show the
/// path was taken; both attempts are then reported established, once each.
#[test]
fn a_simultaneous_open_is_reported_established() {
    require_root();
    let ns = Netns::new(format!("eo-simopen-{}", std::process::id()));
    let (a, b) = (
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, 47_011),
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, 47_012),
    );
    let script = std::env::temp_dir().join(format!("egress-simopen-{}.nft", std::process::id()));
    std::fs::write(
        &script,
        format!(
            "table inet egress_simopen {{
                chain output {{
                    type filter hook output priority 0; policy accept;
                    tcp sport {{ {}, {} }} drop
                }}
            }}",
            a.port(),
            b.port()
        ),
    )
    .expect("nft script");
    ns.exec(&["nft", "-f", script.to_str().expect("utf-8")]);
    let _ = std::fs::remove_file(&script);
    let trace = StateTrace::new([a.port(), b.port()]);
    let collector = start(&["--pending-report", "30s"]);

    let path = format!("/run/netns/{}", ns.0);
    let started = Instant::now();
    let both = thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        // SAFETY: setns on this thread only, with a valid namespace fd.
        assert_eq!(
            unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        let fa = bound_connect(a, b);
        let fb = bound_connect(b, a);
        (fa, fb)
    });
    let (fa, fb) = both.join().expect("connects");
    thread::sleep(Duration::from_millis(200));
    ns.exec(&["nft", "delete", "table", "inet", "egress_simopen"]);
    // The SYNs are retransmitted after the initial RTO (1 s).
    let (ok_a, ok_b) = (
        connected(fa, Duration::from_secs(5)),
        connected(fb, Duration::from_secs(5)),
    );
    let took = started.elapsed();
    // SAFETY: closing the sockets this test opened.
    unsafe {
        libc::close(fa);
        libc::close(fb);
    }
    thread::sleep(Duration::from_millis(300));
    let (clean, stdout, stderr) = collector.stop(Duration::from_secs(30)).expect("stop");
    assert!(clean, "collector failed:\n{}", stderr.join("\n"));
    let states = trace.text();
    assert!(
        ok_a && ok_b,
        "both sockets connect ({ok_a}, {ok_b}):\n{states}"
    );
    assert!(
        states
            .matches("oldstate=TCP_SYN_SENT newstate=TCP_SYN_RECV")
            .count()
            >= 1
            && states
                .matches("oldstate=TCP_SYN_RECV newstate=TCP_ESTABLISHED")
                .count()
                >= 1,
        "the kernel should take the simultaneous path:\n{states}"
    );
    let records = parse(&stdout);
    let mut problems = Vec::new();
    for dest in [a, b] {
        let found = records_to(&records, dest.into(), "tcp_connect");
        let [r] = found.as_slice() else {
            problems.push(format!(
                "to {dest}: {} records, want 1: {found:?}",
                found.len()
            ));
            continue;
        };
        if attr(r, "egress.connection.state") != "established" {
            problems.push(format!("to {dest}: {r}"));
        }
        let h = attr(r, "egress.tcp.handshake.duration")
            .as_f64()
            .unwrap_or(0.0);
        if !(0.9..=took.as_secs_f64()).contains(&h) {
            problems.push(format!(
                "to {dest}: handshake {h} s, connecting took {took:?}"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{}\nstate changes:\n{states}",
        problems.join("\n")
    );
}

/// The collector as [`start`] starts it, with the test hook skipping every completion to
/// `port`.
fn start_skipping_completions(port: u16, extra: &[&str]) -> RunningCollector {
    let hook = format!("EGRESS_TEST_SKIP_COMPLETIONS_TO_PORT={port}");
    let mut args = vec![
        "--stdout",
        "--probe",
        "tracepoint",
        "--stats-interval",
        "1h",
    ];
    args.extend_from_slice(extra);
    RunningCollector::start_wrapped(
        &["env", &hook],
        std::path::Path::new(COLLECTOR),
        &args,
        Duration::from_secs(60),
    )
    .expect("collector starts")
}

/// An attempt whose completion the programs never saw is still reported. The kernel
/// skips a program run that would nest in another on one CPU (a softirq's SYN-ACK while
/// the connecting task's run is in progress; `recursion_misses`), so the attempt waits
/// in its slot until its socket's address, freed and reused, begins another attempt.
/// The test hook skips every completion to one port: each of these attempts is then
/// reported once, `unknown` when a later attempt reused its address (the client's
/// socket is freed at its abortive close, and the next one on the same CPU usually takes
/// its place), or `pending` after `--pending-report` when none did.
#[test]
fn an_attempt_whose_completion_was_skipped_is_still_reported() {
    require_root();
    const ATTEMPTS: usize = 20;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("listen");
    let addr = listener.local_addr().expect("addr");
    let collector = start_skipping_completions(addr.port(), &["--pending-report", "2s"]);
    for _ in 0..ATTEMPTS {
        let stream = TcpStream::connect(addr).expect("connect");
        let (accepted, _) = listener.accept().expect("accept");
        set_linger_zero(stream.as_raw_fd());
        drop(stream);
        drop(accepted);
    }
    // Past `--pending-report`, and the pending reader's next look (every poll, 250 ms, here).
    thread::sleep(Duration::from_secs(4));
    let (clean, stdout, stderr) = collector.stop(Duration::from_secs(30)).expect("stop");
    assert!(clean, "collector failed:\n{}", stderr.join("\n"));
    assert!(
        stderr
            .iter()
            .any(|l| l.contains("EGRESS_TEST_SKIP_COMPLETIONS_TO_PORT")),
        "the test hook is not on:\n{}",
        stderr.join("\n")
    );
    let records = parse(&stdout);
    let attempts = records_to(&records, addr, "tcp_connect");
    let state = |r: &Value| {
        attr(r, "egress.connection.state")
            .as_str()
            .map(str::to_owned)
    };
    let unknown = attempts
        .iter()
        .filter(|r| state(r).as_deref() == Some("unknown"))
        .count();
    let pending = attempts
        .iter()
        .filter(|r| state(r).as_deref() == Some("pending"))
        .count();
    let shown = || {
        attempts
            .iter()
            .map(|r| r["attributes"].to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        (unknown + pending, attempts.len()),
        (ATTEMPTS, ATTEMPTS),
        "each attempt once, unknown or pending:\n{}",
        shown()
    );
    assert!(unknown > 0, "no address was reused:\n{}", shown());
    // How it went was not seen: no handshake time, no error.
    for record in attempts
        .iter()
        .filter(|r| state(r).as_deref() == Some("unknown"))
    {
        for key in ["egress.tcp.handshake.duration", "error.type"] {
            assert_eq!(attr(record, key), &Value::Null, "{key}:\n{}", shown());
        }
    }
}

/// The same when the attempt that reuses the address is dropped: a skipped completion
/// is reported by a new attempt the destination filter drops (`abandon`), which claims no
/// slot of its own. Each attempt to the hooked port is refused (nothing listens there), so
/// no server socket is made: its client socket is freed when connect() fails, and the
/// next socket this thread makes, the excluded attempt's, takes that address.
#[test]
fn a_skipped_completion_is_reported_by_a_dropped_attempt_at_its_address() {
    require_root();
    const ATTEMPTS: usize = 10;
    // Bound, never listening: connects to it are refused, and no other socket takes it.
    let holder = bound_not_listening();
    let port = holder.1;
    let hooked = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let excluded = SocketAddr::from((Ipv4Addr::new(127, 0, 0, 2), port));
    let collector = start_skipping_completions(
        port,
        &["--pending-report", "60s", "--exclude-cidr", "127.0.0.2/32"],
    );
    for _ in 0..ATTEMPTS {
        let refused = TcpStream::connect(hooked).map_err(|e| e.kind());
        assert_eq!(refused.err(), Some(std::io::ErrorKind::ConnectionRefused));
        let dropped = TcpStream::connect(excluded).map_err(|e| e.kind());
        assert_eq!(dropped.err(), Some(std::io::ErrorKind::ConnectionRefused));
    }
    thread::sleep(Duration::from_millis(500));
    let (clean, stdout, stderr) = collector.stop(Duration::from_secs(30)).expect("stop");
    assert!(clean, "collector failed:\n{}", stderr.join("\n"));
    drop(holder);
    let records = parse(&stdout);
    let attempts = records_to(&records, hooked, "tcp_connect");
    let states: Vec<&Value> = attempts
        .iter()
        .map(|r| attr(r, "egress.connection.state"))
        .collect();
    // No pending report within the run (60 s): only the excluded attempts, made at
    // the freed addresses, can have reported them.
    assert_eq!(
        states,
        vec![&Value::from("unknown"); ATTEMPTS],
        "each refused attempt once, unknown"
    );
    assert!(
        records_to(&records, excluded, "tcp_connect").is_empty(),
        "the excluded destination is not reported"
    );
}

/// A TCP socket bound to a loopback port the kernel picks, never listening (connects to
/// it are refused), and its port.
fn bound_not_listening() -> (std::os::fd::OwnedFd, u16) {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket calls on a descriptor this function owns.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0, "socket");
        let owned = std::os::fd::OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as u16;
        addr.sin_addr.s_addr = u32::from(Ipv4Addr::LOCALHOST).to_be();
        let len = size_of::<libc::sockaddr_in>() as u32;
        assert_eq!(libc::bind(fd, (&raw const addr).cast(), len), 0, "bind");
        let mut bound: libc::sockaddr_in = std::mem::zeroed();
        let mut bound_len = len;
        assert_eq!(
            libc::getsockname(fd, (&raw mut bound).cast(), &mut bound_len),
            0,
            "getsockname"
        );
        (owned, u16::from_be(bound.sin_port))
    }
}
