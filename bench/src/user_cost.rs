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

/// `connects_per_second` over the mean of its round's no-probe runs (`None` without one).
fn ratio(connects_per_second: f64, no_probe: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, runs) = no_probe.fold((0.0, 0u32), |(sum, n), cps| (sum + cps, n + 1));
    let mean = sum / f64::from(runs.max(1));
    (runs > 0 && mean > 0.0).then(|| connects_per_second / mean)
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

/// Runs no probe, stdout and OTLP alternately for each rate and round, and no probe
/// again at the round's end: each collector run's ratio is against the mean of the two,
/// which takes out a drift of the machine's speed over the round (it ran from ~40,000 to
/// ~58,000 connects/s within an hour on one host). Run-time statistics are off
/// ([`crate::bpf_stats`]). The table comes with a line saying what they were.
pub fn measure(args: &Args) -> anyhow::Result<String> {
    let rt = crate::runtime()?;
    let stats_off = crate::bpf_stats::sysctl_off()?;
    let mut samples = Vec::new();
    for round in 1..=args.repeat {
        for &rate in &args.rates {
            let mut runs = vec![(0, Scenario::None)];
            for collector in 0..args.collectors.len() {
                runs.extend([(collector, Scenario::Stdout), (collector, Scenario::Otlp)]);
            }
            runs.push((0, Scenario::None));
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
    Ok(format!(
        "Run-time statistics: {}.\n\n{}",
        crate::bpf_stats::provenance(&stats_off),
        table(&samples, &args.rates, &args.collectors)
    ))
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
            // Each round's ratio against its no-probe runs (before and after).
            let ratios: Vec<f64> = runs
                .iter()
                .filter_map(|s| {
                    let rounds_base = baseline
                        .iter()
                        .filter(|b| b.round == s.round)
                        .map(|b| b.result.load.connects_per_second);
                    ratio(s.result.load.connects_per_second, rounds_base)
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
         process on the same two cores) in turn, then no probe again, at each target rate (0 = as fast as the\n\
         load's 2 threads can connect), with `--cgroup-rate-limit 0`. *CPU µs per record* is\n\
         the collector process's user+sys CPU (its CPU-time clock, in ns) from the load's start until it\n\
         caught up, over the records it exported (its own `exported` count: every\n\
         connection on the host, not only the load's); the eBPF programs run in the\n\
         connecting tasks and are not in it (see the kernel-cost section). *Overhead ratio*\n\
         is the load's connects/s over the mean of the two no-probe runs of the same round\n\
         (a drift of the machine's speed over the round cancels out), median over rounds;\n\
         run-time statistics (`kernel.bpf_stats_enabled`) are off, as on a production node\n\
         (on, they add two clock reads to each of a connection's ~11 program runs). *Missed* is the load's connections the collector did not report. A\n\
         binary named after a commit (`egress-collector-<commit>`) is that commit's release\n\
         build, measured in the same rounds for comparison. Other sessions compiled and ran\n\
         tests on this machine during the runs (the load then falls short of its target\n\
         rate, and CPU per record is inflated by cache and scheduler contention): the\n\
         minimum is the least disturbed round, the median the typical one.\n\n\
         {table}",
        report::provenance(command),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ratio_is_against_the_mean_of_the_rounds_no_probe_runs() {
        let r = ratio(90.0, [80.0, 120.0].into_iter()).expect("a ratio");
        assert!((r - 0.9).abs() < 1e-9, "{r}");
        assert_eq!(ratio(90.0, std::iter::empty()), None);
        assert_eq!(ratio(90.0, [0.0].into_iter()), None);
    }
}
