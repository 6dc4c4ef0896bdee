//! VDDK's C types, constants and struct layouts (Linux x86-64, natural alignment),
//! as `vixDiskLib.h` declares them. Enumerations are plain `uint32` typedefs with
//! `#define`d values, so a value a C caller passes can never be an invalid Rust enum.
#![allow(non_snake_case, non_camel_case_types)]

use std::ffi::{c_char, c_int, c_long, c_void};

/// VDDK's 64-bit unsigned integer.
pub type uint64 = u64;
/// VDDK's 32-bit unsigned integer.
pub type uint32 = u32;
/// VDDK's 16-bit unsigned integer.
pub type uint16 = u16;
/// VDDK's byte.
pub type uint8 = u8;
/// VDDK's boolean: one byte, 0 or 1.
pub type Bool = c_char;

/// A VDDK error code (`VIX_OK` is 0).
pub type VixError = uint64;
/// A count or offset in 512-byte sectors.
pub type VixDiskLibSectorType = uint64;

/// Bytes per sector.
pub const VIXDISKLIB_SECTOR_SIZE: u32 = 512;
/// Open flag: do not use the host's cache.
pub const VIXDISKLIB_FLAG_OPEN_UNBUFFERED: u32 = 1;
/// Open flag: open only the named link, not its parents.
pub const VIXDISKLIB_FLAG_OPEN_SINGLE_LINK: u32 = 2;
/// Open flag: read-only.
pub const VIXDISKLIB_FLAG_OPEN_READ_ONLY: u32 = 4;
/// Open flag: zlib wire compression (NBD transports; ignored for local files).
pub const VIXDISKLIB_FLAG_OPEN_COMPRESSION_ZLIB: u32 = 16;
/// Open flag: fastlz wire compression (ignored for local files).
pub const VIXDISKLIB_FLAG_OPEN_COMPRESSION_FASTLZ: u32 = 32;
/// Open flag: skipz wire compression (ignored for local files).
pub const VIXDISKLIB_FLAG_OPEN_COMPRESSION_SKIPZ: u32 = 64;
/// Bits reserved for the compression flags.
pub const VIXDISKLIB_FLAG_OPEN_COMPRESSION_MASK: u32 = 0x03f0;
/// Smallest chunk of `QueryAllocatedBlocks`, in sectors.
pub const VIXDISKLIB_MIN_CHUNK_SIZE: u64 = 128;
/// Largest chunk of `QueryAllocatedBlocks`, in sectors.
pub const VIXDISKLIB_MAX_CHUNK_SIZE: u64 = 131072;
/// Most chunks one `QueryAllocatedBlocks` call may cover.
pub const VIXDISKLIB_MAX_CHUNK_NUMBER: u64 = 512 * 1024;

/// Disk types (`VixDiskLibDiskType`).
pub type VixDiskLibDiskType = uint32;
/// One growable file.
pub const VIXDISKLIB_DISK_MONOLITHIC_SPARSE: VixDiskLibDiskType = 1;
/// One preallocated file.
pub const VIXDISKLIB_DISK_MONOLITHIC_FLAT: VixDiskLibDiskType = 2;
/// Growable, split in 2 GB files.
pub const VIXDISKLIB_DISK_SPLIT_SPARSE: VixDiskLibDiskType = 3;
/// Preallocated, split in 2 GB files.
pub const VIXDISKLIB_DISK_SPLIT_FLAT: VixDiskLibDiskType = 4;
/// ESX preallocated.
pub const VIXDISKLIB_DISK_VMFS_FLAT: VixDiskLibDiskType = 5;
/// Compressed, for streaming.
pub const VIXDISKLIB_DISK_STREAM_OPTIMIZED: VixDiskLibDiskType = 6;
/// ESX thin provisioned.
pub const VIXDISKLIB_DISK_VMFS_THIN: VixDiskLibDiskType = 7;
/// ESX copy-on-write delta.
pub const VIXDISKLIB_DISK_VMFS_SPARSE: VixDiskLibDiskType = 8;
/// Unknown type.
pub const VIXDISKLIB_DISK_UNKNOWN: VixDiskLibDiskType = 256;

/// Adapter types (`VixDiskLibAdapterType`).
pub type VixDiskLibAdapterType = uint32;
/// IDE.
pub const VIXDISKLIB_ADAPTER_IDE: VixDiskLibAdapterType = 1;
/// BusLogic SCSI.
pub const VIXDISKLIB_ADAPTER_SCSI_BUSLOGIC: VixDiskLibAdapterType = 2;
/// LSI Logic SCSI (also reported for other SCSI controllers).
pub const VIXDISKLIB_ADAPTER_SCSI_LSILOGIC: VixDiskLibAdapterType = 3;
/// Unknown adapter.
pub const VIXDISKLIB_ADAPTER_UNKNOWN: VixDiskLibAdapterType = 256;

/// Hardware version: Workstation 4.
pub const VIXDISKLIB_HWVERSION_WORKSTATION_4: u16 = 3;
/// Hardware version: Workstation 5.
pub const VIXDISKLIB_HWVERSION_WORKSTATION_5: u16 = 4;
/// Hardware version: ESX 3.0.
pub const VIXDISKLIB_HWVERSION_ESX30: u16 = 4;
/// Hardware version: Workstation 6.
pub const VIXDISKLIB_HWVERSION_WORKSTATION_6: u16 = 6;
/// Hardware version: ESX 4.x.
pub const VIXDISKLIB_HWVERSION_ESX4X: u16 = 7;
/// Hardware version: ESX 5.0.
pub const VIXDISKLIB_HWVERSION_ESX50: u16 = 8;
/// Hardware version: ESX 5.1.
pub const VIXDISKLIB_HWVERSION_ESX51: u16 = 9;
/// Hardware version: ESX 5.5.
pub const VIXDISKLIB_HWVERSION_ESX55: u16 = 10;
/// Hardware version: ESX 6.0.
pub const VIXDISKLIB_HWVERSION_ESX60: u16 = 11;
/// Hardware version: ESX 6.5.
pub const VIXDISKLIB_HWVERSION_ESX65: u16 = 13;
/// The current hardware version.
pub const VIXDISKLIB_HWVERSION_CURRENT: u16 = 13;

/// Credential types (`VixDiskLibCredType`).
pub type VixDiskLibCredType = uint32;
/// User name and password.
pub const VIXDISKLIB_CRED_UID: VixDiskLibCredType = 1;
/// vSphere session cookie.
pub const VIXDISKLIB_CRED_SESSIONID: VixDiskLibCredType = 2;
/// Internal ticket.
pub const VIXDISKLIB_CRED_TICKETID: VixDiskLibCredType = 3;
/// Windows SSPI.
pub const VIXDISKLIB_CRED_SSPI: VixDiskLibCredType = 4;
/// Unknown credentials.
pub const VIXDISKLIB_CRED_UNKNOWN: VixDiskLibCredType = 256;

/// Connection spec types (`VixDiskLibSpecType`).
pub type VixDiskLibSpecType = uint32;
/// A virtual machine (`vmxSpec`).
pub const VIXDISKLIB_SPEC_VMX: VixDiskLibSpecType = 0;
/// A First Class Disk.
pub const VIXDISKLIB_SPEC_VSTORAGE_OBJECT: VixDiskLibSpecType = 1;
/// Unknown spec.
pub const VIXDISKLIB_SPEC_UNKNOWN: VixDiskLibSpecType = 256;

/// Cylinders, heads, sectors (12 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VixDiskLibGeometry {
    /// Cylinders.
    pub cylinders: uint32,
    /// Heads.
    pub heads: uint32,
    /// Sectors per track.
    pub sectors: uint32,
}

/// User name and password credentials.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VixDiskLibUidPasswdCreds {
    /// User name.
    pub userName: *mut c_char,
    /// Password.
    pub password: *mut c_char,
}

/// Session cookie credentials.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VixDiskLibSessionIdCreds {
    /// The `vmware_soap_session` cookie.
    pub cookie: *mut c_char,
    /// User name.
    pub userName: *mut c_char,
    /// Key (password).
    pub key: *mut c_char,
}

/// Internal ticket (opaque).
pub struct VixDiskLibTicketId {
    _private: [u8; 0],
}

/// The credentials of a connection (24 bytes).
#[repr(C)]
#[derive(Clone, Copy)]
pub union VixDiskLibCreds {
    /// `VIXDISKLIB_CRED_UID`.
    pub uid: VixDiskLibUidPasswdCreds,
    /// `VIXDISKLIB_CRED_SESSIONID`.
    pub sessionId: VixDiskLibSessionIdCreds,
    /// `VIXDISKLIB_CRED_TICKETID` (internal).
    pub ticketId: *mut VixDiskLibTicketId,
}

/// A First Class Disk (24 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VixDiskLibVStorageObjectSpec {
    /// The disk's UUID.
    pub id: *mut c_char,
    /// `datastore-N`.
    pub datastoreMoRef: *mut c_char,
    /// Snapshot UUID (optional).
    pub ssId: *mut c_char,
}

/// The spec of a connection (24 bytes).
#[repr(C)]
#[derive(Clone, Copy)]
pub union VixDiskLibConnectSpec {
    /// `VIXDISKLIB_SPEC_VSTORAGE_OBJECT`.
    pub vStorageObjSpec: VixDiskLibVStorageObjectSpec,
}

/// Internal connection state (opaque).
pub struct VixDiskLibConnectParamsState {
    _private: [u8; 0],
}

/// Connection parameters (128 bytes in the 6.7+ layout; callers may pass the shorter
/// 72- or 80-byte layouts, so nothing past `vimApiVer` is read from a caller's struct).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct VixDiskLibConnectParams {
    /// VM (`moref=...`); NULL for local files.
    pub vmxSpec: *mut c_char,
    /// Host; NULL for local files.
    pub serverName: *mut c_char,
    /// SSL thumbprint.
    pub thumbPrint: *mut c_char,
    /// Unused.
    pub privateUse: c_long,
    /// Credential type.
    pub credType: VixDiskLibCredType,
    /// Credentials.
    pub creds: VixDiskLibCreds,
    /// Port (0: 443).
    pub port: uint32,
    /// NFC port (0: 902).
    pub nfcHostPort: uint32,
    /// Unused.
    pub vimApiVer: *mut c_char,
    /// Internal.
    pub reserved: [c_char; 8],
    /// Internal.
    pub state: *mut VixDiskLibConnectParamsState,
    /// First Class Disk spec.
    pub spec: VixDiskLibConnectSpec,
    /// Spec type.
    pub specType: VixDiskLibSpecType,
}

/// What `VixDiskLib_GetInfo` reports (64 bytes, the 7.0+ layout).
#[repr(C)]
#[derive(Debug)]
pub struct VixDiskLibInfo {
    /// BIOS geometry.
    pub biosGeo: VixDiskLibGeometry,
    /// Physical geometry.
    pub physGeo: VixDiskLibGeometry,
    /// Capacity in sectors.
    pub capacity: VixDiskLibSectorType,
    /// Adapter type.
    pub adapterType: VixDiskLibAdapterType,
    /// Links in the chain (base disk and deltas).
    pub numLinks: c_int,
    /// The top link's parent name, NULL for a base disk.
    pub parentFileNameHint: *mut c_char,
    /// `ddb.uuid`, or NULL.
    pub uuid: *mut c_char,
    /// Logical sector size in bytes.
    pub logicalSectorSize: uint32,
    /// Physical sector size in bytes.
    pub physicalSectorSize: uint32,
}

/// What to create (32 bytes, the 7.0+ layout).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VixDiskLibCreateParams {
    /// Disk type.
    pub diskType: VixDiskLibDiskType,
    /// Adapter type.
    pub adapterType: VixDiskLibAdapterType,
    /// Virtual hardware version.
    pub hwVersion: uint16,
    /// Capacity in sectors.
    pub capacity: VixDiskLibSectorType,
    /// Logical sector size (0: 512).
    pub logicalSectorSize: uint32,
    /// Physical sector size (0: 512).
    pub physicalSectorSize: uint32,
}

/// One range of sectors.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VixDiskLibBlock {
    /// First sector.
    pub offset: VixDiskLibSectorType,
    /// Sectors.
    pub length: VixDiskLibSectorType,
}

/// A list of ranges (`numBlocks` entries follow the header).
#[repr(C)]
#[derive(Debug)]
pub struct VixDiskLibBlockList {
    /// Entries in `blocks`.
    pub numBlocks: uint32,
    /// The ranges (a flexible array).
    pub blocks: [VixDiskLibBlock; 1],
}

/// An open disk (opaque).
pub struct VixDiskLibHandleStruct {
    _private: [u8; 0],
}

/// A handle of an open disk.
pub type VixDiskLibHandle = *mut VixDiskLibHandleStruct;

/// A connection (opaque).
pub struct VixDiskLibConnectParam {
    _private: [u8; 0],
}

/// A connection handle.
pub type VixDiskLibConnection = *mut VixDiskLibConnectParam;

/// Placeholder for the C function type `void (const char *fmt, va_list args)`; the
/// header declares the real typedef. Only pointers to it are passed around.
pub type VixDiskLibGenericLogFunc = c_void;

/// Progress callback: percent done; the return value is ignored.
pub type VixDiskLibProgressFunc =
    Option<unsafe extern "C" fn(progressData: *mut c_void, percentCompleted: c_int) -> Bool>;

/// Completion callback of asynchronous reads and writes.
pub type VixDiskLibCompletionCB =
    Option<unsafe extern "C" fn(cbData: *mut c_void, result: VixError)>;
