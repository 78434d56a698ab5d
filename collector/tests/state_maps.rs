//! The programs' state maps are LRU maps: an entry they evict is counted, not silent.
//!
//! `CALLS` holds a call's state from its entry to its exit, 8,192 entries. Threads
//! blocked inside a send (tracepoint mode's entry hooks save every sendto's arguments
//! where the exit cannot read them back from the registers: before 5.15, off x86_64,
//! here forced by the `EGRESS_TEST_NO_EXIT_REGS` test hook; connect() saves none for
//! TCP, nor for unix sockets, since the entry looks at the protocol first) hold one
//! entry each for as long as they wait: more of them than the map holds make it evict,
//! and the collector must report those evictions as possible loss.
//!
//! The identity cache keeps each connecting process's identity, in one of 4,096 slots
//! (`IDENTITY_SLOTS`, by process id) or, where the slot is another process's, in the LRU
//! map `IDENTITIES` (8,192): more processes than both hold make it forget some, reported
//! as `identities_evicted` (a cost, not a loss).

mod support;

use std::{os::fd::AsRawFd, path::Path, time::Duration};

use std::os::unix::net::UnixStream;

use egress_testkit::collector::RunningCollector;
use support::host::{last_stat, require_root};

const COLLECTOR: &str = env!("CARGO_BIN_EXE_egress-collector");
/// `CALLS`'s capacity (collector-ebpf/src/maps.rs).
const CALLS_CAPACITY: u64 = 8192;
/// `IDENTITIES`'s capacity and `IDENTITY_SLOTS`'s (collector-ebpf/src/maps.rs).
const IDENTITIES_CAPACITY: u64 = 8192 + 4096;

#[test]
fn calls_evicted_from_the_full_call_map_are_reported_as_possibly_lost() {
    require_root();
    // More blocked calls than the map holds.
    const BLOCKED: u64 = CALLS_CAPACITY + 1000;
    let collector = RunningCollector::start_wrapped(
        &["env", "EGRESS_TEST_NO_EXIT_REGS=1"],
        Path::new(COLLECTOR),
        &["--stdout", "--stats-interval", "1h"],
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

#[test]
fn identities_evicted_from_the_full_identity_cache_are_counted() {
    require_root();
    const PROCESSES: u64 = IDENTITIES_CAPACITY + 1000;
    let collector = RunningCollector::start(
        Path::new(COLLECTOR),
        // One cgroup makes all the connects: no limit, so every one is identified.
        &["--stats-interval", "1h", "--cgroup-rate-limit", "0"],
        Duration::from_secs(60),
    )
    .expect("collector starts");
    let mut target = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
        },
        sin_zero: [0; 8],
    };
    for i in 0..PROCESSES {
        // A port of its own per process: two flows with the same ports would be one UDP
        // flow, reported (and identified) once.
        target.sin_port = (10_000 + i as u16).to_be();
        // SAFETY: the child only makes async-signal-safe calls (socket, connect, _exit)
        // on memory it inherited, and the parent reaps it.
        unsafe {
            match libc::fork() {
                0 => {
                    let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
                    libc::connect(
                        fd,
                        (&raw const target).cast(),
                        size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    );
                    libc::_exit(0);
                }
                pid if pid > 0 => {
                    libc::waitpid(pid, std::ptr::null_mut(), 0);
                }
                _ => panic!("fork: {}", std::io::Error::last_os_error()),
            }
        }
    }
    let (ok, _stdout, stderr) = collector
        .stop(Duration::from_secs(30))
        .expect("collector stops");
    assert!(ok, "collector failed:\n{}", stderr.join("\n"));
    let evicted = last_stat(&stderr, "identities_evicted").unwrap_or_else(|| {
        panic!(
            "identities_evicted in the statistics:\n{}",
            stderr.join("\n")
        )
    });
    let cached = last_stat(&stderr, "identities_cached").unwrap_or_else(|| {
        panic!(
            "identities_cached in the statistics:\n{}",
            stderr.join("\n")
        )
    });
    eprintln!(
        "{PROCESSES} processes connected, a cache of {IDENTITIES_CAPACITY}: {cached} cached, {evicted} evicted"
    );
    // Every process was cached once (a pid this run already cached would be refreshed,
    // not new: allow 1% for that); the map holds at most its capacity, so at least the
    // rest were evicted (the LRU may evict sooner, never fewer).
    let made = PROCESSES * 99 / 100;
    assert!(
        cached >= made,
        "{cached} identities cached for {PROCESSES} processes"
    );
    assert!(
        evicted >= made - IDENTITIES_CAPACITY && evicted <= cached,
        "{evicted} evictions counted for {cached} identities in a map of {IDENTITIES_CAPACITY}"
    );
}
