//! The attribution scenario, for the test VMs: real cgroups made as each runtime and
//! cgroup driver makes them in the unified hierarchy, the runtime's files at their real
//! paths (fixtures of their real shape), a real process in each cgroup connecting once;
//! the collector (host root `/`) must name each connection's pod. On a pure cgroup v2
//! guest the unified hierarchy is /sys/fs/cgroup; on a hybrid one (a v1 controller
//! mounted beside it, which the probes then read, and where every process stays in the
//! root) it is /sys/fs/cgroup/unified, and the collector must find the containers there.

use std::{
    net::{Ipv4Addr, TcpListener},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde_json::{Value, json};

use crate::collector::RunningCollector;

pub const CGROUP2: &str = "/sys/fs/cgroup";

/// One workload: where its cgroup is, what its runtime wrote, what the record must say.
struct Case {
    name: &'static str,
    /// Relative to the hierarchy's root.
    cgroup: String,
    /// Made before the collector starts (found by the first walk), or after it (found by
    /// the watcher or by name).
    before_start: bool,
    files: Vec<(String, String)>,
    want: Vec<(&'static str, String)>,
    port: u16,
}

fn id(seq: u32) -> String {
    format!("{seq:08x}{:056x}", 0xa77_u64)
}

fn uid(seq: u32) -> String {
    format!("{seq:08x}-a77a-4000-8000-00000000a77a")
}

fn systemd_pod_slice(qos: &str, uid: &str) -> String {
    format!(
        "/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{}.slice",
        uid.replace('-', "_")
    )
}

/// containerd CRI plugin's bundle config.json (annotation keys from pkg/cri/annotations),
/// with a secret-looking variable in its environment (which no output may carry).
pub fn containerd_bundle(pod: &str, namespace: &str, uid: &str, container: &str) -> String {
    json!({
        "ociVersion": "1.1.0",
        "process": {"args": ["/app"], "cwd": "/", "env": ["PATH=/bin", "API_TOKEN=s3cr3t"]},
        "hostname": pod,
        "annotations": {
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.container-name": container,
            "io.kubernetes.cri.image-name": "registry.example/app:1.0",
            "io.kubernetes.cri.sandbox-id": "5f0c1e0b0c0d4f9a8e2b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f",
            "io.kubernetes.cri.sandbox-name": pod,
            "io.kubernetes.cri.sandbox-namespace": namespace,
            "io.kubernetes.cri.sandbox-uid": uid
        },
        "linux": {"namespaces": [
            {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
            {"type": "network", "path": "/proc/4242/ns/net"}
        ]}
    })
    .to_string()
}

/// CRI-O's userdata/config.json (annotation keys from CRI-O's pkg/annotations).
pub fn crio_config(pod: &str, namespace: &str, uid: &str, container: &str) -> String {
    json!({
        "ociVersion": "1.0.2-dev",
        "hostname": pod,
        "annotations": {
            "io.kubernetes.pod.name": pod,
            "io.kubernetes.pod.namespace": namespace,
            "io.kubernetes.pod.uid": uid,
            "io.kubernetes.container.name": container,
            "io.kubernetes.cri-o.Name": format!("k8s_{container}_{pod}_{namespace}_{uid}_0"),
            "io.kubernetes.cri-o.ImageName": "registry.example/app:1.0",
            "io.kubernetes.cri-o.ContainerType": "container"
        },
        "linux": {"namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "mount"}]}
    })
    .to_string()
}

/// dockerd's config.v2.json for a kubelet (dockershim) container; trimmed.
pub fn docker_config(id: &str, pod: &str, namespace: &str, uid: &str, container: &str) -> String {
    json!({
        "ID": id,
        "Name": format!("/k8s_{container}_{pod}_{namespace}_{uid}_0"),
        "Config": {
            "Hostname": pod,
            "Image": "registry.example/app:1.0",
            "Env": ["PATH=/bin", "API_TOKEN=s3cr3t"],
            "Labels": {
                "io.kubernetes.pod.name": pod,
                "io.kubernetes.pod.namespace": namespace,
                "io.kubernetes.pod.uid": uid,
                "io.kubernetes.container.name": container
            }
        },
        "State": {"Running": true, "Pid": 4242}
    })
    .to_string()
}

fn want(
    pod: &str,
    namespace: &str,
    uid: &str,
    id: &str,
    runtime: &str,
) -> Vec<(&'static str, String)> {
    vec![
        ("k8s.pod.name", pod.to_owned()),
        ("k8s.namespace.name", namespace.to_owned()),
        ("k8s.pod.uid", uid.to_owned()),
        ("container.id", id.to_owned()),
        ("container.runtime.name", runtime.to_owned()),
    ]
}

fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    // containerd, systemd driver.
    let (i, u) = (id(1), uid(1));
    cases.push(Case {
        name: "containerd-systemd",
        cgroup: format!(
            "{}/cri-containerd-{i}.scope",
            systemd_pod_slice("burstable", &u)
        ),
        before_start: false,
        files: vec![(
            format!("/run/containerd/io.containerd.runtime.v2.task/k8s.io/{i}/config.json"),
            containerd_bundle("shop-1", "prod", &u, "web"),
        )],
        want: want("shop-1", "prod", &u, &i, "containerd"),
        port: 0,
    });
    // CRI-O, systemd driver.
    let (i, u) = (id(2), uid(2));
    cases.push(Case {
        name: "crio-systemd",
        cgroup: format!("{}/crio-{i}.scope", systemd_pod_slice("besteffort", &u)),
        before_start: false,
        files: vec![(
            format!("/run/containers/storage/overlay-containers/{i}/userdata/config.json"),
            crio_config("agent-2", "kube-system", &u, "agent"),
        )],
        want: want("agent-2", "kube-system", &u, &i, "cri-o"),
        port: 0,
    });
    // docker, cgroupfs driver (dockershim / cri-dockerd): made before the collector starts.
    let (i, u) = (id(3), uid(3));
    cases.push(Case {
        name: "docker-cgroupfs",
        cgroup: format!("/kubepods/besteffort/pod{u}/{i}"),
        before_start: true,
        files: vec![
            (
                format!("/var/lib/docker/containers/{i}/config.v2.json"),
                docker_config(&i, "db-3", "data", &u, "postgres"),
            ),
            (
                format!("/var/lib/docker/containers/{i}/hostconfig.json"),
                json!({"NetworkMode": "container:5f0c1e0b0c0d", "CgroupParent": format!("/kubepods/besteffort/pod{u}")}).to_string(),
            ),
        ],
        want: want("db-3", "data", &u, &i, "docker"),
        port: 0,
    });
    // k3s: its embedded containerd under /run/k3s/containerd, cgroupfs driver.
    let (i, u) = (id(4), uid(4));
    cases.push(Case {
        name: "k3s",
        cgroup: format!("/kubepods/burstable/pod{u}/{i}"),
        before_start: false,
        files: vec![(
            format!("/run/k3s/containerd/io.containerd.runtime.v2.task/k8s.io/{i}/config.json"),
            containerd_bundle("traefik-4", "kube-system", &u, "traefik"),
        )],
        want: want("traefik-4", "kube-system", &u, &i, "containerd"),
        port: 0,
    });
    // A container running its own init: the process is in a child of its cgroup.
    let (i, u) = (id(5), uid(5));
    cases.push(Case {
        name: "nested-init",
        cgroup: format!(
            "{}/cri-containerd-{i}.scope/init.scope",
            systemd_pod_slice("burstable", &u)
        ),
        before_start: false,
        files: vec![(
            format!("/run/containerd/io.containerd.runtime.v2.task/k8s.io/{i}/config.json"),
            containerd_bundle("systemd-5", "prod", &u, "os"),
        )],
        want: want("systemd-5", "prod", &u, &i, "containerd"),
        port: 0,
    });
    cases
}

fn write_file(path: &str, text: &str) -> Result<(), String> {
    let path = Path::new(path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    }
    std::fs::write(path, text).map_err(|e| format!("write {}: {e}", path.display()))
}

/// Makes `relative` under the hierarchy; returns the directories made, outermost first.
fn make_cgroup(hierarchy: &Path, relative: &str) -> Result<Vec<PathBuf>, String> {
    let mut made = Vec::new();
    let mut dir = hierarchy.to_owned();
    for component in relative.split('/').filter(|c| !c.is_empty()) {
        dir.push(component);
        if !dir.exists() {
            std::fs::create_dir(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
            made.push(dir.clone());
        }
    }
    Ok(made)
}

/// A listener that accepts and drops every connection.
fn listener() -> Result<u16, String> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| format!("listen: {e}"))?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    Ok(port)
}

/// `self --join <cgroup> --connect <port>` in a child process.
fn connect_from(this: &Path, cgroup: &Path, port: u16) -> Result<(), String> {
    let status = Command::new(this)
        .arg("--join")
        .arg(cgroup)
        .args(["--connect", &port.to_string()])
        .status()
        .map_err(|e| format!("cannot run {}: {e}", this.display()))?;
    if !status.success() {
        return Err(format!(
            "the connect from {} failed: {status}",
            cgroup.display()
        ));
    }
    Ok(())
}

/// The child's side: join the cgroup, then connect once.
pub fn join_and_connect(cgroup: &Path, port: u16) -> Result<(), String> {
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
        .map_err(|e| format!("joining {}: {e}", cgroup.display()))?;
    std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .map(drop)
        .map_err(|e| format!("connect to port {port}: {e}"))
}

/// Runs the scenario with the unified hierarchy mounted at `unified`; `Ok` holds one
/// line per case, `Err` every problem found.
pub fn run(
    this: &Path,
    collector: &Path,
    unified: &Path,
    extra_args: &[String],
) -> Result<Vec<String>, String> {
    if !unified.join("cgroup.controllers").exists() {
        return Err(format!("{} is not a cgroup2 mount", unified.display()));
    }
    let mut cases = cases();
    let mut made = Vec::new();
    for case in &mut cases {
        case.port = listener()?;
        for (path, text) in &case.files {
            write_file(path, text)?;
        }
        if case.before_start {
            made.extend(make_cgroup(unified, &case.cgroup)?);
        }
    }
    // The checks read egress.cgroup.path, a forensic attribute of the full set.
    let mut args = vec!["--stats-interval", "1h", "--attributes", "full"];
    args.extend(extra_args.iter().map(String::as_str));
    let collector = RunningCollector::start(collector, &args, Duration::from_secs(120))?;
    let mut problems = Vec::new();
    for case in &cases {
        if !case.before_start {
            made.extend(make_cgroup(unified, &case.cgroup)?);
        }
        let dir = unified.join(case.cgroup.trim_start_matches('/'));
        if let Err(e) = connect_from(this, &dir, case.port) {
            problems.push(format!("{}: {e}", case.name));
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let (ok, stdout, stderr) = collector.stop(Duration::from_secs(30))?;
    for dir in made.iter().rev() {
        let _ = std::fs::remove_dir(dir);
    }
    if !ok {
        problems.push(format!("the collector failed:\n{}", stderr.join("\n")));
    }
    let records: Vec<Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let mut lines = Vec::new();
    for case in &cases {
        let mine: Vec<&Value> = records
            .iter()
            .filter(|r| r["attributes"]["destination.port"] == case.port)
            .collect();
        let [record] = mine.as_slice() else {
            problems.push(format!(
                "{}: {} records to port {}, want 1",
                case.name,
                mine.len(),
                case.port
            ));
            continue;
        };
        let mut wrong = Vec::new();
        for (key, value) in &case.want {
            if record["resource"][key] != value.as_str() {
                wrong.push(format!(
                    "{key} is {}, want {value}",
                    record["resource"][key]
                ));
            }
        }
        if record["attributes"]["egress.cgroup.path"] != case.cgroup.as_str() {
            wrong.push(format!(
                "egress.cgroup.path is {}, want {}",
                record["attributes"]["egress.cgroup.path"], case.cgroup
            ));
        }
        if record.to_string().contains("s3cr3t") {
            wrong.push("the container's environment leaked into the record".into());
        }
        if wrong.is_empty() {
            lines.push(format!(
                "{}: {} in {}",
                case.name, record["resource"]["k8s.pod.name"], case.cgroup
            ));
        } else {
            problems.push(format!(
                "{}: {}\n  record: {record}",
                case.name,
                wrong.join("; ")
            ));
        }
    }
    if stdout.contains("s3cr3t") {
        problems.push("a container's environment appeared on stdout".into());
    }
    if problems.is_empty() {
        // What the collector detected (its "Capturing" line names the cgroup layout).
        let layout = stderr
            .iter()
            .find_map(|l| l.split("cgroups=").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or("unknown");
        lines.push(format!("collector cgroups={layout}"));
        Ok(lines)
    } else {
        Err(format!(
            "{}\ncollector stderr:\n  {}",
            problems.join("\n"),
            stderr.join("\n  ")
        ))
    }
}
