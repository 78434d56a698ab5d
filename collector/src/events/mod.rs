//! Ring buffer reader: wakes on the ring buffer's fd, decodes every record, and hands
//! typed connections on without ever waiting for the stages after it.

pub mod aggregate;
pub mod clock;
pub mod decode;

use std::sync::Arc;

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::{mpsc, watch},
};

pub use self::decode::{Connection, DecodeError, Transport};
use self::{aggregate::Aggregates, clock::BootClock, decode::decode};
use crate::telemetry::Stats;

/// Most events handed on at once; the queues between stages hold
/// `queue_capacity / BATCH_RECORDS` batches, so at most `queue_capacity` events.
pub const BATCH_RECORDS: usize = 256;

/// Longest an event waits in the ring buffer when too few arrive to wake the reader.
pub const POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

pub struct EventReader {
    ring: AsyncFd<RingBuf<MapData>>,
    clock: BootClock,
    stats: Arc<Stats>,
    aggregates: Option<Aggregates>,
}

impl EventReader {
    pub fn new(
        ring: RingBuf<MapData>,
        aggregates: Option<Aggregates>,
        stats: Arc<Stats>,
    ) -> std::io::Result<Self> {
        // SAFETY: the RingBuf owns its map fd and keeps it open, unchanged, for as long
        // as the AsyncFd owns the RingBuf.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(Self {
            ring,
            clock: BootClock::now(),
            stats,
            aggregates,
        })
    }

    /// Reads until `shutdown` turns true, then drains what is left in the ring.
    pub async fn run(
        mut self,
        out: mpsc::Sender<Vec<Connection>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        // The programs wake us only when a batch has piled up; this drains the rest.
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = poll.tick() => {
                    self.drain(&out);
                    self.close_aggregates(false, &out);
                }
                guard = self.ring.readable_mut() => {
                    match guard {
                        Ok(mut guard) => {
                            guard.clear_ready();
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "The ring buffer cannot be polled; capture stops.");
                            break;
                        }
                    }
                    self.drain(&out);
                }
                _ = shutdown.changed() => {
                    // The programs are detached by now; a run that began just before
                    // has had microseconds to finish: then every window can be closed.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    self.drain(&out);
                    self.close_aggregates(true, &out);
                    break;
                }
            }
        }
    }

    /// Hands events on in batches: one wake-up of the next stage per batch, not per event.
    fn drain(&mut self, out: &mpsc::Sender<Vec<Connection>>) {
        self.clock.refresh();
        let ring = self.ring.get_mut();
        let mut batch = Vec::new();
        loop {
            let item = ring.next();
            let more = item.is_some();
            if let Some(item) = item {
                match decode(&item, &self.clock) {
                    Ok(connection) => {
                        if let Some(aggregates) = &mut self.aggregates {
                            aggregates.note(&connection);
                        }
                        batch.push(connection);
                    }
                    Err(e) => self.stats.record_decode_failed(&e),
                }
            }
            if batch.len() >= BATCH_RECORDS || (!more && !batch.is_empty()) {
                let n = batch.len();
                self.stats.record_captured(n);
                if out.try_send(std::mem::take(&mut batch)).is_err() {
                    self.stats.record_queue_full(n);
                }
            }
            if !more {
                break;
            }
        }
    }

    /// Hands on the records of aggregation windows that have closed; call after a
    /// drain, so the records that opened them have been seen.
    fn close_aggregates(&mut self, all: bool, out: &mpsc::Sender<Vec<Connection>>) {
        let Some(aggregates) = &mut self.aggregates else {
            return;
        };
        let mut closing = Vec::new();
        aggregates.close(
            clock::boot_now_ns(),
            all,
            &self.clock,
            &self.stats,
            &mut closing,
        );
        for batch in closing.chunks(BATCH_RECORDS) {
            self.stats.record_captured(batch.len());
            if out.try_send(batch.to_vec()).is_err() {
                // Each record stands for its repeats: all of them are lost.
                let connections = batch.iter().map(|c| c.count).sum::<u64>();
                self.stats.record_queue_full(batch.len());
                self.stats
                    .record_repeats_lost(connections.saturating_sub(batch.len() as u64));
            }
        }
    }
}
