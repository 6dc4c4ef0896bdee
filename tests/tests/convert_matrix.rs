//! Every supported source type converted to every target type (raw included): each
//! result compares identical to the source in `qemu-img compare`, and sparse results
//! pass `qemu-img check`. Half of the VMDK-to-VMDK conversions use vmware-vdiskmanager's
//! `-r SRC -t N DST` syntax, the rest the `convert` subcommand.

use std::path::Path;

use vdisk_interop::{
    assert_qemu_check_clean, assert_qemu_identical, path_str, pattern, tempdir, vdiskmanager,
    vdiskmanager_convert, MIB,
};

/// vdiskmanager `-t` numbers of every VMDK type we write.
const TYPES: [u32; 7] = [0, 1, 2, 3, 4, 5, 6];

fn make_source(path: &Path) {
    // 10 MiB + 3 sectors: data and zero runs, unaligned run ends, a partial last grain.
    let len = 10 * MIB as usize + 1536;
    let mut v = vec![0u8; len];
    let mut off = 0;
    let mut seed = 7;
    while off < len {
        let run = (200 * 1024 + 512).min(len - off);
        if seed % 2 == 1 {
            v[off..off + run].copy_from_slice(&pattern(seed, run));
        }
        off += run + 300 * 1024;
        seed += 1;
    }
    v[len - 512..].fill(0xa5);
    std::fs::write(path, v).unwrap();
}

#[test]
fn every_type_converts_to_every_type_identically() {
    let dir = tempdir();
    let raw = dir.path().join("source.raw");
    make_source(&raw);
    for s in TYPES {
        let src = dir.path().join(format!("src{s}.vmdk"));
        vdiskmanager_convert("raw", "vmdk", Some(s), &raw, &src);
        assert_qemu_identical(&raw, "raw", &src, "vmdk", &format!("raw -> type {s}"));
        // To raw.
        let out_raw = dir.path().join(format!("src{s}-to.raw"));
        vdiskmanager_convert("vmdk", "raw", None, &src, &out_raw);
        assert_qemu_identical(&raw, "raw", &out_raw, "raw", &format!("type {s} -> raw"));
        // To every VMDK type.
        for t in TYPES {
            let what = format!("type {s} -> type {t}");
            let dst = dir.path().join(format!("s{s}-t{t}.vmdk"));
            if (s + t) % 2 == 0 {
                vdiskmanager(&[
                    "-q",
                    "-r",
                    path_str(&src),
                    "-t",
                    &t.to_string(),
                    path_str(&dst),
                ]);
            } else {
                vdiskmanager_convert("vmdk", "vmdk", Some(t), &src, &dst);
            }
            assert_qemu_identical(&raw, "raw", &dst, "vmdk", &what);
            if matches!(t, 0 | 1 | 5) {
                assert_qemu_check_clean(&dst, &what);
            }
        }
    }
}
