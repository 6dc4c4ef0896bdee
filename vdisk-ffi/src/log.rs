//! The log, warning and panic callbacks given to `InitEx`, called through a small C
//! trampoline (they take a `va_list`). Messages about a failed call are emitted on
//! the calling thread, before the call returns, as clients expect.

use std::ffi::{c_char, c_void, CString};
use std::sync::RwLock;

use crate::types::VixDiskLibGenericLogFunc;

extern "C" {
    /// `csrc/trampoline.c`: calls `f("%s", message)` with a real `va_list`.
    fn vdisk_ffi_call_log(f: *mut c_void, message: *const c_char);
}

/// The callbacks, stored as addresses (function pointers are `Send + Sync`).
#[derive(Clone, Copy, Default)]
struct Callbacks {
    log: usize,
    warn: usize,
    panic: usize,
}

static CALLBACKS: RwLock<Callbacks> = RwLock::new(Callbacks {
    log: 0,
    warn: 0,
    panic: 0,
});

/// Installs the callbacks (NULL: the default, which prints warnings to stderr and
/// drops log lines unless `VDISK_FFI_LOG` is set).
pub fn set_callbacks(
    log: *mut VixDiskLibGenericLogFunc,
    warn: *mut VixDiskLibGenericLogFunc,
    panic: *mut VixDiskLibGenericLogFunc,
) {
    let mut c = CALLBACKS.write().unwrap_or_else(|p| p.into_inner());
    *c = Callbacks {
        log: log as usize,
        warn: warn as usize,
        panic: panic as usize,
    };
}

/// Forgets the callbacks (`Exit`).
pub fn clear_callbacks() {
    let mut c = CALLBACKS.write().unwrap_or_else(|p| p.into_inner());
    *c = Callbacks::default();
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
    // `void (const char *, va_list)` that the client passed to InitEx; the
    // trampoline calls it with the format "%s" and one valid NUL-terminated string
    // that outlives the call.
    unsafe { vdisk_ffi_call_log(f as *mut c_void, text.as_ptr()) };
}

/// A log line.
pub fn log(message: &str) {
    let f = CALLBACKS.read().map(|c| c.log).unwrap_or(0);
    emit(f, false, message);
}

/// A warning (errors of API calls are reported this way).
pub fn warn(message: &str) {
    let f = CALLBACKS.read().map(|c| c.warn).unwrap_or(0);
    emit(f, true, message);
}

/// A panic inside the library (caught; the call returns `VIX_E_FAIL`). Clients'
/// panic callbacks may exit the process, as VMware's sample does.
pub fn panic(message: &str) {
    let f = CALLBACKS.read().map(|c| c.panic).unwrap_or(0);
    emit(f, true, message);
}
