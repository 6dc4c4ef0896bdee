//! `include/vixMntapi.h` must be exactly what cbindgen generates from the crate
//! (regenerate with `UPDATE_HEADER=1 cargo test -p vdisk-mntapi --test header`), and
//! it must compile (with `include/vixDiskLib.h`, which it includes) as strict C99
//! and as C++.

use std::path::PathBuf;
use std::process::Command;

const GENERATED: &str = include_str!(concat!(env!("OUT_DIR"), "/vixMntapi.h"));

fn include_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../include")
}

#[test]
fn committed_header_is_current() {
    let path = include_dir().join("vixMntapi.h");
    if std::env::var_os("UPDATE_HEADER").is_some() {
        std::fs::write(&path, GENERATED).expect("write include/vixMntapi.h");
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == GENERATED,
        "include/vixMntapi.h is stale: regenerate it with `UPDATE_HEADER=1 cargo test -p vdisk-mntapi --test header` and commit it"
    );
}

fn compile(compiler: &str, args: &[&str]) {
    let dir = tempfile::tempdir().expect("temp dir");
    let src = dir.path().join("use_header.c");
    std::fs::write(
        &src,
        "#include \"vixMntapi.h\"\n\
         int main(void) {\n\
           VixOsInfo os;\n\
           VixVolumeInfo *vol = 0;\n\
           VixDiskSetInfo set;\n\
           VixDiskSetHandle h = 0;\n\
           VixVolumeHandle v = 0;\n\
           (void)os; (void)vol; (void)set; (void)h; (void)v;\n\
           return (int)VIX_ERROR_CODE(VIX_E_MNTAPI_VOLUME_ALREADY_MOUNTED) == 24305 &&\n\
                  VIXMNTAPI_MAJOR_VERSION == 1 ? 0 : 1;\n\
         }\n",
    )
    .expect("write test source");
    let out = Command::new(compiler)
        .args(args)
        .arg("-I")
        .arg(include_dir())
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
