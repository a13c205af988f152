//! Builds the kernel programs (`probe-ebpf`) with aya-build; the binary embeds the object.
//!
//! Needs the nightly toolchain with `rust-src` and `bpf-linker` (installed by `scripts/setup.sh`).
//! `AYA_BUILD_SKIP=1` skips the kernel build: the binary then runs everything but `--source ebpf`.

use std::path::PathBuf;

fn main() -> aya_build::Result<()> {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = out.join("tcplake-probe");
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../probe-ebpf");
    let skip =
        std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        // An empty object: the loader reports that this build has no kernel programs.
        std::fs::write(&object, [])?;
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        return Ok(());
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "probe-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
