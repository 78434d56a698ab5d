//! The observers under test, started and stopped the same way: the collector (stdout or
//! OTLP) and the peer baseline (bpftrace counting the same kernel event in a map).
//! CPU is read from the process's CPU-time clock (nanoseconds; /proc's ticks are 10 ms),
//! peak memory from /proc, as any operator would.

use std::{
    collections::{HashMap, HashSet},
    io::{BufRead, BufReader, Read},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// The peer baseline's program: TCP connects (CLOSE -> SYN_SENT) counted per destination
/// port in an in-kernel map, printed once at exit.
pub const BPFTRACE_COUNT: &str = "tracepoint:sock:inet_sock_set_state \
    /args->oldstate == 7 && args->newstate == 2/ { @connects[args->dport] = count(); }";

/// Connections seen per destination port.
pub type Seen = Arc<Mutex<HashMap<u16, u64>>>;

pub struct Observer {
    child: Child,
    stderr: mpsc::Receiver<String>,
    stdout: Option<thread::JoinHandle<String>>,
    pub seen: Seen,
    /// Distinct `k8s.pod.name` values on stdout.
    pods: Arc<Mutex<HashSet<String>>>,
}

/// user+sys CPU seconds of a process, to the nanosecond: its CPU-time clock, the whole
/// thread group's (threads that exited included). /proc's utime and stime count clock
/// ticks (10 ms at 100 Hz): over 100,000 records that is 0.1 µs a record, a tenth of
/// the user-cost target. /proc is the fallback if the clock cannot be read.
pub fn cpu_seconds(pid: u32) -> f64 {
    let mut clock: libc::clockid_t = 0;
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: both pointers are to locals valid for the calls.
    let read = unsafe {
        libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) == 0
            && libc::clock_gettime(clock, &mut now) == 0
    };
    if read {
        return seconds(&now);
    }
    proc_cpu_seconds(pid)
}

fn seconds(time: &libc::timespec) -> f64 {
    time.tv_sec as f64 + time.tv_nsec as f64 * 1e-9
}

/// user+sys CPU seconds of a process from /proc/<pid>/stat, in clock ticks.
fn proc_cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised comm; utime and stime are the 12th and 13th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) as f64 / hz
}

pub fn peak_rss_bytes(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:") * 1024
}

pub fn rss_bytes(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:") * 1024
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .unwrap_or(0)
}

/// `"k8s.pod.name":"…"` in a JSON line.
fn pod_name(line: &str) -> Option<&str> {
    let at = line.find("\"k8s.pod.name\":\"")? + "\"k8s.pod.name\":\"".len();
    line[at..].split('"').next()
}

/// `"destination.port":1234` in a JSON line.
fn destination_port(line: &str) -> Option<u16> {
    let at = line.find("\"destination.port\":")? + "\"destination.port\":".len();
    let digits: String = line[at..]
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

impl Observer {
    /// `egress-collector run <args>`; with `count_stdout` its JSON lines are counted per
    /// destination port as they come (the pipe costs the collector what /dev/null would).
    pub fn collector(binary: &Path, args: &[String], count_stdout: bool) -> anyhow::Result<Self> {
        let mut command = Command::new(binary);
        command
            .arg("run")
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stderr(Stdio::piped());
        command.stdout(if count_stdout {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let seen: Seen = Arc::default();
        let pods: Arc<Mutex<HashSet<String>>> = Arc::default();
        let stdout = child.stdout.take().map(|out| {
            let (seen, pods) = (Arc::clone(&seen), Arc::clone(&pods));
            thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    // The pod first: a reader that sees a line counted (`seen_to`) then
                    // finds its pod (`pods_seen`) too.
                    if let Some(pod) = pod_name(&line) {
                        let mut pods = pods.lock().expect("lock");
                        if !pods.contains(pod) {
                            pods.insert(pod.to_owned());
                        }
                    }
                    if let Some(port) = destination_port(&line) {
                        *seen.lock().expect("lock").entry(port).or_default() +=
                            connection_count(&line);
                    }
                }
                String::new()
            })
        });
        let stderr = lines_of(child.stderr.take().context("stderr pipe")?);
        let mut observer = Self {
            child,
            stderr,
            stdout,
            seen,
            pods,
        };
        observer.wait_for_line("Capturing egress connections.", Duration::from_secs(60))?;
        Ok(observer)
    }

    /// bpftrace counting TCP connects (CLOSE -> SYN_SENT) on the tracepoint the collector
    /// uses on this kernel, in an in-kernel map.
    pub fn bpftrace() -> anyhow::Result<Self> {
        let mut child = Command::new("bpftrace")
            .args(["-e", BPFTRACE_COUNT])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting bpftrace (apt-get install bpftrace)")?;
        let stdout = child.stdout.take().context("stdout pipe")?;
        let (tx, lines) = mpsc::channel();
        let collected = thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line.clone());
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        let mut observer = Self {
            child,
            stderr: lines,
            stdout: Some(collected),
            seen: Arc::default(),
            pods: Arc::default(),
        };
        observer.wait_for_line("Attaching", Duration::from_secs(60))?;
        // Attaching is printed before the probe is live.
        thread::sleep(Duration::from_millis(500));
        Ok(observer)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Records seen so far to `port`.
    pub fn seen_to(&self, port: u16) -> u64 {
        self.seen
            .lock()
            .expect("lock")
            .get(&port)
            .copied()
            .unwrap_or(0)
    }

    pub fn pods_seen(&self) -> usize {
        self.pods.lock().expect("lock").len()
    }

    fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            match self.stderr.recv_timeout(Duration::from_millis(200)) {
                Ok(line) if line.contains(needle) => return Ok(()),
                Ok(line) => seen.push(line),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Ok(Some(status)) = self.child.try_wait() {
                        bail!("exited ({status}) before {needle:?}:\n{}", seen.join("\n"));
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("closed its output before {needle:?}:\n{}", seen.join("\n"))
                }
            }
        }
        bail!("no {needle:?} within {timeout:?}:\n{}", seen.join("\n"))
    }

    /// SIGINT, then the remaining output: the collector's last log lines, or bpftrace's map.
    pub fn stop(mut self) -> anyhow::Result<(Vec<String>, String)> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("did not stop within 30 s of SIGINT");
            }
            thread::sleep(Duration::from_millis(50));
        }
        let lines: Vec<String> = self.stderr.try_iter().collect();
        let stdout = self
            .stdout
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        Ok((lines, stdout))
    }
}

fn lines_of(pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// `@connects[1234]: 5` lines of bpftrace's map dump.
pub fn bpftrace_counts(output: &str) -> HashMap<u16, u64> {
    output
        .lines()
        .filter_map(|line| {
            let rest = line.trim().strip_prefix("@connects[")?;
            let (port, count) = rest.split_once("]:")?;
            Some((port.trim().parse().ok()?, count.trim().parse().ok()?))
        })
        .collect()
}

/// `key=value` of the collector's `Stopped.` line (captured, exported, lost).
/// The number right after the first `needle` in `line`.
fn number_after(line: &str, needle: &str) -> Option<u64> {
    let at = line.find(needle)? + needle.len();
    line[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()
}

/// `"egress.connection.count":N` (aggregation on), else 1: the connections a line stands for.
fn connection_count(line: &str) -> u64 {
    number_after(line, "\"egress.connection.count\":").unwrap_or(1)
}

/// A counter from the last statistics line (` name=N`, kernel counters included); the
/// line at shutdown covers the whole run when it is shorter than the stats interval.
pub fn stats_field(lines: &[String], key: &str) -> Option<u64> {
    let line = lines
        .iter()
        .rev()
        .find(|l| l.contains("Collector statistics.") || l.contains("Events were lost"))?;
    number_after(line, &format!(" {key}="))
}

pub fn stopped_field(lines: &[String], key: &str) -> Option<u64> {
    let line = lines.iter().rev().find(|l| l.contains("Stopped."))?;
    number_after(line, &format!("{key}="))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_statistics() {
        assert_eq!(
            connection_count(r#"{"attributes":{"egress.connection.count":42}}"#),
            42
        );
        assert_eq!(
            connection_count(r#"{"attributes":{"destination.port":1}}"#),
            1
        );
        let lines = vec![
            "Collector statistics. captured=3 filtered_by_namespace=7 kernel=rate_limited=0 filtered=120 aggregated=5".to_owned(),
        ];
        assert_eq!(stats_field(&lines, "filtered"), Some(120));
        assert_eq!(stats_field(&lines, "filtered_by_namespace"), Some(7));
        assert_eq!(stats_field(&lines, "missing"), None);
    }

    #[test]
    fn parses_what_the_tools_print() {
        assert_eq!(
            destination_port(r#"{"attributes":{"destination.port":8080,"x":1}}"#),
            Some(8080)
        );
        assert_eq!(destination_port(r#"{"source.port":1}"#), None);
        let counts =
            bpftrace_counts("Attaching 1 probe...\n\n@connects[443]: 12\n@connects[80]: 3\n");
        assert_eq!(counts.get(&443), Some(&12));
        assert_eq!(counts.get(&80), Some(&3));
        let lines = vec!["INFO Stopped. captured=120 exported=118 lost=2".to_owned()];
        assert_eq!(stopped_field(&lines, "captured"), Some(120));
        assert_eq!(stopped_field(&lines, "lost"), Some(2));
        assert_eq!(stopped_field(&lines, "dropped"), None);
    }

    /// This process's CPU time, read by pid, lies between two readings of its own
    /// CPU-time clock taken around it: nanoseconds, not /proc's 10 ms ticks (which fall
    /// at or before the first reading).
    #[test]
    fn cpu_time_is_read_to_the_nanosecond() {
        let own = || {
            let mut now = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: a pointer to a local valid for the call.
            assert_eq!(
                unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut now) },
                0
            );
            seconds(&now)
        };
        // Some CPU time first, so that it is not a whole number of ticks by chance.
        let mut x = 1u64;
        for i in 0..2_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
        }
        let before = own();
        let read = cpu_seconds(std::process::id());
        let after = own();
        assert!(
            before <= read && read <= after,
            "{before} <= {read} <= {after}"
        );
    }
}
