//! Snapshot chains through the library: children of every growable type on every
//! base type, reads through the chain, single-link opens, commit across formats
//! (also cancelled and re-run), the chain errors (CID mismatch, missing parent, loops,
//! too deep) and that they change no file, the strict parent-name policy and its
//! fallbacks, non-persistent opens and attach.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{assert_same, merge_ranges, Rng};
use vdisk::ops::attach::attach;
use vdisk::ops::child::create_child;
use vdisk::ops::commit::{commit, CommitOptions, CommitStats};
use vdisk::{create, CreateOptions, Disk, DiskType, ErrorKind, OpenOptions};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;
const GRAIN: u64 = 64 * KIB;

/// Child types a chain can grow with (seSparse is not wired in yet).
const CHILD_TYPES: [DiskType; 3] = [
    DiskType::MonolithicSparse,
    DiskType::TwoGbMaxExtentSparse,
    DiskType::VmfsSparse,
];

/// Base types chains are built on.
const BASE_TYPES: [DiskType; 6] = [
    DiskType::MonolithicSparse,
    DiskType::TwoGbMaxExtentSparse,
    DiskType::MonolithicFlat,
    DiskType::TwoGbMaxExtentFlat,
    DiskType::Vmfs,
    DiskType::VmfsThin,
];

/// One write: offset and data.
type Write = (u64, Vec<u8>);

/// The expected content of a disk: zeros overlaid with writes in order.
#[derive(Clone, Debug)]
struct Content {
    capacity: u64,
    writes: Vec<Write>,
}

impl Content {
    fn new(capacity: u64) -> Content {
        Content {
            capacity,
            writes: Vec::new(),
        }
    }

    fn apply(&mut self, writes: &[Write]) {
        self.writes.extend(writes.iter().cloned());
    }

    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        let end = offset + len as u64;
        for (off, data) in &self.writes {
            let w_end = off + data.len() as u64;
            let from = (*off).max(offset);
            let to = w_end.min(end);
            if from < to {
                out[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&data[(from - off) as usize..(to - off) as usize]);
            }
        }
        out
    }

    /// Ranges worth reading back: everything for small disks, else every written range
    /// with a margin, the first and last MiB and a window around `extra` offsets.
    fn check_ranges(&self, extra: &[u64]) -> Vec<(u64, u64)> {
        let cap = self.capacity;
        if cap <= 64 * MIB {
            return vec![(0, cap)];
        }
        let margin = 192 * KIB;
        let mut r: Vec<(u64, u64)> = self
            .writes
            .iter()
            .map(|(o, d)| {
                let s = o.saturating_sub(margin);
                (s, (o + d.len() as u64 + margin).min(cap))
            })
            .collect();
        r.push((0, MIB));
        r.push((cap - MIB, cap));
        for &x in extra {
            r.push((x.saturating_sub(MIB), (x + MIB).min(cap)));
        }
        merge_ranges(r)
    }
}

/// Reads `disk` where `content` says something interesting is and compares.
fn verify_disk(disk: &Disk, content: &Content, extra: &[u64], ctx: &str) {
    assert_eq!(disk.capacity(), content.capacity, "{ctx}: capacity");
    for (start, end) in content.check_ranges(extra) {
        let mut off = start;
        while off < end {
            let n = (end - off).min(4 * MIB) as usize;
            let mut buf = vec![0u8; n];
            disk.read_at(&mut buf, off)
                .unwrap_or_else(|e| panic!("{ctx}: read {n} at {off}: {e}"));
            assert_same(&buf, &content.read(off, n), off, ctx);
            off += n as u64;
        }
    }
}

/// Opens `path` read-only with the default policy and compares with `content`.
fn verify(path: &Path, content: &Content, ctx: &str) {
    let disk = Disk::open(path).unwrap_or_else(|e| panic!("{ctx}: open {}: {e}", path.display()));
    verify_disk(&disk, content, &[], ctx);
}

/// Random writes over a disk of `cap` bytes: whole grains, partial grains (sector
/// aligned and not), pieces across grain boundaries, zero writes, the last bytes.
fn plan(rng: &mut Rng, cap: u64, n: usize) -> Vec<Write> {
    plan_near(rng, cap, n, &[])
}

/// Like [`plan`], with some writes clustered around `hot` offsets.
fn plan_near(rng: &mut Rng, cap: u64, n: usize, hot: &[u64]) -> Vec<Write> {
    let mut out = Vec::new();
    let grains = cap / GRAIN;
    for _ in 0..n {
        let (off, len, zero) = match rng.below(8) {
            0 => {
                let g = rng.below(grains.max(1));
                (g * GRAIN, GRAIN * rng.range(1, 3), false)
            }
            1 => (
                rng.below(cap / SECTOR) * SECTOR,
                rng.range(1, 16) * SECTOR,
                false,
            ),
            2 => (rng.below(cap), rng.range(1, 10_000), false),
            3 if grains > 2 => {
                let b = rng.range(1, grains - 1) * GRAIN;
                (b - rng.range(1, 3000), rng.range(3001, 9000), false)
            }
            4 => (rng.below(cap), rng.range(1, 200 * KIB), rng.below(2) == 0),
            5 => {
                let len = rng.range(1, 4096);
                (cap.saturating_sub(len), len, false)
            }
            6 if !hot.is_empty() => {
                let h = hot[rng.below(hot.len() as u64) as usize];
                (
                    h.saturating_sub(rng.below(300 * KIB)),
                    rng.range(1, 400 * KIB),
                    false,
                )
            }
            _ => {
                let g = rng.below(grains.max(1));
                (g * GRAIN + rng.below(GRAIN), rng.range(1, GRAIN), true)
            }
        };
        let off = off.min(cap - 1);
        let len = len.min(cap - off).max(1);
        let data = if zero {
            vec![0u8; len as usize]
        } else {
            rng.bytes(len as usize)
        };
        out.push((off, data));
    }
    out
}

/// Writes `writes` into the disk at `path` (opened read-write) and closes it.
fn write_disk(path: &Path, writes: &[Write], ctx: &str) {
    let disk = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{ctx}: open {} read-write: {e}", path.display()));
    for (off, data) in writes {
        disk.write_at(data, *off)
            .unwrap_or_else(|e| panic!("{ctx}: write {} at {off}: {e}", data.len()));
    }
    disk.close().unwrap_or_else(|e| panic!("{ctx}: close: {e}"));
}

/// Every file under `dir` (recursively) with its bytes.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                todo.push(p);
            } else if ft.is_file() {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            } else {
                out.insert(p.clone(), b"<symlink>".to_vec());
            }
        }
    }
    out
}

/// Asserts that the files under a folder are exactly as `before`.
fn assert_files_unchanged(dir: &Path, before: &BTreeMap<PathBuf, Vec<u8>>, ctx: &str) {
    let after = files(dir);
    let names_before: Vec<_> = before.keys().collect();
    let names_after: Vec<_> = after.keys().collect();
    assert_eq!(names_after, names_before, "{ctx}: the set of files changed");
    for (p, b) in before {
        let a = &after[p];
        if a != b {
            let i = a
                .iter()
                .zip(b)
                .position(|(x, y)| x != y)
                .unwrap_or(a.len().min(b.len()));
            panic!(
                "{ctx}: {} changed (was {} bytes, now {}; first difference at byte {i})",
                p.display(),
                b.len(),
                a.len()
            );
        }
    }
}

fn new_disk(path: &Path, t: DiskType, cap: u64) {
    create(path, &CreateOptions::new(t, cap))
        .unwrap_or_else(|e| panic!("create {t:?} {}: {e}", path.display()));
}

fn child(parent: &Path, child: &Path, t: DiskType) {
    create_child(parent, child, t).unwrap_or_else(|e| {
        panic!(
            "create_child {t:?} {} of {}: {e}",
            child.display(),
            parent.display()
        )
    });
}

fn open_err(path: &Path, opts: &OpenOptions) -> vdisk::Error {
    match opts.open(path) {
        Ok(_) => panic!("{} opened with {opts:?} but should not", path.display()),
        Err(e) => e,
    }
}

fn cid_of(path: &Path) -> u32 {
    OpenOptions::new()
        .single_link(true)
        .open(path)
        .unwrap()
        .cid()
        .unwrap()
}

fn parent_cid_of(path: &Path) -> Option<u32> {
    OpenOptions::new()
        .single_link(true)
        .open(path)
        .unwrap()
        .info()
        .unwrap()
        .parent_cid
}

/// The files a link of type `t` named `stem.vmdk` in `dir` consists of.
fn link_files(dir: &Path, stem: &str, t: DiskType) -> Vec<PathBuf> {
    let mut v = vec![dir.join(format!("{stem}.vmdk"))];
    match t {
        DiskType::TwoGbMaxExtentSparse => v.push(dir.join(format!("{stem}-s001.vmdk"))),
        DiskType::VmfsSparse => v.push(dir.join(format!("{stem}-delta.vmdk"))),
        DiskType::MonolithicFlat | DiskType::Vmfs | DiskType::VmfsThin => {
            v.push(dir.join(format!("{stem}-flat.vmdk")))
        }
        DiskType::TwoGbMaxExtentFlat => v.push(dir.join(format!("{stem}-f001.vmdk"))),
        _ => {}
    }
    v
}

/// Rewrites a text descriptor file with `f` applied to every line.
fn edit_descriptor(path: &Path, f: impl Fn(&str) -> String) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(
        text.contains("# Disk DescriptorFile"),
        "{} is not a text descriptor",
        path.display()
    );
    let mut out: String = text.lines().map(|l| f(l) + "\n").collect();
    if !text.ends_with('\n') {
        out.pop();
    }
    std::fs::write(path, out).unwrap();
}

fn set_hint(path: &Path, hint: &str) {
    edit_descriptor(path, |l| {
        if l.starts_with("parentFileNameHint=") {
            format!("parentFileNameHint=\"{hint}\"")
        } else {
            l.to_string()
        }
    });
}

fn set_parent_cid(path: &Path, cid: u32) {
    edit_descriptor(path, |l| {
        if l.starts_with("parentCID=") {
            format!("parentCID={cid:08x}")
        } else {
            l.to_string()
        }
    });
}

/// What the top link alone holds: the chain's content in every grain (of `grain`
/// bytes) a write touched, zeros elsewhere.
///
/// Zeros written where the chain read zeros are not stored (`Disk::write_at`
/// skips them), so a grain that only such writes touched may be absent from the
/// child: `single` (the child opened alone) decides for those grains, which must
/// then read as zeros there. A grain any write put a non-zero byte in is held.
fn single_link_content(
    chain: &Content,
    top_writes: &[Write],
    grain: u64,
    single: &Disk,
) -> Content {
    let mut grains: Vec<(u64, bool)> = Vec::new();
    for (off, data) in top_writes {
        let end = off + data.len() as u64;
        let mut g = off / grain;
        while g * grain < end {
            let (s, e) = ((g * grain).max(*off), ((g + 1) * grain).min(end));
            let nonzero = data[(s - off) as usize..(e - off) as usize]
                .iter()
                .any(|&b| b != 0);
            grains.push((g, nonzero));
            g += 1;
        }
    }
    grains.sort_unstable();
    let mut c = Content::new(chain.capacity);
    let mut last = None;
    for (i, &(g, _)) in grains.iter().enumerate() {
        if last == Some(g) {
            continue;
        }
        last = Some(g);
        let must_hold = grains[i..].iter().take_while(|x| x.0 == g).any(|x| x.1);
        let start = g * grain;
        let len = grain.min(chain.capacity - start) as usize;
        let mut got = vec![0u8; len];
        single.read_at(&mut got, start).unwrap();
        if must_hold || got.iter().any(|&b| b != 0) {
            c.writes.push((start, chain.read(start, len)));
        }
    }
    c
}

fn grain_of(t: DiskType) -> u64 {
    if t == DiskType::VmfsSparse {
        SECTOR
    } else {
        GRAIN
    }
}

/// Every growable child type on every base type: the child reads as its parent
/// before any write, the parent never changes, writes to the child read back through
/// the chain, and the child alone holds exactly the grains it wrote.
#[test]
fn children_of_every_type_on_every_base() {
    let cap = 6 * MIB + 3 * SECTOR;
    let mut rng = Rng(0xc4a1_0001);
    for base_t in BASE_TYPES {
        for child_t in CHILD_TYPES {
            let ctx = format!("{base_t:?} base, {child_t:?} child");
            let tmp = tempfile::tempdir().unwrap();
            let base = tmp.path().join("base.vmdk");
            new_disk(&base, base_t, cap);
            let mut content = Content::new(cap);
            let w0 = plan(&mut rng, cap, 24);
            write_disk(&base, &w0, &ctx);
            content.apply(&w0);
            let base_files = files(tmp.path());

            let top = tmp.path().join("base-000001.vmdk");
            child(&base, &top, child_t);
            for f in link_files(tmp.path(), "base-000001", child_t) {
                assert!(f.is_file(), "{ctx}: {} was not created", f.display());
            }
            verify(&top, &content, &format!("{ctx}: fresh child"));
            {
                let d = Disk::open(&top).unwrap();
                assert_eq!(d.links().len(), 2, "{ctx}: chain length");
                let i = d.info().unwrap();
                assert_eq!(i.chain.len(), 2, "{ctx}: info chain");
                assert_eq!(
                    i.chain[0].parent_file_name_hint.as_deref(),
                    Some("base.vmdk"),
                    "{ctx}: hint"
                );
                assert_eq!(i.chain[0].parent_cid, i.chain[1].cid, "{ctx}: parentCID");
                assert_eq!(i.disk_type, Some(child_t), "{ctx}: child type");
                let single = OpenOptions::new().single_link(true).open(&top).unwrap();
                verify_disk(
                    &single,
                    &Content::new(cap),
                    &[],
                    &format!("{ctx}: empty single link"),
                );
            }

            let w1 = plan(&mut rng, cap, 40);
            write_disk(&top, &w1, &ctx);
            content.apply(&w1);
            verify(&top, &content, &format!("{ctx}: after child writes"));
            // The parent is untouched.
            let mut now = files(tmp.path());
            now.retain(|p, _| base_files.contains_key(p));
            assert_eq!(
                now.keys().collect::<Vec<_>>(),
                base_files.keys().collect::<Vec<_>>()
            );
            for (p, b) in &base_files {
                assert!(
                    &now[p] == b,
                    "{ctx}: parent file {} changed by writes to the child",
                    p.display()
                );
            }
            let mut base_content = Content::new(cap);
            base_content.apply(&w0);
            verify(&base, &base_content, &format!("{ctx}: parent alone"));
            // The child alone.
            let single = OpenOptions::new().single_link(true).open(&top).unwrap();
            assert_eq!(single.links().len(), 1);
            let alone = single_link_content(&content, &w1, grain_of(child_t), &single);
            verify_disk(&single, &alone, &[], &format!("{ctx}: single link"));
        }
    }
}

/// A chain mixing every child type, five links deep, on an ESX flat base: each level
/// reads right, and so does every link's own chain below it.
#[test]
fn mixed_chain_five_links() {
    let cap = 5 * MIB;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut rng = Rng(0x5ee_0005);
    let base = dir.join("vm.vmdk");
    new_disk(&base, DiskType::Vmfs, cap);
    let mut content = Content::new(cap);
    let w = plan(&mut rng, cap, 20);
    write_disk(&base, &w, "base");
    content.apply(&w);
    let types = [
        DiskType::VmfsSparse,
        DiskType::MonolithicSparse,
        DiskType::TwoGbMaxExtentSparse,
        DiskType::VmfsSparse,
    ];
    let mut paths = vec![base.clone()];
    let mut states = vec![content.clone()];
    for (i, t) in types.into_iter().enumerate() {
        let p = dir.join(format!("vm-{:06}.vmdk", i + 1));
        child(paths.last().unwrap(), &p, t);
        let w = plan(&mut rng, cap, 30);
        write_disk(&p, &w, &format!("level {}", i + 1));
        content.apply(&w);
        paths.push(p);
        states.push(content.clone());
        for (j, (p, c)) in paths.iter().zip(&states).enumerate() {
            verify(p, c, &format!("after level {}: link {j}", i + 1));
        }
    }
    let d = Disk::open(paths.last().unwrap()).unwrap();
    let info = d.info().unwrap();
    assert_eq!(info.chain.len(), 5);
    for (k, l) in info.chain.iter().enumerate() {
        assert_eq!(
            std::fs::canonicalize(&l.path).unwrap(),
            std::fs::canonicalize(&paths[4 - k]).unwrap(),
            "chain[{k}]"
        );
        if k < 4 {
            assert_eq!(l.parent_cid, info.chain[k + 1].cid, "chain[{k}] parentCID");
        } else {
            assert_eq!(l.parent_file_name_hint, None);
        }
    }
    assert_eq!(info.chain[0].create_type, "vmfsSparse");
    assert_eq!(info.chain[4].create_type, "vmfs");
}

/// A split sparse base larger than one extent, children of each type: writes
/// around the 2047 MiB extent boundary read back through the chain.
#[test]
fn split_sparse_chain_across_extent_boundary() {
    let cap = 2100 * MIB;
    let boundary = 2047 * MIB;
    let hot = [boundary, 32 * MIB, cap - 100 * KIB];
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut rng = Rng(0x2_0470);
    let base = dir.join("big.vmdk");
    new_disk(&base, DiskType::TwoGbMaxExtentSparse, cap);
    let mut content = Content::new(cap);
    let w = plan_near(&mut rng, cap, 20, &hot);
    write_disk(&base, &w, "base");
    content.apply(&w);
    let mut parent = base.clone();
    for (i, t) in [
        DiskType::TwoGbMaxExtentSparse,
        DiskType::VmfsSparse,
        DiskType::MonolithicSparse,
    ]
    .into_iter()
    .enumerate()
    {
        let p = dir.join(format!("big-{:06}.vmdk", i + 1));
        child(&parent, &p, t);
        let w = plan_near(&mut rng, cap, 24, &hot);
        write_disk(&p, &w, &format!("{t:?}"));
        content.apply(&w);
        let d = Disk::open(&p).unwrap();
        verify_disk(
            &d,
            &content,
            &hot,
            &format!("{t:?} child at level {}", i + 1),
        );
        parent = p;
    }
    assert!(dir.join("big-000001-s002.vmdk").is_file());
    // All three children merged into the split base in one commit.
    let st = commit(
        &parent,
        &CommitOptions {
            links: 3,
            keep_child: false,
        },
        &mut |_, _| true,
    )
    .unwrap_or_else(|e| panic!("commit of three links into the split base: {e}"));
    assert_eq!(
        std::fs::canonicalize(&st.target).unwrap(),
        std::fs::canonicalize(&base).unwrap()
    );
    let d = Disk::open(&base).unwrap();
    assert_eq!(d.links().len(), 1);
    verify_disk(&d, &content, &hot, "split base after commit");
    let mut left: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["big-s001.vmdk", "big-s002.vmdk", "big.vmdk"]);
}

/// Commits one (or two) links into a target of another format; the target alone then
/// reads as the whole chain did; merged files are gone (or kept and re-pointed).
#[test]
fn commit_across_formats() {
    struct Case {
        base: DiskType,
        children: &'static [DiskType],
        links: usize,
        keep: bool,
    }
    let cases = [
        Case {
            base: DiskType::Vmfs,
            children: &[DiskType::VmfsSparse],
            links: 1,
            keep: false,
        },
        Case {
            base: DiskType::MonolithicFlat,
            children: &[DiskType::VmfsSparse],
            links: 1,
            keep: false,
        },
        Case {
            base: DiskType::TwoGbMaxExtentFlat,
            children: &[DiskType::MonolithicSparse],
            links: 1,
            keep: true,
        },
        Case {
            base: DiskType::TwoGbMaxExtentSparse,
            children: &[DiskType::MonolithicSparse],
            links: 1,
            keep: false,
        },
        Case {
            base: DiskType::MonolithicSparse,
            children: &[DiskType::TwoGbMaxExtentSparse],
            links: 1,
            keep: true,
        },
        Case {
            base: DiskType::MonolithicSparse,
            children: &[DiskType::VmfsSparse, DiskType::MonolithicSparse],
            links: 2,
            keep: false,
        },
        Case {
            base: DiskType::VmfsThin,
            children: &[DiskType::TwoGbMaxExtentSparse, DiskType::VmfsSparse],
            links: 2,
            keep: true,
        },
        // The target is itself a delta (vmfsSparse into its own parent's child).
        Case {
            base: DiskType::MonolithicSparse,
            children: &[DiskType::VmfsSparse, DiskType::MonolithicSparse],
            links: 1,
            keep: false,
        },
        Case {
            base: DiskType::MonolithicFlat,
            children: &[DiskType::MonolithicSparse, DiskType::VmfsSparse],
            links: 1,
            keep: true,
        },
    ];
    let cap = 6 * MIB - 5 * SECTOR;
    let mut rng = Rng(0xc0_331);
    for case in &cases {
        let ctx = format!(
            "{:?} <- {:?}, links {}, keep {}",
            case.base, case.children, case.links, case.keep
        );
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut paths = vec![dir.join("d.vmdk")];
        let mut types = vec![case.base];
        new_disk(&paths[0], case.base, cap);
        let mut content = Content::new(cap);
        let w = plan(&mut rng, cap, 25);
        write_disk(&paths[0], &w, &ctx);
        content.apply(&w);
        let mut states = vec![content.clone()];
        for (i, &t) in case.children.iter().enumerate() {
            let p = dir.join(format!("d-{:06}.vmdk", i + 1));
            child(paths.last().unwrap(), &p, t);
            let mut w = plan(&mut rng, cap, 30);
            // Zeros over data of the links below, whole grains and pieces.
            let zo = data_offset(&content, cap);
            w.push((zo, vec![0u8; GRAIN as usize]));
            w.push((zo / GRAIN * GRAIN + GRAIN + 777, vec![0u8; 1000]));
            write_disk(&p, &w, &ctx);
            content.apply(&w);
            paths.push(p);
            types.push(t);
            states.push(content.clone());
        }
        let top = paths.last().unwrap().clone();
        let n = paths.len();
        let target_i = n - 1 - case.links;
        let target = paths[target_i].clone();
        let target_cid = cid_of(&target);
        // Files below the target must not change.
        let below: Vec<BTreeMap<PathBuf, Vec<u8>>> = (0..target_i)
            .map(|i| {
                link_files(dir, &stem(&paths[i]), types[i])
                    .into_iter()
                    .map(|f| {
                        let b = std::fs::read(&f).unwrap();
                        (f, b)
                    })
                    .collect()
            })
            .collect();

        let mut calls = 0u64;
        let mut last = (0u64, 0u64);
        let mut progress = |done: u64, total: u64| {
            calls += 1;
            assert!(done <= total, "{done} > {total}");
            assert!(done >= last.0, "progress went backwards");
            last = (done, total);
            true
        };
        let opts = CommitOptions {
            links: case.links,
            keep_child: case.keep,
        };
        let st: CommitStats =
            commit(&top, &opts, &mut progress).unwrap_or_else(|e| panic!("{ctx}: commit: {e}"));
        assert!(calls >= 2, "{ctx}: progress called {calls} times");
        assert_eq!(last.0, last.1, "{ctx}: progress did not reach the total");
        assert_eq!(
            std::fs::canonicalize(&st.target).unwrap(),
            std::fs::canonicalize(&target).unwrap(),
            "{ctx}: target"
        );
        assert!(st.bytes > 0, "{ctx}: nothing written");
        assert_eq!(cid_of(&target), st.cid, "{ctx}: reported CID");
        assert_ne!(st.cid, target_cid, "{ctx}: the target kept its CID");
        // The target (with whatever is below it) reads as the whole chain did.
        verify(&target, &content, &format!("{ctx}: target after commit"));
        for (i, files_before) in below.iter().enumerate() {
            for (f, b) in files_before {
                assert!(
                    &std::fs::read(f).unwrap() == b,
                    "{ctx}: {} below the target (link {i}) changed",
                    f.display()
                );
            }
            verify(
                &paths[i],
                &states[i],
                &format!("{ctx}: link {i} below the target"),
            );
        }
        for i in target_i + 1..n {
            let merged = link_files(dir, &stem(&paths[i]), types[i]);
            for f in merged {
                assert_eq!(
                    f.exists(),
                    case.keep,
                    "{ctx}: merged file {} exists: {}",
                    f.display(),
                    f.exists()
                );
            }
        }
        if case.keep {
            // The kept links still open as a valid chain with the same content.
            verify(&top, &content, &format!("{ctx}: kept child"));
            let lowest = &paths[target_i + 1];
            assert_eq!(
                parent_cid_of(lowest),
                Some(st.cid),
                "{ctx}: kept child not re-pointed"
            );
        }
        // Nothing else is left behind in the folder.
        let mut expected_files: Vec<PathBuf> = Vec::new();
        let keep_to = if case.keep { n } else { target_i + 1 };
        for i in 0..keep_to {
            expected_files.extend(link_files(dir, &stem(&paths[i]), types[i]));
        }
        expected_files.sort();
        let now: Vec<PathBuf> = files(dir).into_keys().collect();
        assert_eq!(now, expected_files, "{ctx}: files in the folder");
    }
}

/// The grain-aligned start of a write with data in `content`, with room for three
/// grains after it.
fn data_offset(content: &Content, cap: u64) -> u64 {
    content
        .writes
        .iter()
        .find(|(o, d)| d.len() > 16 && d.iter().any(|&b| b != 0) && *o + 3 * GRAIN < cap)
        .map(|(o, _)| *o / GRAIN * GRAIN)
        .expect("no data write to zero over")
}

fn stem(p: &Path) -> String {
    p.file_stem().unwrap().to_str().unwrap().to_string()
}

/// A commit cancelled by its progress callback returns Cancelled; the chain reads as
/// before and the child is unchanged; run again, it completes.
#[test]
fn cancelled_commit_leaves_the_chain_intact() {
    for (base_t, child_t) in [
        (DiskType::MonolithicSparse, DiskType::MonolithicSparse),
        (DiskType::MonolithicFlat, DiskType::VmfsSparse),
        (
            DiskType::TwoGbMaxExtentSparse,
            DiskType::TwoGbMaxExtentSparse,
        ),
    ] {
        let ctx = format!("{base_t:?} <- {child_t:?}");
        let cap = 40 * MIB;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let base = dir.join("b.vmdk");
        new_disk(&base, base_t, cap);
        let mut rng = Rng(0xca_11ce);
        let mut content = Content::new(cap);
        let w = plan(&mut rng, cap, 30);
        write_disk(&base, &w, &ctx);
        content.apply(&w);
        let top = dir.join("b-000001.vmdk");
        child(&base, &top, child_t);
        // 24 MiB of data in big runs (several 4 MiB commit chunks), plus scattered
        // writes and zeros.
        let mut w = plan(&mut rng, cap, 40);
        for k in 0..6u64 {
            w.push((k * 6 * MIB + 4096, rng.bytes(4 * MIB as usize)));
        }
        write_disk(&top, &w, &ctx);
        content.apply(&w);
        let child_files: BTreeMap<PathBuf, Vec<u8>> = link_files(dir, "b-000001", child_t)
            .into_iter()
            .map(|f| {
                let b = std::fs::read(&f).unwrap();
                (f, b)
            })
            .collect();
        let base_cid = cid_of(&base);

        // Cancelled before anything is copied: no file changes at all.
        let all = files(dir);
        let mut stop_at_once = |_: u64, _: u64| false;
        let e = commit(&top, &CommitOptions::default(), &mut stop_at_once)
            .expect_err("a commit cancelled at once succeeded");
        assert_eq!(e.kind(), ErrorKind::Cancelled, "{ctx}: {e}");
        assert_files_unchanged(dir, &all, &format!("{ctx}: commit cancelled at once"));

        // Cancelled after some progress.
        let mut seen = 0u64;
        let mut stop_later = |done: u64, total: u64| {
            seen = total;
            done < 10 * MIB
        };
        let e = commit(&top, &CommitOptions::default(), &mut stop_later)
            .expect_err("a cancelled commit succeeded");
        assert_eq!(e.kind(), ErrorKind::Cancelled, "{ctx}: {e}");
        assert!(seen > 20 * MIB, "{ctx}: total {seen}");
        for (f, b) in &child_files {
            assert!(
                &std::fs::read(f).unwrap() == b,
                "{ctx}: cancelled commit changed the child file {}",
                f.display()
            );
        }
        assert_eq!(cid_of(&base), base_cid, "{ctx}: the target's CID changed");
        verify(
            &top,
            &content,
            &format!("{ctx}: chain after a cancelled commit"),
        );

        let st = commit(&top, &CommitOptions::default(), &mut |_, _| true)
            .unwrap_or_else(|e| panic!("{ctx}: commit after cancel: {e}"));
        assert_ne!(st.cid, base_cid);
        verify(&base, &content, &format!("{ctx}: target after the re-run"));
        for f in child_files.keys() {
            assert!(!f.exists(), "{ctx}: {} left behind", f.display());
        }
    }
}

/// Commit refuses a link without a parent and more links than the chain holds,
/// and changes nothing.
#[test]
fn commit_refuses_without_a_target() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let base = dir.join("b.vmdk");
    new_disk(&base, DiskType::MonolithicSparse, 4 * MIB);
    write_disk(&base, &[(0, vec![7u8; 5000])], "base");
    let top = dir.join("c.vmdk");
    child(&base, &top, DiskType::VmfsSparse);
    write_disk(&top, &[(100_000, vec![9u8; 5000])], "child");
    let before = files(dir);
    for (p, links) in [(&base, 1), (&top, 2), (&top, 5)] {
        let e = commit(
            p,
            &CommitOptions {
                links,
                keep_child: false,
            },
            &mut |_, _| true,
        )
        .expect_err("commit without a target succeeded");
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        assert_files_unchanged(
            dir,
            &before,
            &format!("commit {} links {links}", p.display()),
        );
    }
}

/// A chain whose parent changed after the child was made: CidMismatch for reads and
/// for writes, and the failed opens change no file; check_cid(false) and
/// single_link(true) open it.
#[test]
fn cid_mismatch() {
    for child_t in CHILD_TYPES {
        let ctx = format!("{child_t:?}");
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let cap = 4 * MIB;
        let base = dir.join("b.vmdk");
        new_disk(&base, DiskType::MonolithicSparse, cap);
        write_disk(&base, &[(0, vec![1u8; 3 * GRAIN as usize])], &ctx);
        let top = dir.join("c.vmdk");
        child(&base, &top, child_t);
        let child_writes = vec![(GRAIN, vec![2u8; 1000])];
        write_disk(&top, &child_writes, &ctx);
        // Modify the parent after the snapshot.
        write_disk(&base, &[(2 * GRAIN, vec![3u8; 512])], &ctx);

        let before = files(dir);
        for opts in [
            OpenOptions::new(),
            OpenOptions::new().write(true),
            OpenOptions::new().strict_paths(true),
        ] {
            let e = open_err(&top, &opts);
            assert_eq!(e.kind(), ErrorKind::CidMismatch, "{ctx}: {opts:?}: {e}");
            assert_files_unchanged(dir, &before, &format!("{ctx}: failed open {opts:?}"));
        }
        let e = create_child(&top, &dir.join("d.vmdk"), DiskType::MonolithicSparse)
            .expect_err("a child of a broken chain was created");
        assert_eq!(e.kind(), ErrorKind::CidMismatch, "{ctx}: {e}");
        assert_files_unchanged(dir, &before, &format!("{ctx}: failed create_child"));
        let e = commit(&top, &CommitOptions::default(), &mut |_, _| true)
            .expect_err("a broken chain was committed");
        assert_eq!(e.kind(), ErrorKind::CidMismatch, "{ctx}: {e}");
        assert_files_unchanged(dir, &before, &format!("{ctx}: failed commit"));

        // Forensics: ignore the mismatch. The child's grain was copied from the old
        // parent (1s) when written; the rest comes from the changed parent.
        let mut content = Content::new(cap);
        content.apply(&[(0, vec![1u8; 3 * GRAIN as usize])]);
        content.apply(&[(2 * GRAIN, vec![3u8; 512])]);
        content.apply(&child_writes);
        let d = OpenOptions::new().check_cid(false).open(&top).unwrap();
        assert_eq!(d.links().len(), 2);
        verify_disk(&d, &content, &[], &format!("{ctx}: check_cid(false)"));
        drop(d);
        let single = OpenOptions::new().single_link(true).open(&top).unwrap();
        let mut at_write = Content::new(cap);
        at_write.apply(&[(0, vec![1u8; 3 * GRAIN as usize])]);
        at_write.apply(&child_writes);
        let only = single_link_content(&at_write, &child_writes, grain_of(child_t), &single);
        verify_disk(&single, &only, &[], &format!("{ctx}: single link"));
        drop(single);
        assert_files_unchanged(dir, &before, &format!("{ctx}: reads"));
    }
}

/// A missing parent is FileNotFound; nothing changes.
#[test]
fn missing_parent() {
    for child_t in CHILD_TYPES {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let base = dir.join("b.vmdk");
        new_disk(&base, DiskType::MonolithicSparse, 2 * MIB);
        let top = dir.join("c.vmdk");
        child(&base, &top, child_t);
        write_disk(&top, &[(5, vec![4u8; 100])], "child");
        std::fs::remove_file(&base).unwrap();
        let before = files(dir);
        for opts in [OpenOptions::new(), OpenOptions::new().write(true)] {
            let e = open_err(&top, &opts);
            assert_eq!(e.kind(), ErrorKind::FileNotFound, "{child_t:?}: {e}");
            assert!(
                e.to_string().contains("b.vmdk"),
                "{child_t:?}: the error does not name the parent: {e}"
            );
            assert_files_unchanged(dir, &before, &format!("{child_t:?}: {opts:?}"));
        }
        // The child alone still opens.
        let d = OpenOptions::new().single_link(true).open(&top).unwrap();
        let mut buf = vec![0u8; 200];
        d.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[5..105], &[4u8; 100][..]);
    }
}

/// Two descriptors naming each other, and one naming itself: InvalidChain.
#[test]
fn loops_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let base = dir.join("b.vmdk");
    new_disk(&base, DiskType::MonolithicSparse, 2 * MIB);
    let a = dir.join("a.vmdk");
    let b = dir.join("bb.vmdk");
    child(&base, &a, DiskType::VmfsSparse);
    child(&a, &b, DiskType::TwoGbMaxExtentSparse);
    // a now names bb (whose CID it takes), bb names a.
    set_hint(&a, "bb.vmdk");
    set_parent_cid(&a, cid_of(&b));
    let before = files(dir);
    for top in [&a, &b] {
        for opts in [OpenOptions::new(), OpenOptions::new().write(true)] {
            let e = open_err(top, &opts);
            assert_eq!(e.kind(), ErrorKind::InvalidChain, "{}: {e}", top.display());
            assert_files_unchanged(dir, &before, &format!("loop from {}", top.display()));
        }
    }
    // A link naming itself.
    let s = dir.join("s.vmdk");
    child(&base, &s, DiskType::VmfsSparse);
    set_hint(&s, "s.vmdk");
    set_parent_cid(&s, cid_of(&s));
    let before = files(dir);
    for opts in [OpenOptions::new(), OpenOptions::new().write(true)] {
        let e = open_err(&s, &opts);
        assert_eq!(e.kind(), ErrorKind::InvalidChain, "{e}");
        assert_files_unchanged(dir, &before, "self loop");
    }
    // The same file reached through another name is still a loop.
    set_hint(&s, "./sub/../s.vmdk");
    std::fs::create_dir(dir.join("sub")).unwrap();
    let before = files(dir);
    let e = open_err(&s, &OpenOptions::new());
    assert_eq!(e.kind(), ErrorKind::InvalidChain, "{e}");
    assert_files_unchanged(dir, &before, "self loop through another name");
}

/// Builds a chain of `links` links (base included) of small disks; returns the top.
fn build_chain(dir: &Path, links: usize, t: DiskType) -> PathBuf {
    let mut p = dir.join("l000.vmdk");
    new_disk(&p, DiskType::MonolithicSparse, MIB);
    write_disk(&p, &[(0, vec![0xb0; 512])], "base");
    for i in 1..links {
        let c = dir.join(format!("l{i:03}.vmdk"));
        child(&p, &c, t);
        p = c;
    }
    p
}

/// max_depth limits the number of links; the error is TooManyRedo and changes nothing.
#[test]
fn too_deep_with_a_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let top = build_chain(dir, 5, DiskType::VmfsSparse);
    write_disk(&top, &[(512, vec![0x55; 512])], "top");
    let before = files(dir);
    for depth in [1usize, 3, 4] {
        for w in [false, true] {
            let opts = OpenOptions::new().max_depth(depth).write(w);
            let e = open_err(&top, &opts);
            assert_eq!(e.kind(), ErrorKind::TooManyRedo, "max_depth {depth}: {e}");
            assert_files_unchanged(dir, &before, &format!("max_depth {depth} write {w}"));
        }
    }
    let d = OpenOptions::new().max_depth(5).open(&top).unwrap();
    assert_eq!(d.links().len(), 5);
    let mut buf = [0u8; 1024];
    d.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..512], &[0xb0; 512][..]);
    assert_eq!(&buf[512..], &[0x55; 512][..]);
    // single_link ignores the depth limit (and the chain).
    let d = OpenOptions::new()
        .max_depth(1)
        .single_link(true)
        .open(&top)
        .unwrap();
    d.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..512], &[0u8; 512][..]);
}

/// The default limit: 255 links open, 256 do not.
#[test]
fn default_depth_limit_is_255_links() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let top255 = build_chain(dir, 255, DiskType::MonolithicSparse);
    let d = Disk::open(&top255).unwrap_or_else(|e| panic!("255 links: {e}"));
    assert_eq!(d.links().len(), 255);
    let mut buf = [0u8; 512];
    d.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0xb0; 512]);
    drop(d);
    let top256 = dir.join("l255.vmdk");
    child(&top255, &top256, DiskType::MonolithicSparse);
    let before = files(dir);
    for w in [false, true] {
        let e = open_err(&top256, &OpenOptions::new().write(w));
        assert_eq!(e.kind(), ErrorKind::TooManyRedo, "256 links: {e}");
    }
    assert_files_unchanged(dir, &before, "256 links");
    let e = create_child(&top256, &dir.join("l256.vmdk"), DiskType::MonolithicSparse)
        .expect_err("a child of a 256-link chain was created");
    assert_eq!(e.kind(), ErrorKind::TooManyRedo, "{e}");
    assert_files_unchanged(dir, &before, "create_child on 256 links");
}

/// Makes `base.vmdk` (with data) and a vmfsSparse child `name` in `child_dir`.
fn base_and_child(dir: &Path, child_dir: &Path, name: &str) -> (PathBuf, PathBuf, Content) {
    let cap = 2 * MIB;
    std::fs::create_dir_all(dir).unwrap();
    let base = dir.join("base.vmdk");
    new_disk(&base, DiskType::MonolithicSparse, cap);
    let mut content = Content::new(cap);
    let w = vec![(0, vec![0xbb; 3000]), (MIB, vec![0xb1; 70_000])];
    write_disk(&base, &w, "base");
    content.apply(&w);
    std::fs::create_dir_all(child_dir).unwrap();
    let top = child_dir.join(name);
    child(&base, &top, DiskType::VmfsSparse);
    let w = vec![(1000, vec![0xcc; 100])];
    write_disk(&top, &w, "child");
    content.apply(&w);
    (base, top, content)
}

/// The strict policy refuses `..`, absolute names and symbolic links
/// (AccessDenied, nothing changed); the default policy follows them, and falls back
/// to the file name in the child's folder for absolute names that do not exist.
#[test]
fn parent_name_policies() {
    let strict = OpenOptions::new().strict_paths(true);
    let strict_w = OpenOptions::new().strict_paths(true).write(true);

    // `..`: made by create_child for a child in a subfolder.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (_, top, content) = base_and_child(dir, &dir.join("snaps"), "c.vmdk");
    assert_eq!(
        Disk::open(&top).unwrap().info().unwrap().chain[0]
            .parent_file_name_hint
            .as_deref(),
        Some("../base.vmdk")
    );
    verify(&top, &content, "`..` default policy");
    let before = files(dir);
    for o in [&strict, &strict_w] {
        let e = open_err(&top, o);
        assert_eq!(e.kind(), ErrorKind::AccessDenied, "`..` strict: {e}");
        assert_files_unchanged(dir, &before, "`..` strict");
    }

    // An absolute name that exists.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (base, top, content) = base_and_child(dir, dir, "c.vmdk");
    set_hint(&top, base.to_str().unwrap());
    verify(&top, &content, "absolute default policy");
    let before = files(dir);
    for o in [&strict, &strict_w] {
        let e = open_err(&top, o);
        assert_eq!(e.kind(), ErrorKind::AccessDenied, "absolute strict: {e}");
        assert_files_unchanged(dir, &before, "absolute strict");
    }

    // Absolute names that do not exist here: ESXi and Windows paths fall back to the
    // file name in the child's folder (default policy only).
    for hint in [
        "/vmfs/volumes/5f3a2b1c-11223344-aabb-001122334455/vm/base.vmdk",
        "C:\\Users\\me\\Virtual Machines\\vm\\base.vmdk",
        "\\\\server\\share\\vm\\base.vmdk",
    ] {
        set_hint(&top, hint);
        verify(&top, &content, &format!("fallback for {hint}"));
        let before = files(dir);
        let e = open_err(&top, &strict);
        assert_eq!(e.kind(), ErrorKind::AccessDenied, "{hint} strict: {e}");
        assert_files_unchanged(dir, &before, hint);
    }
    // ... but a fallback that does not exist either is FileNotFound.
    set_hint(&top, "/vmfs/volumes/x/vm/other.vmdk");
    let e = open_err(&top, &OpenOptions::new());
    assert_eq!(e.kind(), ErrorKind::FileNotFound, "{e}");

    // A symbolic link to the parent, and a symlinked folder on the way.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let real = dir.join("real");
    let (_, top, content) = base_and_child(&real, &real, "c.vmdk");
    std::os::unix::fs::symlink(real.join("base.vmdk"), real.join("alias.vmdk")).unwrap();
    std::os::unix::fs::symlink(&real, real.join("loopdir")).unwrap();
    for hint in ["alias.vmdk", "loopdir/base.vmdk"] {
        set_hint(&top, hint);
        verify(&top, &content, &format!("symlink {hint} default"));
        let before = files(dir);
        for o in [&strict, &strict_w] {
            let e = open_err(&top, o);
            assert_eq!(
                e.kind(),
                ErrorKind::AccessDenied,
                "symlink {hint} strict: {e}"
            );
            assert_files_unchanged(dir, &before, hint);
        }
    }
    // A plain relative name passes the strict policy.
    set_hint(&top, "base.vmdk");
    let d = strict.open(&top).unwrap();
    verify_disk(&d, &content, &[], "strict plain name");
}

/// Writes everywhere through a non-persistent open: the writes read back, no file
/// of the chain changes (during, after close, after drop), nothing is left in the
/// disk's folder or in the redo folder.
#[test]
fn non_persistent_changes_no_file() {
    for (base_t, child_t) in [
        (DiskType::MonolithicSparse, Some(DiskType::VmfsSparse)),
        (DiskType::MonolithicFlat, Some(DiskType::MonolithicSparse)),
        (DiskType::TwoGbMaxExtentSparse, None),
        (DiskType::Vmfs, None),
    ] {
        let ctx = format!("{base_t:?} / {child_t:?}");
        let cap = 3 * MIB + 7 * SECTOR;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("vm");
        std::fs::create_dir(&dir).unwrap();
        let redo = tmp.path().join("redo");
        std::fs::create_dir(&redo).unwrap();
        let mut rng = Rng(0x0e_0e);
        let base = dir.join("d.vmdk");
        new_disk(&base, base_t, cap);
        let mut content = Content::new(cap);
        let w = plan(&mut rng, cap, 20);
        write_disk(&base, &w, &ctx);
        content.apply(&w);
        let top = match child_t {
            Some(t) => {
                let c = dir.join("d-000001.vmdk");
                child(&base, &c, t);
                let w = plan(&mut rng, cap, 20);
                write_disk(&c, &w, &ctx);
                content.apply(&w);
                c
            }
            None => base.clone(),
        };
        let persistent = content.clone();
        let before = files(&dir);
        let top_cid = cid_of(&top);

        // Round 0: the system's temporary folder, dropped without close. Round 1: a
        // given folder, closed.
        for round in 0..2 {
            let ctx = format!("{ctx} round {round}");
            let opts = if round == 0 {
                OpenOptions::new().non_persistent(true)
            } else {
                OpenOptions::new().non_persistent_in(Some(redo.clone()))
            };
            let d = opts
                .open(&top)
                .unwrap_or_else(|e| panic!("{ctx}: non-persistent open: {e}"));
            assert!(d.is_writable(), "{ctx}: not writable");
            non_persistent_writes(&d, &mut rng, persistent.clone(), &ctx);
            assert_files_unchanged(&dir, &before, &format!("{ctx}: while open"));
            assert!(
                std::fs::read_dir(&redo).unwrap().next().is_none(),
                "{ctx}: the redo folder holds a visible file while open"
            );
            let info = d.info().unwrap();
            assert_eq!(
                info.chain.len(),
                if child_t.is_some() { 2 } else { 1 },
                "{ctx}: info lists the redo log"
            );
            if round == 0 {
                drop(d);
            } else {
                d.close().unwrap_or_else(|e| panic!("{ctx}: close: {e}"));
            }
            assert_files_unchanged(&dir, &before, &format!("{ctx}: after close"));
            assert!(
                std::fs::read_dir(&redo).unwrap().next().is_none(),
                "{ctx}: the redo folder is not empty"
            );
            verify(&top, &persistent, &format!("{ctx}: persistent content"));
            assert_eq!(cid_of(&top), top_cid, "{ctx}: CID");
        }
    }
}

/// Whole-disk writes of several patterns, partial overwrites and zeros, each read back.
fn non_persistent_writes(d: &Disk, rng: &mut Rng, mut content: Content, ctx: &str) {
    let cap = d.capacity();
    verify_disk(d, &content, &[], &format!("{ctx}: before writes"));
    for p in 1..=3u8 {
        let mut off = 0;
        let mut whole = Vec::new();
        while off < cap {
            let n = (cap - off).min(MIB + 3 * SECTOR) as usize;
            let data = vec![p.wrapping_mul(0x35) ^ (off / MIB) as u8; n];
            d.write_at(&data, off).unwrap();
            whole.push((off, data));
            off += n as u64;
        }
        content.apply(&whole);
        verify_disk(d, &content, &[], &format!("{ctx}: whole-disk pattern {p}"));
    }
    let w = plan(rng, cap, 40);
    for (o, data) in &w {
        d.write_at(data, *o).unwrap();
    }
    content.apply(&w);
    verify_disk(d, &content, &[], &format!("{ctx}: random writes"));
    d.flush().unwrap();
    verify_disk(d, &content, &[], &format!("{ctx}: after flush"));
}

/// attach: a delta made on one parent, attached to a copy of it, reads as before; a
/// standalone sparse disk attached to a parent shows the parent under it; a capacity
/// mismatch and a flat link are refused without changing files.
#[test]
fn attach_to_a_parent() {
    for child_t in CHILD_TYPES {
        let ctx = format!("{child_t:?}");
        let cap = 4 * MIB;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let a = dir.join("a.vmdk");
        new_disk(&a, DiskType::MonolithicSparse, cap);
        let mut rng = Rng(0xa77a);
        let mut content = Content::new(cap);
        let w = plan(&mut rng, cap, 20);
        write_disk(&a, &w, &ctx);
        content.apply(&w);
        let c = dir.join("c.vmdk");
        child(&a, &c, child_t);
        let w = plan(&mut rng, cap, 20);
        write_disk(&c, &w, &ctx);
        content.apply(&w);
        // Move the parent away: B is A's copy (same CID), A is gone.
        let b = dir.join("copy").join("b.vmdk");
        std::fs::create_dir(dir.join("copy")).unwrap();
        std::fs::copy(&a, &b).unwrap();
        std::fs::remove_file(&a).unwrap();
        assert_eq!(
            Disk::open(&c).unwrap_err().kind(),
            ErrorKind::FileNotFound,
            "{ctx}"
        );
        attach(&c, &b).unwrap_or_else(|e| panic!("{ctx}: attach: {e}"));
        let d = Disk::open(&c).unwrap();
        let i = d.info().unwrap();
        assert_eq!(
            i.chain[0].parent_file_name_hint.as_deref(),
            Some("copy/b.vmdk"),
            "{ctx}"
        );
        verify_disk(&d, &content, &[], &format!("{ctx}: attached to the copy"));
        drop(d);

        // Capacity mismatch.
        let small = dir.join("small.vmdk");
        new_disk(&small, DiskType::MonolithicSparse, cap / 2);
        let before = files(dir);
        let e = attach(&c, &small).expect_err("attach across capacities succeeded");
        assert_eq!(e.kind(), ErrorKind::CapacityMismatch, "{ctx}: {e}");
        assert_files_unchanged(dir, &before, &format!("{ctx}: capacity mismatch"));
        verify(&c, &content, &format!("{ctx}: after the refused attach"));
    }

    // A standalone sparse disk (no parent) attached to a parent with data.
    let cap = 4 * MIB;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let p = dir.join("p.vmdk");
    new_disk(&p, DiskType::MonolithicFlat, cap);
    let mut content = Content::new(cap);
    let w = vec![
        (0, vec![0x11; 200 * KIB as usize]),
        (3 * MIB, vec![0x12; 5000]),
    ];
    write_disk(&p, &w, "parent");
    content.apply(&w);
    let s = dir.join("s.vmdk");
    new_disk(&s, DiskType::MonolithicSparse, cap);
    // Whole grains only: a standalone disk's partial grain was completed with zeros.
    let w = vec![
        (GRAIN, vec![0x21; GRAIN as usize]),
        (2 * MIB, vec![0x22; 2 * GRAIN as usize]),
    ];
    write_disk(&s, &w, "standalone");
    content.apply(&w);
    attach(&s, &p).unwrap_or_else(|e| panic!("attach a standalone disk: {e}"));
    verify(&s, &content, "standalone disk attached");
    let d = Disk::open(&s).unwrap();
    assert_eq!(d.links().len(), 2);
    assert_eq!(d.info().unwrap().chain[0].parent_cid, Some(cid_of(&p)));
    drop(d);

    // A flat link cannot take a parent.
    let f = dir.join("f.vmdk");
    new_disk(&f, DiskType::MonolithicFlat, cap);
    let before = files(dir);
    let e = attach(&f, &p).expect_err("a flat disk was attached");
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert_files_unchanged(dir, &before, "flat attach");
}
