//! Tests of the seSparse format half: headers, layout, reads and writes through the engine.

use super::create::new_layout;
use super::*;
use crate::extent::{BelowFn, ExtentMapping};
use crate::limits::GT_CACHE_BYTES;
use crate::storage::LockMode;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MIB: u64 = 1 << 20;
/// Layout of a 100 MiB extent made by `create_sesparse` (sectors).
const GD: u64 = 4096;
const GTS: u64 = 6144;
const GRAINS: u64 = 12288;

fn make(dir: &Path, capacity_sectors: u64) -> PathBuf {
    let p = dir.join("d-sesparse.vmdk");
    let s = FileStorage::create_new(&p).unwrap();
    create_sesparse(&s, capacity_sectors).unwrap();
    p
}

fn open(p: &Path, writable: bool) -> Result<SeSparseExtent> {
    let s = FileStorage::open(p, writable, LockMode::None)?;
    SeSparseExtent::open(s, writable)
}

fn poke(p: &Path, at: u64, bytes: &[u8]) {
    let s = FileStorage::open(p, true, LockMode::None).unwrap();
    s.write_all_at(bytes, at).unwrap();
}

/// What the chain below reads in these tests: a pattern that depends on the offset.
fn parent_byte(off: u64) -> u8 {
    (off / 512 % 251) as u8 ^ 0x5a
}

fn parent(off: u64, buf: &mut [u8]) -> Result<()> {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = parent_byte(off + i as u64);
    }
    Ok(())
}

fn zeros(_: u64, buf: &mut [u8]) -> Result<()> {
    buf.fill(0);
    Ok(())
}

/// Reads through the extent the way the chain walk does.
fn read(ext: &SeSparseExtent, off: u64, buf: &mut [u8], below: BelowFn<'_>) -> Result<()> {
    let mut pos = 0usize;
    while pos < buf.len() {
        let o = off + pos as u64;
        let (m, run) = ext.map(o, (buf.len() - pos) as u64)?;
        assert!(run > 0);
        let piece = &mut buf[pos..pos + run as usize];
        match m {
            ExtentMapping::Data { file_offset } => ext.read_data(file_offset, piece)?,
            ExtentMapping::Zero => piece.fill(0),
            ExtentMapping::Unallocated => below(o, piece)?,
            ExtentMapping::Compressed { .. } => panic!("no compressed grains"),
        }
        pos += run as usize;
    }
    Ok(())
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64).wrapping_mul(31).wrapping_add(seed * 7) % 253) as u8)
        .collect()
}

fn check_all(ext: &SeSparseExtent, model: &[u8], below: BelowFn<'_>) {
    let mut got = vec![0u8; model.len()];
    read(ext, 0, &mut got, below).unwrap();
    if let Some(i) = got.iter().zip(model).position(|(a, b)| a != b) {
        panic!("first difference at byte {i}");
    }
}

#[test]
fn layout_of_100_mib_matches_the_hostd_example() {
    let h = new_layout(204_800);
    let got: Vec<(u64, u64)> = h.regions().iter().map(|&(_, o, s)| (o, s)).collect();
    assert_eq!(
        got,
        vec![
            (0, 1),
            (1, 1),
            (2, 2),
            (2048, 2048),
            (GD, 2048),
            (GTS, 2048),
            (8192, 2048),
            (10240, 2048),
            (GRAINS, 204_800)
        ]
    );
    let b = h.to_bytes();
    assert_eq!(ConstHeader::parse(&b).unwrap(), h);
    h.validate_layout().unwrap();
    // The largest disk keeps every grain table below qemu's 32-bit sector limit.
    let big = new_layout(MAX_SESPARSE_CAPACITY_SECTORS);
    big.validate_layout().unwrap();
    assert!(big.gt_offset + big.gt_size <= QEMU_MAX_GT_SECTOR);
    assert_eq!(big.needed_gdes(), 1 << 22);
}

#[test]
fn extent_is_send_sync() {
    fn check<T: Send + Sync + std::fmt::Debug>() {}
    check::<SeSparseExtent>();
}

#[test]
fn slot_encoding_rotates_twelve_bits() {
    // The doc's hand-made example: cluster 4097.
    let e = encode_slot(4097);
    assert_eq!(e, 0x3001_0000_0000_0001);
    assert_eq!(decode_slot(e), 4097);
    for slot in [0, 1, 0xFFF, 0x1000, 123_456_789, MAX_SLOT] {
        assert_eq!(decode_slot(encode_slot(slot)), slot);
        assert_eq!(encode_slot(slot) >> 60, GTE_ALLOCATED);
    }
}

#[test]
fn new_extent_is_unallocated_and_created_file_is_as_described() {
    let dir = tempfile::tempdir().unwrap();
    let p = make(dir.path(), 204_800);
    assert_eq!(std::fs::metadata(&p).unwrap().len(), GRAINS * 512);
    let ext = open(&p, false).unwrap();
    assert_eq!(ext.capacity_bytes(), 100 * MIB);
    assert_eq!(
        ext.map(0, 100 * MIB).unwrap(),
        (ExtentMapping::Unallocated, 100 * MIB)
    );
    assert_eq!(
        ext.map(100 * MIB - 1, 10).unwrap(),
        (ExtentMapping::Unallocated, 1)
    );
    assert_eq!(
        ext.map(100 * MIB, 1).unwrap_err().kind(),
        ErrorKind::OutOfRange
    );
    let e = ext.write(0, &[1], &zeros).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReadOnly);
    // A second create into a non-empty file is refused.
    let s = FileStorage::open(&p, true, LockMode::None).unwrap();
    let e = create_sesparse(&s, 8).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    let q = dir.path().join("z");
    let s = FileStorage::create_new(&q).unwrap();
    assert_eq!(
        create_sesparse(&s, 0).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        create_sesparse(&s, MAX_SESPARSE_CAPACITY_SECTORS + 1)
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidArgument
    );
}

#[test]
fn writes_read_back_with_copy_on_write_from_below_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    // Three grain tables, a capacity that ends in the middle of a grain.
    let cap_sectors = 2 * 32_768 + 4000 + 3;
    let cap = cap_sectors * 512;
    let p = make(dir.path(), cap_sectors);
    let mut model: Vec<u8> = (0..cap).map(parent_byte).collect();
    let writes: Vec<(u64, usize)> = vec![
        (0, 512),
        (3 * 4096 + 100, 10_000),
        (2 * MIB, MIB as usize),
        (16 * MIB - 6000, 20_000),
        (5 * MIB, 8192),
        (cap - 700, 700),
        (2 * MIB + 4000, 300),
        (33 * MIB, 3 * 4096),
        (33 * MIB + 4096 + 17, 1),
    ];
    {
        let ext = open(&p, true).unwrap();
        ext.begin_write().unwrap();
        for (k, &(off, len)) in writes.iter().enumerate() {
            let data = if k == 4 {
                vec![0u8; len]
            } else {
                pattern(k as u64, len)
            };
            ext.write(off, &data, &parent).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&data);
        }
        check_all(&ext, &model, &parent);
        ext.flush().unwrap();
        ext.close().unwrap();
    }
    let len_after_first = std::fs::metadata(&p).unwrap().len();
    let ext = open(&p, false).unwrap();
    check_all(&ext, &model, &parent);
    // Consecutive grains written together are contiguous and answered at once.
    let (m, run) = ext.map(2 * MIB, MIB).unwrap();
    assert!(matches!(m, ExtentMapping::Data { .. }));
    assert_eq!(run, MIB);
    drop(ext);

    // Writing again after a reopen never reuses a slot.
    let ext = open(&p, true).unwrap();
    let data = pattern(99, 4096 * 3);
    ext.write(20 * MIB + 5, &data, &parent).unwrap();
    model[(20 * MIB + 5) as usize..(20 * MIB + 5) as usize + data.len()].copy_from_slice(&data);
    ext.close().unwrap();
    assert_eq!(
        std::fs::metadata(&p).unwrap().len(),
        len_after_first + 4 * 4096
    );
    let ext = open(&p, false).unwrap();
    check_all(&ext, &model, &parent);
    assert!(ext.write(cap - 1, &[0, 0], &parent).is_err());
}

#[test]
fn zero_and_unmapped_grains_read_as_zeros_and_are_completed_with_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let p = make(dir.path(), 204_800);
    poke(&p, GD * 512, &(GDE_TABLE | 3).to_le_bytes());
    let mut gt = vec![0u8; GT_BYTES as usize];
    gt[8..16].copy_from_slice(&(GTE_ZERO << 60).to_le_bytes()); // grain 1
    gt[16..24].copy_from_slice(&((GTE_UNMAPPED << 60) | 77).to_le_bytes()); // grain 2
    poke(&p, (GTS + 3 * 64) * 512, &gt);
    let ext = open(&p, true).unwrap();
    assert_eq!(
        ext.map(0, 5 * 4096).unwrap(),
        (ExtentMapping::Unallocated, 4096)
    );
    assert_eq!(
        ext.map(4096 + 10, 5 * 4096).unwrap(),
        (ExtentMapping::Zero, 2 * 4096 - 10)
    );
    ext.write(4096 + 100, &[7; 10], &parent).unwrap();
    ext.write(2 * 4096 + 4000, &[9; 96], &parent).unwrap();
    let mut model: Vec<u8> = (0..3 * 4096).map(parent_byte).collect();
    model[4096..3 * 4096].fill(0);
    model[4096 + 100..4096 + 110].fill(7);
    model[2 * 4096 + 4000..3 * 4096].fill(9);
    let mut got = vec![0u8; model.len()];
    read(&ext, 0, &mut got, &parent).unwrap();
    assert_eq!(got, model);
    ext.close().unwrap();
    // The new table index follows the highest one in use; the volatile header says so.
    let mut vb = [0u8; 8];
    let s = FileStorage::open(&p, false, LockMode::None).unwrap();
    s.read_exact_at(&mut vb, 512 + 8).unwrap();
    assert_eq!(u64::from_le_bytes(vb), 0);
    drop(s);
    let ext = open(&p, true).unwrap();
    ext.write(20 * MIB, &[1; 4096], &parent).unwrap();
    ext.close().unwrap();
    let s = FileStorage::open(&p, false, LockMode::None).unwrap();
    s.read_exact_at(&mut vb, 512 + 8).unwrap();
    assert_eq!(u64::from_le_bytes(vb), 5);
    s.read_exact_at(&mut vb, GD * 512 + 8).unwrap();
    assert_eq!(u64::from_le_bytes(vb), GDE_TABLE | 4);
}

#[test]
fn preallocated_file_is_scanned_for_the_next_free_slot() {
    let dir = tempfile::tempdir().unwrap();
    let p = make(dir.path(), 204_800);
    let ext = open(&p, true).unwrap();
    ext.write(0, &pattern(1, 4096 * 2), &zeros).unwrap();
    ext.close().unwrap();
    drop(ext);
    let s = FileStorage::open(&p, true, LockMode::None).unwrap();
    s.set_len((GRAINS + 204_800) * 512).unwrap();
    drop(s);
    let ext = open(&p, true).unwrap();
    ext.write(MIB, &pattern(2, 4096), &zeros).unwrap();
    ext.close().unwrap();
    let ext = open(&p, false).unwrap();
    let mut got = vec![0u8; 4096 * 2];
    read(&ext, 0, &mut got, &zeros).unwrap();
    assert_eq!(got, pattern(1, 4096 * 2));
    assert_eq!(
        ext.map(MIB, 4096).unwrap().0,
        ExtentMapping::Data {
            file_offset: (GRAINS * 512) + 2 * 4096
        }
    );
}

#[test]
fn grain_tables_beyond_the_cache_are_written_back() {
    let dir = tempfile::tempdir().unwrap();
    let tables = (GT_CACHE_BYTES as u64 / GT_BYTES) + 10;
    let p = make(dir.path(), tables * SECTORS_PER_GT);
    let ext = open(&p, true).unwrap();
    for t in 0..tables {
        ext.write(t * 16 * MIB + t, &pattern(t, 100), &zeros)
            .unwrap();
    }
    ext.close().unwrap();
    drop(ext);
    let ext = open(&p, false).unwrap();
    for t in 0..tables {
        let mut got = vec![0u8; 100];
        read(&ext, t * 16 * MIB + t, &mut got, &zeros).unwrap();
        assert_eq!(got, pattern(t, 100), "table {t}");
    }
}

#[test]
fn concurrent_writers_on_disjoint_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let p = make(dir.path(), 204_800);
    let ext = Arc::new(open(&p, true).unwrap());
    // Unaligned neighbouring ranges: threads share the grains at their borders.
    let span = 5 * MIB + 1234;
    let mut handles = Vec::new();
    for t in 0..4u64 {
        let ext = Arc::clone(&ext);
        handles.push(std::thread::spawn(move || {
            let base = 1000 + t * span;
            let data = pattern(t + 10, span as usize);
            // Many small writes in a scattered order.
            let chunk = 3000usize;
            let n = data.len().div_ceil(chunk);
            for k in 0..n {
                let k = (k * 7 + t as usize) % n;
                let s = k * chunk;
                let e = (s + chunk).min(data.len());
                ext.write(base + s as u64, &data[s..e], &parent).unwrap();
            }
        }));
    }
    for h in handles {
        h.join().unwrap();
    }
    let mut model: Vec<u8> = (0..100 * MIB).map(parent_byte).collect();
    for t in 0..4u64 {
        let base = (1000 + t * span) as usize;
        model[base..base + span as usize].copy_from_slice(&pattern(t + 10, span as usize));
    }
    check_all(&ext, &model, &parent);
    ext.close().unwrap();
    drop(ext);
    let ext = open(&p, false).unwrap();
    check_all(&ext, &model, &parent);
}

/// Opening (read-only and read-write) fails with `kind` and a message containing
/// `needle`, and leaves the file unchanged.
fn expect_open_error(p: &Path, kind: ErrorKind, needle: &str) {
    let before = std::fs::read(p).unwrap();
    for writable in [false, true] {
        let e = open(p, writable).unwrap_err();
        assert_eq!(e.kind(), kind, "{e}");
        assert!(e.to_string().contains(needle), "{e:?} lacks {needle:?}");
    }
    assert!(std::fs::read(p).unwrap() == before, "file changed");
}

fn hostile(poke_at: u64, value: u64, kind: ErrorKind, needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let p = make(dir.path(), 204_800);
    poke(&p, poke_at, &value.to_le_bytes());
    expect_open_error(&p, kind, needle);
}

#[test]
fn hostile_constant_headers_are_refused() {
    let inv = ErrorKind::InvalidDisk;
    hostile(0, 0xCAFE_CAFE, inv, "constant header magic");
    hostile(
        8,
        0x0000_0001_0000_0001,
        ErrorKind::UnsupportedDiskVersion,
        "version 1.1",
    );
    hostile(16, u64::MAX, inv, "capacity");
    hostile(24, 16, inv, "grain size 16");
    hostile(24, 0, inv, "grain size 0");
    hostile(32, 128, inv, "grain table size 128");
    hostile(40, 1, ErrorKind::UnsupportedDiskVersion, "flags");
    hostile(56, 1, inv, "reserved field 2");
    hostile(300, 1, inv, "padding");
    // Regions: overflow, overlaps, a directory too small, past the end of the file.
    hostile(80, u64::MAX, inv, "volatile header (sector");
    hostile(88, 0, inv, "size of 0");
    hostile(200, u64::MAX / 2, inv, "grain area (sector");
    hostile(128, 6144, inv, "overlaps the grain directory");
    hostile(128, 0, inv, "overlaps the constant header");
    hostile(136, 0, inv, "holds 0 entries");
    hostile(80, 1 << 40, inv, "past the end of the file");
    hostile(128, 1 << 40, inv, "grain directory (sectors");
}

#[test]
fn hostile_volatile_headers_are_refused() {
    hostile(
        512,
        0xCAFE_BABE,
        ErrorKind::InvalidDisk,
        "volatile header magic",
    );
    hostile(
        512 + 24,
        1,
        ErrorKind::NeedsRepair,
        "journal must be replayed",
    );
    hostile(
        512 + 100,
        1,
        ErrorKind::InvalidDisk,
        "volatile header padding",
    );
}

#[test]
fn hostile_grain_directories_are_refused() {
    let inv = ErrorKind::InvalidDisk;
    hostile(
        GD * 512,
        0x2000_0000_0000_0001,
        inv,
        "entry 0 is 0x2000000000000001",
    );
    hostile(GD * 512 + 8, 0x1000_0001_0000_0000, inv, "entry 1 is");
    hostile(GD * 512 + 16, 7, inv, "neither 0 nor");
    hostile(
        GD * 512,
        GDE_TABLE | 32,
        inv,
        "names grain table 32, outside",
    );
    hostile(
        GD * 512,
        GDE_TABLE | 0xFFFF_FFFF,
        inv,
        "outside the grain table area",
    );
    // Two entries sharing a table.
    let dir = tempfile::tempdir().unwrap();
    let p = make(dir.path(), 204_800);
    poke(&p, GD * 512 + 8, &(GDE_TABLE | 2).to_le_bytes());
    poke(&p, GD * 512 + 48, &(GDE_TABLE | 2).to_le_bytes());
    expect_open_error(&p, inv, "entries 1 and 6 share grain table 2");
    // A table past the end of the file (the area reaches beyond it).
    let p2 = dir.path().join("short");
    std::fs::copy(&p, &p2).unwrap();
    poke(&p2, GD * 512 + 48, &0u64.to_le_bytes());
    let s = FileStorage::open(&p2, true, LockMode::None).unwrap();
    s.set_len((GTS + 64) * 512).unwrap();
    drop(s);
    expect_open_error(
        &p2,
        inv,
        "grain table 2 (grain directory entry 1) ends at byte",
    );
    // Too short for a header.
    let p3 = dir.path().join("tiny");
    std::fs::write(&p3, [0u8; 100]).unwrap();
    expect_open_error(&p3, inv, "too short");
}

#[test]
fn hostile_grain_table_entries_fail_on_use() {
    let cases: [(u64, &str); 4] = [
        (
            encode_slot(25_600),
            "names grain slot 25600, past the grain area",
        ),
        (encode_slot(25_599), "past the end of the file"),
        (0x0000_0000_0000_0005, "non-zero payload"),
        (0x7000_0000_0000_0000, "unknown grain type 0x7"),
    ];
    for (entry, needle) in cases {
        let dir = tempfile::tempdir().unwrap();
        let p = make(dir.path(), 204_800);
        poke(&p, GD * 512, &GDE_TABLE.to_le_bytes());
        poke(&p, GTS * 512 + 8 * 5, &entry.to_le_bytes());
        let before = std::fs::read(&p).unwrap();
        for writable in [false, true] {
            let ext = open(&p, writable).unwrap();
            // Grains before it are fine; the bad one stops the answer.
            assert_eq!(
                ext.map(0, 4096 * 5).unwrap(),
                (ExtentMapping::Unallocated, 4096 * 5)
            );
            let e = ext.map(0, 4096 * 6).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidDisk);
            assert!(e.to_string().contains(needle), "{e} lacks {needle:?}");
            if writable {
                let e = ext.write(4096 * 5 + 1, &[1], &zeros).unwrap_err();
                assert_eq!(e.kind(), ErrorKind::InvalidDisk);
            }
        }
        assert!(std::fs::read(&p).unwrap() == before, "file changed");
    }
}
