//! Kernel timestamps (CLOCK_BOOTTIME) to wall-clock nanoseconds.

/// `CLOCK_REALTIME - CLOCK_BOOTTIME`, sampled when created or refreshed.
#[derive(Debug, Clone, Copy)]
pub struct BootClock {
    offset_ns: i128,
}

fn now_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer; both clocks exist on every Linux we support.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

/// CLOCK_BOOTTIME now, in the kernel's `bpf_ktime_get_boot_ns` terms.
pub fn boot_now_ns() -> u64 {
    now_ns(libc::CLOCK_BOOTTIME).clamp(0, u64::MAX as i128) as u64
}

impl BootClock {
    pub fn now() -> Self {
        let boot = now_ns(libc::CLOCK_BOOTTIME);
        let real = now_ns(libc::CLOCK_REALTIME);
        Self {
            offset_ns: real - boot,
        }
    }

    pub fn with_offset(offset_ns: i128) -> Self {
        Self { offset_ns }
    }

    /// Re-samples the offset, so wall-clock steps (NTP) show up in later events.
    pub fn refresh(&mut self) {
        *self = Self::now();
    }

    pub fn to_unix_nanos(&self, boot_ns: u64) -> u64 {
        (boot_ns as i128 + self.offset_ns).clamp(0, u64::MAX as i128) as u64
    }
}
