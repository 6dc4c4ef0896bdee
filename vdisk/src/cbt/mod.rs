//! Changed-block tracking (CBT): which parts of a disk changed since a backup.
//!
//! A tracked link names a sidecar file in its descriptor (DDB key
//! [`DDB_KEY`], a file name in the link's folder; the format is in [`format`]). The sidecar keeps, per block, the number of the write session that
//! last wrote it. Every open for writing starts a new session (a higher sequence
//! number), and so does taking a change ID of a disk open for writing; a change ID
//! `EPOCH/SEQ` therefore covers exactly the writes stamped up to `SEQ`, and "what
//! changed since it" is every block stamped later.
//!
//! Tracking is only trusted while nothing can have been missed. A sidecar found
//! marked open (the writer died), or whose recorded CID and file fingerprint (device,
//! inode, size and modification time of each of the link's files, read from the open
//! files, so the spelling of the path the disk was opened by does not matter) no
//! longer match the link (a program that does not track wrote to it), is invalid: old change IDs are refused
//! with [`ErrorKind::ChangeIdRefused`], and the next open for writing starts a new
//! epoch (a new random id) so the next backup is a full one.
//!
//! Tracking follows the disk through [`crate::ops::create_child`] (the child gets a
//! copy of the parent's sidecar and continues its history) and
//! [`crate::ops::commit`] (the target takes over the top link's history).

pub mod format;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::error::{Error, ErrorKind, Result};
use crate::link::Link;
use format::{CbtHeader, FLAG_INVALID, FLAG_OPEN, HEADER_BYTES};

/// The DDB key (with its `ddb.` prefix) naming a link's sidecar file.
pub const DDB_KEY: &str = "ddb.vdisk.changeTrackPath";

/// The change ID meaning "everything allocated" in [`crate::Disk::changed_areas`].
pub const ALL: &str = "*";

/// Blocks of the map scanned under the tracker's lock at a time when listing changes.
const SCAN_BLOCKS: u64 = 1 << 16;

/// The sidecar file name used for the link at `path`: its file stem + `-cbt.vdcbt`.
pub fn sidecar_name(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "disk".into());
    format!("{stem}-cbt.vdcbt")
}

/// What the sidecar of a link says, as loaded.
#[derive(Clone, Debug)]
struct Loaded {
    header: CbtHeader,
    map: Vec<u32>,
    /// Why old change IDs cannot be trusted, if they cannot.
    invalid: Option<String>,
}

/// The sidecar path a link's descriptor names, if tracking is enabled on it: an
/// absolute path, resolved now, so that the sidecar is found again whatever the
/// working folder is when it is saved.
fn sidecar_of(link: &Link) -> Result<Option<PathBuf>> {
    let Some(name) = link.descriptor()?.ddb(DDB_KEY).map(str::to_string) else {
        return Ok(None);
    };
    // A plain file name in the link's folder: a descriptor cannot point it elsewhere.
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(Error::invalid(format!(
            "{}: bad change-tracking file name {name:?} (a file name in the disk's folder is needed)",
            link.path().display()
        )));
    }
    let dir = link.path().parent().unwrap_or(Path::new("."));
    let path = std::path::absolute(dir.join(name)).map_err(|e| {
        Error::io(
            format!(
                "{}: cannot resolve the folder of its change-tracking file",
                link.path().display()
            ),
            e,
        )
    })?;
    // It is written on every writable open: never through a link or into a device.
    if let Ok(m) = std::fs::symlink_metadata(&path) {
        if !m.file_type().is_file() {
            return Err(Error::new(
                ErrorKind::AccessDenied,
                format!(
                    "{}: the change-tracking file {} is not a regular file",
                    link.path().display(),
                    path.display()
                ),
            ));
        }
    }
    Ok(Some(path))
}

/// FNV-1a over what the link's files are: device, inode, size and modification
/// time of each, from the open files (never their names: a disk opened as `d.vmdk`,
/// `./d.vmdk` or by an absolute path is the same disk).
fn fingerprint(link: &Link) -> Result<u64> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for f in link.file_identities()? {
        eat(&f.dev.to_le_bytes());
        eat(&f.ino.to_le_bytes());
        eat(&f.len.to_le_bytes());
        eat(&f.mtime.to_le_bytes());
        eat(&f.mtime_nsec.to_le_bytes());
    }
    Ok(h)
}

fn link_cid(link: &Link) -> Result<u32> {
    Ok(link
        .descriptor()?
        .cid()
        .unwrap_or(crate::ids::CID_NO_PARENT))
}

fn now_text() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("unix time {secs}")
}

fn new_epoch() -> [u8; 16] {
    let mut e = [0u8; 16];
    e[..8].copy_from_slice(&crate::ids::random_u64().to_le_bytes());
    e[8..].copy_from_slice(&crate::ids::random_u64().to_le_bytes());
    e
}

/// The sidecar of a link whose descriptor was just given the key.
fn named_sidecar(link: &Link) -> Result<PathBuf> {
    sidecar_of(link)?.ok_or_else(|| {
        Error::new(
            ErrorKind::Fail,
            format!(
                "{}: the change-tracking key is missing after it was written",
                link.path().display()
            ),
        )
    })
}

/// Reads and checks the sidecar at `path` against the link it tracks.
fn load(path: &Path, link: &Link) -> Result<Loaded> {
    let io = |e: std::io::Error| {
        Error::io(
            format!("cannot read the change-tracking file {}", path.display()),
            e,
        )
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    let max = HEADER_BYTES as u64 + 4 * crate::limits::MAX_CBT_BLOCKS;
    if len > max || len < HEADER_BYTES as u64 {
        return Err(Error::invalid(format!(
            "{}: {len} bytes is not a change-tracking file",
            path.display()
        )));
    }
    let bytes = std::fs::read(path).map_err(io)?;
    let (head, body) = bytes.split_at(HEADER_BYTES);
    let header = format::decode_header(head, len).map_err(|e| e.within(path.display()))?;
    let map = format::decode_map(head, body).map_err(|e| e.within(path.display()))?;
    let invalid = if header.flags & FLAG_INVALID != 0 {
        Some(header.note.clone())
    } else if header.flags & FLAG_OPEN != 0 {
        Some(
            "the disk was not closed cleanly while its changes were tracked (changes may have \
             been lost)"
                .to_string(),
        )
    } else if header.capacity != link.capacity() {
        Some(format!(
            "the disk's capacity changed from {} to {} bytes",
            header.capacity,
            link.capacity()
        ))
    } else if header.disk_cid != link_cid(link)? || header.fingerprint != fingerprint(link)? {
        Some(
            "the disk was changed by a program that does not track changes (its files or CID \
             differ from when tracking last saw them)"
                .to_string(),
        )
    } else {
        None
    };
    Ok(Loaded {
        header,
        map,
        invalid,
    })
}

/// A fresh history for a link: a new epoch, no block written since.
fn fresh(link: &Link, seq: u64, note: String) -> Loaded {
    let block_size = format::block_size_for(link.capacity());
    let blocks = format::block_count(link.capacity(), block_size) as usize;
    Loaded {
        header: CbtHeader {
            flags: 0,
            block_size,
            capacity: link.capacity(),
            epoch: new_epoch(),
            seq,
            disk_cid: 0,
            fingerprint: 0,
            note,
        },
        map: vec![0; blocks],
        invalid: None,
    }
}

/// Writes `l` to `path` (through a temporary file renamed over it, synced: see
/// [`crate::replace`]).
fn save(path: &Path, l: &Loaded) -> Result<()> {
    let bytes = format::encode(&l.header, &l.map);
    crate::replace::replace_file(path, &bytes, crate::storage::LockMode::None, true)
        .map(drop)
        .map_err(|e| {
            e.within(format!(
                "cannot write the change-tracking file {}",
                path.display()
            ))
        })
}

/// Stamps `l` with the link's current CID and fingerprint, as a closed sidecar.
fn seal(l: &mut Loaded, link: &Link) -> Result<()> {
    l.header.disk_cid = link_cid(link)?;
    l.header.fingerprint = fingerprint(link)?;
    l.header.flags &= !FLAG_OPEN;
    if let Some(reason) = &l.invalid {
        l.header.flags |= FLAG_INVALID;
        l.header.note.clone_from(reason);
    }
    Ok(())
}

/// The change tracker of an open disk's top link.
#[derive(Debug)]
pub struct Tracker {
    path: PathBuf,
    writable: bool,
    state: Mutex<TrackerState>,
}

#[derive(Debug)]
struct TrackerState {
    loaded: Loaded,
    /// Blocks were stamped since the sidecar was last written.
    dirty: bool,
}

/// What [`Tracker::status`] reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrackingStatus {
    /// The sidecar file.
    pub path: PathBuf,
    /// The change ID a backup of the disk's current state would record (read-only
    /// opens; a writable open reports the session being written).
    pub change_id: String,
    /// Bytes per tracked block.
    pub block_size: u64,
    /// Why old change IDs are refused, if they are.
    pub invalid: Option<String>,
    /// Why the current epoch began.
    pub note: String,
}

impl Tracker {
    /// Loads the tracker of `link` if tracking is enabled on it. Nothing is written:
    /// call [`Tracker::begin`] once the open has succeeded.
    pub(crate) fn open(link: &Link, writable: bool) -> Result<Option<Tracker>> {
        let Some(path) = sidecar_of(link)? else {
            return Ok(None);
        };
        let loaded = match load(&path, link) {
            Ok(l) => l,
            Err(e) => {
                let mut l = fresh(link, 1, String::new());
                l.invalid = Some(format!("the change-tracking file is unusable: {e}"));
                l
            }
        };
        Ok(Some(Tracker {
            path,
            writable,
            state: Mutex::new(TrackerState {
                loaded,
                dirty: false,
            }),
        }))
    }

    fn state(&self) -> Result<MutexGuard<'_, TrackerState>> {
        self.state
            .lock()
            .map_err(|_| Error::new(ErrorKind::Fail, "change tracker lock poisoned"))
    }

    /// Starts a write session: a new sequence number (a new epoch if the history
    /// cannot be trusted), and the sidecar marked open, on disk, before any write.
    pub(crate) fn begin(&self, link: &Link) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut s = self.state()?;
        if let Some(reason) = s.loaded.invalid.take() {
            let seq = s.loaded.header.seq.saturating_add(1).max(1);
            s.loaded = fresh(
                link,
                seq,
                format!("tracking restarted at {} because {reason}", now_text()),
            );
            tracing::warn!(
                "{}: change tracking restarted: {reason}",
                link.path().display()
            );
        } else {
            s.loaded.header.seq = s.loaded.header.seq.saturating_add(1);
        }
        s.loaded.header.flags = FLAG_OPEN;
        save(&self.path, &s.loaded)?;
        s.dirty = false;
        Ok(())
    }

    /// Records that `[offset, offset+len)` was written in the current session.
    pub(crate) fn mark(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mut s = self.state()?;
        let bs = s.loaded.header.block_size;
        let seq = u32::try_from(s.loaded.header.seq).unwrap_or(u32::MAX);
        let first = (offset / bs) as usize;
        let last = ((offset + len - 1) / bs) as usize;
        let end = (last + 1).min(s.loaded.map.len());
        for b in &mut s.loaded.map[first.min(end)..end] {
            *b = seq;
        }
        s.dirty = true;
        Ok(())
    }

    /// Writes the sidecar at a clean close of `link` (after the link's own files are
    /// final, so the fingerprint matches them).
    pub(crate) fn close(&self, link: &Link) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut s = self.state()?;
        seal(&mut s.loaded, link)?;
        save(&self.path, &s.loaded)?;
        s.dirty = false;
        Ok(())
    }

    /// Whether this open records changes (the disk's own files are written).
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// The sidecar file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The change ID of the disk's current state. On a disk open for writing this
    /// also starts a new session, so that writes after it are reported as changes
    /// since it. Refused while the history cannot be trusted.
    pub fn change_id(&self) -> Result<String> {
        let mut s = self.state()?;
        if let Some(reason) = &s.loaded.invalid {
            return Err(Error::new(
                ErrorKind::ChangeIdRefused,
                format!(
                    "change tracking of this disk cannot be trusted ({reason}); open it for \
                     writing to restart tracking, and take a full backup"
                ),
            ));
        }
        let id = format::change_id(&s.loaded.header.epoch, s.loaded.header.seq);
        if self.writable {
            s.loaded.header.seq = s.loaded.header.seq.saturating_add(1);
        }
        Ok(id)
    }

    /// The state of tracking.
    pub fn status(&self) -> Result<TrackingStatus> {
        let s = self.state()?;
        Ok(TrackingStatus {
            path: self.path.clone(),
            change_id: format::change_id(&s.loaded.header.epoch, s.loaded.header.seq),
            block_size: s.loaded.header.block_size,
            invalid: s.loaded.invalid.clone(),
            note: s.loaded.header.note.clone(),
        })
    }

    /// The blocks written after change ID `since`, as sorted, merged byte ranges
    /// `(offset, length)` clipped to `[offset, offset+len)` and to `capacity`, each
    /// handed to `f` as it is found (only the pending range is held). The map is
    /// scanned a slice at a time and `f` runs without the tracker's lock held, so it
    /// may use the disk.
    pub fn for_each_changed(
        &self,
        since: &str,
        offset: u64,
        len: u64,
        capacity: u64,
        mut f: impl FnMut(u64, u64) -> Result<()>,
    ) -> Result<()> {
        let (seq, bs) = {
            let s = self.state()?;
            let refuse = |why: String| Error::new(ErrorKind::ChangeIdRefused, why);
            if let Some(reason) = &s.loaded.invalid {
                return Err(refuse(format!(
                    "change ID {since} cannot be used: {reason}; take a full backup"
                )));
            }
            let (epoch, seq) = format::parse_change_id(since).ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidArgument,
                    format!(
                        "{since:?} is not a change ID (EPOCH/SEQ, or * for all allocated data)"
                    ),
                )
            })?;
            let h = &s.loaded.header;
            if epoch != h.epoch {
                return Err(refuse(format!(
                    "change ID {since} is from another tracking history than this disk's \
                     ({}; {}): take a full backup",
                    format::change_id(&h.epoch, h.seq),
                    if h.note.is_empty() {
                        "tracking was re-enabled"
                    } else {
                        h.note.as_str()
                    }
                )));
            }
            if seq > h.seq {
                return Err(refuse(format!(
                    "change ID {since} is newer than this disk's history (last session {})",
                    h.seq
                )));
            }
            (seq, h.block_size)
        };
        let end = offset.saturating_add(len).min(capacity);
        if offset >= end {
            return Ok(());
        }
        let mut emit = |(o, l): (u64, u64)| f(o, l);
        let mut out = crate::disk::Coalesce::new(&mut emit, crate::disk::join_areas);
        let last = (end - 1) / bs;
        let mut first = offset / bs;
        let mut slice: Vec<(u64, u64)> = Vec::new();
        while first <= last {
            let stop = last.min(first.saturating_add(SCAN_BLOCKS - 1));
            {
                let s = self.state()?;
                for b in first..=stop {
                    let stamp = s.loaded.map.get(b as usize).copied().unwrap_or(0);
                    if u64::from(stamp) <= seq {
                        continue;
                    }
                    let start = (b * bs).max(offset);
                    let area = (start, ((b + 1) * bs).min(end) - start);
                    let merged = slice
                        .last_mut()
                        .is_some_and(|prev| crate::disk::join_areas(prev, &area));
                    if !merged {
                        slice.push(area);
                    }
                }
            }
            for area in slice.drain(..) {
                out.push(area)?;
            }
            first = stop + 1;
        }
        out.finish()
    }

    /// A copy of the in-memory history, sealed for `link` (a new child of this disk).
    fn snapshot(&self) -> Result<Loaded> {
        Ok(self.state()?.loaded.clone())
    }
}

/// Loads the history of a closed link, if tracking is enabled on it (an unusable
/// sidecar gives a history marked invalid).
fn load_closed(link: &Link) -> Result<Option<Loaded>> {
    let Some(path) = sidecar_of(link)? else {
        return Ok(None);
    };
    Ok(Some(load(&path, link).unwrap_or_else(|e| {
        let mut l = fresh(link, 1, String::new());
        l.invalid = Some(format!("the change-tracking file is unusable: {e}"));
        l
    })))
}

/// Gives `link` (closed, open for writing) the history `l`: names a sidecar in its
/// descriptor (if it does not yet) and writes it, sealed with the link's final state.
fn install(link: &Link, mut l: Loaded) -> Result<()> {
    let path = match sidecar_of(link)? {
        Some(p) => p,
        None => {
            let mut d = link.descriptor()?;
            d.set_ddb(DDB_KEY, &sidecar_name(link.path()));
            link.save_descriptor(&d)?;
            drop(d);
            named_sidecar(link)?
        }
    };
    l.header.capacity = link.capacity();
    seal(&mut l, link)?;
    save(&path, &l)
}

fn open_single(path: &Path, write: bool) -> Result<crate::Disk> {
    crate::OpenOptions::new()
        .write(write)
        .single_link(true)
        .open(path)
}

/// Turns tracking on for the disk at `path` (its top link): a new history whose
/// first change ID is returned. Already enabled: returns the current change ID.
pub fn enable(path: &Path) -> Result<String> {
    let disk = crate::OpenOptions::new().open(path)?;
    if let Some(t) = disk.tracker() {
        // A descriptor naming a sidecar that is not there is an enable killed
        // before it wrote the sidecar: finish it.
        if t.path().exists() {
            return t.change_id();
        }
    }
    drop(disk);
    {
        let disk = open_single(path, true)?;
        let link = &disk.links()[0];
        let mut d = link.descriptor()?;
        d.set_ddb(DDB_KEY, &sidecar_name(link.path()));
        link.save_descriptor(&d)?;
        drop(d);
        disk.close()?;
    }
    let disk = open_single(path, false)?;
    let link = &disk.links()[0];
    let mut l = fresh(link, 1, format!("tracking enabled at {}", now_text()));
    seal(&mut l, link)?;
    save(&named_sidecar(link)?, &l)?;
    Ok(format::change_id(&l.header.epoch, l.header.seq))
}

/// Turns tracking off for the disk at `path`: the descriptor key goes, then the
/// sidecar file (run again after an interruption, it removes a sidecar left
/// behind). Returns whether it was on.
pub fn disable(path: &Path) -> Result<bool> {
    let disk = open_single(path, true)?;
    let link = &disk.links()[0];
    let Some(file) = sidecar_of(link)? else {
        // A disable killed after the descriptor lost its key leaves the sidecar of
        // the usual name behind: it goes now.
        let orphan = link
            .path()
            .parent()
            .unwrap_or(Path::new("."))
            .join(sidecar_name(link.path()));
        drop(disk);
        if std::fs::symlink_metadata(&orphan).is_ok_and(|m| m.file_type().is_file()) {
            std::fs::remove_file(&orphan)
                .map_err(|e| Error::io(format!("cannot remove {}", orphan.display()), e))?;
        }
        crate::replace::remove_stale_temp(&orphan)?;
        return Ok(false);
    };
    let mut d = link.descriptor()?;
    d.remove_ddb(DDB_KEY);
    link.save_descriptor(&d)?;
    drop(d);
    disk.close()?;
    match std::fs::remove_file(&file) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("cannot remove {}", file.display()), e)),
    }
    crate::replace::remove_stale_temp(&file)?;
    Ok(true)
}

/// Gives a new child (at `child`, closed) the history of its parent: the open
/// parent's tracker if it has one, else the parent link's sidecar. Nothing is done
/// if the parent is not tracked.
pub(crate) fn inherit(parent: &crate::Disk, child: &Path) -> Result<()> {
    let l = match parent.tracker() {
        Some(t) => t.snapshot()?,
        None => {
            let Some(top) = parent.links().iter().find(|l| !l.is_redo_log()) else {
                return Ok(());
            };
            match load_closed(top)? {
                Some(l) => l,
                None => return Ok(()),
            }
        }
    };
    let disk = open_single(child, true)?;
    disk.keep_cid();
    let link = &disk.links()[0];
    // The child's own descriptor names its own sidecar.
    let name = sidecar_name(link.path());
    {
        let mut d = link.descriptor()?;
        d.set_ddb(DDB_KEY, &name);
        link.save_descriptor(&d)?;
    }
    disk.close()?;
    let disk = open_single(child, false)?;
    install(&disk.links()[0], l)
}

/// The history of the closed link at `path`, if it is tracked (for a commit, read
/// before the link is merged away).
pub(crate) fn history(path: &Path) -> Result<Option<HistoryCopy>> {
    let disk = open_single(path, false)?;
    Ok(load_closed(&disk.links()[0])?.map(HistoryCopy))
}

/// A tracked link's history carried across an operation that rewrites its files.
#[derive(Debug)]
pub(crate) struct HistoryCopy(Loaded);

/// Installs a carried history on the closed link at `path` (sealed with the link's
/// files as they are now).
pub(crate) fn reinstall(path: &Path, h: HistoryCopy) -> Result<()> {
    let disk = open_single(path, true)?;
    disk.keep_cid();
    let link = &disk.links()[0];
    if sidecar_of(link)?.is_none() {
        let mut d = link.descriptor()?;
        d.set_ddb(DDB_KEY, &sidecar_name(link.path()));
        link.save_descriptor(&d)?;
    }
    drop(disk);
    let disk = open_single(path, false)?;
    install(&disk.links()[0], h.0)
}

/// The sidecar file of the closed link at `path`, if it is tracked.
pub(crate) fn sidecar_path(link: &Link) -> Result<Option<PathBuf>> {
    sidecar_of(link)
}
