//! A corpus of malformed disks, built programmatically from valid disks made by
//! `vdisk::create` / `create_child` / the stream writer (then corrupted or truncated)
//! or from hand-written descriptors and headers: hosted sparse, streamOptimized,
//! vmfsSparse (COWD), seSparse, descriptors, snapshot chains, and tiny files that
//! claim enormous capacities.
//!
//! For every case, each of a read-only and a read-write open
//! (`OpenOptions::new().write(true)`) has an expectation:
//! * `Open`: opening fails with the expected error kind and a message containing a
//!   specific substring;
//! * `Read`: opening succeeds (the fault lies in a grain table entry or a grain) and
//!   reading the whole disk fails that way (a read-write open may also refuse the file
//!   with that error);
//! * `Fine`: opening and reading succeed (faults the library tolerates or recovers
//!   from, e.g. a streamOptimized file whose footer is unusable: its grain map is
//!   rebuilt from the markers; a capacity at the limit: the open stays small).
//!
//! Most cases expect the same for both opens. streamOptimized files are read-only,
//! so their read-write open must be refused (`NotSupported`); some faults (a damaged
//! redundant grain directory) only stop writers.
//!
//! In every attempt the library must not panic (each attempt runs under
//! `catch_unwind`, each case in its own thread with a deadline, so a hang is reported
//! too), and every file in the case's directory must be byte-identical afterwards;
//! the one exception is a read-write open that succeeded: it may rewrite the first
//! sector of a file (the uncleanShutdown mark of a sparse header). Peak memory (RSS
//! high-water mark) may grow by at most `MAX_CASE_MEMORY_MIB` per case.
//!
//! Disks larger than 4 GiB are read at their start, middle and end only.
//!
//! All failures of all cases are collected and reported together.

use std::collections::BTreeMap;
use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use vdisk::{create, CreateOptions, DiskType, ErrorKind, OpenOptions};

const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;

// Layout of the 64 MiB monolithicSparse base disk `m.vmdk` as `create` writes it
// (checked by `base_layouts_are_as_expected`): header at 0, embedded descriptor at
// sectors 1..21, redundant GD at 21 with its two tables at 22 and 26, GD at 30 with
// its two tables at 31 and 35, grains from sector 128 (the file is 128 sectors).
const M_CAPACITY: u64 = 64 * MIB;
const M_DESC: u64 = 1;
const M_DESC_SECTORS: u64 = 20;
const M_RGD: u64 = 21;
const M_GD: u64 = 30;
const M_GT0: u64 = 31;
const M_GT1: u64 = 35;
const M_OVERHEAD: u64 = 128;

// Header field offsets (bytes).
const H_VERSION: u64 = 4;
const H_FLAGS: u64 = 8;
const H_CAPACITY: u64 = 12;
const H_GRAIN: u64 = 20;
const H_DESC_OFFSET: u64 = 28;
const H_DESC_SIZE: u64 = 36;
const H_GTES: u64 = 44;
const H_RGD: u64 = 48;
const H_GD: u64 = 56;
const H_OVERHEAD: u64 = 64;
const H_UNCLEAN: u64 = 72;

// ---------------------------------------------------------------------------
// Builders' helpers.

fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    let mut data = fs::read(path).unwrap();
    let end = offset as usize + bytes.len();
    if data.len() < end {
        data.resize(end, 0);
    }
    data[offset as usize..end].copy_from_slice(bytes);
    fs::write(path, data).unwrap();
}

fn poke_u32(path: &Path, offset: u64, v: u32) {
    poke(path, offset, &v.to_le_bytes());
}

fn poke_u64(path: &Path, offset: u64, v: u64) {
    poke(path, offset, &v.to_le_bytes());
}

fn peek_u32(path: &Path, offset: u64) -> u32 {
    let d = fs::read(path).unwrap();
    let o = offset as usize;
    u32::from_le_bytes(d[o..o + 4].try_into().unwrap())
}

fn peek_u64(path: &Path, offset: u64) -> u64 {
    let d = fs::read(path).unwrap();
    let o = offset as usize;
    u64::from_le_bytes(d[o..o + 8].try_into().unwrap())
}

fn truncate(path: &Path, len: u64) {
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

fn make(dir: &Path, name: &str, t: DiskType, capacity: u64) -> PathBuf {
    let p = dir.join(name);
    create(&p, &CreateOptions::new(t, capacity)).unwrap();
    p
}

/// The 64 MiB monolithicSparse base disk, untouched.
fn mono(dir: &Path) -> PathBuf {
    make(dir, "m.vmdk", DiskType::MonolithicSparse, M_CAPACITY)
}

/// The base disk with grain 0 written (one whole grain of 0xa5, at sector 128), closed
/// cleanly: the file is 256 sectors long.
fn mono_with_data(dir: &Path) -> PathBuf {
    let p = mono(dir);
    let d = OpenOptions::new().write(true).open(&p).unwrap();
    d.write_at(&[0xa5; 64 << 10], 0).unwrap();
    d.close().unwrap();
    p
}

/// A twoGbMaxExtentSparse disk of 2100 MiB: `s-s001.vmdk` (4192256 sectors) and
/// `s-s002.vmdk` (108544 sectors), neither with an embedded descriptor.
fn split(dir: &Path) -> PathBuf {
    make(dir, "s.vmdk", DiskType::TwoGbMaxExtentSparse, 2100 * MIB)
}

/// A 1 MiB monolithicFlat disk `d.vmdk` + `d-flat.vmdk`.
fn flat(dir: &Path) -> PathBuf {
    make(dir, "d.vmdk", DiskType::MonolithicFlat, MIB)
}

fn header_set_u32(p: &Path, off: u64, v: u32) {
    poke_u32(p, off, v)
}

fn header_set_u64(p: &Path, off: u64, v: u64) {
    poke_u64(p, off, v)
}

/// Replaces the embedded descriptor of `m.vmdk` with `text` (NUL padded).
fn set_embedded(p: &Path, text: &[u8]) {
    assert!(text.len() as u64 <= M_DESC_SECTORS * SECTOR);
    let mut area = text.to_vec();
    area.resize((M_DESC_SECTORS * SECTOR) as usize, 0);
    poke(p, M_DESC * SECTOR, &area);
}

/// Deterministic binary junk without NUL, LF, CR, '=' or '#' (all bytes >= 0x80).
fn junk(n: usize) -> Vec<u8> {
    (0..n).map(|i| 0x80 | ((i * 37 + 11) % 128) as u8).collect()
}

/// A standalone descriptor. `create_type` and `extent` are whole lines (empty string
/// for none). Line numbers: 6 = createType, 9 = extent line.
fn descriptor_text(create_type: &str, extent: &str) -> String {
    format!(
        "# Disk DescriptorFile\n\
         version=1\n\
         encoding=\"UTF-8\"\n\
         CID=12345678\n\
         parentCID=ffffffff\n\
         {create_type}\n\
         \n\
         # Extent description\n\
         {extent}\n\
         \n\
         # The Disk Data Base\n\
         #DDB\n\
         \n\
         ddb.adapterType = \"lsilogic\"\n\
         ddb.virtualHWVersion = \"13\"\n"
    )
}

const CT_FLAT: &str = "createType=\"monolithicFlat\"";
const EXT_FLAT: &str = "RW 2048 FLAT \"x-flat.vmdk\" 0";

/// Writes `x.vmdk` with `text` next to a valid 1 MiB (2048 sector) `x-flat.vmdk`.
fn hand_written(dir: &Path, text: &[u8]) -> PathBuf {
    fs::write(dir.join("x-flat.vmdk"), vec![0u8; MIB as usize]).unwrap();
    let p = dir.join("x.vmdk");
    fs::write(&p, text).unwrap();
    p
}

fn embedded_text(create_type: &str, extent: &str) -> Vec<u8> {
    descriptor_text(create_type, extent).into_bytes()
}

// ---------------------------------------------------------------------------
// streamOptimized base: `st.vmdk`, 1 MiB, written by the library's stream writer with
// grain 0 (0xa5 fill, one sector compressed) and grain 1 (incompressible, stored: 129
// sectors). Layout (checked by `other_base_layouts_are_as_expected`): header (gdOffset =
// GD_AT_END), descriptor, then from sector 128 the grain markers, a GT marker + table,
// a GD marker + directory, the footer marker + footer, the EOS marker.
const ST_G0: u64 = 128;
const ST_G1: u64 = 129;
const ST_GT_MARKER: u64 = 258;
const ST_GT: u64 = 259;
const ST_GD: u64 = 264;
const ST_FOOTER_MARKER: u64 = 265;
const ST_FOOTER: u64 = 266;
const ST_SECTORS: u64 = 268;
/// Offset of the compressed size in a grain marker, of the data after it.
const MARKER_SIZE: u64 = 8;
const MARKER_DATA: u64 = 12;

/// Deterministic incompressible bytes.
fn noise(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn zlib(data: &[u8]) -> Vec<u8> {
    vdisk::ops::stream_writer::compress_grain(data, 6).unwrap()
}

fn stream(dir: &Path) -> PathBuf {
    let p = dir.join("st.vmdk");
    let opts = CreateOptions::new(DiskType::StreamOptimized, MIB);
    let mut w = vdisk::ops::create::start_stream(&p, &opts).unwrap();
    w.append_grain(0, &zlib(&[0xa5; 64 << 10])).unwrap();
    w.append_grain(1, &zlib(&noise(64 << 10))).unwrap();
    w.finish().unwrap();
    p
}

/// The stream without its footer (the footer marker's sector zeroed - an
/// end-of-stream marker now - and the file cut after it): the grain map is rebuilt
/// from the markers, which end properly.
fn stream_without_footer(dir: &Path) -> PathBuf {
    let p = stream(dir);
    poke(&p, ST_FOOTER_MARKER * SECTOR, &[0u8; SECTOR as usize]);
    truncate(&p, (ST_FOOTER_MARKER + 1) * SECTOR);
    p
}

/// The stream cut after its directory: no footer, no end-of-stream marker - a copy
/// that stopped early.
fn stream_cut_after_directory(dir: &Path) -> PathBuf {
    let p = stream(dir);
    truncate(&p, ST_FOOTER_MARKER * SECTOR);
    p
}

/// Replaces the compressed data of grain 0 (which must fit its sector).
fn set_grain0_data(p: &Path, z: &[u8]) {
    assert!(MARKER_DATA as usize + z.len() <= SECTOR as usize);
    poke_u32(p, ST_G0 * SECTOR + MARKER_SIZE, z.len() as u32);
    poke(p, ST_G0 * SECTOR + MARKER_DATA, z);
}

// ---------------------------------------------------------------------------
// vmfsSparse (COWD) base: `c.vmdk`, a vmfsSparse child (made by `create_child`) of
// the 1 MiB vmfs disk `d.vmdk`, its delta `c-delta.vmdk`: a 4-sector COWD header,
// the grain directory (1 entry) at sector 4, 5 sectors in all (checked by
// `other_base_layouts_are_as_expected`, as is the seSparse base).
const C_VERSION: u64 = 4;
const C_SECTORS: u64 = 12;
const C_GRAIN: u64 = 16;
const C_GD_OFFSET: u64 = 20;
const C_GD_ENTRIES: u64 = 24;
const C_FREE: u64 = 28;
const C_GD: u64 = 4;
/// With grain 0 written: the grain (one sector) at 5, its grain table at 6..38.
const C_GRAIN0: u64 = 5;
const C_GT0: u64 = 6;

fn vmfs_parent(dir: &Path) -> PathBuf {
    make(dir, "d.vmdk", DiskType::Vmfs, MIB)
}

fn cowd(dir: &Path) -> PathBuf {
    let parent = vmfs_parent(dir);
    let p = dir.join("c.vmdk");
    vdisk::ops::child::create_child(&parent, &p, DiskType::VmfsSparse).unwrap();
    p
}

fn cowd_delta(dir: &Path) -> PathBuf {
    dir.join("c-delta.vmdk")
}

fn cowd_with_data(dir: &Path) -> PathBuf {
    let p = cowd(dir);
    let d = OpenOptions::new().write(true).open(&p).unwrap();
    d.write_at(&[0x5a; 512], 0).unwrap();
    d.close().unwrap();
    p
}

// ---------------------------------------------------------------------------
// seSparse base: `e.vmdk`, a seSparse child (made by `create_child`) of the 1 MiB vmfs
// disk `d.vmdk`, its extent `e-sesparse.vmdk` laid out as ESXi does: constant header
// at 0, volatile header at 1, journal header 2..4, journal 2048.., directory at 4096,
// grain tables at 6144, free bitmap 8192, backmap 10240, grains from 12288 (the file
// ends there while empty).
const SE_VERSION: u64 = 8;
const SE_CAPACITY: u64 = 16;
const SE_GRAIN: u64 = 24;
const SE_GT_SIZE: u64 = 32;
const SE_FLAGS: u64 = 40;
const SE_RESERVED2: u64 = 56;
const SE_VOLATILE_OFFSET: u64 = 80;
const SE_VOLATILE_SIZE: u64 = 88;
const SE_GD_OFFSET: u64 = 128;
const SE_GT_OFFSET: u64 = 144;
const SE_GRAINS_OFFSET: u64 = 192;
const SE_VOLATILE: u64 = 1;
const SE_GD: u64 = 4096;
const SE_GT: u64 = 6144;
const SE_GRAINS: u64 = 12288;
/// A directory entry naming grain table `index`.
const SE_GDE_TABLE: u64 = 0x1000_0000_0000_0000;

/// A grain table entry for allocated grain slot `slot` (the rotated encoding).
fn se_allocated(slot: u64) -> u64 {
    (3 << 60) | ((slot & 0xfff) << 48) | (slot >> 12)
}

fn sesparse(dir: &Path) -> PathBuf {
    let parent = vmfs_parent(dir);
    let p = dir.join("e.vmdk");
    vdisk::ops::child::create_child(&parent, &p, DiskType::SeSparse).unwrap();
    p
}

fn se_file(dir: &Path) -> PathBuf {
    dir.join("e-sesparse.vmdk")
}

/// With grain 0 (4 KiB) written: directory entry 0 names table 0, whose entry 0 names
/// grain slot 0 (at sector 12288); the file ends after that grain.
fn sesparse_with_data(dir: &Path) -> PathBuf {
    let p = sesparse(dir);
    let d = OpenOptions::new().write(true).open(&p).unwrap();
    d.write_at(&[0x3c; 4096], 0).unwrap();
    d.close().unwrap();
    p
}

// ---------------------------------------------------------------------------
// Snapshot chains, hand-written: vmfsSparse links (descriptor + COWD delta of 2048
// sectors, the same bytes `create_child` writes) over a vmfs base (descriptor + flat
// file); checked by `other_base_layouts_are_as_expected`.

/// A COWD delta of `sectors` with an empty grain directory at sector 4.
fn cowd_bytes(sectors: u32) -> Vec<u8> {
    let entries = sectors.div_ceil(4096);
    let gd_sectors = (entries * 4).div_ceil(512);
    let free = 4 + gd_sectors;
    let mut b = vec![0u8; free as usize * 512];
    b[0..4].copy_from_slice(b"COWD");
    for (off, v) in [
        (4, 1),
        (8, 3),
        (12, sectors),
        (16, 1),
        (20, 4),
        (24, entries),
        (28, free),
    ] {
        b[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    b
}

fn link_descriptor(
    cid: u32,
    parent: Option<(&str, u32)>,
    create_type: &str,
    extent: &str,
) -> String {
    let (parent_cid, hint) = match parent {
        Some((name, cid)) => (
            format!("{cid:08x}"),
            format!("parentFileNameHint=\"{name}\"\n"),
        ),
        None => ("ffffffff".to_string(), String::new()),
    };
    format!(
        "# Disk DescriptorFile\n\
         version=1\n\
         encoding=\"UTF-8\"\n\
         CID={cid:08x}\n\
         parentCID={parent_cid}\n\
         createType=\"{create_type}\"\n\
         {hint}\n\
         # Extent description\n\
         {extent}\n\
         \n\
         # The Disk Data Base\n\
         #DDB\n\
         \n\
         ddb.adapterType = \"lsilogic\"\n\
         ddb.virtualHWVersion = \"13\"\n"
    )
}

/// `NAME.vmdk`: a vmfs base of `sectors` with CID `cid` (flat file `NAME-flat.vmdk`).
fn chain_base(dir: &Path, name: &str, cid: u32, sectors: u64) -> PathBuf {
    let flat = format!("{name}-flat.vmdk");
    fs::write(dir.join(&flat), vec![0x77u8; (sectors * SECTOR) as usize]).unwrap();
    let p = dir.join(format!("{name}.vmdk"));
    let ext = format!("RW {sectors} VMFS \"{flat}\"");
    fs::write(&p, link_descriptor(cid, None, "vmfs", &ext)).unwrap();
    p
}

/// `NAME.vmdk`: a vmfsSparse link of 2048 sectors with CID `cid` naming `parent`
/// (file name, expected parent CID), delta `NAME-delta.vmdk`.
fn chain_link(dir: &Path, name: &str, cid: u32, parent: Option<(&str, u32)>) -> PathBuf {
    let delta = format!("{name}-delta.vmdk");
    fs::write(dir.join(&delta), cowd_bytes(2048)).unwrap();
    let p = dir.join(format!("{name}.vmdk"));
    let ext = format!("RW 2048 VMFSSPARSE \"{delta}\"");
    fs::write(&p, link_descriptor(cid, parent, "vmfsSparse", &ext)).unwrap();
    p
}

// ---------------------------------------------------------------------------
// The corpus.

/// Where the fault shows (for the `case` constructor: both opens alike).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// Opening must fail.
    Open,
    /// Opening succeeds (the fault is in a grain table entry or grain); reading the
    /// whole disk must fail.
    Read,
}

/// What one open (read-only or read-write) of a case must do.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Opening fails with this kind and a message containing the text.
    Open(ErrorKind, &'static str),
    /// Opening succeeds and reading the disk fails so (or opening fails so).
    Read(ErrorKind, &'static str),
    /// Opening and reading succeed.
    Fine,
}

#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    /// Builds the case in the given (empty) directory; returns the path to open.
    build: fn(&Path) -> PathBuf,
    read_only: Expect,
    read_write: Expect,
}

fn expect(fault: Fault, kind: ErrorKind, msg: &'static str) -> Expect {
    match fault {
        Fault::Open => Expect::Open(kind, msg),
        Fault::Read => Expect::Read(kind, msg),
    }
}

/// A case whose read-only and read-write opens fail alike.
fn case(
    name: &'static str,
    build: fn(&Path) -> PathBuf,
    fault: Fault,
    kind: ErrorKind,
    msg: &'static str,
) -> Case {
    Case {
        name,
        build,
        read_only: expect(fault, kind, msg),
        read_write: expect(fault, kind, msg),
    }
}

/// What a read-write open of a (well-formed enough) streamOptimized file gives.
const STREAM_RW: Expect = Expect::Open(
    ErrorKind::NotSupported,
    "streamOptimized disks cannot be opened for writing",
);

/// A streamOptimized case: the read-only open behaves as given, the read-write open
/// is refused.
fn stream_case(
    name: &'static str,
    build: fn(&Path) -> PathBuf,
    fault: Fault,
    kind: ErrorKind,
    msg: &'static str,
) -> Case {
    Case {
        name,
        build,
        read_only: expect(fault, kind, msg),
        read_write: STREAM_RW,
    }
}

/// A streamOptimized file the reader recovers (read-only open and read succeed).
fn stream_recovered(name: &'static str, build: fn(&Path) -> PathBuf) -> Case {
    Case {
        name,
        build,
        read_only: Expect::Fine,
        read_write: STREAM_RW,
    }
}

/// A fault that only stops writers: read-only open and read succeed, the read-write
/// open fails.
fn writer_refused(
    name: &'static str,
    build: fn(&Path) -> PathBuf,
    kind: ErrorKind,
    msg: &'static str,
) -> Case {
    Case {
        name,
        build,
        read_only: Expect::Fine,
        read_write: Expect::Open(kind, msg),
    }
}

/// An oddity the library tolerates: both opens and reads succeed (in bounded memory).
fn tolerated(name: &'static str, build: fn(&Path) -> PathBuf) -> Case {
    Case {
        name,
        build,
        read_only: Expect::Fine,
        read_write: Expect::Fine,
    }
}

use ErrorKind::*;
use Fault::{Open, Read};

fn cases() -> Vec<Case> {
    let mut all = sparse_and_descriptor_cases();
    all.extend(more_sparse_and_descriptor_cases());
    all.extend(huge_cases());
    all.extend(stream_cases());
    all.extend(cowd_cases());
    all.extend(sesparse_cases());
    all.extend(chain_cases());
    all
}

fn sparse_and_descriptor_cases() -> Vec<Case> {
    vec![
        // ---- truncation at each structure boundary ----------------------------------
        case(
            "truncated_inside_header",
            |d| {
                let p = mono(d);
                truncate(&p, 300);
                p
            },
            Open,
            InvalidDisk,
            "file is 300 bytes, too short for a sparse extent header",
        ),
        case(
            "truncated_inside_embedded_descriptor",
            |d| {
                let p = mono(d);
                truncate(&p, 10 * SECTOR + 7);
                p
            },
            Open,
            InvalidDisk,
            "embedded descriptor (sectors 1..21) lies past the end of the file (10 sectors)",
        ),
        // The redundant GD comes first in the file, so the primary GD is gone too and
        // is the first thing reported.
        case(
            "truncated_inside_redundant_gd",
            |d| {
                let p = mono(d);
                truncate(&p, M_RGD * SECTOR + 200);
                p
            },
            Open,
            InvalidDisk,
            "grain directory (sectors 30..31) lies past the end of the file (21 sectors)",
        ),
        case(
            "truncated_inside_redundant_grain_tables",
            |d| {
                let p = mono(d);
                truncate(&p, 25 * SECTOR);
                p
            },
            Open,
            InvalidDisk,
            "grain directory (sectors 30..31) lies past the end of the file (25 sectors)",
        ),
        case(
            "truncated_inside_gd",
            |d| {
                let p = mono(d);
                truncate(&p, M_GD * SECTOR + 100);
                p
            },
            Open,
            InvalidDisk,
            "grain directory (sectors 30..31) lies past the end of the file (30 sectors)",
        ),
        case(
            "truncated_inside_first_grain_table",
            |d| {
                let p = mono(d);
                truncate(&p, 33 * SECTOR + 5);
                p
            },
            Open,
            InvalidDisk,
            "grain directory entry 0 points to sector 31, past the end of the file (33 sectors)",
        ),
        case(
            "truncated_inside_last_grain_table",
            |d| {
                let p = mono(d);
                truncate(&p, 37 * SECTOR);
                p
            },
            Open,
            InvalidDisk,
            "grain directory entry 1 points to sector 35, past the end of the file (37 sectors)",
        ),
        case(
            "truncated_inside_written_grain",
            |d| {
                let p = mono_with_data(d);
                truncate(&p, M_OVERHEAD * SECTOR + 1000);
                p
            },
            Read,
            InvalidDisk,
            "grain table 0 entry 0 points to sector 128, past the end of the file (66536 bytes)",
        ),
        case(
            "split_second_extent_truncated_inside_header",
            |d| {
                let p = split(d);
                truncate(&d.join("s-s002.vmdk"), 200);
                p
            },
            Open,
            InvalidDisk,
            "file is 200 bytes, too short for a sparse extent header",
        ),
        case(
            "split_second_extent_truncated_inside_gd",
            |d| {
                let p = split(d);
                // s002: redundant GD at 1, GD at 10.
                truncate(&d.join("s-s002.vmdk"), 10 * SECTOR + 8);
                p
            },
            Open,
            InvalidDisk,
            "grain directory (sectors 10..11) lies past the end of the file (10 sectors)",
        ),
        // ---- grain directory entries --------------------------------------------------
        case(
            "gd_entry_past_eof",
            |d| {
                let p = mono(d);
                poke_u32(&p, M_GD * SECTOR + 4, 100_000);
                p
            },
            Open,
            InvalidDisk,
            "grain directory entry 1 points to sector 100000, past the end of the file (128 sectors)",
        ),
        case(
            "gd_entry_u32_max",
            |d| {
                let p = mono(d);
                poke_u32(&p, M_GD * SECTOR, u32::MAX);
                p
            },
            Open,
            InvalidDisk,
            "grain directory entry 0 points to sector 4294967295, past the end of the file",
        ),
        // A GDE cannot point at sector 0 (0 means "no table"); sector 1 is the first
        // sector of the embedded descriptor, right after the header.
        case(
            "gd_entry_into_header_and_descriptor",
            |d| {
                let p = mono(d);
                poke_u32(&p, M_GD * SECTOR, 1);
                p
            },
            Open,
            InvalidDisk,
            "grain directory entry 0 points to sector 1, into the embedded descriptor",
        ),
        case(
            "gd_entry_into_descriptor",
            |d| {
                let p = mono(d);
                poke_u32(&p, M_GD * SECTOR + 4, 12);
                p
            },
            Open,
            InvalidDisk,
            "grain directory entry 1 points to sector 12, into the embedded descriptor",
        ),
        case(
            "gd_entry_into_gd",
            |d| {
                let p = mono(d);
                poke_u32(&p, M_GD * SECTOR + 4, 28);
                p
            },
            Open,
            InvalidDisk,
            "grain directory entry 1 points to sector 28, into the grain directory",
        ),
        // The primary GD's table 0 placed on the redundant GD (sector 21): writing
        // grain table 0 would overwrite the redundant directory.
        case(
            "gd_entry_into_redundant_gd",
            |d| {
                let p = mono(d);
                poke_u32(&p, M_GD * SECTOR, M_RGD as u32);
                p
            },
            Open,
            InvalidDisk,
            "grain directory entry 0 points to sector 21, into the redundant grain directory",
        ),
        // Two directory entries sharing one grain table: a write through one would
        // change what the other maps.
        case(
            "gd_entries_share_a_grain_table",
            |d| {
                let p = mono(d);
                poke_u32(&p, M_GD * SECTOR + 4, M_GT0 as u32);
                p
            },
            Open,
            InvalidDisk,
            "grain tables at sectors 31 and 31 overlap",
        ),
        // ---- grain table entries (seen when the grain is read) ------------------------
        case(
            "gte_past_eof",
            |d| {
                let p = mono(d);
                poke_u32(&p, M_GT0 * SECTOR + 5 * 4, 100_000);
                p
            },
            Read,
            InvalidDisk,
            "grain table 0 entry 5 points to sector 100000, past the end of the file (65536 bytes)",
        ),
        case(
            "gte_past_eof_in_second_table",
            |d| {
                let p = mono_with_data(d);
                poke_u32(&p, M_GT1 * SECTOR + 511 * 4, 0xffff_fff0);
                p
            },
            Read,
            InvalidDisk,
            "grain table 1 entry 511 points to sector 4294967280, past the end of the file",
        ),
        // A GTE cannot point at sector 0 (unallocated) or 1 (zeroed grain); sector 2 is
        // the closest a grain can get to the header: inside the embedded descriptor.
        case(
            "gte_into_header_and_descriptor",
            |d| {
                let p = mono_with_data(d);
                poke_u32(&p, M_GT0 * SECTOR + 4, 2);
                p
            },
            Read,
            InvalidDisk,
            "grain table 0 entry 1 points to sector 2, into the embedded descriptor",
        ),
        case(
            "gte_into_gd",
            |d| {
                let p = mono_with_data(d);
                poke_u32(&p, M_GT0 * SECTOR + 3 * 4, M_GD as u32);
                p
            },
            Read,
            InvalidDisk,
            "grain table 0 entry 3 points to sector 30, into the grain directory",
        ),
        // A grain placed over the grain tables themselves (sectors 31..159): reading
        // it returns metadata as guest data, writing it corrupts the tables.
        case(
            "gte_into_grain_tables",
            |d| {
                let p = mono_with_data(d);
                poke_u32(&p, M_GT0 * SECTOR + 4, M_GT0 as u32);
                p
            },
            Read,
            InvalidDisk,
            "grain table 0 entry 1 points to sector 31",
        ),
        // ---- hostile header fields ----------------------------------------------------
        case(
            "capacity_u64_max",
            |d| {
                let p = mono(d);
                header_set_u64(&p, H_CAPACITY, u64::MAX);
                p
            },
            Open,
            InvalidDisk,
            "capacity 18446744073709551615 sectors exceeds the limit of 1099511627776",
        ),
        case(
            "gtes_per_gt_0",
            |d| {
                let p = mono(d);
                header_set_u32(&p, H_GTES, 0);
                p
            },
            Open,
            InvalidDisk,
            "0 entries per grain table is outside 1..=4096",
        ),
        case(
            "gtes_per_gt_u32_max",
            |d| {
                let p = mono(d);
                header_set_u32(&p, H_GTES, u32::MAX);
                p
            },
            Open,
            InvalidDisk,
            "4294967295 entries per grain table is outside 1..=4096",
        ),
        case(
            "directory_too_large",
            |d| {
                let p = mono(d);
                header_set_u64(&p, H_CAPACITY, 0xffff_ffff);
                header_set_u32(&p, H_GTES, 1);
                p
            },
            Open,
            InvalidDisk,
            "grain directory of 33554432 entries exceeds the limit of 4194304",
        ),
        case(
            "grain_size_0",
            |d| {
                let p = mono(d);
                header_set_u64(&p, H_GRAIN, 0);
                p
            },
            Open,
            InvalidDisk,
            "grain size 0 sectors is not a power of two",
        ),
        case(
            "grain_size_3",
            |d| {
                let p = mono(d);
                header_set_u64(&p, H_GRAIN, 3);
                p
            },
            Open,
            InvalidDisk,
            "grain size 3 sectors is not a power of two",
        ),
        case(
            "grain_size_96_not_power_of_two",
            |d| {
                let p = mono(d);
                header_set_u64(&p, H_GRAIN, 96);
                p
            },
            Open,
            InvalidDisk,
            "grain size 96 sectors is not a power of two",
        ),
        case(
            "grain_size_huge",
            |d| {
                let p = mono(d);
                header_set_u64(&p, H_GRAIN, 1 << 32);
                p
            },
            Open,
            InvalidDisk,
            "grain size 4294967296 sectors exceeds the limit of 2048",
        ),
        case(
            "grain_size_u64_max",
            |d| {
                let p = mono(d);
                header_set_u64(&p, H_GRAIN, u64::MAX);
                p
            },
            Open,
            InvalidDisk,
            "grain size 18446744073709551615 sectors is not a power of two",
        ),
        // Without the KDMV magic the file is taken for a (standalone) descriptor.
        case(
            "bad_magic",
            |d| {
                let p = mono(d);
                poke(&p, 0, b"X");
                p
            },
            Open,
            InvalidDisk,
            "not a valid VMDK descriptor: line 1: expected key=value, an extent line or a comment",
        ),
        case(
            "split_second_extent_bad_magic",
            |d| {
                let p = split(d);
                poke(&d.join("s-s002.vmdk"), 0, b"XDMV");
                p
            },
            Open,
            InvalidDisk,
            "s-s002.vmdk: SPARSE extent file has no sparse (KDMV, COWD or seSparse) header",
        ),
        case(
            "header_version_9",
            |d| {
                let p = mono(d);
                header_set_u32(&p, H_VERSION, 9);
                p
            },
            Open,
            UnsupportedDiskVersion,
            "sparse header version 9 is not 1, 2 or 3",
        ),
        case(
            "unknown_incompatible_flag",
            |d| {
                let p = mono(d);
                let f = peek_u32(&p, H_FLAGS);
                header_set_u32(&p, H_FLAGS, f | 0x0010_0000);
                p
            },
            Open,
            UnsupportedDiskVersion,
            "sparse header has unknown incompatible flags 0x100000",
        ),
        case(
            "marker_flag_without_compression",
            |d| {
                let p = mono(d);
                let f = peek_u32(&p, H_FLAGS);
                header_set_u32(&p, H_FLAGS, f | 0x0002_0000);
                p
            },
            Open,
            InvalidDisk,
            "sparse header has the marker flag without the compression flag",
        ),
        case(
            "eol_check_bytes_damaged",
            |d| {
                let p = mono(d);
                // FTP ASCII mode: "\r\n" -> "\n".
                poke(&p, 75, b"\n\n");
                p
            },
            Open,
            InvalidDisk,
            "sparse header end-of-line check bytes are damaged",
        ),
        case(
            "descriptor_offset_overflows",
            |d| {
                let p = mono(d);
                header_set_u64(&p, H_DESC_OFFSET, u64::MAX);
                header_set_u64(&p, H_DESC_SIZE, 1);
                p
            },
            Open,
            InvalidDisk,
            "region at sector 18446744073709551615 overflows",
        ),
        case(
            "descriptor_size_huge",
            |d| {
                let p = mono(d);
                header_set_u64(&p, H_DESC_SIZE, 1 << 40);
                p
            },
            Open,
            InvalidDisk,
            "embedded descriptor size 1099511627776 sectors is outside 1..=2048",
        ),
        case(
            "gd_offset_past_eof",
            |d| {
                let p = mono(d);
                header_set_u64(&p, H_GD, 1 << 40);
                p
            },
            Open,
            InvalidDisk,
            "grain directory (sectors 1099511627776..1099511627777) lies past the end of the file (128 sectors)",
        ),
        case(
            "gd_offset_0",
            |d| {
                let p = mono(d);
                header_set_u64(&p, H_GD, 0);
                p
            },
            Open,
            InvalidDisk,
            "grain directory offset is 0 (it would overlap the header)",
        ),
        // ---- descriptor garbage -------------------------------------------------------
        case(
            "embedded_descriptor_binary_junk",
            |d| {
                let p = mono(d);
                set_embedded(&p, &junk(4000));
                p
            },
            Open,
            InvalidDisk,
            "embedded descriptor: line 1: expected key=value, an extent line or a comment",
        ),
        case(
            "embedded_descriptor_no_extents",
            |d| {
                let p = mono(d);
                set_embedded(&p, &embedded_text("createType=\"monolithicSparse\"", ""));
                p
            },
            Open,
            InvalidDisk,
            "the descriptor lists no extents",
        ),
        case(
            "embedded_descriptor_capacity_mismatch",
            |d| {
                let p = mono(d);
                set_embedded(
                    &p,
                    &embedded_text(
                        "createType=\"monolithicSparse\"",
                        "RW 262144 SPARSE \"m.vmdk\"",
                    ),
                );
                p
            },
            Open,
            CapacityMismatch,
            "extent 1 holds 131072 sectors but the descriptor says 262144",
        ),
        case(
            "embedded_descriptor_create_type_custom",
            |d| {
                let p = mono(d);
                set_embedded(
                    &p,
                    &embedded_text("createType=\"custom\"", "RW 131072 SPARSE \"m.vmdk\""),
                );
                p
            },
            Open,
            DiskNotSupported,
            "disks of createType \"custom\" are not supported yet",
        ),
        case(
            "descriptor_binary_junk",
            |d| hand_written(d, &junk(3000)),
            Open,
            InvalidDisk,
            "not a valid VMDK descriptor: line 1: expected key=value, an extent line or a comment",
        ),
        case(
            "descriptor_unterminated_quote",
            |d| {
                hand_written(
                    d,
                    descriptor_text("createType=\"monolithicFlat", EXT_FLAT).as_bytes(),
                )
            },
            Open,
            InvalidDisk,
            "not a valid VMDK descriptor: line 6: missing closing quote",
        ),
        case(
            "descriptor_unterminated_quote_in_extent",
            |d| {
                hand_written(
                    d,
                    descriptor_text(CT_FLAT, "RW 2048 FLAT \"x-flat.vmdk 0").as_bytes(),
                )
            },
            Open,
            InvalidDisk,
            "not a valid VMDK descriptor: line 9: missing closing quote",
        ),
        case(
            "descriptor_sector_count_overflows_u64",
            |d| {
                hand_written(
                    d,
                    descriptor_text(CT_FLAT, "RW 99999999999999999999 FLAT \"x-flat.vmdk\" 0")
                        .as_bytes(),
                )
            },
            Open,
            InvalidDisk,
            "line 9: extent sector count \"99999999999999999999\" is too large",
        ),
        case(
            "descriptor_sector_count_u64_max",
            |d| {
                hand_written(
                    d,
                    descriptor_text(CT_FLAT, "RW 18446744073709551615 FLAT \"x-flat.vmdk\" 0")
                        .as_bytes(),
                )
            },
            Open,
            InvalidDisk,
            "extent 1 has an absurd size of 18446744073709551615 sectors",
        ),
        case(
            "descriptor_extent_offset_overflows",
            |d| {
                hand_written(
                    d,
                    descriptor_text(CT_FLAT, "RW 2048 FLAT \"x-flat.vmdk\" 18446744073709551615")
                        .as_bytes(),
                )
            },
            Open,
            InvalidDisk,
            "extent offset 18446744073709551615 overflows",
        ),
        case(
            "descriptor_extent_more_than_7_fields",
            |d| {
                hand_written(
                    d,
                    descriptor_text(CT_FLAT, "RW 2048 FLAT \"x-flat.vmdk\" 0 uuid dev extra")
                        .as_bytes(),
                )
            },
            Open,
            InvalidDisk,
            "line 9: extent line has more than 7 fields",
        ),
        case(
            "descriptor_missing_create_type",
            |d| hand_written(d, descriptor_text("", EXT_FLAT).as_bytes()),
            Open,
            InvalidDisk,
            "the descriptor has no createType",
        ),
        case(
            "descriptor_no_extents",
            |d| hand_written(d, descriptor_text(CT_FLAT, "").as_bytes()),
            Open,
            InvalidDisk,
            "the descriptor lists no extents",
        ),
        case(
            "descriptor_stray_cr",
            |d| {
                let t = descriptor_text(CT_FLAT, EXT_FLAT).replace("CID=12345678", "CID=1234\r5678");
                hand_written(d, t.as_bytes())
            },
            Open,
            InvalidDisk,
            "not a valid VMDK descriptor: line 4: stray carriage return",
        ),
        case(
            "descriptor_version_7",
            |d| {
                let t = descriptor_text(CT_FLAT, EXT_FLAT).replace("version=1", "version=7");
                hand_written(d, t.as_bytes())
            },
            Open,
            UnsupportedDiskVersion,
            "descriptor version 7 is not 1, 2 or 3",
        ),
        // ---- missing / short / wrong files --------------------------------------------
        case(
            "missing_flat_extent_file",
            |d| {
                let p = flat(d);
                fs::remove_file(d.join("d-flat.vmdk")).unwrap();
                p
            },
            Open,
            FileNotFound,
            "d-flat.vmdk is missing",
        ),
        case(
            "embedded_descriptor_names_a_second_extent",
            |d| {
                let p = mono(d);
                fs::write(d.join("other-flat.vmdk"), vec![0u8; MIB as usize]).unwrap();
                set_embedded(
                    &p,
                    &embedded_text(
                        "createType=\"monolithicSparse\"",
                        "RW 131072 SPARSE \"m.vmdk\"\nRW 2048 FLAT \"other-flat.vmdk\" 0",
                    ),
                );
                p
            },
            Open,
            InvalidDisk,
            "an embedded descriptor must list exactly one SPARSE extent, not 2",
        ),
        case(
            "two_extents_name_one_file",
            |d| {
                let p = split(d);
                let text = fs::read_to_string(&p).unwrap();
                fs::write(&p, text.replace("s-s002.vmdk", "s-s001.vmdk")).unwrap();
                p
            },
            Open,
            InvalidDisk,
            "extent 2 names",
        ),
        case(
            "extent_names_its_own_descriptor",
            |d| hand_written(d, descriptor_text("createType=\"monolithicFlat\"", "RW 1 FLAT \"x.vmdk\" 0").as_bytes()),
            Open,
            InvalidDisk,
            "which the descriptor already uses",
        ),
        case(
            "missing_split_sparse_extent_file",
            |d| {
                let p = split(d);
                fs::remove_file(d.join("s-s002.vmdk")).unwrap();
                p
            },
            Open,
            FileNotFound,
            "s-s002.vmdk is missing",
        ),
        case(
            "flat_extent_file_too_short",
            |d| {
                let p = flat(d);
                truncate(&d.join("d-flat.vmdk"), 1000);
                p
            },
            Open,
            InvalidDisk,
            "flat extent file is 1000 bytes but the descriptor needs 1048576",
        ),
        case(
            "raw_file_larger_than_1mib",
            |d| {
                let p = d.join("raw.vmdk");
                let data: Vec<u8> = (0..2 * MIB as usize + 512).map(|i| (i % 251) as u8).collect();
                fs::write(&p, data).unwrap();
                p
            },
            Open,
            IncorrectFileType,
            "not a VMDK: no sparse header, and at 2097664 bytes too large to be a descriptor",
        ),
        case(
            "split_sparse_extent_opened_directly",
            |d| {
                split(d);
                d.join("s-s001.vmdk")
            },
            Open,
            IncorrectFileType,
            "this sparse extent has no embedded descriptor",
        ),
        case(
            "create_type_custom",
            |d| hand_written(d, descriptor_text("createType=\"custom\"", EXT_FLAT).as_bytes()),
            Open,
            DiskNotSupported,
            "disks of createType \"custom\" are not supported yet",
        ),
        case(
            "create_type_vmfs_raw",
            |d| {
                hand_written(
                    d,
                    descriptor_text("createType=\"vmfsRaw\"", "RW 2048 VMFSRAW \"x-flat.vmdk\"")
                        .as_bytes(),
                )
            },
            Open,
            DiskNotSupported,
            "disks of createType \"vmfsRaw\" are not supported yet",
        ),
    ]
}

/// Hosted sparse headers and directories, embedded and standalone descriptors (more).
fn more_sparse_and_descriptor_cases() -> Vec<Case> {
    vec![
        // An overhead (first grain sector) beyond anything a sparse file can hold: new
        // grains would be placed at overhead rounded up to a grain.
        case(
            "overhead_u64_max",
            |d| {
                let p = mono(d);
                header_set_u64(&p, H_OVERHEAD, u64::MAX);
                p
            },
            Open,
            InvalidDisk,
            "overhead 18446744073709551615 sectors exceeds the limit of 4294967296",
        ),
        case(
            "gd_overlaps_embedded_descriptor",
            |d| {
                let p = mono(d);
                header_set_u64(&p, H_GD, 5);
                p
            },
            Open,
            InvalidDisk,
            "grain directory at sector 5 overlaps the embedded descriptor",
        ),
        // gdOffset = GD_AT_END belongs to streamOptimized files (the directory is in
        // the footer); in a file whose grains are not compressed it is damage.
        case(
            "gd_at_end_without_compression",
            |d| {
                let p = mono(d);
                header_set_u64(&p, H_GD, u64::MAX);
                p
            },
            Open,
            InvalidDisk,
            "grain directory offset is GD_AT_END (a streamOptimized footer) but the grains are not compressed",
        ),
        // A damaged redundant directory does not stop a reader (it only needs the
        // primary one) but does stop a writer, which must keep both.
        writer_refused(
            "redundant_gd_past_eof",
            |d| {
                let p = mono(d);
                header_set_u64(&p, H_RGD, 1_000_000);
                p
            },
            NeedsRepair,
            "redundant grain directory (sectors 1000000..1000001) lies past the end of the file (128 sectors); the disk needs a repair",
        ),
        writer_refused(
            "redundant_gd_entry_past_eof",
            |d| {
                let p = mono(d);
                poke_u32(&p, M_RGD * SECTOR, 100_000);
                p
            },
            NeedsRepair,
            "redundant grain directory entry 0 points to sector 100000, past the end of the file (128 sectors)",
        ),
        // The primary directory's table 0 placed on the redundant table 0 (sector 22):
        // both copies would be one table.
        writer_refused(
            "gd_entry_on_redundant_grain_table",
            |d| {
                let p = mono(d);
                poke_u32(&p, M_GD * SECTOR, 22);
                p
            },
            NeedsRepair,
            "grain tables at sectors 22 and 22 overlap",
        ),
        // The primary directory placed on the redundant one: a reader sees the same
        // tables, a writer would write both copies into one place.
        writer_refused(
            "gd_on_redundant_gd",
            |d| {
                let p = mono(d);
                header_set_u64(&p, H_GD, M_RGD);
                p
            },
            NeedsRepair,
            "redundant grain directory at sector 21 overlaps the grain directory",
        ),
        case(
            "capacity_0",
            |d| {
                let p = mono(d);
                header_set_u64(&p, H_CAPACITY, 0);
                p
            },
            Open,
            CapacityMismatch,
            "extent 1 holds 0 sectors but the descriptor says 131072",
        ),
        tolerated("unclean_shutdown_flag_set", |d| {
            let p = mono_with_data(d);
            poke(&p, H_UNCLEAN, &[1]);
            p
        }),
        case(
            "descriptor_version_2_encrypted",
            |d| {
                let t = descriptor_text(CT_FLAT, EXT_FLAT).replace("version=1", "version=2");
                hand_written(d, t.as_bytes())
            },
            Open,
            DiskNotSupported,
            "descriptor version 2 (encrypted disk) is not supported",
        ),
        case(
            "descriptor_unknown_extent_type",
            |d| {
                hand_written(
                    d,
                    descriptor_text(CT_FLAT, "RW 2048 FOO \"x-flat.vmdk\" 0").as_bytes(),
                )
            },
            Open,
            DiskNotSupported,
            "extent type FOO is not supported yet",
        ),
        case(
            "descriptor_flat_extent_without_file",
            |d| hand_written(d, descriptor_text(CT_FLAT, "RW 2048 FLAT").as_bytes()),
            Open,
            InvalidDisk,
            "line 9: FLAT extent has no file name",
        ),
        // 100 001 lines (100 KB): the line limit, not the byte limit, stops it.
        case(
            "descriptor_too_many_lines",
            |d| {
                let mut t = descriptor_text(CT_FLAT, EXT_FLAT);
                t.push_str(&"#\n".repeat(100_001));
                hand_written(d, t.as_bytes())
            },
            Open,
            InvalidDisk,
            "too many lines (limit 100000)",
        ),
        // 65 537 one-sector ZERO extents (655 KB).
        case(
            "descriptor_too_many_extents",
            |d| {
                let t = descriptor_text(CT_FLAT, &"RW 1 ZERO\n".repeat(65_537));
                hand_written(d, t.as_bytes())
            },
            Open,
            InvalidDisk,
            "too many extents (limit 65536)",
        ),
    ]
}

/// Tiny files claiming enormous capacities or directories: each fails clearly or
/// opens in bounded memory (the harness checks the peak memory of every case).
fn huge_cases() -> Vec<Case> {
    vec![
        // 2^60 bytes (an exabyte) in a 64 KiB file.
        case(
            "exabyte_capacity_sparse",
            |d| {
                let p = mono(d);
                header_set_u64(&p, H_CAPACITY, 1 << 51);
                p
            },
            Open,
            InvalidDisk,
            "capacity 2251799813685248 sectors exceeds the limit of 1099511627776",
        ),
        // The largest capacity with one-sector grains and one-entry tables: a trillion
        // grain tables.
        case(
            "trillion_grain_tables",
            |d| {
                let p = mono(d);
                header_set_u64(&p, H_CAPACITY, 1 << 40);
                header_set_u64(&p, H_GRAIN, 1);
                header_set_u32(&p, H_GTES, 1);
                p
            },
            Open,
            InvalidDisk,
            "grain directory of 1099511627776 entries exceeds the limit of 4194304",
        ),
        // The largest disk the limits allow (512 TiB: 1 MiB grains, 4096-entry
        // tables, a 512 KiB directory of empty entries) in a 576 KiB file: it opens,
        // reads as zeros, and costs the directory in memory.
        tolerated("max_capacity_in_tiny_sparse_file", |d| {
            let p = mono(d);
            let f = peek_u32(&p, H_FLAGS);
            header_set_u32(&p, H_FLAGS, f & !2);
            header_set_u64(&p, H_CAPACITY, 1 << 40);
            header_set_u64(&p, H_GRAIN, 2048);
            header_set_u32(&p, H_GTES, 4096);
            header_set_u64(&p, H_GD, 128);
            header_set_u64(&p, H_OVERHEAD, 128 + 1024);
            truncate(&p, (128 + 1024) * SECTOR);
            set_embedded(
                &p,
                &embedded_text(
                    "createType=\"monolithicSparse\"",
                    "RW 1099511627776 SPARSE \"m.vmdk\"",
                ),
            );
            p
        }),
        case(
            "embedded_descriptor_extent_of_2_62_sectors",
            |d| {
                let p = mono(d);
                set_embedded(
                    &p,
                    &embedded_text(
                        "createType=\"monolithicSparse\"",
                        "RW 4611686018427387904 SPARSE \"m.vmdk\"",
                    ),
                );
                p
            },
            Open,
            InvalidDisk,
            "extent 1 has an absurd size of 4611686018427387904 sectors",
        ),
        // Two ZERO extents, each at the capacity limit: no file behind them, the sum
        // is what must be refused.
        case(
            "zero_extents_add_up_past_the_limit",
            |d| {
                let t = descriptor_text(
                    CT_FLAT,
                    "RW 1099511627776 ZERO\nRW 1099511627776 ZERO",
                );
                hand_written(d, t.as_bytes())
            },
            Open,
            InvalidDisk,
            "the extents add up to more than the capacity limit",
        ),
        // A streamOptimized file without a usable directory and 2^33 grains: the map
        // rebuilt from the markers would need 32 GiB.
        stream_case(
            "stream_no_directory_and_8g_grains",
            |d| {
                let p = stream_without_footer(d);
                header_set_u64(&p, H_CAPACITY, 1 << 40);
                header_set_u32(&p, H_GTES, 4096);
                p
            },
            Open,
            OutOfMemory,
            "the stream has no usable grain directory and 8589934592 grains are too many to index",
        ),
        // A COWD delta claiming the largest capacity its u32 field holds: its
        // directory (4 MiB) would have to be in the 2.5 KiB file.
        case(
            "cowd_capacity_u32_max",
            |d| {
                let p = cowd(d);
                let f = cowd_delta(d);
                poke_u32(&f, C_SECTORS, u32::MAX);
                poke_u32(&f, C_GD_ENTRIES, 1 << 20);
                p
            },
            Open,
            InvalidDisk,
            "grain directory (sectors 4..8196) lies past the end of the file (5 sectors)",
        ),
        case(
            "sesparse_exabyte_capacity",
            |d| {
                let p = sesparse(d);
                poke_u64(&se_file(d), SE_CAPACITY, 1 << 51);
                p
            },
            Open,
            InvalidDisk,
            "seSparse capacity 2251799813685248 sectors exceeds the limit of 137438953472",
        ),
        // 64 TiB (the limit) with the 1 MiB directory of a small disk.
        case(
            "sesparse_max_capacity_directory_too_small",
            |d| {
                let p = sesparse(d);
                poke_u64(&se_file(d), SE_CAPACITY, 1 << 37);
                p
            },
            Open,
            InvalidDisk,
            "the grain directory holds 131072 entries but a capacity of 137438953472 sectors needs 4194304",
        ),
    ]
}

/// streamOptimized files (read-only: every read-write open is refused).
fn stream_cases() -> Vec<Case> {
    vec![
        stream_case(
            "stream_grain_marker_size_0",
            |d| {
                let p = stream(d);
                poke_u32(&p, ST_G0 * SECTOR + MARKER_SIZE, 0);
                p
            },
            Read,
            InvalidDisk,
            "grain marker at sector 128 has an invalid compressed size 0",
        ),
        stream_case(
            "stream_grain_marker_size_3x_grain",
            |d| {
                let p = stream(d);
                poke_u32(&p, ST_G0 * SECTOR + MARKER_SIZE, 3 << 16);
                p
            },
            Read,
            InvalidDisk,
            "grain marker at sector 128 has an invalid compressed size 196608",
        ),
        stream_case(
            "stream_grain_marker_size_u32_max",
            |d| {
                let p = stream(d);
                poke_u32(&p, ST_G1 * SECTOR + MARKER_SIZE, u32::MAX);
                p
            },
            Read,
            InvalidDisk,
            "grain marker at sector 129 has an invalid compressed size 4294967295",
        ),
        stream_case(
            "stream_grain_invalid_zlib",
            |d| {
                let p = stream(d);
                poke(&p, ST_G0 * SECTOR + MARKER_DATA, &junk(64));
                p
            },
            Read,
            InvalidDisk,
            "grain at sector 128 (LBA 0) is corrupt",
        ),
        stream_case(
            "stream_grain_inflates_short",
            |d| {
                let p = stream(d);
                set_grain0_data(&p, &zlib(&[0xa5; 1000]));
                p
            },
            Read,
            InvalidDisk,
            "grain at sector 128 inflates to 1000 bytes, expected 65536",
        ),
        stream_case(
            "stream_grain_inflates_long",
            |d| {
                let p = stream(d);
                set_grain0_data(&p, &zlib(&[0xa5; 70_000]));
                p
            },
            Read,
            InvalidDisk,
            "grain at sector 128 (LBA 0) is corrupt: decompressed data is larger than a grain",
        ),
        stream_case(
            "stream_grain_marker_names_another_grain",
            |d| {
                let p = stream(d);
                poke_u64(&p, ST_G0 * SECTOR, 128);
                p
            },
            Read,
            InvalidDisk,
            "grain marker at sector 128 says LBA 128, but the grain table puts grain LBA 0 there",
        ),
        stream_case(
            "stream_gt_entry_past_eof",
            |d| {
                let p = stream(d);
                poke_u32(&p, ST_GT * SECTOR, 100_000);
                p
            },
            Read,
            InvalidDisk,
            "grain 0 points to sector 100000, outside the file",
        ),
        stream_case(
            "stream_gt_entry_into_header",
            |d| {
                let p = stream(d);
                poke_u32(&p, ST_GT * SECTOR + 4, 1);
                p
            },
            Read,
            InvalidDisk,
            "grain 1 points to sector 1, outside the file",
        ),
        // A grain table entry naming the GT marker itself (a metadata marker, size 0).
        stream_case(
            "stream_gt_entry_names_gt_marker",
            |d| {
                let p = stream(d);
                poke_u32(&p, ST_GT * SECTOR + 4, ST_GT_MARKER as u32);
                p
            },
            Read,
            InvalidDisk,
            "grain marker at sector 258 has an invalid compressed size 0",
        ),
        // Cut inside grain 1: no footer, and the walk over the markers ends inside a
        // grain - a truncated file, refused (it used to read as zeros past the cut).
        stream_case(
            "stream_truncated_mid_grain",
            |d| {
                let p = stream(d);
                truncate(&p, (ST_G1 + 64) * SECTOR);
                p
            },
            Open,
            InvalidDisk,
            "ends inside the block of the marker at sector 129 (65552 bytes announced): the file is truncated",
        ),
        // Cut after the directory: every grain is there, but no footer and no
        // end-of-stream marker - refused as truncated, as qemu-img refuses it.
        stream_case(
            "stream_truncated_after_directory",
            stream_cut_after_directory,
            Open,
            InvalidDisk,
            "ends at sector 265 without an end-of-stream marker: the file is truncated",
        ),
        // Cut at a grain boundary, after grain 0: the rest would read as zeros.
        stream_case(
            "stream_truncated_at_a_grain_boundary",
            |d| {
                let p = stream(d);
                truncate(&p, ST_G1 * SECTOR);
                p
            },
            Open,
            InvalidDisk,
            "ends at sector 129 without an end-of-stream marker: the file is truncated",
        ),
        stream_case(
            "stream_no_footer_grain_lba_beyond_capacity",
            |d| {
                let p = stream_without_footer(d);
                poke_u64(&p, ST_G1 * SECTOR, 1 << 40);
                p
            },
            Open,
            InvalidDisk,
            "grain marker at sector 129 has LBA 1099511627776, not a grain start inside the disk",
        ),
        stream_case(
            "stream_no_footer_grain_lba_unaligned",
            |d| {
                let p = stream_without_footer(d);
                poke_u64(&p, ST_G1 * SECTOR, 130);
                p
            },
            Open,
            InvalidDisk,
            "grain marker at sector 129 has LBA 130, not a grain start inside the disk",
        ),
        // A GT marker whose length wraps the walk around (u64::MAX sectors).
        stream_case(
            "stream_no_footer_gt_marker_length_u64_max",
            |d| {
                let p = stream_without_footer(d);
                poke_u64(&p, ST_GT_MARKER * SECTOR, u64::MAX);
                p
            },
            Open,
            InvalidDisk,
            "marker at sector 258 has an absurd length",
        ),
        // A GT marker of length 0: the walk reads the table as markers (its first
        // entries look like a grain marker of LBA 128 | 129 << 32 and size 0, i.e. a
        // metadata marker, then an EOS): the grains before it are kept.
        stream_recovered("stream_no_footer_gt_marker_length_0", |d| {
            let p = stream_without_footer(d);
            poke_u64(&p, ST_GT_MARKER * SECTOR, 0);
            p
        }),
        stream_recovered("stream_footer_missing", stream_without_footer),
        stream_recovered("stream_footer_magic_wrong", |d| {
            let p = stream(d);
            poke(&p, ST_FOOTER * SECTOR, b"XDMV");
            p
        }),
        stream_recovered("stream_footer_gd_past_eof", |d| {
            let p = stream(d);
            poke_u64(&p, ST_FOOTER * SECTOR + H_GD, 1 << 40);
            p
        }),
        stream_recovered("stream_footer_gd_entry_past_eof", |d| {
            let p = stream(d);
            poke_u32(&p, ST_GD * SECTOR, 1 << 30);
            p
        }),
        // The header itself is unreadable, so the read-write open fails the same way.
        case(
            "stream_unknown_compression_algorithm",
            |d| {
                let p = stream(d);
                poke(&p, 77, &[2, 0]);
                p
            },
            Open,
            UnsupportedDiskVersion,
            "unknown compression algorithm 2",
        ),
    ]
}

/// vmfsSparse (COWD) deltas.
fn cowd_cases() -> Vec<Case> {
    vec![
        case(
            "cowd_version_2",
            |d| {
                let p = cowd(d);
                poke_u32(&cowd_delta(d), C_VERSION, 2);
                p
            },
            Open,
            UnsupportedDiskVersion,
            "COWD header version 2 is not 1",
        ),
        case(
            "cowd_grain_size_0",
            |d| {
                let p = cowd(d);
                poke_u32(&cowd_delta(d), C_GRAIN, 0);
                p
            },
            Open,
            InvalidDisk,
            "COWD grain size 0 sectors is not a power of two up to 2048",
        ),
        case(
            "cowd_grain_size_3",
            |d| {
                let p = cowd(d);
                poke_u32(&cowd_delta(d), C_GRAIN, 3);
                p
            },
            Open,
            InvalidDisk,
            "COWD grain size 3 sectors is not a power of two up to 2048",
        ),
        case(
            "cowd_grain_size_2_31",
            |d| {
                let p = cowd(d);
                poke_u32(&cowd_delta(d), C_GRAIN, 1 << 31);
                p
            },
            Open,
            InvalidDisk,
            "COWD grain size 2147483648 sectors is not a power of two up to 2048",
        ),
        case(
            "cowd_gd_entries_u32_max",
            |d| {
                let p = cowd(d);
                poke_u32(&cowd_delta(d), C_GD_ENTRIES, u32::MAX);
                p
            },
            Open,
            InvalidDisk,
            "COWD grain directory of 4294967295 entries does not fit a capacity of 2048 sectors",
        ),
        case(
            "cowd_gd_entries_0",
            |d| {
                let p = cowd(d);
                poke_u32(&cowd_delta(d), C_GD_ENTRIES, 0);
                p
            },
            Open,
            InvalidDisk,
            "COWD grain directory of 0 entries does not fit a capacity of 2048 sectors (1 needed",
        ),
        // The most entries the limit allows (4 Mi: a 16 MiB directory) in a 2.5 KiB
        // file: only the entries the capacity needs are read.
        tolerated("cowd_gd_entries_4mi", |d| {
            let p = cowd_with_data(d);
            poke_u32(&cowd_delta(d), C_GD_ENTRIES, 1 << 22);
            p
        }),
        case(
            "cowd_gd_offset_into_header",
            |d| {
                let p = cowd(d);
                poke_u32(&cowd_delta(d), C_GD_OFFSET, 2);
                p
            },
            Open,
            InvalidDisk,
            "COWD grain directory at sector 2 overlaps the header",
        ),
        case(
            "cowd_gd_offset_past_eof",
            |d| {
                let p = cowd(d);
                poke_u32(&cowd_delta(d), C_GD_OFFSET, 1 << 31);
                p
            },
            Open,
            InvalidDisk,
            "grain directory (sectors 2147483648..2147483649) lies past the end of the file (5 sectors)",
        ),
        case(
            "cowd_gd_entry_past_eof",
            |d| {
                let p = cowd_with_data(d);
                poke_u32(&cowd_delta(d), C_GD * SECTOR, 100_000);
                p
            },
            Open,
            InvalidDisk,
            "grain directory entry 0 points to sector 100000, past the end of the file (38 sectors)",
        ),
        case(
            "cowd_gd_entry_into_header",
            |d| {
                let p = cowd_with_data(d);
                poke_u32(&cowd_delta(d), C_GD * SECTOR, 1);
                p
            },
            Open,
            InvalidDisk,
            "grain directory entry 0 points to sector 1, into the header",
        ),
        case(
            "cowd_gd_entry_into_gd",
            |d| {
                let p = cowd_with_data(d);
                poke_u32(&cowd_delta(d), C_GD * SECTOR, C_GD as u32);
                p
            },
            Open,
            InvalidDisk,
            "grain directory entry 0 points to sector 4, into the grain directory",
        ),
        case(
            "cowd_gte_past_eof",
            |d| {
                let p = cowd_with_data(d);
                poke_u32(&cowd_delta(d), C_GT0 * SECTOR + 4, 100_000);
                p
            },
            Read,
            InvalidDisk,
            "grain table 0 entry 1 points to sector 100000, past the end of the file",
        ),
        // COWD has no "zeroed grain" entry: 1 is a sector, inside the header.
        case(
            "cowd_gte_1_into_header",
            |d| {
                let p = cowd_with_data(d);
                poke_u32(&cowd_delta(d), C_GT0 * SECTOR + 4, 1);
                p
            },
            Read,
            InvalidDisk,
            "grain table 0 entry 1 points to sector 1, into the header",
        ),
        case(
            "cowd_gte_into_grain_table",
            |d| {
                let p = cowd_with_data(d);
                poke_u32(&cowd_delta(d), C_GT0 * SECTOR + 4, C_GT0 as u32 + 3);
                p
            },
            Read,
            InvalidDisk,
            "grain table 0 entry 1 points to sector 9, into a grain table",
        ),
        case(
            "cowd_capacity_below_descriptor",
            |d| {
                let p = cowd(d);
                poke_u32(&cowd_delta(d), C_SECTORS, 1024);
                p
            },
            Open,
            CapacityMismatch,
            "extent 1 holds 1024 sectors but the descriptor says 2048",
        ),
        case(
            "cowd_truncated_inside_header",
            |d| {
                let p = cowd(d);
                truncate(&cowd_delta(d), 1000);
                p
            },
            Open,
            InvalidDisk,
            "file is 1000 bytes, too short for a COWD header",
        ),
        // freeSector is recomputed from the file length (and rewritten by writers).
        tolerated("cowd_free_sector_past_eof", |d| {
            let p = cowd_with_data(d);
            poke_u32(&cowd_delta(d), C_FREE, u32::MAX);
            p
        }),
        case(
            "cowd_delta_opened_directly",
            |d| {
                cowd(d);
                cowd_delta(d)
            },
            Open,
            IncorrectFileType,
            "this is a vmfsSparse (COWD) extent file; open the descriptor that names it",
        ),
    ]
}

/// seSparse deltas.
fn sesparse_cases() -> Vec<Case> {
    vec![
        case(
            "sesparse_bad_magic",
            |d| {
                let p = sesparse(d);
                poke_u64(&se_file(d), 0, 0xcafe_babf);
                p
            },
            Open,
            InvalidDisk,
            "e-sesparse.vmdk: SESPARSE extent file has no sparse (KDMV, COWD or seSparse) header",
        ),
        case(
            "sesparse_version_3_0",
            |d| {
                let p = sesparse(d);
                poke_u64(&se_file(d), SE_VERSION, 3 << 32);
                p
            },
            Open,
            UnsupportedDiskVersion,
            "seSparse version 3.0 (0x0000000300000000) is not 2.1",
        ),
        case(
            "sesparse_grain_size_16",
            |d| {
                let p = sesparse(d);
                poke_u64(&se_file(d), SE_GRAIN, 16);
                p
            },
            Open,
            InvalidDisk,
            "seSparse grain size 16 sectors is not 8",
        ),
        case(
            "sesparse_grain_table_size_u64_max",
            |d| {
                let p = sesparse(d);
                poke_u64(&se_file(d), SE_GT_SIZE, u64::MAX);
                p
            },
            Open,
            InvalidDisk,
            "seSparse grain table size 18446744073709551615 sectors is not 64",
        ),
        case(
            "sesparse_unknown_flags",
            |d| {
                let p = sesparse(d);
                poke_u64(&se_file(d), SE_FLAGS, 1);
                p
            },
            Open,
            UnsupportedDiskVersion,
            "seSparse header has unknown flags 0x1",
        ),
        case(
            "sesparse_reserved_field_set",
            |d| {
                let p = sesparse(d);
                poke_u64(&se_file(d), SE_RESERVED2, 0xdead);
                p
            },
            Open,
            InvalidDisk,
            "seSparse header reserved field 2 is 0xdead, not 0",
        ),
        case(
            "sesparse_header_padding_set",
            |d| {
                let p = sesparse(d);
                poke(&se_file(d), 300, &[1]);
                p
            },
            Open,
            InvalidDisk,
            "seSparse constant header padding (bytes 208..512) is not zero",
        ),
        case(
            "sesparse_truncated_inside_header",
            |d| {
                let p = sesparse(d);
                truncate(&se_file(d), 300);
                p
            },
            Open,
            InvalidDisk,
            "file is 300 bytes, too short for a seSparse header",
        ),
        case(
            "sesparse_grain_area_unaddressable",
            |d| {
                let p = sesparse(d);
                poke_u64(&se_file(d), SE_GRAINS_OFFSET, u64::MAX);
                p
            },
            Open,
            InvalidDisk,
            "the grain area (sector 18446744073709551615, 2048 sectors) lies beyond any addressable offset",
        ),
        case(
            "sesparse_directory_overlaps_grain_tables",
            |d| {
                let p = sesparse(d);
                poke_u64(&se_file(d), SE_GD_OFFSET, SE_GT);
                p
            },
            Open,
            InvalidDisk,
            "the grain table area (sectors 6144..8192) overlaps the grain directory (sectors 6144..8192)",
        ),
        // The directory moved behind the grain area, past the end of the file.
        case(
            "sesparse_directory_past_eof",
            |d| {
                let p = sesparse(d);
                poke_u64(&se_file(d), SE_GD_OFFSET, 20_000);
                p
            },
            Open,
            InvalidDisk,
            "the grain directory (sectors 20000.., 1 entries) lies past the end of the file (6291456 bytes)",
        ),
        case(
            "sesparse_volatile_header_past_eof",
            |d| {
                let p = sesparse(d);
                poke_u64(&se_file(d), SE_VOLATILE_OFFSET, 20_000);
                p
            },
            Open,
            InvalidDisk,
            "the volatile header (sector 20000) lies past the end of the file (6291456 bytes)",
        ),
        case(
            "sesparse_volatile_header_size_0",
            |d| {
                let p = sesparse(d);
                poke_u64(&se_file(d), SE_VOLATILE_SIZE, 0);
                p
            },
            Open,
            InvalidDisk,
            "the volatile header has a size of 0 sectors",
        ),
        case(
            "sesparse_volatile_header_bad_magic",
            |d| {
                let p = sesparse(d);
                poke_u64(&se_file(d), SE_VOLATILE * SECTOR, 0xcafe_babe);
                p
            },
            Open,
            InvalidDisk,
            "seSparse volatile header magic is 0x00000000cafebabe, not 0xcafecafe",
        ),
        // A dirty journal: refused for reading and writing alike (qemu does the same).
        case(
            "sesparse_journal_needs_replay",
            |d| {
                let p = sesparse(d);
                poke_u64(&se_file(d), SE_VOLATILE * SECTOR + 24, 1);
                p
            },
            Open,
            NeedsRepair,
            "seSparse journal must be replayed (replay_journal is set); journal replay is not supported",
        ),
        case(
            "sesparse_volatile_header_padding_set",
            |d| {
                let p = sesparse(d);
                poke(&se_file(d), SE_VOLATILE * SECTOR + 100, &[1]);
                p
            },
            Open,
            InvalidDisk,
            "seSparse volatile header padding (bytes 32..512) is not zero",
        ),
        case(
            "sesparse_gde_bad_type",
            |d| {
                let p = sesparse(d);
                poke_u64(&se_file(d), SE_GD * SECTOR, 0x2000_0000_0000_0000);
                p
            },
            Open,
            InvalidDisk,
            "grain directory entry 0 is 0x2000000000000000: neither 0 nor a grain table reference",
        ),
        case(
            "sesparse_gde_table_outside_table_area",
            |d| {
                let p = sesparse(d);
                poke_u64(&se_file(d), SE_GD * SECTOR, SE_GDE_TABLE | 32);
                p
            },
            Open,
            InvalidDisk,
            "grain directory entry 0 names grain table 32, outside the grain table area (32 tables)",
        ),
        case(
            "sesparse_gde_table_past_eof",
            |d| {
                let p = sesparse(d);
                poke_u64(&se_file(d), SE_GD * SECTOR, SE_GDE_TABLE | 20);
                truncate(&se_file(d), 7000 * SECTOR);
                p
            },
            Open,
            InvalidDisk,
            "grain table 20 (grain directory entry 0) ends at byte 3833856, past the end of the file (3584000 bytes)",
        ),
        // The header claims 32 MiB (two directory entries; the descriptor keeps 1 MiB)
        // and both entries name table 0.
        case(
            "sesparse_gdes_share_a_table",
            |d| {
                let p = sesparse(d);
                let f = se_file(d);
                poke_u64(&f, SE_CAPACITY, 65_536);
                poke_u64(&f, SE_GD * SECTOR, SE_GDE_TABLE);
                poke_u64(&f, SE_GD * SECTOR + 8, SE_GDE_TABLE);
                p
            },
            Open,
            InvalidDisk,
            "grain directory entries 0 and 1 share grain table 0",
        ),
        case(
            "sesparse_gte_unknown_type",
            |d| {
                let p = sesparse_with_data(d);
                poke_u64(&se_file(d), SE_GT * SECTOR + 8, 0x5000_0000_0000_0001);
                p
            },
            Read,
            InvalidDisk,
            "grain table 0 entry 1 is 0x5000000000000001: unknown grain type 0x5",
        ),
        case(
            "sesparse_gte_unallocated_with_payload",
            |d| {
                let p = sesparse_with_data(d);
                poke_u64(&se_file(d), SE_GT * SECTOR + 8, 7);
                p
            },
            Read,
            InvalidDisk,
            "grain table 0 entry 1 is 0x0000000000000007: unallocated type with a non-zero payload",
        ),
        // Slot 5000 (rotated: low 12 bits in bits 48..59) of a 256-grain area.
        case(
            "sesparse_gte_slot_beyond_grain_area",
            |d| {
                let p = sesparse_with_data(d);
                poke_u64(&se_file(d), SE_GT * SECTOR + 8, se_allocated(5000));
                p
            },
            Read,
            InvalidDisk,
            "grain table 0 entry 1 names grain slot 5000, past the grain area (256 grains)",
        ),
        case(
            "sesparse_gte_slot_past_eof",
            |d| {
                let p = sesparse_with_data(d);
                poke_u64(&se_file(d), SE_GT * SECTOR + 8, se_allocated(100));
                p
            },
            Read,
            InvalidDisk,
            "grain table 0 entry 1 names grain slot 100 at byte 6701056, past the end of the file (6295552 bytes)",
        ),
        case(
            "sesparse_extent_opened_directly",
            |d| {
                sesparse(d);
                se_file(d)
            },
            Open,
            IncorrectFileType,
            "this is a seSparse extent file; open the descriptor that names it",
        ),
    ]
}

/// Snapshot chains.
fn chain_cases() -> Vec<Case> {
    vec![
        case(
            "chain_parent_loop",
            |d| {
                chain_link(d, "b", 0xb, Some(("a.vmdk", 0xa)));
                chain_link(d, "a", 0xa, Some(("b.vmdk", 0xb)))
            },
            Open,
            InvalidChain,
            "a.vmdk as its parent, which is already in the chain",
        ),
        case(
            "chain_self_parent",
            |d| chain_link(d, "a", 0xa, Some(("a.vmdk", 0xa))),
            Open,
            InvalidChain,
            "the snapshot chain loops: ",
        ),
        case(
            "chain_parent_cid_mismatch",
            |d| {
                chain_base(d, "base", 0xc, 2048);
                chain_link(d, "a", 0xa, Some(("base.vmdk", 0xb)))
            },
            Open,
            CidMismatch,
            "to have CID 0000000b, but it has 0000000c: the parent changed after the snapshot was taken",
        ),
        // 256 links: the base and 255 deltas, one more than the limit.
        case(
            "chain_deeper_than_the_limit",
            |d| {
                chain_base(d, "l0", 1, 2048);
                let mut top = PathBuf::new();
                for i in 1..256u32 {
                    let parent = format!("l{}.vmdk", i - 1);
                    top = chain_link(d, &format!("l{i}"), i + 1, Some((&parent, i)));
                }
                top
            },
            Open,
            TooManyRedo,
            "has more than 255 links",
        ),
        case(
            "chain_parent_missing",
            |d| chain_link(d, "a", 0xa, Some(("gone.vmdk", 0xb))),
            Open,
            FileNotFound,
            "the parent disk \"gone.vmdk\" named by",
        ),
        case(
            "chain_parent_cid_without_name",
            |d| {
                let p = chain_link(d, "a", 0xa, None);
                let t = fs::read_to_string(&p)
                    .unwrap()
                    .replace("parentCID=ffffffff", "parentCID=0000000b");
                fs::write(&p, t).unwrap();
                p
            },
            Open,
            InvalidChain,
            "the link has a parentCID (0000000b) but no parentFileNameHint naming its parent",
        ),
        // The parent's own delta is malformed: its error surfaces through the child.
        case(
            "chain_parent_malformed",
            |d| {
                chain_link(d, "b", 0xb, None);
                poke_u32(&d.join("b-delta.vmdk"), C_GD_OFFSET, 2);
                chain_link(d, "a", 0xa, Some(("b.vmdk", 0xb)))
            },
            Open,
            InvalidDisk,
            "COWD grain directory at sector 2 overlaps the header",
        ),
        // A parent smaller than its child reads as zeros past its end.
        tolerated("chain_parent_smaller_than_child", |d| {
            chain_base(d, "base", 0xb, 1024);
            chain_link(d, "a", 0xa, Some(("base.vmdk", 0xb)))
        }),
    ]
}

// ---------------------------------------------------------------------------
// Running a case.

type Snapshot = BTreeMap<String, Vec<u8>>;

fn snapshot(dir: &Path) -> Snapshot {
    let mut out = BTreeMap::new();
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            out.insert(
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap(),
            );
        }
    }
    out
}

/// Differences between two snapshots; with `allow_header`, differences inside the
/// first 512 bytes of a file are ignored.
fn diff(before: &Snapshot, after: &Snapshot, allow_header: bool) -> Vec<String> {
    let mut out = Vec::new();
    for (name, a) in before {
        match after.get(name) {
            None => out.push(format!("{name} was deleted")),
            Some(b) if a == b => {}
            Some(b) => {
                if a.len() != b.len() {
                    out.push(format!("{name} changed size {} -> {}", a.len(), b.len()));
                    continue;
                }
                let skip = if allow_header { 512.min(a.len()) } else { 0 };
                if let Some(i) = (skip..a.len()).find(|&i| a[i] != b[i]) {
                    out.push(format!(
                        "{name} changed at byte {i} ({:#04x} -> {:#04x}){}",
                        a[i],
                        b[i],
                        if i == H_UNCLEAN as usize {
                            " = the sparse header's uncleanShutdown flag"
                        } else {
                            ""
                        }
                    ));
                }
            }
        }
    }
    for name in after.keys() {
        if !before.contains_key(name) {
            out.push(format!("{name} was created"));
        }
    }
    out
}

#[derive(Debug)]
enum Outcome {
    OpenFailed(ErrorKind, String),
    ReadFailed(ErrorKind, String),
    NoError,
}

/// Disks larger than this are read at a few places only.
const FULL_READ_LIMIT: u64 = 4 << 30;

/// Opens `path` (read-only or read-write) and, if that works, reads the whole disk
/// in 1 MiB pieces (a disk over [`FULL_READ_LIMIT`]: its first, middle and last MiB);
/// reports the first error. The disk is dropped before returning.
fn attempt(path: &Path, write: bool) -> Outcome {
    let disk = match OpenOptions::new().write(write).open(path) {
        Ok(d) => d,
        Err(e) => return Outcome::OpenFailed(e.kind(), e.to_string()),
    };
    let cap = disk.capacity();
    let pieces: Vec<u64> = if cap > FULL_READ_LIMIT {
        vec![0, cap / 2 / MIB * MIB, cap - MIB]
    } else {
        (0..cap.div_ceil(MIB)).map(|i| i * MIB).collect()
    };
    let mut buf = vec![0u8; MIB as usize];
    for off in pieces {
        let n = (cap - off).min(MIB) as usize;
        if let Err(e) = disk.read_at(&mut buf[..n], off) {
            return Outcome::ReadFailed(e.kind(), e.to_string());
        }
    }
    Outcome::NoError
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".into()
    }
}

/// Checks one outcome against its expectation; returns the problems.
fn judge(mode: &str, want: Expect, outcome: &Outcome) -> Vec<String> {
    let got = match (outcome, want) {
        (Outcome::NoError, Expect::Fine) => return Vec::new(),
        (Outcome::OpenFailed(k, m), Expect::Open(kind, msg))
        | (Outcome::ReadFailed(k, m), Expect::Read(kind, msg))
        | (Outcome::OpenFailed(k, m), Expect::Read(kind, msg)) => Some((k, m, kind, msg)),
        _ => None,
    };
    let Some((kind, msg, want_kind, want_msg)) = got else {
        let what = match want {
            Expect::Open(k, m) => format!("the open to fail with {k:?} containing {m:?}"),
            Expect::Read(k, m) => {
                format!("the read of the whole disk to fail with {k:?} containing {m:?}")
            }
            Expect::Fine => "open and read to succeed".to_string(),
        };
        return vec![format!("{mode}: expected {what}, got {outcome:?}")];
    };
    let mut problems = Vec::new();
    if *kind != want_kind {
        problems.push(format!(
            "{mode}: kind {kind:?}, expected {want_kind:?} (message: {msg})"
        ));
    }
    if !msg.contains(want_msg) {
        problems.push(format!(
            "{mode}: message {msg:?} does not contain {want_msg:?}"
        ));
    }
    problems
}

/// Runs one case; returns its problems (empty = pass).
fn check_case(c: Case) -> Vec<String> {
    let tmp = tempfile::tempdir().unwrap();
    let target = (c.build)(tmp.path());
    let before = snapshot(tmp.path());
    let mut problems = Vec::new();
    for write in [false, true] {
        let (mode, want) = if write {
            ("read-write", c.read_write)
        } else {
            ("read-only", c.read_only)
        };
        let outcome = match catch_unwind(AssertUnwindSafe(|| attempt(&target, write))) {
            Ok(o) => o,
            Err(p) => {
                problems.push(format!("{mode}: PANIC: {}", panic_text(&*p)));
                continue;
            }
        };
        problems.extend(judge(mode, want, &outcome));
        // Only a successful read-write open may touch the files, and then only the
        // first sector of a file (the uncleanShutdown mark).
        let allow_header = write && !matches!(outcome, Outcome::OpenFailed(..));
        for d in diff(&before, &snapshot(tmp.path()), allow_header) {
            problems.push(format!("{mode} open modified the files: {d}"));
        }
        // Restore the files so that the read-write attempt starts from the original.
        for (name, bytes) in &before {
            fs::write(tmp.path().join(name), bytes).unwrap();
        }
    }
    problems
}

/// Runs a case in its own thread with a deadline, so that a hang is reported.
fn run_case(c: Case) -> Vec<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name(c.name.to_string())
        .spawn(move || {
            let r = catch_unwind(AssertUnwindSafe(|| check_case(c))).unwrap_or_else(|p| {
                vec![format!("PANIC (in the case itself): {}", panic_text(&*p))]
            });
            let _ = tx.send(r);
        })
        .unwrap();
    rx.recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| vec!["did not finish within 60 s (hang or runaway work?)".into()])
}

/// How much the peak resident memory may grow while one case runs. The largest
/// legitimate allocation a tiny hostile file can cause is a rebuilt stream grain map
/// (`MAX_REBUILT_GRAINS` x 4 bytes = 64 MiB); everything else is a few MiB.
const MAX_CASE_MEMORY_MIB: u64 = 96;

/// Peak resident memory of this process in KiB (Linux), to catch absurd allocations.
fn peak_rss_kib() -> Option<u64> {
    let s = fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn malformed_disks_fail_cleanly() {
    let all = cases();
    assert!(all.len() >= 150, "the corpus has only {} cases", all.len());
    let mut names = std::collections::HashSet::new();
    for c in &all {
        assert!(names.insert(c.name), "duplicate case name {}", c.name);
    }
    let mut failures = Vec::new();
    for c in all.iter().copied() {
        let rss_before = peak_rss_kib();
        let problems = run_case(c);
        if let (Some(a), Some(b)) = (rss_before, peak_rss_kib()) {
            if b > a + MAX_CASE_MEMORY_MIB * 1024 {
                failures.push(format!(
                    "{}: peak memory grew by {} MiB",
                    c.name,
                    (b - a) / 1024
                ));
            }
        }
        for p in problems {
            failures.push(format!("{}: {p}", c.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} problem(s) in {} cases:\n  {}",
        failures.len(),
        all.len(),
        failures.join("\n  ")
    );
}

/// The constants the corpus relies on: where `create` puts things.
#[test]
fn base_layouts_are_as_expected() {
    let tmp = tempfile::tempdir().unwrap();
    let m = mono(tmp.path());
    assert_eq!(fs::metadata(&m).unwrap().len(), M_OVERHEAD * SECTOR);
    assert_eq!(peek_u64(&m, H_CAPACITY), M_CAPACITY / SECTOR);
    assert_eq!(peek_u64(&m, H_GRAIN), 128);
    assert_eq!(peek_u64(&m, H_DESC_OFFSET), M_DESC);
    assert_eq!(peek_u64(&m, H_DESC_SIZE), M_DESC_SECTORS);
    assert_eq!(peek_u32(&m, H_GTES), 512);
    assert_eq!(peek_u64(&m, H_RGD), M_RGD);
    assert_eq!(peek_u64(&m, H_GD), M_GD);
    assert_eq!(peek_u64(&m, H_OVERHEAD), M_OVERHEAD);
    assert_eq!(peek_u32(&m, M_GD * SECTOR), M_GT0 as u32);
    assert_eq!(peek_u32(&m, M_GD * SECTOR + 4), M_GT1 as u32);
    assert_eq!(peek_u32(&m, M_RGD * SECTOR), 22);
    assert_eq!(peek_u32(&m, M_RGD * SECTOR + 4), 26);
    assert_eq!(fs::read(&m).unwrap()[H_UNCLEAN as usize], 0);

    let tmp = tempfile::tempdir().unwrap();
    let m = mono_with_data(tmp.path());
    assert_eq!(fs::metadata(&m).unwrap().len(), 2 * M_OVERHEAD * SECTOR);
    assert_eq!(peek_u32(&m, M_GT0 * SECTOR), M_OVERHEAD as u32);

    let tmp = tempfile::tempdir().unwrap();
    split(tmp.path());
    let s2 = tmp.path().join("s-s002.vmdk");
    assert_eq!(peek_u64(&s2, H_CAPACITY), 108_544);
    assert_eq!(peek_u64(&s2, H_DESC_OFFSET), 0);
    assert_eq!(peek_u64(&s2, H_RGD), 1);
    assert_eq!(peek_u64(&s2, H_GD), 10);

    // Every base disk opens and reads cleanly, read-only and read-write.
    for build in [mono, mono_with_data, split, flat] {
        let tmp = tempfile::tempdir().unwrap();
        let p = build(tmp.path());
        for write in [false, true] {
            assert!(
                matches!(attempt(&p, write), Outcome::NoError),
                "{} (write={write})",
                p.display()
            );
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let p = hand_written(tmp.path(), descriptor_text(CT_FLAT, EXT_FLAT).as_bytes());
    assert!(matches!(attempt(&p, false), Outcome::NoError));
}

/// Reads `len` bytes at `offset` of the disk at `p` (read-only).
fn read_disk(p: &Path, offset: u64, len: usize) -> Vec<u8> {
    let d = OpenOptions::new().open(p).unwrap();
    let mut buf = vec![0u8; len];
    d.read_at(&mut buf, offset).unwrap();
    buf
}

/// The layouts of the streamOptimized, vmfsSparse, seSparse and chain bases, and
/// their contents (a stream whose footer is gone reads the same through the map
/// rebuilt from its markers).
#[test]
fn other_base_layouts_are_as_expected() {
    let g0 = vec![0xa5u8; 64 << 10];
    let g1 = noise(64 << 10);
    let tmp = tempfile::tempdir().unwrap();
    let st = stream(tmp.path());
    assert_eq!(fs::metadata(&st).unwrap().len(), ST_SECTORS * SECTOR);
    assert_eq!(peek_u64(&st, H_GD), u64::MAX);
    assert_eq!(peek_u64(&st, ST_G0 * SECTOR), 0);
    assert!(peek_u32(&st, ST_G0 * SECTOR + MARKER_SIZE) < 500);
    assert_eq!(peek_u64(&st, ST_G1 * SECTOR), 128);
    assert_eq!(peek_u32(&st, ST_G1 * SECTOR + MARKER_SIZE), 65_552);
    // GT marker: 4 sectors, size 0, type 1.
    assert_eq!(peek_u64(&st, ST_GT_MARKER * SECTOR), 4);
    assert_eq!(peek_u32(&st, ST_GT_MARKER * SECTOR + 8), 0);
    assert_eq!(peek_u32(&st, ST_GT_MARKER * SECTOR + 12), 1);
    assert_eq!(peek_u32(&st, ST_GT * SECTOR), ST_G0 as u32);
    assert_eq!(peek_u32(&st, ST_GT * SECTOR + 4), ST_G1 as u32);
    assert_eq!(peek_u32(&st, (ST_GD - 1) * SECTOR + 12), 2);
    assert_eq!(peek_u32(&st, ST_GD * SECTOR), ST_GT as u32);
    assert_eq!(peek_u32(&st, ST_FOOTER_MARKER * SECTOR + 12), 3);
    assert_eq!(
        &fs::read(&st).unwrap()[(ST_FOOTER * SECTOR) as usize..][..4],
        b"KDMV"
    );
    assert_eq!(peek_u64(&st, ST_FOOTER * SECTOR + H_GD), ST_GD);
    let tmp2 = tempfile::tempdir().unwrap();
    for (i, p) in [st, stream_without_footer(tmp2.path())].iter().enumerate() {
        let data = read_disk(p, 0, MIB as usize);
        assert!(data[..64 << 10] == g0[..], "stream {i}: grain 0");
        assert!(data[64 << 10..128 << 10] == g1[..], "stream {i}: grain 1");
        assert!(
            data[128 << 10..].iter().all(|&b| b == 0),
            "stream {i}: rest"
        );
    }

    let tmp = tempfile::tempdir().unwrap();
    cowd(tmp.path());
    let delta = cowd_delta(tmp.path());
    assert_eq!(fs::metadata(&delta).unwrap().len(), 5 * SECTOR);
    assert_eq!(&fs::read(&delta).unwrap()[..4], b"COWD");
    assert_eq!(peek_u32(&delta, C_VERSION), 1);
    assert_eq!(peek_u32(&delta, C_SECTORS), 2048);
    assert_eq!(peek_u32(&delta, C_GRAIN), 1);
    assert_eq!(peek_u32(&delta, C_GD_OFFSET), C_GD as u32);
    assert_eq!(peek_u32(&delta, C_GD_ENTRIES), 1);
    assert_eq!(peek_u32(&delta, C_FREE), 5);
    // The hand-made deltas of the chain cases match the library's.
    assert_eq!(cowd_bytes(2048)[..], fs::read(&delta).unwrap()[..]);
    let tmp = tempfile::tempdir().unwrap();
    let c = cowd_with_data(tmp.path());
    let delta = cowd_delta(tmp.path());
    assert_eq!(fs::metadata(&delta).unwrap().len(), 38 * SECTOR);
    assert_eq!(peek_u32(&delta, C_GD * SECTOR), C_GT0 as u32);
    assert_eq!(peek_u32(&delta, C_GT0 * SECTOR), C_GRAIN0 as u32);
    assert_eq!(read_disk(&c, 0, 1024), [[0x5a; 512], [0; 512]].concat());

    let tmp = tempfile::tempdir().unwrap();
    sesparse(tmp.path());
    let f = se_file(tmp.path());
    assert_eq!(fs::metadata(&f).unwrap().len(), SE_GRAINS * SECTOR);
    assert_eq!(peek_u64(&f, 0), 0xcafe_babe);
    assert_eq!(peek_u64(&f, SE_CAPACITY), 2048);
    assert_eq!(peek_u64(&f, SE_VOLATILE_OFFSET), SE_VOLATILE);
    assert_eq!(peek_u64(&f, SE_VOLATILE_SIZE), 1);
    assert_eq!(peek_u64(&f, SE_GD_OFFSET), SE_GD);
    assert_eq!(peek_u64(&f, SE_GT_OFFSET), SE_GT);
    assert_eq!(peek_u64(&f, SE_GT_OFFSET + 8), 2048);
    assert_eq!(peek_u64(&f, SE_GRAINS_OFFSET), SE_GRAINS);
    assert_eq!(peek_u64(&f, SE_GRAINS_OFFSET + 8), 2048);
    assert_eq!(peek_u64(&f, SE_VOLATILE * SECTOR), 0xcafe_cafe);
    let tmp = tempfile::tempdir().unwrap();
    let e = sesparse_with_data(tmp.path());
    let f = se_file(tmp.path());
    assert_eq!(fs::metadata(&f).unwrap().len(), SE_GRAINS * SECTOR + 4096);
    assert_eq!(peek_u64(&f, SE_GD * SECTOR), SE_GDE_TABLE);
    assert_eq!(peek_u64(&f, SE_GT * SECTOR), se_allocated(0));
    assert_eq!(se_allocated(4097), 0x3001_0000_0000_0001);
    assert_eq!(read_disk(&e, 0, 8192), [[0x3c; 4096], [0; 4096]].concat());

    // Every base opens read-write too (streams excepted) and reads cleanly.
    for build in [cowd, cowd_with_data, sesparse, sesparse_with_data] {
        let tmp = tempfile::tempdir().unwrap();
        let p = build(tmp.path());
        for write in [false, true] {
            assert!(
                matches!(attempt(&p, write), Outcome::NoError),
                "{} (write={write})",
                p.display()
            );
        }
    }

    // A two-link chain: the child reads through to its base.
    let tmp = tempfile::tempdir().unwrap();
    chain_base(tmp.path(), "base", 0xb, 2048);
    let a = chain_link(tmp.path(), "a", 0xa, Some(("base.vmdk", 0xb)));
    assert_eq!(read_disk(&a, 0, 4096), vec![0x77; 4096]);
    assert!(matches!(attempt(&a, true), Outcome::NoError));
}
