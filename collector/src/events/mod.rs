//! Ring buffer reader: wakes on the ring buffer's fd, decodes every record, and hands
//! typed connections on without ever waiting for the stages after it.
//!
//! Public items: [`EventReader`] (the stage, reporting through
//! `telemetry::events::ReaderTelemetry`), [`BATCH_RECORDS`] (the batch size the queues
//! are counted in), [`Connection`] and its parts ([`Transport`], [`Delivery`]),
//! [`DecodeError`] (its static `reason()` is what telemetry counts), and the
//! helpers the reader runs: [`aggregate`] (closing in-kernel aggregates through
//! `probe::feedback`), [`flows`] (UDP bytes sent after a flow's last record, swept
//! through `probe::flow_sweep`), [`names`] (DNS names of connections), [`outcome`] (TCP
//! outcomes and closes), [`clock`] (boot time to wall time), [`decode`], [`text`] (names as
//! shared text).

pub mod aggregate;
pub mod clock;
pub mod decode;
pub mod flows;
pub mod identities;
pub mod names;
pub mod outcome;
mod poll_timer;
pub mod text;

use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::{mpsc, watch},
};

pub use self::decode::{Connection, DecodeError, Delivery, Transport};
use self::{
    aggregate::Aggregates,
    clock::BootClock,
    decode::{Decoded, decode, decode_connect},
    flows::FlowSweeper,
    identities::Identities,
    names::Names,
    outcome::Tracker,
    poll_timer::PollTimer,
};
use crate::{
    config::settings::{DnsSettings, OutcomeSettings},
    enrich::{Record, Resource},
    probe::{boot_offset::BootOffset, pending::PendingAttempts, ring::EventRing},
    telemetry::events::{ReaderEvent, ReaderTelemetry},
};

/// Most events handed on at once; the queues between stages hold
/// `queue_capacity / BATCH_RECORDS` batches, so at most `queue_capacity` events.
pub const BATCH_RECORDS: usize = 1024;

/// Longest an event waits in the ring buffer when too few arrive to wake the reader.
/// Each drain wakes the reader, enrichment and the exporter once, each with caches the
/// workload has since taken: at 10,000 records a second to stdout, a 250 ms poll cost
/// ~13 % less CPU per record than a 100 ms one (docs/hooks.md, "How often the reader
/// drains").
const POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

/// The polls in `period` (at least one): jobs keep to their times whatever the poll.
const fn polls_in(period: std::time::Duration) -> u64 {
    let polls = period.as_nanos() / POLL_INTERVAL.as_nanos();
    if polls == 0 { 1 } else { polls as u64 }
}

/// Polls between two expiries of the DNS names and their de-duplication entries (5 s).
const NAMES_EXPIRE_EVERY: u64 = polls_in(std::time::Duration::from_secs(5));
/// The boot offset's refresh, the UDP flows' sweep and the unanswered DNS queries.
const SECOND_JOBS_EVERY: u64 = polls_in(std::time::Duration::from_secs(1));

/// Every how many polls the kernel's pending attempts are read: a tenth of
/// `pending_report` (a report is at most 10% late, or a poll late where a tenth is
/// shorter than a poll), every poll to once a second. Reading them touches every slot
/// of the map, whether any attempt waits or not.
fn pending_every(pending_report: std::time::Duration) -> u64 {
    let polls = pending_report.as_nanos() / 10 / POLL_INTERVAL.as_nanos();
    polls.clamp(1, PENDING_EVERY_MAX as u128) as u64
}

/// Whether the `count` poll periods from number `first` on hold one whose number is a
/// multiple of `every`: a job due every `every` periods runs once when the reader, late,
/// sees several periods end at once.
fn passes_multiple(first: u64, count: u64, every: u64) -> bool {
    let every = every.max(1);
    count > 0
        && (first.is_multiple_of(every) || first / every != first.saturating_add(count - 1) / every)
}

/// Pushes `record` onto `batch`, making room first when it is full: the last batch's size
/// (`expected`) for the first record, then four times the records held, up to
/// [`BATCH_RECORDS`]. Records are 480 bytes; doubling from Vec's four copied about three
/// times as many of them. Room is made before a push, never after the last one.
fn push_sized(batch: &mut Vec<Record>, expected: usize, record: Record) {
    if batch.len() == batch.capacity() {
        let want = if batch.is_empty() {
            expected.max(1)
        } else {
            (batch.len() * 4).min(BATCH_RECORDS)
        };
        batch.reserve_exact(want.saturating_sub(batch.len()).max(1));
    }
    batch.push(record);
}

/// Polls between two reads of the pending attempts, at most (a second).
const PENDING_EVERY_MAX: u64 = polls_in(std::time::Duration::from_secs(1));
/// An attempt reported as pending whose completion is still unseen this long after it
/// began is forgotten once the kernel no longer holds it (see
/// `outcome::Tracker::forget_stale_pending`): longer than any SYN timeout by default.
const STALE_PENDING_NS: u64 = 600_000_000_000;
/// How long after its attempt began its process's identity is in the ring at most (the
/// identity is sent by the same program run, microseconds after the attempt's time).
const IDENTITY_SENT_WITHIN_NS: u64 = 10_000_000;

pub struct EventReader {
    ring: AsyncFd<EventRing>,
    /// Drains what too few records to wake the reader left in the ring.
    poll: PollTimer,
    clock: BootClock,
    telemetry: ReaderTelemetry,
    aggregates: Option<Aggregates>,
    flows: Option<FlowSweeper>,
    /// The programs' boot offset, refreshed every second (see `probe::boot_offset`).
    boot_offset: Option<BootOffset>,
    /// Whether refreshing it failed since it last succeeded (the first failure is logged).
    boot_offset_failing: bool,
    tracker: Tracker,
    pending: Option<PendingAttempts>,
    outcomes: OutcomeSettings,
    names: Names,
    /// Process identities, which connections are joined with (see [`identities`]).
    identities: Identities,
    /// Whether a record with no known identity was reported (the first is logged).
    identities_unknown_seen: bool,
    /// When the last drain began (boot ns): see [`EventReader::report_pending`].
    drained_at: u64,
    /// Poll periods since the start.
    ticks: u64,
    /// Records in the last batch handed on: the next one is allocated that large at once
    /// (records are large; growing a batch by doubling copies them again).
    last_batch: usize,
    /// The workload of records not enriched yet (see [`Record::captured`]).
    unattributed: std::sync::Arc<Resource>,
}

impl EventReader {
    pub fn new(
        ring: EventRing,
        aggregates: Option<Aggregates>,
        telemetry: ReaderTelemetry,
    ) -> std::io::Result<Self> {
        // SAFETY: the ring owns its map fd and keeps it open, unchanged, for as long
        // as the AsyncFd owns the ring.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(Self {
            ring,
            poll: PollTimer::new(POLL_INTERVAL),
            clock: BootClock::now(),
            telemetry,
            aggregates,
            flows: None,
            boot_offset: None,
            boot_offset_failing: false,
            tracker: Tracker::default(),
            pending: None,
            outcomes: OutcomeSettings::default(),
            names: Names::new(DnsSettings::default()),
            identities: Identities::default(),
            identities_unknown_seen: false,
            drained_at: 0,
            ticks: 0,
            last_batch: 0,
            unattributed: Default::default(),
        })
    }

    /// Reports DNS answers and names connections from them.
    pub fn with_dns(mut self, settings: DnsSettings) -> Self {
        self.names = Names::new(settings);
        self
    }

    /// Reports TCP attempts left in SYN_SENT (the kernel's pending map) and closes.
    pub fn with_outcomes(
        mut self,
        pending: Option<PendingAttempts>,
        outcomes: OutcomeSettings,
    ) -> Self {
        self.pending = pending;
        self.outcomes = outcomes;
        self
    }

    /// Sweeps UDP flows for the bytes sent after their last record (see [`flows`]).
    pub fn with_flow_sweep(mut self, flows: Option<FlowSweeper>) -> Self {
        self.flows = flows;
        self
    }

    /// Keeps the programs' boot offset current (see `probe::boot_offset`).
    pub fn with_boot_offset(mut self, offset: BootOffset) -> Self {
        self.boot_offset = Some(offset);
        self
    }

    /// Reads until `shutdown` turns true, then drains what is left in the ring.
    pub async fn run(
        mut self,
        out: mpsc::Sender<Vec<Record>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        // The programs wake us only when a batch has piled up; the poll drains the rest.
        loop {
            tokio::select! {
                ticked = self.poll.tick() => {
                    // The periods that ended (more than one when this task was late): the
                    // jobs below keep to their times, not to the number of wake-ups.
                    let periods = match ticked {
                        Ok(periods) => periods.max(1),
                        Err(e) => {
                            self.telemetry.emit(ReaderEvent::PollTimerFailed { error: &e });
                            1
                        }
                    };
                    self.drain(&out);
                    self.close_aggregates(false, &out);
                    if passes_multiple(self.ticks, periods, self.pending_every()) {
                        self.report_pending(&out);
                    }
                    let ended = self.ticks.wrapping_add(1);
                    self.ticks = self.ticks.wrapping_add(periods);
                    if passes_multiple(ended, periods, NAMES_EXPIRE_EVERY) {
                        self.names.expire();
                    }
                    if passes_multiple(ended, periods, SECOND_JOBS_EVERY) {
                        self.refresh_boot_offset();
                        self.sweep_flows(false, &out);
                        let unanswered = self.names.unanswered();
                        self.hand_on(unanswered, &out);
                    }
                }
                guard = self.ring.readable_mut() => {
                    match guard {
                        Ok(mut guard) => {
                            guard.clear_ready();
                        }
                        Err(e) => {
                            self.telemetry.emit(ReaderEvent::RingBufferFailed { error: &e });
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
                    self.sweep_flows(true, &out);
                    self.flush_open(&out);
                    let unanswered = self.names.unanswered();
                    self.hand_on(unanswered, &out);
                    // Younger queries cannot be called unanswered yet: counted.
                    self.telemetry.emit(ReaderEvent::DnsQueriesPendingAtShutdown {
                        queries: self.names.pending_queries() as u64,
                    });
                    break;
                }
            }
        }
    }

    /// Hands events on in batches: one wake-up of the next stage per batch, not per event.
    fn drain(&mut self, out: &mpsc::Sender<Vec<Record>>) {
        self.clock.refresh();
        let now = clock::boot_now_ns();
        self.drained_at = now;
        let ring = self.ring.get_mut();
        let mut batch = Vec::new();
        let mut expected = self.last_batch;
        loop {
            let item = ring.next_record();
            let more = item.is_some();
            if let Some(item) = item {
                match decode(&item, &self.clock, &mut self.identities) {
                    Ok(Decoded::Connection(mut connection)) => {
                        let kept = self.names.connection(&mut connection, now, &self.telemetry);
                        if let Some(flows) = &mut self.flows {
                            flows.note(&connection, kept);
                        }
                        if !kept {
                            continue;
                        }
                        if let Some(aggregates) = &mut self.aggregates {
                            aggregates.note(&connection);
                        }
                        self.tracker
                            .note(&mut connection, self.outcomes.closes_used());
                        if connection.logged() || self.outcomes.metrics {
                            push_sized(
                                &mut batch,
                                expected,
                                Record::captured(connection, &self.unattributed),
                            );
                        }
                    }
                    Ok(Decoded::Close(raw)) => {
                        self.names.closed(raw.sock_id, raw.connect_ns);
                        // Nothing takes closes: their connections were not remembered.
                        if !self.outcomes.closes_used() {
                            continue;
                        }
                        if let Some(mut record) = self.tracker.close(&raw, &self.clock) {
                            if !self.outcomes.close_records {
                                record.delivery = Delivery::MetricsOnly;
                            }
                            if record.logged() || self.outcomes.metrics {
                                push_sized(
                                    &mut batch,
                                    expected,
                                    Record::captured(record, &self.unattributed),
                                );
                            }
                        }
                    }
                    Ok(Decoded::Dns(raw)) => {
                        if let Some(record) = self.names.answer(*raw, &self.telemetry)
                            && (record.logged() || self.outcomes.metrics)
                        {
                            push_sized(
                                &mut batch,
                                expected,
                                Record::captured(record, &self.unattributed),
                            );
                        }
                    }
                    Ok(Decoded::Identity) => {}
                    Err(e) => self
                        .telemetry
                        .emit(ReaderEvent::DecodeFailed { reason: e.reason() }),
                }
            }
            if batch.len() >= BATCH_RECORDS || (!more && !batch.is_empty()) {
                expected = batch.len();
                self.last_batch = expected;
                // Records for the metrics only are not records to export.
                let n = batch.iter().filter(|r| r.connection.logged()).count();
                self.telemetry.emit(ReaderEvent::HandedOn { records: n });
                if out.try_send(std::mem::take(&mut batch)).is_err() {
                    self.telemetry.emit(ReaderEvent::QueueFull { records: n });
                }
            }
            if !more {
                break;
            }
        }
        let unknown = self.identities.take_unknown();
        self.count_unknown_identities(unknown);
    }

    /// Reports `records` handed on with no known identity.
    fn count_unknown_identities(&mut self, records: u64) {
        if records > 0 {
            let first = !self.identities_unknown_seen;
            self.identities_unknown_seen = true;
            self.telemetry
                .emit(ReaderEvent::IdentitiesUnknown { records, first });
        }
    }

    fn pending_every(&self) -> u64 {
        pending_every(self.outcomes.pending_report)
    }

    /// Reports attempts in SYN_SENT for longer than `pending_report`, once each.
    fn report_pending(&mut self, out: &mpsc::Sender<Vec<Record>>) {
        let Some(map) = &self.pending else {
            return;
        };
        let now = clock::boot_now_ns();
        let limit = self.outcomes.pending_report.as_nanos() as u64;
        // Only attempts whose identity the last drain read: one sent up to a few
        // microseconds after its attempt began, which began well before that drain (a
        // `--pending-report` near 0 would otherwise take attempts younger than it).
        let started_by = (now.saturating_sub(limit))
            .min(self.drained_at.saturating_sub(IDENTITY_SENT_WITHIN_NS));
        let mut batch = Vec::new();
        let mut still = std::collections::HashSet::new();
        // An attempt is read at every poll until it completes, and reported once: only
        // the reports count an unknown identity.
        let mut unknown = 0;
        for raw in map.started_by(started_by) {
            still.insert((raw.sock_id, raw.boot_time_ns));
            match decode_connect(raw.as_bytes(), &self.clock, &mut self.identities) {
                Ok(mut connection) => {
                    let known = self.identities.take_unknown() == 0;
                    self.names.connection(&mut connection, now, &self.telemetry);
                    let reported = batch.len();
                    batch.extend(self.tracker.pending(connection));
                    if !known && batch.len() > reported {
                        unknown += 1;
                    }
                }
                Err(e) => self
                    .telemetry
                    .emit(ReaderEvent::DecodeFailed { reason: e.reason() }),
            }
        }
        self.count_unknown_identities(unknown);
        self.tracker
            .forget_stale_pending(&still, now.saturating_sub(STALE_PENDING_NS));
        self.hand_on(batch, out);
    }

    /// At shutdown: close records for the connections still open, with what is known
    /// (no close time, no byte counts: the kernel reports those only at CLOSE).
    fn flush_open(&mut self, out: &mpsc::Sender<Vec<Record>>) {
        let unmatched = self.tracker.unmatched_closes;
        if unmatched > 0 {
            self.telemetry
                .emit(ReaderEvent::ClosesUnmatched { closes: unmatched });
        }
        if !self.outcomes.close_records && !self.outcomes.spans {
            return;
        }
        let mut open = self.tracker.drain_open(&self.clock);
        if !self.outcomes.close_records {
            for record in &mut open {
                record.delivery = Delivery::MetricsOnly;
            }
        }
        self.hand_on(open, out);
    }

    fn hand_on(&self, records: Vec<Connection>, out: &mpsc::Sender<Vec<Record>>) {
        let mut records = records.into_iter().peekable();
        while records.peek().is_some() {
            let batch: Vec<Record> = (records.by_ref().take(BATCH_RECORDS))
                .map(|c| Record::captured(c, &self.unattributed))
                .collect();
            let n = batch.iter().filter(|r| r.connection.logged()).count();
            self.telemetry.emit(ReaderEvent::HandedOn { records: n });
            if out.try_send(batch).is_err() {
                self.telemetry.emit(ReaderEvent::QueueFull { records: n });
            }
        }
    }

    /// Writes the programs' boot offset again (see `probe::boot_offset`); a failure is
    /// logged once until a write succeeds.
    fn refresh_boot_offset(&mut self) {
        let Some(offset) = &mut self.boot_offset else {
            return;
        };
        match offset.refresh() {
            Ok(()) => self.boot_offset_failing = false,
            Err(e) => {
                let first = !self.boot_offset_failing;
                self.boot_offset_failing = true;
                self.telemetry
                    .emit(ReaderEvent::BootOffsetFailed { error: &e, first });
            }
        }
    }

    /// Hands on the UDP bytes of flows whose window is long over (every flow with
    /// `all`), as metric-only records; call after a drain, so their last records are known.
    fn sweep_flows(&mut self, all: bool, out: &mpsc::Sender<Vec<Record>>) {
        let Some(flows) = &mut self.flows else {
            return;
        };
        let mut tails = Vec::new();
        let report = flows.sweep(clock::boot_now_ns(), all, &self.clock, &mut tails);
        if report.unattributed > 0 {
            self.telemetry.emit(ReaderEvent::UdpBytesUnattributed {
                bytes: report.unattributed,
            });
        }
        if let Some(error) = &report.error {
            self.telemetry.emit(ReaderEvent::UdpSweepFailed {
                error,
                first: report.first_failure,
            });
        }
        // Without a metrics exporter the sweep only frees the kernel's entries.
        if self.outcomes.metrics {
            self.hand_on(tails, out);
        }
    }

    /// Hands on the records of aggregation windows that have closed; call after a
    /// drain, so the records that opened them have been seen.
    fn close_aggregates(&mut self, all: bool, out: &mpsc::Sender<Vec<Record>>) {
        let Some(aggregates) = &mut self.aggregates else {
            return;
        };
        let mut closing = Vec::new();
        aggregates.close(
            clock::boot_now_ns(),
            all,
            &self.clock,
            &self.telemetry,
            &mut closing,
        );
        for batch in closing.chunks(BATCH_RECORDS) {
            let records = batch.len();
            self.telemetry.emit(ReaderEvent::HandedOn { records });
            let captured = (batch.iter().cloned())
                .map(|c| Record::captured(c, &self.unattributed))
                .collect();
            if out.try_send(captured).is_err() {
                // Each record stands for its repeats: all of them are lost.
                let connections = batch.iter().map(|c| c.count).sum::<u64>();
                self.telemetry.emit(ReaderEvent::QueueFull { records });
                self.telemetry.emit(ReaderEvent::RepeatsLost {
                    repeats: connections.saturating_sub(records as u64),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn pending_attempts_are_read_at_a_tenth_of_their_report_time() {
        assert_eq!(POLL_INTERVAL, Duration::from_millis(250));
        assert_eq!(pending_every(Duration::from_millis(200)), 1);
        assert_eq!(pending_every(Duration::from_secs(1)), 1);
        assert_eq!(pending_every(Duration::from_secs(5)), 2);
        assert_eq!(pending_every(Duration::from_secs(30)), 4);
    }

    /// A batch the size of the last one gets its room once; a larger one grows fourfold
    /// from there, never past [`BATCH_RECORDS`].
    #[test]
    fn a_batch_grows_once_past_the_last_ones_size_and_fourfold_after() {
        use crate::export::otlp::mapping::tests::{record, resource};
        let resource = resource("pod");
        let capacities = |expected: usize, records: usize| {
            let mut batch = Vec::new();
            let mut seen = Vec::new();
            for port in 0..records {
                push_sized(&mut batch, expected, record(&resource, port as u16));
                if seen.last() != Some(&batch.capacity()) {
                    seen.push(batch.capacity());
                }
            }
            seen
        };
        assert_eq!(capacities(100, 100), [100], "the last batch's size, once");
        assert_eq!(capacities(100, 101), [100, 400]);
        assert_eq!(capacities(0, 1), [1]);
        assert_eq!(capacities(1, 3), [1, 4]);
        assert_eq!(
            capacities(3, BATCH_RECORDS),
            [3, 12, 48, 192, 768, BATCH_RECORDS]
        );
        assert_eq!(capacities(BATCH_RECORDS, BATCH_RECORDS), [BATCH_RECORDS]);
    }

    /// The jobs' periods are wall-clock times, not numbers of polls.
    #[test]
    fn the_jobs_keep_their_times_at_this_poll() {
        assert_eq!(polls_in(Duration::ZERO), 1);
        assert_eq!(polls_in(Duration::from_millis(100)), 1);
        assert_eq!(SECOND_JOBS_EVERY, 4);
        assert_eq!(NAMES_EXPIRE_EVERY, 20);
        assert_eq!(PENDING_EVERY_MAX, 4);
    }

    /// Against a reader that wakes once per period: a job runs on the same periods
    /// however they are grouped into wake-ups (once per wake-up at most: a group holding
    /// two multiples runs it once).
    #[test]
    fn a_job_runs_once_per_multiple_however_the_periods_come() {
        let runs_one_by_one: Vec<u64> = (0..40).filter(|t| t % 10 == 0).collect();
        for grouping in [1, 2, 3, 7, 10, 11, 25] {
            let (mut ticks, mut ran, mut due) = (0u64, Vec::new(), Vec::new());
            while ticks < 40 {
                let periods = grouping.min(40 - ticks);
                let first_due = (ticks..ticks + periods).find(|t| t % 10 == 0);
                due.extend(first_due);
                if passes_multiple(ticks, periods, 10) {
                    ran.push(first_due.expect("a multiple in the group"));
                }
                ticks += periods;
            }
            assert_eq!(ran, due, "{grouping} periods a wake-up");
            if grouping <= 10 {
                assert_eq!(ran, runs_one_by_one, "{grouping} periods a wake-up");
            }
        }
        assert!(!passes_multiple(1, 9, 10), "1..=9");
        assert!(passes_multiple(1, 10, 10), "1..=10");
        assert!(passes_multiple(20, 1, 10));
        assert!(!passes_multiple(20, 0, 10), "no period");
        assert!(passes_multiple(5, 1, 0), "every 0 is every period");
    }
}
