//! The programs' state maps are LRU maps: an entry they evict is counted, not silent.
//!
//! `CALLS` holds a call's state from its entry to its exit, 8,192 entries. Threads
//! blocked inside a send (tracepoint mode saves every sendto's arguments; connect()
//! saves none for TCP, nor for unix sockets, since the entry looks at the protocol
//! first) hold one entry each for as long as they wait: more of them than the map holds
//! make it evict, and the collector must report those evictions as possible loss.

mod support;

use std::{os::fd::AsRawFd, path::Path, time::Duration};

use std::os::unix::net::UnixStream;

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

    // A unix stream socket pair whose reader never reads: once its buffer is full,
    // every send() (the sendto syscall) blocks until the reader is closed.
    let (writer, reader) = UnixStream::pair().expect("socketpair");
    writer.set_nonblocking(true).expect("non-blocking");
    let chunk = [0u8; 4096];
    // SAFETY: a socket descriptor and a buffer that outlive the calls.
    while unsafe {
        libc::send(
            writer.as_raw_fd(),
            chunk.as_ptr().cast(),
            chunk.len(),
            libc::MSG_NOSIGNAL,
        )
    } > 0
    {}
    writer.set_nonblocking(false).expect("blocking");
    let fd = writer.as_raw_fd();
    let blocked: Vec<_> = (0..BLOCKED)
        .map(|_| {
            std::thread::Builder::new()
                .stack_size(64 << 10)
                .spawn(move || {
                    let byte = [0u8; 1];
                    // SAFETY: `writer` outlives the threads (joined below).
                    unsafe { libc::send(fd, byte.as_ptr().cast(), 1, libc::MSG_NOSIGNAL) };
                })
                .expect("spawn a sending thread")
        })
        .collect();
    // Every thread is in send() once the kernel has seen them all.
    std::thread::sleep(Duration::from_secs(3));
    // Closing the reader fails the waiting sends (EPIPE): the threads return.
    drop(reader);
    for thread in blocked {
        thread.join().expect("sending thread");
    }
    drop(writer);
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
