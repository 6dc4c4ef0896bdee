//! The main job: the backup flow of VADP backup software, end to end, on one machine.
//!
//! A guest disk is made (2 GiB, an MBR partition with a real ext4 file system full
//! of files) and change tracking is turned on. Then, twice (a full backup, then an
//! incremental one):
//!
//! 1. a backup session starts;
//! 2. the guest's disk is snapshotted (the base is frozen) and
//! 3. a delta disk takes the guest's writes (files rewritten in place, ~1% of the disk);
//! 4. the proxy adds a redo log on top of the snapshot and
//! 5. opens it as an independent non-persistent disk;
//! 6. it copies what is allocated (full) or what changed since the last backup's
//!    change ID (incremental) into a streamOptimized backup (an incremental is a
//!    child of the previous backup);
//! 7. the redo log is thrown away and the snapshot released;
//! 8. the delta is consolidated into the base, and 9. removed.
//!
//! Finally both backups are restored into fresh disks and every byte is checked
//! against what the disk held when each backup was taken, and the restored file
//! system is checked with e2fsck and a rewritten file read back with debugfs.
//!
//! By default steps 4-6 run over the network as a backup proxy does: a "host" serves
//! the snapshot with `vdisk-nbd` (non-persistent, TLS on 127.0.0.1) and a "proxy"
//! process pulls each backup through libvixDiskLib's `nbdssl` transport (the
//! `backup_proxy` program of vdisk-ffi) with change IDs. `--local` runs them on the
//! snapshot's files instead.
//!
//! Run with `./run-demo.sh [--local] [DIR]` (DIR keeps the files; default: a
//! temporary folder). Needs mkfs.ext4, debugfs and e2fsck (e2fsprogs) and, for the
//! remote flow, openssl (run-demo.sh installs them as root).

mod demo_remote;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use vdisk::ops::backup::write_backup;
use vdisk::ops::child::create_child;
use vdisk::ops::commit::{commit, CommitOptions};
use vdisk::{cbt, create, CreateOptions, Disk, DiskType, OpenOptions};

const MIB: u64 = 1 << 20;
/// Size of the guest disk.
const DISK: u64 = 2048 * MIB;
/// Where the partition starts.
const PART_START: u64 = MIB;
/// How much file data the guest starts with.
const FILE_DATA: u64 = 512 * MIB;
/// How much the guest rewrites between backups (1% of the disk).
const GUEST_WRITES: u64 = DISK / 100;
/// ext4 block size of the guest file system.
const FS_BLOCK: u64 = 4096;
/// Granularity of the verification digests.
const DIGEST_CHUNK: u64 = 4 * MIB;

type DemoResult<T = ()> = Result<T, String>;

fn e(err: impl std::fmt::Display) -> String {
    err.to_string()
}

/// A deterministic generator (xorshift) so every run makes the same disk.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Text-like bytes (compressible, like most real files).
    fn text(&mut self, len: usize) -> Vec<u8> {
        const WORDS: [&str; 12] = [
            "backup ",
            "disk ",
            "grain ",
            "snapshot ",
            "vmdk ",
            "change ",
            "block ",
            "redo ",
            "log ",
            "extent ",
            "sector ",
            "tracking\n",
        ];
        let mut out = Vec::with_capacity(len + 16);
        while out.len() < len {
            out.extend_from_slice(WORDS[self.below(WORDS.len() as u64) as usize].as_bytes());
            if self.below(7) == 0 {
                out.extend_from_slice(format!("{} ", self.next() % 100_000).as_bytes());
            }
        }
        out.truncate(len);
        out
    }
}

fn tool(name: &str) -> DemoResult<PathBuf> {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("{name} is needed (apt-get install e2fsprogs)"))
}

fn run(cmd: &Path, args: &[&str]) -> DemoResult<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|err| format!("cannot run {}: {err}", cmd.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} {}: {}",
            cmd.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let b = ProgressBar::new(len);
    b.set_style(
        ProgressStyle::with_template(
            "      {msg:12} [{bar:40}] {bytes:>10}/{total_bytes:10} {bytes_per_sec:>12}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    b.set_message(what.to_string());
    b
}

fn human(n: u64) -> String {
    if n >= MIB {
        format!("{:.1} MiB", n as f64 / MIB as f64)
    } else {
        format!("{:.1} KiB", n as f64 / 1024.0)
    }
}

/// A file of the guest file system: its path and the disk byte ranges of its blocks.
struct GuestFile {
    name: String,
    extents: Vec<(u64, u64)>,
}

/// Makes the guest disk: an MBR with one Linux partition holding an ext4 file system
/// built by mkfs.ext4 from generated files. Returns the files with where they live.
fn make_guest_disk(dir: &Path, vm: &Path, rng: &mut Rng) -> DemoResult<Vec<GuestFile>> {
    let src = dir.join("guest-files");
    std::fs::create_dir_all(src.join("docs")).map_err(e)?;
    std::fs::create_dir_all(src.join("etc")).map_err(e)?;
    std::fs::write(
        src.join("etc/os-release"),
        "NAME=\"vdisk demo\"\nID=demo\nVERSION_ID=1\n",
    )
    .map_err(e)?;
    let mut names = Vec::new();
    let files = 64;
    for i in 0..files {
        let name = format!("docs/file{i:03}.txt");
        std::fs::write(src.join(&name), rng.text((FILE_DATA / files) as usize)).map_err(e)?;
        names.push(name);
    }
    let part_len = DISK - PART_START;
    let img = dir.join("guest-fs.img");
    let f = std::fs::File::create(&img).map_err(e)?;
    f.set_len(part_len).map_err(e)?;
    drop(f);
    run(
        &tool("mkfs.ext4")?,
        &[
            "-q",
            "-F",
            "-b",
            "4096",
            "-L",
            "guest",
            "-d",
            &src.to_string_lossy(),
            &img.to_string_lossy(),
        ],
    )?;
    // Where each file's blocks are (debugfs lists physical block numbers).
    let debugfs = tool("debugfs")?;
    let mut out = Vec::new();
    for name in names {
        let text = run(
            &debugfs,
            &["-R", &format!("blocks /{name}"), &img.to_string_lossy()],
        )?;
        let mut extents: Vec<(u64, u64)> = Vec::new();
        for b in text
            .split_whitespace()
            .filter_map(|w| w.parse::<u64>().ok())
        {
            let at = PART_START + b * FS_BLOCK;
            match extents.last_mut() {
                Some(last) if last.0 + last.1 == at => last.1 += FS_BLOCK,
                _ => extents.push((at, FS_BLOCK)),
            }
        }
        out.push(GuestFile { name, extents });
    }
    create(vm, &CreateOptions::new(DiskType::MonolithicSparse, DISK)).map_err(e)?;
    let disk = OpenOptions::new().write(true).open(vm).map_err(e)?;
    let mut mbr = [0u8; 512];
    mbr[446 + 4] = 0x83;
    mbr[446 + 8..446 + 12].copy_from_slice(&((PART_START / 512) as u32).to_le_bytes());
    mbr[446 + 12..446 + 16].copy_from_slice(&((part_len / 512) as u32).to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    disk.write_at(&mbr, 0).map_err(e)?;
    // Copy the file system in, leaving its empty blocks unallocated.
    let fs = std::fs::File::open(&img).map_err(e)?;
    let mut buf = vec![0u8; MIB as usize];
    let b = bar(part_len, "installing");
    let mut pos = 0;
    while pos < part_len {
        use std::os::unix::fs::FileExt;
        fs.read_exact_at(&mut buf, pos).map_err(e)?;
        for (i, block) in buf.chunks(64 << 10).enumerate() {
            if block.iter().any(|&x| x != 0) {
                disk.write_at(block, PART_START + pos + (i as u64) * (64 << 10))
                    .map_err(e)?;
            }
        }
        pos += MIB;
        b.set_position(pos);
    }
    b.finish_and_clear();
    disk.close().map_err(e)?;
    let _ = std::fs::remove_file(&img);
    let _ = std::fs::remove_dir_all(&src);
    Ok(out)
}

/// What the guest wrote in a session: bytes, and one file rewritten whole with its
/// new content.
type GuestWork = (u64, String, Vec<u8>);

/// The guest at work: rewrites pieces of its files in place (the file system stays
/// consistent) in the delta disk, GUEST_WRITES bytes in all. Returns the bytes
/// written and one file wholly rewritten with its new content.
fn guest_writes(delta: &Path, files: &[GuestFile], rng: &mut Rng) -> DemoResult<GuestWork> {
    let disk = OpenOptions::new().write(true).open(delta).map_err(e)?;
    // One whole file rewritten (checked after the restore) ...
    let pick = rng.below(files.len() as u64) as usize;
    let whole = &files[pick];
    let len: u64 = whole.extents.iter().map(|x| x.1).sum();
    let content = rng.text(len as usize);
    let mut at = 0usize;
    for &(off, l) in &whole.extents {
        disk.write_at(&content[at..at + l as usize], off)
            .map_err(e)?;
        at += l as usize;
    }
    let mut written = len;
    // ... and random 4-64 KiB pieces of others.
    while written < GUEST_WRITES {
        let i = rng.below(files.len() as u64) as usize;
        if i == pick {
            continue;
        }
        let f = &files[i];
        let (off, l) = f.extents[rng.below(f.extents.len() as u64) as usize];
        let blocks = l / FS_BLOCK;
        let first = rng.below(blocks);
        let n = (1 + rng.below(16)).min(blocks - first);
        let data = rng.text((n * FS_BLOCK) as usize);
        disk.write_at(&data, off + first * FS_BLOCK).map_err(e)?;
        written += n * FS_BLOCK;
    }
    disk.close().map_err(e)?;
    Ok((written, whole.name.clone(), content))
}

/// SHA-256 of each DIGEST_CHUNK of a disk.
fn digests(disk: &Disk, what: &str) -> DemoResult<Vec<[u8; 32]>> {
    let mut buf = vec![0u8; DIGEST_CHUNK as usize];
    let b = bar(disk.capacity(), what);
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < disk.capacity() {
        let n = (disk.capacity() - pos).min(DIGEST_CHUNK) as usize;
        disk.read_at(&mut buf[..n], pos).map_err(e)?;
        out.push(Sha256::digest(&buf[..n]).into());
        pos += n as u64;
        b.set_position(pos);
    }
    b.finish_and_clear();
    Ok(out)
}

struct Backup {
    file: PathBuf,
    change_id: String,
    /// What the disk held when the backup was taken.
    digests: Vec<[u8; 32]>,
    copied: u64,
    took: Duration,
}

/// One backup session (steps 1-9). `previous`: the last backup, for an incremental.
fn session(
    dir: &Path,
    vm: &Path,
    files: &[GuestFile],
    rng: &mut Rng,
    previous: Option<&Backup>,
    n: usize,
    remote: bool,
) -> DemoResult<(Backup, GuestWork)> {
    let kind = if previous.is_some() {
        "incremental"
    } else {
        "full"
    };
    println!("\n== Backup session {n} ({kind})");
    println!("1. backup session starts for {}", vm.display());
    let delta = dir.join("vm-000001.vmdk");
    create_child(vm, &delta, DiskType::MonolithicSparse).map_err(e)?;
    println!(
        "2. snapshot: {} is frozen, its change ID {}",
        vm.display(),
        Disk::open(vm).map_err(e)?.change_id().map_err(e)?
    );
    let guest = guest_writes(&delta, files, rng)?;
    println!(
        "3. the guest keeps running on the delta {}: {} rewritten in its files (e.g. /{})",
        delta.display(),
        human(guest.0),
        guest.1
    );
    let file = dir.join(format!("backup-{n}-{kind}.vmdk"));
    let (change_id, digests, copied, took) = if remote {
        remote_copy(dir, vm, &file, previous)?
    } else {
        local_copy(vm, &file, previous)?
    };
    let b = bar(0, "consolidating");
    commit(&delta, &CommitOptions::default(), &mut |done, total| {
        b.set_length(total);
        b.set_position(done);
        true
    })
    .map_err(e)?;
    b.finish_and_clear();
    println!("8. the delta is consolidated into {}", vm.display());
    println!(
        "9. the delta is removed ({} exists: {})",
        delta.display(),
        delta.exists()
    );
    Ok((
        Backup {
            file,
            change_id,
            digests,
            copied,
            took,
        },
        guest,
    ))
}

/// What steps 4-6 give: the change ID of the disk backed up, the digests of what
/// it held, the bytes copied and the time the copy took.
type Copied = (String, Vec<[u8; 32]>, u64, Duration);

/// Steps 4-7 on the snapshot's files: a redo log on top, opened non-persistent.
fn local_copy(vm: &Path, file: &Path, previous: Option<&Backup>) -> DemoResult<Copied> {
    println!("4. the proxy attaches a redo log on top of the snapshot");
    let snap = OpenOptions::new()
        .non_persistent(true)
        .open(vm)
        .map_err(e)?;
    println!(
        "5. ... and opens it independent non-persistent ({} links, writes go to the redo log)",
        snap.links().len()
    );
    let digests = digests(&snap, "verifying")?;
    let frozen = Disk::open(vm).map_err(e)?;
    let change_id = frozen.change_id().map_err(e)?;
    let since = previous.map_or(cbt::ALL, |p| p.change_id.as_str());
    let start = Instant::now();
    let areas = frozen.changed_areas(since, 0, DISK).map_err(e)?;
    drop(frozen);
    let total: u64 = areas.iter().map(|a| a.1).sum();
    let b = bar(total, "copying");
    let st = write_backup(
        &snap,
        &areas,
        file,
        previous.map(|p| p.file.as_path()),
        &mut |done, _| {
            b.set_position(done);
            true
        },
    )
    .map_err(e)?;
    b.finish_and_clear();
    let took = start.elapsed();
    println!(
        "6. copied {} ({} areas {}) in {:.2} s into {} ({} file{})",
        human(st.bytes_read),
        areas.len(),
        if previous.is_some() {
            format!("changed since {since}")
        } else {
            "allocated".to_string()
        },
        took.as_secs_f64(),
        file.display(),
        human(st.file_bytes),
        previous.map_or(String::new(), |p| format!(
            ", child of {}",
            p.file.file_name().unwrap_or_default().to_string_lossy()
        ))
    );
    drop(snap);
    println!("7. redo log discarded, snapshot released");
    Ok((change_id, digests, st.bytes_read, took))
}

/// Steps 4-7 over the network: the host serves the snapshot, the proxy pulls the
/// backup through libvixDiskLib's nbdssl transport.
fn remote_copy(
    dir: &Path,
    vm: &Path,
    file: &Path,
    previous: Option<&Backup>,
) -> DemoResult<Copied> {
    let host = demo_remote::Host::serve(dir, vm)?;
    println!(
        "4. the host serves the snapshot over NBD: vdisk-nbd on 127.0.0.1:{}, TLS, \
         non-persistent (writes would go to a throwaway redo log), as {}",
        host.port,
        demo_remote::EXPORT
    );
    // What the disk holds, read on the host's side for the final check.
    let digests = digests(&Disk::open(vm).map_err(e)?, "verifying")?;
    let pulled = demo_remote::pull(
        &host,
        file,
        previous.map(|p| (p.change_id.as_str(), p.file.as_path())),
    )?;
    println!(
        "5. the proxy connects with libvixDiskLib's {} transport (server certificate pinned \
         by its thumbprint {}) and opens the export; its change ID {}",
        pulled.mode, host.thumbprint, pulled.change_id
    );
    let what = match (pulled.kind.as_str(), previous) {
        ("incremental", Some(p)) => format!("changed since {}", p.change_id),
        ("full-after-refused-change-id", _) => {
            "allocated: the host refused the change ID, so a full backup".to_string()
        }
        _ => "allocated".to_string(),
    };
    println!(
        "6. pulled {} ({} areas {what}) in {:.2} s ({:.0} MiB/s) into {} ({} file)",
        human(pulled.bytes),
        pulled.areas,
        pulled.seconds,
        pulled.bytes as f64 / MIB as f64 / pulled.seconds.max(1e-9),
        file.display(),
        human(std::fs::metadata(file).map_err(e)?.len()),
    );
    host.stop()?;
    println!("7. the host stops serving: its redo log is discarded, the snapshot released");
    Ok((
        pulled.change_id,
        digests,
        pulled.bytes,
        Duration::from_secs_f64(pulled.seconds),
    ))
}

/// Restores a backup chain into a fresh disk and checks every byte against the
/// digests taken when the backup was made.
fn restore(dir: &Path, b: &Backup, name: &str) -> DemoResult<PathBuf> {
    let out = dir.join(name);
    let start = Instant::now();
    let bar = bar(DISK, "restoring");
    vdisk::convert(
        &b.file,
        vdisk::ImageFormat::Vmdk,
        &out,
        vdisk::ImageFormat::Vmdk,
        &vdisk::ConvertOptions::new(DiskType::MonolithicSparse),
        &mut |done, _| {
            bar.set_position(done);
            true
        },
    )
    .map_err(e)?;
    bar.finish_and_clear();
    let restored = Disk::open(&out).map_err(e)?;
    let got = digests(&restored, "verifying")?;
    let bad = got.iter().zip(&b.digests).filter(|(a, b)| a != b).count();
    if got.len() != b.digests.len() || bad != 0 {
        return Err(format!(
            "{}: {bad} of {} chunks differ from the disk at backup time",
            out.display(),
            b.digests.len()
        ));
    }
    println!(
        "   restored {} into {} in {:.2} s: all {} bytes match the disk at backup time",
        b.file.file_name().unwrap_or_default().to_string_lossy(),
        out.display(),
        start.elapsed().as_secs_f64(),
        DISK
    );
    Ok(out)
}

/// Reads the restored partition out and checks the file system and one file.
fn check_file_system(dir: &Path, restored: &Path, file: &str, want: &[u8]) -> DemoResult {
    let disk = Disk::open(restored).map_err(e)?;
    let img = dir.join("restored-fs.img");
    let f = std::fs::File::create(&img).map_err(e)?;
    f.set_len(DISK - PART_START).map_err(e)?;
    let mut buf = vec![0u8; MIB as usize];
    for r in disk.changed_areas(cbt::ALL, PART_START, DISK).map_err(e)? {
        let mut pos = r.0;
        while pos < r.0 + r.1 {
            use std::os::unix::fs::FileExt;
            let n = (r.0 + r.1 - pos).min(MIB) as usize;
            disk.read_at(&mut buf[..n], pos).map_err(e)?;
            f.write_all_at(&buf[..n], pos - PART_START).map_err(e)?;
            pos += n as u64;
        }
    }
    drop(f);
    let img_s = img.to_string_lossy().into_owned();
    run(&tool("e2fsck")?, &["-f", "-n", &img_s])?;
    let dumped = dir.join("dumped.txt");
    run(
        &tool("debugfs")?,
        &["-R", &format!("dump /{file} {}", dumped.display()), &img_s],
    )?;
    let got = std::fs::read(&dumped).map_err(e)?;
    if got != want {
        return Err(format!(
            "/{file} in the restored file system is not what the guest wrote"
        ));
    }
    println!(
        "   e2fsck: the restored ext4 file system is clean; /{file} holds the guest's rewrite"
    );
    let _ = std::fs::remove_file(&img);
    let _ = std::fs::remove_file(&dumped);
    Ok(())
}

fn main_flow() -> DemoResult {
    let mut remote = true;
    let mut keep = None;
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "--local" => remote = false,
            "-h" | "--help" => {
                println!("usage: vdisk-demo [--local] [DIR]");
                return Ok(());
            }
            _ if a.starts_with('-') => return Err(format!("unknown option {a}")),
            _ => keep = Some(PathBuf::from(a)),
        }
    }
    let tmp = tempfile::tempdir().map_err(e)?;
    let dir = keep.unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir).map_err(e)?;
    for entry in std::fs::read_dir(&dir).map_err(e)?.flatten() {
        let p = entry.path();
        if p.extension().is_some_and(|x| x == "vmdk" || x == "vdcbt") {
            std::fs::remove_file(&p).map_err(e)?;
        }
    }
    let vm = dir.join("vm.vmdk");
    let mut rng = Rng(0x5eed_2026_1124);
    println!(
        "Guest disk {}: {}, MBR partition 1 with ext4 and {} of files",
        vm.display(),
        human(DISK),
        human(FILE_DATA)
    );
    let files = make_guest_disk(&dir, &vm, &mut rng)?;
    let id = cbt::enable(&vm).map_err(e)?;
    println!("Change tracking enabled, first change ID {id}");

    // The guest's writes during the first session are consolidated before the
    // second snapshot: they are what the incremental backup has to catch.
    let (full, (written, file, content)) = session(&dir, &vm, &files, &mut rng, None, 1, remote)?;
    let (incr, _) = session(&dir, &vm, &files, &mut rng, Some(&full), 2, remote)?;

    println!("\n== Restore");
    restore(&dir, &full, "restored-full.vmdk")?;
    let restored = restore(&dir, &incr, "restored-incremental.vmdk")?;
    check_file_system(&dir, &restored, &file, &content)?;

    println!("\n== Summary");
    let rate = |b: &Backup| b.copied as f64 / MIB as f64 / b.took.as_secs_f64().max(1e-9);
    let how = if remote {
        "pulled over nbdssl"
    } else {
        "copied locally"
    };
    println!(
        "   full backup:        {} {how} in {:.2} s ({:.0} MiB/s)",
        human(full.copied),
        full.took.as_secs_f64(),
        rate(&full)
    );
    println!(
        "   incremental backup: {} {how} in {:.2} s ({:.0} MiB/s; {:.1}% of the full backup's time)",
        human(incr.copied),
        incr.took.as_secs_f64(),
        rate(&incr),
        100.0 * incr.took.as_secs_f64() / full.took.as_secs_f64().max(1e-9)
    );
    println!(
        "   the guest wrote {} between the backups; the incremental copied {:.2}x that",
        human(written),
        incr.copied as f64 / written as f64
    );
    println!("Backup flow verified.");
    Ok(())
}

fn main() -> ExitCode {
    match main_flow() {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("vdisk-demo: error: {msg}");
            ExitCode::FAILURE
        }
    }
}
