//! Attaching a child link on top of a parent (VDDK's `Attach`): the child's
//! `parentFileNameHint` and `parentCID` are set so that the child now continues the
//! parent's chain. Used to put a redo log back on the disk it was taken from.

use std::path::Path;

use crate::descriptor::ExtentKind;
use crate::disk::{Disk, OpenOptions};
use crate::error::{Error, ErrorKind, Result};
use crate::ops::child::relative_name;

/// Makes the disk at `child` (a sparse link) a child of the disk at `parent`. The
/// capacities must match; a link whose extents are not sparse cannot have a parent.
pub fn attach(child: &Path, parent: &Path) -> Result<()> {
    attach_inner(child, parent).map_err(|e| e.within(child.display()))
}

fn attach_inner(child: &Path, parent: &Path) -> Result<()> {
    let (parent_cid, parent_capacity) = {
        let p = Disk::open(parent)?;
        (p.cid()?, p.capacity())
    };
    let c = OpenOptions::new()
        .write(true)
        .single_link(true)
        .open(child)?;
    let link = &c.links()[0];
    if !link.extents().iter().all(|e| {
        matches!(
            e.line.kind,
            ExtentKind::Sparse | ExtentKind::VmfsSparse | ExtentKind::SeSparse
        )
    }) {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "only a sparse (delta) link can be attached to a parent",
        ));
    }
    if c.capacity() != parent_capacity {
        return Err(Error::new(
            ErrorKind::CapacityMismatch,
            format!(
                "the child holds {} bytes but the parent {}",
                c.capacity(),
                parent_capacity
            ),
        ));
    }
    let dir = child.parent().unwrap_or(Path::new("."));
    let hint = relative_name(dir, parent);
    {
        let mut d = link.descriptor()?;
        d.set_parent_cid(parent_cid);
        d.set_parent_file_name_hint(Some(&hint));
        link.save_descriptor(&d)?;
    }
    c.keep_cid();
    c.close()?;
    // The combined chain must open.
    Disk::open(child).map(drop)
}
