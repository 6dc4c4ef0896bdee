//! The `VixError` codes this library returns. They are declared (with their texts,
//! for `VixDiskLib_GetErrorText`) by vdisk-ffi and `vixDiskLib.h`; a test checks
//! that the values here are the same.

use crate::types::VixError;

/// Success.
pub(crate) const VIX_OK: VixError = 0;
/// Unknown error (and a caught panic).
pub(crate) const VIX_E_FAIL: VixError = 1;
/// Out of memory.
pub(crate) const VIX_E_OUT_OF_MEMORY: VixError = 2;
/// A parameter (a handle included) is invalid.
pub(crate) const VIX_E_INVALID_ARG: VixError = 3;
/// A file was not found.
pub(crate) const VIX_E_FILE_NOT_FOUND: VixError = 4;
/// The operation is not supported.
pub(crate) const VIX_E_NOT_SUPPORTED: VixError = 6;
/// libvixDiskLib is not loaded (or not initialised).
pub(crate) const VIX_E_DISK_NOINIT: VixError = 16001;
/// An invalid libvixDiskLib connection handle.
pub(crate) const VIX_E_DISK_INVALID_CONNECTION: VixError = 16054;
/// The mount folder is unusable.
pub(crate) const VIX_E_MNTAPI_MOUNTPT_NOT_FOUND: VixError = 24000;
/// The partitions of the disk cannot be read.
pub(crate) const VIX_E_MNTAPI_CANT_READ_PARTS: VixError = 24007;
/// The volume cannot be unmounted.
pub(crate) const VIX_E_MNTAPI_UMOUNT: VixError = 24009;
/// Files of the volume are still open.
pub(crate) const VIX_E_MNTAPI_OPEN_HANDLES: VixError = 24015;
/// The mount folder cannot be created.
pub(crate) const VIX_E_MNTAPI_CANT_MAKE_VAR_DIR: VixError = 24016;
/// Mounting needs root.
pub(crate) const VIX_E_MNTAPI_NO_ROOT: VixError = 24017;
/// The loop device (or the kernel mount on it) failed.
pub(crate) const VIX_E_MNTAPI_LOOP_FAILED: VixError = 24018;
/// The FUSE layer failed.
pub(crate) const VIX_E_MNTAPI_DAEMON: VixError = 24019;
/// `VixMntapi_Init` with a version other than 1.0.
pub(crate) const VIX_E_MNTAPI_INCOMPATIBLE_VERSION: VixError = 24300;
/// The volume is not mounted.
pub(crate) const VIX_E_MNTAPI_VOLUME_NOT_MOUNTED: VixError = 24304;
/// The volume is already mounted.
pub(crate) const VIX_E_MNTAPI_VOLUME_ALREADY_MOUNTED: VixError = 24305;
/// No operating system was found on the disk set.
pub(crate) const VIX_E_MNTAPI_ITEM_NOT_FOUND: VixError = 24309;
/// A read-write mount of a set opened read-only.
pub(crate) const VIX_E_MNTAPI_VOLUME_NOT_WRITABLE: VixError = 24322;

#[cfg(test)]
mod tests {
    use super::*;
    use disklib::errors as disklib;

    /// Every code here has the value (and a text) in vdisk-ffi's table.
    #[test]
    fn codes_match_vdisk_ffi() {
        let pairs = [
            (VIX_OK, disklib::VIX_OK),
            (VIX_E_FAIL, disklib::VIX_E_FAIL),
            (VIX_E_OUT_OF_MEMORY, disklib::VIX_E_OUT_OF_MEMORY),
            (VIX_E_INVALID_ARG, disklib::VIX_E_INVALID_ARG),
            (VIX_E_FILE_NOT_FOUND, disklib::VIX_E_FILE_NOT_FOUND),
            (VIX_E_NOT_SUPPORTED, disklib::VIX_E_NOT_SUPPORTED),
            (VIX_E_DISK_NOINIT, disklib::VIX_E_DISK_NOINIT),
            (
                VIX_E_DISK_INVALID_CONNECTION,
                disklib::VIX_E_DISK_INVALID_CONNECTION,
            ),
            (
                VIX_E_MNTAPI_CANT_READ_PARTS,
                disklib::VIX_E_MNTAPI_CANT_READ_PARTS,
            ),
            (VIX_E_MNTAPI_UMOUNT, disklib::VIX_E_MNTAPI_UMOUNT),
            (
                VIX_E_MNTAPI_OPEN_HANDLES,
                disklib::VIX_E_MNTAPI_OPEN_HANDLES,
            ),
            (
                VIX_E_MNTAPI_MOUNTPT_NOT_FOUND,
                disklib::VIX_E_MNTAPI_MOUNTPT_NOT_FOUND,
            ),
            (
                VIX_E_MNTAPI_CANT_MAKE_VAR_DIR,
                disklib::VIX_E_MNTAPI_CANT_MAKE_VAR_DIR,
            ),
            (VIX_E_MNTAPI_NO_ROOT, disklib::VIX_E_MNTAPI_NO_ROOT),
            (VIX_E_MNTAPI_LOOP_FAILED, disklib::VIX_E_MNTAPI_LOOP_FAILED),
            (VIX_E_MNTAPI_DAEMON, disklib::VIX_E_MNTAPI_DAEMON),
            (
                VIX_E_MNTAPI_INCOMPATIBLE_VERSION,
                disklib::VIX_E_MNTAPI_INCOMPATIBLE_VERSION,
            ),
            (
                VIX_E_MNTAPI_VOLUME_NOT_MOUNTED,
                disklib::VIX_E_MNTAPI_VOLUME_NOT_MOUNTED,
            ),
            (
                VIX_E_MNTAPI_VOLUME_ALREADY_MOUNTED,
                disklib::VIX_E_MNTAPI_VOLUME_ALREADY_MOUNTED,
            ),
            (
                VIX_E_MNTAPI_ITEM_NOT_FOUND,
                disklib::VIX_E_MNTAPI_ITEM_NOT_FOUND,
            ),
            (
                VIX_E_MNTAPI_VOLUME_NOT_WRITABLE,
                disklib::VIX_E_MNTAPI_VOLUME_NOT_WRITABLE,
            ),
        ];
        for (ours, theirs) in pairs {
            assert_eq!(ours, theirs);
            if ours != VIX_E_FAIL {
                assert_ne!(
                    disklib::error_text(ours),
                    "Unknown error",
                    "no text for {ours}"
                );
            }
        }
        assert_eq!(disklib::error_text(VIX_E_FAIL), "Unknown error");
    }
}
