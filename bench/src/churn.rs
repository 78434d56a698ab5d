//! Churn soak: many short-lived containers, each a real cgroup
//! (`kubepods/besteffort/pod<uid>/<id>`) with docker's `config.v2.json` under a host root
//! made for the run, created, connected from once, and removed after a short lifetime,
//! at a steady pace. The collector must attribute every connection to its pod, lose
//! nothing, and hold its memory flat once removed containers start being forgotten.

use std::{
    collections::VecDeque,
    fs,
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::{
    containers::hierarchy,
    tool::{self, Observer},
};

#[derive(Debug, Serialize)]
pub struct ChurnReport {
    pub containers: usize,
    pub seconds: f64,
    /// How long each container lived (its files and cgroup), seconds.
    pub lifetime_seconds: f64,
    pub connects_reported: u64,
    /// Distinct pods named by the records.
    pub pods_attributed: usize,
    /// The collector's warnings that a container's runtime files could not be read (one
    /// per container), to tell a late read from a lost record when pods are missing.
    pub metadata_warnings: Vec<String>,
    /// The collector's own count of lost events: all traffic on the machine, not only
    /// the run's.
    pub lost: u64,
    /// (containers created so far, collector RSS bytes), sampled along the run.
    pub rss: Vec<(usize, u64)>,
    /// Workloads holding an `egress.connections` metric series, from each statistics
    /// line (every 5 s; the collector exports OTLP metrics every 5 s to a local receiver).
    pub metric_workloads: Vec<u64>,
    /// RSS once the first removed containers have been forgotten (warm-up), at the end,
    /// and the largest after warm-up.
    pub rss_after_warmup_bytes: u64,
    pub rss_end_bytes: u64,
    pub rss_max_after_warmup_bytes: u64,
}

/// Ids unique to this run (its pid), so two runs on one machine never share a cgroup.
fn id(i: usize) -> String {
    format!(
        "{:08x}{:056x}",
        std::process::id(),
        0x00c4_0000_0000_u64 + i as u64
    )
}

fn uid(i: usize) -> String {
    format!(
        "{:08x}-{:04x}-4000-8000-{:012x}",
        std::process::id(),
        (i >> 16) & 0xffff,
        i & 0xffff
    )
}

fn config_v2(i: usize) -> String {
    serde_json::json!({
        "ID": id(i),
        "Name": format!("/k8s_app_churn-{i}_churn_{}_0", uid(i)),
        "Config": {
            "Image": "registry.example/churn/app:1.0",
            "Labels": {
                "io.kubernetes.pod.name": format!("churn-{i}"),
                "io.kubernetes.pod.namespace": "churn",
                "io.kubernetes.pod.uid": uid(i),
                "io.kubernetes.container.name": "app",
            }
        }
    })
    .to_string()
}

/// The host root: the real /proc and cgroup tree, docker's data-root of our own.
struct HostRoot(PathBuf);

impl HostRoot {
    fn create() -> anyhow::Result<Self> {
        let root = std::env::temp_dir().join(format!("egress-churn-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("etc/docker"))?;
        fs::write(
            root.join("etc/docker/daemon.json"),
            r#"{"data-root": "/docker-data"}"#,
        )?;
        fs::create_dir_all(root.join("docker-data/containers"))?;
        fs::create_dir_all(root.join("sys/fs"))?;
        std::os::unix::fs::symlink("/sys/fs/cgroup", root.join("sys/fs/cgroup"))?;
        std::os::unix::fs::symlink("/proc", root.join("proc"))?;
        Ok(Self(root))
    }
}

impl Drop for HostRoot {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// One live container: its files and cgroups.
struct Live {
    born: Instant,
    files: PathBuf,
    cgroup: PathBuf,
    pod: PathBuf,
}

impl Live {
    fn remove(self) {
        let _ = fs::remove_dir(&self.cgroup);
        let _ = fs::remove_dir(&self.pod);
        let _ = fs::remove_dir_all(&self.files);
    }
}

/// `egress-bench hop-stdin`: for each cgroup path on stdin, join it, connect once, go
/// back to the root, and say `ok`.
pub fn hop_stdin(port: u16) -> anyhow::Result<()> {
    let pid = std::process::id().to_string();
    let root = hierarchy().join("cgroup.procs");
    let mut out = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines() {
        let cgroup = line?;
        fs::write(Path::new(&cgroup).join("cgroup.procs"), &pid)
            .with_context(|| format!("joining {cgroup}"))?;
        drop(TcpStream::connect((Ipv4Addr::LOCALHOST, port))?);
        fs::write(&root, &pid)?;
        writeln!(out, "ok")?;
        out.flush()?;
    }
    Ok(())
}

pub fn run(
    bench: &Path,
    collector: &Path,
    containers: usize,
    seconds: f64,
    lifetime: Duration,
) -> anyhow::Result<ChurnReport> {
    let host = HostRoot::create()?;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    // OTLP (logs and metrics, to a receiver in this process) and stdout (counted here).
    let runtime = crate::runtime()?;
    let otlp = runtime.block_on(crate::receiver::start())?;
    let observer = Observer::collector(
        collector,
        &[
            "--stdout".into(),
            "--host-root".into(),
            host.0.display().to_string(),
            "--otlp-endpoint".into(),
            format!("http://{}", otlp.address),
            "--export-interval".into(),
            "5s".into(),
            "--stats-interval".into(),
            "5s".into(),
        ],
        true,
    )?;
    let mut hopper = Command::new(bench)
        .args(["hop-stdin", "--port", &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the hopper")?;
    let mut to_hopper = hopper.stdin.take().context("hopper stdin")?;
    let mut acks = BufReader::new(hopper.stdout.take().context("hopper stdout")?).lines();

    let base = hierarchy().join("kubepods/besteffort");
    fs::create_dir_all(&base).with_context(|| format!("mkdir {}", base.display()))?;
    let containers_dir = host.0.join("docker-data/containers");
    let started = Instant::now();
    let pace = Duration::from_secs_f64(seconds / containers.max(1) as f64);
    let sample_every = (containers / 100).max(1);
    let mut live: VecDeque<Live> = VecDeque::new();
    let mut rss = Vec::new();
    let result = (|| -> anyhow::Result<()> {
        for i in 0..containers {
            if let Some(wait) = (started + pace * i as u32).checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            while live.front().is_some_and(|c| c.born.elapsed() >= lifetime) {
                if let Some(c) = live.pop_front() {
                    c.remove();
                }
            }
            let files = containers_dir.join(id(i));
            fs::create_dir_all(&files)?;
            fs::write(files.join("config.v2.json"), config_v2(i))?;
            let pod = base.join(format!("pod{}", uid(i)));
            let cgroup = pod.join(id(i));
            fs::create_dir_all(&cgroup).with_context(|| format!("mkdir {}", cgroup.display()))?;
            writeln!(to_hopper, "{}", cgroup.display())?;
            to_hopper.flush()?;
            match acks.next() {
                Some(Ok(line)) if line == "ok" => {}
                other => bail!("the hopper failed at container {i}: {other:?}"),
            }
            live.push_back(Live {
                born: Instant::now(),
                files,
                cgroup,
                pod,
            });
            if i % sample_every == 0 {
                rss.push((i, tool::rss_bytes(observer.pid())));
            }
        }
        Ok(())
    })();
    drop(to_hopper);
    let _ = hopper.wait();
    // The last ones live out their lifetime too, then go.
    std::thread::sleep(lifetime);
    for c in live.drain(..) {
        c.remove();
    }
    let _ = fs::remove_dir(&base);
    result?;
    let elapsed = started.elapsed().as_secs_f64();
    // Both: a foreign connect to the same port number can make the count reach ours
    // before our last record is read, which then looked like a pod not attributed.
    let deadline = Instant::now() + Duration::from_secs(60);
    while (observer.seen_to(port) < containers as u64 || observer.pods_seen() < containers)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    rss.push((containers, tool::rss_bytes(observer.pid())));
    let connects_reported = observer.seen_to(port);
    let pods_attributed = observer.pods_seen();
    let (lines, _) = observer.stop()?;
    drop(runtime);
    let lost = tool::stopped_field(&lines, "lost").context("no lost= in the Stopped. line")?;
    let metadata_warnings = lines
        .iter()
        .filter(|l| l.contains("No pod metadata"))
        .cloned()
        .collect();
    let metric_workloads: Vec<u64> = lines
        .iter()
        .filter(|l| l.contains("Collector statistics."))
        .filter_map(|l| {
            let at = l.find("metric_workloads=")? + "metric_workloads=".len();
            let digits: String = l[at..].chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect();
    // Warm-up: until the first removed containers are past the grace time (60 s) and a
    // sweep (10 s) ran, or a fifth of the run, whichever is later.
    let per_second = containers as f64 / seconds.max(1e-3);
    let warm = ((per_second * 75.0) as usize).max(containers / 5);
    let after: Vec<u64> = rss
        .iter()
        .filter(|(i, _)| *i >= warm)
        .map(|(_, r)| *r)
        .collect();
    Ok(ChurnReport {
        containers,
        seconds: elapsed,
        lifetime_seconds: lifetime.as_secs_f64(),
        connects_reported,
        pods_attributed,
        metadata_warnings,
        lost,
        rss_after_warmup_bytes: after.first().copied().unwrap_or(0),
        rss_end_bytes: rss.last().map_or(0, |(_, r)| *r),
        rss_max_after_warmup_bytes: after.iter().copied().max().unwrap_or(0),
        rss,
        metric_workloads,
    })
}

/// The BENCHMARKS.md section.
pub fn markdown(r: &ChurnReport, command: &str) -> String {
    let mib = |b: u64| b as f64 / 1048576.0;
    let samples: Vec<String> = r
        .rss
        .iter()
        .step_by((r.rss.len() / 10).max(1))
        .map(|(i, b)| format!("{i}: {:.1}", mib(*b)))
        .collect();
    format!(
        "## Container churn\n\n\
         Generated by `egress-bench churn --report BENCHMARKS.md`.\n\n{}\n\
         {} short-lived containers over {:.0} s, each a real cgroup\n\
         (`kubepods/besteffort/pod<uid>/<id>` in the v1 memory hierarchy here) with docker's\n\
         `config.v2.json`, one connect from inside it, removed {:.0} s after it was made. The\n\
         collector forgets a removed container after its grace time (60 s).\n\n\
         | containers | connects reported | pods attributed | lost (all traffic on the machine) | RSS after warm-up MiB | max after warm-up MiB | RSS at end MiB |\n\
         |---|---|---|---|---|---|---|\n\
         | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} |\n\n\
         RSS along the run (containers made: MiB): {}\n\n\
         Workloads holding a metric series (OTLP metrics exported every 5 s; one value per\n\
         statistics line, every 5 s; lines that report losses elsewhere on the machine\n\
         carry none): {}\n",
        crate::report::provenance(command),
        r.containers,
        r.seconds,
        r.lifetime_seconds,
        r.containers,
        r.connects_reported,
        r.pods_attributed,
        r.lost,
        mib(r.rss_after_warmup_bytes),
        mib(r.rss_max_after_warmup_bytes),
        mib(r.rss_end_bytes),
        samples.join(", "),
        series_summary(&r.metric_workloads),
    )
}

/// Min / median / max after the first fifth, and a few values along the run.
fn series_summary(values: &[u64]) -> String {
    if values.is_empty() {
        return "no statistics line".into();
    }
    let mut steady: Vec<u64> = values[values.len() / 5..].to_vec();
    steady.sort_unstable();
    let along: Vec<String> = values
        .iter()
        .step_by((values.len() / 12).max(1))
        .map(u64::to_string)
        .collect();
    format!(
        "after warm-up min {} / median {} / max {} ({} lines); along the run: {}",
        steady.first().copied().unwrap_or(0),
        steady[steady.len() / 2],
        steady.last().copied().unwrap_or(0),
        values.len(),
        along.join(", ")
    )
}

/// Every container's connection reported and attributed to its pod (a record naming
/// each of the run's pods). The count per destination port may include a foreign
/// process's connect to the same port number on a shared machine, so it bounds ours
/// from above; the collector's `lost` counts all traffic on the machine (other
/// processes' floods included), so it is reported, not checked.
pub fn check(r: &ChurnReport) -> anyhow::Result<()> {
    if r.connects_reported < r.containers as u64 || r.pods_attributed != r.containers {
        bail!(
            "churn: {} containers, {} connects reported, {} pods attributed; the collector's metadata warnings: {:?}",
            r.containers,
            r.connects_reported,
            r.pods_attributed,
            r.metadata_warnings
        );
    }
    Ok(())
}
