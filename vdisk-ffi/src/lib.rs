//! # vdisk-ffi: libvixDiskLib
//!
//! VMware VDDK's C API (`vixDiskLib.h`) over the `vdisk` library, for local disk
//! files: a drop-in `libvixDiskLib.so.8` that programs written against VDDK (nbdkit's
//! vddk plugin, backup agents, VMware's sample) load unchanged.
//!
//! This crate stays thin: argument checking, handle registries, the C memory and
//! callback conventions, and error-code mapping; the disk logic is in `vdisk`. Every
//! exported function catches panics (a panic becomes `VIX_E_FAIL` and is reported
//! through the panic callback) and validates every handle and pointer it is given.

#![allow(non_snake_case)]

pub mod api_cbt;
pub mod api_io;
pub mod api_lib;
pub mod api_ops;
mod async_pool;
pub mod errors;
pub mod ext;
pub mod log;
pub mod remote;
pub mod state;
pub mod types;

use std::ffi::{c_char, CStr, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use errors::{VIX_E_FAIL, VIX_E_INVALID_ARG, VIX_E_OUT_OF_MEMORY, VIX_OK};
use types::VixError;

/// An error on its way to a C caller: the code, and the message logged for it.
#[derive(Debug)]
pub struct FfiError {
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

impl From<vdisk::Error> for FfiError {
    fn from(e: vdisk::Error) -> FfiError {
        FfiError::new(e.kind().vix_code(), e.to_string())
    }
}

/// Runs the body of exported function `name`: panics are caught, errors are logged
/// on the calling thread and turned into their code.
pub fn guard(name: &str, f: impl FnOnce() -> Result<VixError, FfiError>) -> VixError {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(code)) => code,
        Ok(Err(e)) => {
            log::warn(&format!(
                "VixDiskLib: {name}: {} (error {}: {})",
                e.message,
                e.code,
                errors::error_text(e.code)
            ));
            e.code
        }
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            log::panic(&format!("VixDiskLib: {name}: internal error: {what}"));
            VIX_E_FAIL
        }
    }
}

/// Like [`guard`] for functions that return something other than a `VixError`:
/// `fallback` on error or panic.
pub fn guard_value<T>(name: &str, fallback: T, f: impl FnOnce() -> Result<T, FfiError>) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            log::warn(&format!("VixDiskLib: {name}: {}", e.message));
            fallback
        }
        Err(_) => {
            log::panic(&format!("VixDiskLib: {name}: internal error"));
            fallback
        }
    }
}

/// Success.
pub fn ok() -> Result<VixError, FfiError> {
    Ok(VIX_OK)
}

/// A required C string argument.
///
/// # Safety
/// `p` must be NULL or point to a NUL-terminated string valid for the call.
pub unsafe fn c_str<'a>(p: *const c_char, what: &str) -> Result<&'a CStr, FfiError> {
    if p.is_null() {
        return Err(FfiError::new(VIX_E_INVALID_ARG, format!("{what} is NULL")));
    }
    // SAFETY: non-NULL, and the caller guarantees a NUL-terminated string.
    Ok(unsafe { CStr::from_ptr(p) })
}

/// A required path argument (bytes, as the host file system takes them).
///
/// # Safety
/// As [`c_str`].
pub unsafe fn c_path(p: *const c_char, what: &str) -> Result<PathBuf, FfiError> {
    // SAFETY: forwarded contract.
    let s = unsafe { c_str(p, what) }?;
    if s.to_bytes().is_empty() {
        return Err(FfiError::new(VIX_E_INVALID_ARG, format!("{what} is empty")));
    }
    Ok(PathBuf::from(OsStr::from_bytes(s.to_bytes())))
}

/// A copy of `s` in memory from `malloc` (the caller frees it with `free`).
pub fn malloc_str(s: &str) -> Result<*mut c_char, FfiError> {
    malloc_bytes(s.as_bytes())
}

/// A NUL-terminated copy of `bytes` (which hold no NUL) in memory from `malloc`.
pub fn malloc_bytes(bytes: &[u8]) -> Result<*mut c_char, FfiError> {
    // SAFETY: allocating len+1 bytes; checked for NULL below.
    let p = unsafe { libc::malloc(bytes.len() + 1) } as *mut u8;
    if p.is_null() {
        return Err(FfiError::new(VIX_E_OUT_OF_MEMORY, "out of memory"));
    }
    // SAFETY: `p` has room for len+1 bytes; the source is a valid slice; regions are
    // distinct.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len());
        *p.add(bytes.len()) = 0;
    }
    Ok(p as *mut c_char)
}

/// A progress callback adapter: VDDK passes percent (0-100).
pub struct Progress {
    func: types::VixDiskLibProgressFunc,
    data: usize,
    last: i32,
}

impl Progress {
    /// Wraps a client's callback (may be None).
    pub fn new(func: types::VixDiskLibProgressFunc, data: *mut std::ffi::c_void) -> Progress {
        Progress {
            func,
            data: data as usize,
            last: -1,
        }
    }

    /// Reports `done` of `total`; never cancels (VDDK ignores the return value).
    pub fn report(&mut self, done: u64, total: u64) -> bool {
        let pct = if total == 0 {
            100
        } else {
            ((done.min(total) as u128 * 100) / total as u128) as i32
        };
        if pct != self.last {
            self.last = pct;
            if let Some(f) = self.func {
                // SAFETY: the client gave this callback and its data pointer for the
                // duration of the call that is running now.
                unsafe { f(self.data as *mut std::ffi::c_void, pct) };
            }
        }
        true
    }
}
