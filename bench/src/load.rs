//! The load: K threads open and close TCP connections to loopback listeners as fast as
//! they can (or paced to a rate) for T seconds, optionally sending UDP to many ports.
//! Runs in its own process (`egress-bench load`) so its CPU is not the driver's.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    thread,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use socket2::{Domain, Socket, Type};

#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Connecting threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Target connects per second in total; 0 means as fast as possible.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Also send one UDP datagram per connect, spread over this many destination ports.
    #[arg(long, default_value_t = 0)]
    pub udp_ports: u16,
    /// Listening TCP ports the connects are spread over (more ports, fewer tuple clashes).
    #[arg(long, default_value_t = 8)]
    pub listeners: u16,
    /// The loopback address listened on and connected to (any of 127.0.0.0/8): one no
    /// other program uses lets a collector exclude every other destination.
    #[arg(long, default_value_t = Ipv4Addr::LOCALHOST)]
    pub address: Ipv4Addr,
}

impl LoadArgs {
    /// TCP connects on 127.0.0.1 over the default 8 listeners, no UDP: the benchmarks' load.
    pub fn tcp_loopback(threads: usize, seconds: f64, rate: u64) -> Self {
        Self {
            threads,
            seconds,
            rate,
            udp_ports: 0,
            listeners: 8,
            address: Ipv4Addr::LOCALHOST,
        }
    }
}

/// What the load did; printed as one JSON line.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadReport {
    pub connects: u64,
    pub failed: u64,
    pub udp_sent: u64,
    pub seconds: f64,
    pub connects_per_second: f64,
    /// The ports connected to, for counting what the collector saw.
    pub ports: Vec<u16>,
}

fn listeners(address: Ipv4Addr, n: u16) -> std::io::Result<Vec<u16>> {
    let mut ports = Vec::new();
    for _ in 0..n {
        let listener = TcpListener::bind((address, 0))?;
        ports.push(listener.local_addr()?.port());
        thread::spawn(move || {
            for stream in listener.incoming() {
                drop(stream);
            }
        });
    }
    Ok(ports)
}

/// One connect and close; SO_LINGER 0 closes with a reset, so no TIME_WAIT piles up and
/// the ephemeral ports last a storm.
fn connect_once(address: &SocketAddr) -> bool {
    let Ok(socket) = Socket::new(Domain::IPV4, Type::STREAM, None) else {
        return false;
    };
    let _ = socket.set_linger(Some(Duration::ZERO));
    socket.connect(&(*address).into()).is_ok()
}

pub fn run(args: &LoadArgs) -> std::io::Result<LoadReport> {
    let ports = listeners(args.address, args.listeners.max(1))?;
    let address = args.address;
    let udp_ports: Vec<u16> = (0..args.udp_ports).map(|i| 40_000 + i).collect();
    let connects = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let udp_sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let threads = args.threads.max(1);
    let per_thread_interval =
        (args.rate > 0).then(|| Duration::from_secs_f64(threads as f64 / args.rate as f64));
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (connects, failed, udp_sent, stop) = (
                Arc::clone(&connects),
                Arc::clone(&failed),
                Arc::clone(&udp_sent),
                Arc::clone(&stop),
            );
            let ports = ports.clone();
            let udp_ports = udp_ports.clone();
            thread::spawn(move || {
                let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).ok();
                let mut next = Instant::now();
                let mut i = t;
                while !stop.load(Relaxed) {
                    if let Some(interval) = per_thread_interval {
                        let now = Instant::now();
                        if next > now {
                            thread::sleep(next - now);
                        }
                        next += interval;
                    }
                    let destination = SocketAddr::from((address, ports[i % ports.len()]));
                    if connect_once(&destination) {
                        connects.fetch_add(1, Relaxed);
                    } else {
                        failed.fetch_add(1, Relaxed);
                    }
                    if let (Some(udp), false) = (&udp, udp_ports.is_empty()) {
                        let port = udp_ports[i % udp_ports.len()];
                        if udp.send_to(b"x", (address, port)).is_ok() {
                            udp_sent.fetch_add(1, Relaxed);
                        }
                    }
                    i = i.wrapping_add(threads);
                }
            })
        })
        .collect();
    thread::sleep(Duration::from_secs_f64(args.seconds));
    stop.store(true, Relaxed);
    for worker in workers {
        let _ = worker.join();
    }
    let seconds = start.elapsed().as_secs_f64();
    let connects = connects.load(Relaxed);
    Ok(LoadReport {
        connects,
        failed: failed.load(Relaxed),
        udp_sent: udp_sent.load(Relaxed),
        seconds,
        connects_per_second: connects as f64 / seconds,
        ports,
    })
}

/// Every IPv4 and IPv6 destination outside `address/len`, as prefixes: for each of the
/// first `len` bits, the addresses that share the bits before it and differ there.
pub fn everything_but(address: Ipv4Addr, len: u32) -> Vec<String> {
    let bits = u32::from(address);
    let mut prefixes: Vec<String> = (0..len)
        .map(|i| {
            let flipped = (bits ^ (1 << (31 - i))) & (u32::MAX << (31 - i));
            format!("{}/{}", Ipv4Addr::from(flipped), i + 1)
        })
        .collect();
    prefixes.push("::/0".into());
    prefixes
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::everything_but;

    fn covers(prefix: &str, address: Ipv4Addr) -> bool {
        let Some((base, len)) = prefix.split_once('/') else {
            return false;
        };
        let (Ok(base), Ok(len)) = (base.parse::<Ipv4Addr>(), len.parse::<u32>()) else {
            return false; // the IPv6 one
        };
        let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
        u32::from(address) & mask == u32::from(base)
    }

    #[test]
    fn the_smoke_excludes_every_destination_but_its_own_once() {
        let prefixes = everything_but(Ipv4Addr::new(127, 77, 0, 1), 16);
        assert_eq!(prefixes.len(), 17);
        assert!(prefixes.contains(&"::/0".to_owned()));
        for own in [[127, 77, 0, 1], [127, 77, 255, 254]] {
            assert!(!prefixes.iter().any(|p| covers(p, Ipv4Addr::from(own))));
        }
        for other in [
            [127, 0, 0, 1],
            [127, 76, 0, 1],
            [127, 78, 0, 1],
            [10, 0, 0, 1],
            [0, 0, 0, 0],
            [255, 255, 255, 255],
            [172, 17, 0, 1],
        ] {
            let n = prefixes
                .iter()
                .filter(|p| covers(p, Ipv4Addr::from(other)))
                .count();
            assert_eq!(n, 1, "{other:?}");
        }
    }
}
