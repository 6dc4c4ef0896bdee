//! Whole-disk operations: Create, CreateChild, Clone, Grow, Shrink, Defragment,
//! Rename, Unlink, Attach, SpaceNeededForClone, CheckRepair.
#![allow(non_snake_case)]

use std::ffi::{c_char, c_void};
use std::path::Path;

use vdisk::ops::convert::{convert, ConvertOptions, ImageFormat};
use vdisk::{AdapterType, CreateOptions, DiskType};

use crate::errors::{VIX_E_FILE_ALREADY_EXISTS, VIX_E_INVALID_ARG, VIX_E_NOT_SUPPORTED};
use crate::state::{self, DiskHandle};
use crate::types::*;
use crate::{c_path, guard, ok, FfiError, Progress};

fn disk_type(t: VixDiskLibDiskType) -> Result<DiskType, FfiError> {
    Ok(DiskType::from_vddk_code(t)?)
}

fn adapter(a: VixDiskLibAdapterType) -> Result<AdapterType, FfiError> {
    Ok(AdapterType::from_vddk_code(a)?)
}

/// Reads a caller's create parameters.
///
/// # Safety
/// `p` must be NULL or point to a valid 24- or 32-byte struct.
unsafe fn create_options(p: *const VixDiskLibCreateParams) -> Result<CreateOptions, FfiError> {
    if p.is_null() {
        return Err(FfiError::new(VIX_E_INVALID_ARG, "createParams is NULL"));
    }
    // SAFETY: the first 24 bytes (diskType..capacity) exist in every layout.
    let (t, a, hw, cap) = unsafe {
        (
            (*p).diskType,
            (*p).adapterType,
            (*p).hwVersion,
            (*p).capacity,
        )
    };
    let capacity = cap
        .checked_mul(512)
        .ok_or_else(|| FfiError::new(VIX_E_INVALID_ARG, "capacity overflows"))?;
    Ok(CreateOptions {
        disk_type: disk_type(t)?,
        capacity,
        adapter: adapter(a)?,
        hw_version: u32::from(hw),
    })
}

/// The connection, which must be local: NBD serves disks, not their files, so an
/// operation on files (`what`) has nothing to work on over a remote connection.
pub(crate) fn local_connection(c: VixDiskLibConnection, what: &str) -> Result<(), FfiError> {
    let (_, conn) = state::connection(c as usize)?;
    match &conn.remote {
        None => Ok(()),
        Some(r) => Err(FfiError::new(
            VIX_E_NOT_SUPPORTED,
            format!(
                "{what} works on local disk files; this connection is to {} (transport {}), \
                 which serves disks, not files",
                r.name, r.mode
            ),
        )),
    }
}

/// Creates a new local disk (the file must not exist).
///
/// # Safety
/// `path` NUL-terminated; `createParams` valid; the callback and its data valid for
/// the call.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_Create(
    connection: VixDiskLibConnection,
    path: *const c_char,
    createParams: *const VixDiskLibCreateParams,
    progressFunc: VixDiskLibProgressFunc,
    progressCallbackData: *mut c_void,
) -> VixError {
    guard("VixDiskLib_Create", || {
        local_connection(connection, "Create")?;
        // SAFETY: per the contract.
        let path = unsafe { c_path(path, "path") }?;
        // SAFETY: per the contract.
        let opts = unsafe { create_options(createParams) }?;
        if opts.disk_type == DiskType::VmfsSparse {
            return Err(FfiError::new(
                VIX_E_NOT_SUPPORTED,
                "a vmfsSparse disk is a delta: create it with CreateChild",
            ));
        }
        let mut progress = Progress::new(progressFunc, progressCallbackData);
        progress.report(0, 1);
        vdisk::create(&path, &opts)?;
        progress.report(1, 1);
        ok()
    })
}

/// Creates a child (redo log) of an open disk.
///
/// # Safety
/// `childPath` NUL-terminated; callback and data valid for the call.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_CreateChild(
    diskHandle: VixDiskLibHandle,
    childPath: *const c_char,
    diskType: VixDiskLibDiskType,
    progressFunc: VixDiskLibProgressFunc,
    progressCallbackData: *mut c_void,
) -> VixError {
    guard("VixDiskLib_CreateChild", || {
        let h = state::disk(diskHandle as usize)?;
        // SAFETY: per the contract.
        let child = unsafe { c_path(childPath, "childPath") }?;
        let t = disk_type(diskType)?;
        let mut progress = Progress::new(progressFunc, progressCallbackData);
        progress.report(0, 1);
        h.with_disk(|d| Ok(vdisk::ops::child::create_child_of(d, &h.path, &child, t)?))?;
        progress.report(1, 1);
        ok()
    })
}

/// Copies (and converts) a disk into a new local one of the type in `createParams`
/// (capacity taken from the source). With `overWrite`, an existing destination disk
/// is deleted first. The source may be on a remote connection (its path is then the
/// export name), as VDDK copies a disk from a host; the destination is local.
///
/// # Safety
/// Paths NUL-terminated; `createParams` valid; callback and data valid for the call.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_Clone(
    dstConnection: VixDiskLibConnection,
    dstPath: *const c_char,
    srcConnection: VixDiskLibConnection,
    srcPath: *const c_char,
    vixCreateParams: *const VixDiskLibCreateParams,
    progressFunc: VixDiskLibProgressFunc,
    progressCallbackData: *mut c_void,
    overWrite: Bool,
) -> VixError {
    guard("VixDiskLib_Clone", || {
        local_connection(dstConnection, "Clone (to its destination)")?;
        let (_, src_conn) = state::connection(srcConnection as usize)?;
        // SAFETY: per the contract.
        let dst = unsafe { c_path(dstPath, "dstPath") }?;
        // SAFETY: per the contract.
        let src = unsafe { c_path(srcPath, "srcPath") }?;
        // SAFETY: per the contract.
        let target = unsafe { create_options(vixCreateParams) }?;
        if dst.exists() {
            if overWrite == 0 {
                return Err(FfiError::new(
                    VIX_E_FILE_ALREADY_EXISTS,
                    format!("{} exists", dst.display()),
                ));
            }
            vdisk::ops::files::unlink(&dst)?;
        }
        let mut opts = ConvertOptions::new(target.disk_type);
        opts.target.adapter = target.adapter;
        opts.target.hw_version = target.hw_version;
        opts.sync = true;
        let mut progress = Progress::new(progressFunc, progressCallbackData);
        let mut report = |done: u64, total: u64| progress.report(done, total);
        match &src_conn.remote {
            None => {
                convert(
                    &src,
                    ImageFormat::Vmdk,
                    &dst,
                    ImageFormat::Vmdk,
                    &opts,
                    &mut report,
                )?;
            }
            Some(server) => {
                let disk = crate::remote::open_source(server, &src)?;
                vdisk::convert_from(&disk, &dst, ImageFormat::Vmdk, &opts, &mut report)?;
            }
        }
        ok()
    })
}

/// Grows a closed local disk to `capacity` sectors.
///
/// # Safety
/// `path` NUL-terminated; callback and data valid for the call.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_Grow(
    connection: VixDiskLibConnection,
    path: *const c_char,
    capacity: VixDiskLibSectorType,
    updateGeometry: Bool,
    progressFunc: VixDiskLibProgressFunc,
    progressCallbackData: *mut c_void,
) -> VixError {
    guard("VixDiskLib_Grow", || {
        local_connection(connection, "Grow")?;
        // SAFETY: per the contract.
        let path = unsafe { c_path(path, "path") }?;
        let bytes = capacity
            .checked_mul(512)
            .ok_or_else(|| FfiError::new(VIX_E_INVALID_ARG, "capacity overflows"))?;
        let opts = vdisk::ops::grow::GrowOptions {
            update_geometry: updateGeometry != 0,
        };
        let mut progress = Progress::new(progressFunc, progressCallbackData);
        let mut report = |done: u64, total: u64| progress.report(done, total);
        vdisk::ops::grow::grow(&path, bytes, &opts, &mut report)?;
        ok()
    })
}

/// Runs a whole-file operation on an open handle's disk: the disk is closed, the
/// operation runs on its files, and the disk is reopened as before.
fn with_closed_disk(
    h: &DiskHandle,
    op: impl FnOnce(&Path) -> Result<(), FfiError>,
) -> Result<(), FfiError> {
    // A remote disk has no files here.
    h.with_disk(|_| Ok(()))?;
    h.wait();
    let mut slot = h.disk.write().unwrap_or_else(|p| p.into_inner());
    let disk = slot
        .take()
        .ok_or_else(|| FfiError::new(VIX_E_INVALID_ARG, "the disk handle is no longer valid"))?;
    disk.close()?;
    let result = op(&h.path);
    let reopened = h.options.open(&h.path);
    match reopened {
        Ok(d) => *slot = Some(d),
        Err(e) => {
            return Err(FfiError::new(
                e.kind().vix_code(),
                format!("the disk could not be reopened: {e}"),
            ))
        }
    }
    result
}

/// Shrinks an open sparse disk (its handle stays usable).
///
/// # Safety
/// Callback and data valid for the call.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_Shrink(
    diskHandle: VixDiskLibHandle,
    progressFunc: VixDiskLibProgressFunc,
    progressCallbackData: *mut c_void,
) -> VixError {
    guard("VixDiskLib_Shrink", || {
        let h = state::disk(diskHandle as usize)?;
        let mut progress = Progress::new(progressFunc, progressCallbackData);
        with_closed_disk(&h, |p| {
            let mut report = |done: u64, total: u64| progress.report(done, total);
            vdisk::ops::shrink::shrink(p, &mut report)?;
            Ok(())
        })?;
        ok()
    })
}

/// Defragments an open sparse disk (its handle stays usable).
///
/// # Safety
/// Callback and data valid for the call.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_Defragment(
    diskHandle: VixDiskLibHandle,
    progressFunc: VixDiskLibProgressFunc,
    progressCallbackData: *mut c_void,
) -> VixError {
    guard("VixDiskLib_Defragment", || {
        let h = state::disk(diskHandle as usize)?;
        let mut progress = Progress::new(progressFunc, progressCallbackData);
        with_closed_disk(&h, |p| {
            let mut report = |done: u64, total: u64| progress.report(done, total);
            vdisk::ops::defrag::defragment(p, &mut report)?;
            Ok(())
        })?;
        ok()
    })
}

/// Renames a local disk and all its extent files.
///
/// # Safety
/// Both paths NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_Rename(
    srcFileName: *const c_char,
    dstFileName: *const c_char,
) -> VixError {
    guard("VixDiskLib_Rename", || {
        // SAFETY: per the contract.
        let src = unsafe { c_path(srcFileName, "srcFileName") }?;
        // SAFETY: per the contract.
        let dst = unsafe { c_path(dstFileName, "dstFileName") }?;
        vdisk::ops::files::rename(&src, &dst)?;
        ok()
    })
}

/// Deletes one link of a disk (its descriptor and extent files).
///
/// # Safety
/// `path` NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_Unlink(
    connection: VixDiskLibConnection,
    path: *const c_char,
) -> VixError {
    guard("VixDiskLib_Unlink", || {
        local_connection(connection, "Unlink")?;
        // SAFETY: per the contract.
        let path = unsafe { c_path(path, "path") }?;
        vdisk::ops::files::unlink(&path)?;
        ok()
    })
}

fn attach_check(parent: &DiskHandle, child: &DiskHandle) -> Result<(), FfiError> {
    let pc = parent.with_disk(|d| Ok(d.capacity()))?;
    child.with_disk(|d| {
        if d.capacity() != pc {
            return Err(FfiError::new(
                vdisk::ErrorKind::CapacityMismatch.vix_code(),
                format!("the child holds {} bytes, the parent {pc}", d.capacity()),
            ));
        }
        let sparse = d.links()[0].extents().iter().all(|e| {
            matches!(
                e.line.kind,
                vdisk::descriptor::ExtentKind::Sparse
                    | vdisk::descriptor::ExtentKind::VmfsSparse
                    | vdisk::descriptor::ExtentKind::SeSparse
            )
        });
        if !sparse {
            return Err(FfiError::new(
                vdisk::ErrorKind::InvalidArgument.vix_code(),
                "only a sparse (delta) disk can be attached to a parent",
            ));
        }
        Ok(())
    })
}

/// Whether `child` can be attached on top of `parent`.
#[no_mangle]
pub extern "C" fn VixDiskLib_IsAttachPossible(
    parent: VixDiskLibHandle,
    child: VixDiskLibHandle,
) -> VixError {
    guard("VixDiskLib_IsAttachPossible", || {
        let p = state::disk(parent as usize)?;
        let c = state::disk(child as usize)?;
        attach_check(&p, &c)?;
        ok()
    })
}

/// Puts `child` on top of `parent`; afterwards the child handle reads the combined
/// chain and the parent handle is no longer valid (closing it is allowed).
#[no_mangle]
pub extern "C" fn VixDiskLib_Attach(parent: VixDiskLibHandle, child: VixDiskLibHandle) -> VixError {
    guard("VixDiskLib_Attach", || {
        let p = state::disk(parent as usize)?;
        let c = state::disk(child as usize)?;
        attach_check(&p, &c)?;
        // The parent's files must be free for the child to open them.
        p.stop_worker();
        if let Some(d) = p.disk.write().unwrap_or_else(|e| e.into_inner()).take() {
            d.close()?;
        }
        let parent_path = p.path.clone();
        with_closed_disk(&c, |child_path| {
            vdisk::ops::attach::attach(child_path, &parent_path)?;
            Ok(())
        })?;
        ok()
    })
}

/// Bytes needed to clone the disk into `cloneDiskType` (`UNKNOWN`: the same type).
///
/// # Safety
/// `spaceNeeded` must be a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_SpaceNeededForClone(
    diskHandle: VixDiskLibHandle,
    cloneDiskType: VixDiskLibDiskType,
    spaceNeeded: *mut uint64,
) -> VixError {
    guard("VixDiskLib_SpaceNeededForClone", || {
        if spaceNeeded.is_null() {
            return Err(FfiError::new(VIX_E_INVALID_ARG, "spaceNeeded is NULL"));
        }
        let h = state::disk(diskHandle as usize)?;
        let n = h.with_disk(|d| {
            let t = if cloneDiskType == VIXDISKLIB_DISK_UNKNOWN {
                d.info()?.disk_type.unwrap_or(DiskType::MonolithicSparse)
            } else {
                disk_type(cloneDiskType)?
            };
            Ok(vdisk::ops::space::space_needed_for_clone(d, t)?)
        })?;
        // SAFETY: non-NULL out pointer given by the caller.
        unsafe { *spaceNeeded = n };
        ok()
    })
}

/// Checks a closed sparse disk and, with `repair`, repairs it. As with VDDK, the
/// return value says whether the check ran, not how healthy the disk is; every
/// finding (and what repair did) is logged through the log callback.
///
/// # Safety
/// `filename` NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_CheckRepair(
    connection: VixDiskLibConnection,
    filename: *const c_char,
    repair: Bool,
) -> VixError {
    guard("VixDiskLib_CheckRepair", || {
        local_connection(connection, "CheckRepair")?;
        // SAFETY: per the contract.
        let path = unsafe { c_path(filename, "filename") }?;
        let report = vdisk::ops::check::check(&path, repair != 0)?;
        for f in &report.findings {
            crate::log::log(&format!(
                "VixDiskLib: CheckRepair: {}: {}{}",
                f.file.display(),
                f.problem,
                match (&f.repair, report.repaired) {
                    (Some(r), true) => format!(" (repaired: {r})"),
                    (Some(r), false) => format!(" (repair would {r})"),
                    (None, _) => " (cannot be repaired)".to_string(),
                }
            ));
        }
        if report.unlisted > 0 {
            crate::log::log(&format!(
                "VixDiskLib: CheckRepair: {} more problems not listed",
                report.unlisted
            ));
        }
        // As with VDDK, the result says whether the check ran, not how the disk is.
        ok()
    })
}
