//! vdisk extensions: functions that are not part of VDDK's API, for
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
use crate::{c_path, guard, malloc_bytes, malloc_str, ok, FfiError};

/// vdisk extension (not in VDDK): whether `connection` is a live connection of this
/// library, and if so whether it was made read-only (`ConnectEx` with `readOnly`).
/// Returns `VIX_OK`, or
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

/// Writes the text of `spec` (or NULL for none) to `*out`.
///
/// # Safety
/// `out` must be a valid pointer.
unsafe fn put_spec(
    out: *mut *mut c_char,
    spec: Option<vdisk_nbd::client::RemoteSpec>,
) -> Result<(), FfiError> {
    let copy = match spec {
        Some(s) => malloc_str(&s.to_text())?,
        None => std::ptr::null_mut(),
    };
    // SAFETY: a valid out pointer per the contract.
    unsafe { *out = copy };
    Ok(())
}

/// vdisk extension (not in VDDK): for a connection made with `serverName` (the
/// `nbd` and `nbdssl` transports), how the disk `path` is reached on it - the
/// server, the export `path` names and the connection's options (TLS, pinned
/// thumbprint, read-only) - as the text of `vdisk_nbd::client::RemoteSpec`, in
/// memory from `malloc` that the caller frees with `free`; `*spec` is NULL for a
/// local connection. Nothing is opened. Returns `VIX_E_DISK_INVALID_CONNECTION` for
/// a NULL, unknown or disconnected connection, `VIX_E_INVALID_ARG` for a NULL or
/// empty path.
///
/// # Safety
/// `path` must be NULL or a NUL-terminated string; `spec` a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn VdiskExt_GetConnectionRemoteSpec(
    connection: VixDiskLibConnection,
    path: *const c_char,
    spec: *mut *mut c_char,
) -> VixError {
    guard("VdiskExt_GetConnectionRemoteSpec", || {
        if spec.is_null() {
            return Err(FfiError::new(VIX_E_INVALID_ARG, "spec is NULL"));
        }
        // SAFETY: non-NULL out pointer given by the caller: NULL until success.
        unsafe { *spec = std::ptr::null_mut() };
        let (_, conn) = state::connection(connection as usize)?;
        // SAFETY: NULL or NUL-terminated per the contract.
        let path = unsafe { c_path(path, "path") }?;
        let found = conn
            .remote
            .as_ref()
            .map(|server| crate::remote::spec_of(server, &path));
        // SAFETY: checked non-NULL above.
        unsafe { put_spec(spec, found) }?;
        ok()
    })
}

/// vdisk extension (not in VDDK): for a disk handle opened through a remote
/// connection, how its export is reached again (as
/// [`VdiskExt_GetConnectionRemoteSpec`], with the handle's own read-only choice);
/// `*spec` is NULL for a local disk. Returns `VIX_E_INVALID_ARG` for a NULL, unknown
/// or closed handle.
///
/// # Safety
/// `spec` must be a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn VdiskExt_GetDiskHandleRemoteSpec(
    diskHandle: VixDiskLibHandle,
    spec: *mut *mut c_char,
) -> VixError {
    guard("VdiskExt_GetDiskHandleRemoteSpec", || {
        if spec.is_null() {
            return Err(FfiError::new(VIX_E_INVALID_ARG, "spec is NULL"));
        }
        // SAFETY: non-NULL out pointer given by the caller: NULL until success.
        unsafe { *spec = std::ptr::null_mut() };
        let h = state::disk(diskHandle as usize)?;
        h.with_virtual(|_| Ok(()))?;
        let found = h.remote.as_ref().map(|r| r.disk.spec());
        // SAFETY: checked non-NULL above.
        unsafe { put_spec(spec, found) }?;
        ok()
    })
}
