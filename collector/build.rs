//! Builds `collector-ebpf` for the BPF target and leaves the object in OUT_DIR, where
//! `probe` embeds it: the collector ships as one file.
fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../collector-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "collector-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
