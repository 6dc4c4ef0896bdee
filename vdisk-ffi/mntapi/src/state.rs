//! Library state behind the opaque C handles: the disk sets and their volumes.
//!
//! A handle given to C is never a pointer to our memory: it encodes an ID (never
//! reused, one counter for sets and volumes, so one kind is never taken for the
//! other) that is looked up in a registry. A NULL, made-up, closed or stale handle is
//! simply not found: `VIX_E_INVALID_ARG`, no dereference.
//!
//! The registry lock is held only to look handles up; mounting and unmounting run
//! under the volume's own lock.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use vdisk_mount::MountedVolume;
use vdisk_nbd::client::RemoteSpec;

use crate::config::Config;
use crate::errors::{
    VIX_E_INVALID_ARG, VIX_E_MNTAPI_CANT_MAKE_VAR_DIR, VIX_E_MNTAPI_VOLUME_ALREADY_MOUNTED,
    VIX_E_MNTAPI_VOLUME_NOT_MOUNTED, VIX_E_MNTAPI_VOLUME_NOT_WRITABLE, VIX_E_NOT_SUPPORTED,
};
use crate::mounter;
use crate::volumes::VolumeSpec;
use crate::FfiError;

/// A set of disks opened for mounting (one disk on Linux).
#[derive(Debug)]
pub(crate) struct DiskSet {
    /// The disk (absolute path; for a remote disk its NBD URI).
    pub disk: PathBuf,
    /// How a disk on a remote connection is reached (each mount connects anew).
    pub remote: Option<RemoteSpec>,
    /// Whether read-write mounts of a remote disk write to the server (else to a
    /// throwaway local redo log); local disks are always written.
    pub remote_persistent: bool,
    /// The open flags reported by GetDiskSetInfo.
    pub flags: u32,
    /// Whether volumes may only be mounted read-only.
    pub read_only: bool,
    /// The folder the volumes are mounted in (`mountPath`).
    pub dir: PathBuf,
    /// The volume IDs, in table order.
    pub volumes: Vec<u64>,
}

/// One volume of a set.
#[derive(Debug)]
pub(crate) struct Volume {
    /// Its set.
    pub set: Arc<DiskSet>,
    /// What it is.
    pub spec: VolumeSpec,
    /// Its mount, under the volume's lock.
    pub state: Mutex<VolumeState>,
}

/// Whether a volume is mounted.
#[derive(Debug, Default)]
pub(crate) struct VolumeState {
    /// Set when its set is closed: no more mounts.
    pub closed: bool,
    /// The mount, if mounted.
    pub mounted: Option<MountedVolume>,
}

/// Everything the library holds.
struct Registry {
    initialised: bool,
    config: Config,
    next: u64,
    sets: BTreeMap<u64, Arc<DiskSet>>,
    volumes: BTreeMap<u64, Arc<Volume>>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    initialised: false,
    config: Config {
        tmp_directory: None,
        log_level: crate::log::LEVEL_AUDIT,
        remote_persistent: false,
    },
    next: 1,
    sets: BTreeMap::new(),
    volumes: BTreeMap::new(),
});

/// Locks a mutex, surviving poisoning (a panic elsewhere is already reported).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Handle values are `id << 4`: non-NULL, aligned, never dereferenced.
fn encode(id: u64) -> usize {
    (id << 4) as usize
}

fn decode(p: usize) -> Option<u64> {
    (p != 0 && p & 0xf == 0).then_some((p >> 4) as u64)
}

/// Marks the library initialised with `config`.
pub(crate) fn init(config: Config) {
    let mut r = lock(&REGISTRY);
    r.initialised = true;
    r.config = config;
}

/// Whether Init ran (and Exit has not); the configuration.
pub(crate) fn config() -> Option<Config> {
    let r = lock(&REGISTRY);
    r.initialised.then(|| r.config.clone())
}

/// Reserves the IDs of a set with `volumes` volumes; returns the set's ID (the
/// volumes take the next ones). The set's folder is named after it.
pub(crate) fn reserve(volumes: usize) -> u64 {
    let mut r = lock(&REGISTRY);
    let id = r.next;
    r.next = id + 1 + volumes as u64;
    id
}

/// Registers set `set_id` (from [`reserve`] with `specs.len()`) with its volumes
/// (`set.volumes` is filled in here); returns the set's C handle value, or None
/// when `Exit` ran meanwhile.
pub(crate) fn add_set(set_id: u64, set: DiskSet, specs: Vec<VolumeSpec>) -> Option<usize> {
    let volume_ids: Vec<u64> = (1..=specs.len() as u64).map(|i| set_id + i).collect();
    let set = Arc::new(DiskSet {
        volumes: volume_ids.clone(),
        ..set
    });
    let mut r = lock(&REGISTRY);
    if !r.initialised {
        return None;
    }
    r.sets.insert(set_id, set.clone());
    for (id, spec) in volume_ids.into_iter().zip(specs) {
        r.volumes.insert(
            id,
            Arc::new(Volume {
                set: set.clone(),
                spec,
                state: Mutex::new(VolumeState::default()),
            }),
        );
    }
    Some(encode(set_id))
}

fn invalid(what: &str) -> FfiError {
    FfiError::new(
        VIX_E_INVALID_ARG,
        format!("invalid {what} handle (NULL, never opened, closed, or after Exit)"),
    )
}

/// The set behind a C handle, with its volumes.
pub(crate) fn set(p: usize) -> Result<(Arc<DiskSet>, Vec<Arc<Volume>>), FfiError> {
    let id = decode(p).ok_or_else(|| invalid("disk set"))?;
    let r = lock(&REGISTRY);
    let set = r
        .sets
        .get(&id)
        .cloned()
        .ok_or_else(|| invalid("disk set"))?;
    let volumes = set
        .volumes
        .iter()
        .filter_map(|v| r.volumes.get(v).cloned())
        .collect();
    Ok((set, volumes))
}

/// The C handle values of a set's volumes.
pub(crate) fn volume_handles(set: &DiskSet) -> Vec<usize> {
    set.volumes.iter().map(|&id| encode(id)).collect()
}

/// The volume behind a C handle.
pub(crate) fn volume(p: usize) -> Result<Arc<Volume>, FfiError> {
    let id = decode(p).ok_or_else(|| invalid("volume"))?;
    lock(&REGISTRY)
        .volumes
        .get(&id)
        .cloned()
        .ok_or_else(|| invalid("volume"))
}

/// Unregisters a set and its volumes and returns them.
pub(crate) fn remove_set(p: usize) -> Result<(Arc<DiskSet>, Vec<Arc<Volume>>), FfiError> {
    let id = decode(p).ok_or_else(|| invalid("disk set"))?;
    let mut r = lock(&REGISTRY);
    let set = r.sets.remove(&id).ok_or_else(|| invalid("disk set"))?;
    let volumes = set
        .volumes
        .iter()
        .filter_map(|v| r.volumes.remove(v))
        .collect();
    Ok((set, volumes))
}

/// Unregisters everything (`Exit`) and returns the sets with their volumes.
pub(crate) fn remove_all() -> Vec<(Arc<DiskSet>, Vec<Arc<Volume>>)> {
    let mut r = lock(&REGISTRY);
    r.initialised = false;
    r.config = Config::default();
    let sets = std::mem::take(&mut r.sets);
    sets.into_values()
        .map(|set| {
            let volumes = set
                .volumes
                .iter()
                .filter_map(|v| r.volumes.remove(v))
                .collect();
            (set, volumes)
        })
        .collect()
}

impl Volume {
    /// The folder it is mounted on (when mounted).
    pub fn dir(&self) -> PathBuf {
        self.set.dir.join(self.spec.name())
    }

    /// Mounts the volume (its state locked by the caller) on [`Volume::dir`].
    pub fn mount(&self, st: &mut VolumeState, read_only: bool) -> Result<(), FfiError> {
        if st.closed {
            return Err(invalid("volume"));
        }
        if let Some(m) = &st.mounted {
            return Err(FfiError::new(
                VIX_E_MNTAPI_VOLUME_ALREADY_MOUNTED,
                format!(
                    "volume {} is already mounted on {}",
                    self.spec.name(),
                    m.target().display()
                ),
            ));
        }
        self.spec
            .check_mountable()
            .map_err(|reason| FfiError::new(VIX_E_NOT_SUPPORTED, reason))?;
        if !read_only && self.set.read_only {
            return Err(FfiError::new(
                VIX_E_MNTAPI_VOLUME_NOT_WRITABLE,
                "the disk set was opened read-only (VIXDISKLIB_FLAG_OPEN_READ_ONLY, a \
                 read-only connection, or VixMntapi_OpenDiskSet): mount with readOnly TRUE",
            ));
        }
        let dir = self.dir();
        make_dir(&dir)?;
        match mounter::mount(&self.set, self.spec.partition, &dir, read_only) {
            Ok(m) => {
                crate::log::log(&format!(
                    "VixMntapi: mounted volume {} of {} on {} ({})",
                    self.spec.name(),
                    self.set.disk.display(),
                    m.target().display(),
                    mode_text(&self.set, read_only)
                ));
                st.mounted = Some(m);
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                Err(e)
            }
        }
    }

    /// Unmounts the volume (its state locked by the caller) and removes its folder.
    pub fn dismount(&self, st: &mut VolumeState, force: bool) -> Result<(), FfiError> {
        let Some(m) = st.mounted.take() else {
            return Err(FfiError::new(
                VIX_E_MNTAPI_VOLUME_NOT_MOUNTED,
                format!("volume {} is not mounted", self.spec.name()),
            ));
        };
        let target = m.target().to_path_buf();
        let result = match mounter::dismount(m, force) {
            Ok(()) => Ok(()),
            Err(e) => {
                st.mounted = e.volume.map(|v| *v);
                Err(e.error)
            }
        };
        if st.mounted.is_none() {
            crate::log::log(&format!(
                "VixMntapi: dismounted volume {} from {}",
                self.spec.name(),
                target.display()
            ));
            // Only an empty folder is removed: never anything that is still mounted.
            let _ = std::fs::remove_dir(self.dir());
        }
        result
    }
}

/// How a volume of `set` is mounted, for log lines.
fn mode_text(set: &DiskSet, read_only: bool) -> &'static str {
    match (read_only, &set.remote) {
        (true, _) => "read-only",
        (false, Some(_)) if !set.remote_persistent => {
            "read-write, non-persistent: writes are discarded at dismount"
        }
        (false, _) => "read-write",
    }
}

/// Creates a mount folder (mode 0700 for the ones this library owns), or takes an
/// empty one left over.
pub(crate) fn make_dir(dir: &Path) -> Result<(), FfiError> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let empty = std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none());
            if empty {
                Ok(())
            } else {
                Err(FfiError::new(
                    VIX_E_MNTAPI_CANT_MAKE_VAR_DIR,
                    format!("{} exists and is not an empty folder", dir.display()),
                ))
            }
        }
        Err(e) => Err(FfiError::new(
            VIX_E_MNTAPI_CANT_MAKE_VAR_DIR,
            format!("cannot create {}: {e}", dir.display()),
        )),
    }
}

/// Dismounts what is still mounted of a removed set's volumes (no more mounts can
/// start) and removes the set's folder. The first error is returned; the others are
/// logged.
pub(crate) fn close_set(set: &DiskSet, volumes: &[Arc<Volume>]) -> Result<(), FfiError> {
    let mut first: Option<FfiError> = None;
    for v in volumes {
        let mut st = lock(&v.state);
        st.closed = true;
        if st.mounted.is_some() {
            // A busy volume is detached lazily: the set is going away.
            if let Err(e) = v.dismount(&mut st, true) {
                crate::log::warn(&format!(
                    "VixMntapi: closing the disk set: volume {}: {}",
                    v.spec.name(),
                    e.message
                ));
                first.get_or_insert(e);
            }
        }
    }
    if let Err(e) = std::fs::remove_dir(&set.dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            crate::log::warn(&format!(
                "VixMntapi: cannot remove {}: {e}",
                set.dir.display()
            ));
        }
    }
    first.map_or(Ok(()), Err)
}
