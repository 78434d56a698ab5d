//! The kernel's tick, for the programs' decisions (the per-cgroup rate limit, the
//! identity cache's age): they go by the tick count (`bpf_jiffies64`, which the verifier
//! inlines into a load on 64-bit JITs) times its length, which spares them an ordered TSC
//! read (collector-ebpf `clock`, `ProbeConfig::coarse_tick_ns`). The length is the
//! resolution of CLOCK_MONOTONIC_COARSE (the kernel's `TICK_NSEC`); whether tracing
//! programs may call the helper (5.9+) is answered by loading one that does.

use super::features::{insn, load};

/// `BPF_PROG_TYPE_RAW_TRACEPOINT`, `BPF_FUNC_jiffies64` (uapi/linux/bpf.h).
const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;
const BPF_FUNC_JIFFIES64: i32 = 118;

/// A raw tracepoint program that returns the tick count: that it loads tells whether
/// tracing programs may call the helper.
const TICKS_PROGRAM: [u64; 2] = [
    insn(0x85, 0x00, 0, BPF_FUNC_JIFFIES64), // r0 = bpf_jiffies64()
    insn(0x95, 0x00, 0, 0),                  // exit
];

#[derive(Debug, thiserror::Error)]
pub enum TickError {
    #[error("the kernel refuses bpf_jiffies64 to tracing programs: {0}")]
    Refused(std::io::Error),
    #[error("the resolution of CLOCK_MONOTONIC_COARSE cannot be read: {0}")]
    Resolution(std::io::Error),
    #[error("the tick length read, {0} ns, is not one of 1,200 to 24 Hz")]
    Implausible(u64),
}

/// The tick length in ns, where tracing programs may read the tick count.
pub fn tick_ns() -> Result<u32, TickError> {
    drop(load(BPF_PROG_TYPE_RAW_TRACEPOINT, &TICKS_PROGRAM).map_err(TickError::Refused)?);
    let mut res = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `res` is a valid out-pointer.
    if unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut res) } != 0 {
        return Err(TickError::Resolution(std::io::Error::last_os_error()));
    }
    plausible(res.tv_sec as u64 * 1_000_000_000 + res.tv_nsec as u64)
}

/// `ns` if it is the tick of a rate a kernel can be built with (24 to 1,200 Hz).
fn plausible(ns: u64) -> Result<u32, TickError> {
    if (833_333..=41_666_667).contains(&ns) {
        Ok(ns as u32)
    } else {
        Err(TickError::Implausible(ns))
    }
}

/// Whether the rate limit may go by the tick: each tick may then admit at most the
/// burst, so a burst smaller than the events of a tick (twice, for margin) would hold
/// the cgroup below its rate. 0 (no limit) always may.
pub fn suits_limit(tick_ns: u32, rate: u32, burst: u32) -> bool {
    u64::from(burst) * 1_000_000_000 >= 2 * u64::from(rate) * u64::from(tick_ns)
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::time::{Duration, Instant};

    use super::*;
    use crate::probe::sys::{BPF_PROG_TEST_RUN, TestRunAttr, bpf};

    #[test]
    fn only_a_kernel_rate_is_taken() {
        assert_eq!(plausible(4_000_000).ok(), Some(4_000_000));
        assert_eq!(plausible(1_000_000).ok(), Some(1_000_000));
        assert!(plausible(1).is_err(), "a high-resolution clock's 1 ns");
        assert!(plausible(100_000_000).is_err());
    }

    #[test]
    fn a_burst_smaller_than_a_tick_of_events_keeps_the_clock() {
        // 250 Hz: 5,000/s is 20 events a tick.
        assert!(suits_limit(4_000_000, 5_000, 10_000));
        assert!(suits_limit(4_000_000, 5_000, 40));
        assert!(!suits_limit(4_000_000, 5_000, 39));
        assert!(!suits_limit(10_000_000, 1_000, 1));
        assert!(suits_limit(4_000_000, 0, 1));
    }

    /// The length read is the tick's: a program returning the tick count, run at two
    /// moments 400 ms apart, sees it advance by 400 ms over that length (within 5 %: a
    /// tick either way is 1-2.5 %).
    #[test]
    fn the_tick_length_is_the_rate_the_count_advances_at() {
        let tick = tick_ns().expect("this kernel lets tracing programs read the tick count");
        let program =
            load(BPF_PROG_TYPE_RAW_TRACEPOINT, &TICKS_PROGRAM).expect("the program loads");
        // The count and when it was read: a run bracketed by two time readings under a
        // millisecond apart (a run the scheduler interrupted is tried again).
        let ticks = |program: &OwnedFd| {
            for _ in 0..100 {
                let mut attr = TestRunAttr {
                    prog_fd: program.as_raw_fd() as u32,
                    ..TestRunAttr::default()
                };
                let before = Instant::now();
                // SAFETY: a loaded raw tracepoint program that reads no context.
                unsafe { bpf(BPF_PROG_TEST_RUN, &mut attr) }.expect("the test run");
                let after = Instant::now();
                if after - before < Duration::from_millis(1) {
                    return (attr.retval, before + (after - before) / 2);
                }
            }
            panic!("no test run of the tick program took under a millisecond");
        };
        let (first, first_at) = ticks(&program);
        std::thread::sleep(Duration::from_millis(400));
        let (second, second_at) = ticks(&program);
        let counted = f64::from(second.wrapping_sub(first)) * f64::from(tick);
        let elapsed = (second_at - first_at).as_nanos() as f64;
        assert!(
            (counted - elapsed).abs() <= 0.05 * elapsed,
            "{} ticks of {tick} ns in {elapsed} ns",
            second.wrapping_sub(first)
        );
    }
}
