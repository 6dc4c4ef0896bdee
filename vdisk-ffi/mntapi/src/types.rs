//! `vixMntapi.h`'s types and struct layouts (Linux x86-64, natural alignment), as
//! VDDK declares them. The enumerations are `uint32` typedefs with `#define`d values
//! (as vdisk-ffi does for `vixDiskLib.h`): the same size as VMware's C enums.
//!
//! The basic types at the top are `vixDiskLib.h`'s; they are left out of the
//! generated header, which includes `vixDiskLib.h` instead.
#![allow(non_snake_case, non_camel_case_types)]

use std::ffi::{c_char, c_void};

/// VDDK's 32-bit unsigned integer (from `vixDiskLib.h`).
pub type uint32 = u32;
/// VDDK's boolean: one byte, 0 or 1 (from `vixDiskLib.h`).
pub type Bool = c_char;
/// A VDDK error code (from `vixDiskLib.h`).
pub type VixError = u64;

/// An open disk of libvixDiskLib (opaque; from `vixDiskLib.h`).
pub struct VixDiskLibHandleStruct {
    _private: [u8; 0],
}
/// A disk handle of libvixDiskLib.
pub type VixDiskLibHandle = *mut VixDiskLibHandleStruct;

/// A connection of libvixDiskLib (opaque; from `vixDiskLib.h`).
pub struct VixDiskLibConnectParam {
    _private: [u8; 0],
}
/// A connection handle of libvixDiskLib.
pub type VixDiskLibConnection = *mut VixDiskLibConnectParam;

/// Placeholder for the C function type `void (const char *fmt, va_list args)`
/// (declared by `vixDiskLib.h`); only pointers to it are passed around.
pub type VixDiskLibGenericLogFunc = c_void;

/// The only version of this API: `VixMntapi_Init` takes 1.0.
pub const VIXMNTAPI_MAJOR_VERSION: uint32 = 1;
/// The minor version of this API (0).
pub const VIXMNTAPI_MINOR_VERSION: uint32 = 0;

/// A set of disks opened for mounting (opaque).
pub struct VixDiskSetHandleStruct {
    _private: [u8; 0],
}
/// A disk set handle.
pub type VixDiskSetHandle = *mut VixDiskSetHandleStruct;

/// A volume of a disk set (opaque).
pub struct VixVolumeHandleStruct {
    _private: [u8; 0],
}
/// A volume handle.
pub type VixVolumeHandle = *mut VixVolumeHandleStruct;

/// The family of the operating system found on a disk set (`VixOsFamily`).
pub type VixOsFamily = uint32;
/// No operating system found.
pub const VIXMNTAPI_NO_OS: VixOsFamily = 0;
/// Windows.
pub const VIXMNTAPI_WINDOWS: VixOsFamily = 1;
/// Any other operating system (Linux included).
pub const VIXMNTAPI_OTHER: VixOsFamily = 255;

/// The kind of a volume (`VixVolumeType`).
pub type VixVolumeType = uint32;
/// Unknown.
pub const VIXMNTAPI_UNKNOWN_VOLTYPE: VixVolumeType = 0;
/// A partition of an MBR (DOS) table, or a file system on the whole disk.
pub const VIXMNTAPI_BASIC_PARTITION: VixVolumeType = 1;
/// A partition of a GUID partition table.
pub const VIXMNTAPI_GPT_PARTITION: VixVolumeType = 2;
/// A Windows dynamic (LDM) volume (never reported by this library).
pub const VIXMNTAPI_DYNAMIC_VOLUME: VixVolumeType = 3;
/// An LVM logical volume (never reported by this library).
pub const VIXMNTAPI_LVM_VOLUME: VixVolumeType = 4;

/// What `VixMntapi_GetOsInfo` reports (40 bytes). Strings are never NULL (empty
/// when unknown); free the struct with `VixMntapi_FreeOsInfo`.
#[repr(C)]
#[derive(Debug)]
pub struct VixOsInfo {
    /// `VIXMNTAPI_WINDOWS`, or `VIXMNTAPI_OTHER` for Linux.
    pub family: VixOsFamily,
    /// Major version (Linux: from `VERSION_ID` in os-release; Windows: 0, unknown).
    pub majorVersion: uint32,
    /// Minor version (as `majorVersion`).
    pub minorVersion: uint32,
    /// Whether the system is 64-bit.
    pub osIs64Bit: Bool,
    /// The vendor (Linux: os-release `NAME`, else `ID`; Windows: `Microsoft`).
    pub vendor: *mut c_char,
    /// The edition (Linux: os-release `PRETTY_NAME`, else `VERSION_ID`).
    pub edition: *mut c_char,
    /// Where the system's files are: the mounted volume's folder (Linux) or its
    /// `Windows` folder.
    pub osFolder: *mut c_char,
}

/// What `VixMntapi_GetVolumeInfo` reports (32 bytes, then
/// `numGuestMountPoints - 1` more pointers). Free it with `VixMntapi_FreeVolumeInfo`.
#[repr(C)]
#[derive(Debug)]
pub struct VixVolumeInfo {
    /// The kind of volume.
    pub r#type: VixVolumeType,
    /// Whether the volume is mounted (by `VixMntapi_MountVolume` or
    /// `VixMntapi_GetOsInfo`).
    pub isMounted: Bool,
    /// The folder the volume is mounted on; NULL when not mounted.
    pub symbolicLink: *mut c_char,
    /// Entries in `inGuestMountPoints` (always 0: guest mount points are not read).
    pub numGuestMountPoints: usize,
    /// Where the guest mounts the volume (a flexible array).
    pub inGuestMountPoints: [*mut c_char; 1],
}

/// What `VixMntapi_GetDiskSetInfo` reports (16 bytes). Free it with
/// `VixMntapi_FreeDiskSetInfo`.
#[repr(C)]
#[derive(Debug)]
pub struct VixDiskSetInfo {
    /// The `VIXDISKLIB_FLAG_OPEN_*` flags of the set (read-only added when it was
    /// made read-only by the connection or the disk handles).
    pub openFlags: uint32,
    /// The folder the set's volumes are mounted in (one sub-folder per volume).
    pub mountPath: *mut c_char,
}

// The layouts of section 5 of the VDDK fact sheet (Linux x86-64).
const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<VixOsInfo>() == 40);
    assert!(offset_of!(VixOsInfo, majorVersion) == 4);
    assert!(offset_of!(VixOsInfo, minorVersion) == 8);
    assert!(offset_of!(VixOsInfo, osIs64Bit) == 12);
    assert!(offset_of!(VixOsInfo, vendor) == 16);
    assert!(offset_of!(VixOsInfo, edition) == 24);
    assert!(offset_of!(VixOsInfo, osFolder) == 32);
    assert!(size_of::<VixVolumeInfo>() == 32);
    assert!(offset_of!(VixVolumeInfo, isMounted) == 4);
    assert!(offset_of!(VixVolumeInfo, symbolicLink) == 8);
    assert!(offset_of!(VixVolumeInfo, numGuestMountPoints) == 16);
    assert!(offset_of!(VixVolumeInfo, inGuestMountPoints) == 24);
    assert!(size_of::<VixDiskSetInfo>() == 16);
    assert!(offset_of!(VixDiskSetInfo, mountPath) == 8);
};
