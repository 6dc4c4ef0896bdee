//! Check and repair (`vdisk::ops::check`) on damage the earlier check missed or made
//! worse: every link of a chain and every sparse kind is checked, maintenance
//! refuses a disk a repair would recover, repair converges (a second repair finds
//! nothing, the disk opens and reads), a damaged flat extent line is not "repaired"
//! into a terabyte file, and truncated streams are reported.
//!
//! The repair-convergence test damages disks of every sparse kind at random (seeded:
//! `VDISK_DAMAGE_SEED`, `VDISK_DAMAGE_ROUNDS`) and requires of every outcome: either
//! the check says something cannot be repaired (and repair says the same), or after
//! one repair the disk checks clean, opens, reads end to end, and a second repair
//! writes nothing.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::Rng;
use vdisk::extent::sparse::header::{SparseHeader, HEADER_SIZE};
use vdisk::ops::check::{check, CheckReport};
use vdisk::ops::child::create_child;
use vdisk::ops::defrag::defragment;
use vdisk::ops::shrink::shrink;
use vdisk::{create, CreateOptions, Disk, DiskType, ErrorKind, OpenOptions};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;
const GRAIN: u64 = 64 * KIB;

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng(seed ^ 0x5eed);
    let mut v = r.bytes(len);
    for b in v.iter_mut().step_by(512) {
        *b |= 1;
    }
    v
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temporary folder")
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = File::open(path).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
}

fn poke(path: &Path, offset: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

fn set_len(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

fn header(path: &Path) -> SparseHeader {
    let mut b = [0u8; HEADER_SIZE];
    b.copy_from_slice(&read_at(path, 0, HEADER_SIZE));
    SparseHeader::parse(&b).unwrap()
}

fn u32_at(path: &Path, offset: u64) -> u32 {
    u32::from_le_bytes(read_at(path, offset, 4).try_into().unwrap())
}

fn u64_at(path: &Path, offset: u64) -> u64 {
    u64::from_le_bytes(read_at(path, offset, 8).try_into().unwrap())
}

/// Every file of `dir` with its bytes.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    v.sort();
    v
}

fn describe(r: &CheckReport) -> String {
    let mut s = format!("repaired={} unlisted={} findings:", r.repaired, r.unlisted);
    for f in &r.findings {
        s.push_str(&format!(
            "\n  {}: {} (repairable {})",
            f.file.display(),
            f.problem,
            f.repairable
        ));
    }
    s
}

/// The whole content of a disk.
fn content(path: &Path) -> Vec<u8> {
    let d = Disk::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; d.capacity() as usize];
    d.read_at(&mut buf, 0)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    buf
}

fn write(path: &Path, writes: &[(u64, Vec<u8>)]) {
    let d = OpenOptions::new().write(true).open(path).unwrap();
    for (off, data) in writes {
        d.write_at(data, *off).unwrap();
    }
    d.close().unwrap();
}

/// A 64 MiB monolithicSparse disk with data in both grain tables' ranges (a table
/// covers 32 MiB).
fn sparse_disk(dir: &Path) -> PathBuf {
    let p = dir.join("d.vmdk");
    create(
        &p,
        &CreateOptions::new(DiskType::MonolithicSparse, 64 * MIB),
    )
    .unwrap();
    write(
        &p,
        &[
            (0, pattern(1, 300 * KIB as usize)),
            (33 * MIB + 5000, pattern(2, 200 * KIB as usize)),
            (60 * MIB, pattern(3, 3 * GRAIN as usize)),
        ],
    );
    p
}

/// Asserts the disk is repaired for good: checks clean, opens and reads, and a
/// second repair writes nothing.
fn assert_converged(path: &Path, ctx: &str) {
    let r = check(path, false).unwrap_or_else(|e| panic!("{ctx}: check: {e}"));
    assert!(
        r.is_clean(),
        "{ctx}: not clean after repair: {}",
        describe(&r)
    );
    content(path);
    let again = check(path, true).unwrap_or_else(|e| panic!("{ctx}: second repair: {e}"));
    assert!(
        again.is_clean() && !again.repaired,
        "{ctx}: the second repair found or wrote something: {}",
        describe(&again)
    );
}

/// Defect: with a primary grain-directory entry zeroed but its redundant copy
/// intact, shrink and defragment treated that table's grains as free (and shrink
/// truncated them away). Both must refuse; repair restores the data.
#[test]
fn shrink_and_defragment_refuse_a_disk_repair_would_recover() {
    let dir = tempdir();
    let p = sparse_disk(dir.path());
    let want = content(&p);
    let h = header(&p);
    // Grain directory entry 1 (guest 32..64 MiB) zeroed in the primary only.
    poke(&p, h.gd_offset * SECTOR + 4, &0u32.to_le_bytes());
    let found = check(&p, false).unwrap();
    assert!(
        !found.is_clean() && found.all_repairable(),
        "{}",
        describe(&found)
    );
    let before = snapshot(dir.path());
    let e = shrink(&p, &mut |_, _| true).expect_err("shrink of a disk that needs a repair");
    assert_eq!(e.kind(), ErrorKind::NeedsRepair, "shrink: {e}");
    assert_eq!(snapshot(dir.path()), before, "shrink changed a file");
    let e = defragment(&p, &mut |_, _| true).expect_err("defragment of a disk that needs a repair");
    assert_eq!(e.kind(), ErrorKind::NeedsRepair, "defragment: {e}");
    assert_eq!(snapshot(dir.path()), before, "defragment changed a file");
    let fixed = check(&p, true).unwrap();
    assert!(
        fixed.repaired && fixed.unrepaired() == 0,
        "{}",
        describe(&fixed)
    );
    assert!(content(&p) == want, "repair did not restore the data");
    assert_converged(&p, "after the repair");
    shrink(&p, &mut |_, _| true).unwrap();
    assert!(
        content(&p) == want,
        "shrink after the repair changed the data"
    );
}

/// Defect: a grain cut short by the end of the file was kept and the file extended,
/// but a table rebuilt in the same repair was placed from the old file length,
/// inside that grain: the disk did not open, and a second repair dropped the grain.
#[test]
fn repair_of_a_cut_grain_and_a_lost_table_converges() {
    for (cut, shift) in [(GRAIN / 2, 0), (3 * SECTOR, 0), (3 * GRAIN / 4, GRAIN / 2)] {
        let dir = tempdir();
        let p = sparse_disk(dir.path());
        let want = content(&p);
        let h = header(&p);
        if shift > 0 {
            // The last grain moved half a grain further (not on the grain grid, as
            // files of other producers may have it).
            let gd1 = u32_at(&p, h.gd_offset * SECTOR + 4);
            let rgd1 = u32_at(&p, h.rgd_offset * SECTOR + 4);
            let (mut at, mut last) = (0, 0);
            for j in 0..u64::from(h.num_gtes_per_gt) {
                let e = u32_at(&p, u64::from(gd1) * SECTOR + 4 * j);
                if e > last {
                    (at, last) = (j, e);
                }
            }
            let grain = read_at(&p, u64::from(last) * SECTOR, GRAIN as usize);
            let moved = u64::from(last) + shift / SECTOR;
            poke(&p, moved * SECTOR, &grain);
            for t in [gd1, rgd1] {
                poke(
                    &p,
                    u64::from(t) * SECTOR + 4 * at,
                    &(moved as u32).to_le_bytes(),
                );
            }
            assert_eq!(file_len(&p), (moved * SECTOR) + GRAIN);
        }
        let len = file_len(&p);
        set_len(&p, len - cut);
        // The primary table of directory entry 0 points past the end of the file:
        // repair must rebuild it at a new place from the redundant copy.
        poke(
            &p,
            h.gd_offset * SECTOR,
            &((len / SECTOR + 100) as u32).to_le_bytes(),
        );
        let ctx = format!("cut by {cut} bytes");
        let fixed = check(&p, true).unwrap();
        assert!(
            fixed.repaired && fixed.unrepaired() == 0,
            "{ctx}: {}",
            describe(&fixed)
        );
        assert_converged(&p, &ctx);
        // Everything but the cut part of the last grain reads as before.
        let got = content(&p);
        let last = 60 * MIB + 2 * GRAIN;
        assert!(
            got[..last as usize] == want[..last as usize],
            "{ctx}: data lost"
        );
        let keep = (GRAIN - cut) as usize;
        assert!(
            got[last as usize..last as usize + keep] == want[last as usize..last as usize + keep],
            "{ctx}: the kept part of the cut grain"
        );
    }
}

/// A base with data and a child of `t` with data of its own.
fn chain(dir: &Path, t: DiskType) -> (PathBuf, PathBuf, PathBuf) {
    let base = dir.join("base.vmdk");
    create(
        &base,
        &CreateOptions::new(DiskType::MonolithicSparse, 32 * MIB),
    )
    .unwrap();
    write(&base, &[(0, pattern(10, 4 * MIB as usize))]);
    let child = dir.join("base-000001.vmdk");
    create_child(&base, &child, t).unwrap();
    write(
        &child,
        &[
            (MIB, pattern(11, 300 * KIB as usize)),
            (20 * MIB, pattern(12, 5000)),
        ],
    );
    let extent = Disk::open(&child).unwrap().links()[0].extents()[0]
        .path
        .clone()
        .unwrap();
    (base, child, extent)
}

/// Defect: check saw only hosted sparse and flat extents of the top link. A
/// vmfsSparse (COWD) delta with a table entry past the end of its file, a seSparse
/// delta with an entry of an unknown type, and a damaged table in the parent of a
/// child all passed `-e`, and `-R` did nothing.
#[test]
fn check_covers_every_sparse_kind_and_every_link() {
    // vmfsSparse: the first table's first data entry points far past the end.
    let dir = tempdir();
    let (_, child, delta) = chain(dir.path(), DiskType::VmfsSparse);
    let gd_offset = u64::from(u32_at(&delta, 20));
    let gt = u64::from(u32_at(&delta, gd_offset * SECTOR));
    assert_ne!(gt, 0);
    let entry = (0..4096u64)
        .map(|j| gt * SECTOR + 4 * j)
        .find(|&at| u32_at(&delta, at) != 0)
        .unwrap();
    poke(&delta, entry, &0x7fff_0000u32.to_le_bytes());
    damaged_and_repaired(&child, &delta, "vmfsSparse delta");

    // seSparse: an entry of the first table gets an unknown type.
    let dir = tempdir();
    let (_, child, delta) = chain(dir.path(), DiskType::SeSparse);
    let gd_at = u64_at(&delta, 80 + 6 * 8) * SECTOR;
    let gt_area = u64_at(&delta, 80 + 8 * 8) * SECTOR;
    let gde = u64_at(&delta, gd_at);
    assert_eq!(gde >> 32, 0x1000_0000, "a table reference");
    let table = gt_area + (gde & 0xffff_ffff) * 64 * SECTOR;
    let entry = (0..4096u64)
        .map(|j| table + 8 * j)
        .find(|&at| u64_at(&delta, at) >> 60 == 3)
        .unwrap();
    poke(&delta, entry, &0x5000_0000_0000_0001u64.to_le_bytes());
    damaged_and_repaired(&child, &delta, "seSparse delta");

    // A damaged table in the parent of a monolithicSparse child.
    let dir = tempdir();
    let (base, child, _) = chain(dir.path(), DiskType::MonolithicSparse);
    let h = header(&base);
    let gt = u32_at(&base, h.gd_offset * SECTOR);
    poke(
        &base,
        u64::from(gt) * SECTOR + 8,
        &0x7fff_0000u32.to_le_bytes(),
    );
    damaged_and_repaired(&child, &base, "parent of a child");

    // A COWD delta left open by its writer.
    let dir = tempdir();
    let (_, child, delta) = chain(dir.path(), DiskType::VmfsSparse);
    poke(&delta, 1648, &1u32.to_le_bytes());
    damaged_and_repaired(&child, &delta, "vmfsSparse unclean");
    assert_eq!(u32_at(&delta, 1648), 0, "COWD unclean flag still set");
}

/// `check(disk)` names `damaged`; repair fixes it and converges.
fn damaged_and_repaired(disk: &Path, damaged: &Path, ctx: &str) {
    let found = check(disk, false).unwrap_or_else(|e| panic!("{ctx}: {e}"));
    assert!(!found.is_clean(), "{ctx}: check found nothing");
    assert!(
        found.findings.iter().any(|f| f.file == damaged),
        "{ctx}: no finding names {}: {}",
        damaged.display(),
        describe(&found)
    );
    assert!(found.all_repairable(), "{ctx}: {}", describe(&found));
    let fixed = check(disk, true).unwrap_or_else(|e| panic!("{ctx}: repair: {e}"));
    assert!(
        fixed.repaired && fixed.unrepaired() == 0,
        "{ctx}: {}",
        describe(&fixed)
    );
    assert_converged(disk, ctx);
}

/// Defect: a damaged flat extent line (a size of 2 TiB for a 2 MiB file) made `-R`
/// extend the file to 2 TiB. The geometry says the line is wrong: not repaired,
/// and the file keeps its size.
#[test]
fn a_damaged_flat_extent_line_is_not_repaired_into_a_huge_file() {
    let dir = tempdir();
    let p = dir.path().join("d.vmdk");
    create(&p, &CreateOptions::new(DiskType::MonolithicFlat, 2 * MIB)).unwrap();
    let text = std::fs::read_to_string(&p).unwrap();
    assert!(text.contains("RW 4096 FLAT"), "{text}");
    std::fs::write(&p, text.replace("RW 4096 FLAT", "RW 4294967295 FLAT")).unwrap();
    let flat = dir.path().join("d-flat.vmdk");
    let r = check(&p, true).unwrap();
    assert!(r.unrepaired() > 0, "{}", describe(&r));
    assert!(
        r.findings
            .iter()
            .any(|f| f.file == flat && f.problem.contains("may be damaged")),
        "{}",
        describe(&r)
    );
    assert_eq!(file_len(&flat), 2 * MIB, "the flat file was extended");

    // A genuinely short file (a copy that stopped half way) is still extended.
    let dir = tempdir();
    let p = dir.path().join("d.vmdk");
    create(&p, &CreateOptions::new(DiskType::MonolithicFlat, 8 * MIB)).unwrap();
    let flat = dir.path().join("d-flat.vmdk");
    set_len(&flat, 3 * MIB);
    let r = check(&p, true).unwrap();
    assert!(r.repaired && r.unrepaired() == 0, "{}", describe(&r));
    assert_eq!(file_len(&flat), 8 * MIB);
}

/// Defect: a streamOptimized file cut at a grain boundary, or without its
/// end-of-stream marker, read as zeros past the cut and `-e` called it correctly
/// configured. The layout VMware wrote (directory at the front, grains, EOS) loses
/// only its marker here: the grains all read, but check reports the truncation.
#[test]
fn check_reports_a_stream_without_its_end() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/corpus/vmware/streamOptimized.vmdk");
    let dir = tempdir();
    let p = dir.path().join("streamOptimized.vmdk");
    std::fs::copy(&src, &p).unwrap();
    assert!(check(&p, false).unwrap().is_clean(), "the sample itself");
    let len = file_len(&p);
    assert_eq!(read_at(&p, len - SECTOR, SECTOR as usize), vec![0u8; 512]);
    set_len(&p, len - SECTOR);
    let r = check(&p, false).unwrap();
    assert!(
        r.findings
            .iter()
            .any(|f| !f.repairable && f.problem.contains("truncated")),
        "{}",
        describe(&r)
    );
    // Cut at a grain boundary further in: the grains past the cut are named by the
    // tables but gone.
    set_len(&p, 372 * SECTOR);
    let r = check(&p, true).unwrap();
    assert!(r.unrepaired() > 0, "{}", describe(&r));
}

/// Random damage to every sparse kind: repair either says it cannot, or leaves a
/// disk that checks clean, opens, reads, and needs no second repair.
#[test]
fn repair_converges_on_random_damage() {
    let seed = std::env::var("VDISK_DAMAGE_SEED")
        .ok()
        .and_then(|s| {
            s.strip_prefix("0x")
                .map_or_else(|| s.parse().ok(), |h| u64::from_str_radix(h, 16).ok())
        })
        .unwrap_or(0xdead_beef);
    let rounds: u64 = std::env::var("VDISK_DAMAGE_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24);
    let proto = tempdir();
    let kinds = [
        ("monolithicSparse", DiskType::MonolithicSparse),
        ("vmfsSparse child", DiskType::VmfsSparse),
        ("seSparse child", DiskType::SeSparse),
    ];
    let mut made = Vec::new();
    for (name, t) in kinds {
        let d = proto.path().join(name.replace(' ', "_"));
        std::fs::create_dir(&d).unwrap();
        let (disk, victim) = if t == DiskType::MonolithicSparse {
            let p = sparse_disk(&d);
            (p.clone(), p)
        } else {
            let (_, child, delta) = chain(&d, t);
            (child, delta)
        };
        made.push((name, d, disk, victim));
    }
    let (mut fatal, mut repaired, mut clean) = (0, 0, 0);
    for round in 0..rounds {
        for (name, proto_dir, disk, victim) in &made {
            let mut rng = Rng(seed ^ round.wrapping_mul(0x9e37_79b9) ^ name.len() as u64);
            let work = tempdir();
            for (f, bytes) in snapshot(proto_dir) {
                std::fs::write(work.path().join(f.file_name().unwrap()), bytes).unwrap();
            }
            let disk = work.path().join(disk.file_name().unwrap());
            let victim = work.path().join(victim.file_name().unwrap());
            let what = damage(&victim, &mut rng);
            let ctx = format!("{name} round {round} (seed {seed:#x}): {what}");
            let found = check(&disk, false).unwrap_or_else(|e| panic!("{ctx}: check: {e}"));
            let fixed = check(&disk, true).unwrap_or_else(|e| panic!("{ctx}: repair: {e}"));
            if fixed.unrepaired() > 0 {
                assert!(
                    !found.all_repairable(),
                    "{ctx}: check said repairable, repair could not: {}\nbefore: {}",
                    describe(&fixed),
                    describe(&found)
                );
                fatal += 1;
                if std::env::var_os("VDISK_DAMAGE_VERBOSE").is_some() {
                    println!("{ctx}: {}", describe(&fixed));
                }
                continue;
            }
            if found.is_clean() {
                clean += 1;
            } else {
                repaired += 1;
            }
            assert_converged(&disk, &ctx);
        }
    }
    println!("random damage: {repaired} repaired, {fatal} unrepairable, {clean} harmless");
    assert!(repaired > 0, "no round needed a repair");
}

/// The directories and tables of a sparse file: `(byte offset, entry width, entries)`.
fn table_places(p: &Path) -> Vec<(u64, u64, u64)> {
    let magic = read_at(p, 0, 8);
    let len = file_len(p);
    let mut out = Vec::new();
    let mut push_u32_tables = |gd_at: u64, n: u64, per: u64| {
        out.push((gd_at * SECTOR, 4, n));
        for i in 0..n {
            let t = u64::from(u32_at(p, gd_at * SECTOR + 4 * i));
            if t != 0 && (t * SECTOR + per * 4) <= len {
                out.push((t * SECTOR, 4, per));
            }
        }
    };
    if &magic[..4] == b"KDMV" {
        let h = header(p);
        push_u32_tables(h.gd_offset, h.num_gdes(), u64::from(h.num_gtes_per_gt));
        if h.has_redundant_gd() {
            push_u32_tables(h.rgd_offset, h.num_gdes(), u64::from(h.num_gtes_per_gt));
        }
    } else if &magic[..4] == b"COWD" {
        push_u32_tables(u64::from(u32_at(p, 20)), u64::from(u32_at(p, 24)), 4096);
    } else {
        let gd_at = u64_at(p, 80 + 6 * 8) * SECTOR;
        let gt_area = u64_at(p, 80 + 8 * 8) * SECTOR;
        let n = u64_at(p, 16).div_ceil(4096 * 8);
        out.push((gd_at, 8, n));
        for i in 0..n {
            let e = u64_at(p, gd_at + 8 * i);
            if e >> 32 == 0x1000_0000 {
                out.push((gt_area + (e & 0xffff_ffff) * 64 * SECTOR, 8, 4096));
            }
        }
    }
    out
}

/// Damages the sparse file `p` at random; returns what was done.
fn damage(p: &Path, rng: &mut Rng) -> String {
    let len = file_len(p);
    let mut done = Vec::new();
    for _ in 0..rng.range(1, 3) {
        let step = match rng.below(8) {
            // An entry of a real grain table, or of a directory.
            6 | 7 => {
                let places = table_places(p);
                if places.is_empty() {
                    continue;
                }
                let (at, width, count) = places[rng.below(places.len() as u64) as usize];
                let e = at + rng.below(count) * width;
                let v = match rng.below(4) {
                    0 => 0,
                    1 => rng.below(len / SECTOR + 64),
                    2 => u64_at(p, places[0].0),
                    _ => rng.next(),
                };
                poke(p, e, &v.to_le_bytes()[..width as usize]);
                format!("entry at byte {e} set to {v:#x}")
            }
            // A random 32-bit value somewhere in the metadata before the data.
            0 | 1 => {
                let meta_end = (len / 4).clamp(4 * SECTOR, 2 * MIB).min(len);
                let at = rng.below(meta_end / 4) * 4;
                let v = match rng.below(4) {
                    0 => 0,
                    1 => rng.below(len / SECTOR + 64) as u32,
                    2 => u32_at(p, rng.below(meta_end / 4) * 4),
                    _ => rng.next() as u32,
                };
                poke(p, at, &v.to_le_bytes());
                format!("u32 {v:#x} at byte {at}")
            }
            // A whole sector of junk or zeros in the metadata.
            2 => {
                let meta_end = (len / 4).clamp(4 * SECTOR, 2 * MIB).min(len);
                let s = rng.range(1, meta_end / SECTOR - 1);
                let junk = rng.percent(50);
                let bytes = if junk {
                    rng.bytes(SECTOR as usize)
                } else {
                    vec![0; SECTOR as usize]
                };
                poke(p, s * SECTOR, &bytes);
                format!("sector {s} {}", if junk { "junk" } else { "zeroed" })
            }
            // Cut the end of the file.
            3 => {
                let cut = rng.range(1, (len / 8).min(3 * GRAIN));
                set_len(p, len - cut);
                format!("cut {cut} bytes")
            }
            // Copy one 32-bit word over another (shared entries).
            4 => {
                let meta_end = (len / 4).clamp(4 * SECTOR, 2 * MIB).min(len);
                let from = rng.below(meta_end / 4) * 4;
                let to = rng.below(meta_end / 4) * 4;
                poke(p, to, &read_at(p, from, 4));
                format!("word at {from} copied to {to}")
            }
            // The unclean flag (hosted sparse and COWD places).
            _ => {
                let at = if read_at(p, 0, 4) == b"COWD" {
                    1648
                } else {
                    72
                };
                if at < len {
                    poke(p, at, &[1]);
                }
                format!("byte 1 at {at}")
            }
        };
        done.push(step);
    }
    done.join(", ")
}
