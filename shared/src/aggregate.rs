//! In-kernel aggregation of repeated identical connections: the key both sides derive
//! from an event, so user space can pair a window's count with the record that opened it.

use crate::ConnectEvent;

/// Identical connections: one process, one kind, one destination, one window.
///
/// The window is part of the key, so a closed window's entry is never written again and
/// user space can read and delete it without racing the programs.
#[repr(C)]
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
