//! Disk maintenance (grow, shrink, defragment, check and repair) at the library level.
//!
//! Every operation must keep the guest content byte for byte (grown space reads as
//! zeros), refuse the disk types it does not handle without touching a file, and a
//! repair must turn a damaged disk back into one that opens, reads as before (where
//! the data survived) and checks clean. Expected content comes from a model of the
//! writes; sparse files are also inspected directly (header, directories, tables).

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::{assert_same, merge_ranges};

use vdisk::extent::sparse::header::{SparseHeader, HEADER_SIZE};
use vdisk::ops::check::{check, CheckReport};
use vdisk::ops::defrag::defragment;
use vdisk::ops::grow::{grow, GrowOptions};
use vdisk::ops::shrink::shrink;
use vdisk::{
    convert, create, ConvertOptions, CreateOptions, Disk, DiskType, ErrorKind, ImageFormat,
    OpenOptions, RangeKind,
};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const SECTOR: u64 = 512;
const GRAIN: u64 = 64 * KIB;
/// Size of one extent of a split (twoGbMaxExtent*) disk created by us.
const SPLIT: u64 = 2047 * MIB;
/// Offset of the uncleanShutdown byte in a hosted sparse header.
const UNCLEAN_OFFSET: u64 = 72;
/// Disks up to this capacity are verified by reading them whole.
const FULL_READ_LIMIT: u64 = 512 * MIB;
/// Bytes per read when verifying.
const CHUNK: u64 = 4 * MIB;

/// Types that grow.
const GROWABLE: [DiskType; 6] = [
    DiskType::MonolithicSparse,
    DiskType::TwoGbMaxExtentSparse,
    DiskType::MonolithicFlat,
    DiskType::TwoGbMaxExtentFlat,
    DiskType::Vmfs,
    DiskType::VmfsThin,
];
/// Flat (preallocated or thin ESX) types.
const FLAT: [DiskType; 4] = [
    DiskType::MonolithicFlat,
    DiskType::TwoGbMaxExtentFlat,
    DiskType::Vmfs,
    DiskType::VmfsThin,
];

// ---------------------------------------------------------------------------------
// Expected content
// ---------------------------------------------------------------------------------

/// Deterministic pseudo-random bytes (splitmix64); no 8-byte run is all zeros.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x0123_4567_89ab_cdef;
    while out.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        out.extend_from_slice(&(z | 1).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The expected guest content: the writes in order over zeros, plus the places
/// worth reading on a disk too big to read whole.
#[derive(Clone)]
struct Expect {
    capacity: u64,
    writes: Vec<(u64, Vec<u8>)>,
    /// Extra offsets to read around on big disks (old capacities, boundaries).
    marks: Vec<u64>,
}

impl Expect {
    fn new(capacity: u64) -> Expect {
        Expect {
            capacity,
            writes: Vec::new(),
            marks: Vec::new(),
        }
    }

    fn record(&mut self, offset: u64, data: Vec<u8>) {
        assert!(offset + data.len() as u64 <= self.capacity, "test bug");
        self.writes.push((offset, data));
    }

    fn bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        let end = offset + len as u64;
        for (w_off, data) in &self.writes {
            let w_end = w_off + data.len() as u64;
            let from = offset.max(*w_off);
            let to = end.min(w_end);
            if from < to {
                out[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&data[(from - w_off) as usize..(to - w_off) as usize]);
            }
        }
        out
    }

    /// Byte ranges written (not merged).
    fn written(&self) -> Vec<(u64, u64)> {
        self.writes
            .iter()
            .map(|(o, d)| (*o, *o + d.len() as u64))
            .collect()
    }

    /// The ranges to read back: everything on a small disk; on a big one the written
    /// ranges, the marks and the split boundaries with a margin, the end of the disk
    /// and a few windows spread over the whole capacity.
    fn windows(&self) -> Vec<(u64, u64)> {
        let cap = self.capacity;
        if cap <= FULL_READ_LIMIT {
            return vec![(0, cap)];
        }
        let mut w: Vec<(u64, u64)> = Vec::new();
        let around = |p: u64| (p.saturating_sub(MIB), (p + MIB).min(cap));
        for (s, e) in self.written() {
            w.push((s.saturating_sub(MIB), (e + MIB).min(cap)));
        }
        for &m in &self.marks {
            w.push(around(m));
        }
        let mut b = SPLIT;
        while b < cap {
            w.push(around(b));
            b += SPLIT;
        }
        w.push((cap.saturating_sub(2 * MIB), cap));
        for i in 1..8u64 {
            let p = (cap / 8 * i) / SECTOR * SECTOR;
            w.push(around(p));
        }
        merge_ranges(w)
    }
}

/// Reads `path` through the library and compares it with `exp` (whole disk when
/// small, windows when big). For hosted sparse disks also checks that the
/// allocation map shows data only in grains that were written.
fn verify(path: &Path, exp: &Expect, ctx: &str) {
    let d = Disk::open(path).unwrap_or_else(|e| panic!("{ctx}: open {}: {e}", path.display()));
    assert_eq!(d.capacity(), exp.capacity, "{ctx}: capacity");
    for (start, end) in exp.windows() {
        let mut off = start;
        while off < end {
            let n = (end - off).min(CHUNK) as usize;
            let mut buf = vec![0u8; n];
            d.read_at(&mut buf, off)
                .unwrap_or_else(|e| panic!("{ctx}: read {n} at {off}: {e}"));
            assert_same(&buf, &exp.bytes(off, n), off, ctx);
            off += n as u64;
        }
    }
    let info = d.info().unwrap_or_else(|e| panic!("{ctx}: info: {e}"));
    if matches!(
        info.disk_type,
        Some(DiskType::MonolithicSparse | DiskType::TwoGbMaxExtentSparse)
    ) {
        let written: Vec<(u64, u64)> = exp
            .written()
            .into_iter()
            .map(|(s, e)| (s / GRAIN * GRAIN, e.div_ceil(GRAIN) * GRAIN))
            .collect();
        let map = d
            .allocation_map(0, exp.capacity)
            .unwrap_or_else(|e| panic!("{ctx}: allocation map: {e}"));
        for r in map.iter().filter(|r| r.kind == RangeKind::Data) {
            let covered = (r.offset..r.offset + r.length)
                .step_by(GRAIN as usize)
                .all(|g| written.iter().any(|&(s, e)| s <= g && g < e));
            assert!(
                covered,
                "{ctx}: data at {}+{} where nothing was written",
                r.offset, r.length
            );
        }
    }
}

// ---------------------------------------------------------------------------------
// Disks and files
// ---------------------------------------------------------------------------------

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temporary folder")
}

/// Creates `dir/d.vmdk` of type `t` and `capacity` bytes.
fn new_disk(dir: &Path, t: DiskType, capacity: u64) -> (PathBuf, Expect) {
    let path = dir.join("d.vmdk");
    create(&path, &CreateOptions::new(t, capacity))
        .unwrap_or_else(|e| panic!("create {t} of {capacity}: {e}"));
    (path, Expect::new(capacity))
}

/// Writes each `(offset, data)` in its own call, in order, then closes the disk.
fn write_disk(path: &Path, exp: &mut Expect, writes: Vec<(u64, Vec<u8>)>) {
    let d = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} for writing: {e}", path.display()));
    for (off, data) in writes {
        d.write_at(&data, off)
            .unwrap_or_else(|e| panic!("write {} at {off}: {e}", data.len()));
        exp.record(off, data);
    }
    d.close().unwrap();
}

/// A streamOptimized disk of 8 MiB with some data, made by converting a raw file.
fn new_stream_disk(dir: &Path) -> (PathBuf, Expect) {
    let mut exp = Expect::new(8 * MIB);
    exp.record(MIB + 100, pattern(41, 300 * KIB as usize));
    let raw = dir.join("src.raw");
    std::fs::write(&raw, exp.bytes(0, exp.capacity as usize)).unwrap();
    let path = dir.join("d.vmdk");
    convert(
        &raw,
        ImageFormat::Raw,
        &path,
        ImageFormat::Vmdk,
        &ConvertOptions::new(DiskType::StreamOptimized),
        &mut |_, _| true,
    )
    .unwrap();
    std::fs::remove_file(&raw).unwrap();
    (path, exp)
}

/// Every file of `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

fn assert_unchanged(dir: &Path, before: &BTreeMap<String, Vec<u8>>, ctx: &str) {
    let after = snapshot(dir);
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>(),
        "{ctx}: the set of files changed"
    );
    for (name, bytes) in before {
        let now = &after[name];
        assert_eq!(now.len(), bytes.len(), "{ctx}: length of {name} changed");
        if let Some(i) = now.iter().zip(bytes).position(|(a, b)| a != b) {
            panic!("{ctx}: {name} changed at byte {i}");
        }
    }
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = File::open(path).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset)
        .unwrap_or_else(|e| panic!("read {len} at {offset} of {}: {e}", path.display()));
    buf
}

fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
    f.sync_all().unwrap();
}

fn no_progress() -> impl FnMut(u64, u64) -> bool {
    |_, _| true
}

// ---------------------------------------------------------------------------------
// Hosted sparse structures, read directly
// ---------------------------------------------------------------------------------

fn header(path: &Path) -> SparseHeader {
    let mut b = [0u8; HEADER_SIZE];
    b.copy_from_slice(&read_at(path, 0, HEADER_SIZE));
    SparseHeader::parse(&b).unwrap_or_else(|e| panic!("header of {}: {e}", path.display()))
}

fn u32s(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn u32_bytes(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The grain directory at `sector` (primary: `h.gd_offset`, redundant: `h.rgd_offset`).
fn directory(path: &Path, h: &SparseHeader, sector: u64) -> Vec<u32> {
    u32s(&read_at(path, sector * SECTOR, h.num_gdes() as usize * 4))
}

/// The grain table at `sector`.
fn table(path: &Path, h: &SparseHeader, sector: u32) -> Vec<u32> {
    u32s(&read_at(
        path,
        u64::from(sector) * SECTOR,
        h.num_gtes_per_gt as usize * 4,
    ))
}

/// Sectors of the allocated grains of a sparse file, in guest order (entries 0 and
/// 1 - absent and zeroed - are not allocated).
fn grains_in_guest_order(path: &Path) -> Vec<u64> {
    let h = header(path);
    let mut out = Vec::new();
    for gde in directory(path, &h, h.gd_offset) {
        if gde == 0 {
            continue;
        }
        for gte in table(path, &h, gde) {
            if gte > 1 {
                out.push(u64::from(gte));
            }
        }
    }
    out
}

/// Fragments of one sparse file as `DefragStats` counts them: 0 without data,
/// otherwise 1 + the number of places where the next allocated grain in guest order
/// does not directly follow the previous one in the file.
fn fragments(path: &Path) -> u64 {
    let grain = header(path).grain_size;
    let g = grains_in_guest_order(path);
    if g.is_empty() {
        return 0;
    }
    1 + g.windows(2).filter(|w| w[1] != w[0] + grain).count() as u64
}

/// Allocated grains of a sparse file and how many of them hold only zeros.
fn grain_counts(path: &Path) -> (u64, u64) {
    let h = header(path);
    let grains = grains_in_guest_order(path);
    let zero = grains
        .iter()
        .filter(|&&s| {
            read_at(path, s * SECTOR, h.grain_bytes() as usize)
                .iter()
                .all(|&b| b == 0)
        })
        .count() as u64;
    (grains.len() as u64, zero)
}

// ---------------------------------------------------------------------------------
// Check reports
// ---------------------------------------------------------------------------------

fn describe(r: &CheckReport) -> String {
    let mut s = format!("repaired={} findings:", r.repaired);
    for f in &r.findings {
        s.push_str(&format!(
            "\n  {}: {} (repairable {}, repair {:?})",
            f.file.display(),
            f.problem,
            f.repairable,
            f.repair
        ));
    }
    s
}

fn check_ok(path: &Path, repair: bool, ctx: &str) -> CheckReport {
    check(path, repair).unwrap_or_else(|e| panic!("{ctx}: check(repair={repair}) failed: {e}"))
}

fn assert_clean(path: &Path, ctx: &str) {
    let r = check_ok(path, false, ctx);
    assert!(r.is_clean(), "{ctx}: not clean: {}", describe(&r));
    assert!(r.findings.is_empty(), "{ctx}: {}", describe(&r));
    assert_eq!(r.unrepaired(), 0, "{ctx}: {}", describe(&r));
}

// =================================================================================
// Grow
// =================================================================================

/// Every growable type: content kept (including the last bytes of the old
/// capacity), new space reads as zeros and takes writes, the type stays the same.
#[test]
fn grow_every_growable_type_keeps_content_and_reads_zeros_beyond() {
    for t in GROWABLE {
        let dir = tempdir();
        // Not a multiple of the grain: the old last grain is partial.
        let cap0 = 10 * MIB + 3 * SECTOR;
        let (path, mut exp) = new_disk(dir.path(), t, cap0);
        write_disk(
            &path,
            &mut exp,
            vec![
                (0, pattern(1, 100 * KIB as usize)),
                (3 * MIB + 777, pattern(2, 200 * KIB as usize)),
                (cap0 - 4096, pattern(3, 4096)),
            ],
        );
        let ctx = format!("{t}: grow 10 MiB + 3 sectors -> 40 MiB");
        verify(&path, &exp, &format!("{t}: before grow"));
        let new_cap = 40 * MIB;
        grow(
            &path,
            new_cap,
            &GrowOptions {
                update_geometry: true,
            },
            &mut no_progress(),
        )
        .unwrap_or_else(|e| panic!("{ctx}: {e}"));
        exp.capacity = new_cap;
        exp.marks.push(cap0);
        verify(&path, &exp, &ctx);
        let info = Disk::open(&path).unwrap().info().unwrap();
        assert_eq!(info.disk_type, Some(t), "{ctx}: type changed");
        assert_eq!(info.capacity, new_cap, "{ctx}");
        let sectors: u64 = info.chain[0].extents.iter().map(|e| e.sectors).sum();
        assert_eq!(sectors * SECTOR, new_cap, "{ctx}: extent lines");
        // The new space takes writes, across the old end and at the new end.
        write_disk(
            &path,
            &mut exp,
            vec![
                (cap0 - 1000, pattern(4, 5000)),
                (new_cap - GRAIN - 100, pattern(5, (GRAIN + 100) as usize)),
                (20 * MIB, pattern(6, 3 * GRAIN as usize)),
            ],
        );
        verify(
            &path,
            &exp,
            &format!("{ctx}: after writes into the new space"),
        );
        if t.is_sparse() {
            assert_clean(&path, &ctx);
        }
    }
}

/// A flat extent file longer than its extent (bytes past the extent's end, left by
/// an earlier shrink of the file's use or another tool) must not show through the
/// grown disk: the new space reads as zeros, whether the stale bytes end inside the
/// new space or beyond it.
#[test]
fn grow_of_a_flat_disk_never_shows_bytes_left_past_the_old_extent_end() {
    for t in FLAT {
        for junk in [5 * MIB, 60 * MIB] {
            let dir = tempdir();
            let cap0 = 10 * MIB + 3 * SECTOR;
            let (path, mut exp) = new_disk(dir.path(), t, cap0);
            write_disk(&path, &mut exp, vec![(cap0 - 4096, pattern(7, 4096))]);
            let info = Disk::open(&path).unwrap().info().unwrap();
            let last = info.chain[0].extents.last().unwrap().file.clone().unwrap();
            let end = file_len(&last);
            write_at(&last, end, &vec![0xee; junk as usize]);
            let ctx = format!("{t}: {} MiB of stale bytes, grow to 40 MiB", junk / MIB);
            verify(&path, &exp, &format!("{ctx}: before grow"));
            grow(&path, 40 * MIB, &GrowOptions::default(), &mut no_progress())
                .unwrap_or_else(|e| panic!("{ctx}: {e}"));
            exp.capacity = 40 * MIB;
            exp.marks.push(cap0);
            verify(&path, &exp, &ctx);
        }
    }
}

/// Split types grown from below one extent to three: the last extent fills up to
/// 2047 MiB, new extent files follow, data near and across the boundaries reads
/// back after a reopen.
#[test]
fn grow_split_types_across_the_extent_boundary() {
    for t in [DiskType::TwoGbMaxExtentSparse, DiskType::TwoGbMaxExtentFlat] {
        let dir = tempdir();
        let cap0 = 2000 * MIB;
        let (path, mut exp) = new_disk(dir.path(), t, cap0);
        write_disk(
            &path,
            &mut exp,
            vec![
                (5000, pattern(10, 70_000)),
                (cap0 - 3 * GRAIN - 5, pattern(11, (3 * GRAIN + 5) as usize)),
            ],
        );
        let new_cap = 4200 * MIB;
        let ctx = format!("{t}: grow 2000 MiB -> 4200 MiB");
        grow(
            &path,
            new_cap,
            &GrowOptions {
                update_geometry: true,
            },
            &mut no_progress(),
        )
        .unwrap_or_else(|e| panic!("{ctx}: {e}"));
        exp.capacity = new_cap;
        exp.marks.push(cap0);
        verify(&path, &exp, &ctx);

        let info = Disk::open(&path).unwrap().info().unwrap();
        let ext = &info.chain[0].extents;
        let sectors: Vec<u64> = ext.iter().map(|e| e.sectors).collect();
        assert_eq!(
            sectors,
            vec![
                SPLIT / SECTOR,
                SPLIT / SECTOR,
                (new_cap - 2 * SPLIT) / SECTOR
            ],
            "{ctx}: extent sizes"
        );
        let letter = if t == DiskType::TwoGbMaxExtentSparse {
            's'
        } else {
            'f'
        };
        for (i, e) in ext.iter().enumerate() {
            let name = e.file.as_ref().unwrap().file_name().unwrap();
            assert_eq!(
                name.to_string_lossy(),
                format!("d-{letter}{:03}.vmdk", i + 1),
                "{ctx}"
            );
            assert!(dir.path().join(name).is_file(), "{ctx}: {name:?} missing");
        }
        if t == DiskType::TwoGbMaxExtentSparse {
            // Sparse files stay small and each header covers its extent.
            for (i, e) in ext.iter().enumerate() {
                let f = e.file.as_ref().unwrap();
                assert_eq!(header(f).capacity, e.sectors, "{ctx}: extent {i} header");
                assert!(file_len(f) < 16 * MIB, "{ctx}: {} is big", f.display());
            }
        }
        write_disk(
            &path,
            &mut exp,
            vec![
                (SPLIT - 3000, pattern(12, 6000)),
                (2 * SPLIT - GRAIN, pattern(13, 2 * GRAIN as usize)),
                (new_cap - 4096, pattern(14, 4096)),
            ],
        );
        verify(
            &path,
            &exp,
            &format!("{ctx}: after writes into new extents"),
        );
        if t.is_sparse() {
            assert_clean(&path, &ctx);
        }
    }
}

/// 100 MiB -> 200 GiB: the grain directory (1 sector) cannot hold 6400 entries in
/// place, so it must move; the data stays, the far end takes writes.
#[test]
fn grow_monolithic_sparse_far_enough_to_move_the_grain_directory() {
    let dir = tempdir();
    let cap0 = 100 * MIB;
    let (path, mut exp) = new_disk(dir.path(), DiskType::MonolithicSparse, cap0);
    write_disk(
        &path,
        &mut exp,
        vec![
            (0, pattern(20, 3 * GRAIN as usize)),
            (33 * MIB + 12345, pattern(21, 500 * KIB as usize)),
            (cap0 - GRAIN, pattern(22, GRAIN as usize)),
        ],
    );
    let h0 = header(&path);
    assert_eq!(h0.num_gdes(), 4);
    let new_cap = 200 * GIB;
    let ctx = "monolithicSparse 100 MiB -> 200 GiB";
    grow(
        &path,
        new_cap,
        &GrowOptions {
            update_geometry: true,
        },
        &mut no_progress(),
    )
    .unwrap_or_else(|e| panic!("{ctx}: {e}"));
    let h = header(&path);
    assert_eq!(h.capacity, new_cap / SECTOR, "{ctx}: header capacity");
    assert_eq!(h.num_gdes(), 6400, "{ctx}");
    let gd = directory(&path, &h, h.gd_offset);
    let rgd = directory(&path, &h, h.rgd_offset);
    let len_sectors = file_len(&path) / SECTOR;
    for (i, (&g, &r)) in gd.iter().zip(&rgd).enumerate() {
        assert!(
            u64::from(g) < len_sectors && u64::from(r) < len_sectors,
            "{ctx}: directory entry {i} ({g}/{r}) past the end of the file"
        );
    }
    assert!(
        file_len(&path) < 64 * MIB,
        "{ctx}: file is {} bytes",
        file_len(&path)
    );
    exp.capacity = new_cap;
    exp.marks.push(cap0);
    verify(&path, &exp, ctx);
    assert_clean(&path, ctx);
    write_disk(
        &path,
        &mut exp,
        vec![
            (150 * GIB + 7, pattern(23, 100_000)),
            (cap0 - 500, pattern(24, 1000)),
            (new_cap - 3 * GRAIN, pattern(25, 3 * GRAIN as usize)),
        ],
    );
    verify(&path, &exp, &format!("{ctx}: after writes"));
    assert_clean(&path, &format!("{ctx}: after writes"));
}

/// Smaller: InvalidArgument and no byte changes. Equal: a no-op. Not a multiple of
/// a sector: InvalidArgument.
#[test]
fn grow_smaller_is_refused_and_equal_is_a_no_op() {
    for t in GROWABLE {
        let dir = tempdir();
        let (path, mut exp) = new_disk(dir.path(), t, 8 * MIB);
        write_disk(&path, &mut exp, vec![(MIB, pattern(30, 100_000))]);
        let before = snapshot(dir.path());
        let opts = GrowOptions {
            update_geometry: true,
        };
        let e = grow(&path, 4 * MIB, &opts, &mut no_progress())
            .expect_err("growing to a smaller capacity must fail");
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{t}: {e}");
        assert_unchanged(dir.path(), &before, &format!("{t}: grow smaller"));
        let e = grow(&path, 8 * MIB - SECTOR, &opts, &mut no_progress())
            .expect_err("growing to one sector less must fail");
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{t}: {e}");
        let e = grow(&path, 9 * MIB + 100, &opts, &mut no_progress())
            .expect_err("a capacity that is not whole sectors must fail");
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{t}: {e}");
        assert_unchanged(dir.path(), &before, &format!("{t}: grow unaligned"));
        grow(&path, 8 * MIB, &opts, &mut no_progress())
            .unwrap_or_else(|e| panic!("{t}: grow to the same capacity: {e}"));
        assert_unchanged(dir.path(), &before, &format!("{t}: grow to the same size"));
        verify(&path, &exp, &format!("{t}: after refused grows"));
    }
}

#[test]
fn grow_stream_optimized_is_not_supported() {
    let dir = tempdir();
    let (path, exp) = new_stream_disk(dir.path());
    let before = snapshot(dir.path());
    let e = grow(
        &path,
        16 * MIB,
        &GrowOptions {
            update_geometry: true,
        },
        &mut no_progress(),
    )
    .expect_err("a streamOptimized disk cannot grow");
    assert_eq!(e.kind(), ErrorKind::NotSupported, "{e}");
    assert_unchanged(dir.path(), &before, "grow streamOptimized");
    verify(&path, &exp, "streamOptimized after the refused grow");
}

/// A disk open for writing elsewhere is not grown under the writer's feet.
#[test]
fn grow_of_a_disk_in_use_fails() {
    let dir = tempdir();
    let (path, mut exp) = new_disk(dir.path(), DiskType::MonolithicSparse, 8 * MIB);
    write_disk(&path, &mut exp, vec![(0, pattern(31, 5000))]);
    let open = OpenOptions::new().write(true).open(&path).unwrap();
    let r = grow(
        &path,
        16 * MIB,
        &GrowOptions {
            update_geometry: true,
        },
        &mut no_progress(),
    );
    assert!(r.is_err(), "grow of a disk open for writing succeeded");
    open.close().unwrap();
    verify(&path, &exp, "after the refused grow of a disk in use");
}

// =================================================================================
// Shrink
// =================================================================================

/// Data, then part of it overwritten with zeros: shrink unmaps exactly the zero
/// grains, moves data down, truncates; the content is unchanged, the disk still
/// takes writes, and a second shrink finds nothing to do.
#[test]
fn shrink_monolithic_sparse_reclaims_zeroed_grains() {
    let dir = tempdir();
    let (path, mut exp) = new_disk(dir.path(), DiskType::MonolithicSparse, 64 * MIB);
    write_disk(
        &path,
        &mut exp,
        vec![
            (0, pattern(40, 8 * MIB as usize)),
            (40 * MIB, pattern(41, 4 * MIB as usize)),
            (50 * MIB + 1000, pattern(42, 3000)),
        ],
    );
    // Zero 2..6 MiB (64 whole grains) and all of the grain at 7 MiB but its last byte.
    let mut almost = vec![0u8; GRAIN as usize];
    almost[GRAIN as usize - 1] = 0xff;
    write_disk(
        &path,
        &mut exp,
        vec![(2 * MIB, vec![0u8; 4 * MIB as usize]), (7 * MIB, almost)],
    );
    verify(&path, &exp, "before shrink");
    let (allocated, zero) = grain_counts(&path);
    assert_eq!(zero, 64, "the zero writes did not leave 64 zero grains");
    let h = header(&path);
    let before = file_len(&path);
    let stats = shrink(&path, &mut no_progress()).unwrap_or_else(|e| panic!("shrink: {e}"));
    let after = file_len(&path);
    assert_eq!(stats.bytes_before, before, "bytes_before");
    assert_eq!(stats.bytes_after, after, "bytes_after");
    assert_eq!(stats.zero_grains, zero, "zero_grains");
    assert!(stats.moved > 0, "data above the holes must move down");
    assert!(
        before - after >= zero * GRAIN,
        "file shrank by {} bytes, {zero} zero grains are {} bytes",
        before - after,
        zero * GRAIN
    );
    assert_eq!(
        after,
        h.overhead * SECTOR + (allocated - zero) * GRAIN,
        "after shrink the file is the metadata plus the remaining grains"
    );
    verify(&path, &exp, "after shrink");
    let d = Disk::open(&path).unwrap();
    let map = d.allocation_map(2 * MIB, 4 * MIB).unwrap();
    assert!(
        map.iter().all(|r| r.kind != RangeKind::Data),
        "zeroed range still mapped as data: {map:?}"
    );
    drop(d);
    assert_clean(&path, "after shrink");

    // Nothing left to reclaim.
    let again = shrink(&path, &mut no_progress()).unwrap();
    assert_eq!(again.zero_grains, 0, "second shrink");
    assert_eq!(again.moved, 0, "second shrink");
    assert_eq!(again.bytes_after, after, "second shrink");
    verify(&path, &exp, "after the second shrink");

    // The shrunk disk takes new writes (also into the unmapped range).
    write_disk(
        &path,
        &mut exp,
        vec![
            (3 * MIB + 5, pattern(43, 100_000)),
            (60 * MIB, pattern(44, GRAIN as usize)),
        ],
    );
    verify(&path, &exp, "writes after shrink");
    assert_clean(&path, "writes after shrink");
}

/// A split sparse disk: every extent file shrinks by its zeroed grains.
#[test]
fn shrink_two_gb_sparse_shrinks_every_extent() {
    let dir = tempdir();
    let (path, mut exp) = new_disk(dir.path(), DiskType::TwoGbMaxExtentSparse, 2100 * MIB);
    let second = SPLIT + MIB;
    write_disk(
        &path,
        &mut exp,
        vec![
            (0, pattern(50, 2 * MIB as usize)),
            (second, pattern(51, 2 * MIB as usize)),
        ],
    );
    write_disk(
        &path,
        &mut exp,
        vec![
            (0, vec![0u8; MIB as usize]),
            (second + MIB, vec![0u8; MIB as usize]),
        ],
    );
    let s1 = dir.path().join("d-s001.vmdk");
    let s2 = dir.path().join("d-s002.vmdk");
    let (l1, l2) = (file_len(&s1), file_len(&s2));
    let stats = shrink(&path, &mut no_progress()).unwrap_or_else(|e| panic!("shrink: {e}"));
    assert_eq!(stats.zero_grains, 32, "zero grains");
    assert_eq!(
        stats.bytes_before,
        l1 + l2,
        "bytes_before = all extent files"
    );
    assert_eq!(
        stats.bytes_after,
        file_len(&s1) + file_len(&s2),
        "bytes_after = all extent files"
    );
    assert_eq!(file_len(&s1), l1 - MIB, "first extent");
    assert_eq!(file_len(&s2), l2 - MIB, "second extent");
    verify(&path, &exp, "after shrink");
    assert_clean(&path, "after shrink");
}

#[test]
fn shrink_of_flat_and_stream_disks_is_refused() {
    for t in FLAT {
        let dir = tempdir();
        let (path, mut exp) = new_disk(dir.path(), t, 4 * MIB);
        write_disk(
            &path,
            &mut exp,
            vec![(0, pattern(60, 70_000)), (MIB, vec![0u8; MIB as usize])],
        );
        let before = snapshot(dir.path());
        let e = shrink(&path, &mut no_progress()).expect_err("flat disks cannot shrink");
        assert_eq!(e.kind(), ErrorKind::CantShrink, "{t}: {e}");
        assert_unchanged(dir.path(), &before, &format!("{t}: refused shrink"));
        verify(&path, &exp, &format!("{t}: after the refused shrink"));
    }
    let dir = tempdir();
    let (path, exp) = new_stream_disk(dir.path());
    let before = snapshot(dir.path());
    let e = shrink(&path, &mut no_progress()).expect_err("stream disks cannot shrink");
    assert_eq!(e.kind(), ErrorKind::CantShrink, "streamOptimized: {e}");
    assert_unchanged(dir.path(), &before, "streamOptimized: refused shrink");
    verify(&path, &exp, "streamOptimized: after the refused shrink");
}

// =================================================================================
// Defragment
// =================================================================================

/// Writes grains one at a time in reverse guest order over `ranges` (grain indexes),
/// so the file holds them in reverse.
fn write_reversed(path: &Path, exp: &mut Expect, grains: &[u64], seed: u64) {
    let writes = grains
        .iter()
        .rev()
        .map(|&g| (g * GRAIN, pattern(seed + g, GRAIN as usize)))
        .collect();
    write_disk(path, exp, writes);
}

#[test]
fn defragment_monolithic_sparse_puts_grains_in_guest_order() {
    let dir = tempdir();
    let (path, mut exp) = new_disk(dir.path(), DiskType::MonolithicSparse, 64 * MIB);
    // 40 grains in the first table with a hole, 8 in the second table.
    let mut grains: Vec<u64> = (0..20).chain(30..50).collect();
    grains.extend(520..528);
    write_reversed(&path, &mut exp, &grains, 100);
    // And one partial grain written last, in between.
    write_disk(&path, &mut exp, vec![(25 * GRAIN + 100, pattern(99, 1000))]);
    let frag_before = fragments(&path);
    assert_eq!(frag_before, grains.len() as u64 + 1, "test setup: layout");
    let len_before = file_len(&path);
    let stats = defragment(&path, &mut no_progress()).unwrap_or_else(|e| panic!("defrag: {e}"));
    assert_eq!(stats.fragments_before, frag_before, "fragments_before");
    assert_eq!(stats.fragments_after, 1, "fragments_after");
    assert_eq!(fragments(&path), 1, "grains in the file after defrag");
    assert!(
        file_len(&path) <= len_before,
        "defragment grew the file from {len_before} to {}",
        file_len(&path)
    );
    verify(&path, &exp, "after defragment");
    assert_clean(&path, "after defragment");
    let again = defragment(&path, &mut no_progress()).unwrap();
    assert_eq!(again.fragments_before, 1, "second defragment");
    assert_eq!(again.fragments_after, 1, "second defragment");
    verify(&path, &exp, "after the second defragment");
    write_disk(&path, &mut exp, vec![(21 * GRAIN, pattern(98, 3000))]);
    verify(&path, &exp, "writes after defragment");
}

#[test]
fn defragment_two_gb_sparse_counts_fragments_per_extent() {
    let dir = tempdir();
    let (path, mut exp) = new_disk(dir.path(), DiskType::TwoGbMaxExtentSparse, 4200 * MIB);
    let g0 = SPLIT / GRAIN; // first grain of the second extent
    let grains: Vec<u64> = (10..20).chain(g0 + 5..g0 + 12).collect();
    write_reversed(&path, &mut exp, &grains, 200);
    let files: Vec<PathBuf> = (1..=3)
        .map(|i| dir.path().join(format!("d-s{i:03}.vmdk")))
        .collect();
    let before: Vec<u64> = files.iter().map(|f| fragments(f)).collect();
    assert_eq!(before, vec![10, 7, 0], "test setup: layout");
    let stats = defragment(&path, &mut no_progress()).unwrap_or_else(|e| panic!("defrag: {e}"));
    assert_eq!(stats.fragments_before, 17, "fragments_before");
    assert_eq!(
        stats.fragments_after, 2,
        "fragments_after: one per extent with data"
    );
    let after: Vec<u64> = files.iter().map(|f| fragments(f)).collect();
    assert_eq!(after, vec![1, 1, 0], "grains in the files after defrag");
    verify(&path, &exp, "after defragment");
    assert_clean(&path, "after defragment");
}

#[test]
fn defragment_of_flat_and_stream_disks_is_not_supported() {
    for t in FLAT {
        let dir = tempdir();
        let (path, mut exp) = new_disk(dir.path(), t, 4 * MIB);
        write_disk(&path, &mut exp, vec![(GRAIN, pattern(70, 5000))]);
        let before = snapshot(dir.path());
        let e = defragment(&path, &mut no_progress()).expect_err("flat disks: no defragment");
        assert_eq!(e.kind(), ErrorKind::NotSupported, "{t}: {e}");
        assert_unchanged(dir.path(), &before, &format!("{t}: refused defragment"));
    }
    let dir = tempdir();
    let (path, exp) = new_stream_disk(dir.path());
    let before = snapshot(dir.path());
    let e = defragment(&path, &mut no_progress()).expect_err("stream disks: no defragment");
    assert_eq!(e.kind(), ErrorKind::NotSupported, "streamOptimized: {e}");
    assert_unchanged(dir.path(), &before, "streamOptimized: refused defragment");
    verify(&path, &exp, "streamOptimized after the refused defragment");
}

// =================================================================================
// Cancellation
// =================================================================================

/// A progress callback that says stop leaves a disk that reads as before (or fully
/// done, for grow): each operation reports progress and honours the answer.
#[test]
fn cancelled_operations_leave_a_working_disk() {
    for op in ["grow", "shrink", "defragment"] {
        let dir = tempdir();
        let (path, mut exp) = new_disk(dir.path(), DiskType::MonolithicSparse, 64 * MIB);
        write_reversed(&path, &mut exp, &(0..40).collect::<Vec<_>>(), 300);
        write_disk(
            &path,
            &mut exp,
            vec![(5 * GRAIN, vec![0u8; GRAIN as usize])],
        );
        let mut calls = 0u64;
        let mut stop = |done: u64, total: u64| {
            assert!(done <= total, "{op}: progress {done} of {total}");
            calls += 1;
            false
        };
        let r = match op {
            "grow" => grow(
                &path,
                128 * MIB,
                &GrowOptions {
                    update_geometry: true,
                },
                &mut stop,
            ),
            "shrink" => shrink(&path, &mut stop).map(|_| ()),
            _ => defragment(&path, &mut stop).map(|_| ()),
        };
        assert!(calls > 0, "{op}: the progress callback was never called");
        match r {
            Err(e) => assert_eq!(e.kind(), ErrorKind::Cancelled, "{op}: {e}"),
            Ok(()) => panic!("{op}: cancelled operation reported success"),
        }
        verify(&path, &exp, &format!("{op}: after cancel"));
        assert_clean(&path, &format!("{op}: after cancel"));
    }
}

// =================================================================================
// Check and repair
// =================================================================================

/// A 64 MiB monolithicSparse disk with data in both grain tables, the last grain
/// written last (it is the last grain of the file).
fn damaged_candidate(dir: &Path) -> (PathBuf, Expect) {
    let (path, mut exp) = new_disk(dir, DiskType::MonolithicSparse, 64 * MIB);
    write_disk(
        &path,
        &mut exp,
        vec![
            (0, pattern(80, 10 * GRAIN as usize)),
            (3 * MIB + 100, pattern(81, 200_000)),
            (33 * MIB, pattern(82, 6 * GRAIN as usize)),
            (20 * MIB, pattern(83, GRAIN as usize)),
        ],
    );
    verify(&path, &exp, "damaged candidate before damage");
    assert_clean(&path, "damaged candidate before damage");
    (path, exp)
}

/// check(false) reports something and changes nothing; check(true) repairs; the disk
/// then opens, reads as `exp` (only over `intact` guest ranges if given) and checks
/// clean. Returns the findings of the first check.
fn detect_and_repair(
    dir: &Path,
    path: &Path,
    exp: &Expect,
    intact: Option<&[(u64, u64)]>,
    ctx: &str,
) -> CheckReport {
    let before = snapshot(dir);
    let found = check_ok(path, false, ctx);
    assert!(!found.is_clean(), "{ctx}: check found nothing");
    assert!(!found.findings.is_empty(), "{ctx}: no findings");
    assert!(!found.repaired, "{ctx}: check without repair says repaired");
    assert_eq!(
        found.unrepaired(),
        found.findings.len(),
        "{ctx}: without repair nothing is repaired: {}",
        describe(&found)
    );
    assert_unchanged(dir, &before, &format!("{ctx}: check without repair"));
    let fixed = check_ok(path, true, ctx);
    assert!(
        fixed.repaired,
        "{ctx}: repair did nothing: {}",
        describe(&fixed)
    );
    assert_eq!(fixed.unrepaired(), 0, "{ctx}: {}", describe(&fixed));
    assert!(
        fixed.findings.iter().all(|f| f.repair.is_some()),
        "{ctx}: a finding without a repair: {}",
        describe(&fixed)
    );
    match intact {
        None => verify(path, exp, &format!("{ctx}: after repair")),
        Some(ranges) => {
            let d = Disk::open(path).unwrap_or_else(|e| panic!("{ctx}: open after repair: {e}"));
            let mut all = vec![0u8; exp.capacity as usize];
            d.read_at(&mut all, 0)
                .unwrap_or_else(|e| panic!("{ctx}: read after repair: {e}"));
            for &(s, e) in ranges {
                assert_same(
                    &all[s as usize..e as usize],
                    &exp.bytes(s, (e - s) as usize),
                    s,
                    &format!("{ctx}: intact data after repair"),
                );
            }
        }
    }
    assert_clean(path, &format!("{ctx}: after repair"));
    // And it takes writes again.
    let d = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{ctx}: open for writing after repair: {e}"));
    d.write_at(&pattern(90, 5000), 40 * MIB).unwrap();
    d.close().unwrap();
    assert_clean(path, &format!("{ctx}: after a write following the repair"));
    found
}

#[test]
fn check_of_clean_disks_finds_nothing_and_changes_nothing() {
    for t in [
        DiskType::MonolithicSparse,
        DiskType::TwoGbMaxExtentSparse,
        DiskType::MonolithicFlat,
        DiskType::TwoGbMaxExtentFlat,
        DiskType::Vmfs,
        DiskType::VmfsThin,
    ] {
        let dir = tempdir();
        let (path, mut exp) = new_disk(dir.path(), t, 8 * MIB);
        write_disk(
            &path,
            &mut exp,
            vec![(0, pattern(95, 100_000)), (5 * MIB, pattern(96, 3000))],
        );
        let before = snapshot(dir.path());
        assert_clean(&path, &format!("{t}"));
        let r = check_ok(&path, true, &format!("{t}"));
        assert!(r.is_clean(), "{t}: {}", describe(&r));
        assert_eq!(r.unrepaired(), 0, "{t}: {}", describe(&r));
        assert_unchanged(dir.path(), &before, &format!("{t}: check of a clean disk"));
    }
}

/// `CheckReport::repaired` is documented as "whether repairs were written": a
/// repair run over a clean disk writes nothing and must say so.
#[test]
fn repair_of_a_clean_disk_reports_nothing_repaired() {
    let dir = tempdir();
    let (path, mut exp) = new_disk(dir.path(), DiskType::MonolithicSparse, 8 * MIB);
    write_disk(&path, &mut exp, vec![(0, pattern(97, 100_000))]);
    let before = snapshot(dir.path());
    let r = check_ok(&path, true, "clean disk");
    assert_unchanged(dir.path(), &before, "repair of a clean disk");
    assert!(r.is_clean(), "{}", describe(&r));
    assert!(
        !r.repaired,
        "repair of a clean disk wrote nothing but reports repaired=true"
    );
}

#[test]
fn repair_primary_grain_table_from_the_redundant_copy() {
    for damage in ["junk", "zeros", "into metadata"] {
        damage_primary_table_and_repair(damage);
    }
}

/// Primary entry 3 made equal to entry 5 (one grain mapped twice); the redundant
/// table still maps entry 3 to its own grain, which is still in the file, so repair
/// must restore entry 3 from it rather than keep the shared grain.
#[test]
fn repair_grain_shared_in_the_primary_table_from_the_redundant_copy() {
    damage_primary_table_and_repair("shared grain");
}

fn damage_primary_table_and_repair(damage: &str) {
    let dir = tempdir();
    let (path, exp) = damaged_candidate(dir.path());
    let h = header(&path);
    let gd = directory(&path, &h, h.gd_offset);
    let gt0 = table(&path, &h, gd[0]);
    let bytes = match damage {
        "junk" => pattern(7, h.num_gtes_per_gt as usize * 4),
        "zeros" => vec![0u8; h.num_gtes_per_gt as usize * 4],
        "shared grain" => {
            let mut t = gt0.clone();
            t[3] = t[5];
            u32_bytes(&t)
        }
        _ => {
            let mut t = gt0.clone();
            t[2] = u32::try_from(h.gd_offset).unwrap();
            u32_bytes(&t)
        }
    };
    write_at(&path, u64::from(gd[0]) * SECTOR, &bytes);
    let ctx = format!("primary grain table 0: {damage}");
    let found = detect_and_repair(dir.path(), &path, &exp, None, &ctx);
    assert!(
        found.findings.iter().all(|f| f.file == path),
        "{ctx}: findings name the wrong file: {}",
        describe(&found)
    );
    assert_eq!(
        table(&path, &h, directory(&path, &h, h.gd_offset)[0]),
        gt0,
        "{ctx}: table 0 not restored"
    );
}

#[test]
fn repair_primary_grain_directory_entry() {
    for damage in ["past EOF", "into metadata", "shared table"] {
        let dir = tempdir();
        let (path, exp) = damaged_candidate(dir.path());
        let h = header(&path);
        let gd = directory(&path, &h, h.gd_offset);
        let value = match damage {
            "past EOF" => u32::try_from(file_len(&path) / SECTOR + 1000).unwrap(),
            "into metadata" => 1,
            _ => gd[0],
        };
        write_at(&path, h.gd_offset * SECTOR + 4, &value.to_le_bytes());
        let ctx = format!("primary directory entry 1: {damage}");
        detect_and_repair(dir.path(), &path, &exp, None, &ctx);
        let h2 = header(&path);
        let gd2 = directory(&path, &h2, h2.gd_offset);
        let rgd2 = directory(&path, &h2, h2.rgd_offset);
        assert_ne!(gd2[0], gd2[1], "{ctx}: tables still shared");
        assert!(
            !rgd2.contains(&gd2[1]),
            "{ctx}: primary entry 1 points at a redundant table"
        );
    }
}

#[test]
fn repair_clears_the_unclean_shutdown_flag() {
    let dir = tempdir();
    let (path, exp) = damaged_candidate(dir.path());
    write_at(&path, UNCLEAN_OFFSET, &[1]);
    detect_and_repair(dir.path(), &path, &exp, None, "uncleanShutdown set");
    assert_eq!(read_at(&path, UNCLEAN_OFFSET, 1), [0], "flag still set");
}

/// The file lost its end: the last grain (guest 20 MiB) points past EOF, wholly or
/// in part. Repair leaves a disk that opens; every other grain reads as before.
#[test]
fn repair_of_a_truncated_file_keeps_the_intact_grains() {
    for cut in [GRAIN, GRAIN / 2] {
        let dir = tempdir();
        let (path, exp) = damaged_candidate(dir.path());
        let len = file_len(&path);
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - cut).unwrap();
        drop(f);
        let cap = exp.capacity;
        let intact = [(0, 20 * MIB), (20 * MIB + GRAIN, cap)];
        let ctx = format!("file truncated by {cut} bytes");
        detect_and_repair(dir.path(), &path, &exp, Some(&intact), &ctx);
    }
}

/// Both copies of grain table 0 hold junk: nothing sound describes those grains
/// any more. Repair clears the entries (that data is lost and reported as such);
/// the disk opens, the other table's data is intact, the lost range reads as zeros.
#[test]
fn both_table_copies_damaged_loses_only_that_table() {
    let dir = tempdir();
    let (path, exp) = damaged_candidate(dir.path());
    let h = header(&path);
    let gd = directory(&path, &h, h.gd_offset);
    let rgd = directory(&path, &h, h.rgd_offset);
    let n = h.num_gtes_per_gt as usize * 4;
    write_at(&path, u64::from(gd[0]) * SECTOR, &pattern(8, n));
    write_at(&path, u64::from(rgd[0]) * SECTOR, &pattern(9, n));
    let ctx = "both copies of table 0 damaged";
    let found = check_ok(&path, false, ctx);
    assert!(
        found
            .findings
            .iter()
            .any(|f| f.repair.as_deref().is_some_and(|r| r.contains("lost"))),
        "{ctx}: no finding says that data is lost: {}",
        describe(&found)
    );
    // Table 0 covers the first 32 MiB; table 1's data must survive.
    let coverage = h.gt_coverage() * SECTOR;
    let intact = [(coverage, exp.capacity)];
    detect_and_repair(dir.path(), &path, &exp, Some(&intact), ctx);
    let d = Disk::open(&path).unwrap();
    let mut lost = vec![0u8; coverage as usize];
    d.read_at(&mut lost, 0).unwrap();
    assert!(
        lost.iter().all(|&b| b == 0),
        "{ctx}: the cleared range should read as zeros"
    );
}

/// Neither the grain directory nor its redundant copy lies inside the file: there
/// is nothing to rebuild from. Reported as unrepaired, and repair writes nothing.
#[test]
fn both_directories_lost_is_reported_unrepaired() {
    let dir = tempdir();
    let (path, _exp) = damaged_candidate(dir.path());
    let beyond = file_len(&path) / SECTOR + 100_000;
    write_at(&path, 48, &beyond.to_le_bytes()); // rgdOffset
    write_at(&path, 56, &(beyond + 1000).to_le_bytes()); // gdOffset
    let before = snapshot(dir.path());
    let ctx = "both directories outside the file";
    let r = check_ok(&path, false, ctx);
    assert!(!r.is_clean(), "{ctx}: {}", describe(&r));
    assert!(r.unrepaired() > 0, "{ctx}: {}", describe(&r));
    let r = check_ok(&path, true, ctx);
    assert!(r.unrepaired() > 0, "{ctx}: {}", describe(&r));
    assert!(
        r.findings
            .iter()
            .any(|f| !f.repairable && f.repair.is_none()),
        "{ctx}: {}",
        describe(&r)
    );
    assert_unchanged(dir.path(), &before, &format!("{ctx}: failed repair"));
    assert!(
        Disk::open(&path).is_err(),
        "{ctx}: the disk opens though its directories are gone"
    );
}

/// The damage is in the second extent of a split disk: the finding names that file.
#[test]
fn repair_in_the_second_extent_of_a_split_disk() {
    let dir = tempdir();
    let (path, mut exp) = new_disk(dir.path(), DiskType::TwoGbMaxExtentSparse, 2100 * MIB);
    write_disk(
        &path,
        &mut exp,
        vec![
            (MIB, pattern(110, 3 * GRAIN as usize)),
            (SPLIT + 2 * GRAIN, pattern(111, 5 * GRAIN as usize)),
        ],
    );
    let s2 = dir.path().join("d-s002.vmdk");
    let h = header(&s2);
    let gd = directory(&s2, &h, h.gd_offset);
    write_at(
        &s2,
        u64::from(gd[0]) * SECTOR,
        &vec![0u8; h.num_gtes_per_gt as usize * 4],
    );
    let before = snapshot(dir.path());
    let found = check_ok(&path, false, "split disk");
    assert!(!found.is_clean(), "split disk: nothing found");
    assert!(
        found.findings.iter().all(|f| f.file == s2),
        "split disk: findings should name d-s002.vmdk: {}",
        describe(&found)
    );
    assert_unchanged(dir.path(), &before, "split disk: check without repair");
    let fixed = check_ok(&path, true, "split disk");
    assert!(fixed.repaired, "{}", describe(&fixed));
    assert_eq!(fixed.unrepaired(), 0, "{}", describe(&fixed));
    verify(&path, &exp, "split disk after repair");
    assert_clean(&path, "split disk after repair");
}

/// A flat extent file shorter than its extent: found, and repaired to full length;
/// what the file held still reads the same, the lost tail reads as zeros.
#[test]
fn flat_extent_too_short_is_found_and_repaired() {
    let dir = tempdir();
    let (path, mut exp) = new_disk(dir.path(), DiskType::MonolithicFlat, 8 * MIB);
    write_disk(
        &path,
        &mut exp,
        vec![(100, pattern(120, 100_000)), (7 * MIB, pattern(121, 5000))],
    );
    let flat = dir.path().join("d-flat.vmdk");
    let f = std::fs::OpenOptions::new().write(true).open(&flat).unwrap();
    f.set_len(4 * MIB).unwrap();
    drop(f);
    let before = snapshot(dir.path());
    let found = check_ok(&path, false, "short flat file");
    assert!(!found.is_clean(), "short flat file: nothing found");
    assert!(
        found.findings.iter().any(|f| f.file == flat),
        "short flat file: findings should name d-flat.vmdk: {}",
        describe(&found)
    );
    assert_unchanged(dir.path(), &before, "short flat file: check without repair");
    let fixed = check_ok(&path, true, "short flat file");
    assert!(fixed.repaired, "{}", describe(&fixed));
    assert_eq!(fixed.unrepaired(), 0, "{}", describe(&fixed));
    assert_eq!(file_len(&flat), 8 * MIB, "flat file length after repair");
    let d = Disk::open(&path).unwrap();
    let mut all = vec![0u8; 8 * MIB as usize];
    d.read_at(&mut all, 0).unwrap();
    assert_same(
        &all[..4 * MIB as usize],
        &exp.bytes(0, 4 * MIB as usize),
        0,
        "kept part",
    );
    assert!(
        all[4 * MIB as usize..].iter().all(|&b| b == 0),
        "the lost tail should read as zeros"
    );
    assert_clean(&path, "short flat file after repair");
}
