//! vdisk extensions for changed-block tracking (not in VDDK, whose backups get
//! changed areas from vSphere's QueryChangedDiskAreas): turn tracking on or off for a
//! local disk, read a disk's change ID, and list the areas changed since one. The
//! `VdiskExt_` prefix keeps them apart from VMware's names.
//!
//! A refused change ID (the disk's tracking was restarted or cannot be trusted: an
//! unclean shutdown, a write by a program that does not track) is the error
//! `VDISK_E_CHANGE_ID_REFUSED`: the caller falls back to a full backup.

use std::ffi::c_char;

use vdisk::cbt;

use crate::api_io::block_list_out;
use crate::errors::{VIX_E_INVALID_ARG, VIX_E_NOT_SUPPORTED};
use crate::state;
use crate::types::{
    Bool, VixDiskLibBlock, VixDiskLibBlockList, VixDiskLibConnection, VixDiskLibHandle,
    VixDiskLibSectorType, VixError,
};
use crate::{c_path, c_str, guard, malloc_str, ok, FfiError};

/// Bytes per sector.
const SECTOR: u64 = 512;

/// vdisk extension: turns changed-block tracking on (`enable` TRUE) or off for the
/// local disk at `path` (it must not be open for writing elsewhere; a remote
/// connection is `VIX_E_NOT_SUPPORTED`: the server's disk is tracked where it is). Turning it on
/// starts a new history; on an already tracked disk it does nothing.
///
/// # Safety
/// `path` must be a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn VdiskExt_EnableChangeTracking(
    connection: VixDiskLibConnection,
    path: *const c_char,
    enable: Bool,
) -> VixError {
    guard("VdiskExt_EnableChangeTracking", || {
        crate::api_ops::local_connection(connection, "VdiskExt_EnableChangeTracking")?;
        let (_, conn) = state::connection(connection as usize)?;
        if conn.read_only {
            return Err(FfiError::new(
                VIX_E_NOT_SUPPORTED,
                "the connection is read-only",
            ));
        }
        // SAFETY: the caller passes a NUL-terminated string (NULL is refused).
        let path = unsafe { c_path(path, "path") }?;
        if enable != 0 {
            cbt::enable(&path)?;
        } else {
            cbt::disable(&path)?;
        }
        ok()
    })
}

/// vdisk extension: the change ID of the disk's current state (`EPOCH/SEQ`), which a
/// backup of what the handle reads now records for its next incremental. On a handle
/// open for writing this also starts a new tracking session. `*changeId` comes from
/// `malloc` (free it with `free`) and is NULL on failure. Errors:
/// `VIX_E_NOT_SUPPORTED` if tracking is off, `VDISK_E_CHANGE_ID_REFUSED` if it
/// cannot be trusted.
///
/// # Safety
/// `changeId` must be a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn VdiskExt_GetChangeId(
    diskHandle: VixDiskLibHandle,
    changeId: *mut *mut c_char,
) -> VixError {
    guard("VdiskExt_GetChangeId", || {
        if changeId.is_null() {
            return Err(FfiError::new(VIX_E_INVALID_ARG, "changeId is NULL"));
        }
        // SAFETY: non-NULL out pointer given by the caller: NULL until success.
        unsafe { *changeId = std::ptr::null_mut() };
        let h = state::disk(diskHandle as usize)?;
        let id = h.with_virtual(|d| Ok(d.change_id()?))?;
        let p = malloc_str(&id)?;
        // SAFETY: non-NULL out pointer given by the caller.
        unsafe { *changeId = p };
        ok()
    })
}

/// vdisk extension, after vSphere's QueryChangedDiskAreas: the areas of
/// `[startSector, startSector+numSectors)` written after change ID `changeId` (or,
/// with `"*"`, every area holding data), in sectors, sorted and merged, clipped to the
/// range and to the disk. The list comes from `malloc`: free it with
/// `VixDiskLib_FreeBlockList`; `*blockList` is NULL on failure. Errors:
/// `VIX_E_INVALID_ARG` for a malformed ID, `VIX_E_NOT_SUPPORTED` if tracking is off,
/// `VDISK_E_CHANGE_ID_REFUSED` if the ID cannot be used (take a full backup).
///
/// # Safety
/// `changeId` must be a NUL-terminated string, `blockList` a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn VdiskExt_QueryChangedAreas(
    diskHandle: VixDiskLibHandle,
    changeId: *const c_char,
    startSector: VixDiskLibSectorType,
    numSectors: VixDiskLibSectorType,
    blockList: *mut *mut VixDiskLibBlockList,
) -> VixError {
    guard("VdiskExt_QueryChangedAreas", || {
        if blockList.is_null() {
            return Err(FfiError::new(VIX_E_INVALID_ARG, "blockList is NULL"));
        }
        // SAFETY: non-NULL out pointer given by the caller: NULL until success.
        unsafe { *blockList = std::ptr::null_mut() };
        // SAFETY: the caller passes a NUL-terminated string (NULL is refused).
        let id = unsafe { c_str(changeId, "changeId") }?
            .to_str()
            .map_err(|_| FfiError::new(VIX_E_INVALID_ARG, "changeId is not UTF-8"))?
            .to_string();
        let h = state::disk(diskHandle as usize)?;
        let blocks = h.with_virtual(|d| {
            let start = startSector.saturating_mul(SECTOR);
            let len = numSectors.saturating_mul(SECTOR);
            let mut out: Vec<VixDiskLibBlock> = Vec::new();
            d.for_each_changed_area(&id, start, len, &mut |off, l| {
                let s = off / SECTOR;
                let e = (off + l).div_ceil(SECTOR);
                match out.last_mut() {
                    Some(b) if b.offset + b.length >= s => b.length = e - b.offset,
                    _ => out.push(VixDiskLibBlock {
                        offset: s,
                        length: e - s,
                    }),
                }
                Ok(())
            })?;
            Ok(out)
        })?;
        block_list_out(blocks, blockList)
    })
}
