//! Library lifetime, connections, connect parameters, transports and error texts.
#![allow(non_snake_case)]

use std::ffi::{c_char, c_void};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::errors::{error_text, VIX_E_INVALID_ARG};
use crate::state::{self, Connection};
use crate::types::{
    uint32, Bool, VixDiskLibConnectParams, VixDiskLibConnection, VixDiskLibGenericLogFunc, VixError,
};
use crate::{guard, guard_value, log, ok, FfiError};

/// Whether InitEx ran (and Exit has not).
static INITIALISED: AtomicBool = AtomicBool::new(false);

/// The transports this library offers: local files, and standard NBD plain
/// (`nbd`) and under TLS (`nbdssl`).
const TRANSPORT_MODES: &[u8] = b"file:nbd:nbdssl\0";
/// The transport of a local disk.
const FILE_MODE: &[u8] = b"file\0";
/// The transport of a remote disk reached in plaintext.
const NBD_MODE: &[u8] = b"nbd\0";
/// The transport of a remote disk reached under TLS.
const NBDSSL_MODE: &[u8] = b"nbdssl\0";

/// Initialises the library. Any version is accepted; `libDir` and `configFile` are
/// not needed for local files (a config file, if given, must be readable).
///
/// # Safety
/// The callbacks, if not NULL, must be functions of type
/// `void (const char *fmt, va_list args)` that stay valid until `Exit`; the strings
/// must be NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_InitEx(
    majorVersion: uint32,
    minorVersion: uint32,
    log: *mut VixDiskLibGenericLogFunc,
    warn: *mut VixDiskLibGenericLogFunc,
    panic: *mut VixDiskLibGenericLogFunc,
    libDir: *const c_char,
    configFile: *const c_char,
) -> VixError {
    guard("VixDiskLib_InitEx", || {
        log::set_callbacks(log, warn, panic);
        if !configFile.is_null() {
            // SAFETY: non-NULL, NUL-terminated per the contract.
            let path = unsafe { crate::c_path(configFile, "configFile") }?;
            std::fs::metadata(&path).map_err(|e| {
                FfiError::new(
                    crate::errors::VIX_E_FILE_NOT_FOUND,
                    format!("cannot read the configuration file {}: {e}", path.display()),
                )
            })?;
        }
        let _ = libDir;
        INITIALISED.store(true, Ordering::SeqCst);
        log::log(&format!(
            "VixDiskLib: initialised (client API {majorVersion}.{minorVersion}, vdisk {})",
            env!("CARGO_PKG_VERSION")
        ));
        ok()
    })
}

/// Initialises the library (InitEx without a configuration file).
///
/// # Safety
/// As [`VixDiskLib_InitEx`].
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_Init(
    majorVersion: uint32,
    minorVersion: uint32,
    log: *mut VixDiskLibGenericLogFunc,
    warn: *mut VixDiskLibGenericLogFunc,
    panic: *mut VixDiskLibGenericLogFunc,
    libDir: *const c_char,
) -> VixError {
    // SAFETY: forwarded contract.
    unsafe {
        VixDiskLib_InitEx(
            majorVersion,
            minorVersion,
            log,
            warn,
            panic,
            libDir,
            std::ptr::null(),
        )
    }
}

/// Closes every handle and connection and stops every library thread.
#[no_mangle]
pub extern "C" fn VixDiskLib_Exit() {
    guard_value("VixDiskLib_Exit", (), || {
        state::close_all();
        INITIALISED.store(false, Ordering::SeqCst);
        log::clear_callbacks();
        Ok(())
    })
}

/// The transports known to the library: `"file:nbd:nbdssl"`. Static; do not free.
#[no_mangle]
pub extern "C" fn VixDiskLib_ListTransportModes() -> *const c_char {
    TRANSPORT_MODES.as_ptr() as *const c_char
}

/// Whether the parameters describe a local connection (NULL, or no server name).
///
/// # Safety
/// `params` must be NULL or point to at least the 72-byte prefix of the struct.
unsafe fn is_local(params: *const VixDiskLibConnectParams) -> bool {
    if params.is_null() {
        return true;
    }
    // SAFETY: `serverName` is at offset 8, inside every layout of the struct.
    unsafe { (*params).serverName.is_null() }
}

/// A C string argument as UTF-8 text (None for NULL).
///
/// # Safety
/// `p` must be NULL or NUL-terminated.
unsafe fn text<'a>(p: *const c_char, what: &str) -> Result<Option<&'a str>, FfiError> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: non-NULL and NUL-terminated per the contract.
    let s = unsafe { std::ffi::CStr::from_ptr(p) };
    s.to_str()
        .map(Some)
        .map_err(|_| FfiError::new(VIX_E_INVALID_ARG, format!("{what} is not UTF-8")))
}

/// Connects to the NBD server the parameters name (see [`crate::remote`]).
///
/// # Safety
/// `params` must point to at least the 72-byte prefix of the struct, its strings
/// NULL or NUL-terminated; `modes` NULL or NUL-terminated.
unsafe fn connect_remote(
    params: *const VixDiskLibConnectParams,
    read_only: bool,
    modes: *const c_char,
) -> Result<state::RemoteServer, FfiError> {
    // SAFETY: every field read lies in the 72-byte prefix (up to `vimApiVer`).
    let p = unsafe { &*params };
    // SAFETY: the strings are NULL or NUL-terminated per the contract.
    let (server, thumbprint, vmx, modes) = unsafe {
        (
            text(p.serverName, "serverName")?.unwrap_or_default(),
            text(p.thumbPrint, "thumbPrint")?,
            text(p.vmxSpec, "vmxSpec")?,
            text(modes, "transportModes")?,
        )
    };
    if p.credType != 0 || vmx.is_some() {
        log::log(&format!(
            "VixDiskLib: {server}: credentials and vmxSpec ({}) have no NBD equivalent and \
             are not sent (the export is named by the Open path)",
            vmx.unwrap_or("none")
        ));
    }
    crate::remote::connect(&crate::remote::ConnectRequest {
        server,
        port: p.port,
        nfc_port: p.nfcHostPort,
        thumbprint,
        modes,
        read_only,
    })
}

/// Connects (local files: `connectParams` NULL or with a NULL `serverName`).
///
/// # Safety
/// `connectParams` must be NULL or a valid struct (any VDDK layout); `connection`
/// must be a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_Connect(
    connectParams: *const VixDiskLibConnectParams,
    connection: *mut VixDiskLibConnection,
) -> VixError {
    // SAFETY: forwarded contract.
    unsafe {
        VixDiskLib_ConnectEx(
            connectParams,
            0,
            std::ptr::null(),
            std::ptr::null(),
            connection,
        )
    }
}

/// Connects, choosing transports (for local files: `"file"` whatever is asked).
///
/// # Safety
/// As [`VixDiskLib_Connect`]; the strings must be NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_ConnectEx(
    connectParams: *const VixDiskLibConnectParams,
    readOnly: Bool,
    snapshotRef: *const c_char,
    transportModes: *const c_char,
    connection: *mut VixDiskLibConnection,
) -> VixError {
    guard("VixDiskLib_ConnectEx", || {
        if connection.is_null() {
            return Err(FfiError::new(VIX_E_INVALID_ARG, "connection is NULL"));
        }
        // SAFETY: non-NULL out pointer given by the caller: NULL until success.
        unsafe { *connection = std::ptr::null_mut() };
        // SAFETY: per the contract.
        let remote = if unsafe { is_local(connectParams) } {
            None
        } else {
            // SAFETY: per the contract (a non-NULL struct of any layout).
            Some(unsafe { connect_remote(connectParams, readOnly != 0, transportModes) }?)
        };
        if !snapshotRef.is_null() {
            log::log("VixDiskLib_ConnectEx: the snapshot reference is not used (the Open path names the disk, snapshot disks included)");
        }
        let handle = state::add_connection(Connection {
            read_only: readOnly != 0,
            remote,
        });
        // SAFETY: `connection` is non-NULL and valid for a write per the contract.
        unsafe { *connection = handle as VixDiskLibConnection };
        ok()
    })
}

/// Disconnects; disk handles opened through the connection are closed.
#[no_mangle]
pub extern "C" fn VixDiskLib_Disconnect(connection: VixDiskLibConnection) -> VixError {
    guard("VixDiskLib_Disconnect", || {
        state::remove_connection(connection as usize)?;
        ok()
    })
}

/// Tells vCenter a backup starts: nothing to do for local files or NBD servers.
///
/// # Safety
/// As [`VixDiskLib_Connect`]; `identity` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_PrepareForAccess(
    connectParams: *const VixDiskLibConnectParams,
    identity: *const c_char,
) -> VixError {
    guard("VixDiskLib_PrepareForAccess", || {
        let _ = identity;
        // SAFETY: per the contract.
        if !unsafe { is_local(connectParams) } {
            log::log("VixDiskLib: an NBD server has no vCenter tasks to hold: nothing to do");
        }
        ok()
    })
}

/// Ends what PrepareForAccess started: nothing to do here either.
///
/// # Safety
/// As [`VixDiskLib_PrepareForAccess`].
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_EndAccess(
    connectParams: *const VixDiskLibConnectParams,
    identity: *const c_char,
) -> VixError {
    guard("VixDiskLib_EndAccess", || {
        let _ = identity;
        // SAFETY: per the contract.
        if !unsafe { is_local(connectParams) } {
            log::log("VixDiskLib: an NBD server has no vCenter tasks to hold: nothing to do");
        }
        ok()
    })
}

/// Cleans up after unclean shutdowns of remote transports: nothing for local files.
///
/// # Safety
/// As [`VixDiskLib_Connect`]; the out pointers may be NULL.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_Cleanup(
    connectParams: *const VixDiskLibConnectParams,
    numCleanedUp: *mut uint32,
    numRemaining: *mut uint32,
) -> VixError {
    guard("VixDiskLib_Cleanup", || {
        let _ = connectParams;
        for p in [numCleanedUp, numRemaining] {
            if !p.is_null() {
                // SAFETY: non-NULL out pointer given by the caller.
                unsafe { *p = 0 };
            }
        }
        ok()
    })
}

/// A zeroed, full-size (128-byte) parameter struct owned by the library; free it with
/// `FreeConnectParams`. Strings the caller stores in it stay the caller's.
#[no_mangle]
pub extern "C" fn VixDiskLib_AllocateConnectParams() -> *mut VixDiskLibConnectParams {
    guard_value(
        "VixDiskLib_AllocateConnectParams",
        std::ptr::null_mut(),
        || {
            // SAFETY: calloc of one struct; NULL is returned as is.
            let p = unsafe { libc::calloc(1, std::mem::size_of::<VixDiskLibConnectParams>()) };
            Ok(p as *mut VixDiskLibConnectParams)
        },
    )
}

/// Frees a struct from AllocateConnectParams or GetConnectParams. Only the struct is
/// freed, never the strings in it (they belong to the caller, or are NULL).
///
/// # Safety
/// `connectParams` must be NULL or come from one of those two functions.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_FreeConnectParams(connectParams: *mut VixDiskLibConnectParams) {
    // SAFETY: malloc'd by us (or NULL, which free ignores).
    unsafe { libc::free(connectParams as *mut c_void) };
}

/// The parameters of a connection (local: all fields zero), in a struct to free with
/// FreeConnectParams.
///
/// # Safety
/// `connectParams` must be a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_GetConnectParams(
    connection: VixDiskLibConnection,
    connectParams: *mut *mut VixDiskLibConnectParams,
) -> VixError {
    guard("VixDiskLib_GetConnectParams", || {
        if connectParams.is_null() {
            return Err(FfiError::new(VIX_E_INVALID_ARG, "connectParams is NULL"));
        }
        // SAFETY: non-NULL out pointer given by the caller: NULL until success.
        unsafe { *connectParams = std::ptr::null_mut() };
        state::connection(connection as usize)?;
        let p = VixDiskLib_AllocateConnectParams();
        if p.is_null() {
            return Err(FfiError::new(
                crate::errors::VIX_E_OUT_OF_MEMORY,
                "out of memory",
            ));
        }
        // SAFETY: non-NULL out pointer given by the caller.
        unsafe { *connectParams = p };
        ok()
    })
}

/// The transport a disk was opened with: `"file"`, `"nbd"` or `"nbdssl"` (NULL for
/// an invalid handle). Static; do not free.
#[no_mangle]
pub extern "C" fn VixDiskLib_GetTransportMode(
    diskHandle: crate::types::VixDiskLibHandle,
) -> *const c_char {
    let mode = match state::disk(diskHandle as usize) {
        Err(_) => return std::ptr::null(),
        Ok(h) => match h.remote.as_ref().map(|r| r.mode) {
            None => FILE_MODE,
            Some("nbdssl") => NBDSSL_MODE,
            Some(_) => NBD_MODE,
        },
    };
    mode.as_ptr() as *const c_char
}

/// The English text of an error code, from `malloc`; free it with FreeErrorText.
/// Never NULL unless memory runs out.
///
/// # Safety
/// `locale` must be NULL or NUL-terminated (it is ignored).
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_GetErrorText(
    err: VixError,
    locale: *const c_char,
) -> *mut c_char {
    let _ = locale;
    guard_value("VixDiskLib_GetErrorText", std::ptr::null_mut(), || {
        crate::malloc_str(error_text(err))
    })
}

/// Frees a text from GetErrorText (NULL is allowed).
///
/// # Safety
/// `errMsg` must be NULL or come from GetErrorText.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_FreeErrorText(errMsg: *mut c_char) {
    // SAFETY: malloc'd by GetErrorText, or NULL.
    unsafe { libc::free(errMsg as *mut c_void) };
}

/// Whether the library is initialised (used in log messages).
pub fn initialised() -> bool {
    INITIALISED.load(Ordering::SeqCst)
}
