//! `kernel.bpf_stats_enabled`, off while throughput is measured: run-time statistics add
//! two clock reads to every BPF program run (each of a connection's ~11), which a
//! production node does not pay, and an operator who turned them on for `kernel-cost`
//! (or `bpftool prog show`) would otherwise have them billed to the collector's overhead
//! ratio. `kernel-cost` holds its own `BPF_ENABLE_STATS` fd for its rounds instead.

use anyhow::Context;

pub const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// The sysctl at 0 for the guard's life, set back to 1 after where it was on.
#[must_use = "statistics are back on once the guard is dropped"]
pub struct SysctlOff {
    restore: bool,
}

impl SysctlOff {
    /// Whether the sysctl was on (and turned off by this guard).
    pub fn was_on(&self) -> bool {
        self.restore
    }
}

/// Turns the sysctl off if it is on. (A `BPF_ENABLE_STATS` fd another process holds keeps
/// statistics on whatever the sysctl says: nothing shows it; the report says what was done.)
pub fn sysctl_off() -> anyhow::Result<SysctlOff> {
    let on = read()?;
    if on {
        std::fs::write(SYSCTL, "0\n")
            .with_context(|| format!("turning {SYSCTL} off for the throughput runs (root?)"))?;
    }
    Ok(SysctlOff { restore: on })
}

fn read() -> anyhow::Result<bool> {
    let value = std::fs::read_to_string(SYSCTL).with_context(|| format!("reading {SYSCTL}"))?;
    Ok(value.trim() != "0")
}

impl Drop for SysctlOff {
    fn drop(&mut self) {
        if self.restore
            && let Err(e) = std::fs::write(SYSCTL, "1\n")
        {
            eprintln!("egress-bench: could not turn {SYSCTL} back on: {e}");
        }
    }
}

/// What the reports say about the statistics during the runs.
pub fn provenance(off: &SysctlOff) -> &'static str {
    if off.was_on() {
        "`kernel.bpf_stats_enabled` was on and was turned off for the runs (and back on after)"
    } else {
        "`kernel.bpf_stats_enabled` was off"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guard_turns_the_sysctl_off_and_back_on() {
        // The real sysctl (the tests run as root, as the bench does), set back after.
        let before = read().expect("readable");
        std::fs::write(SYSCTL, "1\n").expect("root");
        {
            let off = sysctl_off().expect("turned off");
            assert!(off.was_on());
            assert!(!read().expect("readable"));
            assert!(provenance(&off).contains("turned off"));
        }
        assert!(read().expect("readable"), "restored");
        std::fs::write(SYSCTL, "0\n").expect("root");
        let off = sysctl_off().expect("nothing to do");
        assert!(!off.was_on());
        drop(off);
        assert!(!read().expect("readable"), "left off");
        std::fs::write(SYSCTL, if before { "1\n" } else { "0\n" }).expect("root");
    }
}
