//! Disks created by `qemu-img create -f vmdk` and written by `qemu-io` must read
//! byte-identically through the library, and the allocation map of
//! `vdiskmanager map --json` must agree with `qemu-img map --output=json`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vdisk_interop::{
    assert_ours_equals_raw_file, assert_same_bytes, data_ranges_of_map_json, open_ours, path_str,
    pattern, qemu_io_write, qemu_map_json, qemu_raw, qemu_raw_to, read_all_ours, read_ours_at, run,
    tempdir, vdiskmanager_convert, vdiskmanager_info, vdiskmanager_map_json,
    zero_ranges_of_map_json, GIB, KIB, MIB,
};

/// The small sizes every subformat is tried with.
const SIZES: &[u64] = &[512, 64 * KIB - 512, 64 * KIB, 100 * MIB + 512];

/// A qemu-io write: `(pattern byte, offset, length)`; pattern 0 means `write -z`.
type Write = (u8, u64, u64);

/// Creates `name` in `dir` with `qemu-img create -f vmdk -o subformat=...,extra`.
fn qemu_create(dir: &Path, name: &str, subformat: &str, size: u64, extra: &str) -> PathBuf {
    let disk = dir.join(name);
    let mut opts = format!("subformat={subformat}");
    if !extra.is_empty() {
        opts.push(',');
        opts.push_str(extra);
    }
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            &opts,
            path_str(&disk),
            &size.to_string(),
        ],
    );
    disk
}

/// The writes done on a disk of `size` bytes: data at the start, unaligned to grains
/// (and to sectors), across grain and grain-table boundaries, in the middle and in
/// the last sector, then zero writes over written data, over a whole written grain
/// and over unallocated grains. Writes that do not fit are left out.
fn writes_for(size: u64) -> Vec<Write> {
    let mid = (size / 2) / 512 * 512;
    let all: Vec<Write> = vec![
        (0x11, 0, 512),
        (0x22, 1536, 7680),
        (0x23, 10_001, 3_333),
        (0x33, 64 * KIB - 1024, 2048),
        (0x44, 32 * MIB - 512, 1024),
        (0x55, mid.saturating_sub(4096), 70_144),
        (0x66, size - 512, 512),
        (0, 2048, 1024),
        (0, 64 * KIB, 64 * KIB),
        (0, 4 * 64 * KIB, 128 * KIB),
        (0, 50 * MIB + 100, 1000),
    ];
    all.into_iter().filter(|w| w.1 + w.2 <= size).collect()
}

/// The content a disk of `size` bytes has after `writes` (independent of qemu).
fn expected_content(size: u64, writes: &[Write]) -> Vec<u8> {
    let mut v = vec![0u8; size as usize];
    for &(p, off, len) in writes {
        v[off as usize..(off + len) as usize].fill(p);
    }
    v
}

/// The allocation maps of qemu and vdiskmanager agree on data ranges (and on zeroed
/// grains) once adjacent ranges are merged.
fn assert_maps_agree(what: &str, disk: &Path) {
    let theirs = qemu_map_json(disk);
    let ours = vdiskmanager_map_json(disk);
    assert_eq!(
        data_ranges_of_map_json(&ours),
        data_ranges_of_map_json(&theirs),
        "{what}: data ranges of vdiskmanager map (left) and qemu-img map (right)\n\
         qemu: {theirs}\nours: {ours}"
    );
    assert_eq!(
        zero_ranges_of_map_json(&ours),
        zero_ranges_of_map_json(&theirs),
        "{what}: zeroed ranges of vdiskmanager map (left) and qemu-img map (right)\n\
         qemu: {theirs}\nours: {ours}"
    );
}

/// One qemu-made disk of `size` bytes: write it with qemu-io, then the library must
/// read exactly what qemu reads (and what the writes say).
fn qemu_made_disk_reads_identical(subformat: &str, size: u64, extra: &str) {
    let what = format!("{subformat} {extra} of {size} bytes");
    let dir = tempdir();
    let disk = qemu_create(dir.path(), "qemu.vmdk", subformat, size, extra);
    assert_eq!(open_ours(&disk).capacity(), size, "{what}: capacity");
    assert_same_bytes(
        &format!("{what}: new disk"),
        &read_all_ours(&disk),
        &vec![0u8; size as usize],
    );

    let writes = writes_for(size);
    qemu_io_write(&disk, &writes);
    let theirs = qemu_raw(&disk);
    assert_same_bytes(
        &format!("{what}: qemu-img convert output vs the writes"),
        &theirs,
        &expected_content(size, &writes),
    );
    assert_same_bytes(
        &format!("{what}: vdisk read vs qemu-img convert"),
        &read_all_ours(&disk),
        &theirs,
    );
    // Flat extents are all data for both (qemu does not look for host holes).
    assert_maps_agree(&what, &disk);
}

#[test]
fn qemu_made_monolithic_sparse_reads_identical() {
    for &size in SIZES {
        qemu_made_disk_reads_identical("monolithicSparse", size, "");
    }
}

#[test]
fn qemu_made_monolithic_flat_reads_identical() {
    for &size in SIZES {
        qemu_made_disk_reads_identical("monolithicFlat", size, "");
    }
}

#[test]
fn qemu_made_two_gb_sparse_reads_identical() {
    for &size in SIZES {
        qemu_made_disk_reads_identical("twoGbMaxExtentSparse", size, "");
    }
}

#[test]
fn qemu_made_two_gb_flat_reads_identical() {
    for &size in SIZES {
        qemu_made_disk_reads_identical("twoGbMaxExtentFlat", size, "");
    }
}

#[test]
fn qemu_made_zeroed_grain_sparse_reads_identical_and_maps_zeroed_grains() {
    for &size in SIZES {
        qemu_made_disk_reads_identical("monolithicSparse", size, "zeroed_grain=on");
    }
}

#[test]
fn qemu_made_zeroed_grain_sparse_has_zeroed_grains_over_old_data() {
    // Make sure the zeroed-grain case really produces GTE=1 entries over grains that
    // held data, and that the library reads zeros there (not the stale data).
    let dir = tempdir();
    let size = 4 * MIB;
    let disk = qemu_create(
        dir.path(),
        "zg.vmdk",
        "monolithicSparse",
        size,
        "zeroed_grain=on",
    );
    let writes = [
        (0x5a, 0, 512 * KIB),
        (0, 64 * KIB, 128 * KIB),
        (0, 3 * 64 * KIB + 512, 512),
        (0, MIB, 64 * KIB),
    ];
    qemu_io_write(&disk, &writes);
    let zeroed = zero_ranges_of_map_json(&qemu_map_json(&disk));
    assert!(
        zeroed.contains(&(64 * KIB, 128 * KIB)),
        "qemu did not write zeroed grains: {zeroed:?}"
    );
    assert_maps_agree("zeroed grains", &disk);
    assert_same_bytes(
        "zeroed grains",
        &read_all_ours(&disk),
        &expected_content(size, &writes),
    );
}

/// Reads `key = "value"` DDB entries out of a descriptor (plain text file or the
/// embedded descriptor area of a monolithic sparse file) without the library.
fn ddb_value(descriptor_file: &Path, key: &str) -> Option<String> {
    let bytes = std::fs::read(descriptor_file).expect("read descriptor");
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(64 * 1024)]).into_owned();
    text.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
    })
}

#[test]
fn qemu_made_disks_with_each_adapter_type_report_it_and_the_geometry() {
    for adapter in ["ide", "buslogic", "lsilogic", "legacyESX"] {
        for (subformat, descriptor_name) in [
            ("monolithicSparse", "qemu.vmdk"),
            ("monolithicFlat", "qemu.vmdk"),
        ] {
            let what = format!("{subformat} adapter_type={adapter}");
            let dir = tempdir();
            let size = 100 * MIB + 512;
            let disk = qemu_create(
                dir.path(),
                descriptor_name,
                subformat,
                size,
                &format!("adapter_type={adapter}"),
            );
            let info = vdiskmanager_info(&disk);
            assert_eq!(info["capacity"].as_u64(), Some(size), "{what}: {info}");
            assert_eq!(info["adapterType"], adapter, "{what}: {info}");
            assert_eq!(info["createType"], subformat, "{what}: {info}");
            for (json_key, ddb_key) in [
                ("cylinders", "ddb.geometry.cylinders"),
                ("heads", "ddb.geometry.heads"),
                ("sectors", "ddb.geometry.sectors"),
            ] {
                let expected: u64 = ddb_value(&disk, ddb_key)
                    .unwrap_or_else(|| panic!("{what}: qemu wrote no {ddb_key}"))
                    .parse()
                    .expect("number");
                assert_eq!(
                    info["geometry"][json_key].as_u64(),
                    Some(expected),
                    "{what}: {json_key} {info}"
                );
            }
            let writes = [(0x99, 4096, 4096), (0x98, size - 512, 512)];
            qemu_io_write(&disk, &writes);
            assert_same_bytes(
                &what,
                &read_all_ours(&disk),
                &expected_content(size, &writes),
            );
        }
    }
}

/// A split disk bigger than 2 GiB (qemu splits at 2 GiB): writes across the extent
/// boundary; sampled regions and then the whole disk must equal qemu's raw output.
fn qemu_made_split_disk_beyond_2gib_reads_identical(subformat: &str) {
    let dir = tempdir();
    let size = 2 * GIB + 64 * KIB;
    let disk = qemu_create(dir.path(), "big.vmdk", subformat, size, "");
    let info = vdiskmanager_info(&disk);
    assert_eq!(info["capacity"].as_u64(), Some(size), "{info}");
    assert_eq!(
        info["chain"][0]["extents"].as_array().map(Vec::len),
        Some(2),
        "{info}"
    );
    let writes: [Write; 7] = [
        (0x01, 0, 4096),
        (0x02, GIB + 1000, 3000),
        (0x03, 2 * GIB - 4096, 8192),
        (0x04, 2 * GIB - 64 * KIB - 100, 200),
        (0x05, size - 512, 512),
        // A zero write across the split boundary, over data.
        (0, 2 * GIB - 1024, 1536),
        (0, 2 * GIB + 64 * KIB - 2048, 1024),
    ];
    qemu_io_write(&disk, &writes);
    let raw = dir.path().join("qemu.raw");
    qemu_raw_to(&disk, &raw);
    let raw_file = File::open(&raw).expect("open raw");
    for &(p, off, len) in &writes {
        let start = off.saturating_sub(64 * KIB);
        let n = (len + 128 * KIB).min(size - start) as usize;
        let mut theirs = vec![0u8; n];
        raw_file
            .read_exact_at(&mut theirs, start)
            .expect("read raw");
        if p != 0 {
            let last = writes.iter().rposition(|w| w.0 == p).unwrap_or(0);
            let overwritten = writes[last + 1..]
                .iter()
                .any(|w| w.1 < off + len && off < w.1 + w.2);
            if !overwritten {
                let i = (off - start) as usize;
                assert!(
                    theirs[i..i + len as usize].iter().all(|&b| b == p),
                    "qemu did not write {p:#x} at {off}"
                );
            }
        }
        assert_same_bytes(
            &format!("{subformat}: {n} bytes at {start}"),
            &read_ours_at(&disk, start, n),
            &theirs,
        );
    }
    // The whole disk (a streaming comparison: hashing 2 GiB with an unoptimised
    // sha2 would take minutes in debug builds, a byte comparison is as strict).
    assert_ours_equals_raw_file(&disk, &raw);
    assert_maps_agree(subformat, &disk);
}

#[test]
fn qemu_made_two_gb_sparse_beyond_2gib_reads_identical() {
    qemu_made_split_disk_beyond_2gib_reads_identical("twoGbMaxExtentSparse");
}

#[test]
fn qemu_made_two_gb_flat_beyond_2gib_reads_identical() {
    qemu_made_split_disk_beyond_2gib_reads_identical("twoGbMaxExtentFlat");
}

#[test]
fn qemu_made_variants_read_identical() {
    // Split sparse with zeroed grains, and the old hardware version 6 format.
    qemu_made_disk_reads_identical("twoGbMaxExtentSparse", 100 * MIB + 512, "zeroed_grain=on");
    qemu_made_disk_reads_identical("monolithicSparse", 100 * MIB + 512, "hwversion=6");
    qemu_made_disk_reads_identical("monolithicFlat", 100 * MIB + 512, "compat6=on");
}

/// The library writes into a qemu-made disk (unaligned writes, across grains, the
/// last sector, zeros over data); qemu must then find no error and read the same.
fn ours_written_into_qemu_made_disk_reads_identical_in_qemu(subformat: &str, extra: &str) {
    let what = format!("{subformat} {extra}");
    let dir = tempdir();
    let size = 40 * MIB + 512;
    let disk = qemu_create(dir.path(), "qemu.vmdk", subformat, size, extra);
    // Some data written by qemu first, so the library also updates existing grains.
    let qemu_writes = [(0x10u8, 0, 256 * KIB), (0x20, 33 * MIB, 8 * KIB)];
    qemu_io_write(&disk, &qemu_writes);
    let mut expected = expected_content(size, &qemu_writes);

    let ours: [(u64, Vec<u8>); 7] = [
        (1000, vdisk_interop::pattern(1, 5000)),
        (64 * KIB - 7, vdisk_interop::pattern(2, 14)),
        (200 * KIB, vec![0u8; 64 * KIB as usize]),
        (MIB + 3, vdisk_interop::pattern(3, 200 * KIB as usize)),
        (32 * MIB - 100, vdisk_interop::pattern(4, 200)),
        (33 * MIB + 512, vec![0u8; 1024]),
        (size - 700, vdisk_interop::pattern(5, 700)),
    ];
    {
        let d = vdisk::OpenOptions::new()
            .write(true)
            .open(&disk)
            .unwrap_or_else(|e| panic!("{what}: open for writing: {e}"));
        for (off, data) in &ours {
            d.write_at(data, *off)
                .unwrap_or_else(|e| panic!("{what}: write at {off}: {e}"));
            expected[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        }
        d.close().unwrap_or_else(|e| panic!("{what}: close: {e}"));
    }
    run("qemu-img", &["check", "-f", "vmdk", path_str(&disk)]);
    run("vmdkinfo", &[path_str(&disk)]);
    assert_same_bytes(
        &format!("{what}: qemu read after vdisk writes"),
        &qemu_raw(&disk),
        &expected,
    );
    assert_same_bytes(
        &format!("{what}: vdisk read after vdisk writes"),
        &read_all_ours(&disk),
        &expected,
    );
    assert_maps_agree(&what, &disk);
}

#[test]
fn ours_written_into_qemu_made_monolithic_sparse_reads_identical_in_qemu() {
    ours_written_into_qemu_made_disk_reads_identical_in_qemu("monolithicSparse", "");
}

#[test]
fn ours_written_into_qemu_made_zeroed_grain_sparse_reads_identical_in_qemu() {
    ours_written_into_qemu_made_disk_reads_identical_in_qemu("monolithicSparse", "zeroed_grain=on");
}

#[test]
fn ours_written_into_qemu_made_two_gb_sparse_reads_identical_in_qemu() {
    ours_written_into_qemu_made_disk_reads_identical_in_qemu("twoGbMaxExtentSparse", "");
}

#[test]
fn ours_written_into_qemu_made_flat_reads_identical_in_qemu() {
    ours_written_into_qemu_made_disk_reads_identical_in_qemu("monolithicFlat", "");
    ours_written_into_qemu_made_disk_reads_identical_in_qemu("twoGbMaxExtentFlat", "");
}

#[test]
fn qemu_made_disk_converted_by_vdiskmanager_compares_identical_in_qemu() {
    let dir = tempdir();
    let size = 40 * MIB + 512;
    let src = qemu_create(dir.path(), "src.vmdk", "monolithicSparse", size, "");
    qemu_io_write(&src, &writes_for(size));
    for t in [0, 1, 2, 3, 4, 6] {
        let dst = dir.path().join(format!("t{t}.vmdk"));
        vdiskmanager_convert("vmdk", "vmdk", Some(t), &src, &dst);
        run(
            "qemu-img",
            &[
                "compare",
                "-f",
                "vmdk",
                "-F",
                "vmdk",
                path_str(&src),
                path_str(&dst),
            ],
        );
        if t <= 1 {
            // Only data is copied (blocks of zeros are skipped): every data range
            // of the copy lies within a data range of the source.
            let src_data = data_ranges_of_map_json(&qemu_map_json(&src));
            let dst_data = data_ranges_of_map_json(&qemu_map_json(&dst));
            assert!(!dst_data.is_empty(), "type {t}: no data copied");
            for &(s, l) in &dst_data {
                assert!(
                    src_data.iter().any(|&(ss, sl)| ss <= s && s + l <= ss + sl),
                    "type {t}: {dst_data:?} not within {src_data:?}"
                );
            }
        }
    }
}

/// A raw image of `size` bytes with data runs, zero runs and data in the last
/// sector, converted by qemu-img to streamOptimized, reads back identical through
/// the library; the allocation maps agree.
fn qemu_made_stream_reads_identical(size: u64) {
    let what = format!("streamOptimized of {size} bytes");
    let dir = tempdir();
    let raw = dir.path().join("src.raw");
    let mut content = vec![0u8; size as usize];
    let mut off = 0usize;
    let mut seed = 1u64;
    while off < content.len() {
        let run = (192 * 1024).min(content.len() - off);
        if !seed.is_multiple_of(3) {
            content[off..off + run].copy_from_slice(&pattern(seed, run));
        }
        off += run + 320 * 1024;
        seed += 1;
    }
    let tail = content.len() - 512.min(content.len());
    content[tail..].fill(0xee);
    std::fs::write(&raw, &content).unwrap();
    let disk = dir.path().join("s.vmdk");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            path_str(&raw),
            path_str(&disk),
        ],
    );
    assert_eq!(open_ours(&disk).capacity(), size, "{what}: capacity");
    assert_same_bytes(
        &format!("{what}: vdisk read vs source"),
        &read_all_ours(&disk),
        &content,
    );
    assert_maps_agree(&what, &disk);
    let e = vdisk::OpenOptions::new()
        .write(true)
        .open(&disk)
        .expect_err("a stream disk cannot be opened for writing");
    assert_eq!(e.kind(), vdisk::ErrorKind::NotSupported, "{e}");
}

#[test]
fn qemu_made_stream_optimized_reads_identical() {
    for size in [512, 64 * 1024 - 512, 4 * MIB, 100 * MIB + 512] {
        qemu_made_stream_reads_identical(size);
    }
}
