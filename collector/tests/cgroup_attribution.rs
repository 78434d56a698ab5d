//! Attribution through real cgroups on this (hybrid) host: cgroups made in the kernel's
//! own hierarchies, shaped as kubelet and the runtimes make them, a real process moved
//! into them that connects out, and the runtimes' files at their real paths under a host
//! root made for the test. Covers k3s's containerd, a configured containerd, CRI-O, a
//! process in a child cgroup of its container (also inside a real docker container), and
//! the unified hierarchy of a hybrid host.

use std::{
    io::Write,
    net::{Ipv4Addr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use egress_testkit::{
    attribution::{containerd_bundle, crio_config, docker_config},
    collector::RunningCollector,
    docker::{self, Container, Pod},
};
use serde_json::Value;

const COLLECTOR: &str = env!("CARGO_BIN_EXE_egress-collector");
const V1_MEMORY: &str = "/sys/fs/cgroup/memory";
const UNIFIED: &str = "/sys/fs/cgroup/unified";

fn require_root_and_hybrid_host() {
    // SAFETY: trivial getter.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "these tests load eBPF programs and make cgroups: run them as root"
    );
    for dir in [V1_MEMORY, UNIFIED] {
        assert!(
            Path::new(dir).join("cgroup.procs").exists(),
            "{dir} is not mounted: these tests need a hybrid cgroup host (v1 memory + unified)"
        );
    }
}

/// A 64-hex container id and a pod UID unique to this test process and `seq`.
fn ids(seq: u32) -> (String, String) {
    let pid = std::process::id();
    (
        format!("{pid:08x}{seq:08x}{:048x}", 0xe9_u64),
        format!("{pid:08x}-{seq:04x}-4000-8000-00000000e9e9"),
    )
}

/// A host root for the collector: the real /proc and /sys, and runtime files of our own.
struct HostRoot(PathBuf);

impl HostRoot {
    fn new(name: &str) -> Self {
        let root = std::env::temp_dir().join(format!("egress-cg-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("host root");
        std::os::unix::fs::symlink("/proc", root.join("proc")).expect("proc");
        std::os::unix::fs::symlink("/sys", root.join("sys")).expect("sys");
        Self(root)
    }

    fn write(&self, host_path: &str, text: &str) {
        let path = self.0.join(host_path.trim_start_matches('/'));
        std::fs::create_dir_all(path.parent().expect("parent")).expect("dirs");
        std::fs::write(&path, text).expect("write");
    }

    fn arg(&self) -> String {
        self.0.to_str().expect("utf-8").to_owned()
    }
}

impl Drop for HostRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Cgroup directories made by the test; removed (deepest first) when dropped.
#[derive(Default)]
struct Cgroups(Vec<PathBuf>);

impl Cgroups {
    /// Makes `relative` (and its missing parents) under `hierarchy`; returns the leaf.
    fn make(&mut self, hierarchy: &str, relative: &str) -> PathBuf {
        let mut dir = PathBuf::from(hierarchy);
        for component in relative.split('/').filter(|c| !c.is_empty()) {
            dir.push(component);
            if !dir.exists() {
                std::fs::create_dir(&dir)
                    .unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
                self.0.push(dir.clone());
            }
        }
        dir
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for dir in self.0.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// A listener that accepts and drops every connection; its port.
fn listener() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("listen");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    port
}

/// A real process that waits to be placed in cgroups, then connects once.
struct Connector(Child);

impl Connector {
    fn spawn(port: u16) -> Self {
        let child = Command::new("bash")
            .arg("-c")
            .arg(format!("read go && exec 3<>/dev/tcp/127.0.0.1/{port}"))
            .stdin(Stdio::piped())
            .spawn()
            .expect("bash");
        Self(child)
    }

    fn join(&self, cgroup: &Path) {
        std::fs::write(cgroup.join("cgroup.procs"), self.0.id().to_string())
            .unwrap_or_else(|e| panic!("moving into {}: {e}", cgroup.display()));
    }

    /// Connects and waits for the process to exit (it leaves its cgroups empty).
    fn connect(mut self) {
        let mut stdin = self.0.stdin.take().expect("stdin");
        stdin.write_all(b"go\n").expect("go");
        drop(stdin);
        let status = self.0.wait().expect("wait");
        assert!(status.success(), "the connect failed: {status}");
    }
}

/// With the full attribute set: the checks read egress.cgroup.path.
fn start_collector(args: &[&str]) -> RunningCollector {
    let mut args = args.to_vec();
    args.extend(["--attributes", "full"]);
    RunningCollector::start(Path::new(COLLECTOR), &args, Duration::from_secs(60))
        .expect("collector starts")
}

/// Stops the collector; the records to `port`.
fn records_to(collector: RunningCollector, port: u16) -> (Vec<Value>, Vec<String>) {
    let (records, stderr) = collector.stop_after_poll();
    let records = records
        .into_iter()
        .filter(|r| r["attributes"]["destination.port"] == port)
        .collect();
    (records, stderr)
}

/// Exactly one record to the port, with these resource attributes and this cgroup path.
fn assert_one_attributed(
    records: &[Value],
    stderr: &[String],
    want: &[(&str, &str)],
    cgroup_path: &str,
) {
    assert_eq!(
        records.len(),
        1,
        "one connect, one record: {records:?}\nstderr:\n{}",
        stderr.join("\n")
    );
    let r = &records[0];
    for (key, value) in want {
        assert_eq!(r["resource"][key], *value, "{key}: {r}");
    }
    assert_eq!(r["attributes"]["egress.cgroup.path"], cgroup_path, "{r}");
    assert_eq!(r["attributes"]["process.executable.name"], "bash", "{r}");
}

#[test]
fn a_k3s_pod_running_its_own_init_is_attributed_without_configuration() {
    require_root_and_hybrid_host();
    let (id, uid) = ids(1);
    let root = HostRoot::new("k3s");
    root.write(
        &format!("/run/k3s/containerd/io.containerd.runtime.v2.task/k8s.io/{id}/config.json"),
        &containerd_bundle("traefik-7d9f", "kube-system", &uid, "traefik"),
    );
    let port = listener();
    let collector = start_collector(&["--host-root", &root.arg()]);
    // Pod, container and child cgroups all made after the collector's first walk, as
    // kubelet's systemd driver names them.
    let slice = format!(
        "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
        uid.replace('-', "_")
    );
    let path = format!("{slice}/cri-containerd-{id}.scope/init.scope");
    let mut cgroups = Cgroups::default();
    let cgroup = cgroups.make(V1_MEMORY, &path);
    let connector = Connector::spawn(port);
    connector.join(&cgroup);
    connector.connect();
    let (records, stderr) = records_to(collector, port);
    assert_one_attributed(
        &records,
        &stderr,
        &[
            ("k8s.pod.name", "traefik-7d9f"),
            ("k8s.namespace.name", "kube-system"),
            ("k8s.pod.uid", uid.as_str()),
            ("k8s.container.name", "traefik"),
            ("container.id", id.as_str()),
            ("container.runtime.name", "containerd"),
        ],
        &path,
    );
}

#[test]
fn runtime_locations_from_the_config_file_are_followed() {
    require_root_and_hybrid_host();
    let (id, uid) = ids(2);
    let root = HostRoot::new("configured");
    root.write(
        &format!("/opt/distro/containerd/io.containerd.runtime.v2.task/tenant/{id}/config.json"),
        &containerd_bundle("billing-0", "finance", &uid, "api"),
    );
    let config = root.0.join("egress.toml");
    std::fs::write(
        &config,
        "[enrich]\ncontainerd_state_dirs = [\"/opt/distro/containerd\"]\n\
         containerd_namespaces = [\"tenant\"]\ncontainer_cache_size = 16\n",
    )
    .expect("config");
    let port = listener();
    // cgroupfs driver: the pod directory exists before the collector starts.
    let pod_dir = format!("/kubepods/besteffort/pod{uid}");
    let mut cgroups = Cgroups::default();
    cgroups.make(V1_MEMORY, &pod_dir);
    let collector = start_collector(&[
        "--host-root",
        &root.arg(),
        "--config",
        config.to_str().expect("utf-8"),
    ]);
    let path = format!("{pod_dir}/{id}");
    let cgroup = cgroups.make(V1_MEMORY, &path);
    let connector = Connector::spawn(port);
    connector.join(&cgroup);
    connector.connect();
    let (records, stderr) = records_to(collector, port);
    assert!(
        stderr
            .iter()
            .any(|l| l.contains("/opt/distro/containerd/io.containerd.runtime.v2.task")),
        "the collector says where it reads containerd's files:\n{}",
        stderr.join("\n")
    );
    assert_one_attributed(
        &records,
        &stderr,
        &[
            ("k8s.pod.name", "billing-0"),
            ("k8s.namespace.name", "finance"),
            ("k8s.container.name", "api"),
            ("container.id", id.as_str()),
        ],
        &path,
    );
}

#[test]
fn on_a_hybrid_host_the_unified_cgroup_names_the_container_when_the_v1_one_does_not() {
    require_root_and_hybrid_host();
    let (id, uid) = ids(3);
    let root = HostRoot::new("hybrid");
    root.write(
        &format!("/run/containers/storage/overlay-containers/{id}/userdata/config.json"),
        &crio_config("web-5c8d", "shop", &uid, "nginx"),
    );
    let port = listener();
    let collector = start_collector(&["--host-root", &root.arg()]);
    let mut cgroups = Cgroups::default();
    // v1 (the hierarchy the probes read here): a cgroup that names no container.
    let plain = cgroups.make(V1_MEMORY, &format!("/egress-plain-{}", std::process::id()));
    // Unified: CRI-O's systemd-driver scope.
    let path = format!(
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/crio-{id}.scope",
        uid.replace('-', "_")
    );
    let unified = cgroups.make(UNIFIED, &path);
    let connector = Connector::spawn(port);
    connector.join(&plain);
    connector.join(&unified);
    connector.connect();
    let (records, stderr) = records_to(collector, port);
    assert_one_attributed(
        &records,
        &stderr,
        &[
            ("k8s.pod.name", "web-5c8d"),
            ("k8s.namespace.name", "shop"),
            ("k8s.pod.uid", uid.as_str()),
            ("container.id", id.as_str()),
            ("container.runtime.name", "cri-o"),
        ],
        &path,
    );
    assert_eq!(
        records[0]["attributes"]["egress.cgroup.leaf.name"],
        format!("egress-plain-{}", std::process::id()),
        "the probes read the v1 hierarchy"
    );
}

#[test]
fn a_process_in_a_child_cgroup_of_a_docker_container_is_attributed_to_its_pod() {
    require_root_and_hybrid_host();
    docker::ensure_image().expect("the docker engine builds the offline test image");
    let gateway = docker::bridge_gateway().expect("bridge gateway");
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("listen");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    let pod = Pod::new("systemd-app", "prod", "app", Some("burstable"), 40);
    // Waits until the test has moved it into a child cgroup, then connects.
    let container = Container::create(
        &pod,
        &format!("while [ ! -e /go ]; do sleep 0.1; done; echo x | nc -w 2 {gateway} {port}"),
    )
    .expect("docker create");
    let collector = start_collector(&[]);
    container.start().expect("docker start");
    let pid = Command::new("docker")
        .args(["inspect", "-f", "{{.State.Pid}}", &container.id])
        .output()
        .expect("docker inspect");
    let pid = String::from_utf8_lossy(&pid.stdout).trim().to_owned();
    let path = format!("{}/{}/init.scope", pod.cgroup_parent(), container.id);
    let child = PathBuf::from(V1_MEMORY).join(path.trim_start_matches('/'));
    std::fs::create_dir(&child).expect("child cgroup in the container's");
    std::fs::write(child.join("cgroup.procs"), &pid).expect("move the container's shell");
    let go = Command::new("docker")
        .args(["exec", &container.id, "sh", "-c", ": > /go"])
        .status()
        .expect("docker exec");
    assert!(go.success());
    container.wait().expect("docker wait");
    let _ = std::fs::remove_dir(&child);
    let (records, stderr) = records_to(collector, port);
    assert_eq!(
        records.len(),
        1,
        "{records:?}\nstderr:\n{}",
        stderr.join("\n")
    );
    let r = &records[0];
    for (key, value) in [
        ("k8s.pod.name", pod.name.as_str()),
        ("k8s.namespace.name", "prod"),
        ("k8s.pod.uid", pod.uid.as_str()),
        ("container.id", container.id.as_str()),
        ("container.runtime.name", "docker"),
    ] {
        assert_eq!(r["resource"][key], value, "{key}: {r}");
    }
    assert_eq!(r["attributes"]["egress.cgroup.path"], path.as_str(), "{r}");
    assert_eq!(
        r["attributes"]["egress.cgroup.leaf.name"], "init.scope",
        "{r}"
    );
}

#[test]
fn an_excluded_namespace_found_through_the_unified_tree_does_not_silence_its_v1_neighbours() {
    require_root_and_hybrid_host();
    let root = HostRoot::new("hybrid-exclude");
    let (excluded_id, excluded_uid) = ids(5);
    let (kept_id, kept_uid) = ids(6);
    for (id, uid, pod, namespace) in [
        (&excluded_id, &excluded_uid, "coredns-1", "kube-system"),
        (&kept_id, &kept_uid, "web-1", "shop"),
    ] {
        root.write(
            &format!("/run/containerd/io.containerd.runtime.v2.task/k8s.io/{id}/config.json"),
            &containerd_bundle(pod, namespace, uid, "c"),
        );
    }
    let port = listener();
    let collector = start_collector(&[
        "--host-root",
        &root.arg(),
        "--exclude-namespace",
        "kube-system",
    ]);
    let mut cgroups = Cgroups::default();
    // Both containers share one v1 cgroup that names neither.
    let shared = cgroups.make(V1_MEMORY, &format!("/egress-shared-{}", std::process::id()));
    let scope = |uid: &str, id: &str| {
        format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{id}.scope",
            uid.replace('-', "_")
        )
    };
    let excluded = cgroups.make(UNIFIED, &scope(&excluded_uid, &excluded_id));
    let kept_path = scope(&kept_uid, &kept_id);
    let kept = cgroups.make(UNIFIED, &kept_path);
    // The excluded one first: were its v1 cgroup handed to the kernel, the other's
    // connection would be dropped there.
    for (cgroup, times) in [(&excluded, 2), (&kept, 1)] {
        for _ in 0..times {
            let connector = Connector::spawn(port);
            connector.join(&shared);
            connector.join(cgroup);
            connector.connect();
        }
        // Time for the collector to see the excluded record (and act on it).
        std::thread::sleep(Duration::from_secs(1));
    }
    let (records, stderr) = records_to(collector, port);
    assert_one_attributed(
        &records,
        &stderr,
        &[
            ("k8s.pod.name", "web-1"),
            ("k8s.namespace.name", "shop"),
            ("container.id", kept_id.as_str()),
        ],
        &kept_path,
    );
}

/// Inode numbers of the inotify watches this process holds on the filesystem of device
/// `dev` (fdinfo lists each watch with its inode and its superblock's device, in the
/// kernel's encoding).
fn watched_inodes(dev: u64) -> Vec<u64> {
    let (major, minor) = (libc::major(dev) as u64, libc::minor(dev) as u64);
    let sdev = format!("sdev:{:x}", (major << 20) | minor);
    let Ok(fds) = std::fs::read_dir("/proc/self/fdinfo") else {
        return Vec::new();
    };
    let mut inodes = Vec::new();
    for info in fds
        .flatten()
        .filter_map(|fd| std::fs::read_to_string(fd.path()).ok())
    {
        for line in info.lines().filter(|l| l.starts_with("inotify wd:")) {
            let fields: Vec<&str> = line.split(' ').collect();
            if fields.contains(&sdev.as_str())
                && let Some(ino) = fields.iter().find_map(|f| f.strip_prefix("ino:"))
                && let Ok(ino) = u64::from_str_radix(ino, 16)
            {
                inodes.push(ino);
            }
        }
    }
    inodes
}

#[test]
fn removed_cgroups_leave_no_inotify_watch_behind() {
    use std::{os::unix::fs::MetadataExt, time::Instant};

    use egress_collector::{enrich::cgroup_index::CgroupPaths, telemetry::enrich::EnrichTelemetry};

    require_root_and_hybrid_host();
    let dev = std::fs::metadata(V1_MEMORY).expect("stat").dev();
    let mut paths = CgroupPaths::watch(Some(PathBuf::from(V1_MEMORY)), EnrichTelemetry::default());
    let root_ino = std::fs::metadata(V1_MEMORY).expect("stat").ino();
    assert!(
        watched_inodes(dev).contains(&root_ino),
        "the hierarchy is watched"
    );
    let mut cgroups = Cgroups::default();
    let base = format!("/egress-watch-{}", std::process::id());
    let mut ours = Vec::new();
    for i in 0..50 {
        let dir = cgroups.make(V1_MEMORY, &format!("{base}/c{i}"));
        ours.push(std::fs::metadata(&dir).expect("stat").ino());
    }
    let last = *ours.last().expect("made");
    let deadline = Instant::now() + Duration::from_secs(10);
    while paths.resolve_known(last, Instant::now()).is_none() {
        assert!(
            Instant::now() < deadline,
            "the watcher never reported the new cgroups"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let ours_watched = |inodes: &[u64]| ours.iter().filter(|i| inodes.contains(i)).count();
    assert_eq!(
        ours_watched(&watched_inodes(dev)),
        50,
        "one watch per new cgroup"
    );
    // cgroupfs sends no IN_IGNORED on rmdir: the watcher must drop each watch itself.
    drop(cgroups);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = ours_watched(&watched_inodes(dev));
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} watches left behind by removed cgroups"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Removed from the index too (kept for the grace time, then swept).
    paths.apply_changes(Instant::now());
    paths.sweep(
        Instant::now() + Duration::from_secs(61),
        Duration::from_secs(60),
    );
    assert_eq!(paths.resolve_known(last, Instant::now()), None);
}

/// A container that connects and is gone (its files and cgroups removed, as containerd
/// removes an exited task's bundle) before its record reaches enrichment, held back here
/// by the `EGRESS_TEST_SLOW` hook, is still attributed to its pod: its files were read as
/// its directory appeared.
#[test]
fn a_container_gone_before_its_record_is_enriched_is_still_attributed_to_its_pod() {
    require_root_and_hybrid_host();
    let (id, uid) = ids(40);
    let host = HostRoot::new("gone");
    host.write(
        "/etc/docker/daemon.json",
        r#"{"data-root": "/docker-data"}"#,
    );
    let containers = host.0.join("docker-data/containers");
    std::fs::create_dir_all(&containers).expect("containers dir");
    let port = listener();
    let root = host.arg();
    let collector = RunningCollector::start_wrapped(
        &["env", "EGRESS_TEST_SLOW=enrich:1"],
        Path::new(COLLECTOR),
        // Every batch on the machine is held (other tests' too): time to drain them all.
        &[
            "--stdout",
            "--host-root",
            &root,
            "--attributes",
            "full",
            "--shutdown-deadline",
            "300s",
        ],
        Duration::from_secs(60),
    )
    .expect("collector starts");
    // As dockerd does: the directory first, its files a moment later.
    let files = containers.join(&id);
    std::fs::create_dir(&files).expect("container dir");
    std::thread::sleep(Duration::from_millis(50));
    std::fs::write(
        files.join("config.v2.json"),
        docker_config(&id, "short-job-x1", "batch", &uid, "job"),
    )
    .expect("config.v2.json");
    // The runtime starts the container (runc alone takes longer than this).
    std::thread::sleep(Duration::from_millis(150));
    let mut cgroups = Cgroups::default();
    let leaf = cgroups.make(V1_MEMORY, &format!("kubepods/besteffort/pod{uid}/{id}"));
    let connector = Connector::spawn(port);
    connector.join(&leaf);
    connector.connect();
    // Gone at once: well before the held-back record is enriched.
    std::fs::remove_dir_all(&files).expect("remove the container's files");
    drop(cgroups);
    std::thread::sleep(Duration::from_secs(2));
    let (ok, stdout, stderr) = collector
        .stop(Duration::from_secs(330))
        .expect("collector stops");
    assert!(ok, "collector failed:\n{}", stderr.join("\n"));
    let records: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("every stdout line is JSON"))
        .filter(|r| r["attributes"]["destination.port"] == port)
        .collect();
    assert_eq!(records.len(), 1, "{records:?}\n{}", stderr.join("\n"));
    let resource = &records[0]["resource"];
    assert_eq!(resource["container.id"], id.as_str(), "{resource}");
    assert_eq!(
        resource["k8s.pod.name"],
        "short-job-x1",
        "{resource}\n{}",
        stderr.join("\n")
    );
    assert_eq!(resource["k8s.namespace.name"], "batch", "{resource}");
}
