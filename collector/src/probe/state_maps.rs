//! The programs' state maps, as user space sees them: how many entries they hold, so the
//! entries an LRU map evicted can be told from the ones still waiting for their exit.

use std::os::fd::{AsFd, AsRawFd};

use aya::maps::{Map, MapData};

/// `BPF_MAP_GET_NEXT_KEY` (uapi/linux/bpf.h).
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// The key-iteration member of `union bpf_attr`.
#[repr(C)]
struct NextKeyAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
}

/// `CALLS` (a call's state from its entry to its exit, by thread id) or `IDENTITIES` (by
/// `tgid`): an LRU map with u32 keys and 8,192 entries.
pub struct CallsMap {
    data: MapData,
}

impl CallsMap {
    pub(super) fn new(map: Map) -> Option<Self> {
        match map {
            Map::LruHashMap(data) | Map::HashMap(data) => Some(Self { data }),
            _ => None,
        }
    }

    /// The entries the map holds now. The map changes while it is walked: a key removed
    /// under the walk restarts it, so the count can be too high (never by more than the
    /// capacity twice: the walk stops there), which makes the evictions reported from it
    /// too low, never too high.
    pub fn entries(&self) -> u64 {
        const LIMIT: u64 = 2 * 8192;
        let fd = self.data.fd().as_fd().as_raw_fd() as u32;
        let mut key = 0u32;
        let mut next = 0u32;
        let mut count = 0;
        let mut first = true;
        while count < LIMIT {
            let mut attr = NextKeyAttr {
                map_fd: fd,
                _pad: 0,
                key: if first { 0 } else { &key as *const u32 as u64 },
                next_key: &mut next as *mut u32 as u64,
            };
            // SAFETY: `attr` points to two u32 keys that outlive the call (the map's key
            // size, checked at load); a null key asks for the first one.
            if unsafe { super::sys::bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) }.is_err() {
                break;
            }
            count += 1;
            key = next;
            first = false;
        }
        count
    }
}
