//! The bounded queue of log batches between batching and sending, and the backoff.
//! Full: the oldest batch not being sent is dropped (and the caller counts it), so a slow
//! or absent endpoint costs old data, never memory, and never stalls capture.

use std::{collections::VecDeque, time::Duration};

use bytes::Bytes;

/// A sealed batch: the `ExportLogsServiceRequest` encoded once, so a retry re-sends the
/// same bytes without re-encoding or copying.
pub struct Batch {
    pub encoded: Bytes,
    pub records: usize,
}

pub struct BatchQueue {
    batches: VecDeque<Batch>,
    records: usize,
    max_records: usize,
    front_in_flight: bool,
}

impl BatchQueue {
    pub fn new(max_records: usize) -> Self {
        Self {
            batches: VecDeque::new(),
            records: 0,
            max_records: max_records.max(1),
            front_in_flight: false,
        }
    }

    /// Queues `batch`; returns how many records had to be dropped to make room.
    pub fn push(&mut self, batch: Batch) -> usize {
        let mut dropped = 0;
        while self.records + batch.records > self.max_records {
            let victim = usize::from(self.front_in_flight);
            let Some(old) = self.batches.remove(victim) else {
                break;
            };
            self.records -= old.records;
            dropped += old.records;
        }
        self.records += batch.records;
        self.batches.push_back(batch);
        dropped
    }

    /// The batch to send next, marked in flight.
    pub fn start_front(&mut self) -> Option<&Batch> {
        let front = self.batches.front()?;
        self.front_in_flight = true;
        Some(front)
    }

    /// The in-flight batch is done (delivered or given up); returns its record count.
    pub fn finish_front(&mut self) -> usize {
        self.front_in_flight = false;
        match self.batches.pop_front() {
            Some(batch) => {
                self.records -= batch.records;
                batch.records
            }
            None => 0,
        }
    }

    /// The in-flight batch will be tried again later.
    pub fn release_front(&mut self) {
        self.front_in_flight = false;
    }

    pub fn records(&self) -> usize {
        self.records
    }

    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// Empties the queue; returns how many records it held.
    pub fn clear(&mut self) -> usize {
        let records = self.records;
        self.batches.clear();
        self.records = 0;
        self.front_in_flight = false;
        records
    }
}

/// Exponential backoff with jitter: 0.5 s doubling to 30 s, each delay drawn uniformly
/// from its upper half; a server's Retry-After/RetryInfo wins when longer.
pub struct Backoff {
    attempt: u32,
    seed: u64,
}

impl Backoff {
    const INITIAL: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(30);

    pub fn new() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x2545_f491)
            | 1;
        Self { attempt: 0, seed }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn next_delay(&mut self, server_hint: Option<Duration>) -> Duration {
        let ceiling = Self::INITIAL
            .saturating_mul(1 << self.attempt.min(16))
            .min(Self::MAX);
        self.attempt = self.attempt.saturating_add(1);
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let half = ceiling / 2;
        let jitter = half.mul_f64((self.seed % 1000) as f64 / 1000.0);
        let delay = half + jitter;
        match server_hint {
            Some(hint) if hint > delay => hint.min(Self::MAX * 4),
            _ => delay,
        }
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(records: usize) -> Batch {
        Batch {
            encoded: Bytes::new(),
            records,
        }
    }

    #[test]
    fn full_queue_drops_the_oldest_but_not_the_batch_in_flight() {
        let mut q = BatchQueue::new(10);
        assert_eq!(q.push(batch(4)), 0);
        assert_eq!(q.push(batch(4)), 0);
        assert!(q.start_front().is_some());
        // 8 + 4 > 10: the oldest batch not in flight (the second) goes.
        assert_eq!(q.push(batch(4)), 4);
        assert_eq!(q.records(), 8);
        assert_eq!(q.finish_front(), 4);
        assert_eq!(q.records(), 4);
        assert_eq!(
            q.push(batch(20)),
            4,
            "a batch larger than the bound still goes in alone"
        );
        assert_eq!(q.clear(), 20);
        assert!(q.is_empty());
    }

    #[test]
    fn backoff_grows_with_jitter_and_honours_the_server() {
        let mut b = Backoff::new();
        let first = b.next_delay(None);
        assert!(
            first >= Duration::from_millis(250) && first <= Duration::from_millis(500),
            "{first:?}"
        );
        let mut last = first;
        for _ in 0..10 {
            last = b.next_delay(None);
        }
        assert!(
            last >= Duration::from_secs(15) && last <= Duration::from_secs(30),
            "{last:?}"
        );
        assert_eq!(
            b.next_delay(Some(Duration::from_secs(45))),
            Duration::from_secs(45)
        );
        b.reset();
        assert!(b.next_delay(None) <= Duration::from_millis(500));
    }
}
