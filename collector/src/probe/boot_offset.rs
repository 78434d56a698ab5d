//! The programs' `BOOT_OFFSET`: CLOCK_BOOTTIME minus CLOCK_MONOTONIC, the time the machine
//! spent suspended. The programs add it to the socket's clock cache (monotonic) to time a
//! completion without reading the clock (`emit::completion_time`); it is written before
//! they attach and again every second, so a resume is caught up with within a second
//! (until then a completion falls back to the clock: the cache reads as earlier than the
//! attempt).

use aya::maps::{Array, MapData, MapError};

/// `BOOT_OFFSET`, for the reader to refresh.
pub struct BootOffset {
    map: Array<MapData, u64>,
}

impl BootOffset {
    pub(super) fn new(map: Array<MapData, u64>) -> Self {
        Self { map }
    }

    /// Writes the offset as it is now.
    pub fn refresh(&mut self) -> Result<(), MapError> {
        write(&mut self.map)
    }
}

/// Writes the offset as it is now into `map` (owned or borrowed).
pub fn write<T: std::borrow::BorrowMut<MapData>>(map: &mut Array<T, u64>) -> Result<(), MapError> {
    map.set(0, boot_minus_monotonic_ns(), 0)
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

/// CLOCK_BOOTTIME minus CLOCK_MONOTONIC, the boot time taken between two monotonic reads
/// and compared with their midpoint (vDSO reads tens of ns apart: the error is within
/// that). Never negative: the kernel's boot offset only grows.
pub fn boot_minus_monotonic_ns() -> u64 {
    let before = now_ns(libc::CLOCK_MONOTONIC);
    let boot = now_ns(libc::CLOCK_BOOTTIME);
    let after = now_ns(libc::CLOCK_MONOTONIC);
    offset_from(before, boot, after)
}

fn offset_from(monotonic_before: i128, boot: i128, monotonic_after: i128) -> u64 {
    let midpoint = monotonic_before + (monotonic_after - monotonic_before) / 2;
    (boot - midpoint).clamp(0, u64::MAX as i128) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offset_is_the_boot_time_less_the_monotonic_midpoint() {
        assert_eq!(offset_from(1_000, 5_000_060, 1_100), 4_999_010);
        // Boot read between two monotonic reads that straddle it: no suspension.
        assert_eq!(offset_from(1_000, 1_040, 1_100), 0);
        assert_eq!(offset_from(1_000, 1_060, 1_100), 10);
    }

    #[test]
    fn the_offset_is_never_negative() {
        assert_eq!(offset_from(1_000, 900, 1_100), 0);
    }

    #[test]
    fn the_offset_now_matches_the_clocks() {
        let offset = boot_minus_monotonic_ns() as i128;
        let boot_less_monotonic = now_ns(libc::CLOCK_BOOTTIME) - now_ns(libc::CLOCK_MONOTONIC);
        // The second pair is read a few µs apart at most.
        assert!(
            (offset - boot_less_monotonic).abs() < 1_000_000,
            "{offset} vs {boot_less_monotonic}"
        );
    }
}
