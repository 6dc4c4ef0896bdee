//! The log, warning and panic callbacks given to `VixMntapi_Init`, called through
//! the C trampoline (they take a `va_list`). Messages about a failed call are
//! emitted on the calling thread before the call returns.
//!
//! `vixMntapi.cfg.LogLevel` of the configuration file filters them by VDDK's levels:
//! panics always go out, warnings (every failed call) from level 2, log lines
//! (mounts, dismounts, warnings of partition tables) from level 3, the default.

use std::ffi::{c_char, c_void, CString};
use std::sync::RwLock;

use crate::types::VixDiskLibGenericLogFunc;

extern "C" {
    /// `vdisk-ffi/csrc/trampoline.c`: calls `f("%s", message)` with a real `va_list`.
    fn vdisk_ffi_call_log(f: *mut c_void, message: *const c_char);
}

/// VDDK's level for warnings.
pub(crate) const LEVEL_WARNING: u8 = 2;
/// VDDK's level for audit lines (the default level).
pub(crate) const LEVEL_AUDIT: u8 = 3;

/// The callbacks (as addresses: function pointers are `Send + Sync`) and the level.
#[derive(Clone, Copy)]
struct Sink {
    log: usize,
    warn: usize,
    panic: usize,
    level: u8,
}

static SINK: RwLock<Sink> = RwLock::new(Sink {
    log: 0,
    warn: 0,
    panic: 0,
    level: LEVEL_AUDIT,
});

fn sink() -> Sink {
    *SINK.read().unwrap_or_else(|p| p.into_inner())
}

/// Installs the callbacks (NULL: the default, which prints warnings and panics to
/// stderr and drops log lines unless `VDISK_FFI_LOG` is set) and the level.
pub(crate) fn set_callbacks(
    log: *mut VixDiskLibGenericLogFunc,
    warn: *mut VixDiskLibGenericLogFunc,
    panic: *mut VixDiskLibGenericLogFunc,
    level: u8,
) {
    *SINK.write().unwrap_or_else(|p| p.into_inner()) = Sink {
        log: log as usize,
        warn: warn as usize,
        panic: panic as usize,
        level,
    };
}

/// Forgets the callbacks (`Exit`).
pub(crate) fn clear_callbacks() {
    set_callbacks(
        std::ptr::null_mut(),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
        LEVEL_AUDIT,
    );
}

fn emit(f: usize, default_to_stderr: bool, message: &str) {
    let line = format!("{message}\n");
    if f == 0 {
        if default_to_stderr || std::env::var_os("VDISK_FFI_LOG").is_some() {
            eprint!("{line}");
        }
        return;
    }
    let Ok(text) = CString::new(line.replace('\0', " ")) else {
        return;
    };
    // SAFETY: `f` is a non-NULL pointer to a function of type
    // `void (const char *, va_list)` that the client passed to VixMntapi_Init; the
    // trampoline calls it with the format "%s" and one valid NUL-terminated string
    // that outlives the call.
    unsafe { vdisk_ffi_call_log(f as *mut c_void, text.as_ptr()) };
}

/// A log line (level 3).
pub(crate) fn log(message: &str) {
    let s = sink();
    if s.level >= LEVEL_AUDIT {
        emit(s.log, false, message);
    }
}

/// A warning (level 2; errors of API calls are reported this way).
pub(crate) fn warn(message: &str) {
    let s = sink();
    if s.level >= LEVEL_WARNING {
        emit(s.warn, true, message);
    }
}

/// A panic inside the library (caught; the call returns `VIX_E_FAIL`).
pub(crate) fn panic(message: &str) {
    emit(sink().panic, true, message);
}
