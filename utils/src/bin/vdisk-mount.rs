//! `vdisk-mount`: list the partitions of a virtual disk and mount it with FUSE,
//! with vmware-mount's syntax.
//!
//! ```text
//! vdisk-mount -p DISK                 list partitions
//! vdisk-mount -f [-r | --persistent] [-o OPTS] DISK DIR
//!                                     mount DIR/flat (the whole disk) and DIR/pN
//! vdisk-mount [-r | --persistent] [-o OPTS] DISK [N] DIR
//!                                     mount partition N's file system on DIR (root)
//! vdisk-mount -L                      list vdisk mounts
//! vdisk-mount -d DIR                  unmount DIR
//! vdisk-mount -k DISK                 unmount every mount of DISK
//! vdisk-mount -x                      unmount every vdisk mount
//! ```
//!
//! A mount is served by a background process (this program re-run with a hidden
//! `--serve` argument, detached, its standard streams on /dev/null); the command
//! returns once the mount is in place. Mounts are non-persistent unless
//! `--persistent` is given: writes go to a throwaway redo log and the disk files
//! never change. A partition mount is the FUSE mount of the disk in a private folder
//! (see `vdisk_mount::volume`) with the partition's file mounted on DIR through a
//! loop device; `-d DIR` unmounts both, and `-k DISK` also cleans up what a crashed
//! serving process left.
//!
//! DISK may also be an NBD URI (`nbd://HOST[:PORT]/EXPORT`, `nbds://...`,
//! `nbd+unix:///EXPORT?socket=PATH`, `nbds+unix://...`; TLS settings from the
//! `VDISK_NBD_TLS_*` variables, see `vdisk_utils::nbd_client_options`): every mode
//! works on the export, a non-persistent mount reads it only (its writes stay in a
//! local overlay), and `-k` and `-L` name the mount by its URI.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use vdisk_mount::mountinfo::{all_mounts, vdisk_mount_at, vdisk_mounts, MountEntry};
use vdisk_mount::volume::{
    process_running, runtime_dir, server_alive, volume_records, VolumeRecord,
};
use vdisk_mount::{
    read_partitions, Mode, MountOptions, MountedVolume, Partition, PartitionKind, PartitionTable,
    Scheme, VolumeOptions,
};

/// How long `-f` waits for the serving process to mount.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `-d` waits for the serving process to flush and exit after unmounting.
const EXIT_TIMEOUT: Duration = Duration::from_secs(300);
/// How often state is polled while waiting.
const POLL: Duration = Duration::from_millis(20);
/// The hidden argument that makes this program the serving process.
const SERVE: &str = "--serve";

/// vmware-mount style invocation.
#[derive(Parser, Debug)]
#[command(
    name = "vdisk-mount",
    about = "List the partitions of a virtual disk and mount it with FUSE (vmware-mount syntax)",
    after_help = "Usage:\n  vdisk-mount -p DISK                    list the partitions of DISK\n  \
                  vdisk-mount -f [-r|--persistent] [-o OPTIONS] DISK DIR\n                                         \
                  mount DIR/flat (the whole disk) and DIR/p1, DIR/p2, ... (its partitions)\n  \
                  vdisk-mount [-r|--persistent] [-o OPTIONS] DISK [N] DIR\n                                         \
                  mount the file system of partition N (default: the first that has one) on DIR (root)\n  \
                  vdisk-mount -L                         list vdisk mounts\n  \
                  vdisk-mount -d DIR                     unmount DIR\n  \
                  vdisk-mount -k DISK                    unmount every mount of DISK, cleaning up after a crash\n  \
                  vdisk-mount -x                         unmount every vdisk mount\n\
                  Mounts are non-persistent unless --persistent is given: writes go to a throwaway \
                  redo log and the disk files never change. A snapshot is chosen by naming its \
                  descriptor.\n\
                  DISK may be an NBD export: nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, \
                  or nbds://, nbds+unix:// for TLS (VDISK_NBD_TLS_CA: CA bundle, VDISK_NBD_TLS_THUMBPRINT: \
                  pinned certificate, VDISK_NBD_TLS_CERT and VDISK_NBD_TLS_KEY: client certificate). A \
                  non-persistent mount of an export only reads it; --persistent writes to the server."
)]
struct Args {
    /// List the partitions of DISK (number, start, size, type, file system, label).
    #[arg(short = 'p', value_name = "DISK")]
    partitions: Option<PathBuf>,
    /// Mount a flat representation of the disk: DIR/flat and one file per partition.
    #[arg(short = 'f')]
    flat: bool,
    /// List the vdisk mounts.
    #[arg(short = 'L')]
    list: bool,
    /// Unmount DIR (waits until the disk is closed).
    #[arg(short = 'd', value_name = "DIR")]
    unmount: Option<PathBuf>,
    /// Unmount every mount of DISK, and clean up what a crashed serving process left.
    #[arg(short = 'k', value_name = "DISK")]
    unmount_disk: Option<PathBuf>,
    /// Unmount every vdisk mount.
    #[arg(short = 'x')]
    unmount_all: bool,
    /// Mount read-only.
    #[arg(short = 'r')]
    read_only: bool,
    /// Write through to the disk files (default: non-persistent, writes are discarded
    /// at unmount).
    #[arg(long)]
    persistent: bool,
    /// Comma-separated mount options: allow_other, ro, rw; for a partition mount, any
    /// other option is passed to mount(8).
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Option<String>,
    /// The serving process mounts a partition's file system (0: the first that has one).
    #[arg(long, hide = true, value_name = "N")]
    partition: Option<u32>,
    /// Serve a mount in this process (used by -f).
    #[arg(long = "serve", hide = true)]
    serve: bool,
    /// Where the serving process reports its progress.
    #[arg(long, hide = true, value_name = "FILE")]
    status: Option<PathBuf>,
    /// DISK [N] DIR
    #[arg(value_name = "ARGS")]
    args: Vec<PathBuf>,
}

type CliResult<T = ()> = Result<T, String>;

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            use clap::error::ErrorKind as K;
            if matches!(
                e.kind(),
                K::DisplayHelp | K::DisplayVersion | K::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!(
                "vdisk-mount: error: {} (see --help)",
                first.trim().trim_start_matches("error: ")
            );
            return ExitCode::FAILURE;
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("vdisk-mount: error: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(a: Args) -> CliResult {
    let operations = [
        a.partitions.is_some(),
        a.flat,
        a.list,
        a.unmount.is_some(),
        a.unmount_disk.is_some(),
        a.unmount_all,
        a.serve,
    ];
    if operations.iter().filter(|&&o| o).count() > 1 {
        return Err("give one operation per call (one of -p, -f, -L, -d, -k, -x)".into());
    }
    let no_args = |what: &str| -> CliResult {
        if a.args.is_empty() {
            Ok(())
        } else {
            Err(format!("{what} takes no further arguments"))
        }
    };
    if let Some(disk) = &a.partitions {
        no_args("-p DISK")?;
        return list_partitions(disk);
    }
    if a.list {
        no_args("-L")?;
        return list_mounts();
    }
    if let Some(dir) = &a.unmount {
        no_args("-d DIR")?;
        return unmount(dir);
    }
    if let Some(disk) = &a.unmount_disk {
        no_args("-k DISK")?;
        return unmount_disk(disk);
    }
    if a.unmount_all {
        no_args("-x")?;
        return unmount_all();
    }
    let opts = mount_options(&a, !a.flat)?;
    if a.serve {
        let [disk, dir] = a.args.as_slice() else {
            return Err("--serve needs DISK DIR".into());
        };
        let status = a.status.as_deref().ok_or("--serve needs --status FILE")?;
        let what = match a.partition {
            None => What::Flat,
            Some(0) => What::Volume(None),
            Some(n) => What::Volume(Some(n)),
        };
        return serve(disk, dir, what, &opts, status);
    }
    match a.args.as_slice() {
        [disk, dir] if a.flat => start_server(disk, dir, What::Flat, &opts),
        _ if a.flat => Err("-f needs DISK DIR".into()),
        [] => Err(
            "nothing to do: give -p DISK, -f DISK DIR, DISK [N] DIR, -L, -d DIR, -k DISK or -x \
             (see --help)"
                .into(),
        ),
        [_] => Err("a mount needs DISK and DIR: vdisk-mount DISK [N] DIR (see --help)".into()),
        [disk, dir] => start_server(disk, dir, What::Volume(None), &opts),
        [disk, n, dir] => {
            let n = n
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
                .filter(|&n| n > 0)
                .ok_or_else(|| {
                    format!(
                        "partition number {:?} is not a number from 1 up (see vdisk-mount -p DISK)",
                        n
                    )
                })?;
            start_server(disk, dir, What::Volume(Some(n)), &opts)
        }
        _ => Err("too many arguments (see --help)".into()),
    }
}

/// What a serving process mounts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum What {
    /// DIR/flat and DIR/pN (-f).
    Flat,
    /// The file system of a partition (or of the first that has one) on DIR.
    Volume(Option<u32>),
}

/// The mount options of -r, --persistent and -o; with `volume`, unknown `-o` options
/// are kept for mount(8).
fn mount_options(a: &Args, volume: bool) -> CliResult<VolumeOptions> {
    let mut read_only = a.read_only;
    let mut allow_other = false;
    let mut fs_options = Vec::new();
    for opt in a.options.iter().flat_map(|o| o.split(',')) {
        match opt.trim() {
            "" | "rw" => {}
            "ro" => read_only = true,
            "allow_other" => allow_other = true,
            "loop" => {}
            other if volume => fs_options.push(other.to_string()),
            other => {
                return Err(format!(
                    "unknown mount option {other:?} (known with -f: allow_other, ro, rw)"
                ))
            }
        }
    }
    if read_only && a.persistent {
        return Err("a read-only mount cannot be --persistent".into());
    }
    let mode = if read_only {
        Mode::ReadOnly
    } else if a.persistent {
        Mode::Persistent
    } else {
        Mode::NonPersistent
    };
    Ok(VolumeOptions {
        mode,
        allow_other,
        fs_options,
    })
}

// ---------------------------------------------------------------------------------
// -p

/// A short name for a well-known GPT partition type, else the GUID.
fn gpt_type_name(guid: &str) -> &str {
    match guid {
        "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" => "EFI System",
        "21686148-6449-6E6F-744E-656564454649" => "BIOS boot",
        "E3C9E316-0B5C-4DB8-817D-F92DF00215AE" => "Microsoft reserved",
        "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7" => "Microsoft basic data",
        "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC" => "Windows recovery",
        "0FC63DAF-8483-4772-8E79-3D69D8477DE4" => "Linux filesystem",
        "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F" => "Linux swap",
        "E6D6D379-F507-44C2-A23C-238F2A3DF928" => "Linux LVM",
        "A19D880F-05FC-4D3B-A006-743F0F84911E" => "Linux RAID",
        "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709" => "Linux root (x86-64)",
        "933AC7E1-2EB4-4F13-B844-0E14E2AEF915" => "Linux home",
        "BC13C2FF-59E6-4262-A352-B275FD6F7172" => "Linux extended boot",
        "AA31E02A-400F-11DB-9590-000C2911D1B8" => "VMware VMFS",
        other => other,
    }
}

fn type_column(p: &Partition) -> String {
    match &p.kind {
        PartitionKind::Mbr { type_byte, .. } => format!("0x{type_byte:02x}"),
        PartitionKind::Gpt { type_guid, .. } => gpt_type_name(type_guid).to_string(),
    }
}

fn partition_rows(table: &PartitionTable) -> Vec<[String; 6]> {
    table
        .partitions
        .iter()
        .map(|p| {
            let (fs, label) = if p.is_extended() {
                ("extended".to_string(), "-".to_string())
            } else {
                match &p.filesystem {
                    Some(f) => (
                        f.kind.to_string(),
                        f.label.clone().unwrap_or_else(|| "-".into()),
                    ),
                    None => ("-".into(), "-".into()),
                }
            };
            [
                p.number.to_string(),
                (p.start / 512).to_string(),
                (p.length / 512).to_string(),
                type_column(p),
                fs,
                label,
            ]
        })
        .collect()
}

/// Prints rows as left-aligned columns (the last one unpadded).
fn print_table(rows: &[Vec<String>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = std::io::stdout().lock();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
}

fn list_partitions(disk: &Path) -> CliResult {
    let handle = vdisk_utils::open_for_reading(disk).map_err(|e| e.to_string())?;
    let table = read_partitions(&vdisk_mount::DiskSource(&*handle))
        .map_err(|e| format!("{}: {e}", disk.display()))?;
    for w in &table.warnings {
        eprintln!("vdisk-mount: warning: {}: {w}", disk.display());
    }
    let capacity = handle.capacity();
    let scheme = match table.scheme {
        Scheme::Mbr => "MBR partition table",
        Scheme::Gpt => "GPT partition table",
        Scheme::None => "no partition table",
    };
    let id = table
        .id
        .as_ref()
        .map(|id| format!(", identifier {id}"))
        .unwrap_or_default();
    println!(
        "Disk {}: {} ({} sectors), {scheme}{id}",
        disk.display(),
        vdisk_utils::human_bytes(capacity),
        capacity / 512
    );
    if table.scheme == Scheme::None {
        match &table.filesystem {
            Some(fs) => println!("The whole disk holds a file system: {fs}"),
            None => println!("No file system found on the whole disk"),
        }
        return Ok(());
    }
    let header = ["Nr", "Start", "Size", "Type", "Filesystem", "Label"];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    rows.extend(partition_rows(&table).into_iter().map(Vec::from));
    print_table(&rows);
    Ok(())
}

// ---------------------------------------------------------------------------------
// -f and --serve

/// A status file no other process uses, in the temporary folder.
fn new_status_file() -> CliResult<(PathBuf, File)> {
    let dir = std::env::temp_dir();
    for attempt in 0..100u32 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = dir.join(format!(
            "vdisk-mount-{}-{nanos}-{attempt}.status",
            std::process::id()
        ));
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(f) => return Ok((path, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(format!(
                    "cannot create a status file in {}: {e}",
                    dir.display()
                ))
            }
        }
    }
    Err(format!("cannot create a status file in {}", dir.display()))
}

/// Mounts with a detached serving process and returns once the mount is in place.
fn start_server(disk: &Path, dir: &Path, what: What, opts: &VolumeOptions) -> CliResult {
    if matches!(what, What::Volume(_)) && !nix::unistd::geteuid().is_root() {
        return Err(
            "mounting a partition's file system needs root (mount(8) and a loop device); \
             without root, use -f DISK DIR and read DIR/pN"
                .into(),
        );
    }
    let meta = std::fs::metadata(dir).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("mount point {} does not exist", dir.display()),
        _ => format!("mount point {}: {e}", dir.display()),
    })?;
    if !meta.is_dir() {
        return Err(format!("mount point {} is not a directory", dir.display()));
    }
    let dir = dir
        .canonicalize()
        .map_err(|e| format!("mount point {}: {e}", dir.display()))?;
    if let Some(m) =
        vdisk_mount_at(&dir).map_err(|e| format!("cannot read the mount table: {e}"))?
    {
        return Err(format!(
            "{} is already a vdisk mount (of {}): unmount it first with vdisk-mount -d",
            dir.display(),
            m.source
        ));
    }
    if let Some(r) = volume_records().into_iter().find(|r| r.target == dir) {
        return Err(format!(
            "{} is already a vdisk mount (of {}): unmount it first with vdisk-mount -d",
            dir.display(),
            r.disk.display()
        ));
    }
    let before = mount_count(&dir);
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let (status_path, status_file) = new_status_file()?;
    drop(status_file);
    let _cleanup = RemoveOnDrop(status_path.clone());
    let mut cmd = Command::new(exe);
    cmd.arg(SERVE).arg("--status").arg(&status_path);
    match opts.mode {
        Mode::ReadOnly => {
            cmd.arg("-r");
        }
        Mode::Persistent => {
            cmd.arg("--persistent");
        }
        Mode::NonPersistent => {}
    }
    let mut o = opts.fs_options.clone();
    if opts.allow_other {
        o.push("allow_other".into());
    }
    if !o.is_empty() {
        cmd.arg("-o").arg(o.join(","));
    }
    if let What::Volume(n) = what {
        cmd.arg("--partition").arg(n.unwrap_or(0).to_string());
    }
    // The disk as given (the serving process keeps this folder as its own); the
    // folder canonical, as the mount table shows it.
    cmd.arg("--").arg(disk).arg(&dir);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start the serving process: {e}"))?;
    let start = Instant::now();
    loop {
        let status = std::fs::read_to_string(&status_path).unwrap_or_default();
        if let Some(msg) = status.lines().find_map(|l| l.strip_prefix("error: ")) {
            let _ = child.wait();
            return Err(msg.to_string());
        }
        let ready = status.lines().any(|l| l == "ready");
        if ready && mount_count(&dir) > before {
            for w in status.lines().filter_map(|l| l.strip_prefix("warning: ")) {
                eprintln!("vdisk-mount: warning: {w}");
            }
            return Ok(());
        }
        if let Ok(Some(exit)) = child.try_wait() {
            let status = std::fs::read_to_string(&status_path).unwrap_or_default();
            return Err(status
                .lines()
                .find_map(|l| l.strip_prefix("error: "))
                .map(str::to_string)
                .unwrap_or_else(|| {
                    format!("the serving process ended ({exit}) without mounting")
                }));
        }
        if start.elapsed() > MOUNT_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "{} did not show up as a mount point within {} s",
                dir.display(),
                MOUNT_TIMEOUT.as_secs()
            ));
        }
        std::thread::sleep(POLL);
    }
}

/// Removes a file when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Appends one line to the status file the parent reads.
fn report(status: &Path, line: &str) {
    if let Ok(mut f) = OpenOptions::new().append(true).open(status) {
        let _ = writeln!(f, "{line}");
    }
}

/// How many mounts sit on `dir` (stacked mounts count each).
fn mount_count(dir: &Path) -> usize {
    all_mounts().map_or(0, |all| all.iter().filter(|m| m.mountpoint == dir).count())
}

/// Opens an NBD export for a mount in `mode`: read-only, writing through to the
/// server (persistent), or - the default - non-persistent: the export is only read
/// and writes stay in a local overlay that goes away with the mount.
fn open_remote(uri: &str, mode: Mode) -> CliResult<vdisk_mount::OpenedDisk> {
    let remote = vdisk_nbd::client::RemoteDisk::open_uri(
        uri,
        &vdisk_utils::nbd_client_options(mode != Mode::Persistent),
    )
    .map_err(|e| format!("cannot open {uri}: {e}"))?;
    if mode == Mode::Persistent && !vdisk::VirtualDisk::is_writable(&remote) {
        return Err(format!(
            "{uri} is read-only on its server: mount it without --persistent (writes stay \
             in a local overlay) or with -r"
        ));
    }
    let disk: Box<dyn vdisk::VirtualDisk> = match mode {
        Mode::NonPersistent => Box::new(
            vdisk::Overlay::new(Box::new(remote), None).map_err(|e| format!("{uri}: {e}"))?,
        ),
        _ => Box::new(remote),
    };
    Ok(vdisk_mount::OpenedDisk {
        disk,
        name: PathBuf::from(uri),
        compressed: false,
        mtime: std::time::SystemTime::now(),
    })
}

/// A mount made by the serving process.
enum Served {
    Flat(vdisk_mount::Mounted),
    Volume(MountedVolume),
}

/// The serving process: mounts, reports, and serves until unmounted (from outside,
/// or on SIGINT, SIGTERM or SIGHUP), then closes the disk and exits.
fn serve(disk: &Path, dir: &Path, what: What, opts: &VolumeOptions, status: &Path) -> CliResult {
    // Leave the caller's session so its terminal's signals do not reach us.
    let _ = nix::unistd::setsid();
    // Signals are taken by one thread (below); every thread started after this
    // inherits the mask.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        signals.add(s);
    }
    let _ = signals.thread_block();
    let flat_opts = MountOptions {
        mode: opts.mode,
        allow_other: opts.allow_other,
    };
    let mounted = match disk.to_str().filter(|d| vdisk_utils::is_nbd_uri(d)) {
        Some(uri) => match open_remote(uri, opts.mode) {
            Ok(opened) => match what {
                What::Flat => vdisk_mount::mount_opened(opened, dir, &flat_opts).map(Served::Flat),
                What::Volume(n) => {
                    vdisk_mount::mount_volume_opened(opened, n, dir, opts).map(Served::Volume)
                }
            },
            Err(e) => {
                report(status, &format!("error: {e}"));
                return Err(e);
            }
        },
        None => match what {
            What::Flat => vdisk_mount::mount(disk, dir, &flat_opts).map(Served::Flat),
            What::Volume(n) => vdisk_mount::mount_volume(disk, n, dir, opts).map(Served::Volume),
        },
    };
    let mounted = match mounted {
        Ok(m) => m,
        Err(e) => {
            report(status, &format!("error: {e}"));
            return Err(e.to_string());
        }
    };
    let (warnings, fuse_dir, target) = match &mounted {
        Served::Flat(m) => (m.warnings().to_vec(), m.mountpoint().to_path_buf(), None),
        Served::Volume(v) => (
            v.disk_mount()
                .map(|m| m.warnings().to_vec())
                .unwrap_or_default(),
            v.record().fuse_dir.clone(),
            Some(v.target().to_path_buf()),
        ),
    };
    for w in warnings {
        report(status, &format!("warning: {}: {w}", disk.display()));
    }
    report(status, "ready");
    // Keep no folder busy (the disk's files are open by now).
    let _ = std::env::set_current_dir("/");
    std::thread::spawn(move || {
        if signals.wait().is_ok() {
            // The file system first (lazily if busy), then the FUSE mount, lazily:
            // the session ends and the disk is closed below.
            if let Some(target) = &target {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg("--")
                    .arg(target)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
            let helper = vdisk_mount::fusermount3().unwrap_or_else(|| "fusermount3".into());
            let _ = Command::new(helper)
                .args(["-u", "-z", "--"])
                .arg(&fuse_dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    });
    let res = match mounted {
        Served::Flat(m) => m.wait(),
        Served::Volume(v) => v.wait(),
    }
    .map_err(|e| e.to_string());
    // Wait (briefly) for fusermount3's auto-unmount helper to see the session end,
    // so that once this process is gone nothing is left that could touch a new
    // mount on the same folder.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(nix::sys::wait::WaitStatus::StillAlive) => std::thread::sleep(POLL),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    res
}

// ---------------------------------------------------------------------------------
// -L, -d, -k, -x

/// A serving process: its pid and the arguments it was started with.
struct Server {
    pid: u32,
    args: Vec<String>,
}

/// The serving process of the mount on `mountpoint` (its last argument), if any.
fn server_of(mountpoint: &Path) -> Option<Server> {
    let want = mountpoint.to_string_lossy();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let ours = args.first().is_some_and(|a0| {
            Path::new(a0)
                .file_name()
                .is_some_and(|n| n == "vdisk-mount")
        });
        if ours && args.iter().any(|a| a == SERVE) && args.last().is_some_and(|l| *l == want) {
            return Some(Server { pid, args });
        }
    }
    None
}

fn mode_of(server: Option<&Server>) -> &'static str {
    match server {
        Some(s) if s.args.iter().any(|a| a == "--persistent") => Mode::Persistent.as_str(),
        Some(s) if s.args.iter().any(|a| a == "-r") => Mode::ReadOnly.as_str(),
        Some(_) => Mode::NonPersistent.as_str(),
        None => "unknown (no serving process)",
    }
}

/// The `-f` mounts (the FUSE mounts under volume mounts, in the runtime folder, are
/// listed with their volume).
fn mounts() -> CliResult<Vec<MountEntry>> {
    let private = runtime_dir();
    Ok(vdisk_mounts()
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?
        .into_iter()
        .filter(|m| !m.mountpoint.starts_with(&private))
        .collect())
}

fn list_mounts() -> CliResult {
    let all = mounts()?;
    let volumes = volume_records();
    if all.is_empty() && volumes.is_empty() {
        println!("No vdisk mounts");
        return Ok(());
    }
    let mut rows = vec![["Disk", "Mounted", "Mount point", "Mode", "PID"]
        .map(String::from)
        .to_vec()];
    for m in &all {
        let server = server_of(&m.mountpoint);
        rows.push(vec![
            m.source.clone(),
            "flat".into(),
            m.mountpoint.display().to_string(),
            mode_of(server.as_ref()).to_string(),
            server.map_or("-".into(), |s| s.pid.to_string()),
        ]);
    }
    for r in &volumes {
        let alive = server_alive(r);
        let server = server_of(&r.target).filter(|s| s.pid == r.pid);
        rows.push(vec![
            r.disk.display().to_string(),
            r.partition
                .map_or("whole disk".into(), |n| format!("partition {n}")),
            r.target.display().to_string(),
            if alive {
                mode_of(server.as_ref()).to_string()
            } else {
                "stale: serving process died (clean up with -k DISK)".into()
            },
            r.pid.to_string(),
        ]);
    }
    print_table(&rows);
    Ok(())
}

/// Waits until the serving process `pid` of the mount on `dir` has exited (it
/// flushes and closes the disk once unmounted).
fn wait_for_exit(pid: u32, dir: &Path) -> CliResult {
    let start = Instant::now();
    while process_running(pid) {
        if start.elapsed() > EXIT_TIMEOUT {
            return Err(format!(
                "{} is unmounted but its serving process {pid} has not exited after {} s",
                dir.display(),
                EXIT_TIMEOUT.as_secs()
            ));
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

/// Unmounts one vdisk mount and waits for its serving process to close the disk.
fn unmount_entry(m: &MountEntry) -> CliResult {
    let server = server_of(&m.mountpoint);
    let helper = vdisk_mount::fusermount3()
        .ok_or("fusermount3 was not found: install the Debian package fuse3")?;
    let out = Command::new(&helper)
        .args(["-u", "--"])
        .arg(&m.mountpoint)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", helper.display()))?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr);
        let msg = msg.trim();
        let prefix = format!("{}: ", helper.display());
        let msg = msg.strip_prefix(prefix.as_str()).unwrap_or(msg);
        return Err(format!("cannot unmount {}: {msg}", m.mountpoint.display()));
    }
    match server {
        Some(server) => wait_for_exit(server.pid, &m.mountpoint),
        None => Ok(()),
    }
}

/// Unmounts a partition mount (its file system, then the FUSE mount of the disk) and
/// waits for its serving process to close the disk; cleans up after a dead one.
fn unmount_volume_record(r: &VolumeRecord) -> CliResult {
    let alive = server_alive(r);
    vdisk_mount::volume::unmount_volume(r)?;
    if alive {
        wait_for_exit(r.pid, &r.target)?;
    }
    Ok(())
}

fn unmount(dir: &Path) -> CliResult {
    let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    if let Some(r) = volume_records().iter().find(|r| r.target == canonical) {
        return unmount_volume_record(r);
    }
    let entry =
        vdisk_mount_at(dir).map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    match entry {
        Some(m) => unmount_entry(&m),
        None => Err(format!("{} is not a vdisk mount", dir.display())),
    }
}

/// Unmounts every volume and entry (the newest first), reporting every failure.
fn unmount_each(volumes: &[VolumeRecord], entries: &[MountEntry]) -> CliResult {
    let errors: Vec<String> = volumes
        .iter()
        .rev()
        .filter_map(|r| unmount_volume_record(r).err())
        .chain(entries.iter().rev().filter_map(|m| unmount_entry(m).err()))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// What identifies a disk named on the command line or in a mount's record: an NBD
/// URI in its normal form (scheme, server, export: `nbd://h/e` and `nbd://h:10809/e`
/// are the same disk), a path canonical when it exists.
fn disk_key(disk: &Path) -> String {
    if let Some(uri) = disk.to_str().filter(|d| vdisk_utils::is_nbd_uri(d)) {
        if let Ok(u) = vdisk_nbd::client::parse_uri(uri) {
            return u.to_string();
        }
        return uri.to_string();
    }
    disk.canonicalize()
        .unwrap_or_else(|_| disk.to_path_buf())
        .to_string_lossy()
        .into_owned()
}

fn unmount_disk(disk: &Path) -> CliResult {
    let key = disk_key(disk);
    let volumes: Vec<VolumeRecord> = volume_records()
        .into_iter()
        .filter(|r| disk_key(&r.disk) == key)
        .collect();
    let entries: Vec<MountEntry> = mounts()?
        .into_iter()
        .filter(|m| disk_key(Path::new(&m.source)) == key)
        .collect();
    if entries.is_empty() && volumes.is_empty() {
        return Err(format!("{} is not mounted", disk.display()));
    }
    unmount_each(&volumes, &entries)
}

fn unmount_all() -> CliResult {
    unmount_each(&volume_records(), &mounts()?)
}
