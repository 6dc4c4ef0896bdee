//! Whole files written under a temporary name beside their final name and moved
//! into place in one step, so that the final name never holds a half-written file:
//! a descriptor rewrite is renamed over the old descriptor, a new disk's descriptor
//! (or monolithic file) is linked as its new name, a defragmented extent and a
//! change-tracking sidecar are renamed over the old ones.
//!
//! The temporary name is `.NAME.vdisk-new` in the final name's folder (same file
//! system, so the rename is atomic; hidden, so it is not taken for a disk). It is
//! created locked exclusively and written, synced, moved, and the folder is synced.
//! A temporary file left by a killed process is removed by the next writer of the
//! same name: its lock died with its process, while a live writer's is held.
//!
//! Locks: disks are locked with `flock` on their descriptor, and a rename gives the
//! name a new inode. The writer therefore locks the new file (with the mode of the
//! handle it replaces) before it is renamed over, and keeps the returned handle; a
//! process that opened the old file and waits for its lock finds the path renamed
//! and opens it again ([`FileStorage::open`]).

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind, Result};
use crate::storage::{FileStorage, LockMode, Storage};

/// The suffix of temporary names.
const TEMP_SUFFIX: &str = ".vdisk-new";

/// The temporary name beside `target`: `.NAME.vdisk-new` in the same folder.
pub fn temp_name(target: &Path) -> Result<PathBuf> {
    let name = target.file_name().ok_or_else(|| {
        Error::new(
            ErrorKind::InvalidArgument,
            format!("{} is not a file name", target.display()),
        )
    })?;
    let mut temp = OsString::from(".");
    temp.push(name);
    temp.push(TEMP_SUFFIX);
    Ok(target.with_file_name(temp))
}

/// `path`, or the file it finally names when it is a symbolic link: a rewrite
/// replaces the file, not the link.
fn real_path(path: &Path) -> PathBuf {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
        }
        _ => path.to_path_buf(),
    }
}

/// Syncs the folder holding `path`, so that a rename, link or unlink in it is
/// durable. File systems that cannot sync a folder (`EINVAL`) are let be.
pub fn sync_folder(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let synced = File::open(dir).and_then(|d| d.sync_all());
    match synced {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => Ok(()),
        Err(e) => Err(Error::io(
            format!("cannot sync the folder {}", dir.display()),
            e,
        )),
    }
}

/// Removes a temporary file a killed process left at `temp`; refuses one that a
/// live process holds locked (it is being written) and anything but a regular file.
fn remove_leftover(temp: &Path) -> Result<()> {
    let busy = || {
        Error::new(
            ErrorKind::Locked,
            format!("{} is being written by another process", temp.display()),
        )
    };
    match std::fs::symlink_metadata(temp) {
        Ok(m) if m.file_type().is_file() => {}
        Ok(_) => {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("{} exists and is not a regular file", temp.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("cannot stat {}", temp.display()), e)),
    }
    let f =
        File::open(temp).map_err(|e| Error::io(format!("cannot open {}", temp.display()), e))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Err(busy()),
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(Error::io(format!("cannot lock {}", temp.display()), e))
        }
    }
    match std::fs::remove_file(temp) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("cannot remove {}", temp.display()), e)),
    }
}

/// Removes a temporary file when dropped, unless disarmed.
#[derive(Debug)]
struct TempGuard {
    path: PathBuf,
    armed: bool,
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Removes the temporary file beside `target` that a killed writer left, if there
/// is one (a live writer's is refused with `Locked`). For the operations that
/// remove a file, so that no hidden leftover of it outlives it.
pub fn remove_stale_temp(target: &Path) -> Result<()> {
    remove_leftover(&temp_name(&real_path(target))?)
}

/// A whole file being written under the temporary name beside its final name; it
/// takes the final name only in [`NewFile::replace`] or [`NewFile::publish`], and
/// the temporary file is removed if it is dropped before.
#[derive(Debug)]
pub struct NewFile {
    storage: FileStorage,
    temp: TempGuard,
    /// Where the file goes (symbolic links resolved).
    target: PathBuf,
    /// The name the caller gave (the handle's path once the file is in place).
    shown: PathBuf,
}

impl NewFile {
    /// Starts the file that will replace or become `target`, locked with `lock`
    /// (held by the handle that [`NewFile::replace`] or [`NewFile::publish`]
    /// returns). With `sync` false nothing is synced (outputs that are deleted
    /// when their operation fails).
    pub fn beside(target: &Path, lock: LockMode, sync: bool) -> Result<NewFile> {
        let real = real_path(target);
        let temp = temp_name(&real)?;
        let mut storage = match FileStorage::create_new(&temp) {
            Ok(s) => s,
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                remove_leftover(&temp)?;
                FileStorage::create_new(&temp)?
            }
            Err(e) => return Err(e),
        };
        let temp = TempGuard {
            path: temp,
            armed: true,
        };
        if lock != LockMode::Exclusive {
            storage.relock(lock)?;
        }
        storage.set_sync(sync);
        Ok(NewFile {
            storage,
            temp,
            target: real,
            shown: target.to_path_buf(),
        })
    }

    /// With `false`, nothing is synced (see [`FileStorage::set_sync`]).
    pub fn set_sync(&mut self, sync: bool) {
        self.storage.set_sync(sync);
    }

    /// The new file, to write its content.
    pub fn storage(&self) -> &FileStorage {
        &self.storage
    }

    /// The temporary name.
    pub fn temp_path(&self) -> &Path {
        &self.temp.path
    }

    fn sync(&self) -> Result<()> {
        self.storage
            .sync()
            .map_err(|e| Error::io(format!("cannot sync {}", self.temp.path.display()), e))
    }

    /// The handle, known by the final name; the temporary name is no longer removed.
    fn placed(self) -> FileStorage {
        let NewFile {
            mut storage,
            mut temp,
            shown,
            ..
        } = self;
        temp.armed = false;
        storage.set_path(&shown);
        storage
    }

    /// Syncs the file, gives it the permissions of the file at the final name and
    /// renames it over that file, then syncs the folder. Returns the file's handle,
    /// still locked, now known by the final name.
    pub fn replace(self) -> Result<FileStorage> {
        self.sync()?;
        let temp = &self.temp.path;
        if let Ok(m) = std::fs::metadata(&self.target) {
            std::fs::set_permissions(temp, m.permissions()).map_err(|e| {
                Error::io(
                    format!("cannot set the permissions of {}", temp.display()),
                    e,
                )
            })?;
        }
        std::fs::rename(temp, &self.target).map_err(|e| {
            Error::io(
                format!(
                    "cannot rename {} to {}",
                    temp.display(),
                    self.target.display()
                ),
                e,
            )
        })?;
        let synced = self.storage.syncs();
        let target = self.target.clone();
        let storage = self.placed();
        if synced {
            sync_folder(&target)?;
        }
        Ok(storage)
    }

    /// Syncs the file and gives it the final name, which must be free
    /// (`AlreadyExists` otherwise), then removes the temporary name and syncs the
    /// folder. Returns the file's handle, still locked.
    pub fn publish(self) -> Result<FileStorage> {
        self.sync()?;
        let temp = &self.temp.path;
        std::fs::hard_link(temp, &self.target)
            .map_err(|e| Error::io(format!("cannot create {}", self.target.display()), e))?;
        let removed = std::fs::remove_file(temp)
            .map_err(|e| Error::io(format!("cannot remove {}", temp.display()), e));
        let synced = self.storage.syncs();
        let target = self.target.clone();
        let storage = self.placed();
        removed?;
        if synced {
            sync_folder(&target)?;
        }
        Ok(storage)
    }
}

/// Replaces the file at `path` by one holding `bytes` (see [`NewFile::replace`]):
/// the name holds the old content or the new one, never a part. The returned handle
/// is the new file, locked with `lock`.
pub fn replace_file(path: &Path, bytes: &[u8], lock: LockMode, sync: bool) -> Result<FileStorage> {
    let f = NewFile::beside(path, lock, sync)?;
    f.storage()
        .write_all_at(bytes, 0)
        .map_err(|e| Error::io(format!("cannot write {}", f.temp_path().display()), e))?;
    f.replace()
}

/// Replaces the content of the file open as `handle` (a locked descriptor) by
/// `bytes` with [`replace_file`]; the handle then holds the new file, locked as the
/// old one was, so the disk stays locked throughout.
pub fn rewrite_open_file(handle: &std::sync::Mutex<FileStorage>, bytes: &[u8]) -> Result<()> {
    let mut file = handle
        .lock()
        .map_err(|_| Error::new(ErrorKind::Fail, "file handle lock poisoned"))?;
    let path = file.path().to_path_buf();
    // By the absolute name: the process may have changed its working folder since.
    let target = file.absolute_path().to_path_buf();
    *file = replace_file(&target, bytes, file.lock_mode(), file.syncs())
        .map_err(|e| e.within(format!("cannot rewrite {}", path.display())))?
        .shown_as(&path);
    Ok(())
}
