//! Embeds the eBPF object built by `cargo xtask build` when it exists. Without it (a plain
//! `cargo build` or `cargo clippy` on a machine without the bpf toolchain) vigil still builds,
//! and says at run time that it has no kernel programs and how to build them.
use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(vigil_ebpf)");
    println!("cargo:rerun-if-env-changed=VIGIL_EBPF_OBJECT");
    let object = std::env::var_os("VIGIL_EBPF_OBJECT").map_or_else(
        || {
            let manifest =
                PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
            manifest.join("../target/bpfel-unknown-none/release/vigil-ebpf")
        },
        PathBuf::from,
    );
    println!("cargo:rerun-if-changed={}", object.display());
    if object.is_file() {
        println!("cargo:rustc-cfg=vigil_ebpf");
        println!(
            "cargo:rustc-env=VIGIL_EBPF_OBJECT_PATH={}",
            object.display()
        );
    }
}
