//! Creating a child (delta) link on top of a disk: VDDK's `CreateChild`, what a
//! snapshot does. The parent is opened read-only and never changed; the child starts
//! empty (every range falls through to the parent), with `parentCID` set to the
//! parent's CID and `parentFileNameHint` naming it relative to the child's folder.

use std::path::{Component, Path, PathBuf};

use crate::descriptor::{CreateType, Descriptor, ExtentKind};
use crate::disk::Disk;
use crate::disk_type::DiskType;
use crate::error::{Error, ErrorKind, Result};
use crate::extent::sparse::cowd::{CowdHeader, COWD_MAX_SECTORS};
use crate::extent::sparse::header::new_sparse_header;
use crate::ids;
use crate::limits::SECTOR_SIZE;
use crate::ops::create::{
    base_name, extent, refuse_existing, split, write_descriptor_file, write_new_sparse, Created,
    DEFAULT_GRAIN_SECTORS,
};
use crate::storage::Storage;

/// The delta type that suits a parent: ESX types get an ESX delta (seSparse above
/// 2 TiB, where vmfsSparse cannot go), split hosted disks a split child, everything
/// else a monolithicSparse child.
pub fn default_child_type(parent_create_type: &CreateType, capacity: u64) -> DiskType {
    match parent_create_type {
        CreateType::SeSparse => DiskType::SeSparse,
        CreateType::Vmfs
        | CreateType::VmfsThin
        | CreateType::VmfsThick
        | CreateType::VmfsPreallocated
        | CreateType::VmfsEagerZeroedThick
        | CreateType::VmfsSparse => {
            if capacity / SECTOR_SIZE > COWD_MAX_SECTORS {
                DiskType::SeSparse
            } else {
                DiskType::VmfsSparse
            }
        }
        CreateType::TwoGbMaxExtentSparse | CreateType::TwoGbMaxExtentFlat => {
            DiskType::TwoGbMaxExtentSparse
        }
        _ => DiskType::MonolithicSparse,
    }
}

/// The name VMware gives the next snapshot of `parent`: `disk.vmdk` ->
/// `disk-000001.vmdk`, `disk-000001.vmdk` -> `disk-000002.vmdk` (skipping names
/// that exist).
pub fn next_child_name(parent: &Path) -> Result<PathBuf> {
    let (dir, stem) = base_name(parent)?;
    let (root, mut n) = match stem.rsplit_once('-') {
        Some((root, num)) if num.len() == 6 && num.bytes().all(|b| b.is_ascii_digit()) => {
            (root.to_string(), num.parse::<u32>().unwrap_or(0))
        }
        _ => (stem.clone(), 0),
    };
    loop {
        n += 1;
        let p = dir.join(format!("{root}-{n:06}.vmdk"));
        if !p.exists() {
            return Ok(p);
        }
        if n >= 999_999 {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("no free snapshot name left for {}", parent.display()),
            ));
        }
    }
}

/// How `to` is named from the folder of `from`: relative when it lies in or below
/// that folder (or one of its parents), absolute otherwise.
pub fn relative_name(from_dir: &Path, to: &Path) -> String {
    let abs = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let base = abs(if from_dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        from_dir
    });
    let target = abs(to);
    let b: Vec<Component> = base.components().collect();
    let t: Vec<Component> = target.components().collect();
    let common = b.iter().zip(&t).take_while(|(x, y)| x == y).count();
    if common == 0 {
        return target.display().to_string();
    }
    let mut rel = PathBuf::new();
    for _ in common..b.len() {
        rel.push("..");
    }
    for c in &t[common..] {
        rel.push(c);
    }
    rel.display().to_string()
}

/// Creates an empty child of the disk at `parent` at `child` (which must not exist),
/// of `disk_type`: monolithicSparse, twoGbMaxExtentSparse, vmfsSparse or seSparse.
pub fn create_child(parent: &Path, child: &Path, disk_type: DiskType) -> Result<()> {
    create_child_inner(parent, child, disk_type).map_err(|e| e.within(child.display()))
}

fn create_child_inner(parent: &Path, child: &Path, disk_type: DiskType) -> Result<()> {
    let disk = Disk::open(parent)?;
    create_child_from(&disk, parent, child, disk_type)
}

/// Like [`create_child`], for a parent that is already open (VDDK's CreateChild on a
/// disk handle): the child names `parent_path` and takes the open disk's current CID.
pub fn create_child_of(
    disk: &Disk,
    parent_path: &Path,
    child: &Path,
    disk_type: DiskType,
) -> Result<()> {
    disk.flush()?;
    create_child_from(disk, parent_path, child, disk_type).map_err(|e| e.within(child.display()))
}

fn create_child_from(disk: &Disk, parent: &Path, child: &Path, disk_type: DiskType) -> Result<()> {
    let (capacity, parent_cid, ddb) = {
        let top = disk
            .links()
            .iter()
            .find(|l| !l.is_redo_log())
            .unwrap_or(&disk.links()[0]);
        let d = top.descriptor()?;
        let cid = d
            .cid()
            .ok_or_else(|| Error::invalid(format!("{} has no CID", parent.display())))?;
        let mut ddb: Vec<(String, String)> = Vec::new();
        for key in [
            "ddb.adapterType",
            "ddb.geometry.cylinders",
            "ddb.geometry.heads",
            "ddb.geometry.sectors",
            "ddb.virtualHWVersion",
            "ddb.uuid",
        ] {
            if let Some(v) = d.ddb(key) {
                ddb.push((key.to_string(), v.to_string()));
            }
        }
        (disk.capacity(), cid, ddb)
    };
    let sectors = capacity / SECTOR_SIZE;
    let (dir, stem) = base_name(child)?;
    refuse_existing(child)?;
    let cid = ids::new_cid();
    let mut ddb = ddb;
    ddb.push(("ddb.longContentID".into(), ids::long_content_id(cid)));
    let hint = relative_name(&dir, parent);
    let mut created = Created::default();
    let (extents, embedded) = match disk_type {
        DiskType::MonolithicSparse => {
            let name = child
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            (vec![extent(sectors, ExtentKind::Sparse, &name, None)], true)
        }
        DiskType::TwoGbMaxExtentSparse => {
            let mut v = Vec::new();
            for (i, n) in split(sectors).enumerate() {
                let name = format!("{stem}-s{:03}.vmdk", i + 1);
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
        DiskType::VmfsSparse => {
            let name = format!("{stem}-delta.vmdk");
            let header = CowdHeader::new(sectors)?;
            let storage = created.new_file(&dir.join(&name))?;
            let end = u64::from(header.free_sector) * SECTOR_SIZE;
            storage
                .write_all_at(&header.to_bytes(), 0)
                .and_then(|()| storage.set_len(end))
                .and_then(|()| storage.sync())
                .map_err(|e| Error::io(format!("cannot write {name}"), e))?;
            (vec![extent(sectors, ExtentKind::VmfsSparse, &name, None)], false)
        }
        DiskType::SeSparse => {
            let name = format!("{stem}-sesparse.vmdk");
            let storage = created.new_file(&dir.join(&name))?;
            crate::extent::sesparse::create_sesparse(&storage, sectors)?;
            (vec![extent(sectors, ExtentKind::SeSparse, &name, None)], false)
        }
        other => {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "a child disk must be growable (monolithicSparse, twoGbMaxExtentSparse, vmfsSparse or seSparse), not {other}"
                ),
            ))
        }
    };
    let ddb_refs: Vec<(&str, &str)> = ddb.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let descriptor = Descriptor::new(
        &disk_type.create_type(),
        cid,
        parent_cid,
        Some(&hint),
        &extents,
        &ddb_refs,
    );
    write_descriptor_file(
        &mut created,
        child,
        &descriptor,
        embedded.then_some(sectors),
    )?;
    created.keep();
    // A tracked parent's history goes on in the child.
    crate::cbt::inherit(disk, child)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_names_follow_vmware() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("disk.vmdk");
        assert_eq!(
            next_child_name(&base).unwrap(),
            dir.path().join("disk-000001.vmdk")
        );
        std::fs::write(dir.path().join("disk-000001.vmdk"), b"x").unwrap();
        assert_eq!(
            next_child_name(&base).unwrap(),
            dir.path().join("disk-000002.vmdk")
        );
        let child = dir.path().join("disk-000002.vmdk");
        assert_eq!(
            next_child_name(&child).unwrap(),
            dir.path().join("disk-000003.vmdk")
        );
    }

    #[test]
    fn parent_names_are_relative_to_the_child() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let base = dir.path().join("base.vmdk");
        std::fs::write(&base, b"x").unwrap();
        assert_eq!(relative_name(dir.path(), &base), "base.vmdk");
        assert_eq!(
            relative_name(&dir.path().join("sub"), &base),
            "../base.vmdk"
        );
    }
}
