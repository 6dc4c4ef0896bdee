//! One link of a chain: a descriptor and the extents it lists, laid end to end.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::descriptor::{CreateType, Descriptor, ExtentAccess, ExtentKind, ExtentLine};
use crate::error::{Error, ErrorKind, Result};
use crate::extent::{
    BelowFn, Extent, ExtentMapping, FlatExtent, SeSparseExtent, SparseExtent, StreamExtent,
};
use crate::ids;
use crate::limits::{MAX_CAPACITY_SECTORS, MAX_DESCRIPTOR_BYTES, SECTOR_SIZE};
use crate::storage::{FileHandle, FileIdentity, FileStorage, LockMode, Storage};

/// Where a link's descriptor text lives.
#[derive(Debug)]
enum DescriptorHome {
    /// A standalone descriptor file (kept open: it carries the lock). A rewrite
    /// renames a new file over it, and the new file's handle (locked the same way)
    /// takes the old one's place.
    File(Mutex<FileStorage>),
    /// Embedded in the first (sparse) extent.
    Embedded,
    /// Kept in memory only (the throwaway redo log of a non-persistent open).
    Memory,
}

/// One extent placed in the link's address space.
#[derive(Debug)]
pub struct LinkExtent {
    /// First byte of the link covered by the extent.
    pub start: u64,
    /// What the descriptor says of the extent.
    pub line: ExtentLine,
    /// The extent's file, resolved (None for ZERO extents).
    pub path: Option<PathBuf>,
    /// The opened extent.
    pub extent: Extent,
}

/// What magic a file starts with.
#[derive(Debug, PartialEq, Eq)]
enum FileKind {
    HostedSparse,
    Cowd,
    SeSparse,
    Other,
}

fn sniff(head: &[u8]) -> FileKind {
    if crate::extent::sparse::header::has_sparse_magic(head) {
        FileKind::HostedSparse
    } else if head.starts_with(b"COWD") {
        FileKind::Cowd
    } else if head.len() >= 8 && head[..8] == 0xCAFE_BABEu64.to_le_bytes() {
        FileKind::SeSparse
    } else {
        FileKind::Other
    }
}

/// How to open a link.
#[derive(Clone, Copy, Debug)]
pub struct LinkOpen {
    /// Open for writing.
    pub writable: bool,
    /// Take advisory locks.
    pub lock: bool,
    /// Make writes durable on flush (off: host page cache only, like `cache=unsafe`).
    pub sync: bool,
    /// Keep extent names inside the descriptor's folder and refuse block devices
    /// (see [`crate::paths`]).
    pub strict_paths: bool,
}

impl LinkOpen {
    fn lock_mode(self) -> LockMode {
        match (self.lock, self.writable) {
            (false, _) => LockMode::None,
            (true, true) => LockMode::Exclusive,
            (true, false) => LockMode::Shared,
        }
    }
}

/// A descriptor and its extents.
#[derive(Debug)]
pub struct Link {
    path: PathBuf,
    descriptor: Mutex<Descriptor>,
    home: DescriptorHome,
    extents: Vec<LinkExtent>,
    /// The open files of the extents (each once, in extent order; the monolithic
    /// file when the descriptor is embedded), to identify them (see
    /// [`Link::file_identities`]).
    extent_files: Vec<FileHandle>,
    capacity: u64,
    writable: bool,
}

impl Link {
    /// Opens the link whose descriptor (or monolithic sparse file) is `path`.
    pub fn open(path: &Path, how: LinkOpen) -> Result<Link> {
        Self::open_inner(path, how).map_err(|e| {
            if e.context().contains(&*path.display().to_string()) {
                e
            } else {
                e.within(path.display())
            }
        })
    }

    fn open_inner(path: &Path, how: LinkOpen) -> Result<Link> {
        crate::paths::check_file_type(path, how.strict_paths)?;
        let mut storage = FileStorage::open(path, how.writable, how.lock_mode())?;
        storage.set_sync(how.sync);
        let len = storage
            .len()
            .map_err(|e| Error::io("cannot read file size", e))?;
        let mut head = vec![0u8; len.min(512) as usize];
        storage
            .read_exact_at(&mut head, 0)
            .map_err(|e| Error::io("cannot read", e))?;
        match sniff(&head) {
            FileKind::HostedSparse => Self::open_monolithic(path, storage, how),
            FileKind::Cowd => Err(Error::new(
                ErrorKind::IncorrectFileType,
                "this is a vmfsSparse (COWD) extent file; open the descriptor that names it",
            )),
            FileKind::SeSparse => Err(Error::new(
                ErrorKind::IncorrectFileType,
                "this is a seSparse extent file; open the descriptor that names it",
            )),
            FileKind::Other => {
                if len > MAX_DESCRIPTOR_BYTES as u64 {
                    return Err(Error::new(
                        ErrorKind::IncorrectFileType,
                        format!(
                            "not a VMDK: no sparse header, and at {len} bytes too large to be a descriptor"
                        ),
                    ));
                }
                let mut text = vec![0u8; len as usize];
                storage
                    .read_exact_at(&mut text, 0)
                    .map_err(|e| Error::io("cannot read the descriptor", e))?;
                let descriptor = Descriptor::parse(&text).map_err(|e| {
                    Error::invalid(format!(
                        "not a valid VMDK descriptor: line {}: {}",
                        e.line, e.message
                    ))
                })?;
                Self::open_described(
                    path,
                    descriptor,
                    DescriptorHome::File(Mutex::new(storage)),
                    None,
                    Vec::new(),
                    how,
                )
            }
        }
    }

    /// A monolithic sparse file: the descriptor is embedded in the extent itself.
    fn open_monolithic(path: &Path, storage: FileStorage, how: LinkOpen) -> Result<Link> {
        let file = storage.handle();
        let sparse = open_hosted_sparse(storage, how.writable)?;
        let text = match &sparse {
            Extent::Sparse(s) => s.read_embedded_descriptor()?,
            Extent::Stream(s) => s.read_embedded_descriptor()?,
            _ => None,
        };
        let text = text.ok_or_else(|| {
            Error::new(
                ErrorKind::IncorrectFileType,
                "this sparse extent has no embedded descriptor (it is part of a split disk); open the descriptor file that names it",
            )
        })?;
        let descriptor = Descriptor::parse(&text).map_err(|e| {
            Error::invalid(format!(
                "embedded descriptor: line {}: {}",
                e.line, e.message
            ))
        })?;
        Self::open_described(
            path,
            descriptor,
            DescriptorHome::Embedded,
            Some(sparse),
            vec![file],
            how,
        )
    }

    fn open_described(
        path: &Path,
        descriptor: Descriptor,
        home: DescriptorHome,
        embedded: Option<Extent>,
        mut extent_files: Vec<FileHandle>,
        how: LinkOpen,
    ) -> Result<Link> {
        let lines = descriptor.extents();
        if lines.is_empty() {
            return Err(Error::invalid("the descriptor lists no extents"));
        }
        if embedded.is_some() && lines.len() != 1 {
            return Err(Error::invalid(format!(
                "an embedded descriptor must list exactly one SPARSE extent, not {}",
                lines.len()
            )));
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        let resolve = |i: usize, name: &str| -> Result<PathBuf> {
            let raw = descriptor.file_name_bytes(name);
            let p = if how.strict_paths {
                crate::paths::confine(path, &raw, &format!("extent {}", i + 1))?
            } else {
                dir.join(OsStr::from_bytes(&raw))
            };
            crate::paths::check_file_type(&p, how.strict_paths)?;
            Ok(p)
        };
        // Missing extent files are reported first, naming the file: that is the most
        // useful thing to tell about a descriptor copied without its extents.
        if embedded.is_none() {
            // Each file once, and never the descriptor itself: two extents sharing a
            // file would write over each other.
            let mut seen = std::collections::HashSet::new();
            seen.insert(std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()));
            for (i, line) in lines.iter().enumerate() {
                if let Some(name) = &line.file {
                    let p = resolve(i, name)?;
                    if !p.exists() {
                        return Err(Error::new(
                            ErrorKind::FileNotFound,
                            format!("extent file {} is missing", p.display()),
                        ));
                    }
                    let canonical = std::fs::canonicalize(&p).unwrap_or_else(|_| p.clone());
                    if !seen.insert(canonical) {
                        return Err(Error::invalid(format!(
                            "extent {} names {}, which the descriptor already uses",
                            i + 1,
                            p.display()
                        )));
                    }
                }
            }
        }
        let create_type = descriptor
            .create_type()
            .ok_or_else(|| Error::invalid("the descriptor has no createType"))?;
        check_supported(&descriptor, &create_type)?;

        let mut extents = Vec::with_capacity(lines.len());
        let mut start: u64 = 0;
        let mut embedded = embedded;
        for (i, line) in lines.into_iter().enumerate() {
            let len = line
                .sectors
                .checked_mul(SECTOR_SIZE)
                .filter(|_| line.sectors <= MAX_CAPACITY_SECTORS)
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "extent {} has an absurd size of {} sectors",
                        i + 1,
                        line.sectors
                    ))
                })?;
            let writable = how.writable && line.access == ExtentAccess::ReadWrite;
            let (extent, ext_path) = match (&line.kind, embedded.take()) {
                (ExtentKind::Sparse, Some(sparse)) if i == 0 => (sparse, Some(path.to_path_buf())),
                (_, Some(_)) => {
                    return Err(Error::invalid(
                        "an embedded descriptor must list exactly one SPARSE extent",
                    ))
                }
                (ExtentKind::Zero, None) => (Extent::Zero { len }, None),
                (
                    kind @ (ExtentKind::Flat
                    | ExtentKind::Vmfs
                    | ExtentKind::Sparse
                    | ExtentKind::VmfsSparse
                    | ExtentKind::SeSparse),
                    None,
                ) => {
                    let name = line.file.as_deref().ok_or_else(|| {
                        Error::invalid(format!("extent {} has no file name", i + 1))
                    })?;
                    let p = resolve(i, name)?;
                    let lock = LinkOpen { writable, ..how }.lock_mode();
                    let mut storage = FileStorage::open(&p, writable, lock)?;
                    storage.set_sync(how.sync);
                    extent_files.push(storage.handle());
                    let extent = if matches!(
                        kind,
                        ExtentKind::Sparse | ExtentKind::VmfsSparse | ExtentKind::SeSparse
                    ) {
                        let mut head = [0u8; 8];
                        let n = storage
                            .read_at(&mut head, 0)
                            .map_err(|e| Error::io(format!("cannot read {}", p.display()), e))?;
                        match sniff(&head[..n]) {
                            FileKind::HostedSparse => open_hosted_sparse(storage, writable)?,
                            FileKind::Cowd => {
                                Extent::Sparse(Box::new(SparseExtent::open(storage, writable)?))
                            }
                            FileKind::SeSparse => Extent::SeSparse(Box::new(
                                SeSparseExtent::open(storage, writable)
                                    .map_err(|e| e.within(p.display()))?,
                            )),
                            _ => {
                                return Err(Error::invalid(format!(
                                "{}: {} extent file has no sparse (KDMV, COWD or seSparse) header",
                                p.display(),
                                kind.as_str()
                            )))
                            }
                        }
                    } else {
                        Extent::Flat(FlatExtent::open(
                            storage,
                            line.offset.unwrap_or(0),
                            line.sectors,
                            writable,
                        )?)
                    };
                    (extent, Some(p))
                }
                (kind, None) => {
                    return Err(Error::new(
                        ErrorKind::DiskNotSupported,
                        format!("extent type {} is not supported yet", kind.as_str()),
                    ))
                }
            };
            if extent.capacity_bytes() < len {
                return Err(Error::new(
                    ErrorKind::CapacityMismatch,
                    format!(
                        "extent {} holds {} sectors but the descriptor says {}",
                        i + 1,
                        extent.capacity_bytes() / SECTOR_SIZE,
                        line.sectors
                    ),
                ));
            }
            extents.push(LinkExtent {
                start,
                line,
                path: ext_path,
                extent,
            });
            start = start
                .checked_add(len)
                .filter(|&s| s <= MAX_CAPACITY_SECTORS * SECTOR_SIZE)
                .ok_or_else(|| {
                    Error::invalid("the extents add up to more than the capacity limit")
                })?;
        }
        Ok(Link {
            path: path.to_path_buf(),
            descriptor: Mutex::new(descriptor),
            home,
            extents,
            extent_files,
            capacity: start,
            writable: how.writable,
        })
    }

    /// A throwaway redo log of `capacity` bytes on top of `parent`: a sparse file
    /// created in `dir` and unlinked at once, so it vanishes when the link is dropped
    /// (or the process dies); its descriptor lives in memory only.
    pub fn redo_log(capacity: u64, parent: &Link, dir: &Path) -> Result<Link> {
        use crate::extent::sparse::header::new_sparse_header;
        let sectors = capacity.div_ceil(SECTOR_SIZE);
        let name = format!(".vdisk-redo-{:016x}.vmdk", ids::random_u64());
        let path = dir.join(&name);
        let storage = FileStorage::create_new(&path)?;
        let made = crate::ops::create::write_new_sparse(
            &storage,
            &new_sparse_header(sectors, crate::ops::create::DEFAULT_GRAIN_SECTORS, 0)?,
            None,
        );
        let removed = std::fs::remove_file(&path)
            .map_err(|e| Error::io(format!("cannot unlink the redo log {}", path.display()), e));
        made?;
        removed?;
        let mut storage = storage;
        storage.set_sync(false);
        let extent = Extent::Sparse(Box::new(SparseExtent::open(storage, true)?));
        let parent_cid = parent.descriptor()?.cid().unwrap_or(ids::CID_NO_PARENT);
        let line = ExtentLine {
            access: ExtentAccess::ReadWrite,
            sectors,
            kind: ExtentKind::Sparse,
            file: Some(name),
            offset: None,
            extra: Vec::new(),
        };
        let parent_name = parent.path().display().to_string();
        let descriptor = Descriptor::new(
            &CreateType::MonolithicSparse,
            ids::new_cid(),
            parent_cid,
            Some(&parent_name),
            std::slice::from_ref(&line),
            &[],
        );
        Ok(Link {
            path,
            descriptor: Mutex::new(descriptor),
            home: DescriptorHome::Memory,
            extents: vec![LinkExtent {
                start: 0,
                line,
                path: None,
                extent,
            }],
            extent_files: Vec::new(),
            capacity: sectors * SECTOR_SIZE,
            writable: true,
        })
    }

    /// Marks the link's read-write extents open for writing (`uncleanShutdown`).
    /// Called once the whole chain opened fine, so that a refused open never changes
    /// a file.
    pub fn begin_write(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        for e in &self.extents {
            if e.line.access == ExtentAccess::ReadWrite {
                e.extent.begin_write()?;
            }
        }
        Ok(())
    }

    /// Whether this link is a throwaway redo log (non-persistent open).
    pub fn is_redo_log(&self) -> bool {
        matches!(self.home, DescriptorHome::Memory)
    }

    /// Path of the descriptor (or monolithic file).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Virtual size in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the link was opened for writing.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// The extents, in order.
    pub fn extents(&self) -> &[LinkExtent] {
        &self.extents
    }

    /// What the link's files are now, whatever names they were opened by: the
    /// descriptor file (if it is one of its own), then each extent file once, in
    /// extent order. Read from the open files. Empty for a throwaway redo log.
    pub fn file_identities(&self) -> Result<Vec<FileIdentity>> {
        let io = |e| {
            Error::io(
                format!(
                    "{}: cannot read the state of its files",
                    self.path.display()
                ),
                e,
            )
        };
        let mut out = Vec::with_capacity(self.extent_files.len() + 1);
        if let DescriptorHome::File(storage) = &self.home {
            // The handle in use now: a rewrite swaps in the new file.
            let storage = storage
                .lock()
                .map_err(|_| Error::new(ErrorKind::Fail, "descriptor file lock poisoned"))?;
            out.push(storage.identity().map_err(io)?);
        }
        for f in &self.extent_files {
            out.push(f.identity().map_err(io)?);
        }
        Ok(out)
    }

    /// Whether the descriptor is embedded in the first extent.
    pub fn has_embedded_descriptor(&self) -> bool {
        matches!(self.home, DescriptorHome::Embedded)
    }

    /// The descriptor, locked for reading or editing (call [`Link::save_descriptor`]
    /// after an edit).
    pub fn descriptor(&self) -> Result<MutexGuard<'_, Descriptor>> {
        self.descriptor
            .lock()
            .map_err(|_| Error::new(ErrorKind::Fail, "descriptor lock poisoned"))
    }

    /// Index of the extent holding byte `offset` (binary search over starts).
    fn extent_at(&self, offset: u64) -> usize {
        self.extents
            .partition_point(|e| e.start <= offset)
            .saturating_sub(1)
    }

    /// Where `offset` lives in this link: which extent and what mapping, and for how
    /// many bytes (≤ `len`, never crossing an extent boundary).
    pub fn map(&self, offset: u64, len: u64) -> Result<(usize, ExtentMapping, u64)> {
        let mut i = self.extent_at(offset);
        // Skip empty extents.
        while i + 1 < self.extents.len()
            && self.extents[i].start + self.extents[i].line.sectors * SECTOR_SIZE <= offset
        {
            i += 1;
        }
        let e = &self.extents[i];
        if e.line.access == ExtentAccess::NoAccess {
            return Err(Error::new(
                ErrorKind::AccessDenied,
                format!("extent {} is marked NOACCESS", i + 1),
            ));
        }
        let local = offset - e.start;
        let room = e.line.sectors * SECTOR_SIZE - local;
        let (m, n) = e.extent.map(local, len.min(room))?;
        Ok((i, m, n))
    }

    /// Reads file bytes of extent `index`.
    pub fn read_data(&self, index: usize, file_offset: u64, buf: &mut [u8]) -> Result<()> {
        self.extents[index].extent.read_data(file_offset, buf)
    }

    /// Writes `data` at `offset`, splitting across extents; `below` reads the chain
    /// under this link at link offsets.
    pub fn write(&self, offset: u64, data: &[u8], below: BelowFn<'_>) -> Result<()> {
        if !self.writable {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                format!("{} is open read-only", self.path.display()),
            ));
        }
        let mut pos = 0usize;
        while pos < data.len() {
            let off = offset + pos as u64;
            let mut i = self.extent_at(off);
            while i + 1 < self.extents.len()
                && self.extents[i].start + self.extents[i].line.sectors * SECTOR_SIZE <= off
            {
                i += 1;
            }
            let e = &self.extents[i];
            if e.line.access != ExtentAccess::ReadWrite {
                return Err(Error::new(
                    ErrorKind::ReadOnly,
                    format!("extent {} is marked {}", i + 1, e.line.access.as_str()),
                ));
            }
            let local = off - e.start;
            let room = e.line.sectors * SECTOR_SIZE - local;
            let n = (room.min((data.len() - pos) as u64)) as usize;
            let start = e.start;
            let below_here = |ext_off: u64, buf: &mut [u8]| below(start + ext_off, buf);
            e.extent.write(local, &data[pos..pos + n], &below_here)?;
            pos += n;
        }
        Ok(())
    }

    /// Writes the descriptor back where it lives: a descriptor file is replaced
    /// whole (a new file renamed over it, see [`crate::replace`]), an embedded
    /// descriptor is rewritten in an order that always leaves one readable copy
    /// (see [`crate::extent::sparse::write_descriptor_area`]).
    pub fn save_descriptor(&self, d: &Descriptor) -> Result<()> {
        let bytes = d.to_bytes();
        match &self.home {
            DescriptorHome::File(file) => crate::replace::rewrite_open_file(file, &bytes),
            DescriptorHome::Memory => Ok(()),
            DescriptorHome::Embedded => match self.extents.first().map(|e| &e.extent) {
                Some(Extent::Sparse(s)) => s.write_embedded_descriptor(&bytes),
                _ => Err(Error::new(
                    ErrorKind::Fail,
                    "embedded descriptor without a sparse extent",
                )),
            },
        }
    }

    /// Gives the link a new CID (and matching `ddb.longContentID`) and saves it.
    pub fn renew_cid(&self) -> Result<u32> {
        let mut d = self.descriptor()?;
        let cid = ids::new_cid();
        d.set_cid(cid);
        if let Some(long) = d.ddb("ddb.longContentID").map(str::to_string) {
            if long.len() == 32 && long.bytes().all(|b| b.is_ascii_hexdigit()) {
                d.set_ddb("ddb.longContentID", &format!("{}{cid:08x}", &long[..24]));
            }
        }
        self.save_descriptor(&d)?;
        Ok(cid)
    }

    /// Flushes every extent.
    pub fn flush(&self) -> Result<()> {
        for e in &self.extents {
            e.extent.flush()?;
        }
        Ok(())
    }

    /// Clean close of every extent.
    pub fn close(&self) -> Result<()> {
        let mut first_err = None;
        for e in &self.extents {
            if let Err(err) = e.extent.close() {
                first_err.get_or_insert(err);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// Opens a KDMV file as a sparse extent, or as a streamOptimized one if its grains
/// are compressed (those cannot be opened for writing).
fn open_hosted_sparse(storage: FileStorage, writable: bool) -> Result<Extent> {
    // A header that cannot be read or parsed is reported by SparseExtent::open.
    let mut head = [0u8; crate::extent::sparse::HEADER_SIZE];
    let compressed = storage.read_exact_at(&mut head, 0).is_ok()
        && crate::extent::sparse::SparseHeader::parse(&head).is_ok_and(|h| h.is_compressed());
    if !compressed {
        return Ok(Extent::Sparse(Box::new(SparseExtent::open(
            storage, writable,
        )?)));
    }
    if writable {
        return Err(Error::new(
            ErrorKind::NotSupported,
            format!(
                "{}: streamOptimized disks cannot be opened for writing; open read-only or convert to another type",
                storage.path().display()
            ),
        ));
    }
    Ok(Extent::Stream(Box::new(StreamExtent::open(storage)?)))
}

/// Refuses descriptors this version cannot handle, with a specific message.
fn check_supported(d: &Descriptor, t: &CreateType) -> Result<()> {
    match d.version() {
        None | Some(1) | Some(3) => {}
        Some(2) => {
            return Err(Error::new(
                ErrorKind::DiskNotSupported,
                "descriptor version 2 (encrypted disk) is not supported",
            ))
        }
        Some(v) => {
            return Err(Error::new(
                ErrorKind::UnsupportedDiskVersion,
                format!("descriptor version {v} is not 1, 2 or 3"),
            ))
        }
    }
    match t {
        CreateType::MonolithicSparse
        | CreateType::TwoGbMaxExtentSparse
        | CreateType::MonolithicFlat
        | CreateType::TwoGbMaxExtentFlat
        | CreateType::Vmfs
        | CreateType::VmfsThin
        | CreateType::VmfsPreallocated
        | CreateType::VmfsEagerZeroedThick
        | CreateType::VmfsThick
        | CreateType::VmfsSparse
        | CreateType::SeSparse
        | CreateType::StreamOptimized => {}
        other => {
            return Err(Error::new(
                ErrorKind::DiskNotSupported,
                format!(
                    "disks of createType \"{}\" are not supported yet",
                    other.as_str()
                ),
            ))
        }
    }
    Ok(())
}
