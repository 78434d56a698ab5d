//! `scripts/fuzz.sh` must fail when no fuzz target ran: run the real script in a copy of
//! the tree whose fuzz crate has no targets, then one where `cargo fuzz list` itself fails.

use std::{path::Path, process::Command};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/fuzz.sh");

/// A tree with `scripts/fuzz.sh` and a fuzz crate without targets; `with_project` adds
/// the crate the fuzz directory belongs to (without it `cargo fuzz list` fails).
fn tree(name: &str, with_project: bool) -> std::path::PathBuf {
    let root = std::env::temp_dir().join(format!("egress-fuzz-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("scripts")).expect("dir");
    std::fs::create_dir_all(root.join("fuzz/fuzz_targets")).expect("dir");
    std::fs::copy(SCRIPT, root.join("scripts/fuzz.sh")).expect("copy the script");
    std::fs::write(
        root.join("fuzz/Cargo.toml"),
        "[package]\nname = \"empty-fuzz\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\
         publish = false\n\n[package.metadata]\ncargo-fuzz = true\n\n[workspace]\n",
    )
    .expect("write");
    if with_project {
        std::fs::create_dir_all(root.join("src")).expect("dir");
        std::fs::write(root.join("src/lib.rs"), "").expect("write");
        std::fs::write(
            root.join("Cargo.toml"),
            "[package]\nname = \"empty\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\n\
             [workspace]\nexclude = [\"fuzz\"]\n",
        )
        .expect("write");
    }
    root
}

fn run(root: &Path) -> (bool, String) {
    let output = Command::new("bash")
        .arg(root.join("scripts/fuzz.sh"))
        .arg("1")
        .output()
        .expect("bash");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn fuzz_sh_fails_when_no_fuzz_target_ran() {
    let empty = tree("empty", true);
    let (ok, stderr) = run(&empty);
    assert!(!ok, "no target, yet success:\n{stderr}");
    assert!(stderr.contains("no fuzz target ran"), "{stderr}");

    let broken = tree("broken", false);
    let (ok, stderr) = run(&broken);
    assert!(!ok, "cargo fuzz list failed, yet success:\n{stderr}");
    for root in [empty, broken] {
        let _ = std::fs::remove_dir_all(root);
    }
}
