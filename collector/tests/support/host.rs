//! What the end-to-end tests share about the host they run on.

use std::{
    net::{Ipv4Addr, TcpListener},
    path::Path,
    process::Command,
};

pub use egress_testkit::require_root;

/// A port on every address that accepts and at once closes each connection (busybox nc
/// waits for the peer to close); containers reach it through the bridge gateway.
pub fn sink_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("listen");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    port
}

/// How many of the collector's programs the kernel holds now (names truncated to 15
/// bytes, so by prefix).
pub fn our_programs() -> usize {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(is_ours)
        .count()
}

/// Whether a loaded program is one of the collector's, by its name's prefix (every
/// program is named for its hook family: `tp_`, `raw_tp_`, `kprobe_`, ...).
pub fn is_ours(program: &aya::programs::ProgramInfo) -> bool {
    const PREFIXES: [&str; 6] = [
        "tp_",
        "raw_tp_",
        "kprobe_",
        "kretprobe_",
        "fentry_",
        "fexit_",
    ];
    program
        .name_as_str()
        .is_some_and(|n| PREFIXES.iter().any(|prefix| n.starts_with(prefix)))
}

/// [`our_programs`] once it is back to `count`, or what it still is after a few seconds.
/// The kernel frees a raw tracepoint's program only after an RCU tasks-trace grace period
/// once its last fd is closed, so "nothing stays loaded" is a matter of moments, not of
/// the instant the process exits.
pub fn our_programs_settled_at(count: usize) -> usize {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let now = our_programs();
        if now == count || std::time::Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// tracefs where the DaemonSet mounts the host's: a collector without CAP_SYS_ADMIN
/// cannot mount it itself.
pub fn ensure_tracefs() {
    if !Path::new("/sys/kernel/tracing/events").exists() {
        let status = Command::new("mount")
            .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
            .status()
            .expect("mount");
        assert!(status.success(), "mount tracefs");
    }
}

/// A counter from the collector's last statistics line: `name=<n>` (user space, or
/// inside `kernel=…`). The last line covers the whole run when the interval is longer.
pub fn last_stat(stderr: &[String], name: &str) -> Option<u64> {
    egress_testkit::collector::stat_in(last_statistics_line(stderr)?, name)
}

/// The collector's last statistics line (or its loss warning, which carries the same
/// counters).
#[allow(dead_code)] // not every test binary reads the whole line
pub fn last_statistics_line(stderr: &[String]) -> Option<&str> {
    stderr
        .iter()
        .rev()
        .find(|l| l.contains("Collector statistics.") || l.contains("Events were lost"))
        .map(String::as_str)
}

/// Runs a command (ip, nft, ...) that must succeed; its stderr is the failure message.
#[allow(dead_code)] // not every test binary runs commands
pub fn sh(args: &[&str]) {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The ids of the BPF objects of kind `field` (`prog_id`, `map_id`) process `pid` holds,
/// by its descriptors' info.
pub fn ids_held_by(pid: u32, field: &str) -> std::collections::HashSet<u32> {
    let mut ids = std::collections::HashSet::new();
    let prefix = format!("{field}:");
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).expect("fdinfo") {
        let info = std::fs::read_to_string(fd.expect("fd").path()).unwrap_or_default();
        ids.extend(
            info.lines()
                .filter_map(|l| l.strip_prefix(prefix.as_str()))
                .filter_map(|id| id.trim().parse::<u32>().ok()),
        );
    }
    ids
}

/// The collector's log `stderr` counts no record that went out without its process's
/// identity.
pub fn assert_every_identity_arrived(stderr: &[String]) {
    assert!(
        !stderr
            .iter()
            .any(|l| l.contains("without their process's identity")),
        "every identity arrived:\n{}",
        stderr.join("\n")
    );
}

/// Whether `record` is of a TCP connection to 127.0.0.1:`port` (a UDP socket or an IPv6
/// listener of another test may hold the same port number).
pub fn to_loopback_tcp(record: &serde_json::Value, port: u16) -> bool {
    egress_testkit::records::attr(record, "destination.port") == port
        && egress_testkit::records::attr(record, "destination.address") == "127.0.0.1"
        && egress_testkit::records::attr(record, "network.transport") == "tcp"
}
