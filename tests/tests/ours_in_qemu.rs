//! Disks written by `vdiskmanager` (convert from raw, create) must open and read
//! identically in qemu-img, qemu-io and libvmdk's `vmdkinfo`, and what qemu-io
//! writes into them must read back identically through the library.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vdisk_interop::{
    assert_ours_equals_raw_file, assert_same_bytes, path_str, pattern, qemu_info, qemu_io_write,
    qemu_raw, qemu_raw_to, read_all_ours, read_ours_at, run, stdout_text, tempdir, vdiskmanager,
    vdiskmanager_convert, KIB, MIB,
};

/// 72 MiB plus a tail that is not a multiple of the 64 KiB grain.
const SOURCE_LEN: u64 = 75_497_472 + 4096;

/// The data regions of the raw source: `(offset, length, seed)`. Everything else is
/// zero (so there are zero runs of whole grains and of partial grains).
const SOURCE_DATA: &[(u64, u64, u64)] = &[
    // First MiB full of data.
    (0, MIB, 1),
    // A small run not aligned to sectors or grains.
    (MIB + 1536 + 7, 1000, 2),
    // 2..8 MiB stay zero. A run starting and ending inside grains.
    (8 * MIB + 100, MIB + 200, 3),
    // One non-zero byte in the last byte of a grain.
    (20 * MIB + 64 * KIB - 1, 1, 4),
    // Across the boundary of the first grain table (512 grains = 32 MiB).
    (32 * MIB - 700, 1400, 5),
    // The end of the disk, including the odd tail and the last sector.
    (SOURCE_LEN - 200 * KIB, 200 * KIB, 6),
];

/// Writes the patterned raw source and returns its bytes.
fn make_source(path: &Path) -> Vec<u8> {
    let mut bytes = vec![0u8; SOURCE_LEN as usize];
    for &(off, len, seed) in SOURCE_DATA {
        bytes[off as usize..(off + len) as usize].copy_from_slice(&pattern(seed, len as usize));
    }
    let f = File::create(path).expect("create source");
    f.set_len(SOURCE_LEN).expect("size source");
    for &(off, len, _) in SOURCE_DATA {
        f.write_all_at(&bytes[off as usize..(off + len) as usize], off)
            .expect("write source");
    }
    assert_ne!(
        bytes[SOURCE_LEN as usize - 1],
        0,
        "last byte must hold data"
    );
    bytes
}

fn is_sparse_type(t: u32) -> bool {
    matches!(t, 0 | 1 | 5)
}

/// Converts a raw source into type `t` with vdiskmanager and checks the result with
/// qemu-img check / compare / info, vmdkinfo and a read back to raw.
fn raw_converted_to_type_opens_identically_in_qemu(t: u32) {
    let dir = tempdir();
    let src = dir.path().join("source.raw");
    let dst = dir.path().join("ours.vmdk");
    let back = dir.path().join("back.raw");
    let source = make_source(&src);

    vdiskmanager_convert("raw", "vmdk", Some(t), &src, &dst);

    if is_sparse_type(t) {
        vdisk_interop::assert_qemu_check_clean(&dst, &format!("type {t}"));
    }
    vdisk_interop::assert_qemu_identical(&src, "raw", &dst, "vmdk", &format!("type {t}"));

    run("vmdkinfo", &[path_str(&dst)]);

    let ours_map = vdisk_interop::vdiskmanager_data_ranges(&dst);
    assert_eq!(
        ours_map,
        vdisk_interop::qemu_data_ranges(&dst),
        "type {t}: data ranges of vdiskmanager map (left) and qemu-img map (right)"
    );
    if is_sparse_type(t) {
        // Only grains holding non-zero data were written.
        assert!(
            ours_map.iter().map(|r| r.1).sum::<u64>() < 8 * MIB,
            "type {t}: {ours_map:?}"
        );
    }

    let info = qemu_info(&dst);
    assert_eq!(info["format"], "vmdk", "qemu-img info of type {t}: {info}");
    assert_eq!(
        info["virtual-size"].as_u64(),
        Some(SOURCE_LEN),
        "qemu-img info virtual size of type {t}: {info}"
    );

    vdiskmanager_convert("vmdk", "raw", None, &dst, &back);
    let read_back = std::fs::read(&back).expect("read back");
    assert_same_bytes(
        &format!("type {t}: vdiskmanager convert back to raw"),
        &read_back,
        &source,
    );
}

#[test]
fn raw_converted_to_stream_optimized_reads_identical_in_qemu() {
    raw_converted_to_type_opens_identically_in_qemu(5);
}

#[test]
fn created_empty_stream_optimized_disk_checks_clean_in_qemu() {
    let dir = tempdir();
    let disk = dir.path().join("e.vmdk");
    vdiskmanager(&["-c", "-q", "-s", "64MB", "-t", "5", path_str(&disk)]);
    let out = run("qemu-img", &["check", "-f", "vmdk", path_str(&disk)]);
    assert!(
        stdout_text(&out).contains("No errors were found"),
        "{}",
        stdout_text(&out)
    );
    run("vmdkinfo", &[path_str(&disk)]);
    assert_eq!(qemu_info(&disk)["virtual-size"].as_u64(), Some(64 * MIB));
    assert_same_bytes(
        "empty stream",
        &qemu_raw(&disk),
        &vec![0u8; (64 * MIB) as usize],
    );
    assert_same_bytes(
        "empty stream (ours)",
        &read_all_ours(&disk),
        &vec![0u8; (64 * MIB) as usize],
    );
}

#[test]
fn raw_converted_to_monolithic_sparse_reads_identical_in_qemu() {
    raw_converted_to_type_opens_identically_in_qemu(0);
}

#[test]
fn raw_converted_to_two_gb_sparse_reads_identical_in_qemu() {
    raw_converted_to_type_opens_identically_in_qemu(1);
}

#[test]
fn raw_converted_to_monolithic_flat_reads_identical_in_qemu() {
    raw_converted_to_type_opens_identically_in_qemu(2);
}

#[test]
fn raw_converted_to_two_gb_flat_reads_identical_in_qemu() {
    raw_converted_to_type_opens_identically_in_qemu(3);
}

#[test]
fn raw_converted_to_vmfs_reads_identical_in_qemu() {
    raw_converted_to_type_opens_identically_in_qemu(4);
}

#[test]
fn raw_converted_to_vmfs_thin_reads_identical_in_qemu() {
    raw_converted_to_type_opens_identically_in_qemu(6);
}

/// qemu-io writes: `(pattern byte, offset, length)`; pattern 0 means `write -z`.
fn qemu_io_writes(capacity: u64) -> Vec<(u8, u64, u64)> {
    vec![
        (0x11, 0, 64 * KIB),
        (0x22, 3 * 512, 7 * 512),
        // Across a grain boundary, unaligned to grains.
        (0x33, 5 * 64 * KIB - 1024, 2048),
        // Across the first grain table's 32 MiB boundary.
        (0x44, 32 * MIB - 4096, 8192),
        // A zero write over data written above (inside one grain) and a whole grain.
        (0, 4 * 512, 512),
        (0, 64 * KIB * 9, 64 * KIB),
        (0x55, capacity / 2 + 512, 100 * KIB),
        // The last sector.
        (0x66, capacity - 512, 512),
    ]
}

/// `vdiskmanager -c` of type `t`: qemu-img check / info and vmdkinfo accept it, and
/// what qemu-io writes into it reads back identically through the library.
fn created_type_accepts_qemu_io_writes(t: u32) {
    let dir = tempdir();
    let disk = dir.path().join("created.vmdk");
    vdiskmanager(&[
        "-c",
        "-q",
        "-s",
        "64MB",
        "-a",
        "lsilogic",
        "-t",
        &t.to_string(),
        path_str(&disk),
    ]);
    let capacity = 64 * MIB;
    run("qemu-img", &["check", "-f", "vmdk", path_str(&disk)]);
    let info = qemu_info(&disk);
    assert_eq!(
        info["virtual-size"].as_u64(),
        Some(capacity),
        "type {t}: {info}"
    );
    run("vmdkinfo", &[path_str(&disk)]);
    assert_eq!(read_all_ours(&disk), vec![0u8; capacity as usize]);

    let writes = qemu_io_writes(capacity);
    qemu_io_write(&disk, &writes);
    if is_sparse_type(t) {
        run("qemu-img", &["check", "-f", "vmdk", path_str(&disk)]);
    }
    run("vmdkinfo", &[path_str(&disk)]);

    // What qemu reads, built independently from the write list.
    let mut expected = vec![0u8; capacity as usize];
    for &(p, off, len) in &writes {
        expected[off as usize..(off + len) as usize].fill(p);
    }
    let theirs = qemu_raw(&disk);
    assert_same_bytes(
        &format!("type {t}: qemu-img convert after qemu-io writes"),
        &theirs,
        &expected,
    );
    assert_same_bytes(
        &format!("type {t}: vdisk read after qemu-io writes"),
        &read_all_ours(&disk),
        &theirs,
    );
}

#[test]
fn created_monolithic_sparse_takes_qemu_io_writes_and_reads_them_back() {
    created_type_accepts_qemu_io_writes(0);
}

#[test]
fn created_two_gb_sparse_takes_qemu_io_writes_and_reads_them_back() {
    created_type_accepts_qemu_io_writes(1);
}

#[test]
fn created_monolithic_flat_takes_qemu_io_writes_and_reads_them_back() {
    created_type_accepts_qemu_io_writes(2);
}

#[test]
fn created_two_gb_flat_takes_qemu_io_writes_and_reads_them_back() {
    created_type_accepts_qemu_io_writes(3);
}

#[test]
fn created_vmfs_takes_qemu_io_writes_and_reads_them_back() {
    created_type_accepts_qemu_io_writes(4);
}

#[test]
fn created_vmfs_thin_takes_qemu_io_writes_and_reads_them_back() {
    created_type_accepts_qemu_io_writes(6);
}

/// A split disk bigger than one 2047 MiB extent: qemu-io writes across the extent
/// boundary and at the end; the library reads what qemu reads.
fn created_split_type_beyond_one_extent_matches_qemu(t: u32) {
    let dir = tempdir();
    let disk = dir.path().join("big.vmdk");
    let capacity = 2 * 1024 * MIB + 64 * KIB;
    vdiskmanager(&[
        "-c",
        "-q",
        "-s",
        &(capacity / 512).to_string(),
        "-t",
        &t.to_string(),
        path_str(&disk),
    ]);
    let info = vdisk_interop::vdiskmanager_info(&disk);
    let extents = info["chain"][0]["extents"].as_array().expect("extents");
    assert_eq!(extents.len(), 2, "type {t}: {info}");
    let boundary = extents[0]["sectors"].as_u64().expect("sectors") * 512;
    assert_eq!(boundary, 2047 * MIB, "VMware splits at 2047 MiB");
    assert_eq!(
        qemu_info(&disk)["virtual-size"].as_u64(),
        Some(capacity),
        "type {t}"
    );
    run("vmdkinfo", &[path_str(&disk)]);

    let writes = [
        (0x71u8, 0, 4 * KIB),
        (0x72, boundary - 3 * 512, 7 * 512),
        (0x73, boundary + 64 * KIB - 512, 1024),
        (0, boundary - 512, 1024),
        (0x74, capacity - 1536, 1536),
    ];
    qemu_io_write(&disk, &writes);
    if is_sparse_type(t) {
        run("qemu-img", &["check", "-f", "vmdk", path_str(&disk)]);
    }

    let raw = dir.path().join("qemu.raw");
    qemu_raw_to(&disk, &raw);
    let raw_file = File::open(&raw).expect("open raw");
    for &(_, off, len) in &writes {
        let start = off.saturating_sub(64 * KIB);
        let len = (len + 128 * KIB).min(capacity - start) as usize;
        let mut theirs = vec![0u8; len];
        raw_file
            .read_exact_at(&mut theirs, start)
            .expect("read raw");
        assert_same_bytes(
            &format!("type {t}: {len} bytes at {start}"),
            &read_ours_at(&disk, start, len),
            &theirs,
        );
    }
    assert_ours_equals_raw_file(&disk, &raw);
}

#[test]
fn created_two_gb_sparse_beyond_one_extent_reads_qemu_io_writes() {
    created_split_type_beyond_one_extent_matches_qemu(1);
}

#[test]
fn created_two_gb_flat_beyond_one_extent_reads_qemu_io_writes() {
    created_split_type_beyond_one_extent_matches_qemu(3);
}

#[test]
fn created_odd_capacities_open_in_qemu_and_read_qemu_io_last_sector() {
    // Capacities of one sector, just under / exactly one grain, and a grain plus a
    // sector beyond 100 MiB.
    for sectors in [1u64, 127, 128, 204_801] {
        for t in [0u32, 1, 2, 3, 4, 6] {
            let what = format!("type {t}, {sectors} sectors");
            let dir = tempdir();
            let disk = dir.path().join("odd.vmdk");
            vdiskmanager(&[
                "-c",
                "-q",
                "-s",
                &sectors.to_string(),
                "-t",
                &t.to_string(),
                path_str(&disk),
            ]);
            let capacity = sectors * 512;
            assert_eq!(
                qemu_info(&disk)["virtual-size"].as_u64(),
                Some(capacity),
                "{what}"
            );
            run("vmdkinfo", &[path_str(&disk)]);
            let writes = [(0x5au8, capacity - 512, 512), (0x5b, 0, 100)];
            qemu_io_write(&disk, &writes);
            run("qemu-img", &["check", "-f", "vmdk", path_str(&disk)]);
            let theirs = qemu_raw(&disk);
            assert!(
                theirs[capacity as usize - 1] == 0x5a || capacity == 512,
                "{what}"
            );
            assert_same_bytes(&what, &read_all_ours(&disk), &theirs);
        }
    }
}

#[test]
fn raw_source_with_partial_last_sector_converts_padded_with_zeros() {
    let dir = tempdir();
    let src = dir.path().join("odd.raw");
    let len = MIB as usize + 100;
    let data = pattern(9, len);
    std::fs::write(&src, &data).expect("write source");
    for t in [0u32, 2] {
        let dst = dir.path().join(format!("odd{t}.vmdk"));
        vdiskmanager(&[
            "convert",
            "-q",
            "-f",
            "raw",
            "-t",
            &t.to_string(),
            path_str(&src),
            path_str(&dst),
        ]);
        let capacity = (len as u64).div_ceil(512) * 512;
        assert_eq!(
            qemu_info(&dst)["virtual-size"].as_u64(),
            Some(capacity),
            "type {t}"
        );
        let mut expected = data.clone();
        expected.resize(capacity as usize, 0);
        assert_same_bytes(&format!("type {t}: qemu"), &qemu_raw(&dst), &expected);
        assert_same_bytes(&format!("type {t}: ours"), &read_all_ours(&dst), &expected);
    }
}

/// Whole grains of zeros written over a parent's data are marked zeroed in the child
/// (hosted sparse: entry 1 in a file that becomes version 2, as qemu's `zeroed_grain=on`
/// makes them; seSparse: type 2 entries). qemu reads them as zeros that hide the
/// parent, maps them as zero in the child, and finds the sparse file clean.
#[test]
fn zeros_over_a_parents_data_are_zeroed_grains_in_qemu() {
    use vdisk::ops::child::create_child;
    use vdisk::{create, CreateOptions, DiskType, OpenOptions};
    for t in [DiskType::MonolithicSparse, DiskType::SeSparse] {
        let tmp = tempdir();
        let base = tmp.path().join("base.vmdk");
        create(
            &base,
            &CreateOptions::new(DiskType::MonolithicSparse, 8 * MIB),
        )
        .unwrap();
        let d = OpenOptions::new().write(true).open(&base).unwrap();
        d.write_at(&pattern(9, 6 * MIB as usize), MIB).unwrap();
        d.close().unwrap();
        let child = tmp.path().join("base-000001.vmdk");
        create_child(&base, &child, t).unwrap();
        let d = OpenOptions::new().write(true).open(&child).unwrap();
        d.write_at(&vec![0u8; 2 * MIB as usize], 2 * MIB).unwrap();
        d.write_zeroes(5 * MIB, MIB, false).unwrap();
        d.close().unwrap();
        let mut want = vec![0u8; 8 * MIB as usize];
        want[MIB as usize..7 * MIB as usize].copy_from_slice(&pattern(9, 6 * MIB as usize));
        want[2 * MIB as usize..4 * MIB as usize].fill(0);
        want[5 * MIB as usize..6 * MIB as usize].fill(0);
        let what = format!("{t:?} child");
        assert_same_bytes(&what, &qemu_raw(&child), &want);
        assert_same_bytes(&format!("{what} (ours)"), &read_all_ours(&child), &want);
        let map = vdisk_interop::qemu_map_json(&child);
        let v: serde_json::Value = serde_json::from_str(&map).unwrap();
        for (from, to) in [(2 * MIB, 4 * MIB), (5 * MIB, 6 * MIB)] {
            let covered: u64 = v
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["depth"] == 0 && r["zero"] == true && r["data"] == false)
                .map(|r| {
                    let s = r["start"].as_u64().unwrap();
                    let e = s + r["length"].as_u64().unwrap();
                    e.min(to).saturating_sub(s.max(from))
                })
                .sum();
            assert_eq!(
                covered,
                to - from,
                "{what}: qemu's map of {from}..{to}: {map}"
            );
        }
        if t == DiskType::MonolithicSparse {
            let mut h = [0u8; 12];
            File::open(&child)
                .unwrap()
                .read_exact_at(&mut h, 0)
                .unwrap();
            assert_eq!(
                h[4..12],
                [2, 0, 0, 0, 7, 0, 0, 0],
                "{what}: version and flags"
            );
            let out = run("qemu-img", &["check", "-f", "vmdk", path_str(&child)]);
            assert!(
                stdout_text(&out).contains("No errors were found"),
                "{what}: {}",
                stdout_text(&out)
            );
        }
    }
}
