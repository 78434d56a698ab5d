//! Memory with many containers known: N kubelet-style containers, each a real cgroup
//! (`kubepods/besteffort/pod<uid>/<id>`) with docker's `config.v2.json` under a host root
//! made for the run. One process hops through the cgroups and connects once from each, so
//! the collector resolves and caches N containers; then its peak and current RSS are read.

use std::{
    fs,
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::tool::{self, Observer};

#[derive(Debug, Serialize)]
pub struct ContainersReport {
    pub containers: usize,
    pub attributed: usize,
    pub peak_rss_bytes: u64,
    pub rss_bytes: u64,
}

/// The hierarchy whose leaf names the collector reads: a v1 controller's on hybrid hosts.
pub fn hierarchy() -> PathBuf {
    let unified = Path::new("/sys/fs/cgroup");
    if unified.join("cgroup.controllers").exists() {
        unified.to_owned()
    } else {
        unified.join("memory")
    }
}

fn id(i: usize) -> String {
    format!("{:064x}", 0x000e_9e55_0000_u64 + i as u64)
}

fn uid(i: usize) -> String {
    format!("e9e55000-{i:04x}-4000-8000-000000000000")
}

fn config_v2(i: usize) -> String {
    serde_json::json!({
        "ID": id(i),
        "Name": format!("/k8s_app_bench-{i}_bench_{}_0", uid(i)),
        "Config": {
            "Image": "registry.example/bench/app:1.0",
            "Labels": {
                "io.kubernetes.pod.name": format!("bench-{i}"),
                "io.kubernetes.pod.namespace": "bench",
                "io.kubernetes.pod.uid": uid(i),
                "io.kubernetes.container.name": "app",
            }
        },
        "HostConfig": { "NetworkMode": "bridge" }
    })
    .to_string()
}

struct Fixture {
    host_root: PathBuf,
    cgroups: Vec<PathBuf>,
    pod_dirs: Vec<PathBuf>,
}

impl Fixture {
    fn create(n: usize) -> anyhow::Result<Self> {
        let host_root =
            std::env::temp_dir().join(format!("egress-bench-host-{}", std::process::id()));
        let containers = host_root.join("docker-data/containers");
        fs::create_dir_all(host_root.join("etc/docker"))?;
        fs::write(
            host_root.join("etc/docker/daemon.json"),
            r#"{"data-root": "/docker-data"}"#,
        )?;
        fs::create_dir_all(host_root.join("sys/fs"))?;
        std::os::unix::fs::symlink("/sys/fs/cgroup", host_root.join("sys/fs/cgroup"))?;
        std::os::unix::fs::symlink("/proc", host_root.join("proc"))?;
        let base = hierarchy().join("kubepods/besteffort");
        let mut fixture = Self {
            host_root,
            cgroups: Vec::new(),
            pod_dirs: Vec::new(),
        };
        for i in 0..n {
            let dir = containers.join(id(i));
            fs::create_dir_all(&dir)?;
            fs::write(dir.join("config.v2.json"), config_v2(i))?;
            let pod = base.join(format!("pod{}", uid(i)));
            let cgroup = pod.join(id(i));
            fs::create_dir_all(&cgroup).with_context(|| format!("mkdir {}", cgroup.display()))?;
            fixture.pod_dirs.push(pod);
            fixture.cgroups.push(cgroup);
        }
        Ok(fixture)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for dir in self.cgroups.iter().chain(&self.pod_dirs) {
            let _ = fs::remove_dir(dir);
        }
        let _ = fs::remove_dir_all(&self.host_root);
    }
}

/// `egress-bench hop`: joins each cgroup listed in `list` in turn and connects once.
pub fn hop(list: &Path, port: u16) -> anyhow::Result<()> {
    let pid = std::process::id().to_string();
    for cgroup in fs::read_to_string(list)?.lines() {
        fs::write(Path::new(cgroup).join("cgroup.procs"), &pid)
            .with_context(|| format!("joining {cgroup}"))?;
        drop(TcpStream::connect((Ipv4Addr::LOCALHOST, port))?);
    }
    // Back to the root so the cgroups can be removed.
    fs::write(hierarchy().join("cgroup.procs"), &pid)?;
    Ok(())
}

pub fn measure(bench: &Path, collector: &Path, n: usize) -> anyhow::Result<ContainersReport> {
    let fixture = Fixture::create(n)?;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    let observer = Observer::collector(
        collector,
        &[
            "--stdout".into(),
            "--host-root".into(),
            fixture.host_root.display().to_string(),
        ],
        true,
    )?;
    let list = fixture.host_root.join("cgroups.txt");
    let lines: Vec<String> = fixture
        .cgroups
        .iter()
        .map(|c| c.display().to_string())
        .collect();
    fs::write(&list, lines.join("\n"))?;
    let status = Command::new(bench)
        .args([
            "hop",
            "--list",
            &list.display().to_string(),
            "--port",
            &port.to_string(),
        ])
        .status()?;
    if !status.success() {
        bail!("hopping through the cgroups failed");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while observer.seen_to(port) < n as u64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let (peak_rss_bytes, rss_bytes) = (
        tool::peak_rss_bytes(observer.pid()),
        tool::rss_bytes(observer.pid()),
    );
    let attributed = observer.pods_seen();
    observer.stop()?;
    Ok(ContainersReport {
        containers: n,
        attributed,
        peak_rss_bytes,
        rss_bytes,
    })
}
