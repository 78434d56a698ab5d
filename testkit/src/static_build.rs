//! Static (musl) release binaries for tests that run the collector outside this host's
//! userland: inside a qemu guest, or as the only file of a `FROM scratch` image.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

pub const MUSL: &str = "x86_64-unknown-linux-musl";

/// Builds `egress-collector` and the testkit's scenario binaries (`egress-scenario`,
/// `egress-attribution`, `egress-dns-vm`) statically; returns the directory holding
/// them. A target dir of its own: the outer `cargo test` holds the lock on the default one.
pub fn build(workspace: &Path, cargo: &str) -> Result<PathBuf, String> {
    build_bins(
        workspace,
        cargo,
        &["egress-collector", "egress-testkit"],
        &[
            "egress-collector",
            "egress-scenario",
            "egress-attribution",
            "egress-dns-vm",
        ],
    )
}

/// `egress-collector` and `egress-bench` statically, for the VM benchmark: the bench runs
/// its own `kernel-cost` inside the guest. Same directory as [`build`].
pub fn build_bench(workspace: &Path, cargo: &str) -> Result<PathBuf, String> {
    build_bins(
        workspace,
        cargo,
        &["egress-collector", "egress-bench"],
        &["egress-collector", "egress-bench"],
    )
}

fn build_bins(
    workspace: &Path,
    cargo: &str,
    packages: &[&str],
    bins: &[&str],
) -> Result<PathBuf, String> {
    let target_dir = workspace.join("target").join("vm");
    eprintln!("building static binaries into {}", target_dir.display());
    let mut command = Command::new(cargo);
    command
        .current_dir(workspace)
        .args(["build", "--release", "--target", MUSL]);
    for package in packages {
        command.args(["-p", package]);
    }
    for bin in bins {
        command.args(["--bin", bin]);
    }
    let output = command
        .arg("--target-dir")
        .arg(&target_dir)
        .output()
        .map_err(|e| format!("cannot run {cargo}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "static build failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(target_dir.join(MUSL).join("release"))
}
