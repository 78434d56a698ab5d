//! The kernel's tick length, measured: the programs' decisions (the per-cgroup rate
//! limit, the identity cache's age) go by the tick count (`bpf_jiffies64`) times this,
//! which spares them an ordered TSC read (collector-ebpf `clock`,
//! `ProbeConfig::coarse_tick_ns`). The kernel does not publish its HZ to user space, so
//! a raw tracepoint program that returns the tick count is run (`BPF_PROG_TEST_RUN`) to
//! find two of its steps some tens of milliseconds apart. That the program loads also
//! answers whether tracing programs may call the helper.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use super::features::{insn, load};
use super::sys::{BPF_PROG_TEST_RUN, TestRunAttr, bpf};

/// `BPF_PROG_TYPE_RAW_TRACEPOINT`, `BPF_FUNC_jiffies64` (uapi/linux/bpf.h).
const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;
const BPF_FUNC_JIFFIES64: i32 = 118;

/// Between the two steps timed: four ticks at the slowest common HZ (100), each step
/// found within the few microseconds of one test run.
const SPAN: Duration = Duration::from_millis(40);
/// Longest wait for the count to step: ten ticks at 100 Hz.
const STEP_TIMEOUT: Duration = Duration::from_millis(100);
/// Measurements tried: a preemption between a step and its time reading can spoil one.
const TRIES: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum TickError {
    #[error("the kernel refuses bpf_jiffies64 to tracing programs: {0}")]
    Refused(std::io::Error),
    #[error("running the tick program failed: {0}")]
    Run(std::io::Error),
    #[error("the tick count did not move in {0:?}")]
    Stalled(Duration),
    #[error("the tick rate measured, {0:.2} Hz, is none a kernel is built with")]
    Implausible(f64),
}

/// The tick length in ns (`1e9 / HZ`, rounded as the kernel's `TICK_NSEC`).
pub fn measure() -> Result<u32, TickError> {
    let program = [
        insn(0x85, 0x00, 0, BPF_FUNC_JIFFIES64), // r0 = bpf_jiffies64()
        insn(0x95, 0x00, 0, 0),                  // exit
    ];
    let program = load(BPF_PROG_TYPE_RAW_TRACEPOINT, &program).map_err(TickError::Refused)?;
    let mut last = TickError::Stalled(STEP_TIMEOUT);
    for _ in 0..TRIES {
        let (first, first_at) = next_step(&program)?;
        std::thread::sleep(SPAN);
        let (second, second_at) = next_step(&program)?;
        match tick_ns(second.wrapping_sub(first), second_at - first_at) {
            Ok(ns) => return Ok(ns),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// The rates a kernel can be built with (`CONFIG_HZ`: 100, 250, 300 and 1,000 on x86 and
/// arm64; the others on older architectures).
const KERNEL_HZ: [u32; 10] = [24, 48, 100, 128, 250, 256, 300, 1000, 1024, 1200];

/// The tick length from `ticks` counted over `elapsed`, if the rate is within 1 % of one
/// a kernel is built with (a step seen late, after a preemption, is further off).
fn tick_ns(ticks: u32, elapsed: Duration) -> Result<u32, TickError> {
    let hz = f64::from(ticks) / elapsed.as_secs_f64();
    let Some(&kernel_hz) = KERNEL_HZ
        .iter()
        .find(|&&k| (hz - f64::from(k)).abs() <= f64::from(k) * 0.01)
    else {
        return Err(TickError::Implausible(hz));
    };
    Ok((1e9 / f64::from(kernel_hz)).round() as u32)
}

/// Waits for the tick count to step: the new count and when it was seen.
fn next_step(program: &OwnedFd) -> Result<(u32, Instant), TickError> {
    let start = Instant::now();
    let before = ticks(program)?;
    loop {
        let now = ticks(program)?;
        let at = Instant::now();
        if now != before {
            return Ok((now, at));
        }
        if at - start > STEP_TIMEOUT {
            return Err(TickError::Stalled(STEP_TIMEOUT));
        }
    }
}

/// The tick count's low 32 bits: the program's return value.
fn ticks(program: &OwnedFd) -> Result<u32, TickError> {
    let mut attr = TestRunAttr {
        prog_fd: program.as_raw_fd() as u32,
        ..TestRunAttr::default()
    };
    // SAFETY: `attr` names a loaded raw tracepoint program that reads no context; the
    // kernel writes only `retval`.
    unsafe { bpf(BPF_PROG_TEST_RUN, &mut attr) }.map_err(TickError::Run)?;
    Ok(attr.retval)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_rates_give_the_kernels_tick() {
        // (ticks, µs, tick ns): 250, 300 (10 µs late), 100 and 1,000 Hz.
        for (ticks, micros, want) in [
            (10, 40_000, 4_000_000),
            (12, 40_010, 3_333_333),
            (4, 40_000, 10_000_000),
            (40, 40_000, 1_000_000),
        ] {
            let got = tick_ns(ticks, Duration::from_micros(micros));
            assert_eq!(got.ok(), Some(want), "{ticks} ticks in {micros} µs");
        }
    }

    #[test]
    fn a_spoiled_measurement_is_refused() {
        // 10 ticks over 41 ms (a step seen a millisecond late): 243.9 Hz, 2.4 % off 250.
        assert!(matches!(
            tick_ns(10, Duration::from_millis(41)),
            Err(TickError::Implausible(_))
        ));
        assert!(matches!(
            tick_ns(0, Duration::from_millis(40)),
            Err(TickError::Implausible(_))
        ));
    }

    /// The host's kernel lets tracing programs read the tick count, and the measurement
    /// gives one of the rates kernels are built with (250 Hz here).
    #[test]
    fn this_kernel_has_a_measurable_tick() {
        let ns = measure().expect("the tick is measured");
        let hz = (1e9 / f64::from(ns)).round() as u32;
        assert!(KERNEL_HZ.contains(&hz), "{ns} ns");
    }
}
