//! Known connections, each described by what the collector must report for it.

use std::{
    io,
    mem::{size_of, zeroed},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    time::Duration,
};

/// One connection the collector must report exactly once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    pub what: String,
    /// `egress.event`
    pub event: &'static str,
    pub transport: &'static str,
    pub network_type: &'static str,
    /// `None`: the kernel chose a port we cannot learn (refused connect); any non-zero.
    pub source_port: Option<u16>,
    pub source_ip: Option<std::net::IpAddr>,
    pub destination: SocketAddr,
    /// TCP: `egress.connection.state` and `error.type` (None: absent) the record carries.
    pub outcome: Option<(&'static str, Option<&'static str>)>,
    /// UDP: `egress.udp.bytes.sent`, the flow's bytes up to its record (the first
    /// datagram's: every flow here is reported once).
    pub udp_bytes: Option<u64>,
}

fn network_type(destination: SocketAddr) -> &'static str {
    if destination.is_ipv4() {
        "ipv4"
    } else {
        "ipv6"
    }
}

fn tcp(what: String, source: SocketAddr, destination: SocketAddr) -> Expected {
    Expected {
        what,
        event: "tcp_connect",
        transport: "tcp",
        network_type: network_type(destination),
        source_port: Some(source.port()),
        source_ip: Some(source.ip()),
        destination,
        outcome: Some(("established", None)),
        udp_bytes: None,
    }
}

fn udp(what: String, event: &'static str, source: SocketAddr, destination: SocketAddr) -> Expected {
    // A connect sends nothing; each send here starts with a 4-byte datagram.
    let udp_bytes = Some(if event == "udp_connect" { 0 } else { 4 });
    Expected {
        what,
        event,
        transport: "udp",
        network_type: network_type(destination),
        source_port: Some(source.port()),
        source_ip: Some(source.ip()),
        destination,
        outcome: None,
        udp_bytes,
    }
}

/// Makes `n` connections of each kind from the calling thread; returns what to expect.
pub fn generate(n: usize) -> io::Result<Vec<Expected>> {
    let mut expected = Vec::new();
    let mut keep = Vec::new();
    let mut udp_keep = Vec::new();

    let listener4 = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let listener6 = TcpListener::bind((Ipv6Addr::LOCALHOST, 0))?;
    for i in 0..n {
        let stream = TcpStream::connect(listener4.local_addr()?)?;
        expected.push(tcp(
            format!("tcp4 #{i}"),
            stream.local_addr()?,
            listener4.local_addr()?,
        ));
        keep.push(stream);
        let stream = TcpStream::connect(listener6.local_addr()?)?;
        expected.push(tcp(
            format!("tcp6 #{i}"),
            stream.local_addr()?,
            listener6.local_addr()?,
        ));
        keep.push(stream);
    }

    // A refused attempt: the audit needs the attempt, not only the successes.
    let closed = SocketAddr::from((Ipv4Addr::LOCALHOST, crate::ports::unused_port()));
    if TcpStream::connect_timeout(&closed, Duration::from_secs(2)).is_ok() {
        return Err(io::Error::other("a closed port accepted a connection"));
    }
    expected.push(Expected {
        source_port: None,
        outcome: Some(("failed", Some("refused"))),
        ..tcp("tcp4 refused".into(), closed, closed)
    });

    // A non-blocking connect, still in progress when connect() returns.
    let (source, _fd) = nonblocking_connect(listener4.local_addr()?)?;
    expected.push(tcp(
        "tcp4 non-blocking".into(),
        source,
        listener4.local_addr()?,
    ));

    let receiver4 = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    let receiver6 = UdpSocket::bind((Ipv6Addr::LOCALHOST, 0))?;
    for i in 0..n {
        // Unconnected sendto, three datagrams: one flow, reported once.
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        for _ in 0..3 {
            socket.send_to(b"ping", receiver4.local_addr()?)?;
        }
        expected.push(udp(
            format!("udp4 sendto #{i}"),
            "udp_send",
            socket.local_addr()?,
            receiver4.local_addr()?,
        ));
        // Kept open: a port freed here could be the next socket's, and the same process
        // sending the same 5-tuple within the flow window is the same flow (one record).
        udp_keep.push(socket);
        // connect() then send: the connect reports the flow, the sends are the same flow.
        let socket = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))?;
        socket.connect(receiver6.local_addr()?)?;
        socket.send(b"ping")?;
        socket.send(b"ping")?;
        expected.push(udp(
            format!("udp6 connect #{i}"),
            "udp_connect",
            socket.local_addr()?,
            receiver6.local_addr()?,
        ));
        udp_keep.push(socket);
    }

    // A dual-stack IPv6 socket talking to an IPv4-mapped address (what Java does for every
    // IPv4 destination): IPv4 on the wire, so recorded as IPv4 with dotted addresses.
    let stream = TcpStream::connect(v4_mapped(listener4.local_addr()?))?;
    expected.push(tcp(
        "tcp dual-stack".into(),
        unmapped(stream.local_addr()?),
        listener4.local_addr()?,
    ));
    keep.push(stream);
    let socket = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))?;
    for _ in 0..3 {
        socket.send_to(b"ping", v4_mapped(receiver4.local_addr()?))?;
    }
    expected.push(Expected {
        // Unbound: the kernel picks the IPv4 source per datagram and keeps none.
        source_ip: Some(Ipv4Addr::UNSPECIFIED.into()),
        ..udp(
            "udp dual-stack sendto".into(),
            "udp_send",
            socket.local_addr()?,
            receiver4.local_addr()?,
        )
    });
    let socket = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))?;
    socket.connect(v4_mapped(receiver4.local_addr()?))?;
    socket.send(b"ping")?;
    expected.push(udp(
        "udp dual-stack connect".into(),
        "udp_connect",
        unmapped(socket.local_addr()?),
        receiver4.local_addr()?,
    ));

    // sendmsg() with a destination in msg_name.
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    for _ in 0..3 {
        sendmsg_to(&socket, receiver4.local_addr()?)?;
    }
    expected.push(udp(
        "udp4 sendmsg".into(),
        "udp_send",
        socket.local_addr()?,
        receiver4.local_addr()?,
    ));

    // sendmsg() of one datagram in two iovecs: the bytes are the datagram's, 30 + 70.
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    sendmsg_parts(&socket, receiver4.local_addr()?, &[30, 70])?;
    expected.push(Expected {
        udp_bytes: Some(100),
        ..udp(
            "udp4 sendmsg iovecs".into(),
            "udp_send",
            socket.local_addr()?,
            receiver4.local_addr()?,
        )
    });

    // Let in-flight handshakes finish before the sockets close.
    std::thread::sleep(Duration::from_millis(100));
    drop(keep);
    drop(udp_keep);
    Ok(expected)
}

/// `a.b.c.d:port` as `[::ffff:a.b.c.d]:port`.
fn v4_mapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(a) => SocketAddr::new(a.ip().to_ipv6_mapped().into(), a.port()),
        v6 => v6,
    }
}

/// `[::ffff:a.b.c.d]:port` as `a.b.c.d:port`.
fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), a.port()),
            None => addr,
        },
        v4 => v4,
    }
}

struct Fd(i32);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor.
        unsafe { libc::close(self.0) };
    }
}

fn sockaddr_in(addr: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain old data.
    let mut sin: libc::sockaddr_in = unsafe { zeroed() };
    sin.sin_family = libc::AF_INET as u16;
    sin.sin_port = addr.port().to_be();
    sin.sin_addr.s_addr = u32::from_ne_bytes(addr.ip().octets());
    sin
}

fn v4(addr: SocketAddr) -> io::Result<SocketAddrV4> {
    match addr {
        SocketAddr::V4(a) => Ok(a),
        SocketAddr::V6(_) => Err(io::Error::other("expected an IPv4 address")),
    }
}

fn nonblocking_connect(to: SocketAddr) -> io::Result<(SocketAddr, Fd)> {
    // SAFETY: plain socket calls on a descriptor we own; pointers are valid for each call.
    unsafe {
        let fd = Fd(libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK,
            0,
        ));
        if fd.0 < 0 {
            return Err(io::Error::last_os_error());
        }
        let sin = sockaddr_in(v4(to)?);
        let rc = libc::connect(
            fd.0,
            (&sin as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        );
        let err = io::Error::last_os_error();
        if rc != 0 && err.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(err);
        }
        let mut local: libc::sockaddr_in = zeroed();
        let mut len = size_of::<libc::sockaddr_in>() as u32;
        if libc::getsockname(
            fd.0,
            (&mut local as *mut libc::sockaddr_in).cast(),
            &mut len,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        let ip = Ipv4Addr::from(u32::from_be(local.sin_addr.s_addr));
        Ok((SocketAddr::new(ip.into(), u16::from_be(local.sin_port)), fd))
    }
}

fn sendmsg_to(socket: &UdpSocket, to: SocketAddr) -> io::Result<()> {
    sendmsg_parts(socket, to, &[4]).map(drop)
}

/// One datagram of `parts` bytes, one iovec each, with the destination (IPv4) in
/// msg_name; the bytes sent.
pub fn sendmsg_parts(socket: &UdpSocket, to: SocketAddr, parts: &[usize]) -> io::Result<usize> {
    let mut sin = sockaddr_in(v4(to)?);
    let mut buffers = payloads(parts);
    let mut iov = iovecs(&mut buffers);
    // SAFETY: msghdr is plain old data; every pointer in it outlives the call.
    unsafe {
        let mut msg: libc::msghdr = zeroed();
        msg.msg_name = (&mut sin as *mut libc::sockaddr_in).cast();
        msg.msg_namelen = size_of::<libc::sockaddr_in>() as u32;
        msg.msg_iov = iov.as_mut_ptr();
        // usize on glibc, int on musl (the static test binaries).
        msg.msg_iovlen = iov.len() as _;
        let sent = libc::sendmsg(socket.as_raw_fd(), &msg, 0);
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sent as usize)
    }
}

/// One sendmmsg of one datagram per entry of `sizes`, each with the destination (IPv4)
/// in msg_name; the bytes sent.
pub fn sendmmsg_sizes(socket: &UdpSocket, to: SocketAddr, sizes: &[usize]) -> io::Result<usize> {
    let mut sin = sockaddr_in(v4(to)?);
    let mut buffers = payloads(sizes);
    let mut iov = iovecs(&mut buffers);
    // SAFETY: mmsghdr is plain old data; every pointer in it outlives the call.
    unsafe {
        let mut msgs: Vec<libc::mmsghdr> = (0..sizes.len()).map(|_| zeroed()).collect();
        for (m, iov) in msgs.iter_mut().zip(iov.iter_mut()) {
            m.msg_hdr.msg_name = (&mut sin as *mut libc::sockaddr_in).cast();
            m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as u32;
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
        }
        let n = libc::sendmmsg(socket.as_raw_fd(), msgs.as_mut_ptr(), msgs.len() as u32, 0);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(msgs[..n as usize].iter().map(|m| m.msg_len as usize).sum())
    }
}

fn payloads(sizes: &[usize]) -> Vec<Vec<u8>> {
    sizes.iter().map(|n| vec![b'p'; *n]).collect()
}

/// One iovec per buffer; the buffers must outlive the call they are handed to.
fn iovecs(buffers: &mut [Vec<u8>]) -> Vec<libc::iovec> {
    buffers
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect()
}
