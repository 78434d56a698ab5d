//! DNS names on connections, on this machine's kernel (tracepoint mode), against a real
//! resolver: dnsmasq in its own network namespace, joined to the host's by a veth pair,
//! serving A, AAAA, a CNAME chain, short TTLs and NXDOMAIN (everything else under
//! `.test`). Clients: glibc's getaddrinfo (Python's socket module, with a Kubernetes-like
//! `search` list and `ndots:5`), a Go-like client that writes and reads a connected UDP
//! socket, and DNS over TCP; each then connects to a listener at the resolved address.
//! The Python clients run in the host network namespace in cgroups of their own (the
//! hostNetwork case), so containers and pods are told apart by cgroup.

mod support;

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::Duration,
};

use egress_testkit::{
    collector::RunningCollector,
    otlp_run::OtlpRun,
    records::{attr, parse},
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use serde_json::Value;
use simple_dns::{CLASS, Name, Packet, Question, TYPE, rdata::RData};
use support::{
    host::{require_root, sh},
    receiver::{int_attr, int_value, str_attr},
};

const COLLECTOR: &str = env!("CARGO_BIN_EXE_egress-collector");
/// Where every resolved address listens (in the server namespace).
const PORT: u16 = 8053;

/// The server namespace: dnsmasq, and the addresses its names resolve to.
struct Resolver {
    ns: String,
    host_if: String,
    subnet: u8,
    dnsmasq: Child,
    resolv_conf: PathBuf,
}

impl Resolver {
    fn v4(&self, last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 214, self.subnet, last)
    }

    fn v6(&self) -> Ipv6Addr {
        format!("fd53:{}::10", self.subnet)
            .parse()
            .expect("IPv6 address")
    }

    fn server(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.v4(1)), 53)
    }

    fn start() -> Self {
        static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = std::process::id();
        let subnet = ((id + n * 37) % 200) as u8 + 20;
        let ns = format!("edns-{id}-{n}");
        let (host_if, ns_if) = (
            format!("edh{}{n}", id % 100_000),
            format!("edn{}{n}", id % 100_000),
        );
        sh(&["ip", "netns", "add", &ns]);
        sh(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if, "netns", &ns,
        ]);
        let v4 = |last: u8| format!("10.214.{subnet}.{last}");
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", v4(2)),
            "dev",
            &host_if,
        ]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("fd53:{subnet}::2/64"),
            "dev",
            &host_if,
            "nodad",
        ]);
        sh(&["ip", "link", "set", &host_if, "up"]);
        for last in [1, 10, 11, 12, 13, 14, 15, 16, 17] {
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", v4(last)),
                "dev",
                &ns_if,
            ]);
        }
        sh(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("fd53:{subnet}::10/64"),
            "dev",
            &ns_if,
            "nodad",
        ]);
        sh(&["ip", "-n", &ns, "link", "set", &ns_if, "up"]);
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        let records = [
            format!("--host-record=a.test,{}", v4(10)),
            format!("--host-record=six.test,fd53:{subnet}::10"),
            format!("--host-record=target.test,{},300", v4(11)),
            "--cname=alias.test,mid.test".to_owned(),
            "--cname=mid.test,target.test".to_owned(),
            format!("--host-record=short.test,{},1", v4(12)),
            format!("--host-record=one.test,{}", v4(13)),
            format!("--host-record=two.test,{}", v4(13)),
            format!("--host-record=go.test,{}", v4(14)),
            format!("--host-record=tcp.test,{}", v4(15)),
            format!("--host-record=nbtcp.test,{}", v4(17)),
            format!("--host-record=sidecar.test,{}", v4(16)),
        ];
        let dnsmasq = Command::new("ip")
            .args(["netns", "exec", &ns, "dnsmasq", "--keep-in-foreground"])
            .args([
                "--no-resolv",
                "--no-hosts",
                "--local=/test/",
                "--bind-interfaces",
            ])
            .arg(format!("--listen-address={}", v4(1)))
            .arg("--pid-file=")
            .args(&records)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("dnsmasq (scripts/setup.sh installs dnsmasq-base)");
        let resolv_conf = std::env::temp_dir().join(format!("egress-dns-resolv-{id}-{n}.conf"));
        // What a Kubernetes pod gets: a search list and ndots:5, so `a.test` is first
        // asked as `a.test.svc.test` (NXDOMAIN).
        std::fs::write(
            &resolv_conf,
            format!(
                "nameserver {}\nsearch svc.test\noptions ndots:5 attempts:2 timeout:2\n",
                v4(1)
            ),
        )
        .expect("write resolv.conf");
        let resolver = Resolver {
            ns,
            host_if,
            subnet,
            dnsmasq,
            resolv_conf,
        };
        resolver.wait_until_serving();
        resolver
    }

    fn wait_until_serving(&self) {
        for _ in 0..50 {
            if query_udp_connected(self.server(), "a.test", TYPE::A).is_some() {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
        panic!("dnsmasq does not answer on {}", self.server());
    }

    /// Accepts connections on every address of the namespace, each held until the
    /// client closes it.
    fn listen(&self) {
        let path = format!("/run/netns/{}", self.ns);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open netns");
            // SAFETY: setns on this thread only, with a valid namespace fd.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}");
            // Dual stack: IPv4 clients arrive as IPv4-mapped addresses.
            let listener = TcpListener::bind((Ipv6Addr::UNSPECIFIED, PORT)).expect("listen");
            ready_tx.send(()).expect("ready");
            for stream in listener.incoming().flatten() {
                thread::spawn(move || {
                    let mut stream = stream;
                    let mut buf = [0u8; 64];
                    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
                });
            }
        });
        ready_rx.recv().expect("listener started");
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        let _ = self.dnsmasq.kill();
        let _ = self.dnsmasq.wait();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = std::fs::remove_file(&self.resolv_conf);
    }
}

/// Test cgroups, in the hierarchy whose leaf names the collector reads (a v1
/// controller's on hybrid hosts); removed on drop.
struct Cgroups {
    base: PathBuf,
    dirs: Vec<PathBuf>,
}

impl Cgroups {
    fn new() -> Self {
        let root = Path::new("/sys/fs/cgroup");
        let hierarchy = if root.join("cgroup.controllers").exists() {
            root.to_owned()
        } else {
            root.join("memory")
        };
        let base = hierarchy.join(format!("egress-dns-{}", std::process::id()));
        std::fs::create_dir_all(&base).expect("create the test cgroup");
        Self {
            base,
            dirs: Vec::new(),
        }
    }

    fn create(&mut self, relative: &str) -> PathBuf {
        let dir = self.base.join(relative);
        std::fs::create_dir_all(&dir).expect("create cgroup");
        let mut walk = dir.clone();
        while walk != self.base {
            if !self.dirs.contains(&walk) {
                self.dirs.push(walk.clone());
            }
            walk.pop();
        }
        dir
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        // Deepest first.
        self.dirs
            .sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for dir in self.dirs.iter().chain(std::iter::once(&self.base)) {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Runs a Python script in `cgroup`, in the host network namespace, resolving through
/// glibc with the test's resolv.conf (bind-mounted in a private mount namespace); waits
/// for it and returns its pid.
fn python_in(cgroup: &Path, resolver: &Resolver, script: &str) -> u32 {
    python_with(cgroup, resolver, script, "")
}

/// As [`python_in`], inside the resolver's network namespace (a pod's own namespace).
fn python_in_netns(cgroup: &Path, resolver: &Resolver, script: &str) -> u32 {
    python_with(
        cgroup,
        resolver,
        script,
        &format!("ip netns exec {} ", resolver.ns),
    )
}

fn python_with(cgroup: &Path, resolver: &Resolver, script: &str, prefix: &str) -> u32 {
    let inner = format!(
        "mount --bind {} /etc/resolv.conf && exec python3 -c \"$0\"",
        resolver.resolv_conf.display()
    );
    let outer = format!(
        "echo $$ > {}/cgroup.procs && exec {prefix}unshare -m sh -c '{inner}' \"$0\"",
        cgroup.display()
    );
    let out = Command::new("sh")
        .args(["-c", &outer, script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python3");
    let pid = out.id();
    let out = out.wait_with_output().expect("python3");
    assert!(
        out.status.success(),
        "client failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    pid
}

fn query_bytes(name: &str, qtype: TYPE, id: u16) -> Vec<u8> {
    let mut packet = Packet::new_query(id);
    packet.set_flags(simple_dns::PacketFlag::RECURSION_DESIRED);
    packet.questions.push(Question::new(
        Name::new_unchecked(name),
        qtype.into(),
        CLASS::IN.into(),
        false,
    ));
    packet.build_bytes_vec().expect("query")
}

fn first_address(bytes: &[u8]) -> Option<IpAddr> {
    let packet = Packet::parse(bytes).ok()?;
    packet.answers.iter().find_map(|r| match &r.rdata {
        RData::A(a) => Some(IpAddr::V4(a.address.into())),
        RData::AAAA(a) => Some(IpAddr::V6(a.address.into())),
        _ => None,
    })
}

/// What Go's resolver does: connect a UDP socket, write() the query, read() the answer.
fn query_udp_connected(server: SocketAddr, name: &str, qtype: TYPE) -> Option<IpAddr> {
    let socket = UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect(server).ok()?;
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .ok()?;
    let query = query_bytes(name, qtype, 0x4242);
    let fd = socket.as_raw_fd();
    // SAFETY: write and read on a socket this function owns, with buffers of the given
    // lengths.
    let sent = unsafe { libc::write(fd, query.as_ptr().cast(), query.len()) };
    if sent != query.len() as isize {
        return None;
    }
    let mut buf = [0u8; 1232];
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n <= 0 {
        return None;
    }
    first_address(&buf[..n as usize])
}

/// DNS over TCP: the 2-byte length, then the message; the answer read the same way.
fn query_tcp(server: SocketAddr, name: &str) -> IpAddr {
    ask_tcp(TcpStream::connect(server).expect("DNS over TCP"), name)
}

/// DNS over TCP as Go's resolver asks it: a non-blocking connect(2), which returns
/// `EINPROGRESS` (its exit hook returns on that), the socket polled until writable, then
/// the query written with write(2) and the answer read with read(2). No send hook sees
/// write(2): only the connect's own mark makes the answer's reads DNS.
fn query_tcp_non_blocking(server: SocketAddr, name: &str) -> IpAddr {
    let SocketAddr::V4(server) = server else {
        panic!("the resolver listens on IPv4")
    };
    // SAFETY: plain socket calls on a descriptor this function owns (handed to the
    // stream at the end), with buffers of the given lengths.
    unsafe {
        let first = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0);
        assert!(first >= 0, "socket");
        // A descriptor number no earlier query of this process used: a marked one, reused
        // (and a socket at a reused address), would catch the answer without this
        // connect's own mark.
        let fd = libc::fcntl(first, libc::F_DUPFD_CLOEXEC, 900);
        assert!(fd >= 900, "dup");
        libc::close(first);
        let stream = TcpStream::from_raw_fd(fd);
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as u16;
        addr.sin_port = server.port().to_be();
        addr.sin_addr.s_addr = u32::from(*server.ip()).to_be();
        let len = size_of::<libc::sockaddr_in>() as u32;
        let rc = libc::connect(fd, (&raw const addr).cast(), len);
        let error = std::io::Error::last_os_error();
        assert!(
            rc == -1 && error.raw_os_error() == Some(libc::EINPROGRESS),
            "a non-blocking connect to the resolver returned {rc} ({error})"
        );
        let mut writable = libc::pollfd {
            fd,
            events: libc::POLLOUT,
            revents: 0,
        };
        assert_eq!(libc::poll(&mut writable, 1, 5_000), 1, "connected in 5 s");
        if let Some(error) = stream.take_error().expect("SO_ERROR") {
            panic!("the non-blocking connect to the resolver failed: {error}");
        }
        stream.set_nonblocking(false).expect("blocking reads");
        ask_tcp(WriteRead(stream), name)
    }
}

/// A connected socket written with write(2) and read with read(2) (std's `TcpStream`
/// uses send(2) and recv(2)).
struct WriteRead(TcpStream);

impl Write for WriteRead {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // SAFETY: a write from a buffer of the given length, on a descriptor held open.
        let n = unsafe { libc::write(self.0.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Read for WriteRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // SAFETY: a read into a buffer of the given length, on a descriptor held open.
        let n = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
    }
}

/// Asks `name` over the connected `stream`.
fn ask_tcp(mut stream: impl Read + Write, name: &str) -> IpAddr {
    let query = query_bytes(name, TYPE::A, 0x4343);
    let mut framed = (query.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&query);
    stream.write_all(&framed).expect("send query");
    let mut buf = [0u8; 1234];
    let mut got = 0;
    while got < 2 || got < 2 + usize::from(u16::from_be_bytes([buf[0], buf[1]])) {
        let n = stream.read(&mut buf[got..]).expect("read answer");
        assert!(n > 0, "the DNS server closed early");
        got += n;
    }
    first_address(&buf[2..got]).expect("an address over TCP")
}

/// The records of `pid` of one `egress.event` to `dest` (any port when None).
fn records<'a>(all: &'a [Value], pid: u32, event: &str, dest: Option<IpAddr>) -> Vec<&'a Value> {
    all.iter()
        .filter(|r| {
            attr(r, "process.pid") == pid
                && attr(r, "egress.event") == event
                && dest.is_none_or(|d| attr(r, "destination.address") == d.to_string().as_str())
        })
        .collect()
}

struct Check<'a> {
    all: &'a [Value],
    problems: Vec<String>,
}

impl Check<'_> {
    /// Every TCP connection of `pid` to `dest` carries `server.address` = `name`.
    fn named(&mut self, what: &str, pid: u32, dest: IpAddr, name: &str, matched: &str) {
        let found = records(self.all, pid, "tcp_connect", Some(dest));
        if found.is_empty() {
            self.problems
                .push(format!("{what}: no connection to {dest}"));
        }
        for r in found {
            let got = (attr(r, "server.address"), attr(r, "egress.dns.match"));
            if got.0 != name || got.1 != matched {
                self.problems.push(format!(
                    "{what}: server.address {} ({}), want {name} ({matched})",
                    got.0, got.1
                ));
            }
            if attr(r, "network.peer.address") != dest.to_string().as_str()
                || attr(r, "network.peer.port") != PORT
                || attr(r, "destination.address") != dest.to_string().as_str()
            {
                self.problems
                    .push(format!("{what}: peer/destination not the IP and port: {r}"));
            }
        }
    }

    /// A DNS record of `pid` for `name` with `rcode`.
    fn lookup(&mut self, what: &str, pid: u32, name: &str, rcode: &str) -> Option<Value> {
        let found: Vec<_> = records(self.all, pid, "dns", None)
            .into_iter()
            .filter(|r| {
                attr(r, "dns.question.name") == name && attr(r, "dns.response_code") == rcode
            })
            .collect();
        match found.first() {
            Some(r) => Some((*r).clone()),
            None => {
                self.problems
                    .push(format!("{what}: no egress.dns record {name} {rcode}"));
                None
            }
        }
    }
}

/// The names' tests run one at a time: each collector sees the whole host, and their
/// checks count this process's records.
static NAMES_SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Answers read at the socket receives (`sock_recv_length`) where the kernel has that
/// tracepoint (this project's CI kernel does), else at the syscall exits.
#[test]
fn connections_carry_the_name_their_container_resolved() {
    let kallsyms = std::fs::read_to_string("/proc/kallsyms").expect("/proc/kallsyms");
    let hook = if kallsyms.contains(" __traceiter_sock_recv_length\n") {
        "sock_recv_length"
    } else {
        "syscall_exits"
    };
    names(&[], hook);
}

/// Answers read at the exits of read, recvfrom and recvmsg, as on kernels without
/// `sock_recv_length` (the `EGRESS_TEST_DNS_READ_EXITS` test hook).
#[test]
fn connections_carry_the_name_their_container_resolved_read_at_the_syscall_exits() {
    names(&["env", "EGRESS_TEST_DNS_READ_EXITS=1"], "syscall_exits");
}

/// `wrapper` starts the collector, whose start-up line names `dns_hook`.
fn names(wrapper: &[&str], dns_hook: &str) {
    require_root();
    let _serial = NAMES_SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let resolver = Resolver::start();
    resolver.listen();
    let mut cgroups = Cgroups::new();
    let collector = RunningCollector::start_wrapped(
        wrapper,
        Path::new(COLLECTOR),
        // --close-records: names are held by open connections where closes are followed.
        &[
            "--stdout",
            "--probe",
            "tracepoint",
            "--dns-ttl-floor",
            "1s",
            "--close-records",
        ],
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let port = PORT;

    // glibc, with the search list: A (asked first as a.test.svc.test), AAAA, a CNAME
    // chain, and a name that does not exist.
    let glibc = python_in(
        &cgroups.create("glibc"),
        &resolver,
        &format!(
            "import socket
for name, family in (('a.test', socket.AF_INET), ('six.test', socket.AF_INET6), ('alias.test', socket.AF_INET)):
    info = socket.getaddrinfo(name, {port}, family, socket.SOCK_STREAM)[0]
    s = socket.socket(info[0], socket.SOCK_STREAM); s.connect(info[4]); s.close()
try:
    socket.getaddrinfo('nope.test', {port}, socket.AF_INET)
    raise SystemExit('nope.test resolved')
except socket.gaierror:
    pass"
        ),
    );

    // A query no answer comes back for (no host at that address): sendto, as glibc.
    let lost = UdpSocket::bind("0.0.0.0:0").expect("bind");
    lost.send_to(
        &query_bytes("lost.test", TYPE::A, 0x4444),
        SocketAddr::new(IpAddr::V4(resolver.v4(99)), 53),
    )
    .expect("send the lost query");

    // Go-like (connected UDP, write/read) and DNS over TCP, from this process.
    let go_address =
        query_udp_connected(resolver.server(), "go.test", TYPE::A).expect("go.test answered");
    drop(TcpStream::connect((go_address, PORT)).expect("connect to go.test"));
    let tcp_address = query_tcp(resolver.server(), "tcp.test");
    drop(TcpStream::connect((tcp_address, PORT)).expect("connect to tcp.test"));
    let non_blocking_address = query_tcp_non_blocking(resolver.server(), "nbtcp.test");
    drop(TcpStream::connect((non_blocking_address, PORT)).expect("connect to nbtcp.test"));

    // glibc over TCP (RES_OPTIONS=use-vc): the length and the message in two reads.
    let glibc_tcp = python_in(
        &cgroups.create("glibc-tcp"),
        &resolver,
        &format!(
            "import os, socket
os.environ['RES_OPTIONS'] = 'use-vc'
socket.create_connection(('tcp.test', {port})).close()"
        ),
    );

    // A container in a network namespace of its own (the others share the host's).
    let netns = python_in_netns(
        &cgroups.create("own-netns"),
        &resolver,
        &format!("import socket; socket.create_connection(('a.test', {port})).close()"),
    );

    // Two containers, one address, two names.
    let one = python_in(
        &cgroups.create("ctr-one"),
        &resolver,
        &format!("import socket; socket.create_connection(('one.test', {port})).close()"),
    );
    let two = python_in(
        &cgroups.create("ctr-two"),
        &resolver,
        &format!("import socket; socket.create_connection(('two.test', {port})).close()"),
    );

    // TTL 1 s (floor 1 s): named while fresh, and while a connection to it stays open;
    // by the IP once expired with nothing open.
    let short = resolver.v4(12);
    let ttl = python_in(
        &cgroups.create("ttl"),
        &resolver,
        &format!(
            "import socket, time
held = socket.create_connection(('short.test', {port}))
time.sleep(2.5)
socket.create_connection(('{short}', {port})).close()
held.close()
time.sleep(2.5)
socket.create_connection(('{short}', {port})).close()"
        ),
    );

    // A sidecar resolves, the app container of the same pod connects by address.
    let pod = "pod0d5e0000-0000-4000-8000-000000000001";
    let sidecar = resolver.v4(16);
    python_in(
        &cgroups.create(&format!("{pod}/sidecar")),
        &resolver,
        &format!("import socket; socket.getaddrinfo('sidecar.test', {port}, socket.AF_INET)"),
    );
    let app = python_in(
        &cgroups.create(&format!("{pod}/app")),
        &resolver,
        &format!("import socket; socket.create_connection(('{sidecar}', {port})).close()"),
    );

    thread::sleep(Duration::from_millis(500));
    let (clean, stdout, stderr) = collector
        .stop(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        clean,
        "collector did not stop cleanly:\n{}",
        stderr.join("\n")
    );
    let hook = format!("dns=\"{dns_hook}\"");
    assert!(
        stderr.iter().any(|line| line.contains(&hook)),
        "the collector reads DNS answers elsewhere than {hook}:\n{}",
        stderr.join("\n")
    );
    let all = parse(&stdout);
    let mut check = Check {
        all: &all,
        problems: Vec::new(),
    };
    let me = std::process::id();

    check.named(
        "glibc A",
        glibc,
        IpAddr::V4(resolver.v4(10)),
        "a.test",
        "container",
    );
    check.named(
        "glibc AAAA",
        glibc,
        IpAddr::V6(resolver.v6()),
        "six.test",
        "container",
    );
    check.named(
        "glibc CNAME",
        glibc,
        IpAddr::V4(resolver.v4(11)),
        "alias.test",
        "container",
    );
    if let Some(r) = check.lookup("search list", glibc, "a.test.svc.test", "NXDOMAIN") {
        assert_eq!(attr(&r, "dns.answers"), &serde_json::json!([]));
    }
    check.lookup("NXDOMAIN", glibc, "nope.test", "NXDOMAIN");
    if let Some(r) = check.lookup("CNAME chain", glibc, "alias.test", "NOERROR")
        && attr(&r, "egress.dns.cname_chain") != &serde_json::json!(["mid.test", "target.test"])
    {
        let chain = attr(&r, "egress.dns.cname_chain");
        check.problems.push(format!("CNAME chain: {chain}"));
    }
    if let Some(r) = check.lookup("glibc A record", glibc, "a.test", "NOERROR") {
        let answers = serde_json::json!([resolver.v4(10).to_string()]);
        if attr(&r, "dns.answers") != &answers || attr(&r, "dns.question.type") != "A" {
            check.problems.push(format!("a.test record: {r}"));
        }
        if !attr(&r, "dns.lookup.duration")
            .as_f64()
            .is_some_and(|d| d > 0.0 && d < 5.0)
        {
            check.problems.push(format!("a.test latency: {r}"));
        }
    }
    let lost: Vec<_> = records(&all, me, "dns", None)
        .into_iter()
        .filter(|r| attr(r, "dns.question.name") == "lost.test")
        .collect();
    if lost.len() != 1 || attr(lost[0], "error.type") != "timeout" {
        check.problems.push(format!(
            "unanswered query: {lost:?}, want one with error.type timeout"
        ));
    }
    check.named(
        "own network namespace",
        netns,
        IpAddr::V4(resolver.v4(10)),
        "a.test",
        "container",
    );
    check.named("Go-like read()", me, go_address, "go.test", "container");
    check.named("DNS over TCP", me, tcp_address, "tcp.test", "container");
    check.named(
        "DNS over TCP, non-blocking",
        me,
        non_blocking_address,
        "nbtcp.test",
        "container",
    );
    check.named(
        "glibc over TCP",
        glibc_tcp,
        tcp_address,
        "tcp.test",
        "container",
    );
    if let Some(r) = check.lookup("glibc over TCP", glibc_tcp, "tcp.test", "NOERROR")
        && attr(&r, "network.transport") != "tcp"
    {
        check.problems.push(format!("glibc over TCP: not TCP: {r}"));
    }
    let same = IpAddr::V4(resolver.v4(13));
    check.named("container one", one, same, "one.test", "container");
    check.named("container two", two, same, "two.test", "container");
    check.named("sidecar", app, IpAddr::V4(sidecar), "sidecar.test", "pod");

    let ttl_connects = records(&all, ttl, "tcp_connect", Some(IpAddr::V4(short)));
    let names: Vec<_> = ttl_connects
        .iter()
        .map(|r| attr(r, "server.address").as_str().unwrap_or("?").to_owned())
        .collect();
    let want = vec![
        "short.test".to_owned(),
        "short.test".to_owned(),
        short.to_string(),
    ];
    if names != want {
        check
            .problems
            .push(format!("TTL: names in order {names:?}, want {want:?}"));
    }
    if let Some(r) = ttl_connects.last()
        && attr(r, "egress.dns.match") != "none"
    {
        check.problems.push(format!("TTL: expired match: {r}"));
    }

    // A lookup is a DNS record, not also a udp_send record to port 53.
    let folded = all.iter().any(|r| {
        [glibc, one, two, ttl, me].contains(&(attr(r, "process.pid").as_u64().unwrap_or(0) as u32))
            && (attr(r, "egress.event") == "udp_send" || attr(r, "egress.event") == "udp_connect")
            && attr(r, "destination.port") == 53
    });
    if folded {
        check
            .problems
            .push("a lookup's UDP flow record (port 53) was not folded".into());
    }

    assert!(
        check.problems.is_empty(),
        "{} problems:\n{}",
        check.problems.len(),
        check.problems.join("\n")
    );
}

/// Over OTLP: `egress.dns` log records (a repeat in its window logged once), the name on
/// close records and spans, `egress.dns.queries` by response code, `dns.lookup.duration`,
/// and `egress.connections` per `server.address` behind its flag.
#[test]
fn dns_records_metrics_and_names_over_otlp() {
    require_root();
    let resolver = Resolver::start();
    resolver.listen();
    let run = OtlpRun::start(
        Path::new(COLLECTOR),
        &[
            "--probe",
            "tracepoint",
            "--close-records",
            "--connection-spans",
            "--metrics-server-address",
        ],
    );
    let go = query_udp_connected(resolver.server(), "go.test", TYPE::A).expect("go.test");
    let again = query_udp_connected(resolver.server(), "go.test", TYPE::A).expect("go.test");
    assert_eq!(go, again);
    assert_eq!(
        query_udp_connected(resolver.server(), "nope.test", TYPE::A),
        None,
        "nope.test has no address"
    );
    let mut stream = TcpStream::connect((go, PORT)).expect("connect to go.test");
    stream.write_all(b"hello").expect("write");
    drop(stream);
    thread::sleep(Duration::from_millis(2500));
    let received = run.stop().received;
    let me = i64::from(std::process::id());
    let mine = |attributes: &[KeyValue]| int_attr(attributes, "process.pid") == Some(me);

    let dns_logs: Vec<_> = received
        .log_records()
        .filter(|r| r.event_name == "egress.dns" && mine(&r.attributes))
        .map(|r| {
            (
                str_attr(&r.attributes, "dns.question.name").unwrap_or_default(),
                str_attr(&r.attributes, "dns.response_code").unwrap_or_default(),
            )
        })
        .collect();
    let count = |name: &str, rcode: &str| {
        dns_logs
            .iter()
            .filter(|(n, r)| n == name && r == rcode)
            .count()
    };
    assert_eq!(count("go.test", "NOERROR"), 1, "{dns_logs:?}");
    assert_eq!(count("nope.test", "NXDOMAIN"), 1, "{dns_logs:?}");

    let to_go = |attributes: &[KeyValue]| {
        mine(attributes) && str_attr(attributes, "network.peer.address") == Some(go.to_string())
    };
    let closes: Vec<_> = received
        .log_records()
        .filter(|r| r.event_name == "egress.connection.close" && to_go(&r.attributes))
        .collect();
    assert_eq!(closes.len(), 1, "one close record to go.test");
    assert_eq!(
        str_attr(&closes[0].attributes, "server.address").as_deref(),
        Some("go.test")
    );
    let spans: Vec<_> = received.spans().filter(|s| to_go(&s.attributes)).collect();
    assert_eq!(spans.len(), 1, "one span to go.test");
    assert_eq!(
        str_attr(&spans[0].attributes, "server.address").as_deref(),
        Some("go.test")
    );

    // The last export of each metric holds the cumulative values.
    let mut queries = BTreeMap::new();
    for p in received.sum_points("egress.dns.queries") {
        if let (Some(rcode), Some(n)) = (str_attr(&p.attributes, "dns.response_code"), int_value(p))
        {
            let slot = queries.entry(rcode).or_insert(0);
            *slot = (*slot).max(n);
        }
    }
    let lookups = received
        .histogram_points("dns.lookup.duration")
        .map(|p| p.count)
        .max()
        .unwrap_or(0);
    let named_connections = received
        .sum_points("egress.connections")
        .filter(|p| str_attr(&p.attributes, "server.address").as_deref() == Some("go.test"))
        .count();
    // go.test twice (the repeat counted though not logged again), and this host's
    // other processes may have looked names up too.
    assert!(
        queries.get("NOERROR").is_some_and(|n| *n >= 2),
        "{queries:?}"
    );
    assert!(
        queries.get("NXDOMAIN").is_some_and(|n| *n >= 1),
        "{queries:?}"
    );
    assert!(lookups >= 2, "dns.lookup.duration count {lookups}");
    assert!(
        named_connections > 0,
        "egress.connections per server.address"
    );
}
