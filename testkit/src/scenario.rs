//! The capture scenario: run the collector, make known connections, check the output.

use std::{path::PathBuf, time::Duration};

use serde_json::Value;

use crate::{
    collector::RunningCollector,
    records::attr,
    traffic::{self, Expected},
};

pub const TRAFFIC_THREAD: &str = "egress-traffic";
/// Threads of the concurrent phase ([`Options::concurrent`]).
pub const STORM_THREAD: &str = "egress-storm";

#[derive(Debug, Clone)]
pub struct Options {
    pub collector: PathBuf,
    /// `--probe` value.
    pub probe: String,
    /// Connections of each kind.
    pub n: usize,
    pub extra_args: Vec<String>,
    pub ready_timeout: Duration,
    /// After the known connections: this many threads at once, each making `per_thread`
    /// TCP attempts, so programs run concurrently and, on preemptible kernels, interleave
    /// on a CPU. 0: no concurrent phase.
    pub concurrent: usize,
    pub per_thread: usize,
}

#[derive(Debug)]
pub struct Outcome {
    /// Hook family the collector reported running in.
    pub mode: String,
    /// The program it said follows the TCP state changes (`tcp_state=` on its start-up
    /// line: `tp_btf`, `raw_tracepoint` or `tracepoint`).
    pub tcp_state: String,
    /// The clock it said its rate limit goes by (`decision_clock=` on that line:
    /// `jiffies@<HZ>Hz` or `boottime`).
    pub decision_clock: String,
    pub expected: usize,
    pub records: Vec<Value>,
    pub storm: Option<Storm>,
    /// The collector's warnings, as logged.
    pub warnings: Vec<String>,
}

/// The books of the concurrent phase.
#[derive(Debug, Clone, Copy)]
pub struct Storm {
    pub made: u64,
    pub reported: u64,
    /// Events the collector counted as lost (the whole run).
    pub lost: u64,
    /// Program runs the kernel skipped (recursion misses, the whole run).
    pub possibly_lost: u64,
}

impl Storm {
    /// reported + counted = made, where a recursion miss may or may not have been a lost
    /// connection: reported + lost <= made <= reported + lost + possibly_lost.
    fn problem(&self) -> Option<String> {
        let Storm {
            made,
            reported,
            lost,
            possibly_lost,
        } = *self;
        (reported + lost > made || made > reported + lost + possibly_lost).then(|| {
            format!(
                "concurrent phase: {made} attempts, {reported} reported, {lost} counted lost, \
                 {possibly_lost} possibly lost (recursion misses): want reported + lost <= made \
                 <= reported + lost + possibly lost"
            )
        })
    }
}

/// `name=<n>` on the collector's last "Stopped." line.
fn stopped_stat(stderr: &[String], name: &str) -> Option<u64> {
    let line = stderr.iter().rev().find(|l| l.contains("Stopped."))?;
    crate::collector::stat_in(line, name)
}

/// `threads` threads at once, each making `per_thread` attempts to a closed port (refused:
/// one attempt each, nothing to accept). Returns the port and the attempts made.
fn storm(threads: usize, per_thread: usize) -> Result<(u16, u64), String> {
    let closed =
        std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, crate::ports::unused_port()));
    let start = std::sync::Arc::new(std::sync::Barrier::new(threads));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let start = std::sync::Arc::clone(&start);
            std::thread::Builder::new()
                .name(STORM_THREAD.into())
                .spawn(move || -> Result<u64, String> {
                    start.wait();
                    for _ in 0..per_thread {
                        match std::net::TcpStream::connect(closed) {
                            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                            other => return Err(format!("connect to a closed port: {other:?}")),
                        }
                    }
                    Ok(per_thread as u64)
                })
                .map_err(|e| format!("cannot start a storm thread: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let mut made = 0;
    for worker in workers {
        made += worker
            .join()
            .map_err(|_| "a storm thread panicked".to_owned())??;
    }
    Ok((closed.port(), made))
}

fn matches(record: &Value, e: &Expected) -> bool {
    let source_port = attr(record, "source.port").as_u64().unwrap_or(0);
    attr(record, "egress.event") == e.event
        && attr(record, "destination.address") == e.destination.ip().to_string().as_str()
        && attr(record, "destination.port") == e.destination.port()
        && match e.source_port {
            Some(port) => source_port == u64::from(port),
            None => source_port != 0,
        }
}

/// Problems with one expected connection's record (empty when it is right).
fn check_record(record: &Value, e: &Expected, me: &Me) -> Vec<String> {
    let mut problems = Vec::new();
    let mut want = |key: &str, value: Value| {
        if attr(record, key) != &value {
            problems.push(format!(
                "{}: {key} is {}, want {value}",
                e.what,
                attr(record, key)
            ));
        }
    };
    want("process.pid", me.pid.into());
    want("process.parent_pid", me.parent_pid.into());
    want("process.user.id", me.uid.into());
    want("process.executable.name", me.comm.clone().into());
    want("thread.name", TRAFFIC_THREAD.into());
    want("network.transport", e.transport.into());
    want("network.type", e.network_type.into());
    if let Some(bytes) = e.udp_bytes {
        want("egress.udp.bytes.sent", bytes.into());
    }
    if let Some(ip) = e.source_ip {
        want("source.address", ip.to_string().into());
    }
    // How the attempt went, from the socket's state changes (every hook family).
    if let Some((state, error)) = e.outcome {
        want("egress.connection.state", state.into());
        want("error.type", error.map_or(Value::Null, Value::from));
    }
    if record["time_unix_nano"]
        .as_u64()
        .is_none_or(|t| t < me.started_unix_nano)
    {
        problems.push(format!(
            "{}: time_unix_nano {} is before the test began",
            e.what, record["time_unix_nano"]
        ));
    }
    for ns in ["net", "uts", "mnt", "pid", "ipc", "cgroup"] {
        let key = format!("egress.namespace.{ns}");
        let want_inum = me.namespaces.get(ns).copied();
        if attr(record, &key).as_u64() != want_inum {
            problems.push(format!(
                "{}: {key} is {}, want {want_inum:?}",
                e.what,
                attr(record, &key)
            ));
        }
    }
    if attr(record, "egress.uts.nodename") != me.nodename.as_str() {
        problems.push(format!(
            "{}: egress.uts.nodename is {}, want {}",
            e.what,
            attr(record, "egress.uts.nodename"),
            me.nodename
        ));
    }
    problems
}

/// Facts about this process, to compare records with.
struct Me {
    pid: u32,
    parent_pid: u32,
    uid: u32,
    comm: String,
    nodename: String,
    namespaces: std::collections::HashMap<&'static str, u64>,
    started_unix_nano: u64,
}

impl Me {
    fn read() -> Self {
        let comm = std::fs::read_to_string("/proc/self/comm")
            .unwrap_or_default()
            .trim()
            .to_owned();
        let nodename = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap_or_default()
            .trim()
            .to_owned();
        let mut namespaces = std::collections::HashMap::new();
        for ns in ["net", "uts", "mnt", "pid", "ipc", "cgroup"] {
            use std::os::unix::fs::MetadataExt;
            if let Ok(meta) = std::fs::metadata(format!("/proc/self/ns/{ns}")) {
                namespaces.insert(ns, meta.ino());
            }
        }
        let started_unix_nano = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        // SAFETY: trivial libc getters.
        let (parent_pid, uid) = unsafe { (libc::getppid() as u32, libc::getuid()) };
        Self {
            pid: std::process::id(),
            parent_pid,
            uid,
            comm,
            nodename,
            namespaces,
            started_unix_nano,
        }
    }
}

/// Runs the scenario; `Err` lists every problem found.
pub fn run(options: &Options) -> Result<Outcome, String> {
    let me = Me::read();
    // Every attribute: the checks below read namespaces, thread name and nodename.
    let mut args: Vec<&str> = vec![
        "--probe",
        &options.probe,
        "--stats-interval",
        "1h",
        "--attributes",
        "full",
        // Stopping under qemu's emulation took longer than the 10 s default once (6.12-rt,
        // kprobe mode, no record left to drain: the teardown, not the drain). The deadline
        // itself is tested in tests/shutdown.rs; here it must not fail a capture check.
        "--shutdown-deadline",
        "60s",
    ];
    args.extend(options.extra_args.iter().map(String::as_str));
    let collector = RunningCollector::start(&options.collector, &args, options.ready_timeout)?;
    let field = |key: &str| start_line_field(collector.stderr(), key);
    let (mode, tcp_state, decision_clock) =
        (field("mode"), field("tcp_state"), field("decision_clock"));

    let n = options.n;
    let traffic = std::thread::Builder::new()
        .name(TRAFFIC_THREAD.into())
        .spawn(move || traffic::generate(n))
        .map_err(|e| format!("cannot start the traffic thread: {e}"))?
        .join()
        .map_err(|_| "the traffic thread panicked".to_owned())?;
    let storm_run = (options.concurrent > 0).then(|| storm(options.concurrent, options.per_thread));
    // Give the reader a moment; shutdown drains the ring buffer anyway.
    std::thread::sleep(Duration::from_millis(300));
    let (clean_exit, stdout, stderr) = collector.stop(Duration::from_secs(30))?;
    let expected = traffic.map_err(|e| format!("making the test connections failed: {e}"))?;

    let mut problems = Vec::new();
    if !clean_exit {
        problems.push(format!(
            "collector exited with failure; stderr:\n{}",
            stderr.join("\n")
        ));
    }
    let mut records = Vec::new();
    for line in stdout.lines() {
        match serde_json::from_str::<Value>(line) {
            Ok(record) => records.push(record),
            Err(e) => problems.push(format!("stdout line is not JSON ({e}): {line}")),
        }
    }
    let mine: Vec<&Value> = records
        .iter()
        .filter(|r| attr(r, "process.pid") == me.pid && attr(r, "thread.name") == TRAFFIC_THREAD)
        .collect();
    for e in &expected {
        let found: Vec<&&Value> = mine.iter().filter(|r| matches(r, e)).collect();
        match found.as_slice() {
            [record] => problems.extend(check_record(record, e, &me)),
            [] => problems.push(format!("{}: not reported ({e:?})", e.what)),
            more => problems.push(format!(
                "{}: reported {} times, want once",
                e.what,
                more.len()
            )),
        }
    }
    let destinations: Vec<_> = expected.iter().map(|e| e.destination).collect();
    let to_test_ports = mine
        .iter()
        .filter(|r| {
            let port = attr(r, "destination.port").as_u64().unwrap_or(0);
            destinations.iter().any(|d| u64::from(d.port()) == port)
        })
        .count();
    if to_test_ports != expected.len() {
        problems.push(format!(
            "{to_test_ports} records for the test's destinations, want exactly {}",
            expected.len()
        ));
    }
    let storm = match storm_run {
        None => None,
        Some(Err(e)) => {
            problems.push(e);
            None
        }
        Some(Ok((port, made))) => {
            let reported = records
                .iter()
                .filter(|r| {
                    attr(r, "process.pid") == me.pid
                        && attr(r, "thread.name") == STORM_THREAD
                        && attr(r, "destination.port") == port
                })
                .count() as u64;
            let stat = |name| stopped_stat(&stderr, name);
            match (stat("lost"), stat("possibly_lost")) {
                (Some(lost), Some(possibly_lost)) => {
                    let books = Storm {
                        made,
                        reported,
                        lost,
                        possibly_lost,
                    };
                    problems.extend(books.problem());
                    Some(books)
                }
                _ => {
                    problems.push("no lost= and possibly_lost= on the Stopped. line".into());
                    None
                }
            }
        }
    };
    if problems.is_empty() {
        Ok(Outcome {
            mode,
            tcp_state,
            decision_clock,
            expected: expected.len(),
            records,
            storm,
            warnings: stderr
                .iter()
                .filter(|l| l.contains(" WARN "))
                .cloned()
                .collect(),
        })
    } else {
        let sample: Vec<String> = mine
            .iter()
            .take(40)
            .map(|r| r["attributes"].to_string())
            .collect();
        Err(format!(
            "mode {mode}: {} problem(s):\n  {}\nrecords from this process:\n  {}\ncollector stderr:\n  {}",
            problems.len(),
            problems.join("\n  "),
            sample.join("\n  "),
            stderr.join("\n  ")
        ))
    }
}

/// The value of ` key=` on the first stderr line that has it (the collector's start line
/// names its mode, state hook and decision clock so), or `unknown`.
fn start_line_field(stderr: &[String], key: &str) -> String {
    let marker = format!(" {key}=");
    stderr
        .iter()
        .find_map(|line| line.split(&marker).nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or("unknown")
        .to_owned()
}
