//! The reader keeps up with a small ring. Alone in its binary: the other host tests'
//! connect storms, run beside it, would fill its 32 KiB ring with their own records
//! (the collector sees every connection on the host), which is not what it measures.

mod support;

use std::time::Duration;

use egress_testkit::require_root;

const COLLECTOR: &str = env!("CARGO_BIN_EXE_egress-collector");

/// The programs wake the reader as the ring fills, not only its 250 ms timer: with a
/// 32 KiB ring and 1,500 connections each from a process of its own (a connection
/// record and an identity record each, ~576 bytes: the ring holds ~56; a wake-up every
/// 8 KiB, whichever kind of record spans it), made at over 800 a second (over 200
/// between two timer polls), every connection arrives with its identity.
#[test]
fn a_small_ring_is_drained_as_it_fills() {
    require_root();
    let port = support::host::sink_port();
    let collector = egress_testkit::collector::RunningCollector::start(
        std::path::Path::new(COLLECTOR),
        &["--ring-buffer-bytes", "32768", "--stats-interval", "1h"],
        Duration::from_secs(60),
    )
    .expect("collector starts");
    const CONNECTIONS: usize = 1500;
    let started = std::time::Instant::now();
    for _ in 0..CONNECTIONS {
        connect_from_a_new_process(port);
    }
    let rate = CONNECTIONS as f64 / started.elapsed().as_secs_f64();
    let (records, stderr) = collector.stop_after_poll();
    assert!(
        rate > 800.0,
        "{rate:.0} connections/s: too slow to fill the ring between two timer polls"
    );
    let arrived = records
        .iter()
        .filter(|r| support::host::to_loopback_tcp(r, port))
        .count();
    assert_eq!(
        arrived,
        CONNECTIONS,
        "at {rate:.0} connections/s:\n{}",
        stderr.join("\n")
    );
    support::host::assert_every_identity_arrived(&stderr);
}

/// Forks a process that connects to `port` on the loopback address and exits, and waits
/// for it. The child makes only system calls (this process has other threads).
fn connect_from_a_new_process(port: u16) {
    // SAFETY: the child calls only async-signal-safe functions, then `_exit`.
    unsafe {
        let child = libc::fork();
        assert!(child >= 0, "fork: {}", std::io::Error::last_os_error());
        if child == 0 {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            let address = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: port.to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
                },
                sin_zero: [0; 8],
            };
            let connected = libc::connect(
                fd,
                (&raw const address).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
            libc::close(fd);
            libc::_exit(if connected == 0 { 0 } else { 1 });
        }
        let mut status = 0;
        libc::waitpid(child, &mut status, 0);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the child's connect failed: status {status}"
        );
    }
}
