//! Builds the log-callback trampoline (shared with vdisk-ffi), sets the SONAME
//! clients expect, and generates `vixMntapi.h` from the Rust declarations into
//! `OUT_DIR` (a test compares it with the committed `include/vixMntapi.h`).

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=../csrc/trampoline.c");
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    cc::Build::new()
        .file("../csrc/trampoline.c")
        .warnings(true)
        .compile("vdisk_mntapi_trampoline");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libvixMntapi.so.1");

    let dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("vixMntapi.h");
    let config =
        cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml is valid");
    cbindgen::Builder::new()
        .with_crate(&dir)
        .with_config(config)
        .generate()
        .expect("vixMntapi.h can be generated")
        .write_to_file(&out);
}
