//! Builds the eBPF programs of `agent-ebpf` for the BPF target (nightly + bpf-linker, see
//! `cargo xtask setup`) and leaves the object in OUT_DIR for `include_bytes_aligned!`.
//! `AYA_BUILD_SKIP=1` skips it, for machines without the eBPF toolchain: the pure-logic code
//! still builds and tests, and the agent says at start that it has no probes embedded.
fn main() -> anyhow::Result<()> {
    let skip = std::env::var("AYA_BUILD_SKIP")
        .map(|v| v == "1" || v.eq_ignore_ascii_case("true"))
        .unwrap_or(false);
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    println!("cargo::rustc-check-cfg=cfg(fanout_no_ebpf)");
    if skip {
        println!("cargo:rustc-cfg=fanout_no_ebpf");
    }
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir).join("../agent-ebpf");
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {ebpf_dir:?}"))?;
    // Also rebuild when the shared types change.
    println!("cargo:rerun-if-changed={manifest_dir}/../agent-common/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "agent-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}
