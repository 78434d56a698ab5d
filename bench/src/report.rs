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

pub fn today() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// BENCHMARKS.md: generated, so every figure in it comes from the run it names.
/// `stats` says what run-time statistics were during the runs (`bpf_stats::provenance`).
pub fn document(table: &str, plot: &Path, command: &str, report: &Path, stats: &str) -> String {
    let base = report.parent().unwrap_or(Path::new(""));
    let plot = plot.strip_prefix(base).unwrap_or(plot).display();
    format!(
        "# Benchmarks\n\n\
         Generated by `egress-bench run` (see README, \"Benchmark\"); do not edit by hand.\n\n\
         - Machine: {}\n- Date: {}\n- Command: `{command}`\n- Run-time statistics: {stats}\n\n\
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
         its catch-up), from its CPU-time clock; *peak RSS* is VmHWM. bpftrace counts the same tracepoint\n\
         in a map and prints once at exit, so its user-space CPU is near zero by design; its\n\
         kernel cost shows in the overhead ratio. *Aggregated* runs the collector with\n\
         `--aggregate-window 1s`: the load's repeated connections (one process, 8\n\
         destinations) are counted in the kernel and each window's records carry the\n\
         count; what it saw is the sum of those counts, read line by line. *Loopback\n\
         excluded* runs it with `--exclude-loopback`: every connection of the load is\n\
         dropped in the kernel, and what it saw is its `filtered` count.\n\n\
         {table}\n![CPU against rate]({plot})\n",
        machine(),
        today(),
    )
}

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

/// Sections other commands (`cgroup-index`, `churn`) generate in the same file, between
/// `<!-- section:NAME -->` and `<!-- /section:NAME -->`: kept when `run` regenerates the
/// rest, replaced when their own command runs again.
fn section_bounds(name: &str) -> (String, String) {
    (
        format!("<!-- section:{name} -->"),
        format!("<!-- /section:{name} -->"),
    )
}

/// What `run` keeps of `old` when it regenerates the head: everything from the first
/// section on, verbatim, the other commands' sections and the hand-written notes between
/// them alike (the notes read those sections' figures; dropping them lost the record of
/// what each run showed).
pub fn after_head(old: &str) -> String {
    match old.find("<!-- section:") {
        Some(start) => format!("\n{}", &old[start..]),
        None => String::new(),
    }
}

/// Writes section `name` of the report at `path` (replacing it, or appending it).
pub fn put_section(path: &Path, name: &str, body: &str) -> anyhow::Result<()> {
    let (open, close) = section_bounds(name);
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let section = format!("{open}\n{}\n{close}", body.trim_end());
    let new = match (old.find(&open), old.find(&close)) {
        (Some(start), Some(end)) if end > start => {
            format!("{}{section}{}", &old[..start], &old[end + close.len()..])
        }
        _ => format!("{}\n{section}\n", old.trim_end()),
    };
    anyhow::Context::with_context(std::fs::write(path, new), || {
        format!("writing {}", path.display())
    })
}

/// Machine and date lines for a section's header.
pub fn provenance(command: &str) -> String {
    format!(
        "- Machine: {}\n- Date: {}\n- Command: `{command}`\n",
        machine(),
        today()
    )
}

#[cfg(test)]
mod section_tests {
    use super::*;

    #[test]
    fn sections_are_replaced_in_place_and_kept_across_regeneration() {
        let path = std::env::temp_dir().join(format!("egress-report-{}.md", std::process::id()));
        std::fs::write(&path, "# Benchmarks\n\ntable\n").expect("write");
        put_section(&path, "churn", "## Churn\n\nfirst\n").expect("put");
        put_section(&path, "cgroup-index", "## Index\n").expect("put");
        put_section(&path, "churn", "## Churn\n\nsecond\n").expect("put");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.starts_with("# Benchmarks\n\ntable\n"), "{text}");
        assert!(text.contains("second") && !text.contains("first"), "{text}");
        assert!(
            text.find("## Churn") < text.find("## Index"),
            "in place: {text}"
        );
        // A note written by hand between two sections.
        let text = text.replace(
            "<!-- section:cgroup-index -->",
            "### How to read the churn run\n\nby hand\n\n<!-- section:cgroup-index -->",
        );
        let regenerated = format!("# Benchmarks\n\nnew table\n{}", after_head(&text));
        assert!(regenerated.contains("second") && regenerated.contains("## Index"));
        assert!(
            !regenerated.contains("\ntable\n"),
            "the old head goes: {regenerated}"
        );
        assert!(
            regenerated.contains("### How to read the churn run\n\nby hand\n"),
            "the notes stay: {regenerated}"
        );
        assert_eq!(after_head(&regenerated), after_head(&text));
        let _ = std::fs::remove_file(&path);
    }
}
