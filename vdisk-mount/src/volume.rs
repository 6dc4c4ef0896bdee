//! Mounting the file system of one partition (a volume) of a disk, as vmware-mount
//! does: the disk is served with FUSE in a private folder (see [`crate::mount`]),
//! and the partition's file there is mounted with `mount -o loop` on the target
//! folder. The loop device is set up by mount(8) with auto-clear, so unmounting the
//! target also frees it; then the FUSE mount ends and the disk is closed.
//!
//! Every volume mount leaves a small record, `vol-*.info` in [`runtime_dir`], naming
//! the disk, the partition, the target and the private folder, so that a mount whose
//! serving process died can still be found and cleaned up ([`stale_volumes`],
//! [`cleanup_volume`]).

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::mount::{
    check_mountpoint, mount, mount_opened, Mode, MountError, MountOptions, Mounted, OpenedDisk,
};
use crate::mountinfo::all_mounts;
use crate::{FsKind, PartitionTable, Scheme};

/// How to mount a volume.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeOptions {
    /// Where writes go (non-persistent by default: a throwaway redo log).
    pub mode: Mode,
    /// Let other users than root use the FUSE mount under the volume (not needed for
    /// the volume itself: the kernel file system decides who may use it).
    pub allow_other: bool,
    /// More options for mount(8)'s `-o` (`noexec`, `uid=1000`, ...).
    pub fs_options: Vec<String>,
}

/// A mounted volume. Dropping it unmounts (see [`MountedVolume::unmount`]).
#[derive(Debug)]
pub struct MountedVolume {
    fuse: Option<Mounted>,
    record: VolumeRecord,
    filesystem: Option<FsKind>,
}

/// Why [`MountedVolume::unmount`] failed, with the volume when it is still mounted.
#[derive(Debug)]
pub struct UnmountError {
    /// The volume, still mounted (its file system was busy); `None` if it was
    /// unmounted but its disk was not closed cleanly.
    pub volume: Option<Box<MountedVolume>>,
    /// What went wrong.
    pub source: MountError,
}

impl std::fmt::Display for UnmountError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.source.fmt(f)
    }
}

impl std::error::Error for UnmountError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// What is left on the system by a volume mount: the record kept in [`runtime_dir`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeRecord {
    /// The record file itself.
    pub info: PathBuf,
    /// The disk (canonical path of the descriptor mounted).
    pub disk: PathBuf,
    /// The partition number; `None` for a file system on the whole disk.
    pub partition: Option<u32>,
    /// Where the file system is mounted.
    pub target: PathBuf,
    /// The private folder the disk is served in with FUSE.
    pub fuse_dir: PathBuf,
    /// The process that made the mount (and serves it).
    pub pid: u32,
    /// The loop device under the file system, once mounted (`/dev/loopN`).
    pub loop_device: Option<String>,
}

impl MountedVolume {
    /// Where the file system is mounted (canonical).
    pub fn target(&self) -> &Path {
        &self.record.target
    }

    /// The partition mounted, `None` for a file system on the whole disk.
    pub fn partition(&self) -> Option<u32> {
        self.record.partition
    }

    /// The file system recognised in the partition, if any (mount(8) probes anyway).
    pub fn filesystem(&self) -> Option<FsKind> {
        self.filesystem
    }

    /// The record of this mount.
    pub fn record(&self) -> &VolumeRecord {
        &self.record
    }

    /// The FUSE mount of the whole disk under the volume.
    pub fn disk_mount(&self) -> Option<&Mounted> {
        self.fuse.as_ref()
    }

    /// Unmounts the file system (which frees the loop device), then the FUSE mount,
    /// and waits until the disk is closed. A busy file system stays mounted: the
    /// error gives the volume back (dropping it would detach it lazily).
    pub fn unmount(mut self) -> Result<(), UnmountError> {
        match self.end(false) {
            Ok(()) => Ok(()),
            Err(source) if self.fuse.is_some() => Err(UnmountError {
                volume: Some(Box::new(self)),
                source,
            }),
            Err(source) => Err(UnmountError {
                volume: None,
                source,
            }),
        }
    }

    /// Waits until the file system and the FUSE mount have been unmounted from
    /// outside (`vdisk-mount -d`), then closes the disk and removes the record.
    pub fn wait(mut self) -> Result<(), MountError> {
        let Some(fuse) = self.fuse.take() else {
            return Ok(());
        };
        let res = fuse.wait();
        // If only the FUSE mount went away, the file system above it is dead: unmount it.
        if is_mounted(&self.record.target) {
            let _ = umount(&self.record.target, true);
        }
        remove_record(&self.record);
        res
    }

    fn end(&mut self, lazy: bool) -> Result<(), MountError> {
        let Some(fuse) = self.fuse.take() else {
            return Ok(());
        };
        if is_mounted(&self.record.target) {
            if let Err(reason) = umount(&self.record.target, lazy) {
                self.fuse = Some(fuse);
                return Err(MountError::Volume {
                    target: self.record.target.clone(),
                    reason,
                });
            }
        }
        let res = fuse.unmount();
        remove_record(&self.record);
        res
    }
}

impl Drop for MountedVolume {
    fn drop(&mut self) {
        let _ = self.end(true);
    }
}

/// The folder where volume mounts keep their private FUSE folders and records:
/// `/run/vdisk-mount` for root, else `$XDG_RUNTIME_DIR/vdisk-mount`, else
/// `vdisk-mount-UID` in the temporary folder.
pub fn runtime_dir() -> PathBuf {
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        return PathBuf::from("/run/vdisk-mount");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("vdisk-mount"),
        _ => std::env::temp_dir().join(format!("vdisk-mount-{uid}")),
    }
}

/// Picks the partition to mount: `wanted`, or the file system on the whole disk, or
/// the first partition holding a file system that can be mounted. Returns the name
/// of its file in the FUSE folder, its number and its file system.
fn choose(
    table: Option<&PartitionTable>,
    wanted: Option<u32>,
    disk: &Path,
) -> Result<(String, Option<u32>, Option<FsKind>), String> {
    let Some(table) = table else {
        return Err(format!(
            "cannot read the partition table of {}",
            disk.display()
        ));
    };
    let mountable = |k: Option<FsKind>| !matches!(k, Some(FsKind::Swap | FsKind::Lvm2Pv));
    if let Some(n) = wanted {
        let Some(p) = table.partitions.iter().find(|p| p.number == n) else {
            let have: Vec<String> = table
                .partitions
                .iter()
                .filter(|p| !p.is_extended())
                .map(|p| p.number.to_string())
                .collect();
            return Err(format!(
                "{} has no partition {n} (partitions: {})",
                disk.display(),
                if have.is_empty() {
                    "none".to_string()
                } else {
                    have.join(", ")
                }
            ));
        };
        if p.is_extended() {
            return Err(format!(
                "partition {n} of {} is an extended partition (a container of logical \
                 partitions 5, 6, ...): mount one of those",
                disk.display()
            ));
        }
        let kind = p.filesystem.as_ref().map(|f| f.kind);
        if !mountable(kind) {
            return Err(format!(
                "partition {n} of {} holds {}, not a file system that can be mounted",
                disk.display(),
                kind.map_or("nothing recognised", FsKind::mount_type)
            ));
        }
        return Ok((format!("p{n}"), Some(n), kind));
    }
    if table.scheme == Scheme::None {
        return match table.filesystem.as_ref().map(|f| f.kind) {
            Some(kind) if mountable(Some(kind)) => Ok(("flat".into(), None, Some(kind))),
            _ => Err(format!(
                "{} has no partition table and no file system on the whole disk",
                disk.display()
            )),
        };
    }
    table
        .partitions
        .iter()
        .filter(|p| !p.is_extended())
        .find_map(|p| {
            let kind = p.filesystem.as_ref().map(|f| f.kind)?;
            mountable(Some(kind)).then(|| (format!("p{}", p.number), Some(p.number), Some(kind)))
        })
        .ok_or_else(|| {
            format!(
                "no partition of {} holds a file system that can be mounted (see vdisk-mount -p)",
                disk.display()
            )
        })
}

/// A new private folder in `runtime` (mode 0700): `vol-PID-N`.
fn private_dir(runtime: &Path) -> io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(runtime)?;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = runtime.join(format!("vol-{}-{n}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Mounts the file system of partition `partition` of `disk` (or, with `None`, the
/// file system on the whole disk or in its first partition that holds one) on the
/// folder `target`. Needs root (mount(8) and a loop device).
pub fn mount_volume(
    disk: &Path,
    partition: Option<u32>,
    target: &Path,
    opts: &VolumeOptions,
) -> Result<MountedVolume, MountError> {
    let disk_path = disk.canonicalize().unwrap_or_else(|_| disk.to_path_buf());
    mount_volume_with(disk_path, partition, target, opts, |dir, o| {
        mount(disk, dir, o)
    })
}

/// [`mount_volume`] of a disk the caller opened (a remote export; see
/// [`crate::mount::OpenedDisk`]): its name stands for the disk in the record.
pub fn mount_volume_opened(
    opened: OpenedDisk,
    partition: Option<u32>,
    target: &Path,
    opts: &VolumeOptions,
) -> Result<MountedVolume, MountError> {
    let name = opened.name.clone();
    mount_volume_with(name, partition, target, opts, |dir, o| {
        mount_opened(opened, dir, o)
    })
}

fn mount_volume_with(
    disk_path: PathBuf,
    partition: Option<u32>,
    target: &Path,
    opts: &VolumeOptions,
    mount_disk: impl FnOnce(&Path, &MountOptions) -> Result<Mounted, MountError>,
) -> Result<MountedVolume, MountError> {
    let target = check_mountpoint(target)?;
    let refuse = |reason: String| MountError::Volume {
        target: target.clone(),
        reason,
    };
    if !nix::unistd::geteuid().is_root() {
        return Err(refuse(
            "mounting a partition's file system needs root (mount(8) and a loop device); \
             without root, use -f DISK DIR and open DIR/pN with a tool that reads file-system \
             images"
                .into(),
        ));
    }
    for p in [&disk_path, &target] {
        if p.to_string_lossy().contains('\n') {
            return Err(refuse(format!(
                "{:?}: paths with a line break are not supported",
                p
            )));
        }
    }
    let runtime = runtime_dir();
    let fuse_dir = private_dir(&runtime).map_err(|e| {
        refuse(format!(
            "cannot make a private folder in {}: {e}",
            runtime.display()
        ))
    })?;
    let record = VolumeRecord {
        info: fuse_dir.with_extension("info"),
        disk: disk_path,
        partition,
        target: target.clone(),
        fuse_dir: fuse_dir.clone(),
        pid: std::process::id(),
        loop_device: None,
    };
    let fuse = match mount_disk(
        &fuse_dir,
        &MountOptions {
            mode: opts.mode,
            allow_other: opts.allow_other,
        },
    ) {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_dir(&fuse_dir);
            return Err(e);
        }
    };
    let (file, number, filesystem) = match choose(fuse.partition_table(), partition, fuse.disk()) {
        Ok(c) => c,
        Err(reason) => {
            drop(fuse);
            let _ = std::fs::remove_dir(&fuse_dir);
            return Err(refuse(reason));
        }
    };
    let record = VolumeRecord {
        partition: number,
        ..record
    };
    if let Err(e) = write_record(&record) {
        drop(fuse);
        let _ = std::fs::remove_dir(&fuse_dir);
        return Err(refuse(format!(
            "cannot write {}: {e}",
            record.info.display()
        )));
    }
    let mut options = vec!["loop".to_string()];
    if opts.mode == Mode::ReadOnly {
        options.push("ro".into());
    }
    options.extend(opts.fs_options.iter().cloned());
    let out = Command::new(tool("mount"))
        .arg("-o")
        .arg(options.join(","))
        .arg("--")
        .arg(fuse_dir.join(&file))
        .arg(&target)
        .stdin(Stdio::null())
        .output();
    let failure = match out {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(one_line(&String::from_utf8_lossy(&o.stderr))),
        Err(e) => Some(format!("cannot run mount: {e}")),
    };
    let mut mounted = MountedVolume {
        fuse: Some(fuse),
        record,
        filesystem,
    };
    if failure.is_none() {
        // Record the loop device: once the FUSE mount is gone (its server died), the
        // device's backing file no longer names the private folder.
        mounted.record.loop_device = all_mounts()
            .unwrap_or_default()
            .into_iter()
            .rfind(|m| m.mountpoint == mounted.record.target)
            .map(|m| m.source)
            .filter(|s| s.starts_with("/dev/loop"));
        let _ = write_record(&mounted.record);
    }
    if let Some(reason) = failure {
        // Dropping unmounts the FUSE folder and removes the record.
        drop(mounted);
        return Err(refuse(format!(
            "mount of {} failed: {reason}",
            match number {
                Some(n) => format!("partition {n}"),
                None => "the disk's file system".into(),
            }
        )));
    }
    Ok(mounted)
}

/// Keeps the first non-empty line of a tool's message (mount(8) follows it with a
/// hint to read dmesg), without its `mount: ` prefix.
fn one_line(text: &str) -> String {
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("failed without a message");
    line.strip_prefix("mount: ").unwrap_or(line).to_string()
}

/// The path of an administration tool (mount, umount, losetup live in /usr/bin or
/// /sbin), else its bare name.
fn tool(name: &str) -> PathBuf {
    ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Whether something is mounted on `dir`.
fn is_mounted(dir: &Path) -> bool {
    all_mounts().is_ok_and(|all| all.iter().any(|m| m.mountpoint == dir))
}

/// `umount [-l] DIR`; the error is umount's message.
fn umount(dir: &Path, lazy: bool) -> Result<(), String> {
    let mut cmd = Command::new(tool("umount"));
    if lazy {
        cmd.arg("-l");
    }
    let out = cmd
        .arg("--")
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run umount: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let msg = one_line(&String::from_utf8_lossy(&out.stderr));
        Err(msg.strip_prefix("umount: ").unwrap_or(&msg).to_string())
    }
}

fn write_record(r: &VolumeRecord) -> io::Result<()> {
    let text = format!(
        "disk={}\npartition={}\ntarget={}\nfuse_dir={}\npid={}\nloop={}\n",
        r.disk.display(),
        r.partition.map_or("none".to_string(), |n| n.to_string()),
        r.target.display(),
        r.fuse_dir.display(),
        r.pid,
        r.loop_device.as_deref().unwrap_or("none")
    );
    std::fs::write(&r.info, text)
}

fn remove_record(r: &VolumeRecord) {
    let _ = std::fs::remove_file(&r.info);
    let _ = std::fs::remove_dir(&r.fuse_dir);
}

/// Parses a record file's text (`None` if a field is missing or bad).
fn parse_record(info: &Path, text: &str) -> Option<VolumeRecord> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
    };
    Some(VolumeRecord {
        info: info.to_path_buf(),
        disk: PathBuf::from(field("disk")?),
        partition: match field("partition")? {
            "none" => None,
            n => Some(n.parse().ok()?),
        },
        target: PathBuf::from(field("target")?),
        fuse_dir: PathBuf::from(field("fuse_dir")?),
        pid: field("pid")?.parse().ok()?,
        loop_device: field("loop")
            .filter(|l| l.starts_with("/dev/loop"))
            .map(str::to_string),
    })
}

/// Every volume mount recorded in [`runtime_dir`], live or left behind by a process
/// that died.
pub fn volume_records() -> Vec<VolumeRecord> {
    let Ok(dir) = std::fs::read_dir(runtime_dir()) else {
        return Vec::new();
    };
    let mut out: Vec<VolumeRecord> = dir
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "info"))
        .filter_map(|p| parse_record(&p, &std::fs::read_to_string(&p).ok()?))
        .collect();
    out.sort_by(|a, b| a.info.cmp(&b.info));
    out
}

/// Whether process `pid` is running (exists and is not a zombie).
pub fn process_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state follows the command name, which is in parentheses.
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
    })
}

/// Whether the process that made a volume mount is still running.
pub fn server_alive(r: &VolumeRecord) -> bool {
    process_running(r.pid)
}

/// The volume records whose serving process is gone.
pub fn stale_volumes() -> Vec<VolumeRecord> {
    volume_records()
        .into_iter()
        .filter(|r| !server_alive(r))
        .collect()
}

/// Unmounts whatever of the volume mount `r` is left (the file system on its target,
/// lazily if busy; the loop device if mount(8) did not free it; the FUSE folder) and
/// removes its record. Works whether or not its serving process is alive (which ends
/// once its FUSE mount is gone).
pub fn cleanup_volume(r: &VolumeRecord) -> Result<(), String> {
    let mut errors = Vec::new();
    let mounts = all_mounts().unwrap_or_default();
    let mut loop_device = None;
    // The file system, if it still sits on one of our loop devices.
    if let Some(m) = mounts.iter().rfind(|m| m.mountpoint == r.target) {
        if ours(r, m) {
            match umount(&r.target, false) {
                // Unmounted for good: the loop device must go (waited for below).
                Ok(()) => loop_device = Some(m.source.clone()),
                // Busy: detached lazily; the loop device (set to clear itself by
                // `losetup -d`) goes when the last open file of the volume closes.
                Err(_) => {
                    if let Err(e) = umount(&r.target, true) {
                        errors.push(format!("cannot unmount {}: {e}", r.target.display()));
                    }
                }
            }
            detach_loop(&m.source);
        }
    }
    if mounts.iter().any(|m| m.mountpoint == r.fuse_dir) {
        let helper = crate::mount::fusermount3().unwrap_or_else(|| PathBuf::from("fusermount3"));
        let ok = Command::new(helper)
            .args(["-u", "-z", "--"])
            .arg(&r.fuse_dir)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok && is_mounted(&r.fuse_dir) {
            errors.push(format!("cannot unmount {}", r.fuse_dir.display()));
        }
    }
    // The kernel may free the loop device of an unmounted file system a moment
    // later (after the FUSE folder is gone when its server died).
    if let Some(dev) = loop_device {
        if !loop_released(&dev) {
            detach_loop(&dev);
            if !loop_released(&dev) {
                errors.push(format!("the loop device {dev} is still attached"));
            }
        }
    }
    if errors.is_empty() {
        remove_record(r);
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// Whether the mount `m` on a volume's target is that volume's file system: its
/// loop device is the one recorded, or reads from the private folder.
fn ours(r: &VolumeRecord, m: &crate::mountinfo::MountEntry) -> bool {
    r.loop_device.as_deref() == Some(m.source.as_str())
        || loop_backing_file(&m.source).is_some_and(|b| b.starts_with(&r.fuse_dir))
}

/// Unmounts the volume mount `r` cleanly: its file system (an error if it is busy,
/// leaving everything mounted), then the rest as [`cleanup_volume`] does.
pub fn unmount_volume(r: &VolumeRecord) -> Result<(), String> {
    let mounts = all_mounts().unwrap_or_default();
    if let Some(m) = mounts.iter().rfind(|m| m.mountpoint == r.target) {
        if ours(r, m) {
            umount(&r.target, false)
                .map_err(|e| format!("cannot unmount {}: {e}", r.target.display()))?;
        }
    }
    cleanup_volume(r)
}

/// The backing file of loop device `dev` (`/dev/loopN`), from sysfs.
pub fn loop_backing_file(dev: &str) -> Option<PathBuf> {
    let name = Path::new(dev).file_name()?.to_str()?;
    if !name.starts_with("loop") {
        return None;
    }
    let text = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    let text = text.trim_end_matches('\n');
    Some(PathBuf::from(
        text.strip_suffix(" (deleted)").unwrap_or(text),
    ))
}

/// `losetup -d DEV` if the loop device is still attached (best effort).
/// Waits up to [`LOOP_RELEASE_WAIT`] for loop device `dev` to have no backing file.
fn loop_released(dev: &str) -> bool {
    let start = std::time::Instant::now();
    loop {
        if loop_backing_file(dev).is_none() {
            return true;
        }
        if start.elapsed() > LOOP_RELEASE_WAIT {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// How long a cleanup waits for the kernel to free a detached loop device.
const LOOP_RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn detach_loop(dev: &str) {
    if loop_backing_file(dev).is_some() {
        let _ = Command::new(tool("losetup"))
            .args(["-d", dev])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Filesystem, Partition, PartitionKind};

    fn part(number: u32, type_byte: u8, fs: Option<FsKind>) -> Partition {
        Partition {
            number,
            start: u64::from(number) << 20,
            length: 1 << 20,
            kind: PartitionKind::Mbr {
                type_byte,
                bootable: false,
            },
            filesystem: fs.map(|kind| Filesystem { kind, label: None }),
        }
    }

    #[test]
    fn the_partition_is_chosen_or_refused_with_a_reason() {
        let table = PartitionTable {
            scheme: Scheme::Mbr,
            partitions: vec![
                part(1, 0x82, Some(FsKind::Swap)),
                part(2, 0x05, None),
                part(5, 0x83, Some(FsKind::Ext4)),
            ],
            ..Default::default()
        };
        let d = Path::new("d.vmdk");
        assert_eq!(
            choose(Some(&table), None, d).unwrap(),
            ("p5".into(), Some(5), Some(FsKind::Ext4))
        );
        assert!(choose(Some(&table), Some(1), d)
            .unwrap_err()
            .contains("holds swap"));
        assert!(choose(Some(&table), Some(2), d)
            .unwrap_err()
            .contains("extended partition"));
        assert!(choose(Some(&table), Some(9), d)
            .unwrap_err()
            .contains("no partition 9 (partitions: 1, 5)"));
        assert!(choose(None, None, d).unwrap_err().contains("cannot read"));
        let whole = PartitionTable {
            filesystem: Some(Filesystem {
                kind: FsKind::Xfs,
                label: None,
            }),
            ..Default::default()
        };
        assert_eq!(choose(Some(&whole), None, d).unwrap().0, "flat");
        assert!(choose(Some(&PartitionTable::default()), None, d).is_err());
    }

    #[test]
    fn records_round_trip() {
        let r = VolumeRecord {
            info: PathBuf::from("/run/vdisk-mount/vol-1-0.info"),
            disk: PathBuf::from("/d/a b.vmdk"),
            partition: Some(5),
            target: PathBuf::from("/mnt/x"),
            fuse_dir: PathBuf::from("/run/vdisk-mount/vol-1-0"),
            pid: 42,
            loop_device: Some("/dev/loop3".into()),
        };
        let text = format!(
            "disk=/d/a b.vmdk\npartition=5\ntarget=/mnt/x\nfuse_dir={}\npid=42\nloop=/dev/loop3\n",
            r.fuse_dir.display()
        );
        assert_eq!(parse_record(&r.info, &text), Some(r.clone()));
        assert_eq!(parse_record(&r.info, "disk=/d\n"), None);
        assert_eq!(
            one_line("\nmount: /x: wrong fs type.\n  dmesg(1) may have more\n"),
            "/x: wrong fs type."
        );
        assert_eq!(one_line("mount: /x: bad\n"), "/x: bad");
    }
}
