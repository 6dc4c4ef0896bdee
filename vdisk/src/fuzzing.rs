//! The bodies of the fuzz targets in `fuzz/fuzz_targets/`, here so that the test
//! replaying the fuzzing corpus and the regression inputs (`tests/fuzz_replay.rs`)
//! runs exactly the code the fuzzer ran.
//!
//! Each function takes the fuzzer's bytes, does what a reader of such a file does
//! (open, walk the allocation, read data) and returns the library's answer. A
//! hostile input must give an [`Error`] of a specific kind, never a panic, a hang or
//! an unbounded allocation. Work per input is bounded here, whatever the input
//! claims (a legitimate disk of 512 TiB must not make one input take minutes): at
//! most [`MAX_MAP_ANSWERS`] mapping answers are walked and at most
//! [`MAX_READS`] reads of at most [`READ_PIECE`] bytes are made, spread over the
//! whole disk.
//!
//! Some targets also check properties of what they read and panic when one does not
//! hold (a finding like any other): a descriptor must serialize back to its input
//! and parse back after edits; an extent's mapping answers must be non-empty and
//! inside the extent; data written to a sparse extent must read back after a
//! reopen.

use std::path::{Path, PathBuf};

use crate::descriptor::Descriptor;
use crate::error::{Error, ErrorKind, Result};
use crate::extent::{Extent, ExtentMapping, SeSparseExtent, SparseExtent, StreamExtent};
use crate::limits::{MAX_DESCRIPTOR_BYTES, SECTOR_SIZE};
use crate::storage::{MemStorage, Storage};

/// Most mapping answers walked per extent or disk.
pub const MAX_MAP_ANSWERS: usize = 1 << 16;
/// Most reads made per input.
pub const MAX_READS: usize = 32;
/// Bytes per read.
pub const READ_PIECE: u64 = 4096;

/// How far the write test lets an in-memory extent grow. New grains go at the end
/// of the file or, in a sparse extent, at its header's `overHead` if that is further:
/// a real file gets a hole there, an in-memory one would allocate it all, so such a
/// write fails with `FileTooBig` instead.
const MAX_WRITE_GROWTH: u64 = 16 << 20;

/// Largest file an `open_and_read` bundle may write (the fuzzer's inputs are far
/// smaller; this keeps hand-made bundles honest too).
const MAX_BUNDLE_FILE: usize = 16 << 20;

/// Parses descriptor text; when it parses, checks that it serializes back to the
/// input (up to its first NUL) and that edits survive a write and a parse.
pub fn descriptor(data: &[u8]) -> Result<()> {
    let d = Descriptor::parse(data)?;
    let text = &data[..data.iter().position(|&b| b == 0).unwrap_or(data.len())];
    assert_eq!(
        d.to_bytes(),
        text,
        "a parsed descriptor does not write back"
    );
    // Every accessor, as an opener uses them.
    let _ = (
        d.version(),
        d.cid(),
        d.parent_cid(),
        d.parent_file_name_hint(),
    );
    let _ = d.create_type().map(|t| t.as_str().len());
    let _ = (d.ddb_entries(), d.is_latin1(), d.uses_crlf());
    let extents = d.extents();
    for e in &extents {
        if let Some(f) = &e.file {
            let _ = d.file_name_bytes(f);
        }
    }
    if text.len() > MAX_DESCRIPTOR_BYTES / 2 {
        return Ok(()); // edits could push it over the limit
    }
    // Edits: what the library does when it writes a descriptor back.
    let mut e = d.clone();
    e.set_cid(0x1234_abcd);
    e.set_parent_cid(0xffff_ffff);
    e.set_extents(&extents);
    e.set_ddb("ddb.fuzz", "a \"quoted\"\r\nvalue");
    e.set_parent_file_name_hint(Some("parent name.vmdk"));
    let back = Descriptor::parse(&e.to_bytes())
        .unwrap_or_else(|err| panic!("an edited descriptor does not parse back: {err}"));
    assert_eq!(back.cid(), Some(0x1234_abcd), "CID lost in a rewrite");
    assert_eq!(back.parent_cid(), Some(0xffff_ffff), "parentCID lost");
    assert_eq!(back.ddb("ddb.fuzz"), e.ddb("ddb.fuzz"), "DDB entry lost");
    assert_eq!(
        back.parent_file_name_hint(),
        e.parent_file_name_hint(),
        "parentFileNameHint lost"
    );
    // As bytes: a Latin-1 descriptor whose only non-UTF-8 bytes were in a replaced
    // line reads back as UTF-8, with the same bytes in its names.
    let lines = |d: &Descriptor| {
        d.extents()
            .iter()
            .map(|x| crate::descriptor::name_bytes(&x.to_line(), d.is_latin1()))
            .collect::<Vec<_>>()
    };
    assert_eq!(lines(&back), lines(&e), "extent lines changed in a rewrite");
    Ok(())
}

/// Replaces the first bytes of `data` by `magic` (inputs too short keep their
/// length), so that mutations stay in the format a target is about.
fn with_magic(data: &[u8], magic: &[u8]) -> Vec<u8> {
    let mut v = data.to_vec();
    let n = magic.len().min(v.len());
    v[..n].copy_from_slice(&magic[..n]);
    v
}

/// The zero-filling "chain below" of a single extent.
fn zeros_below(_offset: u64, buf: &mut [u8]) -> Result<()> {
    buf.fill(0);
    Ok(())
}

/// Walks the extent's mapping from start to end (checking every answer), then
/// reads pieces of the answers spread over the extent.
fn walk_extent(ext: &Extent) -> Result<u64> {
    let cap = ext.capacity_bytes();
    let mut answers: Vec<(u64, ExtentMapping, u64)> = Vec::new();
    let mut off = 0u64;
    while off < cap && answers.len() < MAX_MAP_ANSWERS {
        let (m, run) = ext.map(off, cap - off)?;
        assert!(
            run > 0 && run <= cap - off,
            "map({off}) answered {run} bytes (capacity {cap})"
        );
        answers.push((off, m, run));
        off += run;
    }
    let step = answers.len().div_ceil(MAX_READS).max(1);
    let mut sum = 0u64;
    let mut buf = vec![0u8; READ_PIECE as usize];
    for &(_, m, run) in answers.iter().step_by(step) {
        let piece = &mut buf[..run.min(READ_PIECE) as usize];
        match m {
            ExtentMapping::Data { file_offset } => ext.read_data(file_offset, piece)?,
            ExtentMapping::Compressed {
                marker,
                grain,
                offset_in_grain,
            } => ext.read_compressed(marker, grain, offset_in_grain, piece)?,
            ExtentMapping::Zero | ExtentMapping::Unallocated => piece.fill(0),
        }
        sum = piece
            .iter()
            .fold(sum, |s, &b| s.wrapping_mul(31).wrapping_add(u64::from(b)));
    }
    Ok(sum)
}

/// Reads `len` bytes at `offset` of a single extent as the chain loop does
/// (unallocated ranges read as zeros).
fn read_extent(ext: &Extent, offset: u64, buf: &mut [u8]) -> Result<()> {
    let mut pos = 0usize;
    while pos < buf.len() {
        let at = offset + pos as u64;
        let (m, run) = ext.map(at, (buf.len() - pos) as u64)?;
        assert!(run > 0, "map({at}) answered 0 bytes");
        let piece = &mut buf[pos..pos + run as usize];
        match m {
            ExtentMapping::Data { file_offset } => ext.read_data(file_offset, piece)?,
            ExtentMapping::Compressed {
                marker,
                grain,
                offset_in_grain,
            } => ext.read_compressed(marker, grain, offset_in_grain, piece)?,
            ExtentMapping::Zero | ExtentMapping::Unallocated => piece.fill(0),
        }
        pos += run as usize;
    }
    Ok(())
}

/// Where the write test writes: the first sector, a grain and a sector straddling
/// the middle of the extent, and the last sector (sector-aligned, inside `cap`).
fn write_plan(cap: u64, grain: u64) -> Vec<(u64, usize)> {
    let mut plan = vec![(0, SECTOR_SIZE as usize)];
    let mid = (cap / 2) / SECTOR_SIZE * SECTOR_SIZE;
    let len = (grain + SECTOR_SIZE).min(cap - mid).min(1 << 20);
    plan.push((mid, len as usize));
    plan.push((cap - SECTOR_SIZE, SECTOR_SIZE as usize));
    plan
}

/// Opens `bytes` as a writable sparse or seSparse extent, writes the plan, closes,
/// reopens read-only and checks that the written data reads back. Errors on the
/// way (a file the writer refuses) are answers; data that does not read back
/// panics.
fn write_and_verify(bytes: &[u8], sesparse: bool) -> Result<()> {
    let open = |s: Box<dyn Storage>, writable: bool| -> Result<Extent> {
        Ok(if sesparse {
            Extent::SeSparse(Box::new(SeSparseExtent::open_storage(
                s,
                "fuzz.vmdk",
                writable,
            )?))
        } else {
            Extent::Sparse(Box::new(SparseExtent::open_storage(
                s,
                "fuzz.vmdk",
                writable,
            )?))
        })
    };
    let limit = bytes.len() as u64 + MAX_WRITE_GROWTH;
    let storage = std::sync::Arc::new(MemStorage::new(bytes.to_vec()).with_max_len(limit));
    let ext = open(Box::new(Shared(std::sync::Arc::clone(&storage))), true)?;
    let cap = ext.capacity_bytes();
    if cap < SECTOR_SIZE {
        return Ok(());
    }
    let grain = match &ext {
        Extent::Sparse(s) => s.grain_bytes(),
        Extent::SeSparse(s) => s.grain_bytes(),
        _ => SECTOR_SIZE,
    };
    let plan = write_plan(cap, grain);
    if shares_file_bytes(&ext, &plan)? {
        // Two grains of the plan live in the same file bytes (a damaged file only a
        // check finds): a write to one changes the other, so nothing to verify.
        return Ok(());
    }
    ext.begin_write()?;
    for (i, &(off, len)) in plan.iter().enumerate() {
        let data = vec![0xa0 + i as u8; len];
        ext.write(off, &data, &zeros_below)?;
    }
    ext.close()?;
    drop(ext);
    let ext = open(Box::new(Shared(storage)), false)?;
    for (i, &(off, len)) in plan.iter().enumerate() {
        let mut back = vec![0u8; len];
        read_extent(&ext, off, &mut back)?;
        // Later writes may cover earlier ones (tiny extents).
        let expect: Vec<u8> = (0..len as u64)
            .map(|k| {
                let at = off + k;
                let last = plan
                    .iter()
                    .enumerate()
                    .rev()
                    .find(|(_, &(o, l))| o <= at && at < o + l as u64);
                last.map_or(0, |(j, _)| 0xa0 + j as u8)
            })
            .collect();
        assert!(
            back == expect,
            "write {i} ({len} bytes at {off}) does not read back after a reopen"
        );
    }
    Ok(())
}

/// Whether two different ranges of the plan are stored in overlapping file bytes.
fn shares_file_bytes(ext: &Extent, plan: &[(u64, usize)]) -> Result<bool> {
    // (file start, file end, guest offset - file offset) of every stored piece.
    let mut pieces: Vec<(u64, u64, i128)> = Vec::new();
    for &(off, len) in plan {
        let end = off + len as u64;
        let mut at = off;
        while at < end {
            let (m, run) = ext.map(at, end - at)?;
            if let ExtentMapping::Data { file_offset } = m {
                pieces.push((
                    file_offset,
                    file_offset + run,
                    at as i128 - file_offset as i128,
                ));
            }
            at += run;
        }
    }
    pieces.sort_unstable();
    Ok(pieces
        .windows(2)
        .any(|w| w[1].0 < w[0].1 && w[1].2 != w[0].2))
}

/// One storage seen by two extents in turn (the write, then the reopen).
#[derive(Debug)]
struct Shared(std::sync::Arc<MemStorage>);

impl Storage for Shared {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.0.read_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.0.sync()
    }
}

/// A hosted sparse (KDMV) extent: the header, both grain directories and the grain
/// tables on open, the embedded descriptor, the mapping and reads of grains; then,
/// if it opens for writing, writes that must read back. The input always starts
/// with the KDMV magic.
pub fn sparse(data: &[u8]) -> Result<()> {
    let bytes = with_magic(data, b"KDMV");
    let s =
        SparseExtent::open_storage(Box::new(MemStorage::new(bytes.clone())), "fuzz.vmdk", false)?;
    if let Some(text) = s.read_embedded_descriptor()? {
        let _ = Descriptor::parse(&text);
    }
    walk_extent(&Extent::Sparse(Box::new(s)))?;
    write_and_verify(&bytes, false)
}

/// A streamOptimized extent: header, footer search, grain directory or the grain
/// map rebuilt from the markers, and inflating grains. The input always starts
/// with the KDMV magic.
pub fn stream(data: &[u8]) -> Result<()> {
    let bytes = with_magic(data, b"KDMV");
    let s = StreamExtent::open_storage(Box::new(MemStorage::new(bytes)), "fuzz.vmdk")?;
    if let Some(text) = s.read_embedded_descriptor()? {
        let _ = Descriptor::parse(&text);
    }
    walk_extent(&Extent::Stream(Box::new(s)))?;
    Ok(())
}

/// A vmfsSparse (COWD) extent, read and written like [`sparse`]. The input always
/// starts with the COWD magic.
pub fn cowd(data: &[u8]) -> Result<()> {
    let bytes = with_magic(data, b"COWD");
    let s =
        SparseExtent::open_storage(Box::new(MemStorage::new(bytes.clone())), "fuzz.vmdk", false)?;
    walk_extent(&Extent::Sparse(Box::new(s)))?;
    write_and_verify(&bytes, false)
}

/// A seSparse extent: constant and volatile headers, the grain directory, grain
/// tables and grains; then writes that must read back. The input always starts
/// with the seSparse magic.
pub fn sesparse(data: &[u8]) -> Result<()> {
    let bytes = with_magic(data, &0xCAFE_BABEu64.to_le_bytes());
    let s =
        SeSparseExtent::open_storage(Box::new(MemStorage::new(bytes.clone())), "fuzz.vmdk", false)?;
    walk_extent(&Extent::SeSparse(Box::new(s)))?;
    write_and_verify(&bytes, true)
}

/// Packs files into one `open_and_read` input: per file a name length (u8), the
/// name, a length (u32, little-endian) and the bytes. The first file is opened.
pub fn pack_files(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in files {
        let name = &name.as_bytes()[..name.len().min(255)];
        out.push(name.len() as u8);
        out.extend_from_slice(name);
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(data);
    }
    out
}

/// Unpacks [`pack_files`] input. A name that is not a plain file name (empty,
/// `.`/`..`, with `/` or a NUL) is kept but never written; a truncated last file
/// keeps the bytes there are. Input that does not start like a bundle is one
/// file, `disk.vmdk`.
pub fn unpack_files(data: &[u8]) -> Vec<(Vec<u8>, &[u8])> {
    let mut files = Vec::new();
    let mut rest = data;
    while let Some((&n, r)) = rest.split_first() {
        let n = n as usize;
        if n == 0 || r.len() < n + 4 {
            break;
        }
        let name = r[..n].to_vec();
        let len = u32::from_le_bytes([r[n], r[n + 1], r[n + 2], r[n + 3]]) as usize;
        let body = &r[n + 4..];
        let len = len.min(body.len()).min(MAX_BUNDLE_FILE);
        files.push((name, &body[..len]));
        rest = &body[len..];
    }
    if files.is_empty() {
        files.push((b"disk.vmdk".to_vec(), data));
    }
    files
}

fn plain_name(name: &[u8]) -> Option<&str> {
    let s = std::str::from_utf8(name).ok()?;
    let ok = !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
        && !s.contains(['/', '\\']);
    ok.then_some(s)
}

/// A folder of this process (and thread) for `open_and_read`, emptied before use.
fn scratch_dir() -> Result<PathBuf> {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let tid = format!("{:?}", std::thread::current().id());
    let tid: String = tid.chars().filter(char::is_ascii_digit).collect();
    let dir = base.join(format!("vdisk-fuzz-{}-{tid}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .map_err(|e| Error::io("cannot empty the scratch folder", e))?;
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("cannot make the scratch folder", e))?;
    Ok(dir)
}

/// A whole disk given as a bundle of files ([`pack_files`]): written to a private
/// scratch folder, opened read-only with the strict path policy (names stay in the
/// folder), its allocation map walked, pieces read spread over the disk and around
/// each allocated range, and `info` and the metadata read.
pub fn open_and_read(data: &[u8]) -> Result<()> {
    let files = unpack_files(data);
    let dir = scratch_dir()?;
    let result = open_and_read_in(&dir, &files);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn open_and_read_in(dir: &Path, files: &[(Vec<u8>, &[u8])]) -> Result<()> {
    for (name, body) in files {
        if let Some(name) = plain_name(name) {
            std::fs::write(dir.join(name), body)
                .map_err(|e| Error::io("cannot write a scratch file", e))?;
        }
    }
    let Some(top) = files.first().and_then(|(n, _)| plain_name(n)) else {
        return Err(Error::new(ErrorKind::InvalidArgument, "no file to open"));
    };
    let disk = crate::OpenOptions::new()
        .strict_paths(true)
        .open(dir.join(top))?;
    let cap = disk.capacity();
    let map = disk.allocation_map(0, cap)?;
    let mut covered = 0u64;
    for r in &map {
        assert_eq!(r.offset, covered, "allocation map has a gap or overlap");
        assert!(r.length > 0, "allocation map has an empty range");
        covered += r.length;
    }
    assert_eq!(covered, cap, "allocation map does not cover the disk");
    let mut reads: Vec<u64> = (0..MAX_READS as u64 / 2)
        .map(|i| cap / (MAX_READS as u64 / 2) * i)
        .collect();
    let step = map.len().div_ceil(MAX_READS / 2).max(1);
    reads.extend(map.iter().step_by(step).map(|r| r.offset));
    let mut buf = vec![0u8; READ_PIECE as usize];
    for off in reads {
        let off = off / SECTOR_SIZE * SECTOR_SIZE;
        let n = READ_PIECE.min(cap.saturating_sub(off)) as usize;
        if n > 0 {
            disk.read_at(&mut buf[..n], off)?;
        }
    }
    let _ = disk.info()?;
    for key in disk.metadata_keys()? {
        let _ = disk.metadata(&key);
    }
    disk.close()
}

/// The files in a corpus or regression folder, sorted (none if it is missing).
pub fn input_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// Runs a target body on the input file `path` as a replay test does: its answer,
/// or a failure message (prefixed with `label`) for a panic, a run longer than
/// `limit`, or an unreadable file.
pub fn replay_input<T>(
    label: &str,
    path: &Path,
    limit: std::time::Duration,
    body: impl FnOnce(&[u8]) -> T,
) -> std::result::Result<T, String> {
    let data = std::fs::read(path).map_err(|e| format!("{label}: {}: {e}", path.display()))?;
    let start = std::time::Instant::now();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&data)));
    let took = start.elapsed();
    match r {
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(format!("{label}: {} panicked: {msg}", path.display()))
        }
        Ok(_) if took > limit => Err(format!(
            "{label}: {} took {took:?} (limit {limit:?})",
            path.display()
        )),
        Ok(r) => Ok(r),
    }
}
