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
    let target_dir = workspace.join("target").join("vm");
    eprintln!("building static binaries into {}", target_dir.display());
    let output = Command::new(cargo)
        .current_dir(workspace)
        .args(["build", "--release", "--target", MUSL])
        .args(["-p", "egress-collector", "-p", "egress-testkit"])
        .args(["--bin", "egress-collector", "--bin", "egress-scenario"])
        .args(["--bin", "egress-attribution", "--bin", "egress-dns-vm"])
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
