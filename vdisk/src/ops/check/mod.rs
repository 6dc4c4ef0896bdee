//! Checking and repairing a closed disk (vmware-vdiskmanager `-e` / `-R`, VDDK
//! `CheckRepair`).
//!
//! The check reads the files directly instead of opening the disk, so it works on
//! exactly the files the normal open refuses. It walks every link of the chain (the
//! named disk, then its parents through `parentFileNameHint`, as the open does) and
//! every extent of each link:
//!
//! * hosted sparse and vmfsSparse (COWD) extents: directories, tables, grains and
//!   headers ([`grains`]);
//! * seSparse extents: headers, directory, tables ([`sesparse`]);
//! * streamOptimized extents: whether the stream is whole ([`stream`]);
//! * flat extents: whether the file holds the extent ([`flat`]).
//!
//! Then, unless something unrepairable was found, the disk must open (and a disk
//! with compressed grains, whose grains are only verified by inflating them, must
//! read end to end).
//!
//! Repair fixes what can be fixed, writing in crash-consistent order (data, tables,
//! directories, header, each synced before the next), and never frees anything a
//! copy of a table names. Without `repair`, nothing is written. Memory is bounded
//! whatever the file holds: findings beyond [`report::MAX_LISTED_FINDINGS`] are
//! only counted, per-grain state is a bitmap of bounded size swept in windows.

mod flat;
mod grains;
pub mod report;
mod sesparse;
mod stream;

use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::descriptor::{Descriptor, ExtentKind};
use crate::disk::RangeKind;
use crate::error::{Error, ErrorKind, Result};
use crate::extent::sparse::cowd::{has_cowd_magic, CowdHeader, COWD_HEADER_SIZE};
use crate::extent::sparse::header::{has_sparse_magic, SparseHeader, GD_AT_END, HEADER_SIZE};
use crate::ids::CID_NO_PARENT;
use crate::limits::{CHECK_BITMAP_BITS, MAX_CHAIN_DEPTH, MAX_DESCRIPTOR_BYTES};
use crate::storage::{FileStorage, LockMode, Storage};
use grains::GrainHeader;
pub use report::{CheckReport, Finding, MAX_LISTED_FINDINGS};

/// How to check.
#[derive(Clone, Debug)]
pub(crate) struct CheckOptions {
    /// Write repairs.
    pub repair: bool,
    /// Bits of one per-grain bitmap (smaller in tests, to exercise the windows).
    pub bitmap_bits: u64,
    /// Take locks (off when the caller holds the disk's files exclusively itself).
    pub lock: bool,
}

/// Checks the closed disk at `path` (every link of its chain); with `repair`, fixes
/// what can be fixed. An error means the check itself could not run (no such file,
/// not a VMDK, locked); problems of the disk are findings in the report.
pub fn check(path: &Path, repair: bool) -> Result<CheckReport> {
    check_with(
        path,
        &CheckOptions {
            repair,
            bitmap_bits: CHECK_BITMAP_BITS,
            lock: true,
        },
    )
}

pub(crate) fn check_with(path: &Path, opts: &CheckOptions) -> Result<CheckReport> {
    check_inner(path, opts).map_err(|e| e.within(path.display()))
}

/// The disk needs a clean check before a maintenance operation rewrites its files
/// (shrink, defragment): a problem check finds is refused with `NeedsRepair`, as
/// the operation could otherwise treat data that repair would recover as free. The
/// caller holds the disk's files locked exclusively (the check takes no locks).
pub(crate) fn require_clean(path: &Path) -> Result<()> {
    let r = check_with(
        path,
        &CheckOptions {
            repair: false,
            bitmap_bits: CHECK_BITMAP_BITS,
            lock: false,
        },
    )?;
    if r.is_clean() {
        return Ok(());
    }
    let first = r
        .findings
        .first()
        .map(|f| format!("{}: {}", f.file.display(), f.problem))
        .unwrap_or_default();
    let (what, next) = if r.all_repairable() {
        ("repair it first", "vdiskmanager -R")
    } else {
        ("it cannot be repaired", "vdiskmanager -e")
    };
    Err(Error::new(
        ErrorKind::NeedsRepair,
        format!(
            "the disk has {} problem(s) ({first}); {what} ({next} {})",
            r.problems(),
            path.display()
        ),
    ))
}

/// What one link said about its parent, and whether it has compressed grains.
#[derive(Default)]
struct LinkSeen {
    parent: Option<Vec<u8>>,
    has_stream: bool,
}

fn check_inner(path: &Path, opts: &CheckOptions) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    let mut has_stream = false;
    let mut seen: HashSet<PathBuf> = HashSet::new();
    let mut link = path.to_path_buf();
    let mut depth = 1usize;
    loop {
        seen.insert(std::fs::canonicalize(&link).unwrap_or_else(|_| link.clone()));
        let is_top = depth == 1;
        let result = check_link(&link, opts, &mut report);
        let l = match result {
            Ok(l) => l,
            Err(e) if is_top => return Err(e),
            Err(e) => {
                // A parent that cannot even be read is a problem of this disk.
                if e.kind() == ErrorKind::Locked {
                    return Err(e.within(link.display()));
                }
                report.push(Finding::fatal(
                    &link,
                    format!("the parent link cannot be checked: {e}"),
                ));
                break;
            }
        };
        has_stream |= l.has_stream;
        let Some(hint) = l.parent else {
            break;
        };
        if hint.is_empty() {
            report.push(Finding::fatal(
                &link,
                "the link has a parentCID but no parentFileNameHint naming its parent",
            ));
            break;
        }
        if depth >= MAX_CHAIN_DEPTH {
            report.push(Finding::fatal(
                &link,
                format!("the snapshot chain has more than {MAX_CHAIN_DEPTH} links"),
            ));
            break;
        }
        let parent = match crate::chain::resolve_parent(&link, &hint, false) {
            Ok(p) => p,
            Err(e) => {
                report.push(Finding::fatal(&link, e.to_string()));
                break;
            }
        };
        if seen.contains(&std::fs::canonicalize(&parent).unwrap_or_else(|_| parent.clone())) {
            report.push(Finding::fatal(
                &link,
                format!(
                    "the snapshot chain loops: {} names {} as its parent, which is already in the chain",
                    link.display(),
                    parent.display()
                ),
            ));
            break;
        }
        link = parent;
        depth += 1;
    }
    // Whatever the tables say, the disk must open (and, for compressed extents whose
    // grains are only verified by decompressing them, read).
    let verify = if opts.repair {
        report.all_repairable()
    } else {
        report.is_clean()
    };
    if verify {
        if let Err(e) = verify_opens(path, has_stream, opts.lock) {
            report.push(Finding::fatal(path, format!("the disk does not read: {e}")));
        }
    }
    Ok(report)
}

/// Opens the disk read-only and, with `read_all`, reads every data range.
fn verify_opens(path: &Path, read_all: bool, lock: bool) -> Result<()> {
    let disk = crate::disk::OpenOptions::new().lock(lock).open(path)?;
    if !read_all {
        return Ok(());
    }
    let mut buf = vec![0u8; 1 << 20];
    // The map is walked as a stream: memory does not follow the number of ranges.
    disk.for_each_range(0, disk.capacity(), |r| {
        if r.kind != RangeKind::Data {
            return Ok(());
        }
        let mut off = r.offset;
        while off < r.offset + r.length {
            let n = (r.offset + r.length - off).min(buf.len() as u64) as usize;
            disk.read_at(&mut buf[..n], off)?;
            off += n as u64;
        }
        Ok(())
    })
}

fn parse_sparse_header(head: &[u8]) -> Result<SparseHeader> {
    let bytes: &[u8; HEADER_SIZE] = head
        .get(..HEADER_SIZE)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| Error::invalid("the file is shorter than a sparse header"))?;
    SparseHeader::parse(bytes)
}

/// What a descriptor says of its parent.
fn parent_hint(d: &Descriptor) -> Option<Vec<u8>> {
    match d.parent_file_name_hint() {
        Some(h) if !h.is_empty() => Some(d.file_name_bytes(h)),
        _ if d.parent_cid().is_some_and(|c| c != CID_NO_PARENT) => Some(Vec::new()),
        _ => None,
    }
}

/// Checks one link: its descriptor (or monolithic file) and every extent.
fn check_link(path: &Path, opts: &CheckOptions, report: &mut CheckReport) -> Result<LinkSeen> {
    let lock = match (opts.lock, opts.repair) {
        (false, _) => LockMode::None,
        (true, true) => LockMode::Exclusive,
        (true, false) => LockMode::Shared,
    };
    crate::paths::check_file_type(path, false)?;
    let top = FileStorage::open(path, opts.repair, lock)?;
    let len = top
        .len()
        .map_err(|e| Error::io("cannot read the file size", e))?;
    let mut head = vec![0u8; len.min(HEADER_SIZE as u64) as usize];
    top.read_exact_at(&mut head, 0)
        .map_err(|e| Error::io("cannot read", e))?;
    let mut seen = LinkSeen::default();
    if has_sparse_magic(&head) {
        // Monolithic: the descriptor is inside the extent.
        let header = match parse_sparse_header(&head) {
            Ok(h) => h,
            Err(e) => {
                report.push(Finding::fatal(
                    path,
                    format!("the sparse header is invalid: {e}"),
                ));
                return Ok(seen);
            }
        };
        let name = path.display().to_string();
        match crate::extent::sparse::read_descriptor_area(&top, &header, &name) {
            Ok(Some(text)) => match Descriptor::parse(&text) {
                Ok(d) => seen.parent = parent_hint(&d),
                Err(e) => report.push(Finding::fatal(
                    path,
                    format!(
                        "the embedded descriptor is damaged: line {}: {}",
                        e.line, e.message
                    ),
                )),
            },
            Ok(None) => {}
            Err(e) => report.push(Finding::fatal(path, e.to_string())),
        }
        check_kdmv(path, &top, header, opts, report, &mut seen)?;
        return Ok(seen);
    }
    if has_cowd_magic(&head) || head.starts_with(&0xCAFE_BABEu64.to_le_bytes()) {
        return Err(Error::new(
            ErrorKind::IncorrectFileType,
            "this is an extent file of a delta disk; check the descriptor that names it",
        ));
    }
    if len > MAX_DESCRIPTOR_BYTES as u64 {
        return Err(Error::new(
            ErrorKind::IncorrectFileType,
            "not a VMDK: no sparse header, and too large to be a descriptor",
        ));
    }
    let mut text = vec![0u8; len as usize];
    top.read_exact_at(&mut text, 0)
        .map_err(|e| Error::io("cannot read the descriptor", e))?;
    let d = Descriptor::parse(&text).map_err(|e| {
        Error::new(
            ErrorKind::IncorrectFileType,
            format!(
                "not a valid VMDK descriptor: line {}: {}",
                e.line, e.message
            ),
        )
    })?;
    seen.parent = parent_hint(&d);
    let dir = path.parent().unwrap_or(Path::new("."));
    for line in d.extents() {
        let Some(name) = line.file.as_deref() else {
            continue;
        };
        let p = dir.join(OsStr::from_bytes(&d.file_name_bytes(name)));
        crate::paths::check_file_type(&p, false)?;
        if !p.exists() {
            report.push(Finding::fatal(&p, "the extent file is missing"));
            continue;
        }
        let storage = FileStorage::open(&p, opts.repair, lock)?;
        match line.kind {
            ExtentKind::Flat | ExtentKind::Vmfs => {
                let written = flat::check_flat(
                    &p,
                    &storage,
                    line.offset.unwrap_or(0),
                    line.sectors,
                    &d,
                    opts.repair,
                    report,
                )?;
                report.repaired |= written;
            }
            ExtentKind::Sparse | ExtentKind::VmfsSparse | ExtentKind::SeSparse => {
                check_sparse_file(&p, &storage, opts, report, &mut seen)?;
            }
            _ => {}
        }
    }
    Ok(seen)
}

/// A sparse extent file of any kind, by its magic.
fn check_sparse_file(
    p: &Path,
    storage: &FileStorage,
    opts: &CheckOptions,
    report: &mut CheckReport,
    seen: &mut LinkSeen,
) -> Result<()> {
    let mut h = vec![0u8; COWD_HEADER_SIZE];
    let n = storage
        .read_at(&mut h, 0)
        .map_err(|e| Error::io(format!("cannot read {}", p.display()), e))?;
    let h = &h[..n];
    if has_sparse_magic(h) {
        match parse_sparse_header(h) {
            Ok(header) => check_kdmv(p, storage, header, opts, report, seen)?,
            Err(e) => report.push(Finding::fatal(
                p,
                format!("the sparse header is invalid: {e}"),
            )),
        }
    } else if has_cowd_magic(h) {
        match CowdHeader::parse(h) {
            Ok(c) => {
                report.repaired |=
                    grains::check_grain_file(p, storage, GrainHeader::Cowd(c), opts, report)?;
            }
            Err(e) => report.push(Finding::fatal(
                p,
                format!("the COWD header is invalid: {e}"),
            )),
        }
    } else if h.starts_with(&0xCAFE_BABEu64.to_le_bytes()) {
        report.repaired |= sesparse::check_sesparse(p, storage, opts, report)?;
    } else {
        report.push(Finding::fatal(
            p,
            "a sparse extent file without a sparse (KDMV, COWD or seSparse) header",
        ));
    }
    Ok(())
}

/// A `KDMV` file: a stream (compressed grains) or a hosted sparse extent.
fn check_kdmv(
    p: &Path,
    storage: &FileStorage,
    header: SparseHeader,
    opts: &CheckOptions,
    report: &mut CheckReport,
    seen: &mut LinkSeen,
) -> Result<()> {
    if header.is_compressed() || header.gd_offset == GD_AT_END {
        seen.has_stream = true;
        stream::check_stream(p, storage, &header, report)
    } else {
        report.repaired |=
            grains::check_grain_file(p, storage, GrainHeader::Hosted(header), opts, report)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
