//! [`Disk`]: the public handle. One loop walks the chain of links with "where does
//! this range live?", splits the caller's buffer along the answers, reads coalesced
//! file ranges and falls through to parents for unallocated ranges.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::chain::{self, ChainPolicy};
use crate::descriptor::ExtentAccess;
use crate::disk_type::DiskType;
use crate::error::{Error, ErrorKind, Result};
use crate::extent::ExtentMapping;
use crate::geometry::Geometry;
use crate::ids;
use crate::limits::{MAX_CHAIN_DEPTH, SECTOR_SIZE};
use crate::link::{Link, LinkOpen};
use crate::zeros::is_zero;

/// How to open a disk.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    read_only: bool,
    /// Writes go to a throwaway redo log in this folder (None: persistent).
    redo_dir: Option<PathBuf>,
    lock: bool,
    sync: bool,
    chain: ChainPolicy,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            read_only: true,
            redo_dir: None,
            lock: true,
            sync: true,
            chain: ChainPolicy {
                single_link: false,
                check_cid: true,
                strict_paths: false,
                max_depth: MAX_CHAIN_DEPTH,
                stop_after: None,
            },
        }
    }
}

impl OpenOptions {
    /// Read-only, locked (shared) - the default.
    pub fn new() -> OpenOptions {
        OpenOptions::default()
    }

    /// Open for reading and writing (exclusive locks on every file).
    pub fn write(mut self, yes: bool) -> OpenOptions {
        self.read_only = !yes;
        self
    }

    /// Take advisory locks (default). Without them, a reader ignores writers.
    pub fn lock(mut self, yes: bool) -> OpenOptions {
        self.lock = yes;
        self
    }

    /// Make data durable (fsync) on flush and close (default). Without it, written
    /// data stays in the host's page cache, as with qemu's `cache=unsafe`; the
    /// metadata order is kept either way.
    pub fn sync(mut self, yes: bool) -> OpenOptions {
        self.sync = yes;
        self
    }

    /// Open only the named link, not its parents: ranges it does not hold read as
    /// zeros (VDDK's `VIXDISKLIB_FLAG_OPEN_SINGLE_LINK`).
    pub fn single_link(mut self, yes: bool) -> OpenOptions {
        self.chain.single_link = yes;
        self
    }

    /// Check that each parent's CID equals its child's parentCID (default). Turning
    /// this off opens chains whose parent changed after the snapshot (forensics).
    pub fn check_cid(mut self, yes: bool) -> OpenOptions {
        self.chain.check_cid = yes;
        self
    }

    /// The strict open policy, for untrusted images (off by default): extent and
    /// parent names that are absolute, contain `..` or pass through symbolic links
    /// are refused, and so are block devices (see [`crate::paths`]).
    pub fn strict_paths(mut self, yes: bool) -> OpenOptions {
        self.chain.strict_paths = yes;
        self
    }

    /// Most links in the chain (default [`MAX_CHAIN_DEPTH`]).
    pub fn max_depth(mut self, links: usize) -> OpenOptions {
        self.chain.max_depth = links.max(1);
        self
    }

    /// Independent non-persistent open: the disk is opened read-only and writes go
    /// to a throwaway redo log (a sparse file created in the system's temporary
    /// folder and unlinked at once), discarded on close. No file of the disk changes.
    pub fn non_persistent(self, yes: bool) -> OpenOptions {
        let dir = yes.then(std::env::temp_dir);
        self.non_persistent_in(dir)
    }

    /// Like [`OpenOptions::non_persistent`], with the redo log in `dir` (None:
    /// persistent).
    pub fn non_persistent_in(mut self, dir: Option<PathBuf>) -> OpenOptions {
        self.redo_dir = dir;
        self
    }

    /// Open only the top `links` links of the chain: below them, ranges read as
    /// zeros and map as unallocated (used by commit to read the links above its
    /// target).
    pub fn top_links(mut self, links: usize) -> OpenOptions {
        self.chain.stop_after = Some(links.max(1));
        self
    }

    /// Opens the disk.
    pub fn open(&self, path: impl AsRef<Path>) -> Result<Disk> {
        Disk::open_with(path.as_ref(), self)
    }
}

/// Where one piece of a read comes from (see [`Disk::for_each_source`]).
#[derive(Clone, Copy, Debug)]
pub enum DataSource<'a> {
    /// `length` bytes of the host file `fd` at byte `offset`: exactly what the
    /// guest reads there.
    File {
        /// The file (an extent's, open as long as the disk is).
        fd: BorrowedFd<'a>,
        /// Byte offset in the file.
        offset: u64,
        /// Bytes.
        length: u64,
    },
    /// `length` guest bytes at guest `offset` that are not plain file bytes
    /// (compressed grains, zeros, storage that is not a host file, a file that
    /// ends early): read them with [`Disk::read_at`].
    Read {
        /// Guest byte offset.
        offset: u64,
        /// Bytes.
        length: u64,
    },
}

impl<'a> DataSource<'a> {
    /// Appends `next` if it continues this piece (the same file, or guest reads,
    /// back to back); else hands it back.
    fn join(&mut self, next: DataSource<'a>) -> Option<DataSource<'a>> {
        match (self, next) {
            (
                DataSource::File { fd, offset, length },
                DataSource::File {
                    fd: f2,
                    offset: o2,
                    length: l2,
                },
            ) if fd.as_raw_fd() == f2.as_raw_fd() && *offset + *length == o2 => {
                *length += l2;
                None
            }
            (
                DataSource::Read { offset, length },
                DataSource::Read {
                    offset: o2,
                    length: l2,
                },
            ) if *offset + *length == o2 => {
                *length += l2;
                None
            }
            (_, next) => Some(next),
        }
    }
}

/// What a range of the disk is, as the allocation map reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeKind {
    /// Stored data.
    Data,
    /// Reads as zeros because a link says so.
    Zero,
    /// No link stores it: reads as zeros.
    Unallocated,
}

/// One run of the allocation map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapRange {
    /// First byte.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// What it is.
    pub kind: RangeKind,
    /// Which link answered (0 = the top link); for unallocated ranges the bottom link's depth
    /// (as `qemu-img map` reports it).
    pub depth: usize,
}

/// One extent as `info` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtentInfo {
    /// Access word (`RW`, `RDONLY`, `NOACCESS`).
    pub access: String,
    /// Size in sectors.
    pub sectors: u64,
    /// Extent type (`SPARSE`, `FLAT`, ...).
    pub kind: String,
    /// File of the extent, if any.
    pub file: Option<PathBuf>,
    /// Size of that file in bytes.
    pub file_bytes: u64,
}

/// One link as `info` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    /// Descriptor (or monolithic file) path.
    pub path: PathBuf,
    /// `createType` as written.
    pub create_type: String,
    /// Content ID.
    pub cid: Option<u32>,
    /// Parent's content ID (`ffffffff` for none).
    pub parent_cid: Option<u32>,
    /// `parentFileNameHint`.
    pub parent_file_name_hint: Option<String>,
    /// Extents.
    pub extents: Vec<ExtentInfo>,
}

/// What [`Disk::info`] reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskInfo {
    /// Virtual size in bytes.
    pub capacity: u64,
    /// Disk type of the top link, if it is one of ours.
    pub disk_type: Option<DiskType>,
    /// `createType` of the top link.
    pub create_type: String,
    /// `ddb.adapterType`.
    pub adapter_type: Option<String>,
    /// `ddb.virtualHWVersion`.
    pub hw_version: Option<u32>,
    /// Physical geometry from `ddb.geometry.*`.
    pub geometry: Option<Geometry>,
    /// BIOS geometry from `ddb.geometry.bios*`.
    pub bios_geometry: Option<Geometry>,
    /// `ddb.uuid`.
    pub uuid: Option<String>,
    /// CID of the top link.
    pub cid: Option<u32>,
    /// parentCID of the top link.
    pub parent_cid: Option<u32>,
    /// Guest bytes stored as data somewhere in the chain; `None` if the allocation
    /// map could not be walked (a damaged grain table elsewhere than where the disk
    /// is read): the reason is in `warnings`.
    pub allocated_bytes: Option<u64>,
    /// Bytes of all files of the chain on the host.
    pub file_bytes: u64,
    /// The chain, top link first.
    pub chain: Vec<LinkInfo>,
    /// What could not be found out, and why (the rest of the answer stands).
    pub warnings: Vec<String>,
}

/// An open virtual disk (a chain of links; the top one takes writes).
///
/// `Disk` is `Send + Sync`; every I/O method takes `&self`.
#[derive(Debug)]
pub struct Disk {
    links: Vec<Link>,
    capacity: u64,
    writable: bool,
    cid_renewed: AtomicBool,
    closed: AtomicBool,
    /// The change tracker of the top link (not of a throwaway redo log).
    cbt: Option<crate::cbt::Tracker>,
}

fn ddb_u32(link: &Link, key: &str) -> Result<Option<u32>> {
    Ok(link
        .descriptor()?
        .ddb(key)
        .and_then(|v| v.trim().parse().ok()))
}

impl Disk {
    /// Opens a disk read-only (shorthand for `OpenOptions::new().open(path)`).
    pub fn open(path: impl AsRef<Path>) -> Result<Disk> {
        OpenOptions::new().open(path)
    }

    fn open_with(path: &Path, opts: &OpenOptions) -> Result<Disk> {
        let how = LinkOpen {
            writable: !opts.read_only && opts.redo_dir.is_none(),
            lock: opts.lock,
            sync: opts.sync,
            strict_paths: opts.chain.strict_paths,
        };
        let link = Link::open(path, how)?;
        let capacity = link.capacity();
        let mut links = chain::open_chain(link, how, &opts.chain)?;
        // Tracking is checked against the files before this open changes them. A
        // non-persistent open sees the disk's history read-only: its writes go to
        // the throwaway redo log and are not the disk's changes.
        let cbt = crate::cbt::Tracker::open(&links[0], how.writable)?;
        links[0].begin_write()?;
        if let Some(t) = &cbt {
            t.begin(&links[0])?;
        }
        let mut writable = !opts.read_only;
        if let Some(dir) = &opts.redo_dir {
            let redo = Link::redo_log(capacity, &links[0], dir)?;
            links.insert(0, redo);
            writable = true;
        }
        Ok(Disk {
            links,
            capacity,
            writable,
            cid_renewed: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            cbt,
        })
    }

    /// The change tracker, if change tracking is enabled on the disk (read-only when
    /// the disk is open read-only or non-persistent: writes to a redo log are not
    /// the disk's changes).
    pub fn tracker(&self) -> Option<&crate::cbt::Tracker> {
        self.cbt.as_ref()
    }

    /// The change ID of the disk's current state (see [`crate::cbt`]): a backup of
    /// what the disk holds now records it and later asks what changed since.
    pub fn change_id(&self) -> Result<String> {
        match &self.cbt {
            Some(t) => t.change_id(),
            None => Err(self.untracked()),
        }
    }

    fn untracked(&self) -> Error {
        Error::new(
            ErrorKind::NotSupported,
            format!(
                "change tracking is not enabled on {} (enable it first)",
                self.links[0].path().display()
            ),
        )
    }

    /// The areas of `[offset, offset+len)` that changed since change ID `since`, as
    /// sorted, merged `(offset, length)` byte ranges (blocks of the tracker's block
    /// size, clipped to the range). `since` = `*` gives every area holding data (the
    /// allocated data of the whole chain), tracked or not, for a first full backup.
    /// Collects [`Disk::for_each_changed_area`].
    pub fn changed_areas(&self, since: &str, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        self.for_each_changed_area(since, offset, len, |o, l| {
            out.push((o, l));
            Ok(())
        })?;
        Ok(out)
    }

    /// [`Disk::changed_areas`] as a stream: calls `f(offset, length)` for each area,
    /// in ascending order, merged with its neighbours as it is found (only the
    /// pending area is held, so millions of areas take no memory). An error from `f`
    /// stops the walk and is returned. `f` may use the disk (the tracker is not
    /// locked while it runs).
    pub fn for_each_changed_area(
        &self,
        since: &str,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, u64) -> Result<()>,
    ) -> Result<()> {
        if since.trim() == crate::cbt::ALL {
            let mut emit = |(o, l): (u64, u64)| f(o, l);
            let mut areas = Coalesce::new(&mut emit, join_areas);
            self.for_each_range(offset, len, |r| {
                if r.kind == RangeKind::Data {
                    areas.push((r.offset, r.length))?;
                }
                Ok(())
            })?;
            return areas.finish();
        }
        match &self.cbt {
            Some(t) => t.for_each_changed(since, offset, len, self.capacity, f),
            None => Err(self.untracked()),
        }
    }

    /// Virtual size in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the disk is open for writing.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The links, top first.
    pub fn links(&self) -> &[Link] {
        &self.links
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.capacity => Ok(()),
            _ => Err(Error::new(
                ErrorKind::OutOfRange,
                format!(
                    "access of {len} bytes at offset {offset} is beyond the end of the disk ({} bytes)",
                    self.capacity
                ),
            )),
        }
    }

    /// Reads `buf.len()` bytes at byte `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len())?;
        self.read_chain(0, offset, buf)
    }

    /// Reads from link `level` downwards.
    fn read_chain(&self, level: usize, offset: u64, buf: &mut [u8]) -> Result<()> {
        let Some(link) = self.links.get(level) else {
            buf.fill(0);
            return Ok(());
        };
        // A parent smaller than its child reads as zeros past its end.
        let inside = link.capacity().saturating_sub(offset).min(buf.len() as u64) as usize;
        let (buf, past) = buf.split_at_mut(inside);
        past.fill(0);
        let mut pos = 0usize;
        while pos < buf.len() {
            let want = (buf.len() - pos) as u64;
            let (ext, mapping, n) = link.map(offset + pos as u64, want)?;
            let n = n as usize;
            let piece = &mut buf[pos..pos + n];
            match mapping {
                ExtentMapping::Data { file_offset } => link.read_data(ext, file_offset, piece)?,
                ExtentMapping::Compressed {
                    marker,
                    grain,
                    offset_in_grain,
                } => link.extents()[ext].extent.read_compressed(
                    marker,
                    grain,
                    offset_in_grain,
                    piece,
                )?,
                ExtentMapping::Zero => piece.fill(0),
                ExtentMapping::Unallocated => {
                    self.read_chain(level + 1, offset + pos as u64, piece)?
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// Where the bytes of `[offset, offset+len)` come from, in order: pieces of
    /// host files that hold exactly what the guest reads (a sender can move them
    /// with `sendfile`, never reading them), and pieces to read with
    /// [`Disk::read_at`]. Neighbouring pieces of one kind are joined. The
    /// descriptors are the disk's own, valid while it is borrowed; a concurrent
    /// write to the same range may or may not be seen, as with `read_at`.
    pub fn for_each_source<'a>(
        &'a self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(DataSource<'a>) -> Result<()>,
    ) -> Result<()> {
        let in_range = usize::try_from(len)
            .map_err(|_| Error::new(ErrorKind::OutOfRange, format!("{len} bytes at once")))?;
        self.check_range(offset, in_range)?;
        let mut pending: Option<DataSource<'a>> = None;
        self.sources_chain(0, offset, len, &mut |piece| {
            match &mut pending {
                Some(p) => {
                    if let Some(next) = p.join(piece) {
                        f(std::mem::replace(p, next))?;
                    }
                }
                None => pending = Some(piece),
            }
            Ok(())
        })?;
        match pending {
            Some(p) => f(p),
            None => Ok(()),
        }
    }

    /// [`Disk::for_each_source`] from link `level` downwards (the walk of
    /// `read_chain`).
    fn sources_chain<'a>(
        &'a self,
        level: usize,
        offset: u64,
        len: u64,
        out: &mut dyn FnMut(DataSource<'a>) -> Result<()>,
    ) -> Result<()> {
        let Some(link) = self.links.get(level) else {
            return out(DataSource::Read {
                offset,
                length: len,
            });
        };
        let inside = link.capacity().saturating_sub(offset).min(len);
        let mut pos = 0u64;
        while pos < inside {
            let (ext, mapping, n) = link.map(offset + pos, inside - pos)?;
            let guest = DataSource::Read {
                offset: offset + pos,
                length: n,
            };
            match mapping {
                ExtentMapping::Data { file_offset } => {
                    let piece = match link.extents()[ext].extent.data_file(file_offset, n) {
                        Some(fd) => DataSource::File {
                            fd,
                            offset: file_offset,
                            length: n,
                        },
                        None => guest,
                    };
                    out(piece)?;
                }
                ExtentMapping::Compressed { .. } | ExtentMapping::Zero => out(guest)?,
                ExtentMapping::Unallocated => {
                    self.sources_chain(level + 1, offset + pos, n, out)?
                }
            }
            pos += n;
        }
        // A parent smaller than its child reads as zeros past its end.
        if inside < len {
            out(DataSource::Read {
                offset: offset + inside,
                length: len - inside,
            })?;
        }
        Ok(())
    }

    /// Writes `data` at byte `offset` into the top link. The first write of an open
    /// gives the link a new CID.
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                "the disk is open read-only",
            ));
        }
        self.check_range(offset, data.len())?;
        // Zeros where the disk reads zeros already are not written: a VDDK client
        // copying a sparse disk writes its holes as zeros (nbdkit's vddk plugin
        // turns every zero request into a write), and each would allocate a grain.
        // Checked a grain at a time, stopping at the first non-zero byte.
        let grain = self.grain_bytes().max(SECTOR_SIZE);
        let end = offset + data.len() as u64;
        let piece_end = |at: u64| ((at / grain + 1) * grain).min(end);
        let zeros =
            |from: u64, to: u64| is_zero(&data[(from - offset) as usize..(to - offset) as usize]);
        let mut pending = offset; // start of what is still to be written
        let mut at = offset;
        while at < end {
            let zeros_from = at;
            while at < end && zeros(at, piece_end(at)) {
                at = piece_end(at);
            }
            if at == zeros_from {
                at = piece_end(at);
                continue;
            }
            // [zeros_from, at) is all zeros: write only what holds data now.
            let mut holding = Vec::new();
            self.for_each_range(zeros_from, at - zeros_from, |r| {
                if r.kind == RangeKind::Data {
                    holding.push((r.offset, r.offset + r.length));
                }
                Ok(())
            })?;
            let mut skip_from = zeros_from;
            for (s, e) in holding {
                if s > skip_from {
                    self.write_piece(data, offset, pending, skip_from)?;
                    pending = s;
                }
                skip_from = e;
            }
            if at > skip_from {
                self.write_piece(data, offset, pending, skip_from)?;
                pending = at;
            }
        }
        self.write_piece(data, offset, pending, end)
    }

    /// Writes `[from, to)` of `data` (which starts at guest `offset`) to the top
    /// link, renewing the CID on the first write and marking changed blocks.
    fn write_piece(&self, data: &[u8], offset: u64, from: u64, to: u64) -> Result<()> {
        if to <= from {
            return Ok(());
        }
        let data = &data[(from - offset) as usize..(to - offset) as usize];
        let offset = from;
        let top = &self.links[0];
        if !self.cid_renewed.swap(true, Ordering::SeqCst) {
            if let Err(e) = top.renew_cid() {
                self.cid_renewed.store(false, Ordering::SeqCst);
                return Err(e);
            }
        }
        let below = |off: u64, buf: &mut [u8]| self.read_chain(1, off, buf);
        // Marked even if the write fails part-way: some of it may have landed.
        let res = top.write(offset, data, &below);
        if let Some(t) = self.cbt.as_ref().filter(|t| t.writable()) {
            t.mark(offset, data.len() as u64)?;
        }
        res
    }

    /// Makes `[offset, offset+len)` read as zeros, writing only where the disk holds
    /// data now: ranges that already read as zeros (unallocated down the chain, or
    /// zeroed grains) are left alone, so zeroing an empty stretch of a sparse disk
    /// allocates nothing. With `only_if_cheap` (NBD's `FAST_ZERO`), a range that
    /// would need zeros written fails with `NotSupported` before anything is
    /// written. The map is walked a window at a time (bounded memory).
    pub fn write_zeroes(&self, offset: u64, len: u64, only_if_cheap: bool) -> Result<()> {
        if !self.writable {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                "the disk is open read-only",
            ));
        }
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.capacity)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::OutOfRange,
                    format!(
                        "zeroing {len} bytes at offset {offset} goes beyond the end of the disk ({} bytes)",
                        self.capacity
                    ),
                )
            })?;
        const WINDOW: u64 = 1 << 30;
        static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
        if only_if_cheap {
            let mut at = offset;
            while at < end {
                let n = WINDOW.min(end - at);
                self.for_each_range(at, n, |r| {
                    if r.kind == RangeKind::Data {
                        return Err(Error::new(
                            ErrorKind::NotSupported,
                            format!(
                                "bytes {}..{} hold data: zeroing them means writing zeros",
                                r.offset,
                                r.offset + r.length
                            ),
                        ));
                    }
                    Ok(())
                })?;
                at += n;
            }
            return Ok(());
        }
        let mut at = offset;
        while at < end {
            let n = WINDOW.min(end - at);
            let mut data: Vec<(u64, u64)> = Vec::new();
            self.for_each_range(at, n, |r| {
                if r.kind == RangeKind::Data {
                    data.push((r.offset, r.length));
                }
                Ok(())
            })?;
            for (o, l) in data {
                let mut p = o;
                while p < o + l {
                    let k = (o + l - p).min(ZEROS.len() as u64) as usize;
                    self.write_at(&ZEROS[..k], p)?;
                    p += k as u64;
                }
            }
            at += n;
        }
        Ok(())
    }

    /// The grain size of the disk's top link (what a writer should align to), or
    /// 4 KiB for disks without grains (flat).
    pub fn grain_bytes(&self) -> u64 {
        let top = self
            .links
            .iter()
            .find(|l| !l.is_redo_log())
            .unwrap_or(&self.links[0]);
        top.extents()
            .iter()
            .find_map(|e| match &e.extent {
                crate::extent::Extent::Sparse(s) => Some(s.grain_bytes()),
                crate::extent::Extent::SeSparse(s) => Some(s.grain_bytes()),
                crate::extent::Extent::Stream(s) => Some(s.header().grain_bytes()),
                _ => None,
            })
            .unwrap_or(4096)
    }

    /// Writes from now on keep the top link's CID (commit changes it once, at the
    /// end, so an interrupted commit leaves the chain above it valid).
    pub(crate) fn keep_cid(&self) {
        self.cid_renewed.store(true, Ordering::SeqCst);
    }

    /// Writes back all metadata and makes written data durable.
    pub fn flush(&self) -> Result<()> {
        if self.writable {
            self.links[0].flush()?;
        }
        Ok(())
    }

    /// Flushes and closes cleanly (clears the unclean-shutdown marks). Dropping a
    /// `Disk` does the same but can only log errors.
    pub fn close(self) -> Result<()> {
        self.close_ref()
    }

    fn close_ref(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) || !self.writable {
            return Ok(());
        }
        self.links[0].flush()?;
        self.links[0].close()?;
        if let Some(t) = &self.cbt {
            t.close(&self.links[0])?;
        }
        Ok(())
    }

    /// The allocation map of `[offset, offset+len)`: coalesced runs saying whether
    /// each range is data, zero or unallocated, and at which depth of the chain.
    /// Collects [`Disk::for_each_range`] (a hostile file can describe millions of
    /// runs: stream them where the whole disk is walked).
    pub fn allocation_map(&self, offset: u64, len: u64) -> Result<Vec<MapRange>> {
        let mut out = Vec::new();
        self.for_each_range(offset, len, |r| {
            out.push(r);
            Ok(())
        })?;
        Ok(out)
    }

    /// The allocation map of `[offset, offset+len)` as a stream: calls `f` for each
    /// run, in ascending order, merged with its neighbours of the same kind and depth
    /// as it is found. Only the pending run is held, so a map of millions of runs
    /// takes no memory. An error from `f` stops the walk and is returned. No lock is
    /// held while `f` runs, so it may read and write the disk (commit copies from
    /// inside the walk).
    pub fn for_each_range(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(MapRange) -> Result<()>,
    ) -> Result<()> {
        let len = len.min(self.capacity.saturating_sub(offset));
        let mut runs = Coalesce::new(&mut f, join_ranges);
        self.map_chain(0, offset, len, &mut runs)?;
        runs.finish()
    }

    /// Guest bytes stored as data somewhere in the chain (a walk of the whole
    /// allocation map, in constant memory).
    pub fn allocated_bytes(&self) -> Result<u64> {
        let mut total = 0u64;
        self.for_each_range(0, self.capacity, |r| {
            if r.kind == RangeKind::Data {
                total = total.saturating_add(r.length);
            }
            Ok(())
        })?;
        Ok(total)
    }

    fn map_chain(
        &self,
        level: usize,
        offset: u64,
        len: u64,
        out: &mut Coalesce<'_, MapRange>,
    ) -> Result<()> {
        let Some(link) = self.links.get(level) else {
            return out.push(MapRange {
                offset,
                length: len,
                kind: RangeKind::Unallocated,
                depth: level.saturating_sub(1),
            });
        };
        let full = len;
        let inside = link.capacity().saturating_sub(offset).min(len);
        let len = inside;
        let mut pos = 0u64;
        while pos < len {
            let (ext, mapping, n) = link.map(offset + pos, len - pos)?;
            let kind = match mapping {
                ExtentMapping::Data { file_offset } => {
                    // Holes of a flat extent's file are zeros, not data.
                    let mut at = offset + pos;
                    link.extents()[ext].extent.for_each_file_piece(
                        file_offset,
                        n,
                        |data, length| {
                            let kind = if data {
                                RangeKind::Data
                            } else {
                                RangeKind::Zero
                            };
                            out.push(MapRange {
                                offset: at,
                                length,
                                kind,
                                depth: level,
                            })?;
                            at += length;
                            Ok(())
                        },
                    )?;
                    pos += n;
                    continue;
                }
                ExtentMapping::Compressed { .. } => RangeKind::Data,
                ExtentMapping::Zero => RangeKind::Zero,
                ExtentMapping::Unallocated => {
                    self.map_chain(level + 1, offset + pos, n, out)?;
                    pos += n;
                    continue;
                }
            };
            out.push(MapRange {
                offset: offset + pos,
                length: n,
                kind,
                depth: level,
            })?;
            pos += n;
        }
        // Past the end of a parent smaller than its child: nothing below either.
        if inside < full {
            out.push(MapRange {
                offset: offset + inside,
                length: full - inside,
                kind: RangeKind::Unallocated,
                depth: level,
            })?;
        }
        Ok(())
    }

    /// Capacity, geometry, adapter, hardware version, CIDs, extents and allocation.
    /// Everything but the allocation comes from the descriptors and headers; the
    /// allocated bytes need a walk of the whole allocation map, and a disk can open
    /// and read while one of its grain tables is bad: then they are unknown (`None`)
    /// and the reason is a warning, instead of the whole answer failing.
    pub fn info(&self) -> Result<DiskInfo> {
        // A non-persistent open's redo log is not part of the disk.
        let disk_links: Vec<&Link> = self.links.iter().filter(|l| !l.is_redo_log()).collect();
        let top = disk_links.first().copied().unwrap_or(&self.links[0]);
        let mut chain = Vec::with_capacity(self.links.len());
        let mut file_bytes = 0u64;
        for link in disk_links {
            let d = link.descriptor()?;
            let mut extents = Vec::new();
            for e in link.extents() {
                let bytes = e.extent.file_len()?;
                file_bytes += bytes;
                extents.push(ExtentInfo {
                    access: e.line.access.as_str().to_string(),
                    sectors: e.line.sectors,
                    kind: e.line.kind.as_str().to_string(),
                    file: e.path.clone(),
                    file_bytes: bytes,
                });
            }
            chain.push(LinkInfo {
                path: link.path().to_path_buf(),
                create_type: d
                    .create_type()
                    .map(|t| t.as_str().to_string())
                    .unwrap_or_default(),
                cid: d.cid(),
                parent_cid: d.parent_cid(),
                parent_file_name_hint: d.parent_file_name_hint().map(str::to_string),
                extents,
            });
        }
        let mut warnings = Vec::new();
        let allocated_bytes = match self.allocated_bytes() {
            Ok(n) => Some(n),
            Err(e) => {
                warnings.push(format!("the allocated bytes are unknown: {e}"));
                None
            }
        };
        let geometry_of = |c: &str, h: &str, s: &str| -> Result<Option<Geometry>> {
            Ok(
                match (ddb_u32(top, c)?, ddb_u32(top, h)?, ddb_u32(top, s)?) {
                    (Some(cylinders), Some(heads), Some(sectors)) => Some(Geometry {
                        cylinders,
                        heads,
                        sectors,
                    }),
                    _ => None,
                },
            )
        };
        let d = top.descriptor()?;
        let thin = d
            .ddb("ddb.thinProvisioned")
            .is_some_and(|v| v.trim() == "1");
        let create = d.create_type();
        let disk_type = create
            .as_ref()
            .and_then(|t| DiskType::from_create_type(t, thin));
        if let Some(w) = disk_type.and_then(|t| t.capacity_warning(self.capacity)) {
            warnings.push(w);
        }
        Ok(DiskInfo {
            capacity: self.capacity,
            disk_type,
            create_type: create.map(|t| t.as_str().to_string()).unwrap_or_default(),
            adapter_type: d.ddb("ddb.adapterType").map(str::to_string),
            hw_version: d
                .ddb("ddb.virtualHWVersion")
                .and_then(|v| v.trim().parse().ok()),
            uuid: d.ddb("ddb.uuid").map(str::to_string),
            cid: d.cid(),
            parent_cid: d.parent_cid(),
            geometry: {
                drop(d);
                geometry_of(
                    "ddb.geometry.cylinders",
                    "ddb.geometry.heads",
                    "ddb.geometry.sectors",
                )?
            },
            bios_geometry: geometry_of(
                "ddb.geometry.biosCylinders",
                "ddb.geometry.biosHeads",
                "ddb.geometry.biosSectors",
            )?,
            allocated_bytes,
            file_bytes,
            chain,
            warnings,
        })
    }

    /// DDB keys of the disk (without the `ddb.` prefix), top link first, no duplicates.
    pub fn metadata_keys(&self) -> Result<Vec<String>> {
        let mut keys: Vec<String> = Vec::new();
        for link in &self.links {
            for (k, _) in link.descriptor()?.ddb_entries() {
                let k = strip_ddb(&k).to_string();
                if !keys.iter().any(|x| x.eq_ignore_ascii_case(&k)) {
                    keys.push(k);
                }
            }
        }
        Ok(keys)
    }

    /// The value of DDB key `key` (with or without the `ddb.` prefix), searched from
    /// the top link down.
    pub fn metadata(&self, key: &str) -> Result<String> {
        let full = format!("ddb.{}", strip_ddb(key));
        for link in &self.links {
            if let Some(v) = link.descriptor()?.ddb(&full) {
                return Ok(v.to_string());
            }
        }
        Err(Error::new(
            ErrorKind::KeyNotFound,
            format!("metadata key {key:?} not found"),
        ))
    }

    /// Sets DDB key `key` in the top link and saves the descriptor.
    pub fn set_metadata(&self, key: &str, value: &str) -> Result<()> {
        if !self.writable {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                "the disk is open read-only",
            ));
        }
        let name = strip_ddb(key);
        if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == '=' || c == '"') {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("invalid metadata key {key:?}"),
            ));
        }
        if value.contains(['"', '\n', '\r', '\0']) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "metadata values cannot contain quotes, line breaks or NUL",
            ));
        }
        let top = &self.links[0];
        let mut d = top.descriptor()?;
        let before = d.clone();
        d.set_ddb(&format!("ddb.{name}"), value);
        if let Err(e) = top.save_descriptor(&d) {
            *d = before;
            return Err(e);
        }
        Ok(())
    }

    /// Whether every extent of the top link is read-write.
    pub fn all_extents_writable(&self) -> bool {
        self.links[0]
            .extents()
            .iter()
            .all(|e| e.line.access == ExtentAccess::ReadWrite)
    }

    /// CID of the top link.
    pub fn cid(&self) -> Result<u32> {
        Ok(self.links[0]
            .descriptor()?
            .cid()
            .unwrap_or(ids::CID_NO_PARENT))
    }
}

/// Runs handed on as they are found, each first merged into the one before it when
/// it continues it (`join`): only the pending run is held.
pub(crate) struct Coalesce<'a, T> {
    pending: Option<T>,
    emit: &'a mut dyn FnMut(T) -> Result<()>,
    /// Extends the pending run by the next one, if it continues it.
    join: fn(&mut T, &T) -> bool,
}

impl<'a, T> Coalesce<'a, T> {
    pub(crate) fn new(
        emit: &'a mut dyn FnMut(T) -> Result<()>,
        join: fn(&mut T, &T) -> bool,
    ) -> Coalesce<'a, T> {
        Coalesce {
            pending: None,
            emit,
            join,
        }
    }

    /// Takes the next run: merged, or the pending one is handed on.
    pub(crate) fn push(&mut self, next: T) -> Result<()> {
        if let Some(p) = &mut self.pending {
            if (self.join)(p, &next) {
                return Ok(());
            }
        }
        match self.pending.replace(next) {
            Some(done) => (self.emit)(done),
            None => Ok(()),
        }
    }

    /// Hands on the last run.
    pub(crate) fn finish(mut self) -> Result<()> {
        match self.pending.take() {
            Some(done) => (self.emit)(done),
            None => Ok(()),
        }
    }
}

/// Allocation map runs merge when they continue with the same kind and depth.
fn join_ranges(last: &mut MapRange, r: &MapRange) -> bool {
    let continues =
        last.kind == r.kind && last.depth == r.depth && last.offset + last.length == r.offset;
    if continues {
        last.length += r.length;
    }
    continues
}

/// `(offset, length)` areas merge when one ends where the next starts.
pub(crate) fn join_areas(last: &mut (u64, u64), a: &(u64, u64)) -> bool {
    let continues = last.0 + last.1 == a.0;
    if continues {
        last.1 += a.1;
    }
    continues
}

fn strip_ddb(key: &str) -> &str {
    // `get`: a key whose fourth byte is inside a multi-byte character has no prefix
    // (slicing it panicked).
    match key.get(..4) {
        Some(p) if p.eq_ignore_ascii_case("ddb.") => &key[4..],
        _ => key,
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        if let Err(e) = self.close_ref() {
            tracing::error!("closing {} failed: {e}", self.links[0].path().display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Disk>();
    }

    #[test]
    fn ddb_prefix_is_stripped_without_slicing_inside_a_character() {
        assert_eq!(strip_ddb("DDB.uuid"), "uuid");
        assert_eq!(strip_ddb("uuid"), "uuid");
        // Found by fuzzing: the fourth byte is inside 'ü'.
        assert_eq!(strip_ddb("uui\u{fc}d"), "uui\u{fc}d");
    }
}
