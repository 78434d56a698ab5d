//! The collector's user-space cost per record: process CPU time (user + sys, its CPU-time
//! clock)
//! over the records it exported, the overhead ratio against no probe in the same round,
//! and peak RSS, for stdout and OTLP at a fixed rate and at the machine's maximum.
//!
//! The eBPF programs run in the connecting tasks, so their time is the load's, not the
//! collector process's: what is divided here is the collector's own work (ring buffer,
//! decoding, enrichment, encoding, writing or sending). The OTLP receiver runs in this
//! driver process, on the same cores.

use std::path::PathBuf;

use anyhow::Context;

use crate::{
    load::LoadArgs,
    report,
    run::{self, Plan, RunResult, Scenario},
};

/// One run's figures for the section.
#[derive(Debug, Clone)]
struct Sample {
    /// Which of the collectors measured (index into [`Args::collectors`]).
    collector: usize,
    rate: u64,
    scenario: Scenario,
    round: usize,
    result: RunResult,
}

impl Sample {
    /// CPU microseconds per record the collector exported (all traffic on the host).
    fn cpu_us_per_record(&self) -> Option<f64> {
        let records = self.result.exported.filter(|&n| n > 0)?;
        Some(self.result.cpu_seconds * 1e6 / records as f64)
    }
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    })
}

fn min(values: &[f64]) -> Option<f64> {
    values.iter().copied().min_by(f64::total_cmp)
}

pub struct Args {
    pub bench: PathBuf,
    /// Binaries measured in the same rounds (e.g. before and after a change).
    pub collectors: Vec<PathBuf>,
    pub rates: Vec<u64>,
    pub seconds: f64,
    pub repeat: usize,
}

/// Runs no probe, stdout and OTLP alternately for each rate and round.
pub fn measure(args: &Args) -> anyhow::Result<String> {
    let rt = crate::runtime()?;
    let mut samples = Vec::new();
    for round in 1..=args.repeat {
        for &rate in &args.rates {
            let mut runs = vec![(0, Scenario::None)];
            for collector in 0..args.collectors.len() {
                runs.extend([(collector, Scenario::Stdout), (collector, Scenario::Otlp)]);
            }
            for (collector, scenario) in runs {
                let plan = Plan {
                    bench: args.bench.clone(),
                    collector: args.collectors[collector].clone(),
                    load: LoadArgs::tcp_loopback(2, args.seconds, rate),
                    count_stdout: false,
                    collector_args: Vec::new(),
                };
                let result = run::measure(&plan, scenario, &rt)
                    .with_context(|| format!("{} at rate {rate}", scenario.name()))?;
                let sample = Sample {
                    collector,
                    rate,
                    scenario,
                    round,
                    result,
                };
                eprintln!(
                    "round {round} rate {rate:>6} {} {:<18} {:>8.0} connects/s, exported {:?}, seen {}/{}, lost {:?}, possibly lost {:?}, cpu {:.3}s ({} µs/record), peak rss {:.1} MiB",
                    args.collectors[collector].display(),
                    scenario.name(),
                    sample.result.load.connects_per_second,
                    sample.result.exported,
                    sample.result.seen,
                    sample.result.attempts(),
                    sample.result.lost,
                    sample.result.possibly_lost,
                    sample.result.cpu_seconds,
                    sample
                        .cpu_us_per_record()
                        .map_or("–".into(), |v| format!("{v:.2}")),
                    sample.result.peak_rss_bytes as f64 / 1048576.0,
                );
                samples.push(sample);
            }
        }
    }
    Ok(table(&samples, &args.rates, &args.collectors))
}

fn table(samples: &[Sample], rates: &[u64], collectors: &[PathBuf]) -> String {
    let mut out = String::from(
        "| target rate | collector | sink | rounds | connects/s (median) | overhead ratio (median) | CPU µs per record (min) | CPU µs per record (median) | peak RSS MiB (max) | missed |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for &rate in rates {
        let of = |collector: usize, scenario: Scenario| -> Vec<&Sample> {
            samples
                .iter()
                .filter(|s| {
                    s.rate == rate
                        && s.scenario == scenario
                        && (scenario == Scenario::None || s.collector == collector)
                })
                .collect()
        };
        let baseline = of(0, Scenario::None);
        if let Some(cps) = median(
            baseline
                .iter()
                .map(|s| s.result.load.connects_per_second)
                .collect(),
        ) {
            out.push_str(&format!(
                "| {} | – | no probe | {} | {cps:.0} | – | – | – | – | – |\n",
                if rate == 0 {
                    "max".to_owned()
                } else {
                    rate.to_string()
                },
                baseline.len(),
            ));
        }
        let pairs =
            (0..collectors.len()).flat_map(|c| [(c, Scenario::Stdout), (c, Scenario::Otlp)]);
        for (collector, scenario) in pairs {
            let runs = of(collector, scenario);
            if runs.is_empty() {
                continue;
            }
            // Each round's ratio against the no-probe run of the same round.
            let ratios: Vec<f64> = runs
                .iter()
                .filter_map(|s| {
                    let base = baseline.iter().find(|b| b.round == s.round)?;
                    let b = base.result.load.connects_per_second;
                    (b > 0.0).then(|| s.result.load.connects_per_second / b)
                })
                .collect();
            let per_record: Vec<f64> = runs.iter().filter_map(|s| s.cpu_us_per_record()).collect();
            let cps = median(
                runs.iter()
                    .map(|s| s.result.load.connects_per_second)
                    .collect(),
            );
            let rss = runs
                .iter()
                .map(|s| s.result.peak_rss_bytes as f64 / 1048576.0)
                .fold(0.0, f64::max);
            let missed: u64 = runs
                .iter()
                .map(|s| s.result.attempts().saturating_sub(s.result.seen))
                .sum();
            let fmt = |v: Option<f64>, digits: usize| {
                v.map_or("–".to_owned(), |v| format!("{v:.digits$}"))
            };
            out.push_str(&format!(
                "| {} | `{}` | {} | {} | {} | {} | {} | {} | {rss:.1} | {missed} |\n",
                if rate == 0 {
                    "max".to_owned()
                } else {
                    rate.to_string()
                },
                collectors[collector].display(),
                scenario.name(),
                runs.len(),
                fmt(cps, 0),
                fmt(median(ratios), 3),
                fmt(min(&per_record), 2),
                fmt(median(per_record), 2),
            ));
        }
    }
    out
}

/// The `user-cost` section of the report (`report::put_section` adds its markers).
pub fn section(command: &str, table: &str) -> String {
    format!(
        "## User-space cost per record\n\n\
         Generated by `egress-bench user-cost`; do not edit by hand.\n\n\
         {}\n\
         Each round runs no probe, then each collector binary listed to stdout (`--stdout`,\n\
         to /dev/null) and to OTLP (`--otlp-endpoint`, batches of 2048, the receiver in the bench\n\
         process on the same two cores) in turn, at each target rate (0 = as fast as the\n\
         load's 2 threads can connect), with `--cgroup-rate-limit 0`. *CPU µs per record* is\n\
         the collector process's user+sys CPU (its CPU-time clock, in ns) from the load's start until it\n\
         caught up, over the records it exported (its own `exported` count: every\n\
         connection on the host, not only the load's); the eBPF programs run in the\n\
         connecting tasks and are not in it (see the kernel-cost section). *Overhead ratio*\n\
         is the load's connects/s over the no-probe run of the same round, median over\n\
         rounds. *Missed* is the load's connections the collector did not report. A\n\
         binary named after a commit (`egress-collector-<commit>`) is that commit's release\n\
         build, measured in the same rounds for comparison. Other sessions compiled and ran\n\
         tests on this machine during the runs (the load then falls short of its target\n\
         rate, and CPU per record is inflated by cache and scheduler contention): the\n\
         minimum is the least disturbed round, the median the typical one.\n\n\
         {table}",
        report::provenance(command),
    )
}
