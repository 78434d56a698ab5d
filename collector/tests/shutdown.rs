//! How the collector ends: a stdout whose reader goes away (`| head -2`), a stdout that
//! blocks, a stage that never returns (the `EGRESS_TEST_HANG` fault-injection hook). In
//! every case it exits on its own, within its deadline, with a final `Stopped.` line whose
//! counts add up: `captured = exported + filtered + dropped`.

mod support;

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use support::{
    host::require_root,
    receiver::{self, Received, Shared, int_attr, runtime},
};

const COLLECTOR: &str = env!("CARGO_BIN_EXE_egress-collector");
const READY: &str = "Capturing egress connections.";

/// The collector as a child process, its stderr read line by line as it comes.
struct Collector {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Vec<String>,
}

impl Collector {
    /// Starts `collector run <args>` with `env`, stdout piped, and waits until capturing.
    fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(COLLECTOR)
            .arg("run")
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the collector");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut collector = Self {
            child,
            lines,
            stderr: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !collector.stderr.iter().any(|l| l.contains(READY)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match collector.lines.recv_timeout(left) {
                Ok(line) => collector.stderr.push(line),
                Err(_) => panic!(
                    "the collector did not start:\n{}",
                    collector.stderr.join("\n")
                ),
            }
        }
        collector
    }

    fn signal(&self, signal: i32) {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Waits up to `limit` for the process to exit on its own; then the rest of stderr.
    fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break Some(status);
            }
            if Instant::now() > deadline {
                break None;
            }
            thread::sleep(Duration::from_millis(20));
        };
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(300)) {
            self.stderr.push(line);
        }
        status
    }

    fn log(&self) -> String {
        self.stderr.join("\n")
    }

    /// The fields of the `Stopped.` line, which must be the last line.
    fn stopped(&self) -> BTreeMap<String, u64> {
        let last = self.stderr.last().map(String::as_str).unwrap_or("");
        assert!(
            last.contains("Stopped."),
            "the statistics line comes last:\n{}",
            self.log()
        );
        last.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
            .collect()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `captured = exported + filtered + dropped`, `abandoned` being part of `dropped`.
fn assert_counts_add_up(stats: &BTreeMap<String, u64>, log: &str) {
    let field = |k: &str| {
        *stats
            .get(k)
            .unwrap_or_else(|| panic!("no {k}= in the Stopped. line:\n{log}"))
    };
    assert_eq!(
        field("captured"),
        field("exported") + field("filtered") + field("dropped"),
        "captured = exported + filtered + dropped:\n{log}"
    );
    assert!(field("abandoned") <= field("dropped"), "{log}");
    assert!(field("dropped") <= field("lost"), "{log}");
}

/// A loopback listener that accepts and closes; returns its port.
fn listener() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("listen");
    let port = listener.local_addr().expect("addr").port();
    thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    port
}

fn connect(port: u16, n: usize) {
    for _ in 0..n {
        let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("connect");
    }
}

/// Connects to `port` every few milliseconds until the returned flag is set.
fn keep_connecting(port: u16) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    thread::spawn(move || {
        while !flag.load(Ordering::Relaxed) {
            connect(port, 1);
            thread::sleep(Duration::from_millis(5));
        }
    });
    stop
}

#[test]
fn a_stdout_closed_by_head_ends_the_collector_cleanly_with_counts_that_add_up() {
    require_root();
    let port = listener();
    let mut collector = Collector::start(&[], &[]);
    let stdout = collector.child.stdout.take().expect("stdout");
    // `egress-collector run | head -2`: a real pipe whose reader exits after two lines.
    let head = Command::new("head")
        .arg("-2")
        .stdin(stdout)
        .stdout(Stdio::piped())
        .spawn()
        .expect("head");
    let traffic = keep_connecting(port);
    let head = head.wait_with_output().expect("head exits");
    assert_eq!(String::from_utf8_lossy(&head.stdout).lines().count(), 2);
    let status = collector.wait(Duration::from_secs(20));
    traffic.store(true, Ordering::Relaxed);
    let log = collector.log();
    let status = status.unwrap_or_else(|| panic!("still running after head exited:\n{log}"));
    assert!(status.success(), "exit status {status}:\n{log}");
    assert_eq!(
        log.matches("stdout was closed by its reader").count(),
        1,
        "one line says why it stops:\n{log}"
    );
    assert!(
        !log.contains("ERROR") && !log.contains("Broken pipe"),
        "no error per record:\n{log}"
    );
    let stats = collector.stopped();
    assert_counts_add_up(&stats, &log);
    assert!(stats["exported"] >= 2, "{log}");
}

#[test]
fn a_reader_gone_before_any_record_still_ends_the_collector() {
    require_root();
    // Every destination excluded in the kernel: nothing is ever written to stdout, so
    // only polling stdout can tell its reader went away (`run | true`).
    let mut collector = Collector::start(&["--exclude-cidr", "0.0.0.0/0,::/0"], &[]);
    drop(collector.child.stdout.take());
    connect(listener(), 5);
    let status = collector.wait(Duration::from_secs(10));
    let log = collector.log();
    let status = status.unwrap_or_else(|| panic!("still running with no reader:\n{log}"));
    assert!(status.success(), "exit status {status}:\n{log}");
    assert_eq!(
        log.matches("stdout was closed by its reader").count(),
        1,
        "{log}"
    );
    let stats = collector.stopped();
    assert_counts_add_up(&stats, &log);
    assert_eq!(stats["captured"], 0, "{log}");
}

#[test]
fn with_otlp_a_closed_stdout_ends_only_the_copy() {
    require_root();
    let rt = runtime();
    let received: Shared = Arc::new(Mutex::new(Received::default()));
    let otlp = rt.block_on(receiver::grpc(
        "127.0.0.1:0".parse::<SocketAddr>().expect("addr"),
        Arc::clone(&received),
    ));
    let endpoint = format!("http://{}", otlp.addr);
    let port = listener();
    let mut collector = Collector::start(
        &[
            "--stdout",
            "--otlp-endpoint",
            &endpoint,
            "--batch-timeout",
            "200ms",
        ],
        &[],
    );
    let stdout = collector.child.stdout.take().expect("stdout");
    let mut head = Command::new("head")
        .arg("-1")
        .stdin(stdout)
        .stdout(Stdio::null())
        .spawn()
        .expect("head");
    let traffic = keep_connecting(port);
    head.wait().expect("head exits");
    // Long enough for later records to meet the closed pipe, and for OTLP to go on.
    thread::sleep(Duration::from_secs(3));
    traffic.store(true, Ordering::Relaxed);
    let still_running = collector.child.try_wait().expect("wait").is_none();
    let at_close = received
        .lock()
        .expect("lock")
        .log_records()
        .filter(|r| int_attr(&r.attributes, "destination.port") == Some(i64::from(port)))
        .count();
    connect(port, 5);
    thread::sleep(Duration::from_secs(2));
    collector.signal(libc::SIGINT);
    let status = collector.wait(Duration::from_secs(30));
    let log = collector.log();
    assert!(still_running, "OTLP is on: the collector goes on:\n{log}");
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?} after SIGINT:\n{log}"
    );
    assert_eq!(
        log.matches("stdout was closed by its reader; records go on to OTLP only.")
            .count(),
        1,
        "one warning:\n{log}"
    );
    assert!(!log.contains("Broken pipe"), "{log}");
    let after = received
        .lock()
        .expect("lock")
        .log_records()
        .filter(|r| int_attr(&r.attributes, "destination.port") == Some(i64::from(port)))
        .count();
    assert!(
        after >= at_close + 5,
        "records after the close still reach OTLP ({at_close} then {after}):\n{log}"
    );
    let stats = collector.stopped();
    assert_counts_add_up(&stats, &log);
    drop(otlp);
}

/// Reads all of `stdout` on a thread once `start` is sent; returns the complete lines.
fn read_later(mut stdout: impl Read + Send + 'static) -> (mpsc::Sender<()>, mpsc::Receiver<usize>) {
    let (start, started) = mpsc::channel::<()>();
    let (tx, lines) = mpsc::channel();
    thread::spawn(move || {
        let _ = started.recv();
        let mut text = Vec::new();
        let _ = stdout.read_to_end(&mut text);
        let complete = text.iter().filter(|&&b| b == b'\n').count();
        let _ = tx.send(complete);
    });
    (start, lines)
}

#[test]
fn a_blocked_stdout_drains_before_the_final_line() {
    require_root();
    let port = listener();
    let mut collector = Collector::start(&["--shutdown-deadline", "30s"], &[]);
    let (start_reading, lines) = read_later(collector.child.stdout.take().expect("stdout"));
    // Far more than a 64 KiB pipe holds: the writer blocks.
    connect(port, 600);
    thread::sleep(Duration::from_millis(500));
    collector.signal(libc::SIGINT);
    thread::sleep(Duration::from_secs(3));
    assert!(
        collector.child.try_wait().expect("wait").is_none(),
        "records still wait for stdout: the collector must not have stopped yet"
    );
    start_reading.send(()).expect("reader");
    let status = collector.wait(Duration::from_secs(40));
    let log = collector.log();
    assert!(status.is_some_and(|s| s.success()), "{status:?}:\n{log}");
    let read = lines.recv_timeout(Duration::from_secs(10)).expect("read");
    let stats = collector.stopped();
    assert_counts_add_up(&stats, &log);
    assert_eq!(stats["abandoned"], 0, "{log}");
    assert_eq!(
        stats["exported"], read as u64,
        "exported counts the lines the reader got:\n{log}"
    );
    assert!(read >= 600, "{read} lines:\n{log}");
}

#[test]
fn a_stdout_blocked_past_the_deadline_is_counted_and_cannot_hold_shutdown() {
    require_root();
    let port = listener();
    let mut collector = Collector::start(&["--shutdown-deadline", "2s"], &[]);
    let (start_reading, lines) = read_later(collector.child.stdout.take().expect("stdout"));
    connect(port, 600);
    thread::sleep(Duration::from_millis(500));
    collector.signal(libc::SIGINT);
    let status = collector.wait(Duration::from_secs(10));
    start_reading.send(()).expect("reader");
    let log = collector.log();
    let status = status.unwrap_or_else(|| panic!("a blocked stdout held shutdown:\n{log}"));
    assert_eq!(status.code(), Some(3), "deadline passed:\n{log}");
    let read = lines.recv_timeout(Duration::from_secs(10)).expect("read") as u64;
    let stats = collector.stopped();
    assert_counts_add_up(&stats, &log);
    assert!(stats["abandoned"] > 0, "{log}");
    // Lines in the pipe: every exported batch, plus part of the one being written.
    let batch = 256;
    assert!(
        stats["exported"] <= read && read <= stats["exported"] + batch,
        "{read} lines read, exported {}:\n{log}",
        stats["exported"]
    );
}

#[test]
fn a_stage_that_never_returns_cannot_hold_shutdown() {
    require_root();
    let port = listener();
    // The enrichment thread, the stdout writer, the main thread itself.
    for stage in ["enrich", "stdout", "shutdown"] {
        let mut collector = Collector::start(
            &["--shutdown-deadline", "2s"],
            &[("EGRESS_TEST_HANG", stage)],
        );
        let (start_reading, lines) = read_later(collector.child.stdout.take().expect("stdout"));
        start_reading.send(()).expect("reader");
        connect(port, 50);
        thread::sleep(Duration::from_millis(500));
        let stopping = Instant::now();
        collector.signal(libc::SIGINT);
        // The deadline (2s), the watchdog's grace (3s), and a margin.
        let status = collector.wait(Duration::from_secs(10));
        let took = stopping.elapsed();
        let log = collector.log();
        let status = status.unwrap_or_else(|| panic!("{stage}: shutdown hung:\n{log}"));
        assert!(
            log.contains(&format!("stage=\"{stage}\"")) || log.contains(&format!("stage={stage}")),
            "{stage}: the hook ran:\n{log}"
        );
        assert_eq!(status.code(), Some(3), "{stage}: deadline passed:\n{log}");
        let stats = collector.stopped();
        assert_counts_add_up(&stats, &log);
        let read = lines.recv_timeout(Duration::from_secs(10)).expect("read") as u64;
        assert_eq!(stats["exported"], read, "{stage}:\n{log}");
        eprintln!("{stage}: exited {took:?} after SIGINT with {stats:?}");
    }
}

/// The highest id of a program loaded now.
fn newest_program_id() -> u32 {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| p.id())
        .max()
        .unwrap_or(0)
}

/// Ids of programs loaded after `since` that no process holds: what a collector that has
/// exited left loaded. Other collectors on the machine (other tests, benchmarks) hold
/// theirs, so they do not count. Waits a few seconds for the kernel to free programs
/// after their last fd closed.
fn orphan_programs_settled(since: u32) -> Vec<u32> {
    let held = || -> std::collections::BTreeSet<u32> {
        let mut ids = std::collections::BTreeSet::new();
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return ids;
        };
        for proc in procs.filter_map(Result::ok) {
            let Ok(fds) = std::fs::read_dir(proc.path().join("fdinfo")) else {
                continue;
            };
            for fd in fds.filter_map(Result::ok) {
                let Ok(info) = std::fs::read_to_string(fd.path()) else {
                    continue;
                };
                ids.extend(
                    info.lines()
                        .filter_map(|l| l.strip_prefix("prog_id:"))
                        .filter_map(|v| v.trim().parse::<u32>().ok()),
                );
            }
        }
        ids
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let held = held();
        let orphans: Vec<u32> = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .filter(|p| p.id() > since && !held.contains(&p.id()))
            .filter(|p| {
                p.name_as_str().is_some_and(|n| {
                    [
                        "tp_",
                        "raw_tp_",
                        "kprobe_",
                        "kretprobe_",
                        "fentry_",
                        "fexit_",
                    ]
                    .iter()
                    .any(|prefix| n.starts_with(prefix))
                })
            })
            .map(|p| p.id())
            .collect();
        if orphans.is_empty() || Instant::now() > deadline {
            return orphans;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn sigterm_during_start_up_and_attach_leaves_nothing_attached_and_loses_nothing() {
    require_root();
    let port = listener();
    let traffic = keep_connecting(port);
    let before = newest_program_id();
    // From before the handlers exist to well after the probes are attached.
    for delay_ms in [0u64, 5, 20, 50, 100, 200, 400, 800, 1500] {
        let mut child = Command::new(COLLECTOR)
            .arg("run")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start");
        let mut stdout = child.stdout.take().expect("stdout");
        let lines = thread::spawn(move || {
            let mut text = String::new();
            let _ = stdout.read_to_string(&mut text);
            text.lines().count() as u64
        });
        let mut stderr = child.stderr.take().expect("stderr");
        let log = thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        thread::sleep(Duration::from_millis(delay_ms));
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{delay_ms} ms: SIGTERM did not stop the collector");
            }
            thread::sleep(Duration::from_millis(20));
        };
        let log = log.join().expect("stderr");
        let lines = lines.join().expect("stdout");
        use std::os::unix::process::ExitStatusExt;
        if status.signal() == Some(libc::SIGTERM) {
            // Before the handlers were registered: nothing was attached yet.
            assert!(
                !log.contains(READY),
                "{delay_ms} ms: killed after attaching:\n{log}"
            );
        } else {
            assert!(status.success(), "{delay_ms} ms: {status}:\n{log}");
            let stats: BTreeMap<String, u64> = log
                .lines()
                .rev()
                .find(|l| l.contains("Stopped."))
                .unwrap_or_else(|| panic!("{delay_ms} ms: no statistics line:\n{log}"))
                .split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
                .collect();
            assert_counts_add_up(&stats, &log);
            assert_eq!(
                stats["dropped"], 0,
                "{delay_ms} ms: nothing captured is lost:\n{log}"
            );
            assert_eq!(
                stats["exported"], lines,
                "{delay_ms} ms: every record written"
            );
        }
        let left = orphan_programs_settled(before);
        assert!(left.is_empty(), "{delay_ms} ms: left loaded: {left:?}");
        eprintln!("{delay_ms} ms: {status}, {lines} records");
    }
    traffic.store(true, Ordering::Relaxed);
}

#[test]
fn a_second_signal_cuts_a_stuck_drain_short_with_the_statistics_line() {
    require_root();
    let port = listener();
    // Enrichment never returns: without the second signal the drain would wait 60 s.
    let mut collector = Collector::start(
        &["--shutdown-deadline", "60s"],
        &[("EGRESS_TEST_HANG", "enrich")],
    );
    let (start_reading, _lines) = read_later(collector.child.stdout.take().expect("stdout"));
    start_reading.send(()).expect("reader");
    connect(port, 20);
    thread::sleep(Duration::from_millis(500));
    collector.signal(libc::SIGINT);
    thread::sleep(Duration::from_secs(1));
    assert!(
        collector.child.try_wait().expect("wait").is_none(),
        "still draining"
    );
    let again = Instant::now();
    collector.signal(libc::SIGTERM);
    let status = collector.wait(Duration::from_secs(10));
    let log = collector.log();
    let status = status.unwrap_or_else(|| panic!("the second signal did not stop it:\n{log}"));
    assert_eq!(status.code(), Some(3), "{log}");
    assert!(log.contains("Signalled again"), "{log}");
    assert_counts_add_up(&collector.stopped(), &log);
    eprintln!("exited {:?} after the second signal", again.elapsed());
}

#[test]
fn a_failing_stdout_is_one_error_line_and_counted_not_one_line_per_batch() {
    require_root();
    let port = listener();
    // /dev/full: every write fails with ENOSPC, the reader never "goes away".
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let mut child = Command::new(COLLECTOR)
        .arg("run")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(full)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, lines) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut collector = Collector {
        child,
        lines,
        stderr: Vec::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !collector.stderr.iter().any(|l| l.contains(READY)) && Instant::now() < deadline {
        if let Ok(line) = collector.lines.recv_timeout(Duration::from_millis(200)) {
            collector.stderr.push(line);
        }
    }
    // Several batches, each written (and failing) on its own.
    for _ in 0..5 {
        connect(port, 10);
        thread::sleep(Duration::from_millis(300));
    }
    collector.signal(libc::SIGINT);
    let status = collector.wait(Duration::from_secs(30));
    let log = collector.log();
    assert!(status.is_some_and(|s| s.success()), "{status:?}:\n{log}");
    assert_eq!(
        log.matches("Writing to stdout failed").count(),
        1,
        "one line for the run of failures:\n{log}"
    );
    let stats = collector.stopped();
    assert_counts_add_up(&stats, &log);
    assert!(stats["dropped"] >= 50, "{log}");
    assert_eq!(stats["exported"], 0, "{log}");
}
