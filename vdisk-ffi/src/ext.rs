//! vdisk extensions: two functions that are not part of VDDK's API, for
//! `libvixMntapi.so` (vdisk-ffi/mntapi).
//!
//! The mount library is a separate shared object with its own handle registries,
//! so it cannot look a `VixDiskLibConnection` or `VixDiskLibHandle` up itself. It
//! finds these functions at run time in the `libvixDiskLib.so.8` already loaded in
//! the process (`dlopen` with `RTLD_NOLOAD`, then `dlsym`) and asks them. The
//! `VdiskExt_` prefix keeps them apart from VMware's names.
#![allow(non_snake_case)]

use std::ffi::c_char;
use std::os::unix::ffi::OsStrExt;

use crate::errors::VIX_E_INVALID_ARG;
use crate::state;
use crate::types::{uint32, Bool, VixDiskLibConnection, VixDiskLibHandle, VixError};
use crate::{guard, malloc_bytes, ok, FfiError};

/// vdisk extension (not in VDDK): whether `connection` is a live connection of this
/// library, and if so whether it was made read-only (`ConnectEx` with `readOnly`).
/// Every connection of this library is local. Returns `VIX_OK`, or
/// `VIX_E_DISK_INVALID_CONNECTION` for a NULL, unknown or disconnected handle.
///
/// # Safety
/// `readOnly` must be NULL or a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn VdiskExt_GetConnectionInfo(
    connection: VixDiskLibConnection,
    readOnly: *mut Bool,
) -> VixError {
    guard("VdiskExt_GetConnectionInfo", || {
        let (_, conn) = state::connection(connection as usize)?;
        if !readOnly.is_null() {
            // SAFETY: non-NULL out pointer given by the caller.
            unsafe { *readOnly = Bool::from(conn.read_only) };
        }
        ok()
    })
}

/// vdisk extension (not in VDDK): the path a disk handle was opened with (as given
/// to `VixDiskLib_Open`, in memory from `malloc` that the caller frees with `free`)
/// and its `VIXDISKLIB_FLAG_OPEN_*` flags (read-only included when the connection is
/// read-only). Returns `VIX_E_INVALID_ARG` for a NULL, unknown or closed handle;
/// `*path` is NULL on failure.
///
/// # Safety
/// `path` must be a valid pointer; `openFlags` NULL or a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn VdiskExt_GetDiskHandleInfo(
    diskHandle: VixDiskLibHandle,
    path: *mut *mut c_char,
    openFlags: *mut uint32,
) -> VixError {
    guard("VdiskExt_GetDiskHandleInfo", || {
        if path.is_null() {
            return Err(FfiError::new(VIX_E_INVALID_ARG, "path is NULL"));
        }
        // SAFETY: non-NULL out pointer given by the caller: NULL until success.
        unsafe { *path = std::ptr::null_mut() };
        let h = state::disk(diskHandle as usize)?;
        // A handle that Attach made invalid has no disk any more.
        h.with_virtual(|_| Ok(()))?;
        let copy = malloc_bytes(h.path.as_os_str().as_bytes())?;
        if !openFlags.is_null() {
            // SAFETY: non-NULL out pointer given by the caller.
            unsafe { *openFlags = h.flags };
        }
        // SAFETY: non-NULL out pointer given by the caller.
        unsafe { *path = copy };
        ok()
    })
}
