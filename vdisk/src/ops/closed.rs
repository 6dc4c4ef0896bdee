//! A closed disk link taken apart for the maintenance operations (grow, shrink,
//! defragment): its descriptor, and each extent file opened for writing under an
//! exclusive lock.
//!
//! The link is first opened through the normal path, read-only, so everything the
//! reader validates (descriptor, extent files, directories) is validated here too;
//! then every file is reopened exclusively, so no other user can have the disk open
//! while its files are rewritten.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::descriptor::{CreateType, Descriptor, ExtentKind, ExtentLine};
use crate::disk::Disk;
use crate::error::{Error, ErrorKind, Result};
use crate::extent::sparse::offline::SparseFile;
use crate::extent::Extent;
use crate::storage::{FileStorage, LockMode};

/// What kind of file backs an extent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClosedKind {
    /// Hosted sparse (`KDMV`) file.
    Sparse,
    /// streamOptimized file.
    Stream,
    /// Flat or VMFS file.
    Flat,
    /// `ZERO` extent (no file).
    Zero,
    /// ESXi seSparse file (no maintenance operations).
    SeSparse,
}

/// One extent of a closed link.
#[derive(Debug)]
pub struct ClosedExtent {
    /// The descriptor's line.
    pub line: ExtentLine,
    /// The file, resolved (None for ZERO extents).
    pub path: Option<PathBuf>,
    /// What the file is.
    pub kind: ClosedKind,
}

/// A link whose files are locked exclusively by this process.
#[derive(Debug)]
pub struct ClosedLink {
    /// Descriptor (or monolithic file) path.
    pub path: PathBuf,
    /// The descriptor.
    pub descriptor: Descriptor,
    /// `createType`.
    pub create_type: CreateType,
    /// Whether the descriptor is embedded in the (single) sparse extent.
    pub embedded: bool,
    /// The extents, in order.
    pub extents: Vec<ClosedExtent>,
    /// The separate descriptor file, open and locked (None when embedded); a
    /// rewrite replaces it with the new file, locked the same way.
    descriptor_file: Option<Mutex<FileStorage>>,
}

impl ClosedLink {
    /// Opens the link at `path` for maintenance. Disks with a parent are refused.
    pub fn open(path: &Path) -> Result<ClosedLink> {
        let (descriptor, embedded, extents) = {
            let disk = Disk::open(path)?;
            if disk.links().len() != 1 {
                return Err(Error::new(
                    ErrorKind::NotSupported,
                    "this operation works on a disk without snapshots (delta links)",
                ));
            }
            let link = &disk.links()[0];
            let descriptor = link.descriptor()?.clone();
            let extents: Vec<ClosedExtent> = link
                .extents()
                .iter()
                .map(|e| ClosedExtent {
                    line: e.line.clone(),
                    path: e.path.clone(),
                    kind: match (&e.extent, &e.line.kind) {
                        (Extent::Sparse(_), _) => ClosedKind::Sparse,
                        (Extent::Stream(_), _) => ClosedKind::Stream,
                        (Extent::SeSparse(_), _) => ClosedKind::SeSparse,
                        (Extent::Zero { .. }, _) | (_, ExtentKind::Zero) => ClosedKind::Zero,
                        (Extent::Flat(_), _) => ClosedKind::Flat,
                    },
                })
                .collect();
            (descriptor, link.has_embedded_descriptor(), extents)
        };
        let create_type = descriptor
            .create_type()
            .ok_or_else(|| Error::invalid("the descriptor has no createType"))?;
        let descriptor_file = if embedded {
            None
        } else {
            Some(Mutex::new(FileStorage::open(
                path,
                true,
                LockMode::Exclusive,
            )?))
        };
        Ok(ClosedLink {
            path: path.to_path_buf(),
            descriptor,
            create_type,
            embedded,
            extents,
            descriptor_file,
        })
    }

    /// Opens extent `index` (a sparse one) for maintenance, exclusively locked, and
    /// refuses a file left open by a crashed writer (it must be checked first).
    pub fn open_sparse(&self, index: usize) -> Result<SparseFile> {
        let p = self.extent_path(index)?;
        let f = SparseFile::open(FileStorage::open(p, true, LockMode::Exclusive)?)?;
        if f.header.unclean_shutdown {
            return Err(Error::new(
                ErrorKind::NeedsRepair,
                format!(
                    "{} was not closed cleanly; check and repair it first (vdiskmanager -R)",
                    p.display()
                ),
            ));
        }
        Ok(f)
    }

    /// Opens every hosted sparse extent for maintenance (ZERO extents are skipped);
    /// any other kind of extent is refused with the error `refuse` gives for it,
    /// before any file is opened for writing.
    pub fn sparse_files(&self, refuse: impl Fn(ClosedKind) -> Error) -> Result<Vec<SparseFile>> {
        if let Some(e) = self
            .extents
            .iter()
            .find(|e| !matches!(e.kind, ClosedKind::Sparse | ClosedKind::Zero))
        {
            return Err(refuse(e.kind));
        }
        (0..self.extents.len())
            .filter(|&i| self.extents[i].kind == ClosedKind::Sparse)
            .map(|i| self.open_sparse(i))
            .collect()
    }

    /// The file of extent `index`.
    pub fn extent_path(&self, index: usize) -> Result<&Path> {
        self.extents
            .get(index)
            .and_then(|e| e.path.as_deref())
            .ok_or_else(|| Error::new(ErrorKind::Fail, format!("extent {index} has no file")))
    }

    /// Writes `d` back as the link's descriptor, as [`crate::link::Link::save_descriptor`]
    /// does: a descriptor file is replaced whole, an embedded one rewritten in place
    /// in a kill-safe order; `embedded_in` must be the opened monolithic file when
    /// the descriptor is embedded.
    pub fn save_descriptor(&self, d: &Descriptor, embedded_in: Option<&SparseFile>) -> Result<()> {
        let bytes = d.to_bytes();
        match (&self.descriptor_file, embedded_in) {
            (Some(file), _) => crate::replace::rewrite_open_file(file, &bytes),
            (None, Some(f)) => crate::extent::sparse::write_descriptor_area(
                &f.storage,
                &f.header,
                &bytes,
                &self.path.display().to_string(),
            ),
            (None, None) => Err(Error::new(
                ErrorKind::Fail,
                "an embedded descriptor needs its sparse file to be saved",
            )),
        }
    }
}
