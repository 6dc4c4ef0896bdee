//! Concurrency: one open disk shared by many threads, and one disk shared by several
//! processes.
//!
//! - `threads_against_a_model`: 8 threads read and write one `Disk` at once, for
//!   every writable type and for snapshot children (whose writes copy grains up from
//!   the parent while other threads allocate in the same grain tables). Each thread
//!   owns interleaved 12 KiB stripes, so neighbouring threads write pieces of the
//!   same grains; a reader thread checks a pre-written region no one writes; every
//!   thread reads back its own stripes. The result is compared with a model after a
//!   reopen, and the disk checks clean.
//! - `locks_between_processes`: while another process holds a disk open for
//!   writing, a second writer (in this process or another) and locked readers are
//!   refused with `Locked` and change nothing; readers that opt out of locking read
//!   what the writer has flushed; two reader processes share the disk; the writer's
//!   children and parents are protected the same way.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::{assert_same, Rng};
use vdisk::ops::child::create_child;
use vdisk::{create, CreateOptions, Disk, DiskType, ErrorKind, OpenOptions};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const THREADS: u64 = 8;
const STRIPE: u64 = 12 * KIB;
/// The region every thread writes to (striped), and the read-only region after it.
const WRITE_REGION: u64 = 24 * MIB;
const READ_REGION: (u64, u64) = (28 * MIB, 4 * MIB);
const CAPACITY: u64 = 40 * MIB;

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng(seed).fill(&mut v);
    v
}

/// A disk of type `t` at `dir/name.vmdk`, with the read-only region pre-written.
fn base(dir: &Path, name: &str, t: DiskType) -> PathBuf {
    let p = dir.join(format!("{name}.vmdk"));
    create(&p, &CreateOptions::new(t, CAPACITY)).unwrap();
    let d = OpenOptions::new().write(true).open(&p).unwrap();
    d.write_at(&pattern(7, READ_REGION.1 as usize), READ_REGION.0)
        .unwrap();
    d.close().unwrap();
    p
}

/// Runs the threads on `disk`; returns the expected content of the write region
/// relative to what it held before (`before`).
fn hammer(disk: &Disk, seed: u64, before: &[u8], ctx: &str) -> Vec<u8> {
    let stripes = WRITE_REGION / STRIPE;
    let mut expected = before.to_vec();
    // Plans: thread t owns stripes s with s % THREADS == t; it writes random pieces
    // (512 B to a whole stripe, unaligned) of random owned stripes, several times.
    let mut plans = Vec::new();
    let mut rng = Rng(seed);
    for t in 0..THREADS {
        let mut plan = Vec::new();
        for _ in 0..150 {
            let s = rng.below(stripes / THREADS) * THREADS + t;
            let len = rng.range(512, STRIPE);
            let off = s * STRIPE + rng.below(STRIPE - len + 1);
            let data = pattern(rng.next(), len as usize);
            expected[off as usize..(off + len) as usize].copy_from_slice(&data);
            plan.push((off, data));
        }
        plans.push(plan);
    }
    let read_only = pattern(7, READ_REGION.1 as usize);
    std::thread::scope(|s| {
        for (t, plan) in plans.iter().enumerate() {
            s.spawn(move || {
                // What this thread's stripes hold so far (it alone writes them).
                let mut mine = before.to_vec();
                for (i, (off, data)) in plan.iter().enumerate() {
                    disk.write_at(data, *off)
                        .unwrap_or_else(|e| panic!("{ctx}: thread {t}: write at {off}: {e}"));
                    mine[*off as usize..*off as usize + data.len()].copy_from_slice(data);
                    // Read back the whole stripe (the piece and what is around it).
                    let s0 = off / STRIPE * STRIPE;
                    let mut back = vec![0u8; STRIPE as usize];
                    disk.read_at(&mut back, s0).unwrap();
                    assert_same(
                        &back,
                        &mine[s0 as usize..(s0 + STRIPE) as usize],
                        s0,
                        &format!("{ctx}: thread {t}: read-back"),
                    );
                    if i % 40 == 39 {
                        disk.flush().unwrap();
                    }
                }
            });
        }
        s.spawn(|| {
            let mut rng = Rng(seed ^ 0xabcd);
            for _ in 0..300 {
                let len = rng.range(1, 256 * KIB);
                let off = rng.below(READ_REGION.1 - len);
                let mut buf = vec![0u8; len as usize];
                disk.read_at(&mut buf, READ_REGION.0 + off).unwrap();
                assert_same(
                    &buf,
                    &read_only[off as usize..(off + len) as usize],
                    READ_REGION.0 + off,
                    &format!("{ctx}: reader"),
                );
            }
        });
    });
    expected
}

fn verify(path: &Path, expected_writes: &[u8], ctx: &str) {
    let d = Disk::open(path).unwrap();
    let mut got = vec![0u8; WRITE_REGION as usize];
    d.read_at(&mut got, 0).unwrap();
    assert_same(&got, expected_writes, 0, &format!("{ctx}: after reopen"));
    let mut got = vec![0u8; READ_REGION.1 as usize];
    d.read_at(&mut got, READ_REGION.0).unwrap();
    assert_same(
        &got,
        &pattern(7, READ_REGION.1 as usize),
        READ_REGION.0,
        &format!("{ctx}: read-only region after reopen"),
    );
}

#[test]
fn threads_against_a_model() {
    let tmp = tempfile::tempdir().unwrap();
    let types = [
        DiskType::MonolithicSparse,
        DiskType::TwoGbMaxExtentSparse,
        DiskType::MonolithicFlat,
        DiskType::TwoGbMaxExtentFlat,
        DiskType::Vmfs,
    ];
    for (i, t) in types.into_iter().enumerate() {
        let ctx = format!("{t:?}");
        let p = base(tmp.path(), &format!("b{i}"), t);
        let d = OpenOptions::new().write(true).open(&p).unwrap();
        let zeros = vec![0u8; WRITE_REGION as usize];
        let expected = hammer(&d, 100 + i as u64, &zeros, &ctx);
        d.close().unwrap();
        verify(&p, &expected, &ctx);
        let r = vdisk::ops::check::check(&p, false).unwrap();
        assert!(r.is_clean(), "{ctx}: {r:?}");
    }

    // Children over a parent whose write region holds data: every partial write
    // copies the rest of its grain up from the parent.
    let parent = base(tmp.path(), "parent", DiskType::MonolithicSparse);
    let parent_data = pattern(9, WRITE_REGION as usize);
    let d = OpenOptions::new().write(true).open(&parent).unwrap();
    d.write_at(&parent_data, 0).unwrap();
    d.close().unwrap();
    for (i, t) in [
        DiskType::MonolithicSparse,
        DiskType::VmfsSparse,
        DiskType::SeSparse,
    ]
    .into_iter()
    .enumerate()
    {
        let ctx = format!("{t:?} child");
        let c = tmp.path().join(format!("c{i}.vmdk"));
        create_child(&parent, &c, t).unwrap();
        let d = OpenOptions::new().write(true).open(&c).unwrap();
        let expected = hammer(&d, 200 + i as u64, &parent_data, &ctx);
        d.close().unwrap();
        verify(&c, &expected, &ctx);
    }

    // A non-persistent open: the same through a redo log, and the disk unchanged.
    let before = std::fs::read(&parent).unwrap();
    let d = OpenOptions::new()
        .non_persistent(true)
        .open(&parent)
        .unwrap();
    hammer(&d, 300, &parent_data, "non-persistent");
    d.close().unwrap();
    assert!(
        std::fs::read(&parent).unwrap() == before,
        "non-persistent: the disk changed"
    );
}

/// The other process: opens `VDISK_LOCK_HOLDER` as asked in `VDISK_LOCK_MODE`,
/// writes and flushes the pattern (when writing), says "ready", and keeps the disk
/// open until its stdin closes. Without the variables it does nothing.
#[test]
fn lock_holder_process() {
    let Ok(path) = std::env::var("VDISK_LOCK_HOLDER") else {
        return;
    };
    let mode = std::env::var("VDISK_LOCK_MODE").unwrap_or_default();
    let opts = match mode.as_str() {
        "write" => OpenOptions::new().write(true),
        _ => OpenOptions::new(),
    };
    let mut out = std::io::stdout();
    let d = match opts.open(&path) {
        Ok(d) => d,
        Err(e) => {
            writeln!(out, "\nrefused {:?}", e.kind()).unwrap();
            out.flush().unwrap();
            return;
        }
    };
    if mode == "write" {
        d.write_at(&pattern(11, MIB as usize), 0).unwrap();
        d.flush().unwrap();
    }
    writeln!(out, "\nready").unwrap();
    out.flush().unwrap();
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    d.close().unwrap();
}

/// Starts the holder process; returns it and the first line it printed.
fn holder(path: &Path, mode: &str) -> (Child, String) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "lock_holder_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("VDISK_LOCK_HOLDER", path)
        .env("VDISK_LOCK_MODE", mode)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // The test harness prints its own lines first (and "test NAME ... " without a
    // line break: the holder starts its lines with one).
    let first = lines
        .by_ref()
        .map(|l| l.unwrap())
        .find(|l| l == "ready" || l.starts_with("refused"))
        .unwrap_or_else(|| panic!("the {mode} holder of {} said nothing", path.display()));
    // Keep reading, so that the holder's last lines do not fail on a closed pipe.
    std::thread::spawn(move || lines.for_each(drop));
    (child, first)
}

fn release(mut child: Child) {
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
}

fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    v.sort();
    v
}

fn refused(path: &Path, opts: OpenOptions, ctx: &str) {
    match opts.open(path) {
        Ok(_) => panic!("{ctx}: {} opened with {opts:?}", path.display()),
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::Locked, "{ctx}: {e}");
            assert!(e.to_string().contains("locked"), "{ctx}: {e}");
        }
    }
}

#[test]
fn locks_between_processes() {
    for t in [
        DiskType::MonolithicSparse,
        DiskType::TwoGbMaxExtentSparse,
        DiskType::MonolithicFlat,
    ] {
        let ctx = format!("{t:?}");
        let tmp = tempfile::tempdir().unwrap();
        let p = base(tmp.path(), "d", t);

        let (writer, said) = holder(&p, "write");
        assert_eq!(said, "ready", "{ctx}");
        let before = snapshot(tmp.path());
        // A second writer, here and in another process, and locked readers: refused.
        refused(&p, OpenOptions::new().write(true), &ctx);
        refused(&p, OpenOptions::new(), &ctx);
        let (other, said) = holder(&p, "write");
        assert_eq!(said, "refused Locked", "{ctx}: second writer process");
        release(other);
        let e =
            create_child(&p, &tmp.path().join("c.vmdk"), DiskType::MonolithicSparse).unwrap_err();
        assert_eq!(
            e.kind(),
            ErrorKind::Locked,
            "{ctx}: snapshot of an open disk: {e}"
        );
        assert_eq!(
            snapshot(tmp.path()),
            before,
            "{ctx}: refused opens changed files"
        );
        // A reader that opts out of locking reads what the writer flushed.
        let d = OpenOptions::new().lock(false).open(&p).unwrap();
        let mut buf = vec![0u8; MIB as usize];
        d.read_at(&mut buf, 0).unwrap();
        assert_same(
            &buf,
            &pattern(11, MIB as usize),
            0,
            &format!("{ctx}: unlocked reader"),
        );
        drop(d);
        release(writer);

        // Two reader processes at once, and a writer refused while they read.
        let (r1, s1) = holder(&p, "read");
        let (r2, s2) = holder(&p, "read");
        assert_eq!((s1.as_str(), s2.as_str()), ("ready", "ready"), "{ctx}");
        refused(
            &p,
            OpenOptions::new().write(true),
            &format!("{ctx}: readers"),
        );
        Disk::open(&p).unwrap();
        release(r1);
        release(r2);
        // All gone: a writer gets it.
        OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .close()
            .unwrap();
    }

    // A chain: while a child is open for writing, its parent is shared-locked, so
    // the parent cannot be opened for writing (it would change under the child),
    // but it can be read.
    let tmp = tempfile::tempdir().unwrap();
    let parent = base(tmp.path(), "p", DiskType::MonolithicSparse);
    let child = tmp.path().join("c.vmdk");
    create_child(&parent, &child, DiskType::MonolithicSparse).unwrap();
    let (w, said) = holder(&child, "write");
    assert_eq!(said, "ready");
    refused(
        &parent,
        OpenOptions::new().write(true),
        "parent of an open child",
    );
    Disk::open(&parent).unwrap();
    release(w);
}
