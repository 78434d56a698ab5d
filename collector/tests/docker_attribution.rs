//! Attribution against this machine's docker engine: containers started as kubelet
//! starts them, connecting out; the collector must name their pod from the files the
//! real dockerd wrote.

use std::{
    net::{Ipv4Addr, TcpListener},
    path::{Path, PathBuf},
    time::Duration,
};

use egress_testkit::{
    collector::RunningCollector,
    docker::{self, Container, Pod},
};
use serde_json::Value;

const COLLECTOR: &str = env!("CARGO_BIN_EXE_egress-collector");

fn require_root_and_docker() {
    // SAFETY: trivial getter.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "these tests load eBPF programs: run them as root"
    );
    docker::ensure_image().expect("the docker engine builds the offline test image");
}

/// A port on the host that accepts and at once closes every connection (busybox nc
/// waits for the peer to close).
fn listener() -> ((), u16) {
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("listen");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    ((), port)
}

fn to_port(records: &[Value], port: u16) -> Vec<&Value> {
    records
        .iter()
        .filter(|r| r["attributes"]["destination.port"] == port)
        .collect()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("hostname")
        .trim()
        .to_owned()
}

/// Every record names the pod and container; returns how many there were.
fn assert_attributed(records: &[&Value], pod: &Pod, container: &Container) {
    assert!(!records.is_empty(), "no record for pod {}", pod.name);
    for r in records {
        let resource = &r["resource"];
        let want = [
            ("k8s.pod.name", pod.name.as_str()),
            ("k8s.namespace.name", pod.namespace.as_str()),
            ("k8s.pod.uid", pod.uid.as_str()),
            ("k8s.container.name", pod.container.as_str()),
            ("container.id", container.id.as_str()),
            ("container.name", container.name.as_str()),
            ("container.runtime.name", "docker"),
            ("container.image.name", "egress-test/busybox"),
        ];
        for (key, value) in want {
            assert_eq!(
                resource[key], value,
                "{key} of a record from pod {}: {r}",
                pod.name
            );
        }
        assert_eq!(r["attributes"]["process.executable.name"], "nc", "{r}");
        assert_eq!(r["attributes"]["egress.event"], "tcp_connect", "{r}");
        // The line log views show, from the same attributes.
        let a = &r["attributes"];
        let body = format!(
            "{}/{} ({}) nc[{}] → {}:{} tcp established",
            pod.namespace,
            pod.name,
            pod.container,
            a["process.pid"],
            a["destination.address"].as_str().unwrap_or_default(),
            a["destination.port"]
        );
        assert_eq!(r["body"], body.as_str(), "{r}");
    }
}

#[test]
fn kubelet_style_containers_are_attributed_to_their_pods() {
    require_root_and_docker();
    let gateway = docker::bridge_gateway().expect("bridge gateway");
    let (_l1, burstable_port) = listener();
    let (_l2, guaranteed_port) = listener();
    let (_l3, host_net_port) = listener();
    let (_l4, blink_port) = listener();

    let burstable = Pod::new("shop", "prod", "web", Some("burstable"), 1);
    let guaranteed = Pod::new("db", "prod", "postgres", None, 2);
    let mut host_net = Pod::new("node-agent", "kube-system", "agent", Some("besteffort"), 3);
    host_net.host_network = true;
    let blink = Pod::new("blink", "batch", "job", Some("besteffort"), 4);

    let connect = |host: &str, port: u16, times: u32| {
        format!(
            "i=0; while [ $i -lt {times} ]; do echo x | nc -w 2 {host} {port}; i=$((i+1)); done"
        )
    };
    let containers = [
        // Stays a moment after connecting, so its cgroup still exists to be resolved.
        Container::create(
            &burstable,
            &format!("{}; sleep 1", connect(&gateway, burstable_port, 3)),
        ),
        Container::create(&guaranteed, &connect(&gateway, guaranteed_port, 1)),
        Container::create(&host_net, &connect("127.0.0.1", host_net_port, 1)),
        // Connects and exits at once: the process and its cgroup are gone long before
        // anyone could look at /proc.
        Container::create(&blink, &format!("echo x | nc -w 1 {gateway} {blink_port}")),
    ]
    .map(|c| c.expect("docker create"));

    // Every attribute: the checks below read the nodename and the cgroup path.
    let collector = RunningCollector::start(
        Path::new(COLLECTOR),
        &["--attributes", "full"],
        Duration::from_secs(60),
    )
    .expect("collector starts");
    for container in &containers {
        container.run_to_completion().expect("container runs");
    }
    let (records, _) = collector.stop_after_poll();

    let [c_burstable, c_guaranteed, c_host_net, c_blink] = &containers;
    let burstable_records = to_port(&records, burstable_port);
    assert_eq!(burstable_records.len(), 3, "three connects, three records");
    assert_attributed(&burstable_records, &burstable, c_burstable);
    assert_attributed(
        &to_port(&records, guaranteed_port),
        &guaranteed,
        c_guaranteed,
    );
    assert_attributed(&to_port(&records, blink_port), &blink, c_blink);

    // hostNetwork: the UTS nodename is the node's, yet the cgroup names the pod.
    let host_records = to_port(&records, host_net_port);
    assert_attributed(&host_records, &host_net, c_host_net);
    for r in &host_records {
        assert_eq!(r["attributes"]["egress.network.host"], true, "{r}");
        assert_eq!(r["attributes"]["egress.uts.nodename"], hostname(), "{r}");
    }
    let cgroup_path = format!("{}/{}", burstable.cgroup_parent(), c_burstable.id);
    for r in &burstable_records {
        assert_eq!(
            r["attributes"]["egress.cgroup.path"],
            cgroup_path.as_str(),
            "{r}"
        );
        assert_eq!(r["attributes"]["egress.network.host"], false, "{r}");
        assert_eq!(
            r["attributes"]["egress.uts.nodename"],
            &c_burstable.id[..12],
            "docker's hostname: {r}"
        );
    }
}

/// A copy of the host's tree with docker's data-root moved by daemon.json: the collector
/// must follow `data-root`, not assume /var/lib/docker.
struct MovedDataRoot {
    host_root: PathBuf,
}

impl MovedDataRoot {
    const DATA_ROOT: &'static str = "srv/moved-docker";

    fn new() -> Self {
        let host_root =
            std::env::temp_dir().join(format!("egress-host-root-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&host_root);
        std::fs::create_dir_all(host_root.join("etc/docker")).expect("host root");
        let daemon_json = format!("{{\"data-root\": \"/{}\", \"mtu\": 1400}}", Self::DATA_ROOT);
        std::fs::write(host_root.join("etc/docker/daemon.json"), daemon_json).expect("daemon.json");
        Self { host_root }
    }

    /// Copies the files the real dockerd wrote for `container` under the moved data-root.
    fn adopt(&self, container: &Container) {
        let from = container.files_dir(Path::new("/var/lib/docker"));
        let to = container.files_dir(&self.host_root.join(Self::DATA_ROOT));
        std::fs::create_dir_all(&to).expect("moved container dir");
        for file in ["config.v2.json", "hostconfig.json"] {
            std::fs::copy(from.join(file), to.join(file)).expect("copy dockerd's file");
        }
    }
}

impl Drop for MovedDataRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.host_root);
    }
}

#[test]
fn a_data_root_moved_by_daemon_json_is_followed_under_the_host_root() {
    require_root_and_docker();
    let gateway = docker::bridge_gateway().expect("bridge gateway");
    let (_listener, port) = listener();
    let pod = Pod::new("moved", "infra", "app", Some("burstable"), 5);
    // Waits until its files have been copied to the moved data-root, then connects.
    let container = Container::create(&pod, &format!("sleep 2; echo x | nc -w 2 {gateway} {port}"))
        .expect("docker create");
    let moved = MovedDataRoot::new();
    let host_root = moved.host_root.to_str().expect("utf-8 path").to_owned();
    let collector = RunningCollector::start(
        Path::new(COLLECTOR),
        &["--host-root", &host_root],
        Duration::from_secs(60),
    )
    .expect("collector starts");
    container.start().expect("docker start");
    moved.adopt(&container);
    container.wait().expect("docker wait");
    let (records, stderr) = collector.stop_after_poll();
    assert!(
        stderr.iter().any(|l| l.contains("/srv/moved-docker")),
        "the collector says which data-root it reads:\n{}",
        stderr.join("\n")
    );
    let to_container = to_port(&records, port);
    assert!(
        !to_container.is_empty(),
        "no record to port {port}; stderr:\n{}",
        stderr.join("\n")
    );
    assert_attributed(&to_container, &pod, &container);
}
