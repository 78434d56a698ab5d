//! What users exclude or aggregate is decided in the kernel: excluded destinations and
//! namespaces never become records (and are counted), repeated connections become a few
//! records whose counts add up to every connection made.

mod support;

use std::{
    collections::HashMap,
    net::{SocketAddr, TcpStream, UdpSocket},
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use egress_testkit::{
    collector::RunningCollector,
    docker::{self, Container, Pod},
    ports::unused_port,
};
use serde_json::Value;
use support::host::{last_stat, require_root, sink_port};

const COLLECTOR: &str = env!("CARGO_BIN_EXE_egress-collector");

fn records(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

/// This process's records, by (event, destination address, destination port): count of
/// records and the connections they stand for.
fn ours(records: &[Value]) -> HashMap<(String, String, u64), (u64, u64)> {
    let me = u64::from(std::process::id());
    let mut by = HashMap::new();
    for r in records
        .iter()
        .filter(|r| r["attributes"]["process.pid"] == me)
    {
        let a = &r["attributes"];
        let key = (
            a["egress.event"].as_str().unwrap_or_default().to_owned(),
            a["destination.address"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            a["destination.port"].as_u64().unwrap_or_default(),
        );
        let count = a["egress.connection.count"].as_u64().unwrap_or(1);
        let entry = by.entry(key).or_insert((0, 0));
        entry.0 += 1;
        entry.1 += count;
    }
    by
}

/// Attempts: refused ones count too (nothing listens on `[::1]` for the IPv4 sink).
fn tcp_connects(to: SocketAddr, n: u64) {
    for _ in 0..n {
        let _ = TcpStream::connect(to);
    }
}

/// Each from a new socket, all kept open until the last send so no source port is
/// reused: `n` distinct flows to the same destination.
fn udp_sends(to: SocketAddr, n: u64) {
    let bind = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let sockets: Vec<UdpSocket> = (0..n)
        .map(|_| {
            let socket = UdpSocket::bind(bind).expect("bind");
            socket.send_to(b"x", to).expect("send");
            socket
        })
        .collect();
    drop(sockets);
}

fn stop(collector: RunningCollector) -> (String, Vec<String>) {
    let (ok, stdout, stderr) = collector
        .stop(Duration::from_secs(30))
        .expect("collector stops");
    assert!(ok, "collector failed:\n{}", stderr.join("\n"));
    (stdout, stderr)
}

#[test]
fn excluded_destinations_are_dropped_in_the_kernel_and_counted() {
    // As many prefixes of each family as the programs' configuration holds (8 and 4),
    // the one that matches last: every one of them is compared.
    excluded_destinations_are_dropped(
        "10.0.0.0/8,192.0.2.0/24,198.51.100.0/24,203.0.113.0/24,169.254.0.0/16,\
         100.64.0.0/10,172.16.0.0/12,127.0.0.1/32",
        "fd00:10:96::/112,fe80::/10,2001:db8::/32,::1/128",
    );
}

#[test]
fn many_excluded_prefixes_are_dropped_through_the_trie() {
    // More prefixes of each family than the configuration holds (8 and 4): all in the
    // families' LPM tries.
    excluded_destinations_are_dropped(
        "127.0.0.1/32,10.0.0.0/8,192.0.2.0/24,198.51.100.0/24,203.0.113.0/24,\
         169.254.0.0/16,100.64.0.0/10,172.16.0.0/12,192.168.0.0/16",
        "::1/128,fd00:10:96::/112,fe80::/10,2001:db8::/32,fc00::/7",
    );
}

/// Connections to the IPv4 prefixes `v4` (which hold 127.0.0.1, not 127.0.0.2 or
/// 127.0.0.3) and to the IPv6 prefixes `v6` (which hold `::1`) are dropped in the kernel
/// and counted; the rest is reported.
fn excluded_destinations_are_dropped(v4: &str, v6: &str) {
    require_root();
    let port = sink_port();
    const N: u64 = 40;
    let collector = RunningCollector::start(
        Path::new(COLLECTOR),
        &[
            "--exclude-cidr",
            v4,
            "--exclude-cidr",
            v6,
            "--cgroup-rate-limit",
            "0",
        ],
        Duration::from_secs(60),
    )
    .expect("collector starts");
    let excluded_tcp: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let kept_tcp: SocketAddr = format!("127.0.0.2:{port}").parse().expect("addr");
    tcp_connects(excluded_tcp, N);
    tcp_connects(kept_tcp, N);
    // Nothing listens there: UDP needs no peer. A port of this test's own: the other
    // tests of this process (the same pid) send UDP too, while this collector runs.
    let udp = unused_port();
    udp_sends(format!("[::1]:{udp}").parse().expect("addr"), N);
    udp_sends(format!("127.0.0.1:{udp}").parse().expect("addr"), N);
    udp_sends(format!("127.0.0.3:{udp}").parse().expect("addr"), N);
    std::thread::sleep(Duration::from_millis(500));
    let (stdout, stderr) = stop(collector);

    let seen = ours(&records(&stdout));
    let p = u64::from(port);
    assert_eq!(
        seen.get(&("tcp_connect".into(), "127.0.0.2".into(), p)),
        Some(&(N, N)),
        "every connection to a destination not excluded is a record: {seen:?}"
    );
    assert_eq!(
        seen.get(&("udp_send".into(), "127.0.0.3".into(), u64::from(udp))),
        Some(&(N, N)),
        "{seen:?}"
    );
    for address in ["127.0.0.1", "::1"] {
        assert!(
            !seen.keys().any(|(_, a, _)| a == address),
            "nothing to the excluded {address}: {seen:?}"
        );
    }
    let filtered = last_stat(&stderr, "filtered").expect("kernel filtered counter");
    eprintln!("kept {N} + {N}, kernel filtered {filtered}");
    // Ours (3N), and anything else on this machine talking to 127.0.0.1 meanwhile.
    assert!(filtered >= 3 * N, "filtered {filtered} >= {}", 3 * N);
}

#[test]
fn repeated_connections_become_few_records_whose_counts_add_up() {
    repeated_connections_add_up(&[]);
}

/// The same with every aggregate on one repeat slot per CPU (a test hook): the three
/// destinations' aggregates collide there, the slot goes to another key only once user
/// space has read its window, and the counts still add up.
#[test]
fn repeats_add_up_when_aggregates_share_a_repeat_slot() {
    repeated_connections_add_up(&["env", "EGRESS_TEST_ONE_REPEAT_SLOT=1"]);
}

/// Repeated TCP and UDP connections to three destinations with aggregation on, the
/// collector run under `wrapper`: few records, whose counts add up to every connection.
fn repeated_connections_add_up(wrapper: &[&str]) {
    require_root();
    let (busy, other) = (sink_port(), sink_port());
    // A UDP port of this test's own (see above).
    let udp = unused_port();
    const BUSY: u64 = 3000;
    const OTHER: u64 = 25;
    const UDP: u64 = 200;
    let collector = RunningCollector::start_wrapped(
        wrapper,
        Path::new(COLLECTOR),
        &["--aggregate-window", "1s", "--cgroup-rate-limit", "0"],
        Duration::from_secs(60),
    )
    .expect("collector starts");
    let started = std::time::Instant::now();
    let started_at = SystemTime::now();
    tcp_connects(format!("127.0.0.1:{busy}").parse().expect("addr"), BUSY);
    tcp_connects(format!("[::1]:{other}").parse().expect("addr"), OTHER);
    udp_sends(format!("127.0.0.1:{udp}").parse().expect("addr"), UDP);
    let elapsed = started.elapsed();
    // Every window of the connections ends within a second of now (1.5 s: the programs'
    // window clock is within two ticks of CLOCK_BOOTTIME); the stop comes 3 s after.
    let windows_over = SystemTime::now() + Duration::from_millis(1500);
    std::thread::sleep(Duration::from_secs(3));
    let (stdout, stderr) = stop(collector);

    let all = records(&stdout);
    let seen = ours(&all);
    let windows = elapsed.as_secs() + 2;
    for (key, made) in [
        (
            (
                "tcp_connect".to_owned(),
                "127.0.0.1".to_owned(),
                u64::from(busy),
            ),
            BUSY,
        ),
        (
            ("tcp_connect".to_owned(), "::1".to_owned(), u64::from(other)),
            OTHER,
        ),
        (
            (
                "udp_send".to_owned(),
                "127.0.0.1".to_owned(),
                u64::from(udp),
            ),
            UDP,
        ),
    ] {
        let (records, connections) = seen.get(&key).copied().unwrap_or_default();
        eprintln!("{key:?}: {made} made, {records} records, counts adding up to {connections}");
        assert_eq!(
            connections, made,
            "the counts add up to every connection: {key:?}"
        );
        // An opening and a closing record per window (more only when the first
        // connections of a window race on both CPUs).
        assert!(
            records <= 2 * windows + 4,
            "{records} records for {made} connections in ~{windows} windows"
        );
    }
    let mine = u64::from(std::process::id());
    assert!(
        all.iter()
            .filter(|r| r["attributes"]["process.pid"] == mine)
            .all(|r| r["attributes"]["egress.connection.count"].as_u64() >= Some(1)),
        "with aggregation on, every record carries its count"
    );
    // A window's closing record (its repeats; source port 0) is stamped with the window's
    // end on CLOCK_BOOTTIME, or the stop if that is earlier: the programs' window index
    // (taken from the tick count) must be the clock's. A window ends after its first
    // connection, so after this test's first one (less a margin for the clocks'
    // conversion), and within a second of its last. (Only this test's destinations: the
    // other tests of this process connect meanwhile.)
    let unix_ns = |at: SystemTime| {
        at.duration_since(UNIX_EPOCH)
            .expect("after the epoch")
            .as_nanos() as u64
    };
    let (from_ns, over_ns) = (unix_ns(started_at) - 200_000_000, unix_ns(windows_over));
    let ports = [u64::from(busy), u64::from(other), u64::from(udp)];
    let closings: Vec<u64> = all
        .iter()
        .filter(|r| {
            let a = &r["attributes"];
            a["process.pid"] == mine
                && a["source.port"] == 0
                && a["destination.port"]
                    .as_u64()
                    .is_some_and(|port| ports.contains(&port))
        })
        .map(|r| r["time_unix_nano"].as_u64().expect("time"))
        .collect();
    assert!(
        !closings.is_empty(),
        "repeats are reported by closing records"
    );
    assert!(
        closings.iter().all(|&at| (from_ns..=over_ns).contains(&at)),
        "closing records stamped at their windows' ends, between {from_ns} and {over_ns}: \
         {closings:?}"
    );
    let aggregated = last_stat(&stderr, "aggregated").expect("kernel aggregated counter");
    assert!(
        aggregated >= BUSY + OTHER + UDP - 3 * (2 * windows + 4),
        "the kernel counted the repeats: {aggregated}"
    );
}

#[test]
fn an_excluded_namespace_is_dropped_and_then_filtered_in_the_kernel() {
    require_root();
    docker::ensure_image().expect("test image");
    let gateway = docker::bridge_gateway().expect("gateway");
    let port = sink_port();
    const K: u32 = 30;
    let script = format!(
        "i=0; while [ $i -lt {K} ]; do nc -w 1 {gateway} {port} </dev/null; sleep 0.1; \
         i=$((i+1)); done"
    );
    let system_pod = Pod::new("dns", "kube-system", "coredns", Some("burstable"), 51);
    let shop_pod = Pod::new("web", "shop", "web", Some("besteffort"), 52);
    let system = Container::create(&system_pod, &script).expect("create system");
    let shop = Container::create(&shop_pod, &script).expect("create shop");
    let collector = RunningCollector::start(
        Path::new(COLLECTOR),
        &["--exclude-namespace", "kube-system,monitoring"],
        Duration::from_secs(60),
    )
    .expect("collector starts");
    let system_run = std::thread::spawn(move || {
        system.run_to_completion().expect("system runs");
        system
    });
    shop.run_to_completion().expect("shop runs");
    let _system = system_run.join().expect("system thread");
    std::thread::sleep(Duration::from_millis(500));
    let (stdout, stderr) = stop(collector);

    let all = records(&stdout);
    let to_port: Vec<&Value> = all
        .iter()
        .filter(|r| r["attributes"]["destination.port"] == port)
        .collect();
    let in_namespace = |ns: &str| {
        to_port
            .iter()
            .filter(|r| r["resource"]["k8s.namespace.name"] == ns)
            .count() as u32
    };
    assert_eq!(
        in_namespace("shop"),
        K,
        "the other namespace is reported in full"
    );
    assert_eq!(
        in_namespace("kube-system"),
        0,
        "the excluded one not at all"
    );
    let in_user_space = last_stat(&stderr, "filtered_by_namespace")
        .unwrap_or_else(|| panic!("no user counter in:\n{}", stderr.join("\n")));
    let in_kernel = last_stat(&stderr, "filtered").expect("kernel counter");
    eprintln!(
        "excluded namespace: {in_user_space} dropped by the collector, {in_kernel} in the kernel"
    );
    assert_eq!(
        in_user_space + in_kernel,
        u64::from(K),
        "each excluded connection is counted once"
    );
    assert!(
        in_kernel > 0,
        "once the collector has seen the cgroup, the kernel drops its connections"
    );
}

/// UDP flows are reported once per window, but a flow is one process's: two processes
/// sending the same 5-tuple within a window (SO_REUSEPORT here; in life a port freed by
/// one process and taken by the next, or two host-network pods) are each reported, each
/// with its own pid, or the second would never be attributed to its pod.
#[test]
fn two_processes_sending_the_same_udp_5_tuple_are_each_reported() {
    require_root();
    let destination = "127.0.0.1:9";
    let source_port = unused_port();
    let collector = RunningCollector::start(
        Path::new(COLLECTOR),
        &["--cgroup-rate-limit", "0"],
        Duration::from_secs(60),
    )
    .expect("collector starts");
    // Two processes, one after the other, each sending from 127.0.0.1:<source_port>.
    let script = format!(
        "import os, socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n\
         s.bind(('127.0.0.1', {source_port}))\n\
         s.sendto(b'x', ('127.0.0.1', 9))\n\
         print(os.getpid())\n"
    );
    let pids: Vec<u64> = (0..2)
        .map(|_| {
            let out = std::process::Command::new("python3")
                .args(["-c", &script])
                .output()
                .expect("python3 runs");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .expect("a pid")
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let (stdout, _) = stop(collector);
    let mut reported: Vec<u64> = records(&stdout)
        .iter()
        .map(|r| &r["attributes"])
        .filter(|a| {
            a["egress.event"] == "udp_send"
                && a["source.port"] == u64::from(source_port)
                && format!(
                    "{}:{}",
                    a["destination.address"].as_str().unwrap_or(""),
                    a["destination.port"]
                ) == destination
        })
        .filter_map(|a| a["process.pid"].as_u64())
        .collect();
    reported.sort_unstable();
    let mut want = pids.clone();
    want.sort_unstable();
    assert_eq!(
        reported, want,
        "one record per process for the same 5-tuple"
    );
}
