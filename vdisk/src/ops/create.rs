//! Creating new disks of every writable type, laid out the way VMware writes them.

use std::path::{Path, PathBuf};

use crate::descriptor::{Descriptor, ExtentAccess, ExtentKind, ExtentLine};
use crate::disk_type::DiskType;
use crate::error::{Error, ErrorKind, Result};
use crate::extent::sparse::header::{new_sparse_header, SparseHeader};
use crate::geometry::{AdapterType, Geometry};
use crate::ids;
use crate::limits::{MAX_CAPACITY_SECTORS, SECTOR_SIZE, SPLIT_EXTENT_SECTORS};
use crate::ops::stream_writer::StreamWriter;
use crate::replace::NewFile;
use crate::storage::{FileStorage, LockMode, Storage};

/// Default grain of new sparse extents: 128 sectors (64 KiB), as VMware and qemu use.
pub const DEFAULT_GRAIN_SECTORS: u64 = 128;
/// Sectors reserved for an embedded descriptor (10 KiB, as VMware and qemu reserve).
pub const EMBEDDED_DESCRIPTOR_SECTORS: u64 = 20;
/// Hardware version written when the caller does not choose one (VDDK's "current").
pub const DEFAULT_HW_VERSION: u32 = 13;

/// What to create.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Disk type.
    pub disk_type: DiskType,
    /// Capacity in bytes (a multiple of 512).
    pub capacity: u64,
    /// Adapter the disk is meant for.
    pub adapter: AdapterType,
    /// Virtual hardware version (`ddb.virtualHWVersion`).
    pub hw_version: u32,
}

impl CreateOptions {
    /// Options for a disk of `disk_type` and `capacity` bytes, lsilogic, default hardware version.
    pub fn new(disk_type: DiskType, capacity: u64) -> CreateOptions {
        CreateOptions {
            disk_type,
            capacity,
            adapter: AdapterType::LsiLogic,
            hw_version: DEFAULT_HW_VERSION,
        }
    }
}

/// Files created so far, removed again if creation fails half way.
#[derive(Default)]
pub(crate) struct Created(Vec<PathBuf>);

impl Created {
    /// Creates `path` (which must not exist) and remembers it.
    pub(crate) fn new_file(&mut self, path: &Path) -> Result<FileStorage> {
        let s = FileStorage::create_new(path)?;
        self.0.push(path.to_path_buf());
        Ok(s)
    }

    /// Keeps every file created (success).
    pub(crate) fn keep(mut self) {
        self.0.clear();
    }
}

impl Drop for Created {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Splits `path` into its folder and the base name without `.vmdk`.
pub fn base_name(path: &Path) -> Result<(PathBuf, String)> {
    let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
        Error::new(
            ErrorKind::InvalidArgument,
            format!("{} is not a usable file name", path.display()),
        )
    })?;
    if name.contains('"') {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "disk file names cannot contain '\"'",
        ));
    }
    let stem = name
        .strip_suffix(".vmdk")
        .or_else(|| name.strip_suffix(".VMDK"))
        .unwrap_or(name);
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok((dir, stem.to_string()))
}

/// The DDB entries VMware writes into a new disk's descriptor.
pub fn new_ddb(
    capacity_sectors: u64,
    adapter: AdapterType,
    hw_version: u32,
    cid: u32,
) -> Vec<(String, String)> {
    let g = Geometry::for_new_disk(capacity_sectors, adapter);
    vec![
        ("ddb.adapterType".into(), adapter.as_str().into()),
        ("ddb.geometry.cylinders".into(), g.cylinders.to_string()),
        ("ddb.geometry.heads".into(), g.heads.to_string()),
        ("ddb.geometry.sectors".into(), g.sectors.to_string()),
        ("ddb.longContentID".into(), ids::long_content_id(cid)),
        ("ddb.uuid".into(), ids::new_disk_uuid()),
        ("ddb.virtualHWVersion".into(), hw_version.to_string()),
    ]
}

/// Creates a new disk at `path`. Fails if any of its files exists; on failure no
/// file is left behind.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
    create_inner(path, opts).map_err(|e| e.within(path.display()))
}

fn create_inner(path: &Path, opts: &CreateOptions) -> Result<()> {
    if opts.capacity == 0 || !opts.capacity.is_multiple_of(SECTOR_SIZE) {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "capacity {} bytes is not a positive multiple of 512",
                opts.capacity
            ),
        ));
    }
    let sectors = opts.capacity / SECTOR_SIZE;
    if sectors > MAX_CAPACITY_SECTORS {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "capacity {} bytes exceeds the limit of {} bytes",
                opts.capacity,
                MAX_CAPACITY_SECTORS * SECTOR_SIZE
            ),
        ));
    }
    if opts.disk_type == DiskType::StreamOptimized {
        let writer = start_stream(path, opts)?;
        return writer.finish().inspect_err(|_| {
            let _ = std::fs::remove_file(path);
        });
    }
    let (dir, stem) = base_name(path)?;
    refuse_existing(path)?;
    let cid = ids::new_cid();
    let mut ddb = new_ddb(sectors, opts.adapter, opts.hw_version, cid);
    let mut created = Created(Vec::new());
    let file_name = |suffix: &str| format!("{stem}{suffix}.vmdk");

    let (extents, embedded) = match opts.disk_type {
        DiskType::MonolithicSparse => {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            (vec![extent(sectors, ExtentKind::Sparse, &name, None)], true)
        }
        DiskType::TwoGbMaxExtentSparse => {
            let mut v = Vec::new();
            for (i, n) in split(sectors).enumerate() {
                let name = file_name(&format!("-s{:03}", i + 1));
                let storage = created.new_file(&dir.join(&name))?;
                write_new_sparse(
                    &storage,
                    &new_sparse_header(n, DEFAULT_GRAIN_SECTORS, 0)?,
                    None,
                )?;
                v.push(extent(n, ExtentKind::Sparse, &name, None));
            }
            (v, false)
        }
        DiskType::MonolithicFlat | DiskType::Vmfs | DiskType::VmfsThin => {
            let name = file_name("-flat");
            let storage = created.new_file(&dir.join(&name))?;
            set_len(&storage, opts.capacity)?;
            let (kind, offset) = if opts.disk_type == DiskType::MonolithicFlat {
                (ExtentKind::Flat, Some(0))
            } else {
                (ExtentKind::Vmfs, None)
            };
            if opts.disk_type == DiskType::VmfsThin {
                ddb.push(("ddb.thinProvisioned".into(), "1".into()));
            }
            (vec![extent(sectors, kind, &name, offset)], false)
        }
        DiskType::TwoGbMaxExtentFlat => {
            let mut v = Vec::new();
            for (i, n) in split(sectors).enumerate() {
                let name = file_name(&format!("-f{:03}", i + 1));
                let storage = created.new_file(&dir.join(&name))?;
                set_len(&storage, n * SECTOR_SIZE)?;
                v.push(extent(n, ExtentKind::Flat, &name, Some(0)));
            }
            (v, false)
        }
        other => {
            return Err(Error::new(
                ErrorKind::NotSupported,
                format!("creating {other} disks is not supported yet"),
            ))
        }
    };
    let ddb_refs: Vec<(&str, &str)> = ddb.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let descriptor = Descriptor::new(
        &opts.disk_type.create_type(),
        cid,
        ids::CID_NO_PARENT,
        None,
        &extents,
        &ddb_refs,
    );
    write_descriptor_file(&mut created, path, &descriptor, embedded.then_some(sectors))?;
    created.keep();
    Ok(())
}

/// Writes the file at `path` that holds a new link's descriptor: a monolithic sparse
/// extent of `embedded_sectors` with the descriptor inside, or a descriptor file.
/// The file is written under a temporary name and linked as `path` once complete
/// (see [`crate::replace::NewFile::publish`]), so `path` never names a partial
/// descriptor; it must not exist.
pub(crate) fn write_descriptor_file(
    created: &mut Created,
    path: &Path,
    descriptor: &Descriptor,
    embedded_sectors: Option<u64>,
) -> Result<()> {
    let text = descriptor.to_bytes();
    let file = NewFile::beside(path, LockMode::Exclusive, true)?;
    match embedded_sectors {
        Some(sectors) => {
            let header =
                new_sparse_header(sectors, DEFAULT_GRAIN_SECTORS, EMBEDDED_DESCRIPTOR_SECTORS)?;
            write_new_sparse(file.storage(), &header, Some(&text))?;
        }
        None => file
            .storage()
            .write_all_at(&text, 0)
            .map_err(|e| Error::io("cannot write the descriptor", e))?,
    }
    file.publish()?;
    created.0.push(path.to_path_buf());
    Ok(())
}

/// Refuses to create a disk at `path` when the name is taken, before any file of
/// it is made.
pub(crate) fn refuse_existing(path: &Path) -> Result<()> {
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(Error::new(
            ErrorKind::AlreadyExists,
            format!("{} already exists", path.display()),
        ));
    }
    Ok(())
}

/// Starts a new streamOptimized disk at `path`: header and embedded descriptor are
/// written; the caller appends grains and calls `finish`. The file is removed again if
/// this fails.
pub fn start_stream(path: &Path, opts: &CreateOptions) -> Result<StreamWriter> {
    let sectors = opts.capacity / SECTOR_SIZE;
    let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
        Error::new(
            ErrorKind::InvalidArgument,
            format!("{} is not a usable file name", path.display()),
        )
    })?;
    let cid = ids::new_cid();
    let ddb = new_ddb(sectors, opts.adapter, opts.hw_version, cid);
    let ddb_refs: Vec<(&str, &str)> = ddb.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let descriptor = Descriptor::new(
        &DiskType::StreamOptimized.create_type(),
        cid,
        ids::CID_NO_PARENT,
        None,
        &[extent(sectors, ExtentKind::Sparse, name, None)],
        &ddb_refs,
    );
    StreamWriter::create(path, opts.capacity, &descriptor.to_bytes())
}

/// A read-write extent line.
pub(crate) fn extent(
    sectors: u64,
    kind: ExtentKind,
    file: &str,
    offset: Option<u64>,
) -> ExtentLine {
    ExtentLine {
        access: ExtentAccess::ReadWrite,
        sectors,
        kind,
        file: Some(file.to_string()),
        offset,
        extra: Vec::new(),
    }
}

/// Extent sizes of a split disk (2047 MiB each, the last one the remainder).
pub(crate) fn split(sectors: u64) -> impl Iterator<Item = u64> {
    let n = sectors.div_ceil(SPLIT_EXTENT_SECTORS);
    (0..n).map(move |i| SPLIT_EXTENT_SECTORS.min(sectors - i * SPLIT_EXTENT_SECTORS))
}

fn set_len(storage: &FileStorage, len: u64) -> Result<()> {
    storage
        .set_len(len)
        .map_err(|e| Error::io(format!("cannot size {}", storage.path().display()), e))
}

/// Writes the header, optional descriptor and both grain directories of a new
/// sparse extent with all grain tables preallocated (zeroed), and sizes the file to
/// `overhead`.
pub fn write_new_sparse(
    storage: &FileStorage,
    h: &SparseHeader,
    descriptor: Option<&[u8]>,
) -> Result<()> {
    let io = |e| Error::io(format!("cannot write {}", storage.path().display()), e);
    let gd_sectors = h.gd_sectors();
    let gt_sectors = h.gt_sectors();
    let n = h.num_gdes();
    let write_dir = |dir_start: u64| -> Result<()> {
        let first_gt = dir_start + gd_sectors;
        let mut bytes = Vec::with_capacity((gd_sectors * SECTOR_SIZE) as usize);
        for i in 0..n {
            let gt = u32::try_from(first_gt + i * gt_sectors).map_err(|_| {
                Error::new(ErrorKind::FileTooBig, "grain tables would lie beyond 2 TiB")
            })?;
            bytes.extend_from_slice(&gt.to_le_bytes());
        }
        storage
            .write_all_at(&bytes, dir_start * SECTOR_SIZE)
            .map_err(io)
    };
    if h.has_redundant_gd() {
        write_dir(h.rgd_offset)?;
    }
    write_dir(h.gd_offset)?;
    if let Some(text) = descriptor {
        let area = (h.descriptor_size * SECTOR_SIZE) as usize;
        if text.len() > area {
            return Err(Error::new(
                ErrorKind::FileTooBig,
                "descriptor does not fit the embedded area",
            ));
        }
        storage
            .write_all_at(text, h.descriptor_offset * SECTOR_SIZE)
            .map_err(io)?;
    }
    storage.set_len(h.overhead * SECTOR_SIZE).map_err(io)?;
    storage.write_all_at(&h.to_bytes(), 0).map_err(io)?;
    storage.sync().map_err(io)
}
