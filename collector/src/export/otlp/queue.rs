//! The bounded queue of log batches between batching and sending.
//! Full: the oldest batch not being sent is dropped (and the caller counts it), so a slow
//! or absent endpoint costs old data, never memory, and never stalls capture.

use std::collections::VecDeque;

use crate::otlp_client::transport::Encoded;

/// A sealed batch: the `ExportLogsServiceRequest` encoded once, so a retry re-sends the
/// same bytes without re-encoding or copying.
pub struct Batch {
    pub encoded: Encoded,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(records: usize) -> Batch {
        Batch {
            encoded: Encoded::default(),
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
}
