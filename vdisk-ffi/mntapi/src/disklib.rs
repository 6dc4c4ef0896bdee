//! The link to libvixDiskLib: checking the connections and disk handles clients
//! pass in.
//!
//! Those handles are IDs in the registries of `libvixDiskLib.so.8`, a separate
//! shared object, so this library asks it: it finds vdisk-ffi's two extension
//! functions (`VdiskExt_GetConnectionInfo`, `VdiskExt_GetDiskHandleInfo`) in the
//! copy already loaded in the process - `dlopen("libvixDiskLib.so.8", RTLD_NOLOAD)`
//! (glibc also matches the SONAME of a library loaded under another file name), or,
//! when it is not loaded as a shared object, the global scope (a program linked with
//! `libvixDiskLib.a` and `-rdynamic`). Nothing is ever loaded here: as with VDDK,
//! VixDiskLib must be loaded and initialised before the mount library is used. A
//! libvixDiskLib without these functions (VMware's) gives a clear error.

use std::ffi::{c_char, c_void, CStr, OsString};
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

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
