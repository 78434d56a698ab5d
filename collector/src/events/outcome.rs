//! How TCP connections went: the outcome of each attempt (`error.type`), the close of
//! each established connection in payload bytes and seconds, and the bookkeeping that
//! joins a close to its connection and reports attempts still pending.

use std::collections::{HashMap, HashSet};

use crate::fast_hash::FastHash;

use egress_shared::{CloseFlags, ResetBy, TcpCloseEvent};

use super::{
    clock::BootClock,
    decode::{Connection, Delivery},
};

/// `egress.connection.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    Established,
    Failed,
    /// Still in SYN_SENT after `--pending-report`.
    Pending,
    /// Its completion was never seen (`ConnState::Unseen`: the kernel skipped that
    /// program run, or a simultaneous open lost its mark): made, but how it went is not
    /// known.
    Unknown,
}

impl ConnectionState {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionState::Established => "established",
            ConnectionState::Failed => "failed",
            ConnectionState::Pending => "pending",
            ConnectionState::Unknown => "unknown",
        }
    }

    /// Whether the attempt's completion was seen: its handshake time and SYN
    /// retransmits are known.
    pub fn completion_seen(self) -> bool {
        matches!(self, ConnectionState::Established | ConnectionState::Failed)
    }
}

/// How a TCP attempt went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub state: ConnectionState,
    /// `error.type` on failure (absent on success, as the conventions say).
    pub error_type: Option<&'static str>,
    /// SYN_SENT to the attempt's completion.
    pub handshake_ns: u64,
    pub syn_retransmits: u32,
    /// The socket's kernel address and the attempt's start: the connection's name.
    pub sock_id: u64,
    pub connect_boot_ns: u64,
}

// errno values (asm-generic/errno.h; the same on every Linux architecture the
// collector builds for).
const EPERM: u32 = 1;
const EACCES: u32 = 13;
const EPIPE: u32 = 32;
const ENONET: u32 = 64;
const EPROTO: u32 = 71;
const ENETUNREACH: u32 = 101;
const ECONNRESET: u32 = 104;
const ETIMEDOUT: u32 = 110;
const ECONNREFUSED: u32 = 111;
const EHOSTDOWN: u32 = 112;
const EHOSTUNREACH: u32 = 113;

/// `error.type` of an attempt that went SYN_SENT -> CLOSE, from `sk->sk_err`.
///
/// ECONNREFUSED is a RST or an ICMP port unreachable; ETIMEDOUT the kernel's SYN
/// retries ran out; the ICMP-derived errors (net/host unreachable, host down, no
/// network, protocol error, administratively prohibited) are `unreachable`. No error with
/// a source port: the application closed it first (`aborted`); without one: it failed
/// locally after SYN_SENT (port exhaustion and the like).
pub fn error_type(sk_err: u32, source_port: u16) -> &'static str {
    match sk_err {
        0 if source_port != 0 => "aborted",
        0 => "local_failure",
        ECONNREFUSED => "refused",
        ETIMEDOUT => "timed_out",
        ENETUNREACH | EHOSTUNREACH | EHOSTDOWN | ENONET | EPROTO | EACCES | EPERM => "unreachable",
        // EPIPE: a reset in CLOSE_WAIT (a close, never an attempt).
        ECONNRESET | EPIPE => "reset",
        _ => "_OTHER",
    }
}

// TCP states (include/net/tcp_states.h).
const TCP_ESTABLISHED: u8 = 1;
const TCP_FIN_WAIT1: u8 = 4;
const TCP_FIN_WAIT2: u8 = 5;
const TCP_CLOSE_WAIT: u8 = 8;
const TCP_LAST_ACK: u8 = 9;
const TCP_CLOSING: u8 = 11;

/// The life of an established connection, in payload bytes and real units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Close {
    pub connect_unix_nano: u64,
    pub established_unix_nano: u64,
    pub close_unix_nano: u64,
    /// Payload the peer acknowledged (`bytes_acked` less the SYN, and the FIN once
    /// acknowledged).
    pub bytes_sent: u64,
    /// Payload received (`bytes_received` less the peer's FIN once it arrived).
    pub bytes_received: u64,
    /// Bytes put on the wire, retransmissions included (`bytes_sent`, 4.19+).
    pub bytes_transmitted: Option<u64>,
    pub retransmits: u32,
    /// Smoothed RTT in microseconds (`srtt_us` / 8).
    pub rtt_us: u32,
    pub reset: Option<&'static str>,
    /// `error.type` when the connection ended on an error (reset, timeout).
    pub error_type: Option<&'static str>,
    /// Still open when the collector stopped: `close_unix_nano` is the stop, and the
    /// kernel's counters are unknown (zero).
    pub still_open: bool,
}

impl Close {
    pub fn from_raw(raw: &TcpCloseEvent, clock: &BootClock) -> Self {
        // Our FIN counts in bytes_acked once acknowledged: the socket then leaves
        // FIN_WAIT2 (for TIME_WAIT or its timeout), CLOSING or LAST_ACK without error.
        let fin_acked = matches!(raw.old_state, TCP_FIN_WAIT2 | TCP_CLOSING | TCP_LAST_ACK)
            && raw.sk_err == 0
            && raw.reset == ResetBy::NONE;
        let fin_received = raw.flags & CloseFlags::FIN_RECEIVED != 0;
        let reset = match raw.reset {
            ResetBy::NONE if reset_by_peer(raw) => ResetBy::PEER,
            ResetBy::NONE if local_reset_follows(raw) => ResetBy::LOCAL,
            by => by,
        };
        Self {
            connect_unix_nano: clock.to_unix_nanos(raw.connect_ns),
            established_unix_nano: clock.to_unix_nanos(raw.established_ns),
            close_unix_nano: clock.to_unix_nanos(raw.close_ns),
            // The SYN is acknowledged by the SYN-ACK: always one.
            bytes_sent: raw
                .bytes_acked
                .saturating_sub(1)
                .saturating_sub(u64::from(fin_acked)),
            bytes_received: raw.bytes_received.saturating_sub(u64::from(fin_received)),
            bytes_transmitted: (raw.flags & CloseFlags::BYTES_SENT_KNOWN != 0)
                .then_some(raw.bytes_sent),
            retransmits: raw.total_retrans,
            rtt_us: raw.srtt_us_x8 >> 3,
            reset: match reset {
                ResetBy::PEER => Some("peer"),
                ResetBy::LOCAL => Some("local"),
                _ => None,
            },
            error_type: match (raw.sk_err, reset) {
                (0, ResetBy::NONE) => None,
                (0, _) => Some("reset"),
                (err, _) => Some(error_type(err, 1)),
            },
            still_open: false,
        }
    }

    pub fn duration_ns(&self) -> u64 {
        self.close_unix_nano
            .saturating_sub(self.established_unix_nano)
    }
}

/// Whether a RST received ended the connection: the kernel's `tcp_reset()` sets the
/// socket's error (ECONNRESET; EPIPE when it leaves CLOSE_WAIT) and then moves it to
/// CLOSE. No other way to CLOSE leaves ECONNRESET there (a timeout leaves ETIMEDOUT or
/// an ICMP error, `tcp_abort` ECONNABORTED; this host's abortive close sets ECONNRESET
/// only after CLOSE). EPIPE is taken only from CLOSE_WAIT: a sockmap's failed send can
/// leave it on a socket that then closes in order. What this misses: an application
/// that reads the error (`SO_ERROR`) in the instant between the RST's error and the
/// CLOSE; its close is then reported as this host's (`local_reset_follows`) or orderly.
/// The kernel's own resets also go through `tcp_reset()` (data arriving after close()
/// or `shutdown(SHUT_RDWR)`): reported `peer`, as documented.
fn reset_by_peer(raw: &TcpCloseEvent) -> bool {
    matches!(
        (raw.sk_err, raw.old_state),
        (ECONNRESET, _) | (EPIPE, TCP_CLOSE_WAIT)
    )
}

/// Whether this host resets the connection just after the CLOSE the event reports.
///
/// A close that aborts (close() with unread data, `SO_LINGER` 0, connect(AF_UNSPEC))
/// sets CLOSE first and sends its RST after (`__tcp_close`, `tcp_disconnect`), so the
/// close is reported before `tcp:tcp_send_reset` runs. Such a close leaves ESTABLISHED,
/// CLOSE_WAIT or FIN_WAIT1 with no error and no reset seen, and nothing else does: the
/// peer's RST leaves its error first, timeouts set an error, an orderly close
/// goes through FIN_WAIT2, CLOSING or LAST_ACK, and the aborts that send their RST first
/// (`tcp_abort`, the FIN_WAIT2 timeout) were marked by the reset tracepoint already.
fn local_reset_follows(raw: &TcpCloseEvent) -> bool {
    raw.sk_err == 0
        && matches!(
            raw.old_state,
            TCP_ESTABLISHED | TCP_CLOSE_WAIT | TCP_FIN_WAIT1
        )
}

/// Established connections kept for their close, at most (the kernel tracks 65536).
const MAX_OPEN: usize = 65_536;
/// Pending attempts remembered as reported, at most (the kernel holds 8192).
const MAX_REPORTED: usize = 16_384;

/// Joins closes to their connections and remembers the attempts reported as pending.
#[derive(Default)]
pub struct Tracker {
    /// Kernel socket ids and times, one lookup per record: hashed by [`FastHash`].
    open: HashMap<(u64, u64), Connection, FastHash>,
    /// Asked for every TCP record (nearly always empty): hashed by [`FastHash`] too.
    reported_pending: HashSet<(u64, u64), FastHash>,
    /// Of those, the old ones the latest scan of the kernel's pending attempts missed.
    missed_by_last_scan: HashSet<(u64, u64), FastHash>,
    /// Closes whose connection was not known (reported before a restart, or dropped).
    pub unmatched_closes: u64,
    /// Connections forgotten because `open` was full.
    pub evicted: u64,
}

impl Tracker {
    /// A completed attempt: remembered for its close when established and `closes` are
    /// used (close records, the metrics); marked for the metrics only when it was
    /// already reported as pending.
    pub fn note(&mut self, connection: &mut Connection, closes: bool) {
        let Some(outcome) = connection.outcome else {
            return;
        };
        let key = (outcome.sock_id, outcome.connect_boot_ns);
        if !self.reported_pending.is_empty() && self.reported_pending.remove(&key) {
            connection.delivery = Delivery::MetricsOnly;
        }
        if closes && outcome.state == ConnectionState::Established {
            if self.open.len() >= MAX_OPEN {
                self.evicted += 1;
            } else {
                self.open.insert(key, connection.clone());
            }
        }
    }

    /// A close: the connection's record, become a `tcp_close` record.
    pub fn close(&mut self, raw: &TcpCloseEvent, clock: &BootClock) -> Option<Connection> {
        let Some(mut record) = self.open.remove(&(raw.sock_id, raw.connect_ns)) else {
            self.unmatched_closes += 1;
            return None;
        };
        let close = Close::from_raw(raw, clock);
        record.kind = egress_shared::EventKind::TcpClose;
        record.time_unix_nano = close.close_unix_nano;
        record.close = Some(Box::new(close));
        record.delivery = Delivery::Both;
        record.aggregate = None;
        record.rate_limited_before = 0;
        Some(record)
    }

    /// An attempt read from the kernel's pending map: reported once, as pending.
    pub fn pending(&mut self, mut connection: Connection) -> Option<Connection> {
        let outcome = connection.outcome?;
        let key = (outcome.sock_id, outcome.connect_boot_ns);
        if self.reported_pending.contains(&key) || self.reported_pending.len() >= MAX_REPORTED {
            return None;
        }
        self.reported_pending.insert(key);
        connection.delivery = Delivery::LogOnly;
        Some(connection)
    }

    /// Forgets the attempts reported as pending that the kernel no longer holds (`still`:
    /// the keys of the latest scan) and that began before `started_before` (boot ns): an
    /// attempt whose record never came (an eviction). Without this they would fill the
    /// set and end pending reports for good. Only old ones, and only once two scans in a
    /// row missed them: a record the kernel released just before a scan (a completion,
    /// or an unseen one reported when its address was reused, however old) is still on
    /// its way to the reader then, and the drain before the next scan takes it (and the
    /// key with it).
    pub fn forget_stale_pending(&mut self, still: &HashSet<(u64, u64)>, started_before: u64) {
        let missed_before = std::mem::take(&mut self.missed_by_last_scan);
        let missed_now = &mut self.missed_by_last_scan;
        self.reported_pending.retain(|key| {
            if still.contains(key) || key.1 >= started_before {
                return true;
            }
            if missed_before.contains(key) {
                return false;
            }
            missed_now.insert(*key);
            true
        });
    }

    /// Connections still open (the flush at shutdown): what is known of them.
    pub fn drain_open(&mut self, clock: &BootClock) -> Vec<Connection> {
        let now = clock.to_unix_nanos(super::clock::boot_now_ns());
        self.open
            .drain()
            .map(|(_, mut record)| {
                let handshake = record.outcome.map_or(0, |o| o.handshake_ns);
                record.close = Some(Box::new(Close {
                    connect_unix_nano: record.time_unix_nano,
                    established_unix_nano: record.time_unix_nano + handshake,
                    close_unix_nano: now,
                    bytes_sent: 0,
                    bytes_received: 0,
                    bytes_transmitted: None,
                    retransmits: 0,
                    rtt_us: 0,
                    reset: None,
                    error_type: None,
                    still_open: true,
                }));
                record.kind = egress_shared::EventKind::TcpClose;
                record.time_unix_nano = now;
                record.delivery = Delivery::Both;
                record
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_error_types() {
        assert_eq!(error_type(ECONNREFUSED, 4000), "refused");
        assert_eq!(error_type(ETIMEDOUT, 4000), "timed_out");
        assert_eq!(error_type(EHOSTUNREACH, 4000), "unreachable");
        assert_eq!(error_type(ENETUNREACH, 4000), "unreachable");
        assert_eq!(error_type(0, 4000), "aborted");
        assert_eq!(error_type(0, 0), "local_failure");
        assert_eq!(error_type(999, 4000), "_OTHER");
    }

    fn close_event(old_state: u8) -> TcpCloseEvent {
        let mut raw = TcpCloseEvent::zeroed();
        raw.old_state = old_state;
        raw.bytes_acked = 1_048_576 + 2;
        raw.bytes_received = 262_144 + 1;
        raw.flags = CloseFlags::FIN_RECEIVED;
        raw.srtt_us_x8 = 800;
        raw.established_ns = 1_000;
        raw.close_ns = 3_000;
        raw
    }

    #[test]
    fn sequence_space_becomes_payload() {
        let clock = BootClock::with_offset(0);
        let close = Close::from_raw(&close_event(TCP_FIN_WAIT2), &clock);
        assert_eq!(close.bytes_sent, 1_048_576);
        assert_eq!(close.bytes_received, 262_144);
        assert_eq!(close.rtt_us, 100);
        assert_eq!(close.duration_ns(), 2_000);
        assert_eq!(close.error_type, None);
        // Reset by the peer while established (known by the error `tcp_reset()` left, no
        // program marks it): our FIN never went out, so it is not in bytes_acked.
        let mut raw = close_event(TCP_ESTABLISHED);
        raw.bytes_acked -= 1;
        raw.sk_err = ECONNRESET;
        let close = Close::from_raw(&raw, &clock);
        assert_eq!(close.bytes_sent, 1_048_576);
        assert_eq!(close.reset, Some("peer"));
        assert_eq!(close.error_type, Some("reset"));
        // Reset by the peer after its FIN (CLOSE_WAIT): EPIPE.
        let mut raw = close_event(TCP_CLOSE_WAIT);
        raw.sk_err = EPIPE;
        let close = Close::from_raw(&raw, &clock);
        assert_eq!(
            (close.reset, close.error_type),
            (Some("peer"), Some("reset"))
        );
        // EPIPE elsewhere is no reset (a sockmap's failed send leaves it).
        let mut raw = close_event(TCP_FIN_WAIT2);
        raw.sk_err = EPIPE;
        assert_eq!(Close::from_raw(&raw, &clock).reset, None);
        // A timeout is no reset; and the send hook's mark (a RST this host sent before
        // CLOSE) wins over the error, whatever it is.
        let mut raw = close_event(TCP_ESTABLISHED);
        raw.sk_err = ETIMEDOUT;
        let close = Close::from_raw(&raw, &clock);
        assert_eq!((close.reset, close.error_type), (None, Some("timed_out")));
        raw.reset = ResetBy::LOCAL;
        raw.sk_err = ECONNRESET;
        assert_eq!(Close::from_raw(&raw, &clock).reset, Some("local"));
        // An abortive close (unread data, SO_LINGER 0): CLOSE from ESTABLISHED with no
        // error, the RST sent after.
        let mut raw = close_event(TCP_ESTABLISHED);
        raw.flags = 0;
        let close = Close::from_raw(&raw, &clock);
        assert_eq!(close.reset, Some("local"));
        assert_eq!(close.error_type, Some("reset"));
        // An orderly close from FIN_WAIT2 is no reset.
        let close = Close::from_raw(&close_event(TCP_FIN_WAIT2), &clock);
        assert_eq!((close.reset, close.error_type), (None, None));
    }

    #[test]
    fn stale_pending_keys_are_forgotten_and_recent_or_held_ones_kept() {
        let mut tracker = Tracker::default();
        let stale = (1, 10);
        let held = (2, 20);
        let recent = (3, 1_000);
        tracker.reported_pending.extend([stale, held, recent]);
        // Missed once: its record may still be on its way.
        tracker.forget_stale_pending(&HashSet::from([held]), 500);
        assert_eq!(tracker.reported_pending.len(), 3);
        // Missed twice: forgotten.
        tracker.forget_stale_pending(&HashSet::from([held]), 500);
        assert_eq!(
            tracker.reported_pending,
            HashSet::<_, FastHash>::from_iter([held, recent])
        );
    }
}
