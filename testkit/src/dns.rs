//! The DNS scenario, for the test VMs (kprobe and fentry families): a real dnsmasq on
//! the guest's loopback serves `.test` names; clients resolve each name in one of the ways
//! resolvers read answers, then connect to the address they got; the collector's record
//! of each connection must carry the name (`server.address`), and each lookup must be an
//! `egress.dns` record. The clients are this process: the resolver is the real server.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::Duration,
};

use serde_json::Value;

use crate::collector::RunningCollector;

/// Where dnsmasq listens in the guest.
pub const SERVER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 53);
/// Where every resolved address accepts connections.
const PORT: u16 = 8053;

/// How a client reads the answer, and the name (and address) it resolves.
#[derive(Clone, Copy)]
enum Way {
    /// Go's resolver: connect, write, read (ITER_UBUF in the kernel).
    ConnectedRead,
    /// glibc and musl: sendto, recvfrom.
    RecvFrom,
    /// recvmsg with an iovec (ITER_IOVEC in the kernel).
    RecvMsg,
    /// An AF_INET6 socket to the IPv4-mapped server (udpv6_recvmsg).
    V4MappedV6,
    /// DNS over TCP: the 2-byte length and the message.
    Tcp,
}

impl Way {
    const ALL: [Way; 5] = [
        Way::ConnectedRead,
        Way::RecvFrom,
        Way::RecvMsg,
        Way::V4MappedV6,
        Way::Tcp,
    ];

    fn name(self) -> &'static str {
        match self {
            Way::ConnectedRead => "read.test",
            Way::RecvFrom => "recvfrom.test",
            Way::RecvMsg => "recvmsg.test",
            Way::V4MappedV6 => "mapped.test",
            Way::Tcp => "tcp.test",
        }
    }

    fn address(self) -> Ipv4Addr {
        Ipv4Addr::new(127, 0, 0, 71 + self as u8)
    }
}

/// A running dnsmasq, killed on drop.
struct Dnsmasq(Child);

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_dnsmasq(dnsmasq: &Path) -> Result<Dnsmasq, String> {
    let mut command = Command::new(dnsmasq);
    command
        .args(["--keep-in-foreground", "--no-resolv", "--no-hosts"])
        .args(["--local=/test/", "--bind-interfaces", "--pid-file="])
        .args(["--user=root", "--group=root", "--conf-file=/dev/null"])
        .arg(format!("--listen-address={SERVER}"));
    for way in Way::ALL {
        command.arg(format!("--host-record={},{}", way.name(), way.address()));
    }
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", dnsmasq.display()))?;
    let server = Dnsmasq(child);
    for _ in 0..50 {
        if resolve(Way::ConnectedRead).is_ok() {
            return Ok(server);
        }
        thread::sleep(Duration::from_millis(100));
    }
    Err("dnsmasq does not answer".into())
}

/// A DNS query for the A record of `name`, recursion desired.
fn query(name: &str, id: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// The first A record of an answer (no compression in the question; answers point back).
fn first_a(answer: &[u8]) -> Option<Ipv4Addr> {
    let count = |at: usize| {
        answer
            .get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
    };
    let (questions, answers) = (count(4)?, count(6)?);
    let mut at = 12;
    let skip_name = |mut at: usize| -> Option<usize> {
        loop {
            let len = *answer.get(at)? as usize;
            if len == 0 {
                return Some(at + 1);
            }
            if len & 0xc0 == 0xc0 {
                return Some(at + 2);
            }
            at += 1 + len;
        }
    };
    for _ in 0..questions {
        at = skip_name(at)? + 4;
    }
    for _ in 0..answers {
        at = skip_name(at)?;
        let kind = count(at)?;
        let len = count(at + 8)? as usize;
        let data = answer.get(at + 10..at + 10 + len)?;
        if kind == 1 && len == 4 {
            return Some(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        at += 10 + len;
    }
    None
}

/// Resolves `way`'s name the way it says; returns the address.
fn resolve(way: Way) -> Result<Ipv4Addr, String> {
    let q = query(way.name(), 0x5300 + way as u16);
    let server = SocketAddr::from((SERVER, 53));
    let mut buf = [0u8; 1232];
    let n = match way {
        Way::Tcp => {
            let mut stream = TcpStream::connect(server).map_err(|e| format!("tcp: {e}"))?;
            stream
                .set_read_timeout(Some(Duration::from_secs(2)))
                .map_err(|e| e.to_string())?;
            let mut framed = (q.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&q);
            stream.write_all(&framed).map_err(|e| e.to_string())?;
            let mut got = 0;
            while got < 2 || got < 2 + usize::from(u16::from_be_bytes([buf[0], buf[1]])) {
                let n = stream.read(&mut buf[got..]).map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("the server closed early".into());
                }
                got += n;
            }
            buf.copy_within(2..got, 0);
            got - 2
        }
        Way::V4MappedV6 => {
            let socket = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).map_err(|e| e.to_string())?;
            socket
                .set_read_timeout(Some(Duration::from_secs(2)))
                .map_err(|e| e.to_string())?;
            let mapped = SocketAddrV6::new(SERVER.to_ipv6_mapped(), 53, 0, 0);
            socket.send_to(&q, mapped).map_err(|e| e.to_string())?;
            socket.recv_from(&mut buf).map_err(|e| e.to_string())?.0
        }
        Way::ConnectedRead | Way::RecvFrom | Way::RecvMsg => {
            let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| e.to_string())?;
            socket
                .set_read_timeout(Some(Duration::from_secs(2)))
                .map_err(|e| e.to_string())?;
            let fd = socket.as_raw_fd();
            match way {
                Way::ConnectedRead => {
                    socket.connect(server).map_err(|e| e.to_string())?;
                    // SAFETY: write and read on a socket this function owns, with buffers
                    // of the given lengths.
                    unsafe {
                        libc::write(fd, q.as_ptr().cast(), q.len());
                        libc::read(fd, buf.as_mut_ptr().cast(), buf.len())
                    }
                }
                Way::RecvFrom => {
                    socket.send_to(&q, server).map_err(|e| e.to_string())?;
                    // SAFETY: a buffer of the given length; no address wanted.
                    unsafe {
                        libc::recvfrom(
                            fd,
                            buf.as_mut_ptr().cast(),
                            buf.len(),
                            0,
                            std::ptr::null_mut(),
                            std::ptr::null_mut(),
                        )
                    }
                }
                _ => {
                    socket.send_to(&q, server).map_err(|e| e.to_string())?;
                    let mut iov = libc::iovec {
                        iov_base: buf.as_mut_ptr().cast(),
                        iov_len: buf.len(),
                    };
                    // SAFETY: a zeroed msghdr naming one iovec over `buf`.
                    unsafe {
                        let mut msg: libc::msghdr = std::mem::zeroed();
                        msg.msg_iov = &mut iov;
                        msg.msg_iovlen = 1;
                        libc::recvmsg(fd, &mut msg, 0)
                    }
                }
            }
            .try_into()
            .map_err(|_| format!("{}: no answer", way.name()))?
        }
    };
    first_a(&buf[..n]).ok_or_else(|| format!("{}: no A record in the answer", way.name()))
}

/// Runs the scenario against `collector` in `probe` mode with the guest's `dnsmasq`;
/// returns one line per checked name, or every problem.
pub fn run(collector: &Path, dnsmasq: &Path, probe: &str) -> Result<Vec<String>, String> {
    let _server = start_dnsmasq(dnsmasq)?;
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, PORT)).map_err(|e| e.to_string())?;
    thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    let running = RunningCollector::start(
        collector,
        &["--probe", probe, "--dns-ttl-floor", "30s"],
        Duration::from_secs(120),
    )?;
    let mut problems = Vec::new();
    for way in Way::ALL {
        match resolve(way) {
            Ok(address) if address == way.address() => {
                if let Err(e) = TcpStream::connect((address, PORT)) {
                    problems.push(format!("{}: connect to {address}: {e}", way.name()));
                }
            }
            Ok(other) => problems.push(format!("{}: resolved to {other}", way.name())),
            Err(e) => problems.push(e),
        }
    }
    thread::sleep(Duration::from_millis(500));
    let (clean, stdout, stderr) = running.stop(Duration::from_secs(30))?;
    if !clean {
        problems.push(format!(
            "the collector did not stop cleanly:\n{}",
            stderr.join("\n")
        ));
    }
    if let Some(off) = stderr.iter().find(|l| l.contains("DNS capture")) {
        problems.push(format!("DNS capture is off: {off}"));
    }
    // In fentry mode the receives must go through the fexits, not the kprobe fallback.
    if let Some(fallback) = stderr
        .iter()
        .find(|l| l.contains("receive fexits were refused"))
    {
        problems.push(format!("the DNS fexits fell back to kprobes: {fallback}"));
    }
    let records: Vec<Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let me = std::process::id();
    let attr = |r: &Value, key: &str| r["attributes"][key].clone();
    let mine = |r: &&Value| attr(r, "process.pid") == me;
    let mut lines = Vec::new();
    for way in Way::ALL {
        let name = way.name();
        let address = way.address().to_string();
        let connects: Vec<&Value> = records
            .iter()
            .filter(mine)
            .filter(|r| {
                attr(r, "egress.event") == "tcp_connect"
                    && attr(r, "destination.address") == address.as_str()
            })
            .collect();
        let dns = records.iter().filter(mine).any(|r| {
            attr(r, "egress.event") == "dns"
                && attr(r, "dns.question.name") == name
                && attr(r, "dns.response_code") == "NOERROR"
                && attr(r, "dns.answers") == serde_json::json!([address])
        });
        if !dns {
            problems.push(format!("{name}: no egress.dns record answering {address}"));
        }
        match connects.as_slice() {
            [one] if attr(one, "server.address") == name => {
                lines.push(format!("{name} -> {address} named, dns record"));
            }
            [one] => problems.push(format!(
                "{name}: the connection to {address} has server.address {}",
                attr(one, "server.address")
            )),
            other => problems.push(format!(
                "{name}: {} connection records to {address}",
                other.len()
            )),
        }
    }
    if problems.is_empty() {
        Ok(lines)
    } else {
        Err(format!(
            "{}\nrecords:\n{stdout}\nlog:\n{}",
            problems.join("\n"),
            stderr.join("\n")
        ))
    }
}
