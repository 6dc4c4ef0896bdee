//! Builds the log-callback trampoline, sets the SONAME clients expect, and generates
//! `vixDiskLib.h` from the Rust declarations into `OUT_DIR` (a test compares it with
//! the committed `include/vixDiskLib.h`).

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=csrc/trampoline.c");
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    cc::Build::new()
        .file("csrc/trampoline.c")
        .warnings(true)
        .compile("vdisk_ffi_trampoline");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libvixDiskLib.so.8");

    let dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("vixDiskLib.h");
    let config =
        cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml is valid");
    cbindgen::Builder::new()
        .with_crate(&dir)
        .with_config(config)
        .generate()
        .expect("vixDiskLib.h can be generated")
        .write_to_file(&out);
}
