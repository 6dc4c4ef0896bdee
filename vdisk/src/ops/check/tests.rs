//! Repairs swept in windows of grain slots (a tiny bitmap budget, as a file with
//! more slots than [`CHECK_BITMAP_BITS`] is swept) find and fix what one window
//! finds and fixes.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{check_with, CheckOptions, CheckReport};
#[cfg(doc)]
use crate::limits::CHECK_BITMAP_BITS;
use crate::ops::child::create_child;
use crate::ops::create::{create, CreateOptions};
use crate::{Disk, DiskType, OpenOptions};

const MIB: u64 = 1 << 20;

fn opts(repair: bool, bits: u64) -> CheckOptions {
    CheckOptions {
        repair,
        bitmap_bits: bits,
        lock: true,
    }
}

fn write(path: &Path, writes: &[(u64, u8, usize)]) {
    let d = OpenOptions::new().write(true).open(path).unwrap();
    for &(off, byte, len) in writes {
        let data: Vec<u8> = (0..len).map(|i| byte ^ (i as u8)).collect();
        d.write_at(&data, off).unwrap();
    }
    d.close().unwrap();
}

fn content(path: &Path) -> Vec<u8> {
    let d = Disk::open(path).unwrap();
    let mut buf = vec![0u8; d.capacity() as usize];
    d.read_at(&mut buf, 0).unwrap();
    buf
}

fn u32_at(f: &std::fs::File, at: u64) -> u32 {
    let mut b = [0u8; 4];
    f.read_exact_at(&mut b, at).unwrap();
    u32::from_le_bytes(b)
}

/// Copies every file of `from` into a new folder.
fn copy_dir(from: &Path) -> tempfile::TempDir {
    let to = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.path().join(e.file_name())).unwrap();
    }
    to
}

/// Repairs a copy of the disk `name` in `dir` with `bits` per bitmap; returns the
/// report and the content afterwards, after checking the repair converged.
fn repair_copy(dir: &Path, name: &str, bits: u64) -> (CheckReport, Vec<u8>) {
    let copy = copy_dir(dir);
    let p = copy.path().join(name);
    let found = check_with(&p, &opts(false, bits)).unwrap();
    let fixed = check_with(&p, &opts(true, bits)).unwrap();
    assert!(
        fixed.repaired && fixed.unrepaired() == 0,
        "{bits}: {fixed:?}"
    );
    assert_eq!(
        found.problems(),
        fixed.problems(),
        "{bits}: check and repair disagree"
    );
    let again = check_with(&p, &opts(false, bits)).unwrap();
    assert!(again.is_clean(), "{bits}: {again:?}");
    let twice = check_with(&p, &opts(true, bits)).unwrap();
    assert!(!twice.repaired, "{bits}: a second repair wrote");
    (fixed, content(&p))
}

fn same_in_windows(dir: &Path, name: &str) {
    let (one, a) = repair_copy(dir, name, super::CHECK_BITMAP_BITS);
    let (many, b) = repair_copy(dir, name, 64);
    assert!(a == b, "{name}: the windowed repair reads differently");
    let shared = |r: &CheckReport| {
        r.findings
            .iter()
            .filter(|f| f.problem.contains("another entry uses too"))
            .count()
    };
    assert!(shared(&one) > 0, "{name}: no shared grain found: {one:?}");
    assert_eq!(shared(&one), shared(&many), "{name}: {one:?}\n{many:?}");
}

fn hosted(dir: &Path) -> PathBuf {
    let p = dir.join("d.vmdk");
    create(
        &p,
        &CreateOptions::new(DiskType::MonolithicSparse, 64 * MIB),
    )
    .unwrap();
    write(
        &p,
        &[(0, 1, 2 * MIB as usize), (40 * MIB, 2, 6 * MIB as usize)],
    );
    p
}

#[test]
fn hosted_sparse_shared_grains_in_windows() {
    let dir = tempfile::tempdir().unwrap();
    let p = hosted(dir.path());
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    let mut hb = [0u8; 512];
    f.read_exact_at(&mut hb, 0).unwrap();
    let h = crate::extent::sparse::SparseHeader::parse(&hb).unwrap();
    // In both copies of tables 0 and 1, entries pointing at grains of other entries
    // (early and late in the file: different windows of 64 slots).
    for dir_at in [h.gd_offset, h.rgd_offset] {
        let t0 = u64::from(u32_at(&f, dir_at * 512));
        let t1 = u64::from(u32_at(&f, dir_at * 512 + 4));
        let early = u32_at(&f, t0 * 512 + 4);
        let late = u32_at(&f, t1 * 512 + 4 * 300);
        f.write_all_at(&early.to_le_bytes(), t0 * 512 + 4 * 7)
            .unwrap();
        f.write_all_at(&late.to_le_bytes(), t1 * 512 + 4 * 310)
            .unwrap();
    }
    drop(f);
    same_in_windows(dir.path(), "d.vmdk");
}

#[test]
fn cowd_shared_grains_in_windows() {
    let dir = tempfile::tempdir().unwrap();
    let base = hosted(dir.path());
    let child = dir.path().join("d-000001.vmdk");
    create_child(&base, &child, DiskType::VmfsSparse).unwrap();
    write(&child, &[(MIB, 3, 200_000), (50 * MIB, 4, 100_000)]);
    let delta = dir.path().join("d-000001-delta.vmdk");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&delta)
        .unwrap();
    let gd = u64::from(u32_at(&f, 20));
    let t0 = u64::from(u32_at(&f, gd * 512 + 4 * ((MIB / 512) / 4096)));
    let first = (MIB / 512) % 4096;
    let a = u32_at(&f, t0 * 512 + 4 * first);
    // Entry 10 sectors on names the grain of the first entry.
    f.write_all_at(&a.to_le_bytes(), t0 * 512 + 4 * (first + 10))
        .unwrap();
    drop(f);
    same_in_windows(dir.path(), "d-000001.vmdk");
}
