//! `vdisk-mount` against the real tools: disks with partition tables made by sfdisk,
//! ext4 and FAT file systems made by mkfs, converted to several VMDK types and a
//! snapshot chain, mounted with FUSE (`-f`), compared with `qemu-img convert -O raw`,
//! written through (loop mounts of ext4 partitions, mtools on FAT partitions),
//! unmounted, and checked: a non-persistent mount never changes a disk file; a
//! persistent mount's writes are there after reopening.
//!
//! Needs root and FUSE (`/dev/fuse`, `fusermount3`), and the tools named in the
//! panics (never skipped). The tests take one global lock: `-x` unmounts every vdisk
//! mount, so they must not run side by side.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vdisk_interop::{
    assert_same_bytes, folder_hashes, path_str, pattern, qemu_raw, require_tool_from, run,
    run_unchecked, stderr_text, stdout_text, tempdir, vdisk_mount_bin, vdiskmanager, MIB,
};

const SECTOR: u64 = 512;
/// Size of the test disks.
const DISK_SIZE: u64 = 64 * MIB;
/// Where the tests write through `flat`: past the last partition of both layouts.
const FREE_AREA: u64 = 62 * MIB + 12_345;
/// The content of the ext4 partitions' `hello.txt`.
const HELLO: &[u8] = b"hello from ext4\n";
/// The content of the FAT partition's `README.TXT`.
const README: &[u8] = b"hello from FAT\r\n";

// ---------------------------------------------------------------------------------
// Environment

static SERIAL: Mutex<()> = Mutex::new(());

/// Takes the global lock and checks that mounting can work here.
fn setup() -> MutexGuard<'static, ()> {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let uid = stdout_text(&run("id", &["-u"]));
    assert_eq!(
        uid.trim(),
        "0",
        "the mount tests need root (FUSE with auto_unmount, loop mounts)"
    );
    assert!(
        Path::new("/dev/fuse").exists(),
        "the mount tests need /dev/fuse (the fuse kernel module)"
    );
    require_tool_from("fusermount3", "fuse3");
    guard
}

fn tool(name: &str, package: &str) -> PathBuf {
    require_tool_from(name, package)
}

/// Runs `vdisk-mount args...` and asserts success.
fn vm(args: &[&str]) -> Output {
    run(vdisk_mount_bin(), args)
}

/// Runs `vdisk-mount args...`, asserts that it failed with one line
/// `vdisk-mount: error: ...` on stderr, and returns that line.
fn vm_error(args: &[&str]) -> String {
    let out = run_unchecked(vdisk_mount_bin(), args);
    assert!(
        !out.status.success(),
        "vdisk-mount {args:?} succeeded but should have failed"
    );
    let err = stderr_text(&out);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "vdisk-mount {args:?}: stderr is not one line:\n{err}"
    );
    assert!(
        lines[0].starts_with("vdisk-mount: error: "),
        "vdisk-mount {args:?}: {err}"
    );
    assert_eq!(out.status.code(), Some(1));
    lines[0].to_string()
}

/// Undoes the octal escapes of mountinfo (`\040` for a space).
fn unescape(field: &str) -> String {
    let mut out = Vec::new();
    let b = field.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(u8::is_ascii_digit));
        match octal {
            Some(d) if b[i] == b'\\' => {
                out.push(d.iter().fold(0u8, |v, c| v * 8 + (c - b'0')));
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

/// The vdisk mounts (type `fuse.vdisk`) of `/proc/self/mountinfo`: (mount point,
/// source).
fn vdisk_mounts() -> Vec<(PathBuf, String)> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            (f.get(sep + 1) == Some(&"fuse.vdisk"))
                .then(|| (PathBuf::from(unescape(f[4])), unescape(f[sep + 2])))
        })
        .collect()
}

fn is_mounted(dir: &Path) -> bool {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    vdisk_mounts().iter().any(|(m, _)| *m == dir)
}

/// A `vdisk-mount -f` mount, unmounted (lazily, ignoring errors) when dropped if a
/// test fails before `unmount`.
struct FlatMount {
    dir: PathBuf,
}

impl FlatMount {
    /// `vdisk-mount [extra...] -f DISK DIR`.
    fn new(disk: &Path, dir: &Path, extra: &[&str]) -> FlatMount {
        std::fs::create_dir_all(dir).unwrap();
        let mut args: Vec<&str> = extra.to_vec();
        args.extend(["-f", path_str(disk), path_str(dir)]);
        let out = vm(&args);
        assert!(
            stdout_text(&out).is_empty(),
            "-f printed {}",
            stdout_text(&out)
        );
        assert!(
            is_mounted(dir),
            "{} is not a mount point after -f",
            dir.display()
        );
        FlatMount {
            dir: dir.canonicalize().unwrap(),
        }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// `vdisk-mount -d DIR`, which returns once the serving process has exited.
    fn unmount(self) {
        vm(&["-d", path_str(&self.dir)]);
        assert!(
            !is_mounted(&self.dir),
            "{} still mounted after -d",
            self.dir.display()
        );
    }
}

impl Drop for FlatMount {
    fn drop(&mut self) {
        if is_mounted(&self.dir) {
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&self.dir)
                .status();
        }
    }
}

/// A kernel loop mount of a file (`mount -o loop`), unmounted when dropped.
struct LoopMount {
    dir: PathBuf,
    mounted: bool,
}

impl LoopMount {
    fn new(file: &Path, dir: &Path, options: &str) -> LoopMount {
        std::fs::create_dir_all(dir).unwrap();
        tool("losetup", "mount");
        run(
            tool("mount", "mount"),
            &["-o", options, path_str(file), path_str(dir)],
        );
        LoopMount {
            dir: dir.to_path_buf(),
            mounted: true,
        }
    }

    fn umount(mut self) {
        run(tool("umount", "mount"), &[path_str(&self.dir)]);
        self.mounted = false;
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

// ---------------------------------------------------------------------------------
// Disks

/// A partition of a test layout: number, start and length in bytes.
type Part = (u32, u64, u64);

fn sfdisk(image: &Path, script: &str) {
    let mut child = Command::new(tool("sfdisk", "fdisk"))
        .arg("-q")
        .arg(image)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "sfdisk failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Copies the file `fs` into `image` at byte `offset`, skipping zero blocks.
fn copy_into(image: &Path, offset: u64, fs: &Path) {
    let out = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    let mut input = File::open(fs).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let mut pos = 0u64;
    loop {
        let n = input.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            out.write_all_at(&buf[..n], offset + pos).unwrap();
        }
        pos += n as u64;
    }
}

/// An ext4 file system of `len` bytes labelled `label`, holding `hello.txt` and
/// `data.bin`.
fn make_ext4(dir: &Path, name: &str, len: u64, label: &str) -> PathBuf {
    let src = dir.join(format!("{name}.src"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("hello.txt"), HELLO).unwrap();
    std::fs::write(src.join("data.bin"), pattern(7, 300_000)).unwrap();
    let img = dir.join(format!("{name}.img"));
    File::create(&img).unwrap().set_len(len).unwrap();
    run(
        tool("mkfs.ext4", "e2fsprogs"),
        &[
            "-q",
            "-F",
            "-L",
            label,
            "-d",
            path_str(&src),
            path_str(&img),
        ],
    );
    img
}

/// A FAT file system of `len` bytes labelled `label`, holding `README.TXT`.
fn make_fat(dir: &Path, name: &str, len: u64, label: &str) -> PathBuf {
    let img = dir.join(format!("{name}.img"));
    File::create(&img).unwrap().set_len(len).unwrap();
    run(
        tool("mkfs.fat", "dosfstools"),
        &["-n", label, path_str(&img)],
    );
    let readme = dir.join("readme.txt");
    std::fs::write(&readme, README).unwrap();
    run(
        tool("mcopy", "mtools"),
        &["-i", path_str(&img), path_str(&readme), "::README.TXT"],
    );
    img
}

/// A raw 64 MiB disk with an MBR: p1 ext4 `ROOTFS`, p2 FAT `DATA`, p3 extended
/// holding p5 ext4 `LOGICAL`. Returns the image and its data partitions.
fn mbr_raw(dir: &Path) -> (PathBuf, Vec<Part>) {
    let raw = dir.join("mbr.raw");
    File::create(&raw).unwrap().set_len(DISK_SIZE).unwrap();
    let n = raw.display();
    sfdisk(
        &raw,
        &format!(
            "label: dos\n{n}1 : start=2048, size=49152, type=83\n{n}2 : size=32768, type=c\n\
             {n}3 : size=40960, type=5\n{n}5 : size=20480, type=83\n"
        ),
    );
    let parts: Vec<Part> = vec![
        (1, 2048 * SECTOR, 49152 * SECTOR),
        (2, 51200 * SECTOR, 32768 * SECTOR),
        (5, 86016 * SECTOR, 20480 * SECTOR),
    ];
    copy_into(
        &raw,
        parts[0].1,
        &make_ext4(dir, "p1", parts[0].2, "ROOTFS"),
    );
    copy_into(&raw, parts[1].1, &make_fat(dir, "p2", parts[1].2, "DATA"));
    copy_into(
        &raw,
        parts[2].1,
        &make_ext4(dir, "p5", parts[2].2, "LOGICAL"),
    );
    (raw, parts)
}

/// A raw 64 MiB disk with a GPT: p1 ext4 (Linux filesystem), p2 FAT (Microsoft basic
/// data).
fn gpt_raw(dir: &Path) -> (PathBuf, Vec<Part>) {
    let raw = dir.join("gpt.raw");
    File::create(&raw).unwrap().set_len(DISK_SIZE).unwrap();
    let n = raw.display();
    sfdisk(
        &raw,
        &format!(
            "label: gpt\n{n}1 : start=2048, size=40960, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n\
             {n}2 : start=43008, size=40960, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n"
        ),
    );
    let parts: Vec<Part> = vec![
        (1, 2048 * SECTOR, 40960 * SECTOR),
        (2, 43008 * SECTOR, 40960 * SECTOR),
    ];
    copy_into(
        &raw,
        parts[0].1,
        &make_ext4(dir, "g1", parts[0].2, "GPTROOT"),
    );
    copy_into(
        &raw,
        parts[1].1,
        &make_fat(dir, "g2", parts[1].2, "GPTDATA"),
    );
    (raw, parts)
}

/// Converts `raw` into a VMDK of type `t` named `name` in its own new folder under
/// `dir` (so that folder holds exactly the disk's files).
fn to_vmdk(raw: &Path, dir: &Path, name: &str, t: u32) -> PathBuf {
    let folder = dir.join(name);
    std::fs::create_dir_all(&folder).unwrap();
    let vmdk = folder.join(format!("{name}.vmdk"));
    vdiskmanager(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-t",
        &t.to_string(),
        path_str(raw),
        path_str(&vmdk),
    ]);
    vmdk
}

/// Asserts that `flat` equals qemu's raw image of the disk and each `pN` its range,
/// and that the mount holds exactly `flat` and those partitions.
fn assert_files_match(m: &FlatMount, expected: &[u8], parts: &[Part], what: &str) {
    let mut names = vec!["flat".to_string()];
    names.extend(parts.iter().map(|p| format!("p{}", p.0)));
    names.sort();
    assert_eq!(m.names(), names, "{what}: files of the mount");
    let flat = std::fs::read(m.file("flat")).unwrap();
    assert_same_bytes(&format!("{what}: flat vs qemu-img"), &flat, expected);
    for &(n, start, len) in parts {
        let file = m.file(&format!("p{n}"));
        assert_eq!(
            std::fs::metadata(&file).unwrap().len(),
            len,
            "{what}: size of p{n}"
        );
        let got = std::fs::read(&file).unwrap();
        let range = &expected[start as usize..(start + len) as usize];
        assert_same_bytes(&format!("{what}: p{n} vs its range"), &got, range);
    }
}

/// Writes `data` at `offset` of a mounted file and reads it back through the mount.
fn write_through(file: &Path, offset: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    f.write_all_at(data, offset).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let mut back = vec![0u8; data.len()];
    File::open(file)
        .unwrap()
        .read_exact_at(&mut back, offset)
        .unwrap();
    assert_same_bytes("written data read back through the mount", &back, data);
}

/// Creates, changes and deletes files in the mounted ext4 partition `pN` (a loop
/// mount), checks them after a remount, and checks the file system with e2fsck.
fn change_ext4(m: &FlatMount, ext4: u32, work: &Path) {
    let lp = work.join("loop");
    let ext4_file = m.file(&format!("p{ext4}"));
    let l = LoopMount::new(&ext4_file, &lp, "loop");
    assert_eq!(std::fs::read(lp.join("hello.txt")).unwrap(), HELLO);
    std::fs::write(lp.join("new.bin"), pattern(11, 2 * MIB as usize)).unwrap();
    std::fs::remove_file(lp.join("data.bin")).unwrap();
    std::fs::create_dir(lp.join("folder")).unwrap();
    l.umount();
    let l = LoopMount::new(&ext4_file, &lp, "loop,ro");
    assert_eq!(
        std::fs::read(lp.join("new.bin")).unwrap(),
        pattern(11, 2 * MIB as usize),
        "a file written into ext4 through the mount"
    );
    assert!(!lp.join("data.bin").exists());
    assert!(lp.join("folder").is_dir());
    l.umount();
    run(
        tool("e2fsck", "e2fsprogs"),
        &["-f", "-n", path_str(&ext4_file)],
    );
}

/// Creates and deletes files in the mounted FAT partition `pN` (mtools: this kernel
/// may have no vfat), reads them back, and checks the file system with fsck.fat.
fn change_fat(m: &FlatMount, fat: u32, work: &Path) {
    let fat_file = m.file(&format!("p{fat}"));
    let img = path_str(&fat_file);
    let local = work.join("fat-new.bin");
    std::fs::write(&local, pattern(12, 500_000)).unwrap();
    run(
        tool("mcopy", "mtools"),
        &["-i", img, path_str(&local), "::NEW.BIN"],
    );
    run(tool("mdel", "mtools"), &["-i", img, "::README.TXT"]);
    run(tool("mmd", "mtools"), &["-i", img, "::FOLDER"]);
    let listing = stdout_text(&run(tool("mdir", "mtools"), &["-b", "-i", img, "::"]));
    assert!(
        listing.contains("NEW.BIN") && listing.contains("FOLDER"),
        "{listing}"
    );
    assert!(!listing.contains("README"), "{listing}");
    let back = work.join("fat-back.bin");
    run(
        tool("mcopy", "mtools"),
        &["-n", "-i", img, "::NEW.BIN", path_str(&back)],
    );
    assert_eq!(std::fs::read(&back).unwrap(), pattern(12, 500_000));
    run(tool("fsck.fat", "dosfstools"), &["-n", img]);
}

/// Asserts the mount shows the original file systems (nothing of a discarded
/// non-persistent session).
fn assert_original_file_systems(m: &FlatMount, ext4: u32, fat: u32, work: &Path) {
    let lp = work.join("loop");
    let l = LoopMount::new(&m.file(&format!("p{ext4}")), &lp, "loop,ro");
    assert_eq!(std::fs::read(lp.join("hello.txt")).unwrap(), HELLO);
    assert!(lp.join("data.bin").is_file());
    assert!(!lp.join("new.bin").exists());
    l.umount();
    let fat_file = m.file(&format!("p{fat}"));
    let listing = stdout_text(&run(
        tool("mdir", "mtools"),
        &["-b", "-i", path_str(&fat_file), "::"],
    ));
    assert!(
        listing.contains("README.TXT") && !listing.contains("NEW.BIN"),
        "{listing}"
    );
}

// ---------------------------------------------------------------------------------
// Tests

#[test]
fn every_disk_type_and_a_chain_mount_with_files_equal_to_qemu_and_stay_unchanged() {
    let _guard = setup();
    let dir = tempdir();
    let (raw, parts) = mbr_raw(dir.path());
    let base = to_vmdk(&raw, dir.path(), "sparse", 0);
    let mut disks = vec![
        ("monolithicSparse", base.clone(), false),
        (
            "twoGbMaxExtentSparse",
            to_vmdk(&raw, dir.path(), "split", 1),
            false,
        ),
        (
            "monolithicFlat",
            to_vmdk(&raw, dir.path(), "flat", 2),
            false,
        ),
        (
            "streamOptimized",
            to_vmdk(&raw, dir.path(), "stream", 5),
            true,
        ),
    ];
    // A chain: a snapshot of a copy of the sparse disk, with data of its own.
    let chain_dir = dir.path().join("chain");
    std::fs::create_dir_all(&chain_dir).unwrap();
    let parent = chain_dir.join("base.vmdk");
    std::fs::copy(&base, &parent).unwrap();
    vdiskmanager(&["snapshot", "-q", path_str(&parent)]);
    let child = chain_dir.join("base-000001.vmdk");
    let own = pattern(3, 300_000);
    {
        let d = vdisk::OpenOptions::new().write(true).open(&child).unwrap();
        d.write_at(&own, 63 * MIB).unwrap();
        d.close().unwrap();
    }
    disks.push(("snapshot chain", child.clone(), false));

    let mnt = dir.path().join("mnt");
    for (what, disk, read_only) in &disks {
        let folder = disk.parent().unwrap();
        let before = folder_hashes(folder);
        let expected = qemu_raw(disk);
        if *what == "snapshot chain" {
            assert_same_bytes(
                "the child's own data",
                &expected[63 << 20..][..own.len()],
                &own,
            );
        }
        let extra: &[&str] = if *read_only { &["-r"] } else { &[] };
        let m = FlatMount::new(disk, &mnt, extra);
        assert_files_match(&m, &expected, &parts, what);
        if *read_only {
            let err = std::fs::OpenOptions::new()
                .write(true)
                .open(m.file("flat"))
                .unwrap_err();
            assert_eq!(
                err.raw_os_error(),
                Some(30),
                "{what}: EROFS expected, got {err}"
            );
            let mode = std::fs::metadata(m.file("p1"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o444, "{what}");
        } else {
            let mode = std::fs::metadata(m.file("p1"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o644, "{what}");
            write_through(&m.file("flat"), FREE_AREA, &pattern(5, 1_500_000));
            // Partition files are ranges of the same disk.
            write_through(&m.file("p5"), 4096 * 1000, &pattern(6, 70_000));
            let mut via_flat = vec![0u8; 70_000];
            File::open(m.file("flat"))
                .unwrap()
                .read_exact_at(&mut via_flat, parts[2].1 + 4096 * 1000)
                .unwrap();
            assert_same_bytes("p5 write seen through flat", &via_flat, &pattern(6, 70_000));
        }
        m.unmount();
        assert_eq!(folder_hashes(folder), before, "{what}: a disk file changed");
        if *what == "snapshot chain" {
            let chain_files: Vec<String> = before.keys().cloned().collect();
            assert_eq!(chain_files, ["base-000001.vmdk", "base.vmdk"]);
        }
    }
}

#[test]
fn non_persistent_mount_takes_file_system_changes_and_discards_them() {
    let _guard = setup();
    let dir = tempdir();
    let (raw, _) = mbr_raw(dir.path());
    let base = to_vmdk(&raw, dir.path(), "sparse", 0);
    vdiskmanager(&["snapshot", "-q", path_str(&base)]);
    let child = base.with_file_name("sparse-000001.vmdk");
    let folder = base.parent().unwrap();
    let before = folder_hashes(folder);
    let mnt = dir.path().join("mnt");
    for disk in [&base, &child] {
        let m = FlatMount::new(disk, &mnt, &[]);
        change_ext4(&m, 1, dir.path());
        change_ext4(&m, 5, dir.path());
        change_fat(&m, 2, dir.path());
        m.unmount();
        assert_eq!(
            folder_hashes(folder),
            before,
            "{}: a disk file changed",
            disk.display()
        );
        let m = FlatMount::new(disk, &mnt, &[]);
        assert_original_file_systems(&m, 1, 2, dir.path());
        m.unmount();
    }
    assert_eq!(folder_hashes(folder), before);
}

#[test]
fn persistent_mount_writes_reach_the_disk() {
    let _guard = setup();
    let dir = tempdir();
    let (raw, _) = mbr_raw(dir.path());
    let disk = to_vmdk(&raw, dir.path(), "sparse", 0);
    let mnt = dir.path().join("mnt");
    let lp = dir.path().join("loop");
    let m = FlatMount::new(&disk, &mnt, &["--persistent"]);
    let listing = stdout_text(&vm(&["-L"]));
    assert!(
        listing
            .lines()
            .any(|l| l.contains(path_str(&disk)) && l.contains("persistent")),
        "{listing}"
    );
    let l = LoopMount::new(&m.file("p1"), &lp, "loop");
    std::fs::write(lp.join("persist.txt"), b"kept\n").unwrap();
    l.umount();
    let data = pattern(9, 1_000_000);
    write_through(&m.file("flat"), FREE_AREA, &data);
    // -d returns once the serving process has flushed and closed the disk.
    m.unmount();
    vdiskmanager(&["-e", path_str(&disk)]);
    run("qemu-img", &["check", path_str(&disk)]);
    let now = qemu_raw(&disk);
    assert_same_bytes(
        "persistent write seen by qemu-img",
        &now[FREE_AREA as usize..][..data.len()],
        &data,
    );
    let m = FlatMount::new(&disk, &mnt, &["-o", "ro"]);
    assert_same_bytes(
        "flat after reopening",
        &std::fs::read(m.file("flat")).unwrap(),
        &now,
    );
    let l = LoopMount::new(&m.file("p1"), &lp, "loop,ro");
    assert_eq!(std::fs::read(lp.join("persist.txt")).unwrap(), b"kept\n");
    l.umount();
    m.unmount();
}

/// `vdisk-mount [extra...] -f NAME DIR` run in the disk's folder (the disk named
/// relatively: the serving process moves to `/` once the disk is open).
fn mount_by_relative_name(folder: &Path, name: &str, mnt: &Path, extra: &[&str]) -> FlatMount {
    std::fs::create_dir_all(mnt).unwrap();
    let mut args: Vec<&str> = extra.to_vec();
    args.extend(["-f", name, path_str(mnt)]);
    let out = Command::new(vdisk_mount_bin())
        .args(&args)
        .current_dir(folder)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "vdisk-mount {args:?}: {}",
        stderr_text(&out)
    );
    assert!(is_mounted(mnt), "{} is not mounted", mnt.display());
    FlatMount {
        dir: mnt.canonicalize().unwrap(),
    }
}

/// A tracked disk mounted `--persistent` by a relative name keeps its change
/// tracking: the sidecar in the disk's folder is closed at unmount (none appears in
/// `/`, the serving process's folder), the change ID taken before is accepted and
/// the changed areas hold the write made through the mount. Read-only and
/// non-persistent mounts leave tracking as it was.
#[test]
fn mounts_of_a_tracked_disk_keep_its_change_tracking() {
    let _guard = setup();
    let dir = tempdir();
    let folder = dir.path().canonicalize().unwrap();
    // A name no other test uses, so that a sidecar written into / is this one's.
    let stem = format!("tracked-{}", std::process::id());
    let name = format!("{stem}.vmdk");
    let disk = folder.join(&name);
    let stray = Path::new("/").join(format!("{stem}-cbt.vdcbt"));
    let _ = std::fs::remove_file(&stray);
    vdiskmanager(&["-c", "-s", "16MB", "-t", "0", "-q", path_str(&disk)]);
    let id = vdisk::cbt::enable(&disk).unwrap();
    let mnt = folder.join("mnt");
    let changes = || {
        let d = vdisk::Disk::open(&disk).unwrap();
        let st = d.tracker().unwrap().status().unwrap();
        assert_eq!(st.invalid, None, "tracking not trusted after the mount");
        d.changed_areas(&id, 0, d.capacity())
            .unwrap_or_else(|e| panic!("change ID {id} refused after the mount: {e}"))
    };
    let m = mount_by_relative_name(&folder, &name, &mnt, &["--persistent"]);
    let data = pattern(21, 65_536);
    write_through(&m.file("flat"), 5 * MIB, &data);
    m.unmount();
    let strayed = stray.exists();
    let _ = std::fs::remove_file(&stray);
    assert!(
        !strayed,
        "the persistent mount wrote its sidecar as {}",
        stray.display()
    );
    let after = changes();
    assert_eq!(after, vec![(5 * MIB, 65_536)]);
    // Read-only, then non-persistent (a write that goes to the throwaway redo log).
    for extra in [&["-r"][..], &[][..]] {
        let m = mount_by_relative_name(&folder, &name, &mnt, extra);
        let mut back = vec![0u8; data.len()];
        File::open(m.file("flat"))
            .unwrap()
            .read_exact_at(&mut back, 5 * MIB)
            .unwrap();
        assert_same_bytes("tracked disk read through the mount", &back, &data);
        if extra.is_empty() {
            write_through(&m.file("flat"), 9 * MIB, &data);
        }
        m.unmount();
        let strayed = stray.exists();
        let _ = std::fs::remove_file(&stray);
        assert!(!strayed, "{extra:?}: a sidecar appeared in /");
        assert_eq!(
            changes(),
            after,
            "{extra:?} mount changed the tracked areas"
        );
    }
}

#[test]
fn gpt_disk_lists_and_mounts_its_partitions() {
    let _guard = setup();
    let dir = tempdir();
    let (raw, parts) = gpt_raw(dir.path());
    let disk = to_vmdk(&raw, dir.path(), "gpt", 0);
    let out = stdout_text(&vm(&["-p", path_str(&disk)]));
    assert!(out.contains("GPT partition table"), "{out}");
    let rows: Vec<Vec<&str>> = out
        .lines()
        .skip(2)
        .map(|l| {
            l.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect()
        })
        .collect();
    assert_eq!(
        rows,
        [
            vec!["1", "2048", "40960", "Linux filesystem", "ext4", "GPTROOT"],
            vec![
                "2",
                "43008",
                "40960",
                "Microsoft basic data",
                "FAT16",
                "GPTDATA"
            ],
        ],
        "{out}"
    );
    let before = folder_hashes(disk.parent().unwrap());
    let mnt = dir.path().join("mnt");
    let m = FlatMount::new(&disk, &mnt, &[]);
    assert_files_match(&m, &std::fs::read(&raw).unwrap(), &parts, "GPT");
    change_ext4(&m, 1, dir.path());
    change_fat(&m, 2, dir.path());
    m.unmount();
    assert_eq!(folder_hashes(disk.parent().unwrap()), before);
}

#[test]
fn partitions_are_listed_like_sfdisk_sees_them() {
    let _guard = setup();
    let dir = tempdir();
    let (raw, _) = mbr_raw(dir.path());
    let disk = to_vmdk(&raw, dir.path(), "sparse", 0);
    let out = vm(&["-p", path_str(&disk)]);
    assert!(stderr_text(&out).is_empty(), "{}", stderr_text(&out));
    let text = stdout_text(&out);
    let mut lines = text.lines();
    let title = lines.next().unwrap();
    assert!(
        title.contains("64.0 MiB (131072 sectors), MBR partition table"),
        "{title}"
    );
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["Nr", "Start", "Size", "Type", "Filesystem", "Label"]
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(
        rows,
        [
            vec!["1", "2048", "49152", "0x83", "ext4", "ROOTFS"],
            vec!["2", "51200", "32768", "0x0c", "FAT16", "DATA"],
            vec!["3", "83968", "40960", "0x05", "extended", "-"],
            vec!["5", "86016", "20480", "0x83", "ext4", "LOGICAL"],
        ]
    );
}

#[test]
fn list_shows_mounts_and_x_unmounts_them_all() {
    let _guard = setup();
    let dir = tempdir();
    let (raw, _) = mbr_raw(dir.path());
    let a = to_vmdk(&raw, dir.path(), "a", 0);
    // A name with a comma and a space: the mount's source must still be the path.
    let b = to_vmdk(&raw, dir.path(), "b,x y", 2);
    let ma = FlatMount::new(&a, &dir.path().join("mnt a"), &[]);
    let mb = FlatMount::new(&b, &dir.path().join("mnt,b"), &["-r"]);
    let listing = stdout_text(&vm(&["-L"]));
    let line_of = |disk: &Path| {
        listing
            .lines()
            .find(|l| l.starts_with(path_str(&disk.canonicalize().unwrap())))
            .unwrap_or_else(|| panic!("{} not listed:\n{listing}", disk.display()))
            .to_string()
    };
    let la = line_of(&a);
    assert!(
        la.contains(path_str(&ma.dir)) && la.contains("non-persistent"),
        "{la}"
    );
    assert!(
        vdisk_mounts().contains(&(
            mb.dir.clone(),
            path_str(&b.canonicalize().unwrap()).to_string()
        )),
        "{:?}",
        vdisk_mounts()
    );
    let lb = line_of(&b);
    assert!(
        lb.contains(path_str(&mb.dir)) && lb.contains("read-only"),
        "{lb}"
    );
    let pid_a: u32 = la.split_whitespace().last().unwrap().parse().unwrap();
    vm(&["-x"]);
    assert!(vdisk_mounts().is_empty(), "{:?}", vdisk_mounts());
    assert!(
        !Path::new(&format!("/proc/{pid_a}/cmdline")).exists() || {
            // A zombie waiting for its reaper has given everything up already.
            std::fs::read_to_string(format!("/proc/{pid_a}/stat"))
                .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
        }
    );
    assert_eq!(stdout_text(&vm(&["-L"])).trim(), "No vdisk mounts");
    // -k unmounts the mounts of one disk.
    let ma = FlatMount::new(&a, &dir.path().join("mnt a"), &[]);
    vm(&["-k", path_str(&a)]);
    assert!(!is_mounted(&ma.dir));
}

#[test]
fn killed_server_leaves_no_stale_mount() {
    let _guard = setup();
    let dir = tempdir();
    let (raw, _) = mbr_raw(dir.path());
    let disk = to_vmdk(&raw, dir.path(), "sparse", 0);
    let before = folder_hashes(disk.parent().unwrap());
    let mnt = dir.path().join("mnt");
    let m = FlatMount::new(&disk, &mnt, &[]);
    write_through(&m.file("flat"), FREE_AREA, &pattern(1, 100_000));
    let listing = stdout_text(&vm(&["-L"]));
    let pid = listing
        .lines()
        .find(|l| l.contains(path_str(&m.dir)))
        .and_then(|l| l.split_whitespace().last())
        .unwrap_or_else(|| panic!("mount not listed:\n{listing}"))
        .to_string();
    run("kill", &["-KILL", &pid]);
    let start = Instant::now();
    while is_mounted(&m.dir) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{} still mounted 5 s after its server was killed",
            m.dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The folder is a plain folder again, usable for a new mount.
    assert!(std::fs::read_dir(&m.dir).unwrap().next().is_none());
    assert_eq!(folder_hashes(disk.parent().unwrap()), before);
    drop(m);
    let m = FlatMount::new(&disk, &mnt, &[]);
    m.unmount();
}

#[test]
fn terminated_server_unmounts_and_closes_a_persistent_disk_cleanly() {
    let _guard = setup();
    let dir = tempdir();
    let (raw, _) = mbr_raw(dir.path());
    let disk = to_vmdk(&raw, dir.path(), "sparse", 0);
    let mnt = dir.path().join("mnt");
    let m = FlatMount::new(&disk, &mnt, &["--persistent"]);
    let data = pattern(4, 200_000);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.file("flat"))
        .unwrap();
    f.write_all_at(&data, FREE_AREA).unwrap();
    drop(f);
    let listing = stdout_text(&vm(&["-L"]));
    let pid: u32 = listing
        .lines()
        .find(|l| l.contains(path_str(&m.dir)))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("mount not listed:\n{listing}"));
    run("kill", &["-TERM", &pid.to_string()]);
    let start = Instant::now();
    let gone = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
            s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z'))
        })
    };
    while is_mounted(&m.dir) || !gone(pid) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "SIGTERM: {} still mounted or its server still running",
            m.dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(m);
    // Closed cleanly: no unclean-shutdown flag, tables written, data there.
    vdiskmanager(&["-e", path_str(&disk)]);
    run("qemu-img", &["check", path_str(&disk)]);
    assert_same_bytes(
        "data written before SIGTERM",
        &qemu_raw(&disk)[FREE_AREA as usize..][..data.len()],
        &data,
    );
}

#[test]
fn hostile_partition_tables_give_clear_messages() {
    let _guard = setup();
    let dir = tempdir();
    // A protective MBR with no GPT behind it.
    let gpt = dir.path().join("nogpt.raw");
    File::create(&gpt).unwrap().set_len(8 * MIB).unwrap();
    let mut mbr = [0u8; 512];
    mbr[446 + 4] = 0xEE;
    mbr[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
    mbr[446 + 12..446 + 16].copy_from_slice(&u32::MAX.to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    File::options()
        .write(true)
        .open(&gpt)
        .unwrap()
        .write_all_at(&mbr, 0)
        .unwrap();
    let disk = to_vmdk(&gpt, dir.path(), "nogpt", 0);
    let err = vm_error(&["-p", path_str(&disk)]);
    assert!(
        err.contains("no usable GPT header: primary: no \"EFI PART\" signature at LBA 1"),
        "{err}"
    );
    // Mounting it still serves flat, with a warning.
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let out = vm(&["-f", path_str(&disk), path_str(&mnt)]);
    let m = FlatMount {
        dir: mnt.canonicalize().unwrap(),
    };
    assert!(
        stderr_text(&out).contains("vdisk-mount: warning: ")
            && stderr_text(&out).contains("only flat is served"),
        "{}",
        stderr_text(&out)
    );
    assert_eq!(m.names(), ["flat"]);
    m.unmount();

    // Overlapping partitions and one past the end of the disk: warnings, and the
    // partition file is cut at the end of the disk.
    let bad = dir.path().join("bad.raw");
    File::create(&bad).unwrap().set_len(8 * MIB).unwrap();
    let mut mbr = [0u8; 512];
    for (i, (ty, start, sectors)) in [(0x83u8, 2048u32, 8192u32), (0x83, 4096, 30000)]
        .into_iter()
        .enumerate()
    {
        let e = 446 + 16 * i;
        mbr[e + 4] = ty;
        mbr[e + 8..e + 12].copy_from_slice(&start.to_le_bytes());
        mbr[e + 12..e + 16].copy_from_slice(&sectors.to_le_bytes());
    }
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    File::options()
        .write(true)
        .open(&bad)
        .unwrap()
        .write_all_at(&mbr, 0)
        .unwrap();
    let disk = to_vmdk(&bad, dir.path(), "bad", 0);
    let out = vm(&["-p", path_str(&disk)]);
    let warnings = stderr_text(&out);
    assert!(
        warnings.contains("partitions 1 and 2 overlap"),
        "{warnings}"
    );
    assert!(warnings.contains("partition 2 ends at byte"), "{warnings}");
    assert!(warnings
        .lines()
        .all(|l| l.starts_with("vdisk-mount: warning: ")));
    let m = FlatMount::new(&disk, &mnt, &[]);
    assert_eq!(m.names(), ["flat", "p1", "p2"]);
    assert_eq!(
        std::fs::metadata(m.file("p2")).unwrap().len(),
        8 * MIB - 4096 * SECTOR
    );
    m.unmount();
}

#[test]
fn errors_are_one_line() {
    let _guard = setup();
    let dir = tempdir();
    let (raw, _) = mbr_raw(dir.path());
    let disk = to_vmdk(&raw, dir.path(), "sparse", 0);
    let d = path_str(&disk);
    let missing = dir.path().join("missing");
    let err = vm_error(&["-f", d, path_str(&missing)]);
    assert!(err.ends_with("missing does not exist"), "{err}");
    let err = vm_error(&["-f", d, d]);
    assert!(err.ends_with("is not a directory"), "{err}");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let err = vm_error(&[
        "-f",
        path_str(&dir.path().join("nope.vmdk")),
        path_str(&mnt),
    ]);
    assert!(err.contains("nope.vmdk"), "{err}");
    let garbage = dir.path().join("garbage.vmdk");
    std::fs::write(&garbage, b"not a disk\n").unwrap();
    let err = vm_error(&["-f", path_str(&garbage), path_str(&mnt)]);
    assert!(err.contains("not a valid VMDK descriptor"), "{err}");
    assert!(!is_mounted(&mnt));
    let err = vm_error(&[d, "x1", path_str(&mnt)]);
    assert!(err.contains("not a number"), "{err}");
    let err = vm_error(&["-d", path_str(&mnt)]);
    assert!(err.contains("is not a vdisk mount"), "{err}");
    let err = vm_error(&["-r", "--persistent", "-f", d, path_str(&mnt)]);
    assert!(err.contains("read-only"), "{err}");
    let err = vm_error(&["-o", "bogus", "-f", d, path_str(&mnt)]);
    assert!(err.contains("unknown mount option"), "{err}");
    // A disk locked by a persistent mount cannot be mounted again for writing, and a
    // mounted folder cannot take a second mount.
    let m = FlatMount::new(&disk, &mnt, &["--persistent"]);
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let err = vm_error(&["--persistent", "-f", d, path_str(&other)]);
    assert!(err.to_lowercase().contains("lock"), "{err}");
    let err = vm_error(&["-f", d, path_str(&mnt)]);
    assert!(err.contains("already a vdisk mount"), "{err}");
    // Writes past the end of a file fail; reads there are short.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.file("p1"))
        .unwrap();
    let size = f.metadata().unwrap().len();
    assert_eq!(f.write_at(&[1u8; 200], size - 100).unwrap(), 100);
    let err = f.write_at(&[1u8; 10], size).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(27), "EFBIG expected: {err}");
    let mut buf = [0u8; 300];
    assert_eq!(f.read_at(&mut buf, size - 50).unwrap(), 50);
    assert_eq!(f.read_at(&mut buf, size + 10).unwrap(), 0);
    assert_eq!(f.metadata().unwrap().len(), size);
    assert!(
        f.set_len(0).is_err(),
        "truncating a partition file must fail"
    );
    // A mount in use is not unmounted.
    let err = vm_error(&["-d", path_str(&m.dir)]);
    assert!(err.contains("busy"), "{err}");
    drop(f);
    m.unmount();
}

// ---------------------------------------------------------------------------------
// Partition mounts (`vdisk-mount DISK [N] DIR`)

/// What is mounted on `dir` (canonical), from mountinfo: (type, source, options).
fn mount_at(dir: &Path) -> Option<(String, String, String)> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            (Path::new(&unescape(f[4])) == dir).then(|| {
                (
                    f[sep + 1].to_string(),
                    unescape(f[sep + 2]),
                    f[5].to_string(),
                )
            })
        })
        .next_back()
}

/// The loop devices attached, as `losetup -a` lists them.
fn loop_devices() -> String {
    stdout_text(&run(tool("losetup", "mount"), &["-a"]))
}

/// The records and private folders vdisk-mount keeps for partition mounts.
fn runtime_entries() -> Vec<String> {
    std::fs::read_dir("/run/vdisk-mount").map_or(Vec::new(), |d| {
        d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    })
}

/// A `vdisk-mount [extra...] DISK [N] DIR` mount, cleaned up with `-k` if a test
/// fails before `unmount`.
struct PartMount {
    disk: PathBuf,
    dir: PathBuf,
}

impl PartMount {
    fn new(disk: &Path, n: Option<u32>, dir: &Path, extra: &[&str]) -> PartMount {
        std::fs::create_dir_all(dir).unwrap();
        let n = n.map(|n| n.to_string());
        let mut args: Vec<&str> = extra.to_vec();
        args.push(path_str(disk));
        args.extend(n.as_deref());
        args.push(path_str(dir));
        let out = vm(&args);
        assert!(stdout_text(&out).is_empty(), "{}", stdout_text(&out));
        let (fs_type, source, _) =
            mount_at(dir).unwrap_or_else(|| panic!("nothing mounted on {}", dir.display()));
        assert_eq!(fs_type, "ext4", "{}", dir.display());
        assert!(source.starts_with("/dev/loop"), "{source}");
        PartMount {
            disk: disk.to_path_buf(),
            dir: dir.canonicalize().unwrap(),
        }
    }

    fn unmount(self) {
        vm(&["-d", path_str(&self.dir)]);
        assert!(
            mount_at(&self.dir).is_none(),
            "{} still mounted after -d",
            self.dir.display()
        );
    }
}

impl Drop for PartMount {
    fn drop(&mut self) {
        if mount_at(&self.dir).is_some() {
            let _ = Command::new(vdisk_mount_bin())
                .arg("-k")
                .arg(&self.disk)
                .status();
        }
    }
}

/// Asserts nothing of vdisk-mount's is left: no mount on `dir`, no vdisk mount at
/// all, no loop device reading from a vdisk mount, no records.
fn assert_all_clean(dir: &Path) {
    assert!(mount_at(dir).is_none(), "{} still mounted", dir.display());
    assert!(vdisk_mounts().is_empty(), "{:?}", vdisk_mounts());
    let loops = loop_devices();
    assert!(
        !loops.contains("/run/vdisk-mount") && !loops.contains("(/p") && !loops.contains("flat"),
        "loop devices left:\n{loops}"
    );
    assert!(runtime_entries().is_empty(), "{:?}", runtime_entries());
}

#[test]
fn partition_file_systems_mount_take_changes_and_leave_every_disk_file_unchanged() {
    let _guard = setup();
    let dir = tempdir();
    let (raw, _) = mbr_raw(dir.path());
    let sparse = to_vmdk(&raw, dir.path(), "sparse", 0);
    let split = to_vmdk(&raw, dir.path(), "split", 1);
    vdiskmanager(&["snapshot", "-q", path_str(&sparse)]);
    let child = sparse.with_file_name("sparse-000001.vmdk");
    let mnt = dir.path().join("mnt");
    let data = pattern(7, 300_000);
    for disk in [&sparse, &split, &child] {
        let folder = disk.parent().unwrap();
        let before = folder_hashes(folder);
        // N omitted: the first partition with a file system (1); then the logical 5.
        for n in [None, Some(5)] {
            let m = PartMount::new(disk, n, &mnt, &[]);
            let listing = stdout_text(&vm(&["-L"]));
            let what = format!("partition {}", n.unwrap_or(1));
            assert!(
                listing.lines().any(|l| l.contains(path_str(disk))
                    && l.contains(&what)
                    && l.contains("non-persistent")),
                "{listing}"
            );
            assert_eq!(std::fs::read(mnt.join("hello.txt")).unwrap(), HELLO);
            assert_same_bytes(
                "data.bin",
                &std::fs::read(mnt.join("data.bin")).unwrap(),
                &data,
            );
            std::fs::write(mnt.join("new.txt"), b"created\n").unwrap();
            std::fs::remove_file(mnt.join("hello.txt")).unwrap();
            std::fs::write(mnt.join("data.bin"), pattern(8, 500_000)).unwrap();
            run("sync", &[] as &[&str]);
            m.unmount();
            assert_all_clean(&mnt);
            assert_eq!(
                folder_hashes(folder),
                before,
                "{}: a disk file changed",
                disk.display()
            );
        }
        // The changes were thrown away.
        let m = PartMount::new(disk, Some(1), &mnt, &["-r"]);
        assert!(mount_at(&mnt).unwrap().2.split(',').any(|o| o == "ro"));
        assert_eq!(std::fs::read(mnt.join("hello.txt")).unwrap(), HELLO);
        assert!(!mnt.join("new.txt").exists());
        assert!(
            std::fs::write(mnt.join("x"), b"x").is_err(),
            "a read-only mount took a write"
        );
        m.unmount();
        assert_all_clean(&mnt);
        assert_eq!(folder_hashes(folder), before);
    }
}

#[test]
fn gpt_and_persistent_partition_mounts() {
    let _guard = setup();
    let dir = tempdir();
    let (raw, _) = gpt_raw(dir.path());
    let disk = to_vmdk(&raw, dir.path(), "gpt", 0);
    let mnt = dir.path().join("mnt");
    let m = PartMount::new(&disk, Some(1), &mnt, &["--persistent", "-o", "noexec"]);
    assert!(mount_at(&mnt).unwrap().2.split(',').any(|o| o == "noexec"));
    std::fs::write(mnt.join("kept.txt"), b"kept\n").unwrap();
    // A busy file system is not unmounted.
    let busy = File::open(mnt.join("kept.txt")).unwrap();
    let err = vm_error(&["-d", path_str(&mnt)]);
    assert!(err.contains("busy"), "{err}");
    assert!(mount_at(&mnt).is_some());
    drop(busy);
    m.unmount();
    assert_all_clean(&mnt);
    vdiskmanager(&["-e", path_str(&disk)]);
    run("qemu-img", &["check", path_str(&disk)]);
    let m = PartMount::new(&disk, None, &mnt, &["-r"]);
    assert_eq!(std::fs::read(mnt.join("kept.txt")).unwrap(), b"kept\n");
    assert_eq!(std::fs::read(mnt.join("hello.txt")).unwrap(), HELLO);
    m.unmount();
    assert_all_clean(&mnt);
}

#[test]
fn partition_mount_errors_and_crash_cleanup() {
    let _guard = setup();
    let dir = tempdir();
    let (raw, _) = mbr_raw(dir.path());
    let disk = to_vmdk(&raw, dir.path(), "sparse", 0);
    let d = path_str(&disk);
    let before = folder_hashes(disk.parent().unwrap());
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let m = path_str(&mnt);
    let err = vm_error(&[d, "3", m]);
    assert!(err.contains("extended partition"), "{err}");
    let err = vm_error(&[d, "9", m]);
    assert!(
        err.contains("no partition 9 (partitions: 1, 2, 5)"),
        "{err}"
    );
    let err = vm_error(&[d, "0", m]);
    assert!(err.contains("not a number from 1 up"), "{err}");
    // The FAT partition mounts where the kernel has vfat, else mount's reason is given.
    let vfat = std::fs::read_to_string("/proc/filesystems")
        .unwrap()
        .lines()
        .any(|l| l.split_whitespace().last() == Some("vfat"));
    if vfat {
        vm(&[d, "2", m]);
        assert_eq!(std::fs::read(mnt.join("README.TXT")).unwrap(), README);
        vm(&["-d", m]);
    } else {
        let err = vm_error(&[d, "2", m]);
        assert!(err.contains("mount of partition 2 failed"), "{err}");
    }
    assert_all_clean(&mnt);

    // A killed serving process: -L shows the mount as stale, -k cleans everything up.
    let part = PartMount::new(&disk, Some(1), &mnt, &[]);
    let listing = stdout_text(&vm(&["-L"]));
    let pid = listing
        .lines()
        .find(|l| l.contains(m) && l.contains("partition 1"))
        .and_then(|l| l.split_whitespace().last())
        .unwrap_or_else(|| panic!("mount not listed:\n{listing}"))
        .to_string();
    run("kill", &["-KILL", &pid]);
    let start = Instant::now();
    while !stdout_text(&vm(&["-L"])).contains("stale") {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "not shown as stale"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    vm(&["-k", d]);
    assert_all_clean(&mnt);
    drop(part);
    // -x unmounts partition mounts and -f mounts alike.
    let other = dir.path().join("other");
    let _p = PartMount::new(&disk, Some(5), &mnt, &["-r"]);
    let _f = FlatMount::new(&disk, &other, &["-r"]);
    vm(&["-x"]);
    assert_all_clean(&mnt);
    assert!(!is_mounted(&other));
    assert_eq!(folder_hashes(disk.parent().unwrap()), before);
    assert_eq!(stdout_text(&vm(&["-L"])).trim(), "No vdisk mounts");
}
