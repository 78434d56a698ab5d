//! Running the collector binary under test.

use std::{
    io::{BufRead, BufReader, Read},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

/// The line the collector logs once its probes are attached.
pub const READY_LINE: &str = "Capturing egress connections.";

/// A counter `name=<n>` in one of the collector's log lines (user space, or inside
/// `kernel=…`).
pub fn stat_in(line: &str, name: &str) -> Option<u64> {
    let needle = format!(" {name}=");
    let at = line.find(&needle)? + needle.len();
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

pub struct RunningCollector {
    child: Child,
    /// Taken when stopped.
    stdout: Option<thread::JoinHandle<String>>,
    stderr_lines: mpsc::Receiver<String>,
    stderr_seen: Vec<String>,
}

impl RunningCollector {
    /// Starts `collector run --stdout <args>` and waits until it is capturing.
    pub fn start(collector: &Path, args: &[&str], timeout: Duration) -> Result<Self, String> {
        let mut all = vec!["--stdout"];
        all.extend_from_slice(args);
        Self::start_with(collector, &all, timeout)
    }

    /// Starts `collector run <args>` and waits until it is capturing.
    pub fn start_with(collector: &Path, args: &[&str], timeout: Duration) -> Result<Self, String> {
        Self::start_wrapped(&[], collector, args, timeout)
    }

    /// Starts `<wrapper...> collector run <args>` (e.g. `setpriv` dropping capabilities).
    pub fn start_wrapped(
        wrapper: &[&str],
        collector: &Path,
        args: &[&str],
        timeout: Duration,
    ) -> Result<Self, String> {
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(collector);
                c
            }
            None => Command::new(collector),
        };
        let mut child = command
            .arg("run")
            .args(args)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", collector.display()))?;
        let mut stdout = child.stdout.take().ok_or("no stdout pipe")?;
        let stdout = thread::spawn(move || {
            let mut text = String::new();
            let _ = stdout.read_to_string(&mut text);
            text
        });
        let stderr = child.stderr.take().ok_or("no stderr pipe")?;
        let (tx, stderr_lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut running = Self {
            child,
            stdout: Some(stdout),
            stderr_lines,
            stderr_seen: Vec::new(),
        };
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match running.stderr_lines.recv_timeout(left) {
                Ok(line) => {
                    let ready = line.contains(READY_LINE);
                    running.stderr_seen.push(line);
                    if ready {
                        return Ok(running);
                    }
                }
                Err(e) => {
                    let _ = running.child.kill();
                    let status = running.child.wait();
                    let what = match e {
                        mpsc::RecvTimeoutError::Timeout => {
                            format!("did not become ready within {timeout:?}")
                        }
                        mpsc::RecvTimeoutError::Disconnected => {
                            format!("exited before becoming ready ({status:?})")
                        }
                    };
                    return Err(format!(
                        "collector {what}; stderr:\n{}",
                        running.stderr_seen.join("\n")
                    ));
                }
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log lines seen so far.
    pub fn stderr(&self) -> &[String] {
        &self.stderr_seen
    }

    /// SIGINT, then waits for exit; returns (exit success, stdout, all stderr lines).
    pub fn stop(self, timeout: Duration) -> Result<(bool, String, Vec<String>), String> {
        self.stop_with(libc::SIGINT, timeout)
    }

    /// Stops the collector once its reader's 250 ms poll has passed (every record made
    /// before is written), asserting that it stopped and exited cleanly: its records, and
    /// its whole log.
    pub fn stop_after_poll(self) -> (Vec<serde_json::Value>, Vec<String>) {
        thread::sleep(Duration::from_millis(600));
        let (ok, stdout, stderr) = self.stop(Duration::from_secs(30)).expect("collector stops");
        assert!(ok, "collector failed:\n{}", stderr.join("\n"));
        (crate::records::parse(&stdout), stderr)
    }

    /// As [`Self::stop`], with SIGTERM (what kubelet sends).
    pub fn terminate(self, timeout: Duration) -> Result<(bool, String, Vec<String>), String> {
        self.stop_with(libc::SIGTERM, timeout)
    }

    fn stop_with(
        mut self,
        signal: i32,
        timeout: Duration,
    ) -> Result<(bool, String, Vec<String>), String> {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let deadline = std::time::Instant::now() + timeout;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if std::time::Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    let _ = self.child.kill();
                    return Err(format!(
                        "collector did not stop within {timeout:?} of signal {signal}"
                    ));
                }
            }
        };
        let stdout = (self.stdout.take())
            .ok_or("stdout already taken")?
            .join()
            .map_err(|_| "stdout reader panicked")?;
        while let Ok(line) = self.stderr_lines.recv_timeout(Duration::from_millis(200)) {
            self.stderr_seen.push(line);
        }
        Ok((
            status.success(),
            stdout,
            std::mem::take(&mut self.stderr_seen),
        ))
    }
}

/// A test that fails before stopping its collector must not leave it attached: its
/// programs would run under every later test and benchmark on the machine.
impl Drop for RunningCollector {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
