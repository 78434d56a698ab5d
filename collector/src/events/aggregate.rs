//! Closing in-kernel aggregates: once a window is over, the repeats the programs counted
//! for it become one record, a copy of the record that opened the window carrying the
//! count. Windows are part of the map key, so a closed window is never written again.

use std::collections::HashMap;

use egress_shared::AggregateKey;

use super::{Connection, clock::BootClock};
use crate::{
    probe::feedback::AggregateWindows,
    telemetry::events::{ReaderEvent, ReaderTelemetry},
};

/// Opening records kept at most (the kernel map holds 8192 aggregates).
const MAX_OPEN: usize = 16384;

pub struct Aggregates {
    map: AggregateWindows,
    window_ns: u64,
    /// The record that opened each aggregate, until its window closes.
    opened: HashMap<AggregateKey, Connection>,
    /// Windows up to this one have been closed.
    closed_through: u32,
}

impl Aggregates {
    pub fn new(map: AggregateWindows, window_ns: u64) -> Self {
        Self {
            map,
            window_ns: window_ns.max(1),
            opened: HashMap::new(),
            closed_through: 0,
        }
    }

    /// Keeps the first record of each aggregate's window, to report its repeats with.
    pub fn note(&mut self, connection: &Connection) {
        if let Some(key) = connection.aggregate
            && self.opened.len() < MAX_OPEN
        {
            self.opened.entry(key).or_insert_with(|| connection.clone());
        }
    }

    /// Closes the windows that ended at least a whole window ago (programs still running
    /// at a window's end have had time to finish), or every window with `all` (the
    /// programs are detached). Repeats whose opening record never reached user space
    /// are counted as lost.
    pub fn close(
        &mut self,
        now_boot_ns: u64,
        all: bool,
        clock: &BootClock,
        telemetry: &ReaderTelemetry,
        out: &mut Vec<Connection>,
    ) {
        let current = AggregateKey::window_of(now_boot_ns, self.window_ns);
        let last_closable = if all {
            u32::MAX
        } else {
            current.saturating_sub(2)
        };
        if last_closable <= self.closed_through {
            return;
        }
        for (key, repeats) in self.map.take_through(self.closed_through, last_closable) {
            let opening = self.opened.remove(&key);
            if repeats == 0 {
                continue;
            }
            match opening {
                Some(mut record) => {
                    // The window's end: the repeats happened within it.
                    let end_ns = u64::from(key.window).saturating_mul(self.window_ns);
                    record.time_unix_nano = clock.to_unix_nanos(end_ns.min(now_boot_ns));
                    record.source.set_port(0);
                    record.rate_limited_before = 0;
                    record.count = repeats;
                    // The repeats' UDP bytes were not counted; the opener's are its own.
                    record.udp_bytes = None;
                    out.push(record);
                }
                None => telemetry.emit(ReaderEvent::RepeatsLost { repeats }),
            }
        }
        // Opening records whose aggregate had no repeats (or was already gone).
        self.opened.retain(|key, _| key.window > last_closable);
        self.closed_through = last_closable;
    }
}
