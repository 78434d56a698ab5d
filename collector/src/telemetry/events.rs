//! What the events stage (the ring buffer reader) reports, as typed internal events:
//! records handed on or dropped, records that would not decode, repeats lost, and what
//! DNS capture did. Each event's counter, level and words live here; the reader holds a
//! [`ReaderTelemetry`], which reports these events and nothing else.

use std::{fmt::Display, sync::Arc};

use super::Stats;

/// What happened in the reader.
pub enum ReaderEvent<'a> {
    /// Records handed to enrichment (records for the metrics only are not counted).
    HandedOn { records: usize },
    /// The queue to enrichment was full: these records are lost.
    QueueFull { records: usize },
    /// A record the reader could not decode, by the decoder's static reason.
    DecodeFailed { reason: &'static str },
    /// Repeats counted by an in-kernel aggregate that no record carries (its opening
    /// record, or its closing one, was lost).
    RepeatsLost { repeats: u64 },
    /// The ring buffer cannot be polled: capture stops.
    RingBufferFailed { error: &'a dyn Display },
    /// The poll timer's timerfd could not be made or failed; a tokio interval polls instead.
    PollTimerFailed { error: &'a dyn Display },
    /// Closes of connections opened before this collector started, not reported.
    ClosesUnmatched { closes: u64 },
    /// A DNS message was cut to the capture's size.
    DnsTruncated,
    /// A DNS answer that did not parse, by the parser's static reason.
    DnsAnswerUnparsed { reason: &'static str },
    /// A DNS answer parsed.
    DnsAnswer,
    /// Names the full DNS cache had no room for.
    DnsCacheFull { names: u64 },
    /// A repeat answer in its window: counted in the metrics, not logged again.
    DnsDeduplicated,
    /// A DNS query that did not parse.
    DnsQueryUnparsed,
    /// A DNS query parsed, followed until its answer.
    DnsQuery,
    /// A DNS query not followed: too many wait for their answer.
    DnsQueryNotFollowed,
    /// A lookup's own port-53 flow, folded into its DNS record.
    DnsFlowFolded,
    /// Queries neither answered nor timed out when the collector stopped.
    DnsQueriesPendingAtShutdown { queries: u64 },
    /// UDP bytes a flow sent after its last record that the sweep found but could not
    /// attribute (no record of the flow known in user space).
    UdpBytesUnattributed { bytes: u64 },
    /// Records joined with no known identity of their process (see
    /// `events::identities`); `first` for the first since the collector started, which
    /// is logged.
    IdentitiesUnknown { records: u64, first: bool },
    /// A sweep of the kernel's UDP flows stopped at an error; `first` for the first
    /// failure since the last sweep that succeeded, which is logged.
    UdpSweepFailed { error: &'a dyn Display, first: bool },
    /// The programs' boot offset could not be written (`probe::boot_offset`); `first` for
    /// the first failure, which is logged. Nothing is lost, but after a resume the
    /// handshake times come out short by the time suspended (or from the clock, where
    /// that is longer than the handshake) until a write succeeds.
    BootOffsetFailed { error: &'a dyn Display, first: bool },
}

/// The reader's handle on the collector's counters: it reports [`ReaderEvent`]s.
#[derive(Clone)]
pub struct ReaderTelemetry {
    stats: Arc<Stats>,
}

impl ReaderTelemetry {
    pub fn new(stats: Arc<Stats>) -> Self {
        Self { stats }
    }

    /// Counts `event`, and logs it where an operator should see it.
    pub fn emit(&self, event: ReaderEvent<'_>) {
        let stats = &self.stats;
        match event {
            ReaderEvent::HandedOn { records } => stats.record_captured(records),
            ReaderEvent::QueueFull { records } => stats.record_queue_full(records),
            ReaderEvent::DecodeFailed { reason } => stats.record_decode_failed(reason),
            ReaderEvent::RepeatsLost { repeats } => stats.record_repeats_lost(repeats),
            ReaderEvent::RingBufferFailed { error } => {
                tracing::error!(error = %error, "The ring buffer cannot be polled; capture stops.");
            }
            ReaderEvent::PollTimerFailed { error } => {
                tracing::warn!(error = %error, "The poll timer (a timerfd) failed; the reader polls on the runtime's timer instead.");
            }
            ReaderEvent::ClosesUnmatched { closes } => {
                tracing::info!(
                    closes,
                    "Closes of connections reported before this collector started were not reported."
                );
            }
            ReaderEvent::DnsTruncated => stats.record_dns("truncated", 1),
            ReaderEvent::DnsAnswerUnparsed { reason } => {
                let what = match reason {
                    "malformed" => "unparsed_malformed",
                    "not_response" => "unparsed_not_response",
                    "not_query" => "unparsed_not_query",
                    _ => "unparsed_no_question",
                };
                stats.record_dns(what, 1);
            }
            ReaderEvent::DnsAnswer => stats.record_dns("answers", 1),
            ReaderEvent::DnsCacheFull { names } => stats.record_dns("cache_full", names),
            ReaderEvent::DnsDeduplicated => stats.record_dns("deduplicated", 1),
            ReaderEvent::DnsQueryUnparsed => stats.record_dns("unparsed_query", 1),
            ReaderEvent::DnsQuery => stats.record_dns("queries", 1),
            ReaderEvent::DnsQueryNotFollowed => stats.record_dns("queries_not_followed", 1),
            ReaderEvent::DnsFlowFolded => stats.record_dns("folded_flows", 1),
            ReaderEvent::DnsQueriesPendingAtShutdown { queries } => {
                stats.record_dns("queries_pending_at_shutdown", queries);
            }
            ReaderEvent::UdpBytesUnattributed { bytes } => {
                stats.record_udp_bytes_unattributed(bytes)
            }
            ReaderEvent::IdentitiesUnknown { records, first } => {
                stats.record_identities_unknown(records);
                if first {
                    tracing::warn!(
                        records,
                        "Records went out without their process's identity (names, namespaces, cgroup): its identity record was lost (the ring buffer was full) or forgotten; counted in egress_collector.events.identities_unknown."
                    );
                }
            }
            ReaderEvent::UdpSweepFailed { error, first } => {
                stats.record_udp_sweep_failed();
                if first {
                    tracing::error!(error = %error, "UDP flows cannot be swept: bytes sent after a flow's last record are not counted until this recovers.");
                }
            }
            ReaderEvent::BootOffsetFailed { error, first } => {
                if first {
                    tracing::warn!(error = %error, "The programs' boot offset cannot be refreshed: after a suspend and resume, handshake times are short by the time suspended until it can.");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_event_moves_its_own_counter_and_no_other() {
        let stats = Arc::new(Stats::default());
        let reader = ReaderTelemetry::new(Arc::clone(&stats));
        reader.emit(ReaderEvent::HandedOn { records: 7 });
        reader.emit(ReaderEvent::QueueFull { records: 3 });
        reader.emit(ReaderEvent::DecodeFailed { reason: "short" });
        reader.emit(ReaderEvent::DecodeFailed { reason: "short" });
        reader.emit(ReaderEvent::RepeatsLost { repeats: 5 });
        reader.emit(ReaderEvent::ClosesUnmatched { closes: 4 });
        reader.emit(ReaderEvent::RingBufferFailed { error: &"gone" });
        reader.emit(ReaderEvent::UdpBytesUnattributed { bytes: 9 });
        for first in [true, false] {
            reader.emit(ReaderEvent::UdpSweepFailed {
                error: &"EPERM",
                first,
            });
        }
        let s = stats.snapshot_user();
        assert_eq!((s.captured, s.queue_full, s.repeats_lost), (7, 3, 5));
        assert_eq!((s.udp_bytes_unattributed, s.udp_sweeps_failed), (9, 2));
        assert_eq!(s.decode_failed.get("short"), Some(&2));
        assert!(s.dns.is_empty(), "no DNS event was reported");
        assert_eq!(
            (s.exported, s.filtered, s.dropped() - s.queue_full),
            (0, 0, 0),
            "the reader counts nothing of another stage"
        );
        assert!(s.enrichment_events.is_empty() && s.enrichment_failed.is_empty());
    }

    #[test]
    fn dns_events_count_under_their_names_and_an_empty_count_adds_no_name() {
        let stats = Arc::new(Stats::default());
        let reader = ReaderTelemetry::new(Arc::clone(&stats));
        for event in [
            ReaderEvent::DnsTruncated,
            ReaderEvent::DnsAnswer,
            ReaderEvent::DnsAnswer,
            ReaderEvent::DnsDeduplicated,
            ReaderEvent::DnsQueryUnparsed,
            ReaderEvent::DnsQuery,
            ReaderEvent::DnsQueryNotFollowed,
            ReaderEvent::DnsFlowFolded,
            ReaderEvent::DnsCacheFull { names: 3 },
            ReaderEvent::DnsQueriesPendingAtShutdown { queries: 0 },
        ] {
            reader.emit(event);
        }
        for reason in ["malformed", "not_response", "not_query", "no_question"] {
            reader.emit(ReaderEvent::DnsAnswerUnparsed { reason });
        }
        let s = stats.snapshot_user();
        let expected: Vec<(&str, u64)> = vec![
            ("answers", 2),
            ("cache_full", 3),
            ("deduplicated", 1),
            ("folded_flows", 1),
            ("queries", 1),
            ("queries_not_followed", 1),
            ("truncated", 1),
            ("unparsed_malformed", 1),
            ("unparsed_no_question", 1),
            ("unparsed_not_query", 1),
            ("unparsed_not_response", 1),
            ("unparsed_query", 1),
        ];
        assert_eq!(s.dns.clone().into_iter().collect::<Vec<_>>(), expected);
        assert_eq!(s.captured + s.queue_full + s.repeats_lost, 0);
    }
}
