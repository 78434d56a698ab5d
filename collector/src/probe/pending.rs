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
    /// no particular order. A slot being rewritten while it is read may give a record
    /// that mixes two attempts of one socket; the decoder checks what it is handed.
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
            let (ev, tag_after) = unsafe {
                let slot = self.base.add(i);
                if std::ptr::read_volatile(&raw const (*slot).sock_id) == 0 {
                    continue;
                }
                let ev = std::ptr::read_volatile(slot);
                (ev, std::ptr::read_volatile(&raw const (*slot).sock_id))
            };
            // Released or taken by another socket during the copy: not a whole record.
            // A released slot's time is u64::MAX (never started by now); a slot claimed
            // for the first time holds its tag before its record, with a time of 0 until
            // the record is copied in: not a record either.
            if ev.sock_id == 0
                || tag_after != ev.sock_id
                || ev.boot_time_ns == 0
                || ev.boot_time_ns > started_by
            {
                continue;
            }
            found.push(ev);
        }
        found
    }
}

impl Drop for SlotView {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}
