//! `include/vixDiskLib.h` must be exactly what cbindgen generates from the crate
//! (regenerate with `UPDATE_HEADER=1 cargo test -p vdisk-ffi --test header`), and it
//! must compile as strict C99 and as C++.

use std::path::PathBuf;
use std::process::Command;

const GENERATED: &str = include_str!(concat!(env!("OUT_DIR"), "/vixDiskLib.h"));

fn committed() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../include/vixDiskLib.h")
}

#[test]
fn committed_header_is_current() {
    let path = committed();
    if std::env::var_os("UPDATE_HEADER").is_some() {
        std::fs::write(&path, GENERATED).expect("write include/vixDiskLib.h");
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == GENERATED,
        "include/vixDiskLib.h is stale: regenerate it with `UPDATE_HEADER=1 cargo test -p vdisk-ffi --test header` and commit it"
    );
}

fn compile(compiler: &str, args: &[&str]) {
    let dir = tempfile::tempdir().expect("temp dir");
    let src = dir.path().join("use_header.c");
    std::fs::write(
        &src,
        "#include \"vixDiskLib.h\"\n\
         int main(void) {\n\
           VixDiskLibConnectParams p;\n\
           VixDiskLibInfo *info = 0;\n\
           (void)p; (void)info;\n\
           return (int)VIX_ERROR_CODE(VIX_OK) + (VIX_SUCCEEDED(VIX_OK) ? 0 : 1);\n\
         }\n",
    )
    .expect("write test source");
    let include = committed()
        .parent()
        .map(PathBuf::from)
        .expect("include dir");
    let out = Command::new(compiler)
        .args(args)
        .arg("-I")
        .arg(&include)
        .arg("-fsyntax-only")
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {compiler} (install gcc/g++): {e}"));
    assert!(
        out.status.success(),
        "{compiler} rejects the header:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn header_compiles_as_strict_c99() {
    compile(
        "gcc",
        &["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic"],
    );
}

#[test]
fn header_compiles_as_cxx() {
    compile("g++", &["-x", "c++", "-Wall", "-Wextra", "-Werror"]);
}
