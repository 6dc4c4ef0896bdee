//! # vdisk-mntapi: libvixMntapi
//!
//! VMware VDDK's disk mount API (`vixMntapi.h`) over `vdisk-mount`, for local disk
//! files: a drop-in `libvixMntapi.so.1` for programs written against VDDK's mount
//! library (VMware's `vix-mntapi-sample`, backup agents that read files out of
//! virtual disks).
//!
//! A disk set is one disk (on Linux VDDK takes exactly one); its volumes are the
//! partitions of its table (or a file system on the whole disk). `MountVolume`
//! mounts a volume's file system on a folder this library makes (FUSE serves the
//! disk, the kernel mounts the partition through a loop device: root only), and
//! `GetVolumeInfo` reports that folder as `symbolicLink`. `GetOsInfo` looks for
//! `etc/os-release` or `Windows/System32` in the volumes.
//!
//! Disk sets and volumes given to C are registry IDs, never pointers, so a NULL,
//! made-up, closed or stale handle is an error, never undefined behaviour; every
//! exported function catches panics; out pointers are NULL on failure; memory
//! returned to C comes from `malloc` and is freed by the matching `Free` function.
//! Connections and disk handles belong to `libvixDiskLib.so.8` and are checked by
//! asking it (see [`disklib`]).

#![allow(non_snake_case)]

pub mod api_lib;
pub mod api_set;
pub mod api_volume;
mod config;
mod disklib;
mod errors;
mod guest;
mod log;
mod mounter;
mod state;
pub mod types;
mod volumes;

use std::ffi::{c_char, CStr, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use errors::{VIX_E_FAIL, VIX_E_INVALID_ARG, VIX_E_OUT_OF_MEMORY, VIX_OK};
use types::VixError;

/// An error on its way to a C caller: the code, and the message logged for it.
#[derive(Debug)]
pub(crate) struct FfiError {
    /// The `VixError` returned.
    pub code: VixError,
    /// What is logged through the warning callback.
    pub message: String,
}

impl FfiError {
    /// An error with `code`.
    pub fn new(code: VixError, message: impl Into<String>) -> FfiError {
        FfiError {
            code,
            message: message.into(),
        }
    }
}

/// Runs the body of exported function `name`: panics are caught and reported
/// through the panic callback (`VIX_E_FAIL`), errors are logged through the warning
/// callback on the calling thread and turned into their code.
fn guard(name: &str, f: impl FnOnce() -> Result<(), FfiError>) -> VixError {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => VIX_OK,
        Ok(Err(e)) => {
            log::warn(&format!(
                "VixMntapi: {name}: {} (VixError {})",
                e.message, e.code
            ));
            e.code
        }
        Err(p) => {
            log::panic(&format!(
                "VixMntapi: {name}: internal error: {}",
                panic_text(p.as_ref())
            ));
            VIX_E_FAIL
        }
    }
}

/// Like [`guard`] for functions that return nothing (the `Free` functions, `Exit`).
fn guard_void(name: &str, f: impl FnOnce()) {
    if let Err(p) = catch_unwind(AssertUnwindSafe(f)) {
        log::panic(&format!(
            "VixMntapi: {name}: internal error: {}",
            panic_text(p.as_ref())
        ));
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// A required out pointer: an error if NULL, else set to `empty` (so that it is
/// NULL or zero on every failure) and returned.
///
/// # Safety
/// `p` must be NULL or valid for a write of `T`.
unsafe fn out_ptr<T>(p: *mut T, empty: T, what: &str) -> Result<*mut T, FfiError> {
    if p.is_null() {
        return Err(FfiError::new(VIX_E_INVALID_ARG, format!("{what} is NULL")));
    }
    // SAFETY: non-NULL and valid for a write per the contract.
    unsafe { p.write(empty) };
    Ok(p)
}

/// A required path argument (bytes, as the host file system takes them).
///
/// # Safety
/// `p` must be NULL or point to a NUL-terminated string valid for the call.
unsafe fn c_path(p: *const c_char, what: &str) -> Result<PathBuf, FfiError> {
    if p.is_null() {
        return Err(FfiError::new(VIX_E_INVALID_ARG, format!("{what} is NULL")));
    }
    // SAFETY: non-NULL, and the caller guarantees a NUL-terminated string.
    let s = unsafe { CStr::from_ptr(p) };
    if s.to_bytes().is_empty() {
        return Err(FfiError::new(VIX_E_INVALID_ARG, format!("{what} is empty")));
    }
    Ok(PathBuf::from(OsStr::from_bytes(s.to_bytes())))
}

/// A NUL-terminated copy of `bytes` (which hold no NUL: they come from paths or
/// from text without NULs) in memory from `malloc`.
fn malloc_bytes(bytes: &[u8]) -> Result<*mut c_char, FfiError> {
    let bytes = &bytes[..bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len())];
    // SAFETY: allocating len+1 bytes; checked for NULL below.
    let p = unsafe { libc::malloc(bytes.len() + 1) } as *mut u8;
    if p.is_null() {
        return Err(out_of_memory());
    }
    // SAFETY: `p` has room for len+1 bytes; the source is a valid slice; the regions
    // are distinct.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len());
        *p.add(bytes.len()) = 0;
    }
    Ok(p as *mut c_char)
}

/// `malloc` of one zeroed `T` (a C struct of pointers and integers, for which all
/// zero bytes is a valid value) with room for `extra` more bytes after it.
fn calloc_struct<T>(extra: usize) -> Result<*mut T, FfiError> {
    let size = std::mem::size_of::<T>()
        .checked_add(extra)
        .ok_or_else(out_of_memory)?;
    // SAFETY: calloc of `size` bytes (at least one T); checked for NULL below.
    let p = unsafe { libc::calloc(1, size) } as *mut T;
    if p.is_null() {
        return Err(out_of_memory());
    }
    Ok(p)
}

fn out_of_memory() -> FfiError {
    FfiError::new(VIX_E_OUT_OF_MEMORY, "out of memory")
}

/// Strings from `malloc` being gathered into a struct for C: freed on drop unless
/// handed over with [`CStrings::release`], so an error halfway leaks nothing.
struct CStrings(Vec<*mut c_char>);

impl CStrings {
    fn new() -> CStrings {
        CStrings(Vec::new())
    }

    /// A `malloc`'d copy of `bytes`, freed with the others unless released.
    fn add(&mut self, bytes: &[u8]) -> Result<*mut c_char, FfiError> {
        let p = malloc_bytes(bytes)?;
        self.0.push(p);
        Ok(p)
    }

    /// The strings now belong to a struct given to C.
    fn release(mut self) {
        self.0.clear();
    }
}

impl Drop for CStrings {
    fn drop(&mut self) {
        for p in self.0.drain(..) {
            // SAFETY: each pointer came from malloc in `add` and is freed once.
            unsafe { libc::free(p as *mut libc::c_void) };
        }
    }
}
