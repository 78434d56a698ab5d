//! Figures from the runs: medians per scenario and rate, the overhead ratio against the
//! no-probe runs of the same rate, loss, CPU per 10k events/s, peak RSS; a markdown table
//! and a PNG cost curve.

use std::{collections::BTreeMap, path::Path};

use plotters::prelude::*;

use crate::run::{RunResult, Scenario};

#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: Scenario,
    pub target_rate: u64,
    pub runs: usize,
    pub connects_per_second: f64,
    pub overhead_ratio: Option<f64>,
    pub attempts: u64,
    pub missed: u64,
    pub lost_counted: Option<u64>,
    /// CPU cores used while the load ran.
    pub cpu_cores: f64,
    pub cpu_per_10k: f64,
    pub peak_rss_mib: f64,
    pub delivered_per_second: Option<f64>,
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

pub fn rows(results: &[RunResult]) -> Vec<Row> {
    let mut groups: BTreeMap<(u64, u8), Vec<&RunResult>> = BTreeMap::new();
    for r in results {
        groups
            .entry((r.target_rate, r.scenario as u8))
            .or_default()
            .push(r);
    }
    let baseline = |rate: u64| {
        groups
            .get(&(rate, Scenario::None as u8))
            .map(|runs| median(runs.iter().map(|r| r.load.connects_per_second).collect()))
    };
    groups
        .iter()
        .map(|(&(rate, _), runs)| {
            let scenario = runs[0].scenario;
            let cps = median(runs.iter().map(|r| r.load.connects_per_second).collect());
            let cpu_cores = median(
                runs.iter()
                    .map(|r| r.cpu_seconds / r.load.seconds.max(1e-9))
                    .collect(),
            );
            let observed = scenario != Scenario::None;
            Row {
                scenario,
                target_rate: rate,
                runs: runs.len(),
                connects_per_second: cps,
                overhead_ratio: baseline(rate)
                    .filter(|&b| observed && b > 0.0)
                    .map(|b| cps / b),
                attempts: runs.iter().map(|r| r.attempts()).sum(),
                missed: if observed {
                    runs.iter()
                        .map(|r| r.attempts().saturating_sub(r.seen))
                        .sum()
                } else {
                    0
                },
                lost_counted: runs.iter().map(|r| r.lost).sum::<Option<u64>>(),
                cpu_cores,
                cpu_per_10k: if cps > 0.0 {
                    cpu_cores / (cps / 10_000.0)
                } else {
                    0.0
                },
                peak_rss_mib: runs
                    .iter()
                    .map(|r| r.peak_rss_bytes as f64 / (1024.0 * 1024.0))
                    .fold(0.0, f64::max),
                delivered_per_second: {
                    let d: Vec<f64> = runs.iter().filter_map(|r| r.delivered_per_second).collect();
                    (!d.is_empty()).then(|| median(d))
                },
            }
        })
        .collect()
}

pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "| target rate | observer | runs | connects/s (median) | overhead ratio | attempts | missed | lost (counted) | CPU cores | CPU per 10k ev/s | peak RSS MiB | OTLP records/s |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let rate = if r.target_rate == 0 {
            "max".to_owned()
        } else {
            r.target_rate.to_string()
        };
        let opt =
            |v: Option<f64>, digits: usize| v.map_or("–".to_owned(), |v| format!("{v:.digits$}"));
        let observed = r.scenario != Scenario::None;
        out.push_str(&format!(
            "| {rate} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.scenario.name(),
            r.runs,
            r.connects_per_second,
            opt(r.overhead_ratio, 3),
            r.attempts,
            if observed {
                r.missed.to_string()
            } else {
                "–".into()
            },
            r.lost_counted.map_or("–".into(), |l| l.to_string()),
            if observed {
                format!("{:.3}", r.cpu_cores)
            } else {
                "–".into()
            },
            if observed {
                format!("{:.3}", r.cpu_per_10k)
            } else {
                "–".into()
            },
            if observed {
                format!("{:.1}", r.peak_rss_mib)
            } else {
                "–".into()
            },
            opt(r.delivered_per_second, 0),
        ));
    }
    out
}

fn machine() -> String {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory_gib = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1048576.0);
    let kernel = read("/proc/sys/kernel/osrelease");
    format!(
        "{cpu}, {cores} cores, {memory_gib:.0} GiB, Linux {}",
        kernel.trim()
    )
}

fn today() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// BENCHMARKS.md: generated, so every figure in it comes from the run it names.
pub fn document(table: &str, plot: &Path, command: &str, report: &Path) -> String {
    let base = report.parent().unwrap_or(Path::new(""));
    let plot = plot.strip_prefix(base).unwrap_or(plot).display();
    format!(
        "# Benchmarks\n\n\
         Generated by `egress-bench run` (see README, \"Benchmark\"); do not edit by hand.\n\n\
         - Machine: {}\n- Date: {}\n- Command: `{command}`\n\n\
         Each run: the observer starts and reports ready, then `egress-bench load` opens and\n\
         closes TCP connections to loopback listeners from 2 threads (SO_LINGER 0) at the\n\
         target rate. The collector runs with `--cgroup-rate-limit 0`: the load comes from\n\
         one cgroup, and the figures are meant to show what the pipeline sustains, not the\n\
         fairness guard. Its stdout goes to /dev/null and what it saw is its own count of\n\
         records written (the smoke check in CI counts the load's connections line by\n\
         line instead). *Overhead ratio* is connects/s with the observer over connects/s with\n\
         no probe at the same target. *Missed* counts the load's connections the observer\n\
         did not report; *lost (counted)* is what the collector itself counted as lost (all\n\
         traffic). *CPU* is the observer's user+sys time over the load's duration (including\n\
         its catch-up), from /proc; *peak RSS* is VmHWM. bpftrace counts the same tracepoint\n\
         in a map and prints once at exit, so its user-space CPU is near zero by design; its\n\
         kernel cost shows in the overhead ratio. *Aggregated* runs the collector with\n\
         `--aggregate-window 1s`: the load's repeated connections (one process, 8\n\
         destinations) are counted in the kernel and each window's records carry the\n\
         count; what it saw is the sum of those counts, read line by line. *Loopback\n\
         excluded* runs it with `--exclude-loopback`: every connection of the load is\n\
         dropped in the kernel, and what it saw is its `filtered` count.\n\n\
         {table}\n![CPU against rate]({plot})\n{}",
        machine(),
        today(),
        record_size_section(base),
    )
}

/// The bytes-per-record table, measured by the collector's own encoder
/// (`EGRESS_RECORD_SIZE_OUT=bench/results/record-size.md cargo test -p egress-collector
/// --lib record_size`): kept here so a new run does not drop it.
fn record_size_section(base: &Path) -> String {
    let Ok(table) = std::fs::read_to_string(base.join("bench/results/record-size.md")) else {
        return String::new();
    };
    format!("{RECORD_SIZE_TEXT}\n{table}")
}

const RECORD_SIZE_TEXT: &str = "\n## Bytes per record, by attribute set\n\n\
     What a backend that bills ingested bytes counts: OTLP log records as the exporter\n\
     encodes them (`--attributes minimal|default|full`), 512 to a request, gzip at the\n\
     transport's level, over 51,200 varied records (40 pods in 6 namespaces, 1-3\n\
     processes each, 300 destinations, random ephemeral ports, ids and pids), made by\n\
     `cargo test -p egress-collector --lib record_size` with\n\
     `EGRESS_RECORD_SIZE_OUT=bench/results/record-size.md`. Every record carries its\n\
     one-line body (about 80 bytes before compression) whatever the set; the resource\n\
     (pod, container, node) is sent once per pod per request and is included.\n";

/// CPU cores used against connects per second achieved, one line per observer.
pub fn plot(rows: &[Row], path: &Path) -> anyhow::Result<()> {
    let font = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")?;
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow::anyhow!("cannot load the DejaVu font"))?;
    let series: Vec<(Scenario, Vec<(f64, f64)>)> = [
        Scenario::Stdout,
        Scenario::Otlp,
        Scenario::Bpftrace,
        Scenario::Aggregated,
        Scenario::Filtered,
    ]
    .into_iter()
    .map(|s| {
        let mut points: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| r.scenario == s)
            .map(|r| (r.connects_per_second / 1000.0, r.cpu_cores))
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        (s, points)
    })
    .filter(|(_, p)| !p.is_empty())
    .collect();
    let max_x = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.0))
        .fold(1.0, f64::max);
    let max_y = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.1))
        .fold(0.1, f64::max);
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Observer CPU against connection rate", ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_x * 1.1, 0.0..max_y * 1.2)?;
    chart
        .configure_mesh()
        .x_desc("TCP connects per second (thousands)")
        .y_desc("CPU cores (user + sys)")
        .label_style(("sans-serif", 14))
        .draw()?;
    let colours = [RED, BLUE, BLACK, GREEN, MAGENTA];
    for ((scenario, points), colour) in series.into_iter().zip(colours) {
        chart
            .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))?
            .label(scenario.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
        chart.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 4, colour.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}
