//! One measured run: start an observer (or none), run the load in its own process, wait
//! for the observer to catch up, read its CPU and peak memory, stop it, count what it saw.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::{
    load::{LoadArgs, LoadReport},
    receiver,
    tool::{self, Observer, Seen},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Scenario {
    /// No probe attached: the baseline throughput.
    None,
    /// The collector writing JSON lines to a pipe.
    Stdout,
    /// The collector exporting OTLP/gRPC to a receiver on loopback.
    Otlp,
    /// bpftrace counting the same tracepoint in a map (the peer baseline).
    Bpftrace,
    /// The collector to stdout with `--aggregate-window 1s`: repeats of a connection
    /// (same process and destination) are counted in the kernel, records carry counts.
    Aggregated,
    /// The collector with `--exclude-loopback`: the load's connections are dropped in
    /// the kernel and counted as filtered (what an excluded destination costs).
    Filtered,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::None => "no probe",
            Scenario::Stdout => "collector, stdout",
            Scenario::Otlp => "collector, OTLP",
            Scenario::Bpftrace => "bpftrace (peer)",
            Scenario::Aggregated => "collector, aggregated 1s",
            Scenario::Filtered => "collector, loopback excluded",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    pub scenario: Scenario,
    /// Target connects per second; 0 is as fast as possible.
    pub target_rate: u64,
    pub load: LoadReport,
    /// The load's connects the observer reported.
    pub seen: u64,
    /// What the collector counted as lost (all traffic, not just the load's).
    pub lost: Option<u64>,
    /// What the collector counted as possibly lost: program runs the kernel skipped,
    /// calls whose entry state was evicted (its `Stopped.` line).
    #[serde(default)]
    pub possibly_lost: Option<u64>,
    /// Records the collector exported (its `Stopped.` line; all traffic).
    #[serde(default)]
    pub exported: Option<u64>,
    pub cpu_seconds: f64,
    pub peak_rss_bytes: u64,
    /// OTLP records delivered per second, first connect to last arrival.
    pub delivered_per_second: Option<f64>,
}

impl RunResult {
    pub fn attempts(&self) -> u64 {
        self.load.connects + self.load.failed
    }
}

pub struct Plan {
    pub bench: PathBuf,
    pub collector: PathBuf,
    pub load: LoadArgs,
    /// Stdout scenario: parse every line to count the load's connections exactly (the
    /// smoke check), or send it to /dev/null and take the collector's own `exported`
    /// count (the benchmark: parsing would cost CPU on the same cores and bias it).
    pub count_stdout: bool,
    /// Appended to the collector's arguments in every scenario that runs one.
    pub collector_args: Vec<String>,
}

pub fn run_load(bench: &Path, args: &LoadArgs) -> anyhow::Result<LoadReport> {
    let output = Command::new(bench)
        .args([
            "load",
            "--threads",
            &args.threads.to_string(),
            "--seconds",
            &args.seconds.to_string(),
            "--rate",
            &args.rate.to_string(),
            "--udp-ports",
            &args.udp_ports.to_string(),
            "--listeners",
            &args.listeners.to_string(),
            "--address",
            &args.address.to_string(),
        ])
        .output()
        .context("running the load")?;
    if !output.status.success() {
        bail!("load failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    serde_json::from_slice(&output.stdout).context("reading the load's report")
}

fn count(seen: &Seen, ports: &[u16]) -> u64 {
    let seen = seen.lock().expect("lock");
    ports.iter().filter_map(|p| seen.get(p)).sum()
}

/// Waits until `seen` has everything or stops growing for a second.
fn settle(seen: &Seen, ports: &[u16], want: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = (count(seen, ports), Instant::now());
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let now = count(seen, ports);
        if now >= want {
            return;
        }
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(1) {
            return;
        }
    }
}

pub fn measure(
    plan: &Plan,
    scenario: Scenario,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<RunResult> {
    let collector = |path: &Path, args: &[String], count: bool| {
        let mut all = args.to_vec();
        all.extend(plan.collector_args.iter().cloned());
        Observer::collector(path, &all, count)
    };
    let otlp = match scenario {
        Scenario::Otlp => Some(runtime.block_on(receiver::start())?),
        _ => None,
    };
    let observer = match scenario {
        Scenario::None => None,
        // The load comes from one cgroup: the per-cgroup rate limit (a fairness guard, on by
        // default) is turned off so the figures show what the pipeline itself sustains.
        Scenario::Stdout => Some(collector(
            &plan.collector,
            &["--stdout".into(), "--cgroup-rate-limit".into(), "0".into()],
            plan.count_stdout,
        )?),
        Scenario::Otlp => {
            let endpoint = format!("http://{}", otlp.as_ref().expect("receiver").address);
            Some(collector(
                &plan.collector,
                &[
                    "--otlp-endpoint".into(),
                    endpoint,
                    "--batch-size".into(),
                    "2048".into(),
                    "--batch-timeout".into(),
                    "200ms".into(),
                    "--cgroup-rate-limit".into(),
                    "0".into(),
                ],
                false,
            )?)
        }
        Scenario::Bpftrace => Some(Observer::bpftrace()?),
        // A record per window and destination: few enough lines to count every one.
        Scenario::Aggregated => Some(collector(
            &plan.collector,
            &[
                "--stdout".into(),
                "--aggregate-window".into(),
                "1s".into(),
                "--cgroup-rate-limit".into(),
                "0".into(),
            ],
            true,
        )?),
        Scenario::Filtered => Some(collector(
            &plan.collector,
            &[
                "--stdout".into(),
                "--exclude-loopback".into(),
                "--cgroup-rate-limit".into(),
                "0".into(),
            ],
            false,
        )?),
    };
    let counted_on_stdout =
        scenario == Scenario::Aggregated || (scenario == Scenario::Stdout && plan.count_stdout);
    let pid = observer.as_ref().map(Observer::pid);
    let cpu_before = pid.map_or(0.0, tool::cpu_seconds);
    let started = Instant::now();
    let load = run_load(&plan.bench, &plan.load)?;
    let want = load.connects + load.failed;
    let seen_source = match (&otlp, &observer) {
        (Some(receiver), _) => Some(receiver.seen.clone()),
        (None, Some(o)) if counted_on_stdout => Some(o.seen.clone()),
        _ => None,
    };
    match &seen_source {
        Some(seen) => settle(seen, &load.ports, want),
        // Time to drain the ring (polled every 250 ms) and write what is left.
        None => std::thread::sleep(Duration::from_secs(1)),
    }
    let cpu_seconds = pid.map_or(0.0, |pid| tool::cpu_seconds(pid) - cpu_before);
    let peak_rss_bytes = pid.map_or(0, tool::peak_rss_bytes);
    let (seen, lost, possibly_lost, exported) = match observer {
        None => (0, None, None, None),
        Some(observer) => {
            let (lines, stdout) = observer.stop()?;
            match scenario {
                Scenario::Bpftrace => {
                    let counts = tool::bpftrace_counts(&stdout);
                    (
                        load.ports.iter().filter_map(|p| counts.get(p)).sum(),
                        None,
                        None,
                        None,
                    )
                }
                _ => {
                    let seen = match &seen_source {
                        Some(s) => count(s, &load.ports),
                        // Dropped by design: accounted for by the kernel's filtered count.
                        None if scenario == Scenario::Filtered => {
                            tool::stats_field(&lines, "filtered").unwrap_or(0).min(want)
                        }
                        // All traffic on the host, so at most what the load made is its.
                        None => tool::stopped_field(&lines, "exported")
                            .unwrap_or(0)
                            .min(want),
                    };
                    (
                        seen,
                        tool::stopped_field(&lines, "lost"),
                        tool::stopped_field(&lines, "possibly_lost"),
                        tool::stopped_field(&lines, "exported"),
                    )
                }
            }
        }
    };
    let delivered_per_second = otlp.as_ref().and_then(|r| {
        let last = (*r.last.lock().expect("lock"))?;
        let span = last.duration_since(started).as_secs_f64();
        (span > 0.0).then(|| seen as f64 / span)
    });
    Ok(RunResult {
        scenario,
        target_rate: plan.load.rate,
        load,
        seen,
        lost,
        possibly_lost,
        exported,
        cpu_seconds,
        peak_rss_bytes,
        delivered_per_second,
    })
}
