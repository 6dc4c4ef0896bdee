//! Positional I/O on one host file. Every disk file (descriptor, extent) is accessed
//! through [`Storage`]: reads and writes take an offset and never move a shared cursor,
//! so one handle serves many threads at once.

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

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

/// Takes `lock` on `file`, trying again for up to [`crate::limits::LOCK_RETRY`] while
/// it is held elsewhere (see there why a free disk can look locked for a moment).
fn try_lock_for_a_while(file: &File, lock: LockMode) -> std::result::Result<(), TryLockError> {
    let give_up = std::time::Instant::now() + crate::limits::LOCK_RETRY;
    loop {
        let locked = match lock {
            LockMode::None => Ok(()),
            LockMode::Shared => file.try_lock_shared(),
            LockMode::Exclusive => file.try_lock(),
        };
        match locked {
            Err(TryLockError::WouldBlock) if std::time::Instant::now() < give_up => {
                std::thread::sleep(crate::limits::LOCK_RETRY_PAUSE);
            }
            other => return other,
        }
    }
}

/// A host file, opened for reading or for reading and writing, optionally locked.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
    sync: bool,
}

impl FileStorage {
    /// Opens an existing file and takes the advisory lock `lock` on it.
    pub fn open(path: &Path, writable: bool, lock: LockMode) -> Result<FileStorage> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
        match try_lock_for_a_while(&file, lock) {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(Error::new(
                    ErrorKind::Locked,
                    format!(
                        "{} is locked by another user of the disk ({} access refused)",
                        path.display(),
                        if writable { "write" } else { "read" }
                    ),
                ))
            }
            Err(TryLockError::Error(e)) => {
                return Err(Error::io(format!("cannot lock {}", path.display()), e))
            }
        }
        Ok(FileStorage {
            file,
            path: path.to_path_buf(),
            sync: true,
        })
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
        try_lock_for_a_while(&file, LockMode::Exclusive).map_err(|_| {
            Error::new(ErrorKind::Locked, format!("cannot lock {}", path.display()))
        })?;
        Ok(FileStorage {
            file,
            path: path.to_path_buf(),
            sync: true,
        })
    }

    /// The path the file was opened with.
    pub fn path(&self) -> &Path {
        &self.path
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
        Ok(self.file.metadata()?.len())
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
