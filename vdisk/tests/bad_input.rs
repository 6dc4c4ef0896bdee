//! A corpus of malformed disks, built programmatically from valid disks made by
//! `vdisk::create` (then corrupted or truncated) or from hand-written descriptors.
//!
//! For every case:
//! 1. opening it read-only gives the expected error kind and a message containing a
//!    specific substring (for faults inside grain tables or grains, the open
//!    succeeds and the error comes from reading the whole disk);
//! 2. the library does not panic (each attempt runs under `catch_unwind`, each case
//!    in its own thread with a deadline, so a hang is reported too);
//! 3. every file in the case's directory is byte-identical afterwards;
//! 4. the same holds for a read-write open (`OpenOptions::new().write(true)`): it
//!    must fail the same way and leave every file unchanged. The one exception is a
//!    case whose fault lies in a grain table entry or a grain (`Fault::Read`): such
//!    a file opens read-write (the directories are sound, the bad entry is only
//!    seen when that grain is read), and the open may rewrite the header (the
//!    uncleanShutdown mark); only the header sector may then differ.
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
// The corpus.

/// Where the fault shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// Opening must fail.
    Open,
    /// Opening succeeds (the fault is in a grain table entry or grain); reading the
    /// whole disk must fail.
    Read,
}

#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    /// Builds the case in the given (empty) directory; returns the path to open.
    build: fn(&Path) -> PathBuf,
    fault: Fault,
    kind: ErrorKind,
    /// A substring the error message must contain.
    msg: &'static str,
}

const fn case(
    name: &'static str,
    build: fn(&Path) -> PathBuf,
    fault: Fault,
    kind: ErrorKind,
    msg: &'static str,
) -> Case {
    Case {
        name,
        build,
        fault,
        kind,
        msg,
    }
}

use ErrorKind::*;
use Fault::{Open, Read};

fn cases() -> Vec<Case> {
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

/// Opens `path` (read-only or read-write) and, if that works, reads the whole disk
/// in 1 MiB pieces; reports the first error. The disk is dropped before returning.
fn attempt(path: &Path, write: bool) -> Outcome {
    let disk = match OpenOptions::new().write(write).open(path) {
        Ok(d) => d,
        Err(e) => return Outcome::OpenFailed(e.kind(), e.to_string()),
    };
    let cap = disk.capacity();
    let mut buf = vec![0u8; MIB as usize];
    let mut off = 0;
    while off < cap {
        let n = (cap - off).min(MIB) as usize;
        if let Err(e) = disk.read_at(&mut buf[..n], off) {
            return Outcome::ReadFailed(e.kind(), e.to_string());
        }
        off += n as u64;
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

/// Runs one case; returns its problems (empty = pass).
fn check_case(c: Case) -> Vec<String> {
    let tmp = tempfile::tempdir().unwrap();
    let target = (c.build)(tmp.path());
    let before = snapshot(tmp.path());
    let mut problems = Vec::new();
    for write in [false, true] {
        let mode = if write { "read-write" } else { "read-only" };
        let outcome = match catch_unwind(AssertUnwindSafe(|| attempt(&target, write))) {
            Ok(o) => o,
            Err(p) => {
                problems.push(format!("{mode}: PANIC: {}", panic_text(&*p)));
                continue;
            }
        };
        let got = match (&outcome, c.fault, write) {
            (Outcome::OpenFailed(k, m), Fault::Open, _) => Some((k, m)),
            (Outcome::ReadFailed(k, m), Fault::Read, _) => Some((k, m)),
            // A read-write open may also refuse a file with a bad grain table entry.
            (Outcome::OpenFailed(k, m), Fault::Read, true) => Some((k, m)),
            _ => None,
        };
        match got {
            None => problems.push(format!(
                "{mode}: expected the {} to fail with {:?} containing {:?}, got {outcome:?}",
                if c.fault == Fault::Open {
                    "open"
                } else {
                    "read of the whole disk"
                },
                c.kind,
                c.msg
            )),
            Some((kind, msg)) => {
                if *kind != c.kind {
                    problems.push(format!(
                        "{mode}: kind {kind:?}, expected {:?} (message: {msg})",
                        c.kind
                    ));
                }
                if !msg.contains(c.msg) {
                    problems.push(format!(
                        "{mode}: message {msg:?} does not contain {:?}",
                        c.msg
                    ));
                }
            }
        }
        // Only a successful read-write open of a file whose fault is in a grain table
        // entry may touch the files, and then only the header.
        let opened_rw = write && !matches!(outcome, Outcome::OpenFailed(..));
        let allow_header = opened_rw && c.fault == Fault::Read;
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

/// Peak resident memory of this process in KiB (Linux), to catch absurd allocations.
fn peak_rss_kib() -> Option<u64> {
    let s = fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn malformed_disks_fail_cleanly() {
    let all = cases();
    assert!(all.len() >= 24, "the corpus has only {} cases", all.len());
    let mut names = std::collections::HashSet::new();
    for c in &all {
        assert!(names.insert(c.name), "duplicate case name {}", c.name);
    }
    let mut failures = Vec::new();
    for c in all.iter().copied() {
        let rss_before = peak_rss_kib();
        let problems = run_case(c);
        if let (Some(a), Some(b)) = (rss_before, peak_rss_kib()) {
            if b > a + 256 * 1024 {
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
