//! TCP attempts waiting in SYN_SENT, as user space reads them for `--pending-report`: the
//! kernel keeps each in a slot of `PENDING_SLOTS` (an mmapable array, read here through
//! a shared read-only mapping: no syscall per slot at each poll), or, when its slot was
//! taken or the kernel lacks compare-and-exchange, in the `PENDING_TCP` hash.

use std::os::fd::{AsFd, AsRawFd};

use aya::maps::{HashMap, Map, MapData};
use egress_shared::ConnectEvent;

/// `maps::PENDING_SLOT_COUNT` in `collector-ebpf`: checked against the map at start.
const SLOTS: usize = 1024;

/// The pending attempts, both maps.
pub struct PendingAttempts {
    spilled: HashMap<MapData, u64, ConnectEvent>,
    slots: SlotView,
}

impl PendingAttempts {
    pub(super) fn new(spilled: HashMap<MapData, u64, ConnectEvent>, slots: SlotView) -> Self {
        Self { spilled, slots }
    }

    /// Every attempt that entered SYN_SENT at or before `started_by` (CLOCK_BOOTTIME), in
    /// no particular order. A slot released or rewritten while it is read is left out (see
    /// `whole_record`); the decoder checks what it is handed.
    pub fn started_by(&self, started_by: u64) -> Vec<ConnectEvent> {
        let mut found = self.slots.started_by(started_by);
        found.extend(
            self.spilled
                .iter()
                .filter_map(Result::ok)
                .map(|(_, ev)| ev)
                .filter(|ev| ev.boot_time_ns <= started_by),
        );
        found
    }
}

/// `PENDING_SLOTS` mapped read-only into this process.
pub struct SlotView {
    /// Keeps the map (and so the mapping's object) alive.
    _map: MapData,
    base: *const ConnectEvent,
    len: usize,
}

// SAFETY: the mapping is read-only here and only read through volatile loads; the
// kernel writes it concurrently whoever reads it.
unsafe impl Send for SlotView {}

impl SlotView {
    pub(super) fn new(map: Map) -> Result<Self, String> {
        let Map::Array(data) = map else {
            return Err("not an array".into());
        };
        let info = data.info().map_err(|e| e.to_string())?;
        let value_size = info.value_size() as usize;
        if value_size != size_of::<ConnectEvent>() || info.max_entries() as usize != SLOTS {
            return Err(format!(
                "{} slots of {value_size} bytes, expected {SLOTS} of {}",
                info.max_entries(),
                size_of::<ConnectEvent>()
            ));
        }
        let len = SLOTS * size_of::<ConnectEvent>();
        let fd = data.fd().as_fd().as_raw_fd();
        // SAFETY: a shared read-only mapping of the map's value area (BPF_F_MMAPABLE), as
        // long as the array's values; the kernel rounds the mapping up to pages.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        Ok(Self {
            _map: data,
            base: base as *const ConnectEvent,
            len,
        })
    }

    fn started_by(&self, started_by: u64) -> Vec<ConnectEvent> {
        let mut found = Vec::new();
        for i in 0..SLOTS {
            // SAFETY: `i` is within the mapping; the kernel changes the slot at any time,
            // so it is copied with volatile loads and judged by its copy.
            let (ev, after) = unsafe {
                let slot = self.base.add(i);
                if std::ptr::read_volatile(&raw const (*slot).sock_id) == 0 {
                    continue;
                }
                let ev = std::ptr::read_volatile(slot);
                // The copy's loads before the loads that judge it (arm64 reorders loads).
                std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
                (
                    ev,
                    After {
                        tag: std::ptr::read_volatile(&raw const (*slot).sock_id),
                        time: std::ptr::read_volatile(&raw const (*slot).boot_time_ns),
                    },
                )
            };
            if whole_record(&ev, after, started_by) {
                found.push(ev);
            }
        }
        found
    }
}

/// A slot's tag and time read again once its copy is made.
#[derive(Copy, Clone)]
struct After {
    tag: u64,
    time: u64,
}

/// Whether `copy`, a slot copied while the kernel may write it, is one whole attempt
/// that started by `started_by`. Released or taken by another socket during the copy: not
/// a whole record. A released slot's time is u64::MAX (never started by now); a slot
/// claimed holds its tag before its record, with a time of 0 (never used) or u64::MAX
/// (released) until the attempt's own is written: not a record either. The tag alone does
/// not tell a slot released and taken again during the copy (the new tag is read at the
/// copy's end), the time does: a release writes u64::MAX into it first, and no attempt's
/// time comes back, so a time that still holds after the copy means no release in it.
fn whole_record(copy: &ConnectEvent, after: After, started_by: u64) -> bool {
    copy.sock_id != 0
        && after.tag == copy.sock_id
        && after.time == copy.boot_time_ns
        && copy.boot_time_ns != 0
        && copy.boot_time_ns <= started_by
}

impl Drop for SlotView {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(sock_id: u64, boot_time_ns: u64) -> ConnectEvent {
        let mut ev = ConnectEvent::zeroed();
        ev.sock_id = sock_id;
        ev.boot_time_ns = boot_time_ns;
        ev
    }

    #[test]
    fn a_slot_unchanged_by_the_copy_is_taken() {
        let copy = attempt(0xffff_8880_1234_5600, 1_000);
        let after = After {
            tag: copy.sock_id,
            time: copy.boot_time_ns,
        };
        assert!(whole_record(&copy, after, 2_000));
        assert!(!whole_record(&copy, after, 999), "started after");
    }

    /// The copy began on an old attempt (its time read first) and the slot was released
    /// and taken by another socket before the copy read the rest, tag included: the tag
    /// agrees, but the time the slot holds now (`u64::MAX` from the release, then the new
    /// attempt's) does not. Taken, it would be a pending record of one socket's time and
    /// the other's fields.
    #[test]
    fn a_slot_released_and_taken_again_during_the_copy_is_not_taken() {
        let copy = attempt(0xffff_8880_1234_5600, 1_000);
        for time_now in [u64::MAX, 5_000] {
            let after = After {
                tag: copy.sock_id,
                time: time_now,
            };
            assert!(!whole_record(&copy, after, 2_000), "time now {time_now}");
        }
    }

    #[test]
    fn released_never_used_and_retagged_slots_are_not_taken() {
        let started_by = 2_000;
        let released = attempt(7, u64::MAX);
        let unused = attempt(7, 0);
        let retagged = attempt(7, 1_000);
        let same = |ev: &ConnectEvent| After {
            tag: ev.sock_id,
            time: ev.boot_time_ns,
        };
        assert!(!whole_record(&released, same(&released), started_by));
        assert!(!whole_record(&unused, same(&unused), started_by));
        let other = After {
            tag: 8,
            time: retagged.boot_time_ns,
        };
        assert!(!whole_record(&retagged, other, started_by));
    }
}
