//! VDDK error codes (`VixError`) and their English texts.

use crate::types::VixError;

/// The operation was successful.
pub const VIX_OK: VixError = 0;
/// Unknown error.
pub const VIX_E_FAIL: VixError = 1;
/// Memory allocation failed: out of memory.
pub const VIX_E_OUT_OF_MEMORY: VixError = 2;
/// One of the parameters was invalid.
pub const VIX_E_INVALID_ARG: VixError = 3;
/// A file was not found.
pub const VIX_E_FILE_NOT_FOUND: VixError = 4;
/// This function cannot be performed because the handle is executing another function.
pub const VIX_E_OBJECT_IS_BUSY: VixError = 5;
/// The operation is not supported.
pub const VIX_E_NOT_SUPPORTED: VixError = 6;
/// A file access error occurred on the host or guest operating system.
pub const VIX_E_FILE_ERROR: VixError = 7;
/// An error occurred while writing a file; the disk is full.
pub const VIX_E_DISK_FULL: VixError = 8;
/// An error occurred while accessing a file: wrong file type.
pub const VIX_E_INCORRECT_FILE_TYPE: VixError = 9;
/// The operation was canceled.
pub const VIX_E_CANCELLED: VixError = 10;
/// The file is write-protected.
pub const VIX_E_FILE_READ_ONLY: VixError = 11;
/// The file already exists.
pub const VIX_E_FILE_ALREADY_EXISTS: VixError = 12;
/// You do not have access rights to this file.
pub const VIX_E_FILE_ACCESS_ERROR: VixError = 13;
/// The file system does not support large files.
pub const VIX_E_REQUIRES_LARGE_FILES: VixError = 14;
/// The file is already in use.
pub const VIX_E_FILE_ALREADY_LOCKED: VixError = 15;
/// The command is not supported on remote objects.
pub const VIX_E_NOT_SUPPORTED_ON_REMOTE_OBJECT: VixError = 20;
/// The file is too big for the filesystem.
pub const VIX_E_FILE_TOO_BIG: VixError = 21;
/// The file name is not valid.
pub const VIX_E_FILE_NAME_INVALID: VixError = 22;
/// Already exists.
pub const VIX_E_ALREADY_EXISTS: VixError = 23;
/// Buffer is too small.
pub const VIX_E_BUFFER_TOOSMALL: VixError = 24;
/// The request refers to an object that does not exist.
pub const VIX_E_OBJECT_NOT_FOUND: VixError = 25;
/// Unable to connect to the host.
pub const VIX_E_HOST_NOT_CONNECTED: VixError = 26;
/// The string parameter has incorrect encoding.
pub const VIX_E_INVALID_UTF8_STRING: VixError = 27;
/// The handle is not a valid VIX object.
pub const VIX_E_INVALID_HANDLE: VixError = 1000;
/// The operation is not supported on this type of handle.
pub const VIX_E_NOT_SUPPORTED_ON_HANDLE_TYPE: VixError = 1001;
/// Too many handles are open.
pub const VIX_E_TOO_MANY_HANDLES: VixError = 1002;
/// The specified parameter is invalid.
pub const VIX_E_DISK_INVAL: VixError = 16000;
/// The disk library has not been initialized.
pub const VIX_E_DISK_NOINIT: VixError = 16001;
/// The called function requires the virtual disk to be opened for I/O.
pub const VIX_E_DISK_NOIO: VixError = 16002;
/// The called function cannot be performed on partial chains; open the parent virtual disk.
pub const VIX_E_DISK_PARTIALCHAIN: VixError = 16003;
/// The specified virtual disk needs repair.
pub const VIX_E_DISK_NEEDSREPAIR: VixError = 16006;
/// You have requested access to an area of the virtual disk that is out of bounds.
pub const VIX_E_DISK_OUTOFRANGE: VixError = 16007;
/// The parent virtual disk has been modified since the child was created; the content ID of the parent does not match the parent content ID in the child.
pub const VIX_E_DISK_CID_MISMATCH: VixError = 16008;
/// The specified virtual disk cannot be shrunk because it is not the parent disk.
pub const VIX_E_DISK_CANTSHRINK: VixError = 16009;
/// The partition table on the physical disk has changed since the disk was created.
pub const VIX_E_DISK_PARTMISMATCH: VixError = 16010;
/// The disk was created with a newer product version and is not supported.
pub const VIX_E_DISK_UNSUPPORTEDDISKVERSION: VixError = 16011;
/// The parent of this virtual disk could not be opened.
pub const VIX_E_DISK_OPENPARENT: VixError = 16012;
/// The specified feature is not supported by this version.
pub const VIX_E_DISK_NOTSUPPORTED: VixError = 16013;
/// One or more required keys were not provided.
pub const VIX_E_DISK_NEEDKEY: VixError = 16014;
/// Will not create an unencrypted child of an encrypted disk without explicit request.
pub const VIX_E_DISK_NOKEYOVERRIDE: VixError = 16015;
/// Not an encrypted disk.
pub const VIX_E_DISK_NOTENCRYPTED: VixError = 16016;
/// No keys were supplied for encrypting the disk.
pub const VIX_E_DISK_NOKEY: VixError = 16017;
/// The partition table is invalid.
pub const VIX_E_DISK_INVALIDPARTITIONTABLE: VixError = 16018;
/// Only sparse extents with embedded descriptors can be encrypted.
pub const VIX_E_DISK_NOTNORMAL: VixError = 16019;
/// Not an encrypted descriptor file.
pub const VIX_E_DISK_NOTENCDESC: VixError = 16020;
/// The file system is not VMFS.
pub const VIX_E_DISK_NEEDVMFS: VixError = 16022;
/// The physical disk is too big.
pub const VIX_E_DISK_RAWTOOBIG: VixError = 16024;
/// The host's limit for open files has been exceeded.
pub const VIX_E_DISK_TOOMANYOPENFILES: VixError = 16027;
/// Too many levels of redo logs.
pub const VIX_E_DISK_TOOMANYREDO: VixError = 16028;
/// The physical disk is too small.
pub const VIX_E_DISK_RAWTOOSMALL: VixError = 16029;
/// Invalid disk chain: cannot mix hosted and managed style disks in the same chain.
pub const VIX_E_DISK_INVALIDCHAIN: VixError = 16030;
/// The specified key is not found in the disk database.
pub const VIX_E_DISK_KEY_NOTFOUND: VixError = 16052;
/// One or more required subsystems failed to initialize.
pub const VIX_E_DISK_SUBSYSTEM_INIT_FAIL: VixError = 16053;
/// Invalid connection handle.
pub const VIX_E_DISK_INVALID_CONNECTION: VixError = 16054;
/// Disk encoding error.
pub const VIX_E_DISK_ENCODING: VixError = 16061;
/// The disk is corrupted and unrepairable.
pub const VIX_E_DISK_CANTREPAIR: VixError = 16062;
/// The specified file is not a virtual disk.
pub const VIX_E_DISK_INVALIDDISK: VixError = 16063;
/// The host is not licensed for this feature.
pub const VIX_E_DISK_NOLICENSE: VixError = 16064;
/// The device does not exist.
pub const VIX_E_DISK_NODEVICE: VixError = 16065;
/// The operation is not supported on this type of device.
pub const VIX_E_DISK_UNSUPPORTEDDEVICE: VixError = 16066;
/// The parent virtual disk's capacity is not the same as child's capacity.
pub const VIX_E_DISK_CAPACITY_MISMATCH: VixError = 16067;
/// Disk type cannot be allowed as parent.
pub const VIX_E_DISK_PARENT_NOTALLOWED: VixError = 16068;
/// Both parent and child virtual disks are root links.
pub const VIX_E_DISK_ATTACH_ROOTLINK: VixError = 16069;
/// vdisk extension: a change ID cannot be used (the disk's change tracking was
/// restarted or cannot be trusted); take a full backup. Outside VMware's codes.
pub const VDISK_E_CHANGE_ID_REFUSED: VixError = 0x5644_0001;
/// Cannot connect to host.
pub const VIX_E_CANNOT_CONNECT_TO_HOST: VixError = 18000;
/// Only a local connection is supported.
pub const VIX_E_NOT_FOR_REMOTE_HOST: VixError = 18001;
/// The asynchronous operation has been queued.
pub const VIX_ASYNC: VixError = 25000;
/// Mixing synchronous and asynchronous I/O on one handle is not supported.
pub const VIX_E_ASYNC_MIXEDMODE_UNSUPPORTED: VixError = 26000;

/// The VMDB operation failed.
pub const VIX_E_VMDB: VixError = 16;
/// The job has not finished.
pub const VIX_E_UNFINISHED_JOB: VixError = 29;
/// A decryption key is required.
pub const VIX_E_NEED_KEY: VixError = 30;
/// The operation is already in progress.
pub const VIX_E_OPERATION_ALREADY_IN_PROGRESS: VixError = 31;
/// This operation is not licensed.
pub const VIX_E_LICENSE: VixError = 32;
/// The host is disconnected.
pub const VIX_E_VM_HOST_DISCONNECTED: VixError = 34;
/// Authentication failed.
pub const VIX_E_AUTHENTICATION_FAIL: VixError = 35;
/// The connection to the host was lost.
pub const VIX_E_HOST_CONNECTION_LOST: VixError = 36;
/// The name is already in use.
pub const VIX_E_DUPLICATE_NAME: VixError = 41;
/// An argument is too big.
pub const VIX_E_ARGUMENT_TOO_BIG: VixError = 44;
/// The disk parameter is invalid.
pub const VIX_E_HOST_DISK_INVALID_VALUE: VixError = 14003;
/// The disk sector size check failed.
pub const VIX_E_HOST_DISK_SECTORSIZE: VixError = 14004;
/// Read beyond the end of file.
pub const VIX_E_HOST_FILE_ERROR_EOF: VixError = 14005;
/// Error in protocol.
pub const VIX_E_HOST_NETBLKDEV_HANDSHAKE: VixError = 14006;
/// Unable to create a socket.
pub const VIX_E_HOST_SOCKET_CREATION_ERROR: VixError = 14007;
/// The specified server could not be contacted.
pub const VIX_E_HOST_SERVER_NOT_FOUND: VixError = 14008;
/// The server refused connection.
pub const VIX_E_HOST_NETWORK_CONN_REFUSED: VixError = 14009;
/// There was an error in communication.
pub const VIX_E_HOST_TCP_SOCKET_ERROR: VixError = 14010;
/// The connection was lost.
pub const VIX_E_HOST_TCP_CONN_LOST: VixError = 14011;
/// NBD_ERR_HASHFILE_VOLUME.
pub const VIX_E_HOST_NBD_HASHFILE_VOLUME: VixError = 14012;
/// NBD_ERR_HASHFILE_INIT.
pub const VIX_E_HOST_NBD_HASHFILE_INIT: VixError = 14013;
/// The server is shutting down.
pub const VIX_E_HOST_SERVER_SHUTDOWN: VixError = 14014;
/// The host name specification is invalid.
pub const VIX_E_INVALID_HOSTNAME_SPECIFICATION: VixError = 18002;

// The mount libraries' codes (libvixMntapi), as VDDK's header declares them with
// the other codes (two names keep VMware's spelling, PARTITONS and UNSUPPROTED).
/// The mount point was not found.
pub const VIX_E_MNTAPI_MOUNTPT_NOT_FOUND: VixError = 24000;
/// The mount point is already in use.
pub const VIX_E_MNTAPI_MOUNTPT_IN_USE: VixError = 24001;
/// The disk to mount was not found.
pub const VIX_E_MNTAPI_DISK_NOT_FOUND: VixError = 24002;
/// The disk is not mounted.
pub const VIX_E_MNTAPI_DISK_NOT_MOUNTED: VixError = 24003;
/// The disk is already mounted.
pub const VIX_E_MNTAPI_DISK_IS_MOUNTED: VixError = 24004;
/// The disk is not safe to mount.
pub const VIX_E_MNTAPI_DISK_NOT_SAFE: VixError = 24005;
/// The disk to mount cannot be opened.
pub const VIX_E_MNTAPI_DISK_CANT_OPEN: VixError = 24006;
/// The partitions of the disk cannot be read.
pub const VIX_E_MNTAPI_CANT_READ_PARTS: VixError = 24007;
/// The unmount program was not found.
pub const VIX_E_MNTAPI_UMOUNT_APP_NOT_FOUND: VixError = 24008;
/// The volume cannot be unmounted.
pub const VIX_E_MNTAPI_UMOUNT: VixError = 24009;
/// The disk has no mountable partitions.
pub const VIX_E_MNTAPI_NO_MOUNTABLE_PARTITONS: VixError = 24010;
/// The partition number is out of range.
pub const VIX_E_MNTAPI_PARTITION_RANGE: VixError = 24011;
/// Mounting needs permissions the caller does not have.
pub const VIX_E_MNTAPI_PERM: VixError = 24012;
/// The mount configuration cannot be read.
pub const VIX_E_MNTAPI_DICT: VixError = 24013;
/// The mount configuration is locked.
pub const VIX_E_MNTAPI_DICT_LOCKED: VixError = 24014;
/// Files of the volume are still open.
pub const VIX_E_MNTAPI_OPEN_HANDLES: VixError = 24015;
/// The mount folder cannot be created.
pub const VIX_E_MNTAPI_CANT_MAKE_VAR_DIR: VixError = 24016;
/// Mounting needs root privileges.
pub const VIX_E_MNTAPI_NO_ROOT: VixError = 24017;
/// The loop device setup failed.
pub const VIX_E_MNTAPI_LOOP_FAILED: VixError = 24018;
/// The mount service failed.
pub const VIX_E_MNTAPI_DAEMON: VixError = 24019;
/// Internal error of the mount library.
pub const VIX_E_MNTAPI_INTERNAL: VixError = 24020;
/// A system call of the mount library failed.
pub const VIX_E_MNTAPI_SYSTEM: VixError = 24021;
/// The connection details of the disk are missing.
pub const VIX_E_MNTAPI_NO_CONNECTION_DETAILS: VixError = 24022;
/// The requested mount library version is not supported.
pub const VIX_E_MNTAPI_INCOMPATIBLE_VERSION: VixError = 24300;
/// The operating system reported an error.
pub const VIX_E_MNTAPI_OS_ERROR: VixError = 24301;
/// The drive letter is in use.
pub const VIX_E_MNTAPI_DRIVE_LETTER_IN_USE: VixError = 24302;
/// The drive letter is already assigned.
pub const VIX_E_MNTAPI_DRIVE_LETTER_ALREADY_ASSIGNED: VixError = 24303;
/// The volume is not mounted.
pub const VIX_E_MNTAPI_VOLUME_NOT_MOUNTED: VixError = 24304;
/// The volume is already mounted.
pub const VIX_E_MNTAPI_VOLUME_ALREADY_MOUNTED: VixError = 24305;
/// The volume cannot be formatted.
pub const VIX_E_MNTAPI_FORMAT_FAILURE: VixError = 24306;
/// The driver needed for the volume is missing.
pub const VIX_E_MNTAPI_NO_DRIVER: VixError = 24307;
/// The disk is already opened by the mount library.
pub const VIX_E_MNTAPI_ALREADY_OPENED: VixError = 24308;
/// The requested item was not found.
pub const VIX_E_MNTAPI_ITEM_NOT_FOUND: VixError = 24309;
/// The boot loader is not supported.
pub const VIX_E_MNTAPI_UNSUPPROTED_BOOT_LOADER: VixError = 24310;
/// The operating system on the disk is not supported.
pub const VIX_E_MNTAPI_UNSUPPROTED_OS: VixError = 24311;
/// A text encoding conversion failed.
pub const VIX_E_MNTAPI_CODECONVERSION: VixError = 24312;
/// A registry write failed.
pub const VIX_E_MNTAPI_REGWRITE_ERROR: VixError = 24313;
/// Fault-tolerant volumes are not supported.
pub const VIX_E_MNTAPI_UNSUPPORTED_FT_VOLUME: VixError = 24314;
/// The partition was not found.
pub const VIX_E_MNTAPI_PARTITION_NOT_FOUND: VixError = 24315;
/// A file cannot be written into the volume.
pub const VIX_E_MNTAPI_PUTFILE_ERROR: VixError = 24316;
/// A file cannot be read from the volume.
pub const VIX_E_MNTAPI_GETFILE_ERROR: VixError = 24317;
/// The registry is not opened.
pub const VIX_E_MNTAPI_REG_NOT_OPENED: VixError = 24318;
/// A registry key cannot be deleted.
pub const VIX_E_MNTAPI_REGDELKEY_ERROR: VixError = 24319;
/// The partition table cannot be created.
pub const VIX_E_MNTAPI_CREATE_PARTITIONTABLE_ERROR: VixError = 24320;
/// The volume cannot be opened.
pub const VIX_E_MNTAPI_OPEN_FAILURE: VixError = 24321;
/// The volume is not writable.
pub const VIX_E_MNTAPI_VOLUME_NOT_WRITABLE: VixError = 24322;

/// The English text of `code` (the low 16 bits), as `GetErrorText` returns it.
pub fn error_text(code: VixError) -> &'static str {
    if code == VDISK_E_CHANGE_ID_REFUSED {
        return "The change ID cannot be used (change tracking was restarted or cannot be trusted): take a full backup";
    }
    match code & 0xFFFF {
        0 => "The operation was successful",
        1 => "Unknown error",
        2 => "Memory allocation failed: out of memory",
        3 => "One of the parameters was invalid",
        4 => "A file was not found",
        5 => "This function cannot be performed because the handle is executing another function",
        6 => "The operation is not supported",
        7 => "A file access error occurred on the host or guest operating system",
        8 => "An error occurred while writing a file; the disk is full",
        9 => "An error occurred while accessing a file: wrong file type",
        10 => "The operation was canceled",
        11 => "The file is write-protected",
        12 => "The file already exists",
        13 => "You do not have access rights to this file",
        14 => "The file system does not support large files",
        15 => "The file is already in use",
        20 => "The command is not supported on remote objects",
        21 => "The file is too big for the filesystem",
        22 => "The file name is not valid",
        23 => "Already exists",
        24 => "Buffer is too small",
        25 => "The request refers to an object that does not exist",
        26 => "Unable to connect to the host",
        27 => "The string parameter has incorrect encoding",
        1000 => "The handle is not a valid VIX object",
        1001 => "The operation is not supported on this type of handle",
        1002 => "Too many handles are open",
        16000 => "The specified parameter is invalid",
        16001 => "The disk library has not been initialized",
        16002 => "The called function requires the virtual disk to be opened for I/O",
        16003 => "The called function cannot be performed on partial chains; open the parent virtual disk",
        16006 => "The specified virtual disk needs repair",
        16007 => "You have requested access to an area of the virtual disk that is out of bounds",
        16008 => "The parent virtual disk has been modified since the child was created; the content ID of the parent does not match the parent content ID in the child",
        16009 => "The specified virtual disk cannot be shrunk because it is not the parent disk",
        16010 => "The partition table on the physical disk has changed since the disk was created",
        16011 => "The disk was created with a newer product version and is not supported",
        16012 => "The parent of this virtual disk could not be opened",
        16013 => "The specified feature is not supported by this version",
        16014 => "One or more required keys were not provided",
        16015 => "Will not create an unencrypted child of an encrypted disk without explicit request",
        16016 => "Not an encrypted disk",
        16017 => "No keys were supplied for encrypting the disk",
        16018 => "The partition table is invalid",
        16019 => "Only sparse extents with embedded descriptors can be encrypted",
        16020 => "Not an encrypted descriptor file",
        16022 => "The file system is not VMFS",
        16024 => "The physical disk is too big",
        16027 => "The host's limit for open files has been exceeded",
        16028 => "Too many levels of redo logs",
        16029 => "The physical disk is too small",
        16030 => "Invalid disk chain: cannot mix hosted and managed style disks in the same chain",
        16052 => "The specified key is not found in the disk database",
        16053 => "One or more required subsystems failed to initialize",
        16054 => "Invalid connection handle",
        16061 => "Disk encoding error",
        16062 => "The disk is corrupted and unrepairable",
        16063 => "The specified file is not a virtual disk",
        16064 => "The host is not licensed for this feature",
        16065 => "The device does not exist",
        16066 => "The operation is not supported on this type of device",
        16067 => "The parent virtual disk's capacity is not the same as child's capacity",
        16068 => "Disk type cannot be allowed as parent",
        16069 => "Both parent and child virtual disks are root links",
        18000 => "Cannot connect to host",
        18001 => "Only a local connection is supported",
        25000 => "The asynchronous operation has been queued",
        26000 => "Mixing synchronous and asynchronous I/O on one handle is not supported",
        16 => "The VMDB operation failed",
        29 => "The job has not finished",
        30 => "A decryption key is required",
        31 => "The operation is already in progress",
        32 => "This operation is not licensed",
        34 => "The host is disconnected",
        35 => "Authentication failed",
        36 => "The connection to the host was lost",
        41 => "The name is already in use",
        44 => "An argument is too big",
        14003 => "The disk parameter is invalid",
        14004 => "The disk sector size check failed",
        14005 => "Read beyond the end of file",
        14006 => "Error in protocol",
        14007 => "Unable to create a socket",
        14008 => "The specified server could not be contacted",
        14009 => "The server refused connection",
        14010 => "There was an error in communication",
        14011 => "The connection was lost",
        14012 => "NBD_ERR_HASHFILE_VOLUME",
        14013 => "NBD_ERR_HASHFILE_INIT",
        14014 => "The server is shutting down",
        18002 => "The host name specification is invalid",
        24000 => "The mount point was not found",
        24001 => "The mount point is already in use",
        24002 => "The disk to mount was not found",
        24003 => "The disk is not mounted",
        24004 => "The disk is already mounted",
        24005 => "The disk is not safe to mount",
        24006 => "The disk to mount cannot be opened",
        24007 => "The partitions of the disk cannot be read",
        24008 => "The unmount program was not found",
        24009 => "The volume cannot be unmounted",
        24010 => "The disk has no mountable partitions",
        24011 => "The partition number is out of range",
        24012 => "Mounting needs permissions the caller does not have",
        24013 => "The mount configuration cannot be read",
        24014 => "The mount configuration is locked",
        24015 => "Files of the volume are still open",
        24016 => "The mount folder cannot be created",
        24017 => "Mounting needs root privileges",
        24018 => "The loop device setup failed",
        24019 => "The mount service failed",
        24020 => "Internal error of the mount library",
        24021 => "A system call of the mount library failed",
        24022 => "The connection details of the disk are missing",
        24300 => "The requested mount library version is not supported",
        24301 => "The operating system reported an error",
        24302 => "The drive letter is in use",
        24303 => "The drive letter is already assigned",
        24304 => "The volume is not mounted",
        24305 => "The volume is already mounted",
        24306 => "The volume cannot be formatted",
        24307 => "The driver needed for the volume is missing",
        24308 => "The disk is already opened by the mount library",
        24309 => "The requested item was not found",
        24310 => "The boot loader is not supported",
        24311 => "The operating system on the disk is not supported",
        24312 => "A text encoding conversion failed",
        24313 => "A registry write failed",
        24314 => "Fault-tolerant volumes are not supported",
        24315 => "The partition was not found",
        24316 => "A file cannot be written into the volume",
        24317 => "A file cannot be read from the volume",
        24318 => "The registry is not opened",
        24319 => "A registry key cannot be deleted",
        24320 => "The partition table cannot be created",
        24321 => "The volume cannot be opened",
        24322 => "The volume is not writable",
        _ => "Unknown error",
    }
}
