//! Library lifetime: `VixMntapi_Init` and `VixMntapi_Exit`.

use std::ffi::c_char;

use crate::errors::{VIX_E_FILE_NOT_FOUND, VIX_E_INVALID_ARG, VIX_E_MNTAPI_INCOMPATIBLE_VERSION};
use crate::types::{
    uint32, VixDiskLibGenericLogFunc, VixError, VIXMNTAPI_MAJOR_VERSION, VIXMNTAPI_MINOR_VERSION,
};
use crate::{c_path, config, guard, guard_void, log, mounter, state, FfiError};

/// Initialises the library; call it once, after `VixDiskLib_InitEx`. The version
/// must be 1.0 (`VIX_E_MNTAPI_INCOMPATIBLE_VERSION` otherwise). `configFile`, if
/// given, is read for `tmpDirectory` (where mount folders are made; the default is
/// vdisk-mount's runtime folder, `/run/vdisk-mount` for root) and
/// `vixMntapi.cfg.LogLevel` (0-6, default 3). `libDir` is not needed. Calling it
/// again replaces the callbacks and the configuration.
///
/// # Safety
/// The callbacks, if not NULL, must be functions of type
/// `void (const char *fmt, va_list args)` that stay valid until `Exit`; the strings
/// must be NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn VixMntapi_Init(
    majorVersion: uint32,
    minorVersion: uint32,
    log: *mut VixDiskLibGenericLogFunc,
    warn: *mut VixDiskLibGenericLogFunc,
    panic: *mut VixDiskLibGenericLogFunc,
    libDir: *const c_char,
    configFile: *const c_char,
) -> VixError {
    guard("VixMntapi_Init", || {
        let config = if configFile.is_null() {
            config::Config::default()
        } else {
            // SAFETY: non-NULL, NUL-terminated per the contract.
            let path = unsafe { c_path(configFile, "configFile") }?;
            let text = std::fs::read(&path).map_err(|e| {
                FfiError::new(
                    VIX_E_FILE_NOT_FOUND,
                    format!("cannot read the configuration file {}: {e}", path.display()),
                )
            })?;
            let config = config::parse(&String::from_utf8_lossy(&text)).map_err(|e| {
                FfiError::new(VIX_E_INVALID_ARG, format!("{}: {e}", path.display()))
            })?;
            if let Some(dir) = &config.tmp_directory {
                if !dir.is_dir() {
                    return Err(FfiError::new(
                        VIX_E_INVALID_ARG,
                        format!(
                            "{}: tmpDirectory {} is not a folder",
                            path.display(),
                            dir.display()
                        ),
                    ));
                }
            }
            config
        };
        // Callbacks first, so that the version error below reaches the client's.
        log::set_callbacks(log, warn, panic, config.log_level);
        if (majorVersion, minorVersion) != (VIXMNTAPI_MAJOR_VERSION, VIXMNTAPI_MINOR_VERSION) {
            return Err(FfiError::new(
                VIX_E_MNTAPI_INCOMPATIBLE_VERSION,
                format!(
                    "version {majorVersion}.{minorVersion} requested; this library \
                     implements version {VIXMNTAPI_MAJOR_VERSION}.{VIXMNTAPI_MINOR_VERSION}"
                ),
            ));
        }
        let _ = libDir;
        log::log(&format!(
            "VixMntapi: initialised (API 1.0, vdisk {}, mount folders in {})",
            env!("CARGO_PKG_VERSION"),
            config
                .tmp_directory
                .clone()
                .unwrap_or_else(vdisk_mount::volume::runtime_dir)
                .display()
        ));
        state::init(config);
        Ok(())
    })
}

/// Closes every disk set (dismounting what is still mounted; volumes in use are
/// detached lazily and waited for until their last file is closed) and forgets the
/// callbacks. Every handle becomes invalid.
#[no_mangle]
pub extern "C" fn VixMntapi_Exit() {
    guard_void("VixMntapi_Exit", || {
        for (set, volumes) in state::remove_all() {
            let _ = state::close_set(&set, &volumes);
        }
        mounter::join_reapers();
        log::clear_callbacks();
    })
}
