//! Checking flat (`FLAT`, `VMFS`) extents: the file must hold the whole extent.
//!
//! A file shorter than its extent (a copy that stopped early) is repaired by
//! extending it: the missing part reads as zeros. But the size comes from the
//! descriptor's extent line, which can itself be what is damaged: a flipped digit
//! would make repair extend a small file to terabytes. So the file is only extended
//! when the size is plausible - the descriptor's recorded geometry is the one a disk
//! of the descriptor's total size gets, or the file already holds at least half of
//! what the line asks for; otherwise the finding says the line looks damaged and
//! nothing is written.

use std::path::Path;

use super::report::{CheckReport, Finding};
use crate::descriptor::Descriptor;
use crate::error::{Error, Result};
use crate::geometry::{AdapterType, Geometry};
use crate::limits::SECTOR_SIZE;
use crate::storage::{FileStorage, Storage};

/// Whether the descriptor's recorded geometry is the one VMware gives a disk of the
/// size its extent lines add up to (so those sizes were not damaged afterwards).
pub(super) fn geometry_confirms(d: &Descriptor) -> Option<bool> {
    let total = d
        .extents()
        .iter()
        .try_fold(0u64, |acc, e| acc.checked_add(e.sectors))?;
    let field = |k: &str| d.ddb(k).and_then(|v| v.trim().parse::<u32>().ok());
    let recorded = Geometry {
        cylinders: field("ddb.geometry.cylinders")?,
        heads: field("ddb.geometry.heads")?,
        sectors: field("ddb.geometry.sectors")?,
    };
    let adapter = d
        .ddb("ddb.adapterType")
        .and_then(|a| a.parse::<AdapterType>().ok())
        .unwrap_or(AdapterType::LsiLogic);
    Some(Geometry::for_new_disk(total, adapter) == recorded)
}

/// Checks that the flat file `p` holds `[offset, offset + sectors)` sectors;
/// repairs by extending it when that is plausible. Returns whether it wrote.
pub(super) fn check_flat(
    p: &Path,
    storage: &FileStorage,
    offset: u64,
    sectors: u64,
    d: &Descriptor,
    repair: bool,
    report: &mut CheckReport,
) -> Result<bool> {
    let Some(need) = offset
        .checked_add(sectors)
        .and_then(|s| s.checked_mul(SECTOR_SIZE))
    else {
        report.push(Finding::fatal(
            p,
            format!("the extent line's offset {offset} and size {sectors} sectors overflow"),
        ));
        return Ok(false);
    };
    let have = storage
        .len()
        .map_err(|e| Error::io(format!("cannot read the size of {}", p.display()), e))?;
    if have >= need {
        return Ok(false);
    }
    let confirmed = geometry_confirms(d);
    if confirmed != Some(true) && have < need / 2 {
        let why = match confirmed {
            Some(false) => {
                "the descriptor's geometry does not match the size its extent lines add up to"
            }
            _ => "the descriptor records no geometry to confirm the size",
        };
        report.push(Finding::fatal(
            p,
            format!(
                "the flat extent file is {have} bytes, but its extent line asks for {need} bytes; {why}, so the extent line may be damaged (fix the descriptor, or extend the file by hand if the size is right)"
            ),
        ));
        return Ok(false);
    }
    report.push(Finding::fixable(
        p,
        format!(
            "the flat extent file is {have} bytes, shorter than the {need} bytes its extent needs"
        ),
        format!("extend the file to {need} bytes (the missing part reads as zeros)"),
    ));
    if repair {
        storage
            .set_len(need)
            .and_then(|()| storage.sync())
            .map_err(|e| Error::io(format!("cannot extend {}", p.display()), e))?;
    }
    Ok(repair)
}
