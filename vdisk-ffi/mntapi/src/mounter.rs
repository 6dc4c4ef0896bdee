//! Mounting and unmounting one volume with `vdisk_mount::volume`, and the mapping
//! of its errors onto VixError codes.
//!
//! A forced dismount of a busy volume detaches it lazily (as `umount -l`): the
//! folder is free at once, but the disk stays open until the last file inside is
//! closed. The wait for that runs on a background thread, which `VixMntapi_Exit`
//! joins, so no thread of this library outlives `Exit`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::thread::JoinHandle;

use vdisk::VirtualDisk;
use vdisk_mount::volume::{cleanup_volume, mount_volume, mount_volume_opened, unmount_volume};
use vdisk_mount::{Mode, MountError, MountedVolume, OpenedDisk, VolumeOptions};
use vdisk_nbd::client::RemoteSpec;

use crate::errors::{
    VIX_E_FAIL, VIX_E_MNTAPI_DAEMON, VIX_E_MNTAPI_LOOP_FAILED, VIX_E_MNTAPI_MOUNTPT_NOT_FOUND,
    VIX_E_MNTAPI_NO_ROOT, VIX_E_MNTAPI_OPEN_HANDLES, VIX_E_MNTAPI_UMOUNT,
};
use crate::state::DiskSet;
use crate::FfiError;

/// The threads waiting for lazily detached volumes to close their disks.
static REAPERS: Mutex<Vec<JoinHandle<()>>> = Mutex::new(Vec::new());

/// Whether this process may mount (mount(8) and loop devices need root).
pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Mounts partition `partition` of the set's disk (None: the file system on the
/// whole disk) on the existing folder `target`: read-only, or read-write - a local
/// disk persistently; a remote disk through a throwaway local redo log unless the
/// set writes to the server (`vdisk.mntapi.remoteWrites = persistent`).
pub(crate) fn mount(
    set: &DiskSet,
    partition: Option<u32>,
    target: &Path,
    read_only: bool,
) -> Result<MountedVolume, FfiError> {
    if !is_root() {
        return Err(FfiError::new(
            VIX_E_MNTAPI_NO_ROOT,
            "mounting a volume needs root (mount(8) and a loop device)",
        ));
    }
    let mode = match (read_only, &set.remote) {
        (true, _) => Mode::ReadOnly,
        (false, Some(_)) if !set.remote_persistent => Mode::NonPersistent,
        (false, _) => Mode::Persistent,
    };
    let options = VolumeOptions {
        mode,
        allow_other: false,
        fs_options: Vec::new(),
    };
    match &set.remote {
        None => mount_volume(&set.disk, partition, target, &options).map_err(mount_error),
        Some(spec) => {
            let opened = open_remote(spec, mode)?;
            mount_volume_opened(opened, partition, target, &options).map_err(mount_error)
        }
    }
}

/// Opens a remote disk for a mount in `mode`: read-only, writing to the server, or
/// non-persistent - the export only read, the writes kept in an unlinked file of
/// `tmpDirectory` (else the system's temporary folder) that goes with the mount.
fn open_remote(spec: &RemoteSpec, mode: Mode) -> Result<OpenedDisk, FfiError> {
    let uri = spec.uri();
    let remote = spec
        .read_only(mode != Mode::Persistent || spec.options.read_only)
        .open()
        .map_err(|e| FfiError::new(e.kind().vix_code(), format!("cannot open {uri}: {e}")))?;
    let disk: Box<dyn VirtualDisk> = if mode == Mode::NonPersistent {
        let dir = crate::state::config().and_then(|c| c.tmp_directory);
        Box::new(
            vdisk::Overlay::new(Box::new(remote), dir.as_deref()).map_err(|e| {
                FfiError::new(
                    e.kind().vix_code(),
                    format!("{uri}: cannot make the redo log of a non-persistent mount: {e}"),
                )
            })?,
        )
    } else {
        Box::new(remote)
    };
    Ok(OpenedDisk {
        disk,
        name: PathBuf::from(uri),
        compressed: false,
        mtime: std::time::SystemTime::now(),
    })
}

/// The code and message of a mount failure.
fn mount_error(e: MountError) -> FfiError {
    let code = match &e {
        MountError::Open { source, .. } => source.kind().vix_code(),
        MountError::Mountpoint { .. } => VIX_E_MNTAPI_MOUNTPT_NOT_FOUND,
        MountError::Fuse { .. } | MountError::Session { .. } => VIX_E_MNTAPI_DAEMON,
        MountError::Volume { .. } => VIX_E_MNTAPI_LOOP_FAILED,
        _ => VIX_E_FAIL,
    };
    FfiError::new(code, e.to_string())
}

/// Why a dismount failed, with the volume when it is still mounted.
pub(crate) struct DismountError {
    /// The volume, still mounted; None when it was unmounted but its disk could
    /// not be closed cleanly.
    pub volume: Option<Box<MountedVolume>>,
    /// The error.
    pub error: FfiError,
}

/// Unmounts a volume: its file system, then the FUSE mount under it, and closes the
/// disk. A busy file system is an error and stays mounted (the volume is given
/// back), unless `force`: then it is detached lazily.
pub(crate) fn dismount(volume: MountedVolume, force: bool) -> Result<(), DismountError> {
    let reason = match unmount_volume(volume.record()) {
        // Everything is unmounted: this ends the FUSE session and closes the disk.
        Ok(()) => {
            return volume.unmount().map_err(|e| DismountError {
                volume: None,
                error: FfiError::new(
                    VIX_E_MNTAPI_UMOUNT,
                    format!("unmounted, but the disk was not closed cleanly: {e}"),
                ),
            })
        }
        Err(reason) => reason,
    };
    if !force {
        let code = if reason.contains("busy") {
            VIX_E_MNTAPI_OPEN_HANDLES
        } else {
            VIX_E_MNTAPI_UMOUNT
        };
        return Err(DismountError {
            volume: Some(Box::new(volume)),
            error: FfiError::new(code, reason),
        });
    }
    if let Err(e) = cleanup_volume(volume.record()) {
        return Err(DismountError {
            volume: Some(Box::new(volume)),
            error: FfiError::new(VIX_E_MNTAPI_UMOUNT, e),
        });
    }
    crate::log::log(&format!(
        "VixMntapi: {} detached while in use ({reason}); its disk is closed when the \
         last file in it is closed",
        volume.target().display()
    ));
    reap_later(volume);
    Ok(())
}

/// Drops a detached volume on a background thread (the drop waits until its disk is
/// closed).
fn reap_later(volume: MountedVolume) {
    let spawned = std::thread::Builder::new()
        .name("vixmntapi-reaper".into())
        .spawn(move || drop(volume));
    match spawned {
        Ok(h) => {
            let mut reapers = REAPERS.lock().unwrap_or_else(|p| p.into_inner());
            reapers.retain(|h| !h.is_finished());
            reapers.push(h);
        }
        // The volume went with the closure: it was dropped (and waited for) here.
        Err(e) => crate::log::warn(&format!(
            "VixMntapi: cannot start a thread ({e}): waited for the detached volume"
        )),
    }
}

/// Waits for every lazily detached volume to close its disk (`Exit`).
pub(crate) fn join_reapers() {
    let reapers = std::mem::take(&mut *REAPERS.lock().unwrap_or_else(|p| p.into_inner()));
    for h in reapers {
        let _ = h.join();
    }
}
