//! Ring buffer reader: wakes on the ring buffer's fd, decodes every record, and hands
//! typed connections on without ever waiting for the stages after it.

pub mod clock;
pub mod decode;

use std::sync::Arc;

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::{mpsc, watch},
};

pub use self::decode::{Connection, DecodeError, Transport};
use self::{clock::BootClock, decode::decode};
use crate::telemetry::Stats;

pub struct EventReader {
    ring: AsyncFd<RingBuf<MapData>>,
    clock: BootClock,
    stats: Arc<Stats>,
}

impl EventReader {
    pub fn new(ring: RingBuf<MapData>, stats: Arc<Stats>) -> std::io::Result<Self> {
        // SAFETY: the RingBuf owns its map fd and keeps it open, unchanged, for as long
        // as the AsyncFd owns the RingBuf.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(Self {
            ring,
            clock: BootClock::now(),
            stats,
        })
    }

    /// Reads until `shutdown` turns true, then drains what is left in the ring.
    pub async fn run(mut self, out: mpsc::Sender<Connection>, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
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
                    self.drain(&out);
                    break;
                }
            }
        }
    }

    fn drain(&mut self, out: &mpsc::Sender<Connection>) {
        self.clock.refresh();
        let ring = self.ring.get_mut();
        while let Some(item) = ring.next() {
            match decode(&item, &self.clock) {
                Ok(connection) => {
                    self.stats.record_captured();
                    if out.try_send(connection).is_err() {
                        self.stats.record_queue_full();
                    }
                }
                Err(e) => self.stats.record_decode_failed(&e),
            }
        }
    }
}
