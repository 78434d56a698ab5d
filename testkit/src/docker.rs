//! Containers started the way kubelet starts them, on the machine's real docker engine,
//! from an image built offline (no registry is reachable from CI).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// The test image: a root filesystem holding only a static busybox.
pub const IMAGE: &str = "egress-test/busybox:latest";

fn docker(args: &[&str]) -> Result<String, String> {
    let output = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run docker: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "docker {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Builds the test image with `docker import` unless it exists (idempotent).
pub fn ensure_image() -> Result<(), String> {
    if docker(&["image", "inspect", IMAGE]).is_ok() {
        return Ok(());
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or("busybox-static is not installed (scripts/setup.sh installs it)")?;
    let rootfs = std::env::temp_dir().join(format!("egress-test-rootfs-{}", std::process::id()));
    let bin = rootfs.join("bin");
    std::fs::create_dir_all(&bin).map_err(|e| format!("{}: {e}", bin.display()))?;
    std::fs::copy(&busybox, bin.join("busybox")).map_err(|e| format!("copying busybox: {e}"))?;
    for applet in ["sh", "nc", "sleep", "echo", "cat", "wget"] {
        let _ = std::os::unix::fs::symlink("busybox", bin.join(applet));
    }
    let tar = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "tar -C '{}' -c . | docker import -c 'CMD [\"/bin/sh\"]' - {IMAGE}",
            rootfs.display()
        ))
        .output()
        .map_err(|e| format!("cannot run tar | docker import: {e}"))?;
    let _ = std::fs::remove_dir_all(&rootfs);
    if !tar.status.success() {
        return Err(format!(
            "docker import failed: {}",
            String::from_utf8_lossy(&tar.stderr)
        ));
    }
    Ok(())
}

/// The address containers on the default bridge reach the host at: the IPAM gateway, or
/// (older engines leave it empty) the subnet's first address, which dockerd gives docker0.
pub fn bridge_gateway() -> Result<String, String> {
    let gateway = docker(&[
        "network",
        "inspect",
        "bridge",
        "-f",
        "{{(index .IPAM.Config 0).Gateway}}",
    ])?;
    if !gateway.is_empty() {
        return Ok(gateway);
    }
    let subnet = docker(&[
        "network",
        "inspect",
        "bridge",
        "-f",
        "{{(index .IPAM.Config 0).Subnet}}",
    ])?;
    let network: std::net::Ipv4Addr = subnet
        .split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| format!("the bridge network's subnet {subnet:?} is not IPv4"))?;
    Ok(std::net::Ipv4Addr::from(u32::from(network) + 1).to_string())
}

/// A pod as kubelet describes it to docker.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub container: String,
    /// `/kubepods/<qos>/pod<uid>` or `/kubepods/pod<uid>` (Guaranteed).
    pub qos: Option<&'static str>,
    pub host_network: bool,
}

impl Pod {
    pub fn new(
        name: &str,
        namespace: &str,
        container: &str,
        qos: Option<&'static str>,
        seq: u32,
    ) -> Self {
        Self {
            name: format!("{name}-{}", std::process::id()),
            namespace: namespace.to_owned(),
            uid: format!(
                "{:08x}-{seq:04x}-4000-8000-{:012x}",
                std::process::id(),
                seq
            ),
            container: container.to_owned(),
            qos,
            host_network: false,
        }
    }

    pub fn cgroup_parent(&self) -> String {
        match self.qos {
            Some(qos) => format!("/kubepods/{qos}/pod{}", self.uid),
            None => format!("/kubepods/pod{}", self.uid),
        }
    }

    /// kubelet's (dockershim's) container name.
    pub fn docker_name(&self) -> String {
        format!(
            "k8s_{}_{}_{}_{}_0",
            self.container, self.name, self.namespace, self.uid
        )
    }
}

/// A created container; removed on drop.
pub struct Container {
    pub id: String,
    pub name: String,
}

impl Container {
    /// `docker create` with kubelet's labels and cgroup parent, running `script` in sh.
    pub fn create(pod: &Pod, script: &str) -> Result<Self, String> {
        let name = pod.docker_name();
        let labels = [
            format!("io.kubernetes.pod.name={}", pod.name),
            format!("io.kubernetes.pod.namespace={}", pod.namespace),
            format!("io.kubernetes.pod.uid={}", pod.uid),
            format!("io.kubernetes.container.name={}", pod.container),
        ];
        let cgroup_parent = pod.cgroup_parent();
        let mut args = vec!["create", "--name", &name, "--cgroup-parent", &cgroup_parent];
        for label in &labels {
            args.extend(["--label", label]);
        }
        if pod.host_network {
            // What kubelet does for hostNetwork pods: the host's network and UTS namespaces.
            args.extend(["--network", "host", "--uts", "host"]);
        }
        args.extend([IMAGE, "sh", "-c", script]);
        let _ = docker(&["rm", "-f", &name]);
        let id = docker(&args)?;
        Ok(Self { id, name })
    }

    /// Starts the container and waits for it to exit; returns its output.
    pub fn run_to_completion(&self) -> Result<String, String> {
        docker(&["start", "-a", &self.id])
    }

    pub fn start(&self) -> Result<(), String> {
        docker(&["start", &self.id]).map(|_| ())
    }

    pub fn wait(&self) -> Result<String, String> {
        docker(&["wait", &self.id])
    }

    /// The directory dockerd keeps this container's files in, under `data_root`.
    pub fn files_dir(&self, data_root: &Path) -> PathBuf {
        data_root.join("containers").join(&self.id)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.id]);
    }
}
