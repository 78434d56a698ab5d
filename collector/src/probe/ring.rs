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
