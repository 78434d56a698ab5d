//! Builds `collector-ebpf` for the BPF target and leaves the object in OUT_DIR, where
//! `probe` embeds it: the collector ships as one file.
fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../collector-ebpf");
    // aya-build watches the programs' own directory only; the kernel/user contract they
    // compile against (`shared/`) must rebuild them too, or a changed layout would leave
    // an object built against the old one.
    println!(
        "cargo:rerun-if-changed={}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../shared")
    );
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "collector-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
