//! The programs' `BOOT_OFFSET`: CLOCK_BOOTTIME minus CLOCK_MONOTONIC, the time the machine
//! spent suspended. The programs add it to the socket's clock cache (monotonic) to time a
//! completion without reading the clock (`emit::completion_time`); it is written before
//! they attach and again every second.
//!
//! The estimate is never above the true offset (see [`estimate`]), and the true offset
//! only grows (at each resume), so the largest estimate so far is what is written. An
//! offset that is too small makes a completion look earlier than it was: by the read gap
//! (tens of ns) in general; after a resume, by the time suspended, until the next write
//! (within a second), where the programs fall back to the clock only if that makes the
//! completion look earlier than the attempt's start.

use aya::maps::{Array, MapData, MapError};

/// Reads of the three clocks tried per estimate: the narrowest is kept.
const TRIES: usize = 4;

/// `BOOT_OFFSET`, for the reader to refresh.
pub struct BootOffset {
    map: Array<MapData, u64>,
    /// What was written last (the largest estimate so far).
    written: u64,
}

impl BootOffset {
    pub(super) fn new(map: Array<MapData, u64>, written: u64) -> Self {
        Self { map, written }
    }

    /// Writes the offset if it grew (a resume since the last write).
    pub fn refresh(&mut self) -> Result<(), MapError> {
        let now = estimate();
        if now > self.written {
            self.map.set(0, now, 0)?;
            self.written = now;
        }
        Ok(())
    }
}

/// Writes the offset as it is now into `map` (before the programs attach); returns it.
pub fn write<T: std::borrow::BorrowMut<MapData>>(map: &mut Array<T, u64>) -> Result<u64, MapError> {
    let offset = estimate();
    map.set(0, offset, 0)?;
    Ok(offset)
}

/// `clock`'s time in ns; `None` if the clock cannot be read.
fn now_ns(clock: libc::clockid_t) -> Option<i128> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return None;
    }
    Some(ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128)
}

/// CLOCK_BOOTTIME minus CLOCK_MONOTONIC, at most the true difference: the boot time is
/// read between two monotonic reads and compared with the later one, and of a few tries
/// the one whose monotonic reads lie closest together is kept (a read preempted in the
/// middle only makes its estimate smaller). 0 if the clocks cannot be read.
pub fn estimate() -> u64 {
    let mut best: Option<(i128, u64)> = None;
    for _ in 0..TRIES {
        let (Some(before), Some(boot), Some(after)) = (
            now_ns(libc::CLOCK_MONOTONIC),
            now_ns(libc::CLOCK_BOOTTIME),
            now_ns(libc::CLOCK_MONOTONIC),
        ) else {
            return 0;
        };
        let gap = after - before;
        if best.is_none_or(|(narrowest, _)| gap < narrowest) {
            best = Some((gap, lower_bound(boot, after)));
        }
    }
    best.map_or(0, |(_, offset)| offset)
}

/// The boot time read before the monotonic time `monotonic_after`: their difference is
/// the offset less the time between the two reads.
fn lower_bound(boot: i128, monotonic_after: i128) -> u64 {
    (boot - monotonic_after).clamp(0, u64::MAX as i128) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_never_exceeds_the_true_offset() {
        let offset = 5_000_000;
        // The boot clock read at monotonic 1_040, the second monotonic read at 1_100.
        assert_eq!(lower_bound(1_040 + offset, 1_100), offset as u64 - 60);
        // Preempted for 3 ms before the second monotonic read: smaller still.
        assert_eq!(
            lower_bound(1_040 + offset, 3_001_100),
            offset as u64 - 3_000_060
        );
        // A gap longer than the offset: 0, never negative.
        assert_eq!(lower_bound(1_040, 1_100), 0);
    }

    #[test]
    fn the_estimate_now_is_within_the_clocks_difference() {
        let estimate = estimate() as i128;
        let boot = now_ns(libc::CLOCK_BOOTTIME).expect("CLOCK_BOOTTIME");
        let monotonic = now_ns(libc::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
        // At most the difference (read the other way round: boot first, then monotonic,
        // is a lower bound too), and within a millisecond of it on a machine this calm.
        let difference = boot - monotonic;
        assert!(
            estimate <= difference.max(0) + 1_000_000,
            "{estimate} vs {difference}"
        );
        assert!(
            difference - estimate < 1_000_000,
            "{estimate} vs {difference}"
        );
    }
}
