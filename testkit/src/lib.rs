//! Test scenarios for egress-collector, shared by the host test and the kernel VMs, and
//! the qemu plumbing those VMs boot with (also used by the VM benchmark).
//!
//! A scenario starts the real collector binary, makes known connections from a thread of
//! this process, stops the collector with SIGINT, and checks that its JSON output holds
//! each connection exactly once with the right process and addresses.

pub mod attribution;
pub mod collector;
pub mod dns;
pub mod docker;
#[cfg(feature = "otlp-receiver")]
pub mod otlp_run;
pub mod ports;
#[cfg(feature = "otlp-receiver")]
pub mod receiver;
pub mod records;
pub mod scenario;
pub mod static_build;
pub mod traffic;
pub mod vm;

/// The tests load eBPF programs and start containers: they run as root, and say so
/// plainly when they do not.
pub fn require_root() {
    // SAFETY: trivial getter.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests load eBPF programs: run them as root (scripts/test.sh does)"
    );
}
