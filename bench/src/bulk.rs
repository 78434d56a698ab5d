//! A loopback bulk transfer inside this process: one thread sends, the calling thread
//! receives. A TCP stream in 64 KiB writes, or 1400-byte UDP datagrams at full rate read
//! one recv() each. Built in rather than iperf3 so the same load runs in a qemu guest
//! that has only busybox and this static binary (`dns-cost-vm`), and so a receive is
//! always one blocking read by a process that never looked a name up.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// The UDP datagram's payload, as iperf3 `-l 1400` on the host.
pub const DATAGRAM: usize = 1400;

/// What the receiving side got.
#[derive(Debug, Clone, Copy)]
pub struct Transfer {
    pub bytes: u64,
    /// recv() calls that returned data (UDP: datagrams).
    pub reads: u64,
    pub seconds: f64,
}

impl Transfer {
    pub fn gbps(&self) -> f64 {
        (self.bytes * 8) as f64 / self.seconds.max(1e-9) / 1e9
    }
}

/// A TCP stream over loopback for `seconds`.
pub fn tcp(seconds: f64) -> anyhow::Result<Transfer> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let to = listener.local_addr()?;
    let sender = thread::spawn(move || -> std::io::Result<()> {
        let mut stream = TcpStream::connect(to)?;
        let chunk = vec![0u8; 64 * 1024];
        let started = Instant::now();
        while started.elapsed().as_secs_f64() < seconds {
            stream.write_all(&chunk)?;
        }
        Ok(())
    });
    let (mut stream, _) = listener.accept()?;
    let mut buf = vec![0u8; 128 * 1024];
    let (mut bytes, mut reads) = (0u64, 0u64);
    let started = Instant::now();
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
        reads += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    joined(sender)?;
    Ok(Transfer {
        bytes,
        reads,
        seconds: elapsed,
    })
}

/// 1400-byte UDP datagrams over loopback at full rate for `seconds`; only those received
/// count (a full receive queue drops the rest).
pub fn udp(seconds: f64) -> anyhow::Result<Transfer> {
    let receiver = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    receiver.set_read_timeout(Some(Duration::from_millis(200)))?;
    let to = receiver.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || -> std::io::Result<()> {
            let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
            let datagram = [0u8; DATAGRAM];
            while !stop.load(Ordering::Relaxed) {
                let _ = socket.send_to(&datagram, to);
            }
            Ok(())
        })
    };
    let (mut reads, mut buf) = (0u64, [0u8; 2048]);
    let started = Instant::now();
    while started.elapsed().as_secs_f64() < seconds {
        if receiver.recv(&mut buf).is_ok() {
            reads += 1;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    joined(sender)?;
    Ok(Transfer {
        bytes: reads * DATAGRAM as u64,
        reads,
        seconds: elapsed,
    })
}

fn joined(sender: thread::JoinHandle<std::io::Result<()>>) -> anyhow::Result<()> {
    match sender.join() {
        Ok(result) => result.context("the bulk sender"),
        Err(_) => bail!("the bulk sender panicked"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_transfers_move_data() {
        let tcp = tcp(0.2).expect("a TCP transfer");
        assert!(tcp.bytes > 0 && tcp.reads > 0, "{tcp:?}");
        let udp = udp(0.2).expect("a UDP transfer");
        assert_eq!(udp.bytes, udp.reads * DATAGRAM as u64);
        assert!(udp.reads > 0, "{udp:?}");
    }
}
