//! Positional I/O on one host file. Every disk file (descriptor, extent) is accessed
//! through [`Storage`]: reads and writes take an offset and never move a shared cursor,
//! so one handle serves many threads at once.

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

use crate::error::{Error, ErrorKind, Result};

/// Positional access to one file.
#[allow(clippy::len_without_is_empty)] // a file's length is an I/O call, not a collection size
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Reads up to `buf.len()` bytes at `offset`; returns how many were read (fewer only
    /// at the end of the file).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `offset`, growing the file if needed.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Truncates or extends (with zeros) to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes written data durable.
    fn sync(&self) -> io::Result<()>;

    /// The first byte at or after `offset` that may hold data, as the file system
    /// knows it (`SEEK_DATA`); `None` when only a hole follows, to the end of the
    /// file. Storage that cannot tell answers `offset`: anything may be data.
    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        Ok(Some(offset))
    }

    /// The first byte at or after `offset` that is in a hole (`SEEK_HOLE`; the end
    /// of the file counts as one). Storage that cannot tell answers its length.
    fn next_hole(&self, offset: u64) -> io::Result<u64> {
        Ok(self.len()?.max(offset))
    }

    /// The host file descriptor underneath, where there is one: senders that move
    /// file bytes without reading them (`sendfile`) use it. `None` for storage that
    /// is not a host file.
    fn fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    /// Reads exactly `buf.len()` bytes at `offset`; a short file is an
    /// `UnexpectedEof` error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let n = self.read_at(&mut buf[done..], offset + done as u64)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "file ends at byte {} but {} bytes at offset {offset} were needed",
                        offset + done as u64,
                        buf.len()
                    ),
                ));
            }
            done += n;
        }
        Ok(())
    }
}

/// How a disk file is locked while it is open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    /// No lock (forensic reads of files another program may be writing).
    None,
    /// Shared advisory lock: readers coexist, a writer is refused.
    Shared,
    /// Exclusive advisory lock: one writer, no readers.
    Exclusive,
}

/// Takes `lock` on `file`, trying again until `give_up` while it is held elsewhere
/// (see [`crate::limits::LOCK_RETRY`] why a free disk can look locked for a moment).
fn try_lock_until(
    file: &File,
    lock: LockMode,
    give_up: Instant,
) -> std::result::Result<(), TryLockError> {
    loop {
        let locked = match lock {
            LockMode::None => Ok(()),
            LockMode::Shared => file.try_lock_shared(),
            LockMode::Exclusive => file.try_lock(),
        };
        match locked {
            Err(TryLockError::WouldBlock) if Instant::now() < give_up => {
                std::thread::sleep(crate::limits::LOCK_RETRY_PAUSE);
            }
            other => return other,
        }
    }
}

/// What a file is, whatever name it was opened by: its device and inode, and its
/// size and modification time now (read from an open handle, so neither the
/// spelling of its name nor the working folder matters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileIdentity {
    /// Device holding the file.
    pub dev: u64,
    /// Inode number on that device.
    pub ino: u64,
    /// Length in bytes.
    pub len: u64,
    /// Modification time: seconds since the epoch.
    pub mtime: i64,
    /// Modification time: nanoseconds within the second.
    pub mtime_nsec: i64,
}

impl FileIdentity {
    fn of(m: &std::fs::Metadata) -> FileIdentity {
        FileIdentity {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
        }
    }
}

/// Another reference to the open file of a [`FileStorage`] (the same descriptor, not
/// a copy), kept to ask what the file is after the storage has been handed on.
#[derive(Clone, Debug)]
pub struct FileHandle(Arc<File>);

impl FileHandle {
    /// What the file is now.
    pub fn identity(&self) -> io::Result<FileIdentity> {
        Ok(FileIdentity::of(&self.0.metadata()?))
    }
}

/// A file's identity: device and inode numbers.
fn file_id(m: &std::fs::Metadata) -> (u64, u64) {
    (m.dev(), m.ino())
}

/// Whether `path` names the open `file` (false if it names another file or nothing).
fn path_names(path: &Path, file: &File) -> io::Result<bool> {
    let open = file_id(&file.metadata()?);
    match std::fs::metadata(path) {
        Ok(m) => Ok(file_id(&m) == open),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// `path` made absolute against the current working folder (as it is given if that
/// cannot be read).
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// A host file, opened for reading or for reading and writing, optionally locked.
#[derive(Debug)]
pub struct FileStorage {
    file: Arc<File>,
    path: PathBuf,
    /// `path` made absolute when the file was opened: a rewrite by name must reach
    /// this file even after the process changed its working folder.
    absolute: PathBuf,
    lock: LockMode,
    sync: bool,
}

impl FileStorage {
    /// Opens an existing file and takes the advisory lock `lock` on it.
    ///
    /// A descriptor is rewritten by renaming a new file over it (see
    /// [`crate::replace`]), so the file a process opened may stop being the one its
    /// path names while the process waits for the lock: the old file's lock is
    /// released when its writer lets it go, but the writer holds the new file's.
    /// After taking a lock the path is therefore checked to still name the locked
    /// file (device and inode); if not, the path is opened and locked again, at most
    /// [`crate::limits::LOCK_REOPENS`] times and within one
    /// [`crate::limits::LOCK_RETRY`], so that no process ever believes it holds a
    /// disk through the lock of a file that is gone.
    pub fn open(path: &Path, writable: bool, lock: LockMode) -> Result<FileStorage> {
        let give_up = Instant::now() + crate::limits::LOCK_RETRY;
        let locked_elsewhere = || {
            Error::new(
                ErrorKind::Locked,
                format!(
                    "{} is locked by another user of the disk ({} access refused)",
                    path.display(),
                    if writable { "write" } else { "read" }
                ),
            )
        };
        for _ in 0..=crate::limits::LOCK_REOPENS {
            let file = OpenOptions::new()
                .read(true)
                .write(writable)
                .open(path)
                .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
            match try_lock_until(&file, lock, give_up) {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => return Err(locked_elsewhere()),
                Err(TryLockError::Error(e)) => {
                    return Err(Error::io(format!("cannot lock {}", path.display()), e))
                }
            }
            let current = lock == LockMode::None
                || path_names(path, &file)
                    .map_err(|e| Error::io(format!("cannot stat {}", path.display()), e))?;
            if current {
                return Ok(FileStorage {
                    file: Arc::new(file),
                    path: path.to_path_buf(),
                    absolute: absolute(path),
                    lock,
                    sync: true,
                });
            }
            // Replaced while we waited: the lock we hold is on a file that is gone.
        }
        Err(locked_elsewhere())
    }

    /// With `false`, [`Storage::sync`] does nothing: writes stay in the host's page
    /// cache (qemu's `cache=unsafe`). Used for new conversion outputs, which are
    /// deleted if the conversion does not finish anyway.
    pub fn set_sync(&mut self, sync: bool) {
        self.sync = sync;
    }

    /// Creates a new file (failing if it exists) and locks it exclusively.
    pub fn create_new(path: &Path) -> Result<FileStorage> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io(format!("cannot create {}", path.display()), e))?;
        // A new file: nobody else can hold its lock but a process that opened the
        // name in the instant since it was created.
        try_lock_until(
            &file,
            LockMode::Exclusive,
            Instant::now() + crate::limits::LOCK_RETRY,
        )
        .map_err(|_| Error::new(ErrorKind::Locked, format!("cannot lock {}", path.display())))?;
        Ok(FileStorage {
            file: Arc::new(file),
            path: path.to_path_buf(),
            absolute: absolute(path),
            lock: LockMode::Exclusive,
            sync: true,
        })
    }

    /// Changes the lock held on the file to `lock` (a new file is created locked
    /// exclusively; one that takes the place of a file opened with another mode
    /// takes that mode).
    pub(crate) fn relock(&mut self, lock: LockMode) -> Result<()> {
        let done = match lock {
            LockMode::None => self.file.unlock(),
            LockMode::Shared => self.file.lock_shared(),
            LockMode::Exclusive => self.file.lock(),
        };
        done.map_err(|e| Error::io(format!("cannot lock {}", self.path.display()), e))?;
        self.lock = lock;
        Ok(())
    }

    /// The lock this handle holds.
    pub fn lock_mode(&self) -> LockMode {
        self.lock
    }

    /// Whether [`Storage::sync`] makes writes durable (see [`FileStorage::set_sync`]).
    pub fn syncs(&self) -> bool {
        self.sync
    }

    /// Now known by `path` (it was renamed there).
    pub(crate) fn set_path(&mut self, path: &Path) {
        self.path = path.to_path_buf();
        self.absolute = absolute(path);
    }

    /// The path the file was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path made absolute when the file was opened (against the working folder
    /// of that moment).
    pub fn absolute_path(&self) -> &Path {
        &self.absolute
    }

    /// The same storage, shown under `path` in messages (a file reopened by its
    /// absolute name keeps the name it was first opened by).
    pub fn shown_as(mut self, path: &Path) -> FileStorage {
        self.path = path.to_path_buf();
        self
    }

    /// A reference to the open file, to identify it later (see [`FileHandle`]).
    pub fn handle(&self) -> FileHandle {
        FileHandle(Arc::clone(&self.file))
    }

    /// What the file is now.
    pub fn identity(&self) -> io::Result<FileIdentity> {
        self.handle().identity()
    }

    /// Whether the file is a block device (a raw device mapping), which cannot be
    /// truncated or extended: its length is the device's size.
    pub fn is_block_device(&self) -> io::Result<bool> {
        Ok(self.file.metadata()?.file_type().is_block_device())
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        loop {
            match self.file.read_at(buf, offset) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        let m = self.file.metadata()?;
        if m.file_type().is_block_device() {
            // A device's size is not in its metadata: its end is (positional I/O
            // never uses the file position this moves).
            use std::io::{Seek, SeekFrom};
            return (&*self.file).seek(SeekFrom::End(0));
        }
        Ok(m.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn sync(&self) -> io::Result<()> {
        if self.sync {
            self.file.sync_data()
        } else {
            Ok(())
        }
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.file.as_fd())
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        match seek_to(&self.file, offset, Whence::SeekData) {
            Ok(at) => Ok(Some(at.unwrap_or(offset))),
            // No data at or after `offset`.
            Err(Errno::ENXIO) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn next_hole(&self, offset: u64) -> io::Result<u64> {
        match seek_to(&self.file, offset, Whence::SeekHole) {
            Ok(Some(at)) => Ok(at),
            Ok(None) => self.len().map(|l| l.max(offset)),
            // `offset` is at or past the end: a hole.
            Err(Errno::ENXIO) => Ok(offset),
            Err(e) => Err(e.into()),
        }
    }
}

/// Calls `f(start, len)` for each range of `[offset, offset+len)` of `storage` that
/// the file system does not report as a hole (`SEEK_DATA`/`SEEK_HOLE`), in order: a
/// hole costs a system call, not a read. Where it cannot tell, the whole range.
pub fn for_each_data(
    storage: &dyn Storage,
    offset: u64,
    len: u64,
    mut f: impl FnMut(u64, u64) -> Result<()>,
) -> Result<()> {
    let end = offset.saturating_add(len);
    let what = |e| Error::io("cannot find the data of a file (SEEK_DATA)", e);
    let mut at = offset;
    while at < end {
        let Some(data) = storage.next_data(at).map_err(what)? else {
            break;
        };
        if data >= end {
            break;
        }
        // A file system that answers before `at` is not believed: one step on.
        let data = data.max(at);
        let hole = storage.next_hole(data).map_err(what)?.min(end);
        if hole <= data {
            f(data, end - data)?;
            break;
        }
        f(data, hole - data)?;
        at = hole;
    }
    Ok(())
}

/// `lseek` with `SEEK_DATA` or `SEEK_HOLE` from `offset`; `Ok(None)` where the
/// file system or file cannot answer (then everything counts as data). Moves the
/// file position, which positional I/O never uses.
fn seek_to(file: &File, offset: u64, whence: Whence) -> Result<Option<u64>, Errno> {
    let Ok(from) = i64::try_from(offset) else {
        return Ok(None);
    };
    match lseek(file, from, whence) {
        Ok(at) => Ok(u64::try_from(at).ok()),
        Err(Errno::EINVAL | Errno::EOPNOTSUPP) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A file held in memory: the [`Storage`] interface over a byte buffer, for tests and
/// for fuzzing the format parsers without touching the host file system
/// (see [`crate::fuzzing`]). `sync` does nothing; the buffer never grows beyond
/// its limit ([`MemStorage::MAX_LEN`] unless set lower): a write past it fails with
/// `FileTooLarge`, where a real file would just get a hole.
#[derive(Debug)]
pub struct MemStorage {
    bytes: std::sync::RwLock<Vec<u8>>,
    max_len: u64,
}

impl MemStorage {
    /// The largest the buffer may grow through writes and `set_len` (256 MiB).
    pub const MAX_LEN: u64 = 256 << 20;

    /// A file holding `bytes`.
    pub fn new(bytes: Vec<u8>) -> MemStorage {
        MemStorage {
            bytes: std::sync::RwLock::new(bytes),
            max_len: Self::MAX_LEN,
        }
    }

    /// This file, never growing beyond `max_len` bytes (at most
    /// [`MemStorage::MAX_LEN`]).
    pub fn with_max_len(mut self, max_len: u64) -> MemStorage {
        self.max_len = max_len.min(Self::MAX_LEN);
        self
    }

    /// The file's current content.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes.into_inner().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<u8>> {
        self.bytes.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<u8>> {
        self.bytes.write().unwrap_or_else(|p| p.into_inner())
    }

    /// `len` as a buffer length, if it is within the limit.
    fn checked_len(&self, len: Option<u64>) -> io::Result<usize> {
        match len {
            Some(l) if l <= self.max_len => Ok(l as usize),
            _ => Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!(
                    "this in-memory file cannot grow beyond {} bytes",
                    self.max_len
                ),
            )),
        }
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let bytes = self.read();
        let Ok(start) = usize::try_from(offset) else {
            return Ok(0);
        };
        let Some(have) = bytes.get(start..) else {
            return Ok(0);
        };
        let n = have.len().min(buf.len());
        buf[..n].copy_from_slice(&have[..n]);
        Ok(n)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = self.checked_len(offset.checked_add(buf.len() as u64))?;
        let mut bytes = self.write();
        if bytes.len() < end {
            let more = end - bytes.len();
            bytes.reserve_exact(more);
            bytes.resize(end, 0);
        }
        bytes[end - buf.len()..end].copy_from_slice(buf);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.read().len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = self.checked_len(Some(len))?;
        self.write().resize(len, 0);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_exclusive_lock_is_refused_and_shared_locks_coexist() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"x").unwrap();
        let a = FileStorage::open(&p, true, LockMode::Exclusive).unwrap();
        let e = FileStorage::open(&p, true, LockMode::Exclusive).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Locked);
        let e = FileStorage::open(&p, false, LockMode::Shared).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Locked);
        drop(a);
        let _r1 = FileStorage::open(&p, false, LockMode::Shared).unwrap();
        let _r2 = FileStorage::open(&p, false, LockMode::Shared).unwrap();
    }

    #[test]
    fn memory_storage_reads_writes_and_refuses_to_grow_without_bound() {
        let m = MemStorage::new(b"abc".to_vec());
        let mut b = [0u8; 4];
        assert_eq!(m.read_at(&mut b, 1).unwrap(), 2);
        assert_eq!(&b[..2], b"bc");
        assert_eq!(m.read_at(&mut b, u64::MAX).unwrap(), 0);
        m.write_all_at(b"xy", 4).unwrap();
        assert_eq!(m.len().unwrap(), 6);
        let e = m.write_all_at(b"z", MemStorage::MAX_LEN).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::FileTooLarge);
        assert!(m.write_all_at(b"z", u64::MAX).is_err());
        assert_eq!(m.into_bytes(), b"abc\0xy");
        let m = MemStorage::new(Vec::new()).with_max_len(10);
        m.write_all_at(b"0123456789", 0).unwrap();
        assert!(m.write_all_at(b"x", 10).is_err());
        assert!(m.set_len(11).is_err());
    }

    #[test]
    fn read_exact_past_end_is_eof_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        let s = FileStorage::open(&p, false, LockMode::None).unwrap();
        let mut b = [0u8; 4];
        let e = s.read_exact_at(&mut b, 0).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
