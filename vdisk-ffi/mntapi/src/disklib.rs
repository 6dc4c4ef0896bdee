//! The link to libvixDiskLib: checking the connections and disk handles clients
//! pass in.
//!
//! Those handles are IDs in the registries of `libvixDiskLib.so.8`, a separate
//! shared object, so this library asks it: it finds vdisk-ffi's extension
//! functions (`VdiskExt_GetConnectionInfo`, `VdiskExt_GetDiskHandleInfo`, and for
//! disks on remote connections `VdiskExt_GetConnectionRemoteSpec` and
//! `VdiskExt_GetDiskHandleRemoteSpec`, which describe how the export is reached as
//! the text of `vdisk_nbd::client::RemoteSpec`) in the
//! copy already loaded in the process - `dlopen("libvixDiskLib.so.8", RTLD_NOLOAD)`
//! (glibc also matches the SONAME of a library loaded under another file name), or,
//! when it is not loaded as a shared object, the global scope (a program linked with
//! `libvixDiskLib.a` and `-rdynamic`). Nothing is ever loaded here: as with VDDK,
//! VixDiskLib must be loaded and initialised before the mount library is used. A
//! libvixDiskLib without these functions (VMware's) gives a clear error.

use std::ffi::{c_char, c_void, CStr, CString, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use vdisk_nbd::client::RemoteSpec;

use crate::errors::{VIX_E_DISK_INVALID_CONNECTION, VIX_E_DISK_NOINIT, VIX_E_FAIL, VIX_OK};
use crate::types::{uint32, Bool, VixDiskLibConnection, VixDiskLibHandle, VixError};
use crate::FfiError;

/// The SONAME of the disk library.
const SONAME: &CStr = c"libvixDiskLib.so.8";

/// `VdiskExt_GetConnectionInfo` as `vixDiskLib.h` declares it.
type GetConnectionInfoFn = unsafe extern "C" fn(VixDiskLibConnection, *mut Bool) -> VixError;
/// `VdiskExt_GetDiskHandleInfo` as `vixDiskLib.h` declares it.
type GetDiskHandleInfoFn =
    unsafe extern "C" fn(VixDiskLibHandle, *mut *mut c_char, *mut uint32) -> VixError;
/// `VdiskExt_GetConnectionRemoteSpec` as `vixDiskLib.h` declares it.
type GetConnectionRemoteSpecFn =
    unsafe extern "C" fn(VixDiskLibConnection, *const c_char, *mut *mut c_char) -> VixError;
/// `VdiskExt_GetDiskHandleRemoteSpec` as `vixDiskLib.h` declares it.
type GetDiskHandleRemoteSpecFn =
    unsafe extern "C" fn(VixDiskLibHandle, *mut *mut c_char) -> VixError;

/// A reference to the loaded disk library (from `dlopen` with `RTLD_NOLOAD`),
/// released on drop; or the global scope.
struct Library(*mut c_void);

impl Library {
    /// The loaded `libvixDiskLib.so.8`, or the global scope when it is not loaded
    /// as a shared object.
    fn find() -> Library {
        // SAFETY: RTLD_NOLOAD never loads (so no constructor runs): it only takes a
        // reference to an object already loaded; the name is NUL-terminated.
        let handle = unsafe { libc::dlopen(SONAME.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
        if handle.is_null() {
            Library(libc::RTLD_DEFAULT)
        } else {
            Library(handle)
        }
    }

    fn is_loaded_object(&self) -> bool {
        self.0 != libc::RTLD_DEFAULT
    }

    /// The address of `name`, or an error saying what is missing.
    fn symbol(&self, name: &CStr) -> Result<*mut c_void, FfiError> {
        // SAFETY: `self.0` is a handle from dlopen (alive until drop) or
        // RTLD_DEFAULT; `name` is NUL-terminated.
        let p = unsafe { libc::dlsym(self.0, name.as_ptr()) };
        if !p.is_null() {
            return Ok(p);
        }
        let name = name.to_string_lossy();
        Err(if self.is_loaded_object() {
            FfiError::new(
                VIX_E_DISK_NOINIT,
                format!(
                    "the libvixDiskLib.so.8 loaded in this process has no {name}: \
                     libvixMntapi from vdisk works with vdisk's libvixDiskLib only"
                ),
            )
        } else {
            FfiError::new(
                VIX_E_DISK_NOINIT,
                "libvixDiskLib.so.8 is not loaded in this process: load it and call \
                 VixDiskLib_InitEx and VixDiskLib_Connect before the mount library",
            )
        })
    }
}

impl Drop for Library {
    fn drop(&mut self) {
        if self.is_loaded_object() {
            // SAFETY: a handle from a successful dlopen, released once; no pointer
            // obtained through it is used after this.
            unsafe { libc::dlclose(self.0) };
        }
    }
}

/// Checks that `connection` is a live connection of the disk library; returns
/// whether it is read-only.
pub(crate) fn connection_read_only(connection: VixDiskLibConnection) -> Result<bool, FfiError> {
    if connection.is_null() {
        return Err(FfiError::new(
            VIX_E_DISK_INVALID_CONNECTION,
            "connection is NULL",
        ));
    }
    let lib = Library::find();
    let sym = lib.symbol(c"VdiskExt_GetConnectionInfo")?;
    // SAFETY: the symbol is vdisk-ffi's VdiskExt_GetConnectionInfo, whose C type
    // (vixDiskLib.h) is exactly GetConnectionInfoFn; `lib` keeps it loaded.
    let f = unsafe { std::mem::transmute::<*mut c_void, GetConnectionInfoFn>(sym) };
    let mut read_only: Bool = 0;
    // SAFETY: the function only looks `connection` up in a registry (any value is
    // safe) and writes one Bool to the valid pointer given.
    let code = unsafe { f(connection, &mut read_only) };
    if code != VIX_OK {
        return Err(FfiError::new(
            code,
            "invalid connection (NULL, never connected, or disconnected)",
        ));
    }
    Ok(read_only != 0)
}

/// The path and open flags of a disk handle of the disk library.
pub(crate) fn disk_handle(handle: VixDiskLibHandle) -> Result<(PathBuf, u32), FfiError> {
    let lib = Library::find();
    let sym = lib.symbol(c"VdiskExt_GetDiskHandleInfo")?;
    // SAFETY: the symbol is vdisk-ffi's VdiskExt_GetDiskHandleInfo, whose C type
    // (vixDiskLib.h) is exactly GetDiskHandleInfoFn; `lib` keeps it loaded.
    let f = unsafe { std::mem::transmute::<*mut c_void, GetDiskHandleInfoFn>(sym) };
    let mut path: *mut c_char = std::ptr::null_mut();
    let mut flags: uint32 = 0;
    // SAFETY: the function only looks `handle` up in a registry (any value is safe)
    // and writes through the two valid pointers given.
    let code = unsafe { f(handle, &mut path, &mut flags) };
    if code != VIX_OK {
        return Err(FfiError::new(
            code,
            "invalid disk handle (NULL, never opened, or closed)",
        ));
    }
    if path.is_null() {
        return Err(FfiError::new(
            VIX_E_FAIL,
            "VdiskExt_GetDiskHandleInfo returned no path",
        ));
    }
    // SAFETY: on success `path` is a NUL-terminated string from malloc, ours to free.
    let bytes = unsafe { CStr::from_ptr(path) }.to_bytes().to_vec();
    // SAFETY: malloc'd by the disk library for us; freed once, not used after.
    unsafe { libc::free(path as *mut c_void) };
    Ok((PathBuf::from(OsString::from_vec(bytes)), flags))
}

/// Takes a string the disk library returned (malloc'd, or NULL) and frees it.
///
/// # Safety
/// `p` must be NULL or a NUL-terminated string from `malloc`, not used afterwards.
unsafe fn take_string(p: *mut c_char) -> Option<Vec<u8>> {
    if p.is_null() {
        return None;
    }
    // SAFETY: a NUL-terminated string per the contract.
    let bytes = unsafe { CStr::from_ptr(p) }.to_bytes().to_vec();
    // SAFETY: malloc'd by the disk library for us; freed once, not used after.
    unsafe { libc::free(p as *mut c_void) };
    Some(bytes)
}

/// Parses the remote description the disk library gave.
fn parse_spec(text: Option<Vec<u8>>) -> Result<Option<RemoteSpec>, FfiError> {
    text.map(|t| {
        RemoteSpec::from_text(&String::from_utf8_lossy(&t)).map_err(|e| {
            FfiError::new(
                VIX_E_FAIL,
                format!("the disk library described a remote disk badly: {e}"),
            )
        })
    })
    .transpose()
}

/// How the disk `path` is reached on `connection` when it is a remote connection
/// (`serverName` set), else None. A disk library without the function (an older
/// vdisk) has local connections only.
pub(crate) fn connection_remote_spec(
    connection: VixDiskLibConnection,
    path: &Path,
) -> Result<Option<RemoteSpec>, FfiError> {
    let lib = Library::find();
    let Ok(sym) = lib.symbol(c"VdiskExt_GetConnectionRemoteSpec") else {
        return Ok(None);
    };
    // SAFETY: the symbol is vdisk-ffi's VdiskExt_GetConnectionRemoteSpec, whose C
    // type (vixDiskLib.h) is exactly GetConnectionRemoteSpecFn; `lib` keeps it loaded.
    let f = unsafe { std::mem::transmute::<*mut c_void, GetConnectionRemoteSpecFn>(sym) };
    let name = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| FfiError::new(VIX_E_FAIL, "the disk name holds a NUL byte"))?;
    let mut spec: *mut c_char = std::ptr::null_mut();
    // SAFETY: the function looks `connection` up in a registry (any value is safe),
    // reads the NUL-terminated name and writes through the valid pointer given.
    let code = unsafe { f(connection, name.as_ptr(), &mut spec) };
    // SAFETY: NULL or a malloc'd string for us, taken once.
    let text = unsafe { take_string(spec) };
    if code != VIX_OK {
        return Err(FfiError::new(
            code,
            "invalid connection (NULL, never connected, or disconnected)",
        ));
    }
    parse_spec(text)
}

/// How the export of a disk handle opened through a remote connection is reached,
/// else None (a local disk).
pub(crate) fn disk_handle_remote_spec(
    handle: VixDiskLibHandle,
) -> Result<Option<RemoteSpec>, FfiError> {
    let lib = Library::find();
    let Ok(sym) = lib.symbol(c"VdiskExt_GetDiskHandleRemoteSpec") else {
        return Ok(None);
    };
    // SAFETY: the symbol is vdisk-ffi's VdiskExt_GetDiskHandleRemoteSpec, whose C
    // type (vixDiskLib.h) is exactly GetDiskHandleRemoteSpecFn; `lib` keeps it loaded.
    let f = unsafe { std::mem::transmute::<*mut c_void, GetDiskHandleRemoteSpecFn>(sym) };
    let mut spec: *mut c_char = std::ptr::null_mut();
    // SAFETY: the function looks `handle` up in a registry (any value is safe) and
    // writes through the valid pointer given.
    let code = unsafe { f(handle, &mut spec) };
    // SAFETY: NULL or a malloc'd string for us, taken once.
    let text = unsafe { take_string(spec) };
    if code != VIX_OK {
        return Err(FfiError::new(
            code,
            "invalid disk handle (NULL, never opened, or closed)",
        ));
    }
    parse_spec(text)
}
