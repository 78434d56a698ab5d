//! The runtime image (scripts/image.sh: FROM scratch + the static binary) runs as the
//! DaemonSet runs it: started by runc, the OCI runtime under containerd and CRI-O, with the
//! DaemonSet's capabilities (BPF, PERFMON, nothing else), read-only root, not privileged,
//! and the same read-only host mounts under --host-root; it captures and attributes a
//! kubelet-style container's connections. (This machine's docker engine, 20.10, does not
//! know the BPF and PERFMON capability names, so runc is driven directly.)

mod support;

use std::{
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use egress_testkit::docker::{self, Container, Pod};
use serde_json::{Value, json};
use support::host::{ensure_tracefs, require_root, sink_port};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn sh(command: &str) -> String {
    let output = Command::new("sh")
        .args(["-c", command])
        .output()
        .expect("sh");
    assert!(
        output.status.success(),
        "{command}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// An OCI bundle from the image: its filesystem, and the DaemonSet's container as a spec.
fn bundle(dir: &Path) {
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(&rootfs).expect("rootfs");
    let created = sh("docker create egress-collector:latest");
    sh(&format!(
        "docker export {created} | tar -x -C '{}' && docker rm {created} >/dev/null",
        rootfs.display()
    ));
    for dir in [
        "sys/kernel/btf",
        "sys/kernel/tracing",
        "host",
        "proc",
        "sys",
        "dev",
        "tmp",
    ] {
        std::fs::create_dir_all(rootfs.join(dir)).expect("mount point");
    }
    sh(&format!("cd '{}' && runc spec", dir.display()));
    let path = dir.join("config.json");
    let mut spec: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("spec")).expect("JSON");
    let caps = json!(["CAP_BPF", "CAP_PERFMON"]);
    spec["process"]["terminal"] = json!(false);
    spec["process"]["args"] = json!([
        "/egress-collector",
        "run",
        "--stdout",
        "--host-root=/host",
        "--health-address=0.0.0.0:8686"
    ]);
    spec["process"]["noNewPrivileges"] = json!(true);
    spec["process"]["user"] = json!({"uid": 0, "gid": 0});
    spec["process"]["capabilities"] = json!({
        "bounding": caps, "effective": caps, "permitted": caps, "inheritable": [], "ambient": []
    });
    spec["root"]["readonly"] = json!(true);
    let bind = |source: &str, destination: &str| {
        json!({"source": source, "destination": destination, "type": "bind",
               "options": ["rbind", "ro", "nosuid", "nodev"]})
    };
    let mounts = spec["mounts"].as_array_mut().expect("mounts");
    for (source, destination) in [
        ("/sys/kernel/btf", "/sys/kernel/btf"),
        ("/sys/kernel/tracing", "/sys/kernel/tracing"),
        ("/sys/fs/cgroup", "/host/sys/fs/cgroup"),
        ("/proc", "/host/proc"),
        ("/etc/docker", "/host/etc/docker"),
        (
            "/var/lib/docker/containers",
            "/host/var/lib/docker/containers",
        ),
    ] {
        mounts.push(bind(source, destination));
    }
    std::fs::write(&path, serde_json::to_string_pretty(&spec).expect("JSON")).expect("write");
}

#[test]
fn the_image_captures_and_attributes_with_the_daemonsets_privileges() {
    require_root();
    ensure_tracefs();
    let release = egress_testkit::static_build::build(&workspace_root(), env!("CARGO"))
        .expect("static build");
    let image = Command::new(workspace_root().join("scripts/image.sh"))
        .arg("--binary")
        .arg(release.join("egress-collector"))
        .output()
        .expect("scripts/image.sh");
    assert!(
        image.status.success(),
        "image build: {}",
        String::from_utf8_lossy(&image.stderr)
    );
    let dir = std::env::temp_dir().join(format!("egress-bundle-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    bundle(&dir);

    docker::ensure_image().expect("test image");
    let gateway = docker::bridge_gateway().expect("gateway");
    let port = sink_port();
    let pod = Pod::new("imaged", "prod", "api", Some("burstable"), 61);
    let container = Container::create(
        &pod,
        &format!("nc -w 1 {gateway} {port} </dev/null; nc -w 1 {gateway} {port} </dev/null"),
    )
    .expect("create");

    let id = format!("egress-image-{}", std::process::id());
    let mut runc = Command::new("runc")
        .args(["run", "--bundle"])
        .arg(&dir)
        .arg(&id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runc run");
    let mut stdout = runc.stdout.take().expect("stdout");
    let stdout = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let (tx, lines) = mpsc::channel();
    let stderr = runc.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut log = Vec::new();
    while !log
        .iter()
        .any(|l: &String| l.contains("Capturing egress connections."))
    {
        match lines.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => log.push(line),
            Err(_) if Instant::now() < deadline && runc.try_wait().ok().flatten().is_none() => {}
            Err(_) => {
                let _ = Command::new("runc").args(["delete", "-f", &id]).status();
                panic!("the image did not become ready:\n{}", log.join("\n"));
            }
        }
    }
    let caps = sh(&format!(
        "grep CapEff /proc/$(runc state {id} | sed -n 's/.*\"pid\": *\\([0-9]*\\).*/\\1/p')/status"
    ));
    container.run_to_completion().expect("container runs");
    std::thread::sleep(Duration::from_millis(500));
    let _ = Command::new("runc").args(["kill", &id, "INT"]).status();
    let _ = runc.wait();
    let _ = Command::new("runc").args(["delete", "-f", &id]).status();
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = stdout.join().expect("stdout");
    log.extend(lines.try_iter());

    assert!(
        caps.ends_with("000000c000000000"),
        "the collector ran with CAP_BPF and CAP_PERFMON only: {caps}"
    );
    let records: Vec<Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|r: &Value| r["attributes"]["destination.port"] == port)
        .collect();
    assert_eq!(
        records.len(),
        2,
        "both connections; log:\n{}",
        log.join("\n")
    );
    for record in &records {
        assert_eq!(record["resource"]["k8s.pod.name"], pod.name.as_str());
        assert_eq!(record["resource"]["k8s.namespace.name"], "prod");
        assert_eq!(record["resource"]["container.id"], container.id.as_str());
    }
}
