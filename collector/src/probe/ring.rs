//! The kernel's event ring buffer (`EVENTS`), as the events stage reads it: a readable fd
//! to wait on and the records in it as bytes, without the stage knowing aya.

use std::{
    ops::Deref,
    os::fd::{AsRawFd, RawFd},
};

use aya::maps::{MapData, RingBuf};

/// The ring buffer the programs submit records to.
pub struct EventRing(RingBuf<MapData>);

impl EventRing {
    pub(super) fn new(ring: RingBuf<MapData>) -> Self {
        Self(ring)
    }

    /// The next record, if one is ready; it is released when the returned value drops.
    pub fn next_record(&mut self) -> Option<impl Deref<Target = [u8]> + '_> {
        self.0.next()
    }
}

/// Readable when records are waiting (the wake-up threshold is the kernel programs').
impl AsRawFd for EventRing {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// `ProbeConfig::wakeup_bytes` for a ring of `ring_bytes` (a power of two, 4 KiB or more,
/// as the settings check): a quarter of the ring (room left for the reader to catch up
/// before it fills), at most 1 MiB. A power of two: the programs wake the reader when a
/// record spans a multiple of it (`egress_shared::ring::spans_boundary`).
pub(super) fn wakeup_bytes(ring_bytes: u32) -> u32 {
    (ring_bytes / 4).min(1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wakeup_size_is_a_power_of_two_within_a_quarter_of_every_ring() {
        for shift in 12..32 {
            let ring = 1u32 << shift;
            let every = wakeup_bytes(ring);
            assert!(every.is_power_of_two(), "{ring}: {every}");
            assert!(every <= ring / 4 && every <= 1 << 20, "{ring}: {every}");
        }
    }
}
