//! The FUSE file system of a mounted disk: one directory holding `flat` (the whole
//! disk) and `p1`, `p2`, ... (one file per partition, a byte range of the disk).
//!
//! Every file is read and written through the one open [`vdisk::Disk`], so what a
//! write goes to (the disk files, or a throwaway redo log) is decided by how the disk
//! was opened. Files are opened for direct I/O: the kernel keeps no page cache of
//! them, so `flat` and the partition files, which alias the same bytes, always agree,
//! and a read's data is copied once, from the server straight into the reader's
//! buffer (with the page cache it is copied into cache pages, then again to the
//! reader, and each open has to drop the pages of the last). Writes go straight
//! through; `mmap` still works on kernels that allow it for direct-I/O files (6.6+).

use std::ffi::OsStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};
use rayon::prelude::*;
use vdisk::{ErrorKind, RangeKind, VirtualDisk};

use crate::prefetch::Prefetcher;

/// The largest read or write request asked of the kernel (1 MiB).
pub const MAX_REQUEST: u32 = 1 << 20;
/// How long the kernel may cache names and attributes.
const TTL: Duration = Duration::from_secs(1);
/// The inode of the first file (`flat`); the root directory is 1.
const FIRST_FILE_INO: u64 = 2;
/// The allocation map is asked for at most this many bytes at a time by `lseek`.
const SEEK_WINDOW: u64 = 1 << 30;
/// Block size reported by `stat` and `statfs`.
const BLOCK_SIZE: u32 = 4096;

/// A request is read by several threads only if each gets at least this much.
const PARALLEL_PIECE_MIN: usize = 256 << 10;
/// Pieces of a parallel read start at multiples of this (a grain of a hosted disk).
const PARALLEL_PIECE_ALIGN: usize = 64 << 10;

/// The reply to a read of a range without data.
static ZEROS: [u8; MAX_REQUEST as usize] = [0; MAX_REQUEST as usize];

/// The most threads that share one read.
const MAX_READ_THREADS: usize = 4;

/// A pool of up to [`MAX_READ_THREADS`] threads (one per CPU), or `None` with one
/// CPU or if threads cannot be started (reads are then done by the serving thread).
fn read_pool() -> Option<rayon::ThreadPool> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        return None;
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(cpus.min(MAX_READ_THREADS))
        .thread_name(|i| format!("vdisk-read-{i}"))
        .build()
        .ok()
}

/// Reads `buf` at `offset` of the disk; a large request is cut into pieces read at
/// once by the read pool (a sequential reader with direct I/O has one request in
/// flight, and inflating a streamOptimized disk's grains is CPU work that would
/// otherwise use one core).
fn read_parallel(
    disk: &dyn VirtualDisk,
    pool: Option<&rayon::ThreadPool>,
    buf: &mut [u8],
    offset: u64,
) -> vdisk::Result<()> {
    let pieces = pool.map_or(1, |p| {
        p.current_num_threads().min(buf.len() / PARALLEL_PIECE_MIN)
    });
    let Some(pool) = pool.filter(|_| pieces > 1) else {
        return disk.read_at(buf, offset);
    };
    // Pieces are whole multiples of the piece alignment, the last takes the rest.
    let piece = (buf.len() / pieces).next_multiple_of(PARALLEL_PIECE_ALIGN);
    pool.install(|| {
        buf.par_chunks_mut(piece)
            .enumerate()
            .try_for_each(|(i, chunk)| disk.read_at(chunk, offset + (i * piece) as u64))
    })
}

thread_local! {
    /// The read buffer of a serving thread (grown to the largest request seen, at
    /// most [`MAX_REQUEST`]).
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One file of the mount: a byte range of the disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountedFile {
    /// Its name in the mount directory (`flat`, `p1`, ...).
    pub name: String,
    /// Where it starts on the disk, in bytes.
    pub offset: u64,
    /// Its size in bytes (a partition running past the end of the disk is cut there).
    pub size: u64,
    /// The partition number, `None` for `flat`.
    pub partition: Option<u32>,
}

/// The FUSE file system over one open disk.
pub(crate) struct DiskFs {
    /// Reads ahead for sequential readers (dropped first: it joins its thread,
    /// which shares the disk).
    prefetch: Option<Prefetcher>,
    disk: Arc<dyn VirtualDisk>,
    files: Vec<MountedFile>,
    writable: bool,
    uid: u32,
    gid: u32,
    /// When the mount was made (access and change times).
    mounted: SystemTime,
    /// The last modification: the disk's descriptor mtime, then the last write.
    mtime: Mutex<SystemTime>,
    /// The threads that share a large read (only for disks with compressed grains,
    /// none on a single CPU).
    read_pool: Option<Arc<rayon::ThreadPool>>,
}

impl DiskFs {
    /// A file system over `disk`; `compressed`: the disk holds compressed grains
    /// (streamOptimized), whose reads are CPU work worth sharing out.
    pub(crate) fn new(
        disk: Box<dyn VirtualDisk>,
        compressed: bool,
        files: Vec<MountedFile>,
        mtime: SystemTime,
    ) -> DiskFs {
        // Only inflating compressed grains needs more than one thread per request:
        // other disks are bound by the host's reads, which the read-ahead overlaps
        // with serving, and idle pool threads would spin against the serving thread
        // for the CPU.
        let disk: Arc<dyn VirtualDisk> = Arc::from(disk);
        let read_pool = if compressed {
            read_pool().map(Arc::new)
        } else {
            None
        };
        // Read-ahead overlaps inflating the next range with serving this one; on
        // uncompressed disks the host's own read-ahead does better (measured with
        // bench/mount_bench.py --ab). VDISK_MOUNT_NO_PREFETCH turns it off.
        let prefetch = if !compressed || std::env::var_os("VDISK_MOUNT_NO_PREFETCH").is_some() {
            None
        } else {
            let (disk, pool) = (Arc::clone(&disk), read_pool.clone());
            Prefetcher::start(Arc::new(move |buf: &mut [u8], offset: u64| {
                read_parallel(&*disk, pool.as_deref(), buf, offset)
            }))
        };
        DiskFs {
            prefetch,
            writable: disk.is_writable(),
            disk,
            files,
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            mounted: SystemTime::now(),
            mtime: Mutex::new(mtime),
            read_pool,
        }
    }

    /// Whether the map says `[at, at+len)` holds no data (false if it cannot tell).
    fn holds_no_data(&self, at: u64, len: u64) -> bool {
        let mut covered = 0u64;
        let walked = self.disk.for_each_range(at, len, &mut |r| {
            if r.kind == RangeKind::Data {
                return Err(vdisk::Error::new(ErrorKind::Fail, "data"));
            }
            covered += r.length;
            Ok(())
        });
        walked.is_ok() && covered == len
    }

    fn file(&self, ino: INodeNo) -> Option<&MountedFile> {
        let index = ino.0.checked_sub(FIRST_FILE_INO)?;
        self.files.get(usize::try_from(index).ok()?)
    }

    fn mtime(&self) -> SystemTime {
        *self.mtime.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn dir_attr(&self) -> FileAttr {
        FileAttr {
            ino: INodeNo::ROOT,
            size: 0,
            blocks: 0,
            atime: self.mounted,
            mtime: self.mounted,
            ctime: self.mounted,
            crtime: self.mounted,
            kind: FileType::Directory,
            perm: 0o555,
            nlink: 2,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: BLOCK_SIZE,
            flags: 0,
        }
    }

    fn file_attr(&self, index: usize) -> FileAttr {
        let f = &self.files[index];
        let mtime = self.mtime();
        FileAttr {
            ino: INodeNo(FIRST_FILE_INO + index as u64),
            size: f.size,
            blocks: f.size.div_ceil(512),
            atime: self.mounted,
            mtime,
            ctime: mtime,
            crtime: self.mounted,
            kind: FileType::RegularFile,
            perm: if self.writable { 0o644 } else { 0o444 },
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: BLOCK_SIZE,
            flags: 0,
        }
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        if ino == INodeNo::ROOT {
            return Some(self.dir_attr());
        }
        self.file(ino)?;
        Some(self.file_attr((ino.0 - FIRST_FILE_INO) as usize))
    }

    /// The first offset at or after `from` (file-relative) that is data (`data`) or a
    /// hole (`!data`), as the disk's allocation map says.
    fn seek(&self, f: &MountedFile, from: u64, data: bool) -> Result<u64, Errno> {
        if from >= f.size {
            return Err(Errno::ENXIO);
        }
        let mut pos = from;
        while pos < f.size {
            let len = (f.size - pos).min(SEEK_WINDOW);
            let map = self
                .disk
                .allocation_map(f.offset + pos, len)
                .map_err(|e| errno(&e))?;
            for r in &map {
                if (r.kind == RangeKind::Data) == data {
                    return Ok(r.offset.max(f.offset + pos) - f.offset);
                }
            }
            pos += len;
        }
        if data {
            Err(Errno::ENXIO)
        } else {
            Ok(f.size)
        }
    }
}

/// The errno for a disk error.
fn errno(e: &vdisk::Error) -> Errno {
    match e.kind() {
        ErrorKind::ReadOnly => Errno::EROFS,
        ErrorKind::OutOfRange => Errno::EINVAL,
        ErrorKind::DiskFull => Errno::ENOSPC,
        ErrorKind::FileTooBig => Errno::EFBIG,
        ErrorKind::AccessDenied => Errno::EACCES,
        ErrorKind::OutOfMemory => Errno::ENOMEM,
        _ => Errno::EIO,
    }
}

impl Filesystem for DiskFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Each setter returns the nearest value the kernel takes when ours is refused.
        if let Err(nearest) = config.set_max_write(MAX_REQUEST) {
            let _ = config.set_max_write(nearest);
        }
        if let Err(nearest) = config.set_max_readahead(MAX_REQUEST) {
            let _ = config.set_max_readahead(nearest);
        }
        let _ = config.set_max_background(64);
        // Files are opened for direct I/O; mmap of them still works where the
        // kernel can allow it (6.6 and later).
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent != INodeNo::ROOT {
            return reply.error(Errno::ENOENT);
        }
        match self.files.iter().position(|f| OsStr::new(&f.name) == name) {
            Some(i) => reply.entry(&TTL, &self.file_attr(i), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(attr) = self.attr(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let changes_size = size.is_some_and(|s| s != attr.size);
        let changes_owner = mode.is_some_and(|m| m & 0o7777 != u32::from(attr.perm))
            || uid.is_some_and(|u| u != attr.uid)
            || gid.is_some_and(|g| g != attr.gid);
        if (changes_size || changes_owner) && !self.writable {
            return reply.error(Errno::EROFS);
        }
        // The files are fixed views of the disk: they cannot be truncated, grown or
        // given other owners. Time changes (touch) are accepted and ignored.
        if changes_size || changes_owner {
            return reply.error(Errno::EPERM);
        }
        reply.attr(&TTL, &attr);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if self.file(ino).is_none() {
            return reply.error(if ino == INodeNo::ROOT {
                Errno::EISDIR
            } else {
                Errno::ENOENT
            });
        }
        if flags.acc_mode() != OpenAccMode::O_RDONLY && !self.writable {
            return reply.error(Errno::EROFS);
        }
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        );
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(f) = self.file(ino) else {
            return reply.error(Errno::ENOENT);
        };
        // Reads past the end are short (empty at or after the end).
        let len = f.size.saturating_sub(offset).min(u64::from(size)) as usize;
        if len == 0 {
            return reply.data(&[]);
        }
        let at = f.offset + offset;
        if let Some(p) = &self.prefetch {
            if let Some(hit) = p.request(at, len) {
                reply.data(hit.data());
                return p.recycle(hit);
            }
        }
        // A range holding no data (half of a typical disk) is answered from a
        // static page of zeros: no read, no memset.
        if len <= ZEROS.len() && self.holds_no_data(at, len as u64) {
            return reply.data(&ZEROS[..len]);
        }
        // One buffer per serving thread, kept between requests: a fresh 1 MiB
        // allocation per request is an mmap, 256 page faults and an munmap.
        READ_BUF.with_borrow_mut(|buf| {
            if buf.len() < len {
                buf.resize(len, 0);
            }
            let buf = &mut buf[..len];
            match read_parallel(&*self.disk, self.read_pool.as_deref(), buf, at) {
                Ok(()) => reply.data(buf),
                Err(e) => reply.error(errno(&e)),
            }
        })
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(f) = self.file(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if !self.writable {
            return reply.error(Errno::EROFS);
        }
        if data.is_empty() {
            return reply.written(0);
        }
        // A write that starts at or past the end fails; one that runs past it is cut
        // short there (the caller's next write then fails).
        if offset >= f.size {
            return reply.error(Errno::EFBIG);
        }
        let len = (f.size - offset).min(data.len() as u64) as usize;
        if let Some(p) = &self.prefetch {
            p.invalidate();
        }
        match self.disk.write_at(&data[..len], f.offset + offset) {
            Ok(()) => {
                *self.mtime.lock().unwrap_or_else(|e| e.into_inner()) = SystemTime::now();
                // `len` is at most the request's length, which is a u32.
                reply.written(len as u32)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        match self.disk.flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.disk.flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let dots = [(INodeNo::ROOT, "."), (INodeNo::ROOT, "..")];
        let entries = dots
            .into_iter()
            .map(|(i, n)| (i, FileType::Directory, n))
            .chain(self.files.iter().enumerate().map(|(i, f)| {
                (
                    INodeNo(FIRST_FILE_INO + i as u64),
                    FileType::RegularFile,
                    f.name.as_str(),
                )
            }));
        for (i, (ino, kind, name)) in entries.enumerate().skip(offset as usize) {
            // The offset given with an entry is where the next readdir resumes.
            if reply.add(ino, i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.disk.capacity().div_ceil(u64::from(BLOCK_SIZE));
        let files = self.files.len() as u64 + 1;
        reply.statfs(blocks, 0, 0, files, 0, BLOCK_SIZE, 255, BLOCK_SIZE);
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let Some(f) = self.file(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let Ok(from) = u64::try_from(offset) else {
            return reply.error(Errno::EINVAL);
        };
        let data = match whence {
            libc::SEEK_DATA => true,
            libc::SEEK_HOLE => false,
            // SEEK_SET, SEEK_CUR and SEEK_END are answered by the kernel itself.
            _ => return reply.error(Errno::EINVAL),
        };
        match self.seek(f, from, data) {
            Ok(pos) => reply.offset(pos as i64),
            Err(e) => reply.error(e),
        }
    }
}
