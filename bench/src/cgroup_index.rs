//! What a new cgroup costs the enrichment thread, with many cgroups present: before, one
//! walk of the whole hierarchy per unknown cgroup id (`walk_all`, the code the index ran
//! on a miss); now, one `stat` found by the cgroup's two names, or nothing at all once the
//! watcher thread has reported it. Real cgroups in this machine's hierarchy, the
//! collector's own index code.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context;
use egress_collector::{
    enrich::cgroup_index::{CgroupChange, CgroupPaths, walk_all},
    telemetry::enrich::EnrichTelemetry,
};
use serde::Serialize;

use crate::containers::hierarchy;

#[derive(Debug, Serialize)]
pub struct IndexReport {
    /// Cgroups in the hierarchy during the measurement (ours and the machine's).
    pub cgroups: usize,
    pub samples: usize,
    /// Before: one walk of the whole hierarchy (per unknown id), median and maximum.
    pub walk_median_us: f64,
    pub walk_max_us: f64,
    /// Now, on the enrichment thread: a new cgroup found by its names (one stat).
    pub lookup_median_us: f64,
    pub lookup_max_us: f64,
    /// Now, a known cgroup (after the watcher reported it).
    pub hit_median_us: f64,
    /// Now, on the watcher thread: from mkdir until the index has the new cgroup.
    pub watcher_latency_median_us: f64,
    pub watcher_latency_max_us: f64,
    /// The walk at start-up, once.
    pub initial_walk_us: f64,
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn median_max(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[v.len() - 1])
}

/// Cgroup directories made for the run, removed deepest first.
struct Made(Vec<PathBuf>);

impl Drop for Made {
    fn drop(&mut self) {
        for dir in self.0.iter().rev() {
            let _ = fs::remove_dir(dir);
        }
    }
}

pub fn measure(count: usize, samples: usize) -> anyhow::Result<IndexReport> {
    let root = hierarchy();
    let base = root.join(format!("egress-bench-index-{}", std::process::id()));
    let mut made = Made(Vec::new());
    let mkdir = |made: &mut Made, dir: PathBuf| -> anyhow::Result<PathBuf> {
        fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        made.0.push(dir.clone());
        Ok(dir)
    };
    let qos = mkdir(&mut made, base.clone())
        .and_then(|b| mkdir(&mut made, b.join("kubepods")))
        .and_then(|k| mkdir(&mut made, k.join("besteffort")))?;
    // Half pods, half their containers.
    let mut pods = Vec::new();
    for i in 0..count / 2 {
        let pod = mkdir(
            &mut made,
            qos.join(format!("pod{i:08x}-0000-4000-8000-000000000000")),
        )?;
        mkdir(&mut made, pod.join(format!("{i:064x}")))?;
        pods.push(pod);
    }
    let cgroups = walk_all(&root).len();

    let mut walks = Vec::new();
    for _ in 0..samples {
        let t = Instant::now();
        std::hint::black_box(walk_all(&root));
        walks.push(us(t.elapsed()));
    }

    // The lookup by names, alone: an index from one walk, no watcher.
    let mut index = CgroupPaths::new(Some(root.clone()), EnrichTelemetry::default());
    for (id, path) in walk_all(&root) {
        index.apply(CgroupChange::Added { id, path }, Instant::now());
    }
    let mut lookups = Vec::new();
    let mut hits = Vec::new();
    for s in 0..samples {
        let pod = &pods[s % pods.len()];
        let leaf = format!("{:064x}", 0xabc0_0000_u64 + s as u64);
        let dir = mkdir(&mut made, pod.join(&leaf))?;
        let id = fs::metadata(&dir)?.ino();
        let parent = pod.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let t = Instant::now();
        let found = index.resolve(id, &leaf, parent, Instant::now()).is_some();
        lookups.push(us(t.elapsed()));
        anyhow::ensure!(found, "the lookup by name missed {}", dir.display());
        let t = Instant::now();
        std::hint::black_box(index.resolve(id, &leaf, parent, Instant::now()));
        hits.push(us(t.elapsed()));
    }

    // The watcher: how soon a new cgroup is in the index without any lookup.
    let t = Instant::now();
    let mut watched = CgroupPaths::watch(Some(root.clone()), EnrichTelemetry::default());
    let initial_walk_us = us(t.elapsed());
    let mut latencies = Vec::new();
    for s in 0..samples {
        let pod = &pods[s % pods.len()];
        let dir = pod.join(format!("{:064x}", 0xdef0_0000_u64 + s as u64));
        let t = Instant::now();
        let dir = mkdir(&mut made, dir)?;
        let id = fs::metadata(&dir)?.ino();
        let deadline = t + Duration::from_secs(5);
        while watched.resolve_known(id, Instant::now()).is_none() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the watcher never reported {}",
                dir.display()
            );
            std::thread::yield_now();
        }
        latencies.push(us(t.elapsed()));
    }
    let (walk_median_us, walk_max_us) = median_max(walks);
    let (lookup_median_us, lookup_max_us) = median_max(lookups);
    let (hit_median_us, _) = median_max(hits);
    let (watcher_latency_median_us, watcher_latency_max_us) = median_max(latencies);
    Ok(IndexReport {
        cgroups,
        samples,
        walk_median_us,
        walk_max_us,
        lookup_median_us,
        lookup_max_us,
        hit_median_us,
        watcher_latency_median_us,
        watcher_latency_max_us,
        initial_walk_us,
    })
}

/// The BENCHMARKS.md section.
pub fn markdown(results: &[IndexReport], command: &str) -> String {
    let mut text = format!(
        "## A new cgroup, with many present\n\n\
         Generated by `egress-bench cgroup-index --report BENCHMARKS.md`.\n\n{}\n\
         Real cgroups made in this machine's cgroup hierarchy (the v1 memory one here):\n\
         half pods (`kubepods/besteffort/pod<uid>`), half containers in them. *Before*: an\n\
         unknown cgroup id made the enrichment thread walk the whole hierarchy (up to every\n\
         10 ms), one walk timed here. *Now*: a cgroup the watcher has not reported yet is\n\
         found by one `stat` of `<parent>/<leaf>` from the names the kernel sends; once\n\
         reported (watcher latency: from mkdir until the index has it, on the watcher\n\
         thread), resolving it is a hash lookup. Times in microseconds, {} samples each.\n\n\
         | cgroups | before: walk (median / max) | now: lookup by name (median / max) | now: known | watcher latency (median / max) | walk at start-up |\n\
         |---|---|---|---|---|---|\n",
        crate::report::provenance(command),
        results.first().map_or(0, |r| r.samples),
    );
    for r in results {
        text.push_str(&format!(
            "| {} | {:.0} / {:.0} | {:.1} / {:.1} | {:.2} | {:.0} / {:.0} | {:.0} |\n",
            r.cgroups,
            r.walk_median_us,
            r.walk_max_us,
            r.lookup_median_us,
            r.lookup_max_us,
            r.hit_median_us,
            r.watcher_latency_median_us,
            r.watcher_latency_max_us,
            r.initial_walk_us,
        ));
    }
    text
}
