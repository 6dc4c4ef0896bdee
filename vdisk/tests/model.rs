//! Model-based tests: random sequences of writes, reads, flushes and reopens
//! against an in-memory model of the touched sectors, for every writable disk
//! type; and concurrent writers sharing one `Disk`.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

mod common;

use common::Rng;
use vdisk::{create, CreateOptions, Disk, DiskType, OpenOptions};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;
const GRAIN: u64 = 64 * KIB;
/// Offset of the uncleanShutdown byte in a hosted sparse header.
const UNCLEAN_OFFSET: u64 = 72;

/// The expected content of the disk: only sectors ever written are stored; every
/// other byte reads as zero.
#[derive(Default)]
struct Model {
    sectors: HashMap<u64, [u8; 512]>,
}

impl Model {
    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut pos = 0usize;
        while pos < data.len() {
            let off = offset + pos as u64;
            let s = off / SECTOR;
            let in_s = (off % SECTOR) as usize;
            let n = (SECTOR as usize - in_s).min(data.len() - pos);
            let e = self.sectors.entry(s).or_insert([0; 512]);
            e[in_s..in_s + n].copy_from_slice(&data[pos..pos + n]);
            pos += n;
        }
    }

    fn expected(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        if len == 0 {
            return out;
        }
        let end = offset + len as u64;
        for s in offset / SECTOR..end.div_ceil(SECTOR) {
            if let Some(data) = self.sectors.get(&s) {
                let s_start = s * SECTOR;
                let from = s_start.max(offset);
                let to = (s_start + SECTOR).min(end);
                out[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&data[(from - s_start) as usize..(to - s_start) as usize]);
            }
        }
        out
    }
}

/// A scratch directory, in RAM when possible (many fsyncs, sparse multi-GiB files).
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new()
            .prefix("vdisk-model")
            .tempdir_in(shm)
        {
            return d;
        }
    }
    tempfile::tempdir().unwrap()
}

fn unclean_byte(path: &Path) -> u8 {
    let f = File::open(path).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, UNCLEAN_OFFSET).unwrap();
    b[0]
}

fn assert_same(got: &[u8], want: &[u8], offset: u64, ctx: &str) {
    if got != want {
        let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
        panic!(
            "{ctx}: content differs at disk byte {} (read of {} bytes at {offset}): got {:#04x}, expected {:#04x}",
            offset + i as u64,
            got.len(),
            got[i],
            want[i]
        );
    }
}

/// One disk type under test.
struct Setup {
    disk_type: DiskType,
    capacity: u64,
    /// Interesting offsets writes and reads cluster around (boundaries).
    hotspots: Vec<u64>,
    /// Hosted sparse files whose uncleanShutdown byte is checked.
    sparse_files: Vec<&'static str>,
}

struct Run<'a> {
    setup: &'a Setup,
    path: PathBuf,
    dir: PathBuf,
    model: Model,
    rng: Rng,
    ctx: String,
}

impl Run<'_> {
    fn check_unclean(&self, want: u8, when: &str) {
        for f in &self.setup.sparse_files {
            let got = unclean_byte(&self.dir.join(f));
            assert_eq!(
                got, want,
                "{}: uncleanShutdown of {f} is {got} {when}, expected {want}",
                self.ctx
            );
        }
    }

    fn open_rw(&self) -> Disk {
        let d = OpenOptions::new()
            .write(true)
            .open(&self.path)
            .unwrap_or_else(|e| panic!("{}: reopen read-write: {e}", self.ctx));
        assert_eq!(d.capacity(), self.setup.capacity);
        self.check_unclean(1, "while open read-write");
        d
    }

    fn close(&self, d: Disk) {
        d.close()
            .unwrap_or_else(|e| panic!("{}: close: {e}", self.ctx));
        self.check_unclean(0, "after a clean close");
    }

    /// A random range of `len` bytes: near a hotspot, sometimes aligned, sometimes at
    /// the very end of the disk.
    fn pick_offset(&mut self, len: u64) -> u64 {
        let cap = self.setup.capacity;
        let max = cap - len;
        if self.rng.percent(10) {
            return max; // the very last bytes
        }
        let h = self.setup.hotspots[self.rng.below(self.setup.hotspots.len() as u64) as usize];
        let spread = 768 * KIB;
        let mut off = (h + self.rng.below(2 * spread)).saturating_sub(spread);
        match self.rng.below(10) {
            0..=2 => off -= off % SECTOR,
            3..=4 => off -= off % GRAIN,
            _ => {}
        }
        off.min(max)
    }

    fn pick_len(&mut self) -> u64 {
        match self.rng.below(10) {
            0..=3 => self.rng.range(1, 4096),
            4..=6 => self.rng.range(1, 300 * KIB),
            _ => self.rng.range(1, 4) * GRAIN,
        }
        .min(self.setup.capacity)
    }

    fn read_compare(&self, d: &Disk, offset: u64, len: usize) {
        let mut buf = vec![0u8; len];
        d.read_at(&mut buf, offset)
            .unwrap_or_else(|e| panic!("{}: read {len} at {offset}: {e}", self.ctx));
        assert_same(&buf, &self.model.expected(offset, len), offset, &self.ctx);
    }

    /// Reads back everything the model knows, with the zeros around it; small disks
    /// are read whole, large ones around every written run plus random windows.
    fn verify_all(&mut self, d: &Disk) {
        let cap = self.setup.capacity;
        if cap <= 128 * MIB {
            let mut off = 0;
            while off < cap {
                let n = (cap - off).min(4 * MIB);
                self.read_compare(d, off, n as usize);
                off += n;
            }
            return;
        }
        let written: BTreeSet<u64> = self.model.sectors.keys().copied().collect();
        let margin = 128 * KIB;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for s in written {
            let start = (s * SECTOR).saturating_sub(margin);
            let end = (s * SECTOR + SECTOR + margin).min(cap);
            match runs.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                _ => runs.push((start, end)),
            }
        }
        for _ in 0..4 {
            let start = self.rng.below(cap - MIB);
            runs.push((start, start + MIB));
        }
        for (start, end) in runs {
            let mut off = start;
            while off < end {
                let n = (end - off).min(4 * MIB);
                self.read_compare(d, off, n as usize);
                off += n;
            }
        }
    }
}

fn run_model(setup: &Setup, seed: u64, ops: usize) {
    let tmp = scratch();
    let path = tmp.path().join("d.vmdk");
    create(&path, &CreateOptions::new(setup.disk_type, setup.capacity)).unwrap();
    let cid0 = Disk::open(&path).unwrap().cid().unwrap();
    let mut run = Run {
        setup,
        path,
        dir: tmp.path().to_path_buf(),
        model: Model::default(),
        rng: Rng(seed),
        ctx: String::new(),
    };
    run.check_unclean(0, "after create");
    let mut disk = run.open_rw();
    for op in 0..ops {
        run.ctx = format!("{:?} seed {seed} op {op}", setup.disk_type);
        match run.rng.below(100) {
            0..=44 => {
                let len = run.pick_len();
                let off = run.pick_offset(len);
                let mut data = vec![0u8; len as usize];
                run.rng.fill(&mut data);
                if run.rng.percent(5) {
                    data.fill(0); // zeros over data must read back as zeros too
                }
                disk.write_at(&data, off)
                    .unwrap_or_else(|e| panic!("{}: write {len} at {off}: {e}", run.ctx));
                run.model.write(off, &data);
            }
            45..=79 => {
                let len = run.pick_len();
                let off = run.pick_offset(len);
                run.read_compare(&disk, off, len as usize);
            }
            80..=86 => disk
                .flush()
                .unwrap_or_else(|e| panic!("{}: flush: {e}", run.ctx)),
            87..=94 => {
                run.close(disk);
                disk = run.open_rw();
            }
            _ => {
                run.close(disk);
                let ro = Disk::open(&run.path)
                    .unwrap_or_else(|e| panic!("{}: open read-only: {e}", run.ctx));
                run.check_unclean(0, "while open read-only");
                assert!(!ro.is_writable());
                assert!(ro.write_at(&[1], 0).is_err(), "{}: RO write", run.ctx);
                run.verify_all(&ro);
                drop(ro);
                disk = run.open_rw();
            }
        }
    }
    run.ctx = format!("{:?} seed {seed} final", setup.disk_type);
    run.verify_all(&disk);
    run.close(disk);
    let ro = Disk::open(&run.path).unwrap();
    run.verify_all(&ro);
    let cid = ro.cid().unwrap();
    assert_ne!(cid, cid0, "{}: CID unchanged after writes", run.ctx);
}

const SEEDS: [u64; 3] = [1, 0x5eed_0002, 0xdead_beef_0003];
const OPS: usize = 300;

#[test]
fn model_monolithic_sparse() {
    // Not a multiple of the grain: the last grain is partial.
    let capacity = 100 * MIB + 3 * SECTOR;
    let setup = Setup {
        disk_type: DiskType::MonolithicSparse,
        capacity,
        hotspots: vec![0, 5 * GRAIN, 32 * MIB, 64 * MIB, capacity],
        sparse_files: vec!["d.vmdk"],
    };
    for seed in SEEDS {
        run_model(&setup, seed, OPS);
    }
}

#[test]
fn model_two_gb_max_extent_sparse() {
    let capacity = 2100 * MIB;
    let setup = Setup {
        disk_type: DiskType::TwoGbMaxExtentSparse,
        capacity,
        // The extent boundary is at 2047 MiB (4192256 sectors).
        hotspots: vec![0, 32 * MIB, 2047 * MIB, 2047 * MIB + 32 * MIB, capacity],
        sparse_files: vec!["d-s001.vmdk", "d-s002.vmdk"],
    };
    for seed in SEEDS {
        run_model(&setup, seed, OPS);
    }
}

#[test]
fn model_monolithic_flat() {
    let capacity = 16 * MIB + 5 * SECTOR;
    let setup = Setup {
        disk_type: DiskType::MonolithicFlat,
        capacity,
        hotspots: vec![0, 8 * MIB, capacity],
        sparse_files: vec![],
    };
    for seed in SEEDS {
        run_model(&setup, seed, OPS);
    }
}

#[test]
fn model_vmfs() {
    let capacity = 8 * MIB;
    let setup = Setup {
        disk_type: DiskType::Vmfs,
        capacity,
        hotspots: vec![0, 4 * MIB, capacity],
        sparse_files: vec![],
    };
    for seed in SEEDS {
        run_model(&setup, seed, OPS);
    }
}

/// Four threads write disjoint ranges of one monolithicSparse disk at once: whole
/// grains interleaved between threads (so they allocate grains of the same tables
/// concurrently, also across a grain-table boundary), unaligned pieces of the same
/// grains, pieces straddling grain boundaries and long unaligned runs whose end
/// grains are shared with the neighbouring thread. Each thread reads back what it
/// wrote; one thread flushes now and then. Everything is verified after a reopen.
#[test]
fn concurrent_writers() {
    const THREADS: u64 = 4;
    let capacity = 64 * MIB;
    for round in 0..8u64 {
        let tmp = scratch();
        let path = tmp.path().join("c.vmdk");
        create(
            &path,
            &CreateOptions::new(DiskType::MonolithicSparse, capacity),
        )
        .unwrap();
        let mut rng = Rng(0xc0c0_0000 + round);
        let mut plans: Vec<Vec<(u64, Vec<u8>)>> = vec![Vec::new(); THREADS as usize];
        for t in 0..THREADS {
            let mut ranges: Vec<(u64, u64)> = Vec::new();
            // Whole grains, interleaved, at the start of the disk...
            for i in 0..24 {
                ranges.push(((i * THREADS + t) * GRAIN, GRAIN));
            }
            // ... and across the grain-table boundary at 32 MiB.
            for i in 0..6 {
                ranges.push((32 * MIB - 12 * GRAIN + (i * THREADS + t) * GRAIN, GRAIN));
            }
            // Disjoint unaligned pieces of the same grains.
            for i in 0..16 {
                let g = (200 + i) * GRAIN;
                ranges.push((g + t * 16 * KIB + 100, 10_000));
            }
            // Pieces straddling grain boundaries (two threads on each side).
            for i in 0..16 {
                let b = (300 + 2 * i) * GRAIN;
                ranges.push((b - 3000 + t * 1500, 1500));
            }
            // Long unaligned runs; neighbours share their end grains.
            let long = 200 * KIB + 123;
            ranges.push((24 * MIB + 777 + t * long, long));
            // Shorter unaligned runs, each spanning two or three grains.
            let long2 = 100 * KIB + 11;
            ranges.push((40 * MIB + 5 + t * long2, long2));
            // Shuffle so that different kinds of writes run at the same time.
            for i in (1..ranges.len()).rev() {
                let j = rng.below(i as u64 + 1) as usize;
                ranges.swap(i, j);
            }
            for (off, len) in ranges {
                let mut data = vec![0u8; len as usize];
                rng.fill(&mut data);
                plans[t as usize].push((off, data));
            }
        }
        // The plans must be disjoint for the result to be well defined.
        let mut all: Vec<(u64, u64)> = plans
            .iter()
            .flatten()
            .map(|(o, d)| (*o, *o + d.len() as u64))
            .collect();
        all.sort();
        for w in all.windows(2) {
            assert!(w[0].1 <= w[1].0, "test bug: overlapping ranges {w:?}");
        }
        assert!(all.last().unwrap().1 <= capacity);

        let disk = OpenOptions::new().write(true).open(&path).unwrap();
        std::thread::scope(|s| {
            for (t, plan) in plans.iter().enumerate() {
                let disk = &disk;
                s.spawn(move || {
                    for (i, (off, data)) in plan.iter().enumerate() {
                        disk.write_at(data, *off).unwrap_or_else(|e| {
                            panic!("round {round} thread {t}: write at {off}: {e}")
                        });
                        let mut back = vec![0u8; data.len()];
                        disk.read_at(&mut back, *off).unwrap();
                        assert_same(
                            &back,
                            data,
                            *off,
                            &format!("round {round} thread {t}: read-back"),
                        );
                        if t == 0 && i % 8 == 7 {
                            disk.flush().unwrap();
                        }
                    }
                });
            }
        });
        disk.close().unwrap();
        assert_eq!(unclean_byte(&path), 0);

        let mut model = Model::default();
        for (off, data) in plans.iter().flatten() {
            model.write(*off, data);
        }
        let disk = Disk::open(&path).unwrap();
        let mut off = 0;
        while off < capacity {
            let n = 4 * MIB;
            let mut buf = vec![0u8; n as usize];
            disk.read_at(&mut buf, off).unwrap();
            assert_same(
                &buf,
                &model.expected(off, n as usize),
                off,
                &format!("round {round}: after reopen"),
            );
            off += n;
        }
        // Every grain is allocated once: the file holds the metadata (128 sectors)
        // plus at most one grain per distinct written grain.
        let grains: BTreeSet<u64> = model.sectors.keys().map(|s| s * SECTOR / GRAIN).collect();
        let file_len = std::fs::metadata(&path).unwrap().len();
        assert!(
            file_len <= 128 * SECTOR + grains.len() as u64 * GRAIN,
            "round {round}: file is {file_len} bytes for {} grains: grains were allocated twice",
            grains.len()
        );
    }
}

/// Child types the chain model snapshots with.
const CHILD_TYPES: [DiskType; 3] = [
    DiskType::MonolithicSparse,
    DiskType::TwoGbMaxExtentSparse,
    DiskType::VmfsSparse,
];

/// The files of the link `stem.vmdk` of type `t` in `dir`.
fn link_files(dir: &Path, stem: &str, t: DiskType) -> Vec<PathBuf> {
    let mut v = vec![dir.join(format!("{stem}.vmdk"))];
    match t {
        DiskType::TwoGbMaxExtentSparse => v.push(dir.join(format!("{stem}-s001.vmdk"))),
        DiskType::VmfsSparse => v.push(dir.join(format!("{stem}-delta.vmdk"))),
        DiskType::MonolithicFlat | DiskType::Vmfs => v.push(dir.join(format!("{stem}-flat.vmdk"))),
        _ => {}
    }
    v
}

/// A chain under test: links bottom first, with their types.
struct ChainRun {
    dir: PathBuf,
    capacity: u64,
    links: Vec<(String, DiskType)>,
    model: Model,
    rng: Rng,
    ctx: String,
    next_name: u32,
}

impl ChainRun {
    fn top(&self) -> PathBuf {
        self.dir
            .join(format!("{}.vmdk", self.links.last().unwrap().0))
    }

    fn open_rw(&self) -> Disk {
        let d = OpenOptions::new()
            .write(true)
            .open(self.top())
            .unwrap_or_else(|e| panic!("{}: open the top read-write: {e}", self.ctx));
        assert_eq!(
            d.links().len(),
            self.links.len(),
            "{}: chain length",
            self.ctx
        );
        assert_eq!(d.capacity(), self.capacity);
        d
    }

    fn pick(&mut self) -> (u64, u64) {
        let cap = self.capacity;
        let len = match self.rng.below(10) {
            0..=3 => self.rng.range(1, 4096),
            4..=6 => self.rng.range(1, 300 * KIB),
            _ => self.rng.range(1, 3) * GRAIN,
        }
        .min(cap);
        let off = match self.rng.below(10) {
            0 => cap - len,
            1..=3 => {
                // Around a grain boundary.
                let g = self.rng.below(cap / GRAIN) * GRAIN;
                (g + self.rng.below(2 * KIB)).saturating_sub(KIB)
            }
            4..=5 => self.rng.below(cap / SECTOR) * SECTOR,
            _ => self.rng.below(cap),
        };
        (off.min(cap - len), len)
    }

    fn read_compare(&self, d: &Disk, offset: u64, len: usize) {
        let mut buf = vec![0u8; len];
        d.read_at(&mut buf, offset)
            .unwrap_or_else(|e| panic!("{}: read {len} at {offset}: {e}", self.ctx));
        assert_same(&buf, &self.model.expected(offset, len), offset, &self.ctx);
    }

    fn verify_all(&self, d: &Disk) {
        let mut off = 0;
        while off < self.capacity {
            let n = (self.capacity - off).min(4 * MIB);
            self.read_compare(d, off, n as usize);
            off += n;
        }
    }
}

/// Random writes, reads, flushes, reopens, snapshots (a child of a random type on
/// the current top, written from then on) and commits (the top links merged into
/// the link below, sometimes two at once, sometimes keeping the child), checked
/// against the model; the model never changes with a snapshot or a commit.
fn run_chain_model(base_type: DiskType, capacity: u64, seed: u64, ops: usize) {
    use vdisk::ops::child::create_child;
    use vdisk::ops::commit::{commit, CommitOptions};
    let tmp = scratch();
    let mut run = ChainRun {
        dir: tmp.path().to_path_buf(),
        capacity,
        links: vec![("m".to_string(), base_type)],
        model: Model::default(),
        rng: Rng(seed),
        ctx: String::new(),
        next_name: 0,
    };
    create(&run.top(), &CreateOptions::new(base_type, capacity)).unwrap();
    let mut disk = run.open_rw();
    let (mut snapshots, mut commits) = (0, 0);
    for op in 0..ops {
        run.ctx = format!(
            "chain on {base_type:?} seed {seed} op {op} ({} links)",
            run.links.len()
        );
        match run.rng.below(100) {
            0..=39 => {
                let (off, len) = run.pick();
                let mut data = vec![0u8; len as usize];
                if !run.rng.percent(8) {
                    run.rng.fill(&mut data);
                }
                disk.write_at(&data, off)
                    .unwrap_or_else(|e| panic!("{}: write {len} at {off}: {e}", run.ctx));
                run.model.write(off, &data);
            }
            40..=62 => {
                let (off, len) = run.pick();
                run.read_compare(&disk, off, len as usize);
            }
            63..=66 => disk
                .flush()
                .unwrap_or_else(|e| panic!("{}: flush: {e}", run.ctx)),
            67..=72 => {
                disk.close()
                    .unwrap_or_else(|e| panic!("{}: close: {e}", run.ctx));
                disk = run.open_rw();
            }
            73..=84 => {
                disk.close()
                    .unwrap_or_else(|e| panic!("{}: close: {e}", run.ctx));
                let t = CHILD_TYPES[run.rng.below(3) as usize];
                run.next_name += 1;
                let name = format!("m-{:06}", run.next_name);
                let parent = run.top();
                let child = run.dir.join(format!("{name}.vmdk"));
                create_child(&parent, &child, t)
                    .unwrap_or_else(|e| panic!("{}: snapshot {t:?}: {e}", run.ctx));
                run.links.push((name, t));
                snapshots += 1;
                disk = run.open_rw();
                // The fresh child reads as its parent.
                for _ in 0..3 {
                    let (off, len) = run.pick();
                    run.read_compare(&disk, off, len as usize);
                }
            }
            85..=94 => {
                if run.links.len() < 2 {
                    continue;
                }
                disk.close()
                    .unwrap_or_else(|e| panic!("{}: close: {e}", run.ctx));
                let links = if run.links.len() > 2 && run.rng.percent(30) {
                    2
                } else {
                    1
                };
                let keep = run.rng.percent(25);
                let top = run.top();
                commit(
                    &top,
                    &CommitOptions {
                        links,
                        keep_child: keep,
                    },
                    &mut |_, _| true,
                )
                .unwrap_or_else(|e| panic!("{}: commit {links} links (keep {keep}): {e}", run.ctx));
                commits += 1;
                if !keep {
                    let n = run.links.len();
                    for (name, t) in run.links.split_off(n - links) {
                        for f in link_files(&run.dir, &name, t) {
                            assert!(
                                !f.exists(),
                                "{}: {} left after commit",
                                run.ctx,
                                f.display()
                            );
                        }
                    }
                    // The target alone reads as the whole chain did.
                    let ro = Disk::open(run.top()).unwrap();
                    run.verify_all(&ro);
                }
                disk = run.open_rw();
            }
            _ => {
                disk.close()
                    .unwrap_or_else(|e| panic!("{}: close: {e}", run.ctx));
                let ro = Disk::open(run.top())
                    .unwrap_or_else(|e| panic!("{}: open read-only: {e}", run.ctx));
                run.verify_all(&ro);
                drop(ro);
                disk = run.open_rw();
            }
        }
    }
    run.ctx = format!("chain on {base_type:?} seed {seed} final");
    run.verify_all(&disk);
    disk.close().unwrap();
    assert!(
        snapshots >= 3 && commits >= 2,
        "{}: only {snapshots} snapshots and {commits} commits",
        run.ctx
    );
    // Everything merged down into the base.
    if run.links.len() > 1 {
        let links = run.links.len() - 1;
        commit(
            &run.top(),
            &CommitOptions {
                links,
                keep_child: false,
            },
            &mut |_, _| true,
        )
        .unwrap_or_else(|e| panic!("{}: final commit of {links} links: {e}", run.ctx));
        run.links.truncate(1);
    }
    let ro = Disk::open(run.top()).unwrap();
    assert_eq!(ro.links().len(), 1);
    run.verify_all(&ro);
    drop(ro);
    let left: Vec<String> = std::fs::read_dir(&run.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut want: Vec<String> = link_files(&run.dir, "m", base_type)
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let mut left = left;
    left.sort();
    want.sort();
    assert_eq!(left, want, "{}: files left in the folder", run.ctx);
}

#[test]
fn model_chain_on_sparse_base() {
    for seed in [0xc4a1_0001, 0xc4a1_0002, 0xc4a1_0003] {
        run_chain_model(DiskType::MonolithicSparse, 12 * MIB + 3 * SECTOR, seed, 400);
    }
}

#[test]
fn model_chain_on_flat_base() {
    for seed in [0xf1a7_0001, 0xf1a7_0002] {
        run_chain_model(DiskType::Vmfs, 8 * MIB, seed, 400);
    }
}
