//! One JSON object per connection on stdout:
//! `{"time_unix_nano": …, "body": "…", "resource": {…}, "attributes": {…}}`, the body
//! being the same one-line summary as an OTLP log record's.
//!
//! Written from a thread of its own: a slow reader blocks that thread only, never a
//! runtime worker, and a stdout that never drains cannot hold shutdown (the thread is left
//! behind at the deadline). When the reader goes away (`| head`), the stage stops writing:
//! as the only sink it asks the collector to stop; as a copy beside OTLP it just ends.

use std::{
    io::{ErrorKind, Write},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio::sync::{Notify, mpsc, oneshot};

use super::{
    ExportError, Feed, Records, Running, Sink,
    attributes::{Attr, AttrSink, AttributeSet, InlineText, Scratch, visit},
};
use crate::{
    enrich::{Record, Resource},
    telemetry::export::{ExportEvent, ExportTelemetry},
};

/// What stdout is to the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The only sink: its records are counted, and a closed stdout stops the collector.
    Sink,
    /// A copy beside OTLP (which counts the records): a closed stdout ends only the copy.
    Copy,
}

/// Tells the pipeline, once, that stdout's reader went away.
#[derive(Debug, Default)]
pub struct Closed {
    notify: Notify,
    reported: AtomicBool,
}

impl Closed {
    /// Logs and notifies on the first call only.
    pub fn report(&self) {
        if !self.reported.swap(true, Ordering::Relaxed) {
            tracing::info!("stdout was closed by its reader; the collector stops.");
            self.notify.notify_one();
        }
    }

    /// Completes once [`Self::report`] was called.
    pub async fn wait(&self) {
        self.notify.notified().await;
    }
}

/// Whether stdout's reader has gone away, known without writing: the write end of a pipe
/// whose reader exited polls as an error, a hung-up terminal or socket as a hang-up. (A
/// file never does.) Lets a collector with nothing to write notice `| head` too.
pub fn reader_gone() -> bool {
    let mut fd = libc::pollfd {
        fd: libc::STDOUT_FILENO,
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the call's duration; a zero timeout never waits.
    let ready = unsafe { libc::poll(&mut fd, 1, 0) };
    ready > 0 && fd.revents & (libc::POLLERR | libc::POLLHUP) != 0
}

/// stdout as a [`Sink`]: its writer thread is started by [`StdoutSink::start`] (so a
/// failure to start is known at start) and takes its queue when the sink runs.
pub struct StdoutSink {
    role: Role,
    telemetry: ExportTelemetry,
    input: oneshot::Sender<mpsc::Receiver<Records>>,
    finished: oneshot::Receiver<()>,
}

impl StdoutSink {
    /// Starts the writer thread (see [`spawn`]); it waits for its queue.
    pub fn start<W: Write + Send + 'static>(
        exporter: StdoutExporter<W>,
        role: Role,
        telemetry: ExportTelemetry,
        closed: Arc<Closed>,
    ) -> std::io::Result<Self> {
        let (input, queue) = oneshot::channel();
        let finished = spawn_with(exporter, queue, role, telemetry.clone(), closed)?;
        Ok(Self {
            role,
            telemetry,
            input,
            finished,
        })
    }
}

impl Sink for StdoutSink {
    fn name(&self) -> &'static str {
        "stdout"
    }

    fn feed(&self) -> Feed {
        match self.role {
            Role::Sink => Feed::Every,
            Role::Copy => {
                let telemetry = self.telemetry.clone();
                Feed::Copy {
                    skipped: Box::new(move |records| {
                        telemetry.emit(ExportEvent::StdoutCopySkipped { records })
                    }),
                }
            }
        }
    }

    fn run(self: Box<Self>, input: mpsc::Receiver<Records>) -> Running {
        let Self {
            input: to_thread,
            finished,
            ..
        } = *self;
        Box::pin(async move {
            if to_thread.send(input).is_ok() {
                let _ = finished.await;
            }
        })
    }
}

/// Runs `exporter` on its own thread until `input` closes. With [`Role::Sink`], every
/// record is counted exported or failed, and `closed` is reported if the reader of
/// stdout goes away (the records after that are counted failed, never written). The
/// receiver completes when the thread is done.
pub fn spawn<W: Write + Send + 'static>(
    exporter: StdoutExporter<W>,
    input: mpsc::Receiver<Records>,
    role: Role,
    telemetry: ExportTelemetry,
    closed: Arc<Closed>,
) -> std::io::Result<oneshot::Receiver<()>> {
    let (to_thread, queue) = oneshot::channel();
    let finished = spawn_with(exporter, queue, role, telemetry, closed)?;
    let _ = to_thread.send(input);
    Ok(finished)
}

/// [`spawn`], the queue handed over later (never, if `queue`'s sender is dropped).
fn spawn_with<W: Write + Send + 'static>(
    mut exporter: StdoutExporter<W>,
    queue: oneshot::Receiver<mpsc::Receiver<Records>>,
    role: Role,
    telemetry: ExportTelemetry,
    closed: Arc<Closed>,
) -> std::io::Result<oneshot::Receiver<()>> {
    let (done, finished) = oneshot::channel();
    std::thread::Builder::new()
        .name("stdout".into())
        .spawn(move || {
            let Ok(mut input) = queue.blocking_recv() else {
                return;
            };
            let sink = role == Role::Sink;
            let mut open = true;
            // One line per run of failures, not one per batch.
            let mut failing = false;
            while let Some(batch) = input.blocking_recv() {
                // Records for the metrics only have nothing to write here.
                let n = batch.iter().filter(|r| r.connection.logged()).count();
                if !open {
                    telemetry.emit(ExportEvent::WriteFailed { records: n });
                    continue;
                }
                match exporter.export(&batch) {
                    Ok(()) => {
                        if sink {
                            telemetry.emit(ExportEvent::Delivered { records: n });
                        }
                        if failing {
                            telemetry.emit(ExportEvent::StdoutRecovered);
                            failing = false;
                        }
                    }
                    Err(ExportError::Io(e)) if e.kind() == ErrorKind::BrokenPipe => {
                        if !sink {
                            telemetry.emit(ExportEvent::StdoutCopyClosed);
                            return;
                        }
                        telemetry.emit(ExportEvent::WriteFailed { records: n });
                        closed.report();
                        open = false;
                    }
                    Err(e) => {
                        if sink {
                            telemetry.emit(ExportEvent::WriteFailed { records: n });
                        }
                        if !failing {
                            telemetry.emit(ExportEvent::StdoutFailing {
                                error: &e,
                                records: n,
                            });
                            failing = true;
                        }
                    }
                }
            }
            crate::testhook::hang_if("stdout");
            let _ = done.send(());
        })?;
    Ok(finished)
}

pub struct StdoutExporter<W: Write + Send> {
    out: W,
    buffer: Vec<u8>,
    scratch: LineScratch,
    attributes: AttributeSet,
}

/// Buffers reused from line to line: the attributes and body ([`Scratch`]), and the
/// JSON of the last resource written (records come in runs of one workload, whose
/// resource is then escaped and written out once, not once per record).
#[derive(Default)]
pub struct LineScratch {
    attributes: Scratch,
    resource: Option<(Arc<Resource>, Vec<u8>)>,
    /// The attributes' JSON members, each after a comma; written before the body (which
    /// is made from them) and copied after it.
    members: Vec<u8>,
}

/// The members of `resource`'s JSON object, from `cache` when it holds them.
fn resource_json<'c>(
    cache: &'c mut Option<(Arc<Resource>, Vec<u8>)>,
    resource: &Arc<Resource>,
) -> serde_json::Result<&'c [u8]> {
    let cached = matches!(cache, Some((last, _)) if Arc::ptr_eq(last, resource));
    if !cached {
        // Taken out while written: a failure leaves no stale entry behind.
        let mut json = cache.take().map(|(_, json)| json).unwrap_or_default();
        json.clear();
        for (i, (key, value)) in resource.attributes.iter().enumerate() {
            if i > 0 {
                json.push(b',');
            }
            write_key(&mut json, key);
            write_str(&mut json, value)?;
        }
        *cache = Some((Arc::clone(resource), json));
    }
    Ok(cache.as_ref().map_or(&[], |(_, json)| json.as_slice()))
}

impl StdoutExporter<std::io::Stdout> {
    pub fn new() -> Self {
        Self::with_writer(std::io::stdout())
    }
}

impl Default for StdoutExporter<std::io::Stdout> {
    fn default() -> Self {
        Self::new()
    }
}

impl<W: Write + Send> StdoutExporter<W> {
    pub fn with_writer(out: W) -> Self {
        Self {
            out,
            buffer: Vec::new(),
            scratch: LineScratch::default(),
            attributes: AttributeSet::default(),
        }
    }

    /// Records carry the attributes of `set`.
    pub fn with_attributes(mut self, set: AttributeSet) -> Self {
        self.attributes = set;
        self
    }
}

/// Appends one record as a JSON line. Written field by field into a reused buffer: no
/// intermediate `serde_json::Value`, so no map building or per-key allocation per event.
pub fn write_line(out: &mut Vec<u8>, record: &Record, set: AttributeSet) -> serde_json::Result<()> {
    write_line_with(out, &mut LineScratch::default(), record, set)
}

/// [`write_line`] with buffers reused from record to record: nothing allocated per record
/// once they have grown.
pub fn write_line_with(
    out: &mut Vec<u8>,
    scratch: &mut LineScratch,
    record: &Record,
    set: AttributeSet,
) -> serde_json::Result<()> {
    let LineScratch {
        attributes,
        resource,
        members,
    } = scratch;
    members.clear();
    let mut sink = JsonMembers {
        out: members,
        failed: None,
    };
    let shown = visit(record, set, &mut sink);
    if let Some(e) = sink.failed {
        return Err(e);
    }
    attributes.write_body(record, &shown);
    let resource = resource_json(resource, &record.resource)?;
    let mut digits = itoa::Buffer::new();
    out.extend_from_slice(b"{\"time_unix_nano\":");
    out.extend_from_slice(digits.format(record.connection.time_unix_nano).as_bytes());
    out.extend_from_slice(b",\"body\":");
    write_str(out, &attributes.body)?;
    out.extend_from_slice(b",\"resource\":{");
    out.extend_from_slice(resource);
    out.extend_from_slice(b"},\"attributes\":{");
    out.extend_from_slice(members.get(1..).unwrap_or_default());
    out.extend_from_slice(b"}}\n");
    Ok(())
}

/// Writes each attribute as it is collected: `,"key":value`. Inlined at each of
/// [`visit`]'s calls, where key and value's kind are known: the key is copied as a
/// constant and only the value's own writer runs.
struct JsonMembers<'o> {
    out: &'o mut Vec<u8>,
    /// The first failure (serde_json writing a number or array); the line is not written.
    failed: Option<serde_json::Error>,
}

impl<'a> AttrSink<'a> for JsonMembers<'_> {
    #[inline(always)]
    fn attr(&mut self, key: &'static str, value: Attr<'a>) {
        let out = &mut *self.out;
        write_member_key(out, key);
        let written = match value {
            Attr::Str(s) => write_str(out, s),
            Attr::Inline(t) => write_str(out, t.as_str()),
            Attr::Int(n) => {
                out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                Ok(())
            }
            Attr::Bool(b) => {
                out.extend_from_slice(if b { b"true" } else { b"false" });
                Ok(())
            }
            Attr::Double(d) => serde_json::to_writer(&mut *out, &d),
            Attr::StrArray(items) => serde_json::to_writer(&mut *out, items),
            Attr::IpArray(ips) => {
                out.push(b'[');
                for (i, (ip, _)) in ips.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write_plain(out, InlineText::ip(*ip).as_str());
                }
                out.push(b']');
                Ok(())
            }
        };
        if let Err(e) = written {
            self.failed.get_or_insert(e);
        }
    }
}

/// An attribute's key and the colon after it. Keys are the collector's own constants,
/// none with a character JSON escapes (a unit test checks every one).
#[inline(always)]
fn write_key(out: &mut Vec<u8>, key: &str) {
    out.reserve(key.len() + 3);
    out.push(b'"');
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":");
}

/// `,"key":`, the start of an object member after another: one capacity check and the
/// key's copy (a constant's, inlined), where pushing each piece checked the capacity
/// four times. (`egress-bench encode`: the JSON line 328 -> 302 ns.)
#[inline(always)]
fn write_member_key(out: &mut Vec<u8>, key: &str) {
    let key = key.as_bytes();
    out.reserve(key.len() + 4);
    let spare = &mut out.spare_capacity_mut()[..key.len() + 4];
    spare[0].write(b',');
    spare[1].write(b'"');
    spare[2..2 + key.len()].copy_from_slice(as_uninit(key));
    spare[key.len() + 2].write(b'"');
    spare[key.len() + 3].write(b':');
    // SAFETY: the `key.len() + 4` bytes after the length were reserved and written above.
    unsafe { out.set_len(out.len() + key.len() + 4) };
}

/// `bytes` as what a vector's spare capacity is made of, to copy them there.
#[inline(always)]
fn as_uninit(bytes: &[u8]) -> &[std::mem::MaybeUninit<u8>] {
    // SAFETY: `MaybeUninit<u8>` has `u8`'s layout, and initialised bytes are valid ones;
    // the slice is only read.
    unsafe { &*(std::ptr::from_ref(bytes) as *const [std::mem::MaybeUninit<u8>]) }
}

/// Text known to hold nothing JSON escapes (an address), quoted, after one capacity
/// check (`egress-bench encode`: the JSON line 303 -> 287 ns).
fn write_plain(out: &mut Vec<u8>, s: &str) {
    let s = s.as_bytes();
    out.reserve(s.len() + 2);
    let spare = &mut out.spare_capacity_mut()[..s.len() + 2];
    spare[0].write(b'"');
    spare[1..=s.len()].copy_from_slice(as_uninit(s));
    spare[s.len() + 1].write(b'"');
    // SAFETY: the `s.len() + 2` bytes after the length were reserved and written above.
    unsafe { out.set_len(out.len() + s.len() + 2) };
}

/// `s` as a JSON string, byte for byte what serde_json writes: text with nothing to
/// escape (keys always, values nearly always) is copied as it is; the rest goes through
/// serde_json.
fn write_str(out: &mut Vec<u8>, s: &str) -> serde_json::Result<()> {
    if !needs_escape(s.as_bytes()) {
        write_plain(out, s);
        Ok(())
    } else {
        serde_json::to_writer(out, s)
    }
}

/// Whether JSON escapes any byte of `bytes` (a control character, `"` or `\\`), eight
/// bytes at a time: most strings written are short names with nothing to escape.
fn needs_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    // A byte of `word` below `n` (n <= 0x80) sets its high bit in the result.
    let below = |word: u64, n: u8| word.wrapping_sub(ONES * u64::from(n)) & !word & HIGH;
    let zero = |word: u64| below(word, 1);
    let escaped = |word: u64| {
        below(word, 0x20)
            | zero(word ^ (ONES * u64::from(b'"')))
            | zero(word ^ (ONES * u64::from(b'\\')))
    };
    let mut chunks = bytes.chunks_exact(8);
    let mut found = 0;
    for chunk in &mut chunks {
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        found |= escaped(u64::from_ne_bytes(word));
    }
    let rest = chunks.remainder();
    found != 0 || rest.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

impl<W: Write + Send> StdoutExporter<W> {
    /// Writes the batch's records that are logged, then flushes.
    pub fn export(&mut self, batch: &[Record]) -> Result<(), ExportError> {
        self.buffer.clear();
        for record in batch.iter().filter(|r| r.connection.logged()) {
            write_line_with(&mut self.buffer, &mut self.scratch, record, self.attributes)
                .map_err(std::io::Error::from)?;
        }
        self.out.write_all(&self.buffer)?;
        self.out.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::{
        attributes::Value,
        otlp::mapping::tests::{record, resource},
    };

    /// A writer whose reader has gone, as a pipe after `head` exits.
    struct ReaderGone;

    impl Write for ReaderGone {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_closed_stdout_counts_every_later_record_failed_and_notifies_once() {
        let stats = Arc::new(crate::telemetry::Stats::default());
        let closed = Arc::new(Closed::default());
        let (tx, rx) = mpsc::channel(4);
        let done = spawn(
            StdoutExporter::with_writer(ReaderGone),
            rx,
            Role::Sink,
            ExportTelemetry::new(Arc::clone(&stats)),
            Arc::clone(&closed),
        )
        .expect("thread");
        let r = record(&resource("shop"), 443);
        for n in [3, 2] {
            tx.blocking_send(Arc::new(vec![r.clone(); n]))
                .expect("send");
        }
        drop(tx);
        done.blocking_recv().expect("finished");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(1), closed.wait())
                .await
                .expect("notified");
        });
        let kernel_free = stats.snapshot_user();
        assert_eq!((kernel_free.exported, kernel_free.export_failed), (0, 5));
    }

    #[test]
    fn writing_a_record_allocates_nothing_once_the_buffers_have_grown() {
        let mut r = record(&resource("shop"), 443);
        r.cgroup_path = Some("/kubepods/pod/abc".into());
        let (mut out, mut scratch) = (Vec::new(), LineScratch::default());
        // The counter counts: owned attributes allocate.
        let before = crate::alloc_counting::allocations();
        let owned = crate::export::attributes::of(&r);
        assert!(crate::alloc_counting::allocations() > before && !owned.is_empty());
        for set in [
            AttributeSet::Minimal,
            AttributeSet::Default,
            AttributeSet::Full,
        ] {
            write_line_with(&mut out, &mut scratch, &r, set).expect("write");
            out.clear();
            let before = crate::alloc_counting::allocations();
            for _ in 0..100 {
                write_line_with(&mut out, &mut scratch, &r, set).expect("write");
                out.clear();
            }
            assert_eq!(crate::alloc_counting::allocations() - before, 0, "{set:?}");
        }
    }

    #[test]
    fn every_key_is_written_as_serde_json_writes_it() {
        for r in crate::export::otlp::encode::tests::every_kind() {
            let attributes = crate::export::attributes::of(&r);
            let keys = attributes.iter().map(|(key, _)| *key);
            for key in keys.chain(r.resource.attributes.keys().copied()) {
                let mut ours = Vec::new();
                write_key(&mut ours, key);
                let mut expected = serde_json::to_vec(key).expect("serde");
                expected.push(b':');
                assert_eq!(ours, expected, "{key}");
            }
        }
    }

    #[test]
    fn a_byte_to_escape_is_found_wherever_it_is() {
        let escaped = |b: u8| b < 0x20 || b == b'"' || b == b'\\';
        for len in 0..20 {
            for at in 0..len {
                for b in 0..=255u8 {
                    let mut bytes = vec![b'a'; len];
                    bytes[at] = b;
                    assert_eq!(needs_escape(&bytes), escaped(b), "{b:#x} at {at} of {len}");
                }
            }
        }
        assert!(!needs_escape("ünï→\u{7f}".as_bytes()));
    }

    #[test]
    fn strings_are_written_byte_for_byte_as_serde_json_writes_them() {
        let mut hostile: String = (0u8..0x80).map(char::from).collect();
        hostile.push_str("\u{7f}\u{80}é→\u{2028}\u{fffd}\"\\/");
        for s in [
            "",
            "curl",
            "a\"b",
            "back\\slash",
            "tab\there",
            "ünï",
            hostile.as_str(),
        ] {
            let mut ours = Vec::new();
            write_str(&mut ours, s).expect("write");
            assert_eq!(ours, serde_json::to_vec(s).expect("serde"), "{s:?}");
        }
    }

    /// The whole line, every string and number written by serde_json itself, in order.
    #[test]
    fn a_line_is_what_serde_json_makes_of_the_record() {
        let mut r = record(&resource("shop \"q\""), 443);
        r.connection.process.name = "a\"b\n\u{1}c→".into();
        r.cgroup_path = Some("/kubepods/pod/abc".into());
        let json = |v: &dyn erased::Json| v.to_json();
        let every = crate::export::otlp::encode::tests::every_kind();
        let sets = [AttributeSet::Minimal, AttributeSet::Full];
        for (r, set) in (every.iter().chain([&r])).flat_map(|r| sets.map(|set| (r, set))) {
            let mut out = Vec::new();
            write_line(&mut out, r, set).expect("write");
            let (attributes, body) = crate::export::attributes::select(r, set);
            let resource: Vec<String> = (r.resource.attributes.iter())
                .map(|(k, v)| format!("{}:{}", json(k), json(v)))
                .collect();
            let attributes: Vec<String> = attributes
                .iter()
                .map(|(k, v)| {
                    let v = match v {
                        Value::Str(s) => json(s),
                        Value::Int(n) => json(n),
                        Value::Bool(b) => json(b),
                        Value::Double(d) => json(d),
                        Value::StrArray(items) => json(items),
                    };
                    format!("{}:{v}", json(k))
                })
                .collect();
            let expected = format!(
                "{{\"time_unix_nano\":{},\"body\":{},\"resource\":{{{}}},\"attributes\":{{{}}}}}\n",
                r.connection.time_unix_nano,
                json(&body),
                resource.join(","),
                attributes.join(",")
            );
            assert_eq!(String::from_utf8(out).expect("utf-8"), expected, "{set:?}");
        }
    }

    mod erased {
        /// A value serde_json writes, behind a reference of one type.
        pub trait Json {
            fn to_json(&self) -> String;
        }
        impl<T: serde::Serialize> Json for T {
            fn to_json(&self) -> String {
                serde_json::to_string(self).expect("serializable")
            }
        }
    }

    #[test]
    fn a_record_is_one_json_line_with_every_attribute_and_hostile_strings_escaped() {
        let mut r = record(&resource("shop"), 443);
        r.connection.process.name = "a\"b\n\u{1}c".into();
        let mut out = Vec::new();
        write_line(&mut out, &r, AttributeSet::Full).expect("write");
        write_line(&mut out, &r, AttributeSet::Minimal).expect("write");
        let text = String::from_utf8(out).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "one line per record: {text}");
        let json: serde_json::Value = serde_json::from_str(lines[0]).expect("valid JSON");
        assert_eq!(json["time_unix_nano"], 1_700_000_000_000_000_000u64);
        assert_eq!(json["resource"]["k8s.pod.name"], "shop");
        assert_eq!(json["attributes"]["destination.port"], 443);
        assert_eq!(json["attributes"]["egress.network.host"], false);
        assert_eq!(
            json["attributes"]["process.executable.name"],
            "a\"b\n\u{1}c"
        );
        assert_eq!(
            json["attributes"].as_object().expect("object").len(),
            crate::export::attributes::of(&r).len()
        );
        assert_eq!(
            json["body"],
            "shop a\"b\n\u{1}c[42] → 93.184.216.34:443 tcp"
        );
        let minimal: serde_json::Value = serde_json::from_str(lines[1]).expect("valid JSON");
        assert_eq!(
            minimal["body"], json["body"],
            "the body does not depend on the set"
        );
        assert!(minimal["attributes"]["thread.name"].is_null());
        assert_eq!(minimal["attributes"]["destination.port"], 443);
    }
}
