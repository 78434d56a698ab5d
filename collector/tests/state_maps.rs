//! The programs' state maps are LRU maps: an entry they evict is counted, not silent.
//!
//! `CALLS` holds a call's state from its entry to its exit, 8,192 entries. Threads
//! blocked inside connect() hold one entry each for as long as they wait: more of them
//! than the map holds make it evict, and the collector must report those evictions as
//! possible loss.

mod support;

use std::{os::fd::AsRawFd, path::Path, time::Duration};

use egress_testkit::collector::RunningCollector;
use support::host::{last_stat, require_root};

const COLLECTOR: &str = env!("CARGO_BIN_EXE_egress-collector");
/// `CALLS`'s capacity (collector-ebpf/src/maps.rs).
const CALLS_CAPACITY: u64 = 8192;

#[test]
fn calls_evicted_from_the_full_call_map_are_reported_as_possibly_lost() {
    require_root();
    // More blocked calls than the map holds.
    const BLOCKED: u64 = CALLS_CAPACITY + 1000;
    let collector = RunningCollector::start(
        Path::new(COLLECTOR),
        &["--stats-interval", "1h"],
        Duration::from_secs(60),
    )
    .expect("collector starts");

    // A unix stream socket listening with a backlog of 0 that never accepts: every
    // connect() after the first blocks until the socket is closed.
    let path = std::env::temp_dir().join(format!("egress-calls-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    // SAFETY: a listening socket's descriptor; listen() again only changes the backlog.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
    let blocked: Vec<_> = (0..BLOCKED)
        .map(|_| {
            let path = path.clone();
            std::thread::Builder::new()
                .stack_size(64 << 10)
                .spawn(move || {
                    let _ = std::os::unix::net::UnixStream::connect(&path);
                })
                .expect("spawn a connecting thread")
        })
        .collect();
    // Every thread is in connect() (or past it) once the kernel has seen them all.
    std::thread::sleep(Duration::from_secs(3));
    // Closing the listener refuses the waiting connects: the threads return.
    drop(listener);
    let _ = std::fs::remove_file(&path);
    for thread in blocked {
        thread.join().expect("connecting thread");
    }
    let (ok, _stdout, stderr) = collector
        .stop(Duration::from_secs(30))
        .expect("collector stops");
    assert!(ok, "collector failed:\n{}", stderr.join("\n"));

    let evicted = last_stat(&stderr, "calls_evicted")
        .unwrap_or_else(|| panic!("calls_evicted in the statistics:\n{}", stderr.join("\n")));
    let stopped = stderr
        .iter()
        .rev()
        .find(|l| l.contains("Stopped."))
        .unwrap_or_else(|| panic!("a Stopped line:\n{}", stderr.join("\n")));
    let possibly_lost: u64 = stopped
        .split("possibly_lost=")
        .nth(1)
        .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("possibly_lost on the Stopped line: {stopped}"));
    eprintln!(
        "{BLOCKED} calls blocked at once in a map of {CALLS_CAPACITY}: {evicted} evictions counted, possibly_lost={possibly_lost}"
    );
    // At least the calls beyond the capacity were evicted (the LRU may evict sooner,
    // never fewer); every eviction is one of ours or another process's call.
    assert!(
        evicted >= (BLOCKED - CALLS_CAPACITY) / 2,
        "{evicted} evictions counted for {BLOCKED} blocked calls in a map of {CALLS_CAPACITY}"
    );
    assert!(
        possibly_lost >= evicted,
        "the evictions are possible loss on the Stopped line ({possibly_lost} < {evicted})"
    );
}
