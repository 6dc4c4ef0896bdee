//! seSparse extents written by `vdisk::extent::sesparse`, read back by qemu (which reads
//! seSparse read-only through a descriptor; a link without a parent reads zeros where
//! nothing is allocated).
//!
//! qemu-img and qemu-io are required: the tests panic if they are missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use vdisk::extent::sesparse::{create_sesparse, SeSparseExtent};
use vdisk::extent::ExtentMapping;
use vdisk::storage::{FileStorage, LockMode, Storage};
use vdisk::{ErrorKind, Result};

const MIB: u64 = 1 << 20;

fn run(program: &str, args: &[&str]) -> Output {
    match Command::new(program).args(args).output() {
        Ok(o) => o,
        Err(e) => panic!("{program} is required for these tests and could not be run: {e}"),
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs and requires success.
fn ok(program: &str, args: &[&str]) -> String {
    let o = run(program, args);
    let t = text(&o);
    assert!(o.status.success(), "{program} {args:?} failed: {t}");
    t
}

/// A new seSparse extent with a hand-written descriptor; returns (descriptor, extent).
fn make(dir: &Path, capacity_sectors: u64) -> (PathBuf, PathBuf) {
    make_child(dir, capacity_sectors, None)
}

/// Same, as the child of `parent` = (its CID, its descriptor's name) when given.
fn make_child(
    dir: &Path,
    capacity_sectors: u64,
    parent: Option<(&str, &str)>,
) -> (PathBuf, PathBuf) {
    let extent = dir.join("d-sesparse.vmdk");
    let s = FileStorage::create_new(&extent).unwrap();
    create_sesparse(&s, capacity_sectors).unwrap();
    drop(s);
    let (parent_cid, hint) = match parent {
        Some((cid, name)) => (cid.to_string(), format!("parentFileNameHint=\"{name}\"\n")),
        None => ("ffffffff".to_string(), String::new()),
    };
    let desc = dir.join("d.vmdk");
    std::fs::write(
        &desc,
        format!(
            "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID=fffffffe\nparentCID={parent_cid}\ncreateType=\"seSparse\"\n{hint}\n# Extent description\nRW {capacity_sectors} SESPARSE \"d-sesparse.vmdk\"\n\n# The Disk Data Base\n#DDB\nddb.adapterType = \"lsilogic\"\n"
        ),
    )
    .unwrap();
    (desc, extent)
}

fn open(p: &Path, writable: bool) -> Result<SeSparseExtent> {
    let lock = if writable {
        LockMode::Exclusive
    } else {
        LockMode::Shared
    };
    SeSparseExtent::open(FileStorage::open(p, writable, lock)?, writable)
}

fn zeros(_: u64, buf: &mut [u8]) -> Result<()> {
    buf.fill(0);
    Ok(())
}

/// Reads through the extent as the chain walk does (nothing below: zeros).
fn read_all(ext: &SeSparseExtent) -> Vec<u8> {
    let mut buf = vec![0u8; ext.capacity_bytes() as usize];
    let mut pos = 0usize;
    while pos < buf.len() {
        let (m, run) = ext.map(pos as u64, (buf.len() - pos) as u64).unwrap();
        let piece = &mut buf[pos..pos + run as usize];
        match m {
            ExtentMapping::Data { file_offset } => ext.read_data(file_offset, piece).unwrap(),
            ExtentMapping::Zero | ExtentMapping::Unallocated => piece.fill(0),
            ExtentMapping::Compressed { .. } => panic!("no compressed grains in seSparse"),
        }
        pos += run as usize;
    }
    buf
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64).wrapping_mul(13).wrapping_add(seed * 101) % 249 + 1) as u8)
        .collect()
}

fn assert_same(got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len());
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("first difference at byte {i}");
    }
}

/// `qemu-img compare` of the descriptor against a raw image of `model`.
fn qemu_compare(dir: &Path, desc: &Path, model: &[u8]) {
    let raw = dir.join("model.raw");
    std::fs::write(&raw, model).unwrap();
    let out = ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "vmdk",
            "-F",
            "raw",
            desc.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    assert!(out.contains("Images are identical"), "{out}");
}

/// `qemu-io -r` read commands with pattern checks; every one must pass.
fn qemu_io_reads(desc: &Path, checks: &[(u8, u64, u64)]) {
    let cmds: Vec<String> = checks
        .iter()
        .map(|(p, off, len)| format!("read -P {p:#x} {off} {len}"))
        .collect();
    let mut args = vec!["-r", "-f", "vmdk"];
    for c in &cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(desc.to_str().unwrap());
    let out = ok("qemu-io", &args);
    assert!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io: {out}"
    );
    assert_eq!(out.matches("read ").count(), checks.len(), "qemu-io: {out}");
}

/// `(start, length, host offset)` of qemu's allocated data ranges
/// (`qemu-img map --output=json`), parsed without a JSON library.
fn qemu_map(desc: &Path) -> Vec<(u64, u64, u64)> {
    let out = ok(
        "qemu-img",
        &["map", "--output=json", "-f", "vmdk", desc.to_str().unwrap()],
    );
    let field = |obj: &str, key: &str| -> Option<u64> {
        let at = obj.find(&format!("\"{key}\":"))? + key.len() + 3;
        let digits: String = obj[at..]
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        digits.parse().ok()
    };
    out.split('{')
        .skip(1)
        .filter(|obj| obj.contains("\"data\": true"))
        .map(|obj| {
            (
                field(obj, "start").unwrap(),
                field(obj, "length").unwrap(),
                field(obj, "offset").unwrap(),
            )
        })
        .collect()
}

#[test]
fn qemu_reads_what_the_extent_wrote() {
    let dir = tempfile::tempdir().unwrap();
    // Three grain tables; the capacity ends inside a grain.
    let cap_sectors = 2 * 32_768 + 4000 + 3;
    let cap = cap_sectors * 512;
    let (desc, extent) = make(dir.path(), cap_sectors);
    let mut model = vec![0u8; cap as usize];
    let mut put = |ext: &SeSparseExtent, off: u64, data: &[u8]| {
        ext.write(off, data, &zeros).unwrap();
        model[off as usize..off as usize + data.len()].copy_from_slice(data);
    };
    {
        let ext = open(&extent, true).unwrap();
        ext.begin_write().unwrap();
        put(&ext, 0, &pattern(1, 512));
        put(&ext, 3 * 4096 + 100, &pattern(2, 10_000));
        put(&ext, 2 * MIB, &pattern(3, MIB as usize));
        put(&ext, 16 * MIB - 6000, &pattern(4, 20_000)); // crosses grain tables 0 and 1
        put(&ext, 5 * MIB, &[0u8; 8192]); // zeros, allocated
        put(&ext, 6 * MIB + 512, &[0xab; 64 * 1024]);
        put(&ext, cap - 700, &pattern(5, 700)); // the partial last grain
        put(&ext, 2 * MIB + 4000, &pattern(6, 300)); // overwrite in place
        put(&ext, 33 * MIB, &pattern(7, 3 * 4096));
        put(&ext, 33 * MIB + 4096 + 17, &[0xcd]);
        ext.flush().unwrap();
        put(&ext, 20 * MIB + 1, &pattern(8, 5000)); // after a flush
        ext.close().unwrap();
    }
    {
        let ext = open(&extent, false).unwrap();
        assert_eq!(ext.capacity_bytes(), cap);
        assert_same(&read_all(&ext), &model);
        assert_eq!(
            ext.file_len().unwrap(),
            std::fs::metadata(&extent).unwrap().len()
        );
    }

    let info = ok("qemu-img", &["info", desc.to_str().unwrap()]);
    assert!(info.contains("file format: vmdk"), "{info}");
    assert!(info.contains(&format!("({cap} bytes)")), "{info}");
    qemu_compare(dir.path(), &desc, &model);
    qemu_io_reads(
        &desc,
        &[
            (0xab, 6 * MIB + 512, 64 * 1024),
            (0, 5 * MIB, 8192),
            (0, 6 * MIB, 512),
            (0, 10 * MIB, MIB),
            (0xcd, 33 * MIB + 4096 + 17, 1),
        ],
    );

    // qemu finds every allocated grain at the file offset the extent answers.
    let ext = open(&extent, false).unwrap();
    let ranges = qemu_map(&desc);
    assert!(!ranges.is_empty());
    for (start, length, offset) in ranges {
        let mut pos = start;
        while pos < start + length {
            let (m, run) = ext.map(pos, start + length - pos).unwrap();
            assert_eq!(
                m,
                ExtentMapping::Data {
                    file_offset: offset + (pos - start)
                },
                "qemu maps {start}+{length} to {offset}"
            );
            pos += run;
        }
    }
}

#[test]
fn zero_and_unmapped_grain_entries_read_as_zeros_in_qemu_too() {
    let dir = tempfile::tempdir().unwrap();
    let (desc, extent) = make(dir.path(), 204_800);
    let ext = open(&extent, true).unwrap();
    let data = pattern(9, 4 * 4096);
    ext.write(0, &data, &zeros).unwrap();
    ext.close().unwrap();
    drop(ext);
    // Layout of a 100 MiB extent: grain tables at sector 6144. Grain 1 becomes a zero
    // grain (type 2), grain 2 an unmapped one (type 1).
    let s = FileStorage::open(&extent, true, LockMode::Exclusive).unwrap();
    s.write_all_at(&(2u64 << 60).to_le_bytes(), 6144 * 512 + 8)
        .unwrap();
    s.write_all_at(&(1u64 << 60).to_le_bytes(), 6144 * 512 + 16)
        .unwrap();
    drop(s);
    let mut model = vec![0u8; 100 * MIB as usize];
    model[..4096].copy_from_slice(&data[..4096]);
    model[3 * 4096..4 * 4096].copy_from_slice(&data[3 * 4096..]);
    let ext = open(&extent, false).unwrap();
    assert_eq!(
        ext.map(4096, 3 * 4096).unwrap(),
        (ExtentMapping::Zero, 2 * 4096)
    );
    assert_same(&read_all(&ext), &model);
    drop(ext);
    qemu_compare(dir.path(), &desc, &model);
}

#[test]
fn a_journal_to_replay_is_refused_like_qemu_does() {
    let dir = tempfile::tempdir().unwrap();
    let (desc, extent) = make(dir.path(), 204_800);
    let s = FileStorage::open(&extent, true, LockMode::Exclusive).unwrap();
    s.write_all_at(&1u64.to_le_bytes(), 512 + 24).unwrap();
    drop(s);
    let before = std::fs::read(&extent).unwrap();
    for writable in [false, true] {
        let e = open(&extent, writable).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NeedsRepair, "{e}");
        assert!(e.to_string().contains("journal must be replayed"), "{e}");
    }
    assert!(std::fs::read(&extent).unwrap() == before);
    let o = run("qemu-img", &["info", desc.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("Replaying journal not supported"),
        "{}",
        text(&o)
    );
}

#[test]
fn concurrent_writers_then_qemu_compare() {
    let dir = tempfile::tempdir().unwrap();
    let (desc, extent) = make(dir.path(), 204_800);
    let ext = Arc::new(open(&extent, true).unwrap());
    let span = 7 * MIB + 333; // unaligned: neighbours share the grains at the borders
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            let ext = Arc::clone(&ext);
            std::thread::spawn(move || {
                let data = pattern(t + 20, span as usize);
                let base = 777 + t * span;
                for (k, chunk) in data.chunks(5000).enumerate().rev() {
                    ext.write(base + (k * 5000) as u64, chunk, &zeros).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    ext.close().unwrap();
    let mut model = vec![0u8; 100 * MIB as usize];
    for t in 0..4u64 {
        let base = (777 + t * span) as usize;
        model[base..base + span as usize].copy_from_slice(&pattern(t + 20, span as usize));
    }
    assert_same(&read_all(&ext), &model);
    drop(ext);
    let ext = open(&extent, false).unwrap();
    assert_same(&read_all(&ext), &model);
    drop(ext);
    qemu_compare(dir.path(), &desc, &model);
}

#[test]
fn partial_grains_copy_the_parent_as_qemu_reads_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let parent = d.join("parent.vmdk");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=monolithicFlat",
            parent.to_str().unwrap(),
            "100M",
        ],
    );
    let flat = d.join("parent-flat.vmdk");
    let base = pattern(40, 100 * MIB as usize);
    std::fs::write(&flat, &base).unwrap();
    let text = std::fs::read_to_string(&parent).unwrap();
    let cid = text
        .lines()
        .find_map(|l| l.strip_prefix("CID="))
        .expect("parent CID")
        .trim()
        .to_string();
    let (desc, extent) = make_child(d, 204_800, Some((&cid, "parent.vmdk")));
    let below = |off: u64, buf: &mut [u8]| -> Result<()> {
        buf.copy_from_slice(&base[off as usize..off as usize + buf.len()]);
        Ok(())
    };
    let mut model = base.clone();
    let ext = open(&extent, true).unwrap();
    for (k, (off, len)) in [
        (100u64, 10usize),
        (4096 * 7 + 4000, 200),
        (16 * MIB - 1, 2),
        (50 * MIB, 3 * 4096),
    ]
    .into_iter()
    .enumerate()
    {
        let data = vec![0xe0 + k as u8; len];
        ext.write(off, &data, &below).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    ext.close().unwrap();
    drop(ext);
    // The child holds whole grains: parent bytes around the new ones.
    let ext = open(&extent, false).unwrap();
    let (m, run) = ext.map(0, 4096).unwrap();
    assert!(matches!(m, ExtentMapping::Data { .. }) && run == 4096);
    let mut grain = vec![0u8; 4096];
    if let ExtentMapping::Data { file_offset } = m {
        ext.read_data(file_offset, &mut grain).unwrap();
    }
    assert_same(&grain, &model[..4096]);
    drop(ext);
    let info = ok(
        "qemu-img",
        &["info", "--backing-chain", desc.to_str().unwrap()],
    );
    assert!(info.contains("backing file: parent.vmdk"), "{info}");
    qemu_compare(d, &desc, &model);
}
