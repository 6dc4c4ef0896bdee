//! Volumes: mounting, dismounting, and what they are.

use std::ffi::c_void;
use std::os::unix::ffi::OsStrExt;

use crate::state::{self, lock};
use crate::types::{Bool, VixError, VixVolumeHandle, VixVolumeInfo};
use crate::{calloc_struct, guard, guard_void, out_ptr, CStrings};

/// Mounts a volume's file system on a folder made for it inside the set's mount
/// folder (`VixMntapi_GetVolumeInfo` reports it as `symbolicLink`). With `readOnly`
/// the disk is opened read-only and the file system mounted `ro`; otherwise writes go
/// to the disk, which needs a set opened without `VIXDISKLIB_FLAG_OPEN_READ_ONLY`
/// (`VIX_E_MNTAPI_VOLUME_NOT_WRITABLE` otherwise). Needs root
/// (`VIX_E_MNTAPI_NO_ROOT`). Swap areas, LVM physical volumes and partitions
/// without a recognised file system cannot be mounted (`VIX_E_NOT_SUPPORTED`); a
/// mounted volume gives `VIX_E_MNTAPI_VOLUME_ALREADY_MOUNTED`. While a volume is
/// mounted read-write, its disk is locked: no other volume of it can be mounted.
#[no_mangle]
pub extern "C" fn VixMntapi_MountVolume(volumeHandle: VixVolumeHandle, readOnly: Bool) -> VixError {
    guard("VixMntapi_MountVolume", || {
        let v = state::volume(volumeHandle as usize)?;
        let mut st = lock(&v.state);
        v.mount(&mut st, readOnly != 0)
    })
}

/// Unmounts a volume and removes its folder; the disk is closed (written data is
/// on the disk when this returns). A volume with files open in it is
/// `VIX_E_MNTAPI_OPEN_HANDLES` and stays mounted, unless `force`: then it is detached
/// at once (as `umount -l`) and its disk closed when the last file is closed.
/// `VIX_E_MNTAPI_VOLUME_NOT_MOUNTED` when it is not mounted.
#[no_mangle]
pub extern "C" fn VixMntapi_DismountVolume(volumeHandle: VixVolumeHandle, force: Bool) -> VixError {
    guard("VixMntapi_DismountVolume", || {
        let v = state::volume(volumeHandle as usize)?;
        let mut st = lock(&v.state);
        v.dismount(&mut st, force != 0)
    })
}

/// What a volume is (`VIXMNTAPI_BASIC_PARTITION` or `VIXMNTAPI_GPT_PARTITION`),
/// whether it is mounted and where (`symbolicLink`, NULL when not mounted). Guest
/// mount points are not read (`numGuestMountPoints` 0). Free the result with
/// `VixMntapi_FreeVolumeInfo`.
///
/// # Safety
/// `info` must be a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn VixMntapi_GetVolumeInfo(
    volumeHandle: VixVolumeHandle,
    info: *mut *mut VixVolumeInfo,
) -> VixError {
    guard("VixMntapi_GetVolumeInfo", || {
        // SAFETY: per the contract.
        let out = unsafe { out_ptr(info, std::ptr::null_mut(), "info") }?;
        let v = state::volume(volumeHandle as usize)?;
        let target = lock(&v.state)
            .mounted
            .as_ref()
            .map(|m| m.target().to_path_buf());
        let mut strings = CStrings::new();
        let link = match &target {
            Some(t) => strings.add(t.as_os_str().as_bytes())?,
            None => std::ptr::null_mut(),
        };
        let p = calloc_struct::<VixVolumeInfo>(0)?;
        // SAFETY: `p` is a fresh allocation of one VixVolumeInfo (no guest mount
        // points: the one-entry array is all there is).
        unsafe {
            p.write(VixVolumeInfo {
                r#type: v.spec.volume_type,
                isMounted: Bool::from(target.is_some()),
                symbolicLink: link,
                numGuestMountPoints: 0,
                inGuestMountPoints: [std::ptr::null_mut()],
            })
        };
        strings.release();
        // SAFETY: checked non-NULL, valid for a write per the contract.
        unsafe { out.write(p) };
        Ok(())
    })
}

/// Frees what `VixMntapi_GetVolumeInfo` returned (NULL is allowed).
///
/// # Safety
/// `info` must be NULL or come from `VixMntapi_GetVolumeInfo`, freed once.
#[no_mangle]
pub unsafe extern "C" fn VixMntapi_FreeVolumeInfo(info: *mut VixVolumeInfo) {
    guard_void("VixMntapi_FreeVolumeInfo", || {
        if info.is_null() {
            return;
        }
        // SAFETY: a struct from GetVolumeInfo: `symbolicLink` (or NULL) and the
        // struct come from malloc and are freed once; it never has guest mount
        // points, so nothing else was allocated.
        unsafe {
            libc::free((*info).symbolicLink as *mut c_void);
            libc::free(info as *mut c_void);
        }
    })
}
