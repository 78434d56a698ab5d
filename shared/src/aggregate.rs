//! In-kernel aggregation of repeated identical connections: the key both sides derive
//! from an event, so user space can pair a window's count with the record that opened it.

use crate::ConnectEvent;

/// Identical connections: one process, one kind, one destination, one window.
///
/// The window is part of the key, so a closed window's entry is never written again and
/// user space can read and delete it without racing the programs.
/// Aligned as words, so the programs compare and copy it a word at a time
/// ([`AggregateKey::words`]).
#[repr(C, align(8))]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct AggregateKey {
    pub tgid: u32,
    /// `boot_time_ns / aggregate_window_ns + 1`: never 0, which means "not aggregated".
    pub window: u32,
    pub family: u16,
    pub dst_port: u16,
    pub protocol: u8,
    pub kind: u8,
    pub _pad: [u8; 2],
    pub dst_addr: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<AggregateKey>() == 32);

impl AggregateKey {
    /// The window a time falls in; `window_ns` must not be 0.
    pub const fn window_of(boot_time_ns: u64, window_ns: u64) -> u32 {
        (boot_time_ns / window_ns + 1) as u32
    }

    pub const fn of(ev: &ConnectEvent, window: u32) -> Self {
        Self {
            tgid: ev.tgid,
            window,
            family: ev.family,
            dst_port: ev.dst_port,
            protocol: ev.protocol,
            kind: ev.kind,
            _pad: [0; 2],
            dst_addr: ev.dst_addr,
        }
    }
}

#[cfg(feature = "user")]
// SAFETY: plain old data, no padding holes (asserted above).
unsafe impl aya::Pod for AggregateKey {}

/// An aggregate's repeats counted on one CPU in place (`REPEAT_SLOTS`, a per-CPU array):
/// a repeat whose key this CPU's slot holds costs the key's compare and an add, not a
/// hash lookup. A slot is claimed for a key (by the programs, after a repeat found the key
/// in `AGGREGATES`) once its window has been read by user space (`AGGREGATES_READ`).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct RepeatSlot {
    /// The key's window: 0 while never used, [`RepeatSlot::CLAIMING`] while claimed.
    pub window: u64,
    pub key: AggregateKey,
    /// Repeats counted here, all in `key`'s window.
    pub repeats: u64,
}

impl RepeatSlot {
    /// `window` while a program writes the slot's key.
    pub const CLAIMING: u64 = u64::MAX;
    /// Slots per CPU: a power of two, a few per destination a process repeats in a window.
    pub const PER_CPU: u32 = 256;

    /// The slot of `key` (a multiplicative hash of its words), folded with `mask`
    /// (`ProbeConfig::repeat_slot_mask`).
    #[inline(always)]
    pub fn index_of(key: &AggregateKey, mask: u32) -> u32 {
        let words = key.words();
        let mixed = words[0]
            ^ words[1].rotate_left(17)
            ^ words[2].rotate_left(31)
            ^ words[3].rotate_left(47);
        crate::slot_of(mixed, mask)
    }

    /// Whether the slot counts repeats of window `window`'s aggregates that user space
    /// reads when it closes `after + 1 ..= last`.
    pub fn counts_between(&self, after: u32, last: u32) -> bool {
        self.window != Self::CLAIMING
            && self.window > u64::from(after)
            && self.window <= u64::from(last)
            && self.key.window as u64 == self.window
    }
}

impl AggregateKey {
    /// The key as four 8-byte words (compared and copied a word at a time).
    #[inline(always)]
    pub fn words(&self) -> [u64; 4] {
        // SAFETY: 32 bytes of plain data, no padding holes, 8-byte aligned (asserted
        // above).
        unsafe { core::ptr::read((self as *const Self).cast::<[u64; 4]>()) }
    }
}

const _: () = assert!(core::mem::size_of::<RepeatSlot>() == 48);
const _: () = assert!(core::mem::align_of::<AggregateKey>() == 8);
const _: () = assert!(core::mem::offset_of!(RepeatSlot, key) == 8);

#[cfg(feature = "user")]
// SAFETY: plain old data, no padding holes (asserted above).
unsafe impl aya::Pod for RepeatSlot {}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(window: u64, key_window: u32) -> RepeatSlot {
        RepeatSlot {
            window,
            key: AggregateKey {
                tgid: 7,
                window: key_window,
                family: 2,
                dst_port: 443,
                protocol: 6,
                kind: 1,
                _pad: [0; 2],
                dst_addr: [0; 16],
            },
            repeats: 3,
        }
    }

    #[test]
    fn a_slot_is_read_at_its_window_s_close_only() {
        assert!(slot(5, 5).counts_between(4, 6));
        assert!(slot(5, 5).counts_between(4, 5), "the last window is read");
        assert!(!slot(5, 5).counts_between(5, 9), "read at an earlier close");
        assert!(!slot(5, 5).counts_between(2, 4), "not closed yet");
        assert!(!slot(0, 0).counts_between(0, 9), "never used");
        assert!(
            !slot(RepeatSlot::CLAIMING, 5).counts_between(0, u32::MAX),
            "being claimed"
        );
        assert!(
            !slot(6, 5).counts_between(0, 9),
            "a key half written for another window"
        );
    }

    #[test]
    fn keys_that_differ_anywhere_differ_as_words() {
        let a = slot(1, 1).key;
        let mut b = a;
        b.dst_addr[15] = 1;
        assert_ne!(a.words(), b.words());
        let mut c = a;
        c.kind = 2;
        assert_ne!(a.words(), c.words());
        assert_eq!(a.words()[0], u64::from(a.tgid) | u64::from(a.window) << 32);
    }
}
