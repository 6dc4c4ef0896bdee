//! Disk sets: opening (from a connection and names, or from open disk handles),
//! their information, their volumes, the operating system on them, closing.

use std::ffi::{c_char, c_void};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use vdisk::{OpenOptions, VirtualDisk};
use vdisk_nbd::client::RemoteSpec;

use crate::errors::{
    VIX_E_DISK_NOINIT, VIX_E_INVALID_ARG, VIX_E_MNTAPI_CANT_MAKE_VAR_DIR,
    VIX_E_MNTAPI_CANT_READ_PARTS, VIX_E_MNTAPI_ITEM_NOT_FOUND, VIX_E_NOT_SUPPORTED,
};
use crate::guest::{self, OsFound};
use crate::state::{self, lock, Volume};
use crate::types::{
    uint32, Bool, VixDiskLibConnection, VixDiskLibHandle, VixDiskSetHandle, VixDiskSetInfo,
    VixError, VixOsInfo, VixVolumeHandle,
};
use crate::{
    c_path, calloc_struct, disklib, guard, guard_void, log, out_ptr, volumes, CStrings, FfiError,
};

/// `VIXDISKLIB_FLAG_OPEN_UNBUFFERED` (vixDiskLib.h).
const FLAG_UNBUFFERED: u32 = 1;
/// `VIXDISKLIB_FLAG_OPEN_SINGLE_LINK`.
const FLAG_SINGLE_LINK: u32 = 2;
/// `VIXDISKLIB_FLAG_OPEN_READ_ONLY`.
const FLAG_READ_ONLY: u32 = 4;
/// `VIXDISKLIB_FLAG_OPEN_COMPRESSION_MASK` (wire compression; nothing to do locally).
const FLAG_COMPRESSION_MASK: u32 = 0x03f0;

/// Opens the disk `diskNames[0]` (the only one: on Linux a set holds one disk) for
/// mounting, with VixDiskLib open flags (`VIXDISKLIB_FLAG_OPEN_READ_ONLY`: volumes can
/// only be mounted read-only; `SINGLE_LINK` is refused, volumes are mounted from the
/// whole chain). `connection` must be a live connection of vdisk's
/// libvixDiskLib.so.8, loaded in the process. The disk's partition table is read now;
/// the disk itself is opened again by each mount.
///
/// On a remote connection (`serverName` set: the `nbd`/`nbdssl` transports),
/// `diskNames[0]` is the export, as for `VixDiskLib_Open`, and each mount connects
/// to it again with the connection's options (TLS, thumbprint). Read-write mounts
/// of a remote disk are non-persistent - the export is only read, writes go to a
/// local redo log thrown away at dismount - unless the configuration file says
/// `vdisk.mntapi.remoteWrites = "persistent"`.
///
/// # Safety
/// `diskNames` must point to `numberOfDisks` NUL-terminated strings; `handle` must be
/// a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn VixMntapi_OpenDisks(
    connection: VixDiskLibConnection,
    diskNames: *mut *const c_char,
    numberOfDisks: usize,
    openFlags: uint32,
    handle: *mut VixDiskSetHandle,
) -> VixError {
    guard("VixMntapi_OpenDisks", || {
        // SAFETY: per the contract.
        let handle = unsafe { out_ptr(handle, std::ptr::null_mut(), "handle") }?;
        check_initialised()?;
        check_count(numberOfDisks)?;
        if diskNames.is_null() {
            return Err(FfiError::new(VIX_E_INVALID_ARG, "diskNames is NULL"));
        }
        let connection_read_only = disklib::connection_read_only(connection)?;
        // SAFETY: `diskNames` holds numberOfDisks (= 1) pointers per the contract.
        let name = unsafe { *diskNames };
        // SAFETY: NULL or NUL-terminated per the contract.
        let path = unsafe { c_path(name, "diskNames[0]") }?;
        let disk = match disklib::connection_remote_spec(connection, &path)? {
            Some(spec) => Source::Remote(Box::new(spec)),
            None => Source::Local(&path),
        };
        let set = open_set(disk, openFlags, connection_read_only)?;
        // SAFETY: checked non-NULL, valid for a write per the contract.
        unsafe { handle.write(set as VixDiskSetHandle) };
        Ok(())
    })
}

/// Builds a set from disks already open in libvixDiskLib (one on Linux). As this
/// library mounts a disk by opening its file again, the handle must have been opened
/// with `VIXDISKLIB_FLAG_OPEN_READ_ONLY` (a writable handle holds the disk's
/// exclusive lock); the set is read-only. `openMode` is 0 or
/// `VIXDISKLIB_FLAG_OPEN_READ_ONLY`. The caller closes the disk handles after
/// `VixMntapi_CloseDiskSet`. A handle of a remote disk may be read-write (there is
/// no local lock): the mounts connect to its export again with its options, and
/// read-write mounts are non-persistent as with `VixMntapi_OpenDisks`; the set is
/// read-only if the handle or `openMode` is.
///
/// # Safety
/// `diskHandles` must point to `numberOfDisks` handles; `handle` must be a valid
/// pointer.
#[no_mangle]
pub unsafe extern "C" fn VixMntapi_OpenDiskSet(
    diskHandles: *mut VixDiskLibHandle,
    numberOfDisks: usize,
    openMode: uint32,
    handle: *mut VixDiskSetHandle,
) -> VixError {
    guard("VixMntapi_OpenDiskSet", || {
        // SAFETY: per the contract.
        let handle = unsafe { out_ptr(handle, std::ptr::null_mut(), "handle") }?;
        check_initialised()?;
        check_count(numberOfDisks)?;
        if diskHandles.is_null() {
            return Err(FfiError::new(VIX_E_INVALID_ARG, "diskHandles is NULL"));
        }
        if openMode & !FLAG_READ_ONLY != 0 {
            return Err(FfiError::new(
                VIX_E_INVALID_ARG,
                format!("openMode {openMode:#x}: only 0 or VIXDISKLIB_FLAG_OPEN_READ_ONLY"),
            ));
        }
        // SAFETY: `diskHandles` holds numberOfDisks (= 1) handles per the contract.
        let disk = unsafe { *diskHandles };
        let (path, flags) = disklib::disk_handle(disk)?;
        if let Some(spec) = disklib::disk_handle_remote_spec(disk)? {
            // A remote disk has no lock here: the mounts connect again, read-only
            // if the handle is.
            let read_only = flags & FLAG_READ_ONLY != 0;
            let set = open_set(Source::Remote(Box::new(spec)), flags | openMode, read_only)?;
            // SAFETY: checked non-NULL, valid for a write per the contract.
            unsafe { handle.write(set as VixDiskSetHandle) };
            return Ok(());
        }
        if flags & FLAG_READ_ONLY == 0 {
            return Err(FfiError::new(
                VIX_E_NOT_SUPPORTED,
                format!(
                    "the disk handle of {} is open read-write, and its exclusive lock keeps \
                     the mounts from opening the disk: open it with \
                     VIXDISKLIB_FLAG_OPEN_READ_ONLY, or use VixMntapi_OpenDisks",
                    path.display()
                ),
            ));
        }
        let set = open_set(Source::Local(&path), flags | openMode, true)?;
        // SAFETY: checked non-NULL, valid for a write per the contract.
        unsafe { handle.write(set as VixDiskSetHandle) };
        Ok(())
    })
}

fn check_initialised() -> Result<(), FfiError> {
    state::config()
        .map(|_| ())
        .ok_or_else(|| FfiError::new(VIX_E_DISK_NOINIT, "VixMntapi_Init has not been called"))
}

fn check_count(n: usize) -> Result<(), FfiError> {
    match n {
        1 => Ok(()),
        0 => Err(FfiError::new(VIX_E_INVALID_ARG, "numberOfDisks is 0")),
        n => Err(FfiError::new(
            VIX_E_NOT_SUPPORTED,
            format!(
                "numberOfDisks is {n}: on Linux a disk set holds exactly one disk \
                 (dynamic volumes over several disks are not supported)"
            ),
        )),
    }
}

/// Where a set's disk is.
enum Source<'a> {
    /// A disk file (descriptor) on this machine.
    Local(&'a Path),
    /// A disk on a remote connection, as libvixDiskLib reaches it.
    Remote(Box<RemoteSpec>),
}

/// Opens the set of a disk: checks the flags, opens the disk as they say (so that a
/// missing, locked or read-only disk fails now), reads its partition table, makes
/// the set's folder and registers it.
fn open_set(source: Source<'_>, flags: u32, forced_read_only: bool) -> Result<usize, FfiError> {
    let config = state::config()
        .ok_or_else(|| FfiError::new(VIX_E_DISK_NOINIT, "VixMntapi_Init has not been called"))?;
    let known = FLAG_UNBUFFERED | FLAG_SINGLE_LINK | FLAG_READ_ONLY | FLAG_COMPRESSION_MASK;
    if flags & !known != 0 {
        return Err(FfiError::new(
            VIX_E_INVALID_ARG,
            format!("unknown open flags {:#x}", flags & !known),
        ));
    }
    if flags & FLAG_SINGLE_LINK != 0 {
        return Err(FfiError::new(
            VIX_E_NOT_SUPPORTED,
            "VIXDISKLIB_FLAG_OPEN_SINGLE_LINK: volumes are mounted from the whole chain of links",
        ));
    }
    let read_only = forced_read_only || flags & FLAG_READ_ONLY != 0;
    let flags = if read_only {
        flags | FLAG_READ_ONLY
    } else {
        flags
    };
    let (disk_path, table, remote) = match source {
        Source::Local(path) => {
            let (disk_path, table) = local_partitions(path, read_only)?;
            (disk_path, table, None)
        }
        Source::Remote(spec) => {
            let spec = spec.read_only(read_only || spec.options.read_only);
            // Only a set that writes to the server needs a writable export.
            let writes = !spec.options.read_only && config.remote_persistent;
            let (disk_path, table) = remote_partitions(&spec.read_only(!writes))?;
            (disk_path, table, Some(spec))
        }
    };
    for w in &table.warnings {
        log::log(&format!(
            "VixMntapi: partition table of {}: {w}",
            disk_path.display()
        ));
    }
    let specs = volumes::volumes(&table);
    let id = state::reserve(specs.len());
    let base = config
        .tmp_directory
        .unwrap_or_else(vdisk_mount::volume::runtime_dir);
    make_base(&base)?;
    sweep_dead(&base);
    let dir = base.join(format!("vixmntapi-{}-{id}", std::process::id()));
    state::make_dir(&dir)?;
    let remote_persistent = config.remote_persistent;
    log::log(&format!(
        "VixMntapi: opened {} ({}): {} volume(s), mount folder {}",
        disk_path.display(),
        match (read_only, &remote) {
            (true, _) => "read-only",
            (false, Some(_)) if !remote_persistent => {
                "remote, read-write mounts are non-persistent"
            }
            (false, Some(_)) => "remote, read-write mounts write to the server",
            (false, None) => "read-write",
        },
        specs.len(),
        dir.display()
    ));
    let set = state::DiskSet {
        disk: disk_path,
        remote,
        remote_persistent,
        flags,
        read_only,
        dir: dir.clone(),
        volumes: Vec::new(),
    };
    state::add_set(id, set, specs).ok_or_else(|| {
        let _ = std::fs::remove_dir(&dir);
        FfiError::new(VIX_E_DISK_NOINIT, "VixMntapi_Exit ran meanwhile")
    })
}

/// Opens the local disk at `path` (writable unless `read_only`, so that a locked
/// disk fails now) and reads its partition table; returns its absolute path too.
fn local_partitions(
    path: &Path,
    read_only: bool,
) -> Result<(PathBuf, vdisk_mount::PartitionTable), FfiError> {
    let disk_path = std::path::absolute(path)
        .map_err(|e| FfiError::new(VIX_E_INVALID_ARG, format!("{}: {e}", path.display())))?;
    let disk = OpenOptions::new()
        .write(!read_only)
        .open(&disk_path)
        .map_err(|e| {
            FfiError::new(
                e.kind().vix_code(),
                format!("cannot open disk {}: {e}", disk_path.display()),
            )
        })?;
    let table = vdisk_mount::read_partitions(&disk);
    let closed = disk.close();
    let table = table.map_err(|e| {
        FfiError::new(
            VIX_E_MNTAPI_CANT_READ_PARTS,
            format!(
                "cannot read the partition table of {}: {e}",
                disk_path.display()
            ),
        )
    })?;
    closed.map_err(|e| {
        FfiError::new(
            e.kind().vix_code(),
            format!("closing {}: {e}", disk_path.display()),
        )
    })?;
    Ok((disk_path, table))
}

/// Opens a remote disk as `spec` says (a missing export, or a writable open of a
/// read-only one, fails now) and reads its partition table; the disk is named by
/// its URI.
fn remote_partitions(
    spec: &RemoteSpec,
) -> Result<(PathBuf, vdisk_mount::PartitionTable), FfiError> {
    let uri = spec.uri();
    let disk = spec
        .open()
        .map_err(|e| FfiError::new(e.kind().vix_code(), format!("cannot open disk {uri}: {e}")))?;
    if !spec.options.read_only && !disk.is_writable() {
        return Err(FfiError::new(
            vdisk::ErrorKind::ReadOnly.vix_code(),
            format!(
                "{uri} is read-only on its server, and vdisk.mntapi.remoteWrites is \
                 persistent: open the set with VIXDISKLIB_FLAG_OPEN_READ_ONLY"
            ),
        ));
    }
    let table = vdisk_mount::read_partitions(&vdisk_mount::DiskSource(&disk));
    let closed = disk.close();
    let table = table.map_err(|e| {
        FfiError::new(
            VIX_E_MNTAPI_CANT_READ_PARTS,
            format!("cannot read the partition table of {uri}: {e}"),
        )
    })?;
    closed.map_err(|e| FfiError::new(e.kind().vix_code(), format!("closing {uri}: {e}")))?;
    Ok((PathBuf::from(uri), table))
}

/// Creates the folder mount folders go in, if missing (mode 0700).
fn make_base(base: &Path) -> Result<(), FfiError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(base)
        .map_err(|e| {
            FfiError::new(
                VIX_E_MNTAPI_CANT_MAKE_VAR_DIR,
                format!("cannot create {}: {e}", base.display()),
            )
        })
}

/// Removes the empty mount folders of processes that died without closing their
/// sets (`vixmntapi-PID-N` with no process PID). Only empty folders are removed
/// (`rmdir`): a folder something is still mounted on stays (`vdisk-mount -k DISK`
/// unmounts what such a process left).
fn sweep_dead(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("vixmntapi-"))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let dir = e.path();
        if let Ok(volumes) = std::fs::read_dir(&dir) {
            for v in volumes.flatten() {
                let _ = std::fs::remove_dir(v.path());
            }
        }
        if std::fs::remove_dir(&dir).is_ok() {
            log::log(&format!(
                "VixMntapi: removed {}, left by process {pid}",
                dir.display()
            ));
        }
    }
}

/// The set's open flags and the folder its volumes are mounted in, in a struct to
/// free with `VixMntapi_FreeDiskSetInfo`.
///
/// # Safety
/// `diskSetInfo` must be a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn VixMntapi_GetDiskSetInfo(
    handle: VixDiskSetHandle,
    diskSetInfo: *mut *mut VixDiskSetInfo,
) -> VixError {
    guard("VixMntapi_GetDiskSetInfo", || {
        // SAFETY: per the contract.
        let out = unsafe { out_ptr(diskSetInfo, std::ptr::null_mut(), "diskSetInfo") }?;
        let (set, _) = state::set(handle as usize)?;
        let mut strings = CStrings::new();
        let mount_path = strings.add(set.dir.as_os_str().as_bytes())?;
        let info = calloc_struct::<VixDiskSetInfo>(0)?;
        // SAFETY: `info` is a fresh allocation of one VixDiskSetInfo.
        unsafe {
            info.write(VixDiskSetInfo {
                openFlags: set.flags,
                mountPath: mount_path,
            })
        };
        strings.release();
        // SAFETY: checked non-NULL, valid for a write per the contract.
        unsafe { out.write(info) };
        Ok(())
    })
}

/// Frees what `VixMntapi_GetDiskSetInfo` returned (NULL is allowed).
///
/// # Safety
/// `diskSetInfo` must be NULL or come from `VixMntapi_GetDiskSetInfo`, freed once.
#[no_mangle]
pub unsafe extern "C" fn VixMntapi_FreeDiskSetInfo(diskSetInfo: *mut VixDiskSetInfo) {
    guard_void("VixMntapi_FreeDiskSetInfo", || {
        if diskSetInfo.is_null() {
            return;
        }
        // SAFETY: a struct from GetDiskSetInfo: its string and itself come from
        // malloc and are freed once.
        unsafe {
            libc::free((*diskSetInfo).mountPath as *mut c_void);
            libc::free(diskSetInfo as *mut c_void);
        }
    })
}

/// Closes a disk set: its volumes still mounted are dismounted (a busy one is
/// detached lazily), its folder removed, and its handle and its volumes' handles
/// become invalid. Call it before `VixDiskLib_Disconnect`.
#[no_mangle]
pub extern "C" fn VixMntapi_CloseDiskSet(diskSet: VixDiskSetHandle) -> VixError {
    guard("VixMntapi_CloseDiskSet", || {
        let (set, volumes) = state::remove_set(diskSet as usize)?;
        let result = state::close_set(&set, &volumes);
        log::log(&format!("VixMntapi: closed {}", set.disk.display()));
        result
    })
}

/// The set's volumes, as an array from `malloc` (free it with
/// `VixMntapi_FreeVolumeHandles`; never NULL on success, even with no volume). The
/// handles stay valid until the set is closed; every call returns the same values.
///
/// # Safety
/// `numberOfVolumes` and `volumeHandles` must be valid pointers.
#[no_mangle]
pub unsafe extern "C" fn VixMntapi_GetVolumeHandles(
    diskSet: VixDiskSetHandle,
    numberOfVolumes: *mut usize,
    volumeHandles: *mut *mut VixVolumeHandle,
) -> VixError {
    guard("VixMntapi_GetVolumeHandles", || {
        // SAFETY: per the contract.
        let count = unsafe { out_ptr(numberOfVolumes, 0, "numberOfVolumes") }?;
        // SAFETY: per the contract.
        let out = unsafe { out_ptr(volumeHandles, std::ptr::null_mut(), "volumeHandles") }?;
        let (set, _) = state::set(diskSet as usize)?;
        let handles = state::volume_handles(&set);
        let bytes = std::mem::size_of::<VixVolumeHandle>() * handles.len().max(1);
        let array =
            calloc_struct::<VixVolumeHandle>(bytes - std::mem::size_of::<VixVolumeHandle>())?;
        for (i, &h) in handles.iter().enumerate() {
            // SAFETY: the array has room for handles.len() (at least 1) entries.
            unsafe { array.add(i).write(h as VixVolumeHandle) };
        }
        // SAFETY: both checked non-NULL, valid for writes per the contract.
        unsafe {
            count.write(handles.len());
            out.write(array);
        }
        Ok(())
    })
}

/// Frees an array from `VixMntapi_GetVolumeHandles` (NULL is allowed). The volume
/// handles in it stay valid until their set is closed.
///
/// # Safety
/// `volumeHandles` must be NULL or come from `VixMntapi_GetVolumeHandles`, freed once.
#[no_mangle]
pub unsafe extern "C" fn VixMntapi_FreeVolumeHandles(volumeHandles: *mut VixVolumeHandle) {
    // SAFETY: malloc'd by GetVolumeHandles, or NULL (which free ignores).
    unsafe { libc::free(volumeHandles as *mut c_void) };
}

/// The operating system on the set: Linux (`VIXMNTAPI_OTHER`, from `etc/os-release`)
/// or Windows (`VIXMNTAPI_WINDOWS`, a `Windows/System32` folder). Mounted volumes are
/// looked at first; then each other volume holding a file system is mounted
/// read-only - and, as with VDDK, the one the system is found on stays mounted
/// (`osFolder` is inside it; `VixMntapi_MountVolume` on it then answers
/// `VIX_E_MNTAPI_VOLUME_ALREADY_MOUNTED`), the others are dismounted again. Nothing
/// found: `VIX_E_MNTAPI_ITEM_NOT_FOUND`. Free the result with `VixMntapi_FreeOsInfo`.
///
/// # Safety
/// `info` must be a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn VixMntapi_GetOsInfo(
    diskSet: VixDiskSetHandle,
    info: *mut *mut VixOsInfo,
) -> VixError {
    guard("VixMntapi_GetOsInfo", || {
        // SAFETY: per the contract.
        let out = unsafe { out_ptr(info, std::ptr::null_mut(), "info") }?;
        let (_, volumes) = state::set(diskSet as usize)?;
        let os = find_os(&volumes)?;
        let mut strings = CStrings::new();
        let vendor = strings.add(os.vendor.as_bytes())?;
        let edition = strings.add(os.edition.as_bytes())?;
        let folder = strings.add(os.folder.as_os_str().as_bytes())?;
        let p = calloc_struct::<VixOsInfo>(0)?;
        // SAFETY: `p` is a fresh allocation of one VixOsInfo.
        unsafe {
            p.write(VixOsInfo {
                family: os.family,
                majorVersion: os.major,
                minorVersion: os.minor,
                osIs64Bit: Bool::from(os.is_64bit),
                vendor,
                edition,
                osFolder: folder,
            })
        };
        strings.release();
        // SAFETY: checked non-NULL, valid for a write per the contract.
        unsafe { out.write(p) };
        Ok(())
    })
}

/// Looks for the operating system in the mounted volumes, then in the others (see
/// [`VixMntapi_GetOsInfo`]).
fn find_os(volumes: &[std::sync::Arc<Volume>]) -> Result<OsFound, FfiError> {
    for v in volumes {
        let st = lock(&v.state);
        if let Some(os) = st.mounted.as_ref().and_then(|m| guest::inspect(m.target())) {
            return Ok(os);
        }
    }
    let mut looked = 0;
    let mut errors: Vec<String> = Vec::new();
    for v in volumes {
        if v.spec.check_mountable().is_err() {
            continue;
        }
        let mut st = lock(&v.state);
        if st.closed || st.mounted.is_some() {
            continue;
        }
        if let Err(e) = v.mount(&mut st, true) {
            errors.push(format!("volume {}: {}", v.spec.name(), e.message));
            continue;
        }
        looked += 1;
        let found = st.mounted.as_ref().and_then(|m| guest::inspect(m.target()));
        if let Some(os) = found {
            log::log(&format!(
                "VixMntapi: found {} on volume {}, which stays mounted read-only",
                os.vendor,
                v.spec.name()
            ));
            return Ok(os);
        }
        if let Err(e) = v.dismount(&mut st, false) {
            log::warn(&format!(
                "VixMntapi: GetOsInfo: dismounting volume {}: {}",
                v.spec.name(),
                e.message
            ));
        }
    }
    let mut message = format!(
        "no operating system found (etc/os-release or Windows/System32) in the mounted \
         volumes nor in {looked} other volume(s) mounted to look"
    );
    if !errors.is_empty() {
        message.push_str(&format!("; could not mount: {}", errors.join("; ")));
    }
    Err(FfiError::new(VIX_E_MNTAPI_ITEM_NOT_FOUND, message))
}

/// Frees what `VixMntapi_GetOsInfo` returned (NULL is allowed).
///
/// # Safety
/// `info` must be NULL or come from `VixMntapi_GetOsInfo`, freed once.
#[no_mangle]
pub unsafe extern "C" fn VixMntapi_FreeOsInfo(info: *mut VixOsInfo) {
    guard_void("VixMntapi_FreeOsInfo", || {
        if info.is_null() {
            return;
        }
        // SAFETY: a struct from GetOsInfo: its strings and itself come from malloc
        // and are freed once.
        unsafe {
            libc::free((*info).vendor as *mut c_void);
            libc::free((*info).edition as *mut c_void);
            libc::free((*info).osFolder as *mut c_void);
            libc::free(info as *mut c_void);
        }
    })
}
