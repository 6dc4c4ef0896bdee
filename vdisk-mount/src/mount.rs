//! Mounting a disk: open it (non-persistent, persistent or read-only), read its
//! partition table and serve `flat` and `p1`, `p2`, ... with FUSE in background
//! threads until [`Mounted`] is unmounted or dropped.

use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use fuser::{BackgroundSession, Config, MountOption, SessionACL};
use thiserror::Error;
use vdisk::{OpenOptions, VirtualDisk};

use crate::fuse::{DiskFs, MountedFile};
use crate::mountinfo::FS_SUBTYPE;
use crate::source::DiskSource;
use crate::{read_partitions, PartitionTable};

/// How the disk is opened, which decides where writes go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Writes go to a throwaway redo log in the temporary folder, discarded at
    /// unmount: no file of the disk ever changes (the default).
    #[default]
    NonPersistent,
    /// Writes go to the disk (its top link), as with a read-write open.
    Persistent,
    /// No writes: the files are read-only.
    ReadOnly,
}

impl Mode {
    /// `non-persistent`, `persistent` or `read-only`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::NonPersistent => "non-persistent",
            Mode::Persistent => "persistent",
            Mode::ReadOnly => "read-only",
        }
    }
}

/// How to mount.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MountOptions {
    /// Where writes go.
    pub mode: Mode,
    /// Let other users than the one mounting use the mount (FUSE's `allow_other`;
    /// users other than root need `user_allow_other` in `/etc/fuse.conf`). Permissions
    /// are checked by the kernel against the files' modes either way.
    pub allow_other: bool,
}

/// Why a disk could not be mounted or unmounted.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MountError {
    /// The mount point is missing or unusable.
    #[error("mount point {}: {reason}", path.display())]
    Mountpoint {
        /// The mount point given.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The disk could not be opened (the library's message names the file).
    #[error("{source}")]
    Open {
        /// The disk given.
        path: PathBuf,
        /// The library's error.
        #[source]
        source: vdisk::Error,
    },
    /// FUSE refused the mount (no `/dev/fuse`, no `fusermount3`, not permitted, ...).
    #[error("cannot mount {} on {}: {source}", disk.display(), dir.display())]
    Fuse {
        /// The disk.
        disk: PathBuf,
        /// The mount point.
        dir: PathBuf,
        /// What FUSE or fusermount3 reported.
        #[source]
        source: io::Error,
    },
    /// A partition's file system could not be mounted or unmounted on `target`.
    #[error("{}: {reason}", target.display())]
    Volume {
        /// The folder the file system was to be mounted on.
        target: PathBuf,
        /// What went wrong (mount(8)'s or umount(8)'s message, or ours).
        reason: String,
    },
    /// The FUSE session ended with an error.
    #[error("FUSE session on {} failed: {source}", dir.display())]
    Session {
        /// The mount point.
        dir: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// A mounted disk. Dropping it unmounts (see [`Mounted::unmount`]).
#[derive(Debug)]
pub struct Mounted {
    session: Option<BackgroundSession>,
    dir: PathBuf,
    disk: PathBuf,
    files: Vec<MountedFile>,
    warnings: Vec<String>,
    table: Option<PartitionTable>,
}

impl Mounted {
    /// The mount point (canonical).
    pub fn mountpoint(&self) -> &Path {
        &self.dir
    }

    /// The disk (canonical path of its top link).
    pub fn disk(&self) -> &Path {
        &self.disk
    }

    /// The files served: `flat` first, then one per partition.
    pub fn files(&self) -> &[MountedFile] {
        &self.files
    }

    /// The partition table, if it could be read.
    pub fn partition_table(&self) -> Option<&PartitionTable> {
        self.table.as_ref()
    }

    /// Damage found in the partition table (or why it could not be read, in which case
    /// only `flat` is served).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Unmounts (lazily, as `fusermount3 -u -z` does: files still open keep working
    /// until closed) and waits until the session has ended, which closes the disk
    /// (for a persistent mount: flushed and marked clean).
    pub fn unmount(mut self) -> Result<(), MountError> {
        self.end(true)
    }

    /// Waits until the mount is unmounted from outside (`fusermount3 -u`, `umount`),
    /// then closes the disk.
    pub fn wait(mut self) -> Result<(), MountError> {
        self.end(false)
    }

    fn end(&mut self, unmount: bool) -> Result<(), MountError> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        if unmount {
            // fuser's own unmount (closing fusermount3's auto-unmount socket) does
            // nothing while this process lives: fusermount3 only unmounts a mount
            // whose server has died. So unmount here, lazily; the session threads
            // then end once nothing has a file of the mount open.
            if let Err(e) = lazy_unmount(&self.dir) {
                // Not mounted any more (unmounted from outside) is fine; anything
                // else would leave join() waiting forever.
                if is_mounted_here(&self.dir) {
                    self.session = Some(session);
                    return Err(MountError::Session {
                        dir: self.dir.clone(),
                        source: e,
                    });
                }
            }
        }
        session.join().map_err(|source| MountError::Session {
            dir: self.dir.clone(),
            source,
        })
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = self.end(true);
    }
}

/// `fusermount3 -u -z DIR`.
fn lazy_unmount(dir: &Path) -> io::Result<()> {
    let helper = fusermount3().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "fusermount3 was not found (install fuse3)",
        )
    })?;
    let out = std::process::Command::new(helper)
        .args(["-u", "-z", "--"])
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// Whether a vdisk mount is on `dir` (a canonical path).
fn is_mounted_here(dir: &Path) -> bool {
    crate::mountinfo::vdisk_mounts().is_ok_and(|all| all.iter().any(|m| m.mountpoint == dir))
}

/// Escapes a value for a fusermount3 `-o` list (backslash before `,` and `\`).
fn escape_option(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if c == ',' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Whether `auto_unmount` can be used: fusermount3 needs `allow_other` for it, which
/// only root, or anyone when `/etc/fuse.conf` says `user_allow_other`, may ask for.
fn can_auto_unmount() -> bool {
    nix::unistd::geteuid().is_root()
        || std::fs::read_to_string("/etc/fuse.conf").is_ok_and(|conf| {
            conf.lines()
                .any(|l| l.split('#').next().unwrap_or("").trim() == "user_allow_other")
        })
}

/// The files of a mount: `flat`, then `pN` for each partition that is not an
/// extended container, cut at the end of the disk.
fn files_of(capacity: u64, table: Option<&PartitionTable>) -> Vec<MountedFile> {
    let mut files = vec![MountedFile {
        name: "flat".into(),
        offset: 0,
        size: capacity,
        partition: None,
    }];
    if let Some(table) = table {
        for p in table.partitions.iter().filter(|p| !p.is_extended()) {
            let offset = p.start.min(capacity);
            files.push(MountedFile {
                name: format!("p{}", p.number),
                offset,
                size: p.end().min(capacity) - offset,
                partition: Some(p.number),
            });
        }
    }
    files
}

/// The `fusermount3` (or `fusermount`) helper, as FUSE mounts and unmounts use it:
/// `FUSERMOUNT_PATH`, else the first found in `PATH`, `/usr/bin`, `/bin`, `/usr/sbin`,
/// `/sbin`.
pub fn fusermount3() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FUSERMOUNT_PATH") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path)
        .chain(["/usr/bin", "/bin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .collect::<Vec<_>>();
    ["fusermount3", "fusermount"]
        .iter()
        .find_map(|name| dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()))
}

/// Lets the kernel read ahead [`crate::MAX_REQUEST`] bytes at a time in the files of
/// the mount on `dir` (FUSE starts at 128 KiB, the most its INIT offers; only root
/// may raise it, through the mount's backing-device entry in sysfs). Best effort.
fn raise_readahead(dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(dir) else {
        return;
    };
    let (major, minor) = (libc::major(meta.dev()), libc::minor(meta.dev()));
    let knob = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    let _ = std::fs::write(knob, format!("{}", crate::MAX_REQUEST / 1024));
}

/// Checks that `dir` exists and is a directory, and returns its canonical path.
pub(crate) fn check_mountpoint(dir: &Path) -> Result<PathBuf, MountError> {
    let bad = |reason: String| MountError::Mountpoint {
        path: dir.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(dir).map_err(|e| {
        bad(match e.kind() {
            io::ErrorKind::NotFound => "does not exist".into(),
            io::ErrorKind::NotConnected => {
                "is a dead FUSE mount (transport endpoint is not connected): unmount it first"
                    .into()
            }
            _ => e.to_string(),
        })
    })?;
    if !meta.is_dir() {
        return Err(bad("is not a directory".into()));
    }
    dir.canonicalize().map_err(|e| bad(e.to_string()))
}

/// Mounts `disk` on the directory `dir`: `dir/flat` is the whole disk and `dir/pN`
/// partition N, served by background threads until the returned [`Mounted`] is
/// unmounted or dropped. With `auto_unmount` (used whenever permitted, see
/// [`MountOptions::allow_other`]), the mount also goes away when the process dies.
///
/// The mount appears in `/proc/self/mountinfo` with the type `fuse.vdisk` and the
/// disk's canonical path as its source.
pub fn mount(disk: &Path, dir: &Path, opts: &MountOptions) -> Result<Mounted, MountError> {
    check_mountpoint(dir)?;
    let disk_path = disk.canonicalize().unwrap_or_else(|_| disk.to_path_buf());
    let open = match opts.mode {
        // The redo log is thrown away: syncing it would only cost time.
        Mode::NonPersistent => OpenOptions::new().non_persistent(true).sync(false),
        Mode::Persistent => OpenOptions::new().write(true),
        Mode::ReadOnly => OpenOptions::new(),
    };
    let handle = open.open(disk).map_err(|source| MountError::Open {
        path: disk.to_path_buf(),
        source,
    })?;
    let compressed = handle.info().map_or(true, |i| {
        i.chain
            .iter()
            .any(|l| l.create_type.eq_ignore_ascii_case("streamOptimized"))
    });
    let mtime = std::fs::metadata(&disk_path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| SystemTime::now());
    mount_opened(
        OpenedDisk {
            disk: Box::new(handle),
            name: disk_path,
            compressed,
            mtime,
        },
        dir,
        opts,
    )
}

/// A disk the caller opened (a remote export, or a disk behind an
/// [`vdisk::Overlay`]), to be mounted by [`mount_opened`].
pub struct OpenedDisk {
    /// The disk, already opened in the mode the mount should have (the caller puts
    /// a non-persistent overlay in front of it for [`Mode::NonPersistent`]).
    pub disk: Box<dyn VirtualDisk>,
    /// What the mount names as its source: a path, or a URI.
    pub name: PathBuf,
    /// The disk holds compressed grains (reads are CPU work worth sharing out).
    pub compressed: bool,
    /// The files' modification time until the first write.
    pub mtime: SystemTime,
}

/// [`mount`] of a disk opened by the caller; `opts.mode` only chooses whether the
/// mount is read-only (the disk is already open in its mode).
pub fn mount_opened(
    opened: OpenedDisk,
    dir: &Path,
    opts: &MountOptions,
) -> Result<Mounted, MountError> {
    let dir = check_mountpoint(dir)?;
    let OpenedDisk {
        disk: handle,
        name: disk_path,
        compressed,
        mtime,
    } = opened;
    let disk = disk_path.as_path();
    let mut warnings = Vec::new();
    let table = match read_partitions(&DiskSource(&*handle)) {
        Ok(t) => {
            warnings.extend(t.warnings.iter().map(|w| w.to_string()));
            Some(t)
        }
        Err(e) => {
            warnings.push(format!(
                "cannot read the partition table ({e}); only flat is served"
            ));
            None
        }
    };
    let files = files_of(handle.capacity(), table.as_ref());
    let fs = DiskFs::new(handle, compressed, files.clone(), mtime);

    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(escape_option(&disk_path.to_string_lossy())),
        MountOption::Subtype(FS_SUBTYPE.into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoExec,
        MountOption::NoAtime,
        if opts.mode == Mode::ReadOnly {
            MountOption::RO
        } else {
            MountOption::RW
        },
    ];
    config.acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    if can_auto_unmount() {
        config.mount_options.push(MountOption::AutoUnmount);
        if config.acl == SessionACL::Owner {
            // fusermount3 needs allow_other for auto_unmount; the session still
            // refuses requests from users other than the owner and root.
            config.acl = SessionACL::RootAndOwner;
        }
    }
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8));
    config.n_threads = Some(threads);
    let session = fuser::spawn_mount(fs, &dir, &config).map_err(|source| {
        let source = if source.kind() == io::ErrorKind::NotFound && fusermount3().is_none() {
            io::Error::new(
                io::ErrorKind::NotFound,
                "fusermount3 was not found (install the fuse3 package)",
            )
        } else {
            source
        };
        MountError::Fuse {
            disk: disk.to_path_buf(),
            dir: dir.clone(),
            source,
        }
    })?;
    raise_readahead(&dir);
    Ok(Mounted {
        session: Some(session),
        dir,
        disk: disk_path,
        files,
        warnings,
        table,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Partition, PartitionKind, Scheme};

    fn part(number: u32, start: u64, length: u64, type_byte: u8) -> Partition {
        Partition {
            number,
            start,
            length,
            kind: PartitionKind::Mbr {
                type_byte,
                bootable: false,
            },
            filesystem: None,
        }
    }

    #[test]
    fn files_skip_extended_containers_and_stop_at_the_end_of_the_disk() {
        let table = PartitionTable {
            scheme: Scheme::Mbr,
            partitions: vec![
                part(1, 1 << 20, 4 << 20, 0x83),
                part(2, 5 << 20, 8 << 20, 0x05),
                part(5, 6 << 20, 20 << 20, 0x83),
                part(6, 40 << 20, 1 << 20, 0x83),
            ],
            ..Default::default()
        };
        let files = files_of(16 << 20, Some(&table));
        let got: Vec<(&str, u64, u64)> = files
            .iter()
            .map(|f| (f.name.as_str(), f.offset, f.size))
            .collect();
        assert_eq!(
            got,
            [
                ("flat", 0, 16 << 20),
                ("p1", 1 << 20, 4 << 20),
                ("p5", 6 << 20, 10 << 20),
                ("p6", 16 << 20, 0),
            ]
        );
        assert_eq!(files_of(512, None).len(), 1);
    }

    #[test]
    fn option_values_are_escaped_for_fusermount() {
        assert_eq!(escape_option(r"/a,b\c d"), r"/a\,b\\c d");
    }

    #[test]
    fn missing_and_non_directory_mount_points_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let e = check_mountpoint(&missing).unwrap_err().to_string();
        assert!(e.ends_with("nope: does not exist"), "{e}");
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let e = check_mountpoint(&file).unwrap_err().to_string();
        assert!(e.ends_with("file: is not a directory"), "{e}");
        assert!(check_mountpoint(dir.path()).is_ok());
    }
}
