//! The kernel keeps each process's identity (namespaces, nodename, cgroup names, ...) and
//! checks on every connection what could have changed it. Node agents move threads
//! between namespaces: these tests do the same with a real thread, and check that each
//! connection is reported where it was made, and that the cached identity is still used
//! while nothing changed. Each runs with the state hook reading through typed pointers
//! (`tp_btf`) and through helpers (the raw tracepoint, as the kprobe family does).

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddr},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use egress_testkit::{
    collector::RunningCollector,
    ports::unused_port,
    records::{attr, records_to},
    require_root,
};
use serde_json::Value;

const COLLECTOR: &str = env!("CARGO_BIN_EXE_egress-collector");

/// The state hooks the tests run under: the environment that selects each, and the
/// name the collector's start line gives it.
const HOOKS: [(&[&str], &str); 2] = [
    (&[], "tp_btf"),
    (&["env", "EGRESS_TEST_REFUSE_TP_BTF=1"], "raw_tracepoint"),
];

/// Held while a test's thread hops: the kernel caches one identity per process, and the
/// two tests' threads (one process) connecting at once would each find the other's
/// there, read theirs again every time, and never meet the cached one they test. The
/// process name is changed while it is held, too.
static HOPPING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The process name while a visit's first connect is made, and while its second is.
const FIRST_NAME: &str = "hop-first";
const SECOND_NAME: &str = "hop-second";

/// Network namespaces made by `ip netns add`, with their loopback up; deleted on drop.
struct NetNamespaces(Vec<PathBuf>);

impl NetNamespaces {
    fn new(names: &[&str]) -> Self {
        let made: Vec<String> = (names.iter())
            .map(|n| format!("egress-moves-{n}-{}", std::process::id()))
            .collect();
        for ns in &made {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        Self(
            made.iter()
                .map(|n| Path::new("/run/netns").join(n))
                .collect(),
        )
    }
}

impl Drop for NetNamespaces {
    fn drop(&mut self) {
        for path in &self.0 {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?}: {status}");
}

/// UTS namespaces kept by a bind mount (`unshare --uts=<file>`), each with its own
/// hostname; unmounted and removed on drop.
struct UtsNamespaces(Vec<PathBuf>);

impl UtsNamespaces {
    fn new(names: &[&str]) -> Self {
        let mut made = Self(Vec::new());
        for name in names {
            let host = format!("egress-moves-{name}");
            let file = std::env::temp_dir().join(format!("{host}-uts-{}", std::process::id()));
            std::fs::write(&file, "").expect("the namespace's mount point");
            made.0.push(file.clone());
            let uts = format!("--uts={}", file.display());
            let status = Command::new("unshare")
                .args([uts.as_str(), "hostname", &host])
                .status()
                .expect("run unshare");
            assert!(status.success(), "unshare {uts} hostname {host}: {status}");
        }
        made
    }
}

impl Drop for UtsNamespaces {
    fn drop(&mut self) {
        for file in &self.0 {
            let _ = Command::new("umount").arg(file).status();
            let _ = std::fs::remove_file(file);
        }
    }
}

/// Moves the calling thread into the namespace open as `ns`, of type `kind`.
fn enter(ns: &File, kind: libc::c_int) {
    // SAFETY: setns on this thread only, with a valid namespace fd.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), kind) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// Names this process (its leader's `comm`, which records carry as the process name).
fn name_process(name: &str) {
    std::fs::write("/proc/self/comm", name).expect("rename the process");
}

/// A TCP connect to 127.0.0.1:`port` from the calling thread (refused: nothing listens
/// there); the source port it had.
fn connect_refused(port: u16) -> u16 {
    // SAFETY: plain socket calls on a socket this function owns and closes.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(Ipv4Addr::LOCALHOST).to_be(),
            },
            sin_zero: [0; 8],
        };
        let size = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let rc = libc::connect(fd, (&raw const to).cast(), size);
        let error = std::io::Error::last_os_error();
        assert!(
            rc != 0 && error.raw_os_error() == Some(libc::ECONNREFUSED),
            "the connect was to be refused: {rc} {error}"
        );
        let mut bound: libc::sockaddr_in = std::mem::zeroed();
        let mut len = size;
        let rc = libc::getsockname(fd, (&raw mut bound).cast(), &mut len);
        assert_eq!(rc, 0, "getsockname: {}", std::io::Error::last_os_error());
        libc::close(fd);
        u16::from_be(bound.sin_port)
    }
}

/// One visit of the hopping thread to a namespace: the source ports of its two connects
/// there, and what the namespace's records must say.
struct Visit {
    ports: [u16; 2],
    expected: Value,
}

/// A thread enters each of `namespaces` (of type `kind`) in turn, 10 times, going back to
/// its own in between, faster than the cached identity ages (a second). In each it
/// connects, the process is renamed, and it connects again. `observe` says, inside,
/// what the records must carry.
fn hop(
    kind: libc::c_int,
    own: &str,
    namespaces: &[PathBuf],
    port: u16,
    observe: fn() -> Value,
) -> Vec<Visit> {
    let own = File::open(own).expect("the thread's own namespace");
    let files: Vec<File> = (namespaces.iter())
        .map(|p| File::open(p).expect("open a namespace"))
        .collect();
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let mut visits = Vec::new();
                for _ in 0..10 {
                    for file in &files {
                        enter(file, kind);
                        name_process(FIRST_NAME);
                        let first = connect_refused(port);
                        name_process(SECOND_NAME);
                        let second = connect_refused(port);
                        visits.push(Visit {
                            ports: [first, second],
                            expected: observe(),
                        });
                        enter(&own, kind);
                    }
                }
                visits
            })
            .join()
            .expect("the hopping thread")
    })
}

/// Runs `visit` (a hop) under each of [`HOOKS`], and checks that every record carries
/// `key` as its visit expects, and the first connect's process name on both (the second
/// connect used the identity the first one cached).
fn each_connect_reported_where_it_was_made(key: &str, visit: impl Fn(u16) -> Vec<Visit>) {
    for (wrapper, hook) in HOOKS {
        let port = unused_port();
        let collector = RunningCollector::start_wrapped(
            wrapper,
            Path::new(COLLECTOR),
            &["--attributes", "full", "--stats-interval", "1h"],
            Duration::from_secs(60),
        )
        .expect("collector starts");
        let original = std::fs::read_to_string("/proc/self/comm").expect("process name");
        let hopping = HOPPING.lock().unwrap_or_else(|e| e.into_inner());
        let visits = visit(port);
        name_process(original.trim_end());
        drop(hopping);
        let (records, stderr) = collector.stop_after_poll();
        let start = stderr
            .iter()
            .find(|l| l.contains("Capturing egress connections."))
            .unwrap_or_else(|| panic!("no start line:\n{}", stderr.join("\n")));
        assert!(start.contains(&format!("tcp_state={hook}")), "{start}");
        let mine = records_to(
            &records,
            SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            "tcp_connect",
        );
        let by_port = |port: u16| {
            let found: Vec<&&Value> = (mine.iter())
                .filter(|r| attr(r, "source.port") == port)
                .collect();
            assert_eq!(
                found.len(),
                1,
                "{hook}: one record from port {port}: {mine:#?}"
            );
            *found[0]
        };
        for (i, visit) in visits.iter().enumerate() {
            for (n, port) in visit.ports.into_iter().enumerate() {
                let record = by_port(port);
                assert_eq!(
                    (attr(record, key), attr(record, "process.executable.name")),
                    (&visit.expected, &Value::from(FIRST_NAME)),
                    "{hook}: visit {i}, connect {n}: {key} of the namespace it was made in; the \
                     process name the visit's first connect read (the second used the cached \
                     identity): {record:#}"
                );
            }
        }
        assert_eq!(mine.len(), 2 * visits.len(), "{hook}: {mine:#?}");
    }
}

/// setns() frees the nsproxy a thread leaves and makes the next one at the same address,
/// every time: while the cache compared the nsproxy's address, the connections in B were
/// reported with A's network namespace.
#[test]
fn a_thread_that_hops_between_network_namespaces_is_reported_in_each() {
    require_root();
    let namespaces = NetNamespaces::new(&["a", "b"]);
    each_connect_reported_where_it_was_made("egress.namespace.net", |port| {
        hop(
            libc::CLONE_NEWNET,
            "/proc/thread-self/ns/net",
            &namespaces.0,
            port,
            || {
                let ns = std::fs::metadata("/proc/thread-self/ns/net").expect("netns");
                Value::from(ns.ino())
            },
        )
    });
}

/// As above with UTS namespaces: each connection carries the nodename of the namespace it
/// was made in (the nodename that tells a pod's, or a `hostNetwork` pod's node's).
#[test]
fn a_thread_that_hops_between_uts_namespaces_is_reported_with_each_nodename() {
    require_root();
    let namespaces = UtsNamespaces::new(&["a", "b"]);
    each_connect_reported_where_it_was_made("egress.uts.nodename", |port| {
        hop(
            libc::CLONE_NEWUTS,
            "/proc/thread-self/ns/uts",
            &namespaces.0,
            port,
            || {
                let name = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("name");
                Value::from(name.trim_end())
            },
        )
    });
}

/// Every process on one identity cache slot (a test hook): two processes that connect in
/// turn find the slot the other's, keep their identities in the LRU map, and take the
/// slot over from each other once the other's identity there is stale. They share what
/// the cache checks (namespaces, cgroup, exec count: bash run under two names by this
/// process), so only the slot's owner tells their identities apart: every connection is
/// still reported with its own process's name, as with a slot each.
#[test]
fn processes_that_share_an_identity_slot_are_each_reported_with_their_own_identity() {
    require_root();
    const CONNECTS: usize = 150;
    let port = unused_port();
    let dir = std::env::temp_dir().join(format!("egress-slot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory for the copies");
    let bash = |name: &str| {
        let path = dir.join(name);
        std::fs::copy("/bin/bash", &path).expect("a copy of bash");
        path
    };
    let shells = [bash("egress-slot-a"), bash("egress-slot-b")];
    let collector = RunningCollector::start_wrapped(
        &["env", "EGRESS_TEST_ONE_IDENTITY_SLOT=1"],
        Path::new(COLLECTOR),
        &[
            "--attributes",
            "full",
            "--stats-interval",
            "1h",
            "--cgroup-rate-limit",
            "0",
        ],
        Duration::from_secs(60),
    )
    .expect("collector starts");
    // `true 3<>/dev/tcp/...`: bash connects in its own process (a builtin, no fork); the
    // port is closed, so each is a refused attempt, reported once.
    let script = format!(
        "for i in $(seq {CONNECTS}); do true 3<>/dev/tcp/127.0.0.1/{port}; sleep 0.02; done \
         2>/dev/null; exit 0"
    );
    let children: Vec<_> = (shells.iter())
        .map(|shell| {
            Command::new(shell)
                .args(["-c", &script])
                .spawn()
                .expect("bash runs")
        })
        .collect();
    let mut pids = Vec::new();
    for (shell, mut child) in shells.iter().zip(children) {
        let pid = child.id();
        assert!(child.wait().expect("wait").success(), "{shell:?} failed");
        let name = shell.file_name().and_then(|n| n.to_str()).expect("a name");
        pids.push((name.to_owned(), pid));
    }
    let (records, stderr) = collector.stop_after_poll();
    let _ = std::fs::remove_dir_all(&dir);
    for (name, pid) in &pids {
        let theirs: Vec<&Value> = (records.iter())
            .filter(|r| attr(r, "process.pid") == *pid && attr(r, "destination.port") == port)
            .collect();
        assert_eq!(
            theirs.len(),
            CONNECTS,
            "every connect of {name} is reported:\n{}",
            stderr.join("\n")
        );
        for record in theirs {
            assert_eq!(
                attr(record, "process.executable.name"),
                &Value::from(name.as_str()),
                "a connection of {name} carries its own process's identity: {record:#}"
            );
        }
    }
}
