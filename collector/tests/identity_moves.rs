//! The kernel keeps each process's identity (namespaces, nodename, cgroup names, ...) and
//! checks on every connection what could have changed it. Node agents move threads
//! between namespaces: these tests do the same with a real thread, and check that each
//! connection is reported where it was made.

use std::{
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

const COLLECTOR: &str = env!("CARGO_BIN_EXE_egress-collector");

/// Held while a test's thread hops: the kernel caches one identity per process, and the
/// two tests' threads (one process) connecting at once would each find the other's
/// there, read theirs again every time, and never meet the cached one they test.
static HOPPING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Network namespaces made by `ip netns add`, with their loopback up; deleted on drop.
struct Namespaces(Vec<String>);

impl Namespaces {
    fn new(names: &[&str]) -> Self {
        let made = Self(
            names
                .iter()
                .map(|n| format!("egress-moves-{n}-{}", std::process::id()))
                .collect(),
        );
        for ns in &made.0 {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        made
    }

    fn path(&self, i: usize) -> PathBuf {
        Path::new("/run/netns").join(&self.0[i])
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?}: {status}");
}

/// Moves the calling thread into the namespace open as `ns`, of type `kind`.
fn enter(ns: &std::fs::File, kind: libc::c_int) {
    // SAFETY: setns on this thread only, with a valid namespace fd.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), kind) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
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

/// A thread enters namespace A, connects, goes back to the host's, enters B, connects,
/// and so on, faster than the kernel's cached identity ages (a second). setns() frees
/// the nsproxy it leaves and the next one is made at the same address, every time: the
/// connections in B were reported with A's network namespace while the cache compared
/// the nsproxy's address.
#[test]
fn a_thread_that_hops_between_network_namespaces_is_reported_in_each() {
    require_root();
    let namespaces = Namespaces::new(&["a", "b"]);
    let port = unused_port();
    let collector = start_collector();
    let paths: Vec<PathBuf> = (0..2).map(|i| namespaces.path(i)).collect();
    // (source port, network namespace inode) of each connect, in order.
    let hopping = HOPPING.lock().unwrap_or_else(|e| e.into_inner());
    let made: Vec<(u16, u64)> = std::thread::spawn(move || {
        let host = std::fs::File::open("/proc/thread-self/ns/net").expect("host netns");
        let files: Vec<std::fs::File> = (paths.iter())
            .map(|p| std::fs::File::open(p).expect("open netns"))
            .collect();
        let mut made = Vec::new();
        for _ in 0..10 {
            for file in &files {
                enter(file, libc::CLONE_NEWNET);
                let inode = std::fs::metadata("/proc/thread-self/ns/net")
                    .expect("netns")
                    .ino();
                made.push((connect_refused(port), inode));
                enter(&host, libc::CLONE_NEWNET);
            }
        }
        made
    })
    .join()
    .expect("the hopping thread");
    drop(hopping);
    let reported: Vec<(u16, u64)> = connects_to(collector, port)
        .iter()
        .map(|r| {
            (
                source_port(r),
                attr(r, "egress.namespace.net").as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        reported,
        made,
        "each connect in its own network namespace, in order (source port, netns inode); \
         the namespaces: {:?}",
        (0..2)
            .map(|i| std::fs::metadata(namespaces.path(i)).map(|m| m.ino()).ok())
            .collect::<Vec<_>>()
    );
}

/// UTS namespaces kept by a bind mount (`unshare --uts=<file>`), each with its own
/// hostname; unmounted and removed on drop.
struct UtsNamespaces(Vec<(PathBuf, String)>);

impl UtsNamespaces {
    fn new(names: &[&str]) -> Self {
        let made = Self(
            (names.iter())
                .map(|n| {
                    let host = format!("egress-moves-{n}");
                    let file =
                        std::env::temp_dir().join(format!("{host}-uts-{}", std::process::id()));
                    (file, host)
                })
                .collect(),
        );
        for (file, host) in &made.0 {
            std::fs::write(file, "").expect("the namespace's mount point");
            let uts = format!("--uts={}", file.display());
            let status = Command::new("unshare")
                .args([uts.as_str(), "hostname", host])
                .status()
                .expect("run unshare");
            assert!(status.success(), "unshare {uts} hostname {host}: {status}");
        }
        made
    }
}

impl Drop for UtsNamespaces {
    fn drop(&mut self) {
        for (file, _) in &self.0 {
            let _ = Command::new("umount").arg(file).status();
            let _ = std::fs::remove_file(file);
        }
    }
}

/// As the network namespaces above, with UTS namespaces: a thread that enters A, goes
/// back and enters B has each connection reported with the nodename of the namespace it
/// was made in (the nodename that tells a pod's, or a `hostNetwork` pod's node's).
#[test]
fn a_thread_that_hops_between_uts_namespaces_is_reported_with_each_nodename() {
    require_root();
    let namespaces = UtsNamespaces::new(&["a", "b"]);
    let port = unused_port();
    let collector = start_collector();
    let files: Vec<(PathBuf, String)> = namespaces.0.clone();
    // (source port, nodename) of each connect, in order.
    let hopping = HOPPING.lock().unwrap_or_else(|e| e.into_inner());
    let made: Vec<(u16, String)> = std::thread::spawn(move || {
        let host = std::fs::File::open("/proc/thread-self/ns/uts").expect("host uts");
        let opened: Vec<(std::fs::File, String)> = (files.iter())
            .map(|(p, name)| (std::fs::File::open(p).expect("open uts ns"), name.clone()))
            .collect();
        let mut made = Vec::new();
        for _ in 0..10 {
            for (file, name) in &opened {
                enter(file, libc::CLONE_NEWUTS);
                made.push((connect_refused(port), name.clone()));
                enter(&host, libc::CLONE_NEWUTS);
            }
        }
        made
    })
    .join()
    .expect("the hopping thread");
    drop(hopping);
    let reported: Vec<(u16, String)> = connects_to(collector, port)
        .iter()
        .map(|r| {
            let nodename = attr(r, "egress.uts.nodename").as_str().unwrap_or("?");
            (source_port(r), nodename.to_owned())
        })
        .collect();
    assert_eq!(
        reported, made,
        "each connect with its own namespace's nodename, in order (source port, nodename)"
    );
}

/// A collector with every attribute set (namespaces, nodename), statistics quiet.
fn start_collector() -> RunningCollector {
    RunningCollector::start(
        Path::new(COLLECTOR),
        &["--attributes", "full", "--stats-interval", "1h"],
        Duration::from_secs(60),
    )
    .expect("collector starts")
}

/// Stops `collector` (after its reader's 100 ms poll) and returns this process's
/// `tcp_connect` records to 127.0.0.1:`port`, in order.
fn connects_to(collector: RunningCollector, port: u16) -> Vec<serde_json::Value> {
    std::thread::sleep(Duration::from_millis(300));
    let (ok, stdout, stderr) = collector
        .stop(Duration::from_secs(30))
        .expect("collector stops");
    assert!(ok, "collector failed:\n{}", stderr.join("\n"));
    let records = egress_testkit::records::parse(&stdout);
    records_to(
        &records,
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        "tcp_connect",
    )
    .into_iter()
    .cloned()
    .collect()
}

fn source_port(record: &serde_json::Value) -> u16 {
    attr(record, "source.port").as_u64().unwrap_or(0) as u16
}
