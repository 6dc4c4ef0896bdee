//! What the server exports: disks named on the command line, and datastores
//! (folders whose disks are exported by the name VDDK uses for them,
//! `[NAME] folder/disk.vmdk`).
//!
//! A disk is opened when a client first selects it; while open, every connection to
//! it shares one [`vdisk::Disk`], so a write replied to on one connection and
//! flushed on any is seen by all (what `CAN_MULTI_CONN` promises). Read-only and
//! persistent exports are closed when their last connection ends (so other programs
//! can use the disk between clients); a non-persistent export stays open until the
//! server stops - its redo log keeps the clients' writes for the server's lifetime,
//! as `qemu-nbd --snapshot` does, and vanishes with it.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use vdisk::{Disk, Error, ErrorKind, OpenOptions};

use crate::limits::{MAX_DATASTORE_DISKS, MAX_PAYLOAD};

/// How an export's disk is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Independent non-persistent: writes go to a throwaway redo log; the disk's
    /// files never change.
    NonPersistent,
    /// Read-only: writes are refused.
    ReadOnly,
    /// Persistent: writes go to the disk.
    Persistent,
}

impl Mode {
    /// The word used in listings.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::NonPersistent => "non-persistent",
            Mode::ReadOnly => "read-only",
            Mode::Persistent => "persistent",
        }
    }
}

/// A disk exported under a name.
#[derive(Clone, Debug)]
pub struct DiskExport {
    /// The export name.
    pub name: String,
    /// The disk (descriptor or monolithic file; the top of a chain).
    pub path: PathBuf,
}

/// A folder whose disks are exported as `[NAME] relative/path.vmdk`.
#[derive(Clone, Debug)]
pub struct Datastore {
    /// The datastore name.
    pub name: String,
    /// The folder (canonical).
    pub root: PathBuf,
}

impl Datastore {
    /// A datastore over `root` (which must be a folder).
    pub fn new(name: &str, root: &Path) -> vdisk::Result<Datastore> {
        if name.is_empty() || name.contains(']') {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("{name:?} is not a datastore name (non-empty, without ']')"),
            ));
        }
        let root = std::fs::canonicalize(root)
            .map_err(|e| Error::io(format!("datastore folder {}", root.display()), e))?;
        if !root.is_dir() {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("{} is not a folder", root.display()),
            ));
        }
        Ok(Datastore {
            name: name.to_string(),
            root,
        })
    }

    /// The file `[name] rel` names, confined to the datastore: no absolute or `..`
    /// component, and the file it finally is (links followed) lies below the root.
    fn resolve(&self, rel: &str) -> Option<PathBuf> {
        let rel_path = Path::new(rel);
        if rel.is_empty()
            || rel_path
                .components()
                .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return None;
        }
        let real = std::fs::canonicalize(self.root.join(rel_path)).ok()?;
        (real.starts_with(&self.root) && real.is_file() && looks_like_a_disk(&real)).then_some(real)
    }

    /// Every disk below the root (at most [`MAX_DATASTORE_DISKS`]), by export name.
    fn list(&self, out: &mut Vec<(String, PathBuf)>) {
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            let mut entries: Vec<_> = entries.filter_map(|e| e.ok()).collect();
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                if out.len() >= MAX_DATASTORE_DISKS {
                    return;
                }
                let Ok(t) = e.file_type() else { continue };
                let p = e.path();
                if t.is_dir() {
                    stack.push(p);
                } else if t.is_file() && looks_like_a_disk(&p) {
                    if let Ok(rel) = p.strip_prefix(&self.root) {
                        let name = format!("[{}] {}", self.name, rel.display());
                        out.push((name, p));
                    }
                }
            }
        }
    }
}

/// Whether `p` is a disk one opens (a `.vmdk` descriptor, or a monolithic sparse
/// file with its descriptor inside), not an extent file of one.
fn looks_like_a_disk(p: &Path) -> bool {
    if !p
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("vmdk"))
    {
        return false;
    }
    let mut head = [0u8; 1024];
    let n = std::fs::File::open(p)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
        .unwrap_or(0);
    let head = &head[..n];
    if head.starts_with(b"KDMV") {
        // descriptorOffset (u64 at byte 28) != 0: the descriptor is embedded.
        return head.len() >= 36 && head[28..36].iter().any(|&b| b != 0);
    }
    let text = String::from_utf8_lossy(head);
    text.contains("createType") || text.starts_with("# Disk DescriptorFile")
}

/// An export open for clients: the disk, shared by every connection to it.
#[derive(Debug)]
pub struct OpenExport {
    /// The export name.
    pub name: String,
    /// The disk's path.
    pub path: PathBuf,
    /// How it is open.
    pub mode: Mode,
    /// The disk.
    pub disk: Disk,
    /// Connections using it.
    connections: AtomicUsize,
}

impl OpenExport {
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.disk.capacity()
    }

    /// Whether clients may write.
    pub fn writable(&self) -> bool {
        self.mode != Mode::ReadOnly
    }

    /// The description `INFO` and `LIST` give.
    pub fn description(&self) -> String {
        describe(&self.path, self.mode)
    }

    /// The block sizes advertised: minimum 512, preferred the grain (at least 4 KiB),
    /// maximum [`MAX_PAYLOAD`].
    pub fn block_sizes(&self) -> (u32, u32, u32) {
        let preferred = self.disk.grain_bytes().clamp(4096, 1 << 20) as u32;
        (512, preferred, MAX_PAYLOAD as u32)
    }
}

fn describe(path: &Path, mode: Mode) -> String {
    format!("{} ({})", path.display(), mode.as_str())
}

/// A connection's hold on an export; releases it when dropped.
#[derive(Debug)]
pub struct ExportUse {
    export: Arc<OpenExport>,
}

impl std::ops::Deref for ExportUse {
    type Target = OpenExport;
    fn deref(&self) -> &OpenExport {
        &self.export
    }
}

impl Drop for ExportUse {
    fn drop(&mut self) {
        self.export.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Why an export cannot be used.
#[derive(Debug)]
pub enum Refusal {
    /// No export has that name.
    Unknown(String),
    /// It exists but cannot be served now (too many connections, the disk does not
    /// open).
    Unavailable(String),
}

/// Every export of a server.
#[derive(Debug)]
pub struct Exports {
    disks: Vec<DiskExport>,
    datastores: Vec<Datastore>,
    mode: Mode,
    open: Mutex<HashMap<String, Weak<OpenExport>>>,
    /// Non-persistent exports, kept open (with their redo logs) until the server
    /// stops.
    pinned: Mutex<Vec<Arc<OpenExport>>>,
}

impl Exports {
    /// The exports: `disks` by name, every disk of `datastores`, all opened as `mode`.
    pub fn new(disks: Vec<DiskExport>, datastores: Vec<Datastore>, mode: Mode) -> Exports {
        Exports {
            disks,
            datastores,
            mode,
            open: Mutex::new(HashMap::new()),
            pinned: Mutex::new(Vec::new()),
        }
    }

    /// How disks are opened.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The path an export name stands for. The empty name is the default export:
    /// the only named disk, when there is exactly one and no datastore.
    pub fn resolve(&self, name: &str) -> Option<(String, PathBuf)> {
        if name.is_empty() && self.disks.len() == 1 && self.datastores.is_empty() {
            let d = &self.disks[0];
            return Some((d.name.clone(), d.path.clone()));
        }
        if let Some(d) = self.disks.iter().find(|d| d.name == name) {
            return Some((d.name.clone(), d.path.clone()));
        }
        let rest = name.strip_prefix('[')?;
        let (store, rel) = rest.split_once(']')?;
        let ds = self.datastores.iter().find(|d| d.name == store)?;
        let rel = rel.strip_prefix(' ').unwrap_or(rel);
        ds.resolve(rel).map(|p| (name.to_string(), p))
    }

    /// Every export: name, description.
    pub fn list(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, PathBuf)> = self
            .disks
            .iter()
            .map(|d| (d.name.clone(), d.path.clone()))
            .collect();
        for ds in &self.datastores {
            ds.list(&mut out);
        }
        out.into_iter()
            .map(|(n, p)| {
                let d = describe(&p, self.mode);
                (n, d)
            })
            .collect()
    }

    /// The export `name`, opened if no connection has it open yet; refused when
    /// `max_connections` connections hold it already.
    pub fn acquire(&self, name: &str, max_connections: usize) -> Result<ExportUse, Refusal> {
        let Some((name, path)) = self.resolve(name) else {
            return Err(Refusal::Unknown(format!("no export is named {name:?}")));
        };
        let mut open = self
            .open
            .lock()
            .map_err(|_| Refusal::Unavailable("export table poisoned".into()))?;
        let existing = open.get(&name).and_then(Weak::upgrade);
        let export = match existing {
            Some(e) => e,
            None => {
                let disk = self
                    .open_disk(&path)
                    .map_err(|e| Refusal::Unavailable(format!("{name}: {e}")))?;
                let e = Arc::new(OpenExport {
                    name: name.clone(),
                    path,
                    mode: self.mode,
                    disk,
                    connections: AtomicUsize::new(0),
                });
                open.retain(|_, w| w.strong_count() > 0);
                open.insert(name.clone(), Arc::downgrade(&e));
                if self.mode == Mode::NonPersistent {
                    if let Ok(mut p) = self.pinned.lock() {
                        p.push(Arc::clone(&e));
                    }
                }
                e
            }
        };
        let n = export.connections.fetch_add(1, Ordering::SeqCst);
        let hold = ExportUse { export };
        if n >= max_connections {
            return Err(Refusal::Unavailable(format!(
                "{name} already has {n} connections (the limit)"
            )));
        }
        Ok(hold)
    }

    /// Closes the exports kept open (non-persistent ones), once no connection uses
    /// them (the server is stopping).
    pub fn close_all(&self) {
        if let Ok(mut p) = self.pinned.lock() {
            p.clear();
        }
    }

    fn open_disk(&self, path: &Path) -> vdisk::Result<Disk> {
        match self.mode {
            Mode::NonPersistent => OpenOptions::new()
                .non_persistent(true)
                .sync(false)
                .open(path),
            Mode::ReadOnly => OpenOptions::new().open(path),
            Mode::Persistent => OpenOptions::new().write(true).open(path),
        }
    }
}
