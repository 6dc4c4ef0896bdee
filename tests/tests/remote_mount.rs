//! `vdisk-mount` on NBD exports: a disk with a partition table made by sfdisk and an
//! ext4 file system made by mkfs.ext4 (holding known files), served by the
//! `vdisk-nbd` program in `--persistent` mode, then listed (`-p URI`), mounted flat
//! (`-f URI DIR`: `flat` and `p1` equal qemu's raw image of the served disk) and as a
//! volume (`URI N DIR`: the files read back identical), written through a default
//! (non-persistent) mount - the writes are visible while mounted and the served
//! disk's files keep their sha256 - and through a `--persistent` mount, whose file
//! qemu-img and debugfs then find in the disk. The URI forms: `nbd+unix:///E?socket=`
//! and, with TLS (`VDISK_NBD_TLS_CA`), `nbds://localhost:PORT/E`.
//!
//! Needs root (loop mounts), FUSE (`/dev/fuse`, `fusermount3`), sfdisk, mkfs.ext4,
//! debugfs, e2fsck, qemu-img and openssl (never skipped). These tests never use
//! `vdisk-mount -x`, and look only at their own mounts.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};

use vdisk_interop::{
    assert_files_unchanged, assert_same_bytes, folder_hashes, path_str, pattern, qemu_raw,
    qemu_raw_to, require_tool_from, run, run_unchecked, stderr_text, stdout_text, tempdir,
    vdisk_mount_bin, vdiskmanager, NbdServer, TlsPki, MIB,
};

const SECTOR: u64 = 512;
const DISK_SIZE: u64 = 64 * MIB;
/// Partition 1: sectors 2048.. (24 MiB), ext4 `ROOTFS`.
const P1: (u64, u64) = (2048 * SECTOR, 49152 * SECTOR);
/// Partition 2: right after it (16 MiB), ext4 `SECOND`.
const P2: (u64, u64) = (51200 * SECTOR, 32768 * SECTOR);
const HELLO: &[u8] = b"hello from a remote ext4\n";

static SERIAL: Mutex<()> = Mutex::new(());

/// Takes the lock of this file's tests and checks that mounting can work here.
fn setup() -> MutexGuard<'static, ()> {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    assert_eq!(
        stdout_text(&run("id", &["-u"])).trim(),
        "0",
        "the remote mount tests need root (FUSE with auto_unmount, loop mounts)"
    );
    assert!(Path::new("/dev/fuse").exists(), "no /dev/fuse");
    require_tool_from("fusermount3", "fuse3");
    guard
}

fn tool(name: &str, package: &str) -> PathBuf {
    require_tool_from(name, package)
}

/// `vdisk-mount args...` with the extra environment `env`, asserting success.
fn vm_env(env: &[(&str, &Path)], args: &[&str]) -> Output {
    let mut cmd = Command::new(vdisk_mount_bin());
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run vdisk-mount");
    assert!(
        out.status.success(),
        "vdisk-mount {args:?} failed: {}",
        stderr_text(&out)
    );
    out
}

fn vm(args: &[&str]) -> Output {
    vm_env(&[], args)
}

/// `vdisk-mount args...` that must fail with one line `vdisk-mount: error: ...`.
fn vm_error(env: &[(&str, &Path)], args: &[&str]) -> String {
    let mut cmd = Command::new(vdisk_mount_bin());
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run vdisk-mount");
    assert!(!out.status.success(), "vdisk-mount {args:?} succeeded");
    let err = stderr_text(&out);
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    assert!(err.starts_with("vdisk-mount: error: "), "{err}");
    err
}

/// Undoes mountinfo's octal escapes.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b.get(i + 1..i + 4) {
            Some(d) if b[i] == b'\\' && d.iter().all(u8::is_ascii_digit) => {
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

/// Every mount: (mount point, type, source, options).
fn mounts() -> Vec<(PathBuf, String, String, String)> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            Some((
                PathBuf::from(unescape(f[4])),
                f[sep + 1].to_string(),
                unescape(f[sep + 2]),
                f[5].to_string(),
            ))
        })
        .collect()
}

/// What is mounted on `dir` (the last mount): (type, source, options).
fn mount_at(dir: &Path) -> Option<(String, String, String)> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    mounts()
        .into_iter()
        .filter(|m| m.0 == dir)
        .map(|m| (m.1, m.2, m.3))
        .next_back()
}

/// The FUSE mounts (`fuse.vdisk`) whose source is `uri`.
fn fuse_mounts_of(uri: &str) -> usize {
    mounts()
        .iter()
        .filter(|m| m.1 == "fuse.vdisk" && m.2 == uri)
        .count()
}

/// A mount of `uri` made by a test, cleaned up with `vdisk-mount -k URI` if the test
/// fails before unmounting it.
struct Mounted {
    uri: String,
    dir: PathBuf,
    env: Vec<(&'static str, PathBuf)>,
}

impl Mounted {
    /// `vdisk-mount [extra...] URI [N] DIR` (a volume) or `[extra...] -f URI DIR`.
    fn new(
        uri: &str,
        n: Option<&str>,
        dir: &Path,
        extra: &[&str],
        env: &[(&'static str, &Path)],
    ) -> Mounted {
        std::fs::create_dir_all(dir).unwrap();
        let mut args: Vec<&str> = extra.to_vec();
        args.push(uri);
        args.extend(n);
        args.push(path_str(dir));
        let out = vm_env(env, &args);
        assert!(stdout_text(&out).is_empty(), "{}", stdout_text(&out));
        assert!(
            mount_at(dir).is_some(),
            "nothing mounted on {}",
            dir.display()
        );
        Mounted {
            uri: uri.to_string(),
            dir: dir.canonicalize().unwrap(),
            env: env.iter().map(|(k, v)| (*k, v.to_path_buf())).collect(),
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

impl Drop for Mounted {
    fn drop(&mut self) {
        if mount_at(&self.dir).is_some() {
            let mut cmd = Command::new(vdisk_mount_bin());
            cmd.arg("-k").arg(&self.uri);
            for (k, v) in &self.env {
                cmd.env(k, v);
            }
            let _ = cmd.status();
        }
    }
}

// ---------------------------------------------------------------------------------
// The disk

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
    assert!(out.status.success(), "sfdisk: {}", stderr_text(&out));
}

/// The files put in the ext4 file systems: name -> content.
fn guest_files() -> BTreeMap<&'static str, Vec<u8>> {
    BTreeMap::from([
        ("hello.txt", HELLO.to_vec()),
        ("data.bin", pattern(11, 1_500_000)),
        ("sub/deep.bin", pattern(12, 70_000)),
    ])
}

/// An ext4 image of `len` bytes labelled `label` holding [`guest_files`].
fn make_ext4(dir: &Path, name: &str, len: u64, label: &str) -> PathBuf {
    let src = dir.join(format!("{name}.src"));
    for (f, data) in guest_files() {
        let p = src.join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
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

/// A 64 MiB monolithicSparse VMDK `disk.vmdk` in its own folder `dir/served`, with
/// an MBR (or a GPT) holding two ext4 partitions ([`P1`], [`P2`]).
fn make_disk(dir: &Path, gpt: bool) -> PathBuf {
    let raw = dir.join("disk.raw");
    File::create(&raw).unwrap().set_len(DISK_SIZE).unwrap();
    let script = if gpt {
        "label: gpt\nstart=2048, size=49152, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n\
         start=51200, size=32768, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n"
    } else {
        "label: dos\nstart=2048, size=49152, type=83\nstart=51200, size=32768, type=83\n"
    };
    sfdisk(&raw, script);
    for (part, label) in [(P1, "ROOTFS"), (P2, "SECOND")] {
        let img = make_ext4(dir, label, part.1, label);
        let data = std::fs::read(&img).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &data, part.0).unwrap();
    }
    let folder = dir.join("served");
    std::fs::create_dir_all(&folder).unwrap();
    let vmdk = folder.join("disk.vmdk");
    vdiskmanager(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-t",
        "0",
        path_str(&raw),
        path_str(&vmdk),
    ]);
    vmdk
}

/// Asserts that `dir` holds exactly [`guest_files`] (and lost+found), identical.
fn assert_guest_files(dir: &Path, what: &str) {
    for (name, data) in guest_files() {
        let got = std::fs::read(dir.join(name))
            .unwrap_or_else(|e| panic!("{what}: {name} cannot be read: {e}"));
        assert_same_bytes(&format!("{what}: {name}"), &got, &data);
    }
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["data.bin", "hello.txt", "lost+found", "sub"],
        "{what}"
    );
}

/// The file `name` of partition `part` of the VMDK `disk`, as qemu-img and debugfs
/// read it (None if it is not there); e2fsck -fn must find the file system clean.
fn file_in_disk(disk: &Path, part: (u64, u64), name: &str, work: &Path) -> Option<Vec<u8>> {
    let raw = work.join("check.raw");
    qemu_raw_to(disk, &raw);
    let all = std::fs::read(&raw).unwrap();
    let img = work.join("check.img");
    std::fs::write(&img, &all[part.0 as usize..(part.0 + part.1) as usize]).unwrap();
    let fsck = run_unchecked(tool("e2fsck", "e2fsprogs"), &["-fn", path_str(&img)]);
    assert!(
        fsck.status.success(),
        "e2fsck -fn: {}{}",
        stdout_text(&fsck),
        stderr_text(&fsck)
    );
    let out = work.join("dumped");
    let _ = std::fs::remove_file(&out);
    run(
        tool("debugfs", "e2fsprogs"),
        &[
            "-R",
            &format!("dump /{name} {}", path_str(&out)),
            path_str(&img),
        ],
    );
    std::fs::read(&out).ok()
}

// ---------------------------------------------------------------------------------
// Tests

#[test]
fn remote_disk_lists_mounts_flat_and_volumes_and_non_persistent_writes_stay_local() {
    let _guard = setup();
    let dir = tempdir();
    let disk = make_disk(dir.path(), false);
    let folder = disk.parent().unwrap().to_path_buf();
    let expected = qemu_raw(&disk);
    let before = folder_hashes(&folder);
    let server = NbdServer::start(&[
        "--persistent",
        "--export",
        &format!("vm disk={}", path_str(&disk)),
    ]);
    let uri = server.uri("vm disk");
    assert!(uri.starts_with("nbd+unix:///vm%20disk?socket="), "{uri}");

    // -p
    let listing = stdout_text(&vm(&["-p", &uri]));
    let lines: Vec<&str> = listing.lines().collect();
    assert!(
        lines[0].starts_with(&format!(
            "Disk {uri}: 64.0 MiB (131072 sectors), MBR partition table"
        )),
        "{listing}"
    );
    let rows: Vec<Vec<&str>> = lines[2..]
        .iter()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        [
            ["1", "2048", "49152", "0x83", "ext4", "ROOTFS"],
            ["2", "51200", "32768", "0x83", "ext4", "SECOND"]
        ],
        "{listing}"
    );

    // -f: flat and the partitions equal qemu's raw image of the served disk.
    let flat_dir = dir.path().join("flat");
    let m = Mounted::new(&uri, None, &flat_dir, &["-f"], &[]);
    assert_eq!(
        mount_at(&flat_dir).unwrap().1,
        uri,
        "the mount's source is the URI"
    );
    let flat = std::fs::read(flat_dir.join("flat")).unwrap();
    assert_same_bytes("flat", &flat, &expected);
    for (name, (off, len)) in [("p1", P1), ("p2", P2)] {
        let got = std::fs::read(flat_dir.join(name)).unwrap();
        assert_same_bytes(name, &got, &expected[off as usize..(off + len) as usize]);
    }
    // Writes through flat are seen while mounted.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(flat_dir.join("flat"))
        .unwrap();
    let scribble = pattern(99, 100_000);
    std::os::unix::fs::FileExt::write_all_at(&f, &scribble, 62 * MIB + 777).unwrap();
    drop(f);
    let back = std::fs::read(flat_dir.join("flat")).unwrap();
    assert_same_bytes(
        "flat after a write",
        &back[(62 * MIB + 777) as usize..(62 * MIB + 777) as usize + scribble.len()],
        &scribble,
    );
    let listing = stdout_text(&vm(&["-L"]));
    assert!(
        listing.lines().any(|l| l.starts_with(&uri)
            && l.contains(" flat ")
            && l.contains(path_str(&flat_dir))
            && l.contains("non-persistent")),
        "{listing}"
    );
    m.unmount();
    assert_files_unchanged(
        &folder,
        &before,
        "after writes through a non-persistent -f mount",
    );

    // A volume (N omitted: partition 1), written through.
    let mnt = dir.path().join("mnt");
    let m = Mounted::new(&uri, None, &mnt, &[], &[]);
    let (fs_type, source, _) = mount_at(&mnt).unwrap();
    assert_eq!(fs_type, "ext4");
    assert!(source.starts_with("/dev/loop"), "{source}");
    assert_guest_files(&mnt, "partition 1 over NBD");
    let listing = stdout_text(&vm(&["-L"]));
    assert!(
        listing.lines().any(|l| l.starts_with(&uri)
            && l.contains("partition 1")
            && l.contains("non-persistent")),
        "{listing}"
    );
    let new = pattern(13, 2_000_000);
    std::fs::write(mnt.join("new.bin"), &new).unwrap();
    std::fs::remove_file(mnt.join("hello.txt")).unwrap();
    std::fs::write(mnt.join("data.bin"), b"overwritten\n").unwrap();
    run("sync", &[] as &[&str]);
    // Visible while mounted, from the kernel's cache and after dropping it.
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    assert_same_bytes(
        "new.bin",
        &std::fs::read(mnt.join("new.bin")).unwrap(),
        &new,
    );
    assert_eq!(
        std::fs::read(mnt.join("data.bin")).unwrap(),
        b"overwritten\n"
    );
    assert!(!mnt.join("hello.txt").exists());
    m.unmount();
    assert_files_unchanged(
        &folder,
        &before,
        "after writes through a non-persistent volume mount",
    );

    // Partition 2 by number, read-only, and a flat mount beside it: -k URI unmounts
    // both.
    let m = Mounted::new(&uri, Some("2"), &mnt, &["-r"], &[]);
    assert!(mount_at(&mnt).unwrap().2.split(',').any(|o| o == "ro"));
    assert_guest_files(&mnt, "partition 2 over NBD, read-only");
    assert!(
        std::fs::write(mnt.join("x"), b"x").is_err(),
        "a read-only mount took a write"
    );
    let flat_again = Mounted::new(&uri, None, &flat_dir, &["-f", "-r"], &[]);
    assert_eq!(fuse_mounts_of(&uri), 2);
    vm(&["-k", &uri]);
    assert!(mount_at(&mnt).is_none() && mount_at(&flat_dir).is_none());
    assert_eq!(fuse_mounts_of(&uri), 0);
    let err = vm_error(&[], &["-k", &uri]);
    assert!(err.contains("is not mounted"), "{err}");
    drop((m, flat_again));
    assert_files_unchanged(&folder, &before, "after read-only mounts");
    // The changes of the non-persistent mounts are gone.
    let m = Mounted::new(&uri, Some("1"), &mnt, &["-r"], &[]);
    assert_guest_files(&mnt, "partition 1 after the non-persistent mounts");
    m.unmount();

    // --persistent: the write reaches the served disk.
    let m = Mounted::new(&uri, Some("1"), &mnt, &["--persistent"], &[]);
    std::fs::write(mnt.join("kept.bin"), &new).unwrap();
    m.unmount();
    let m = Mounted::new(&uri, Some("1"), &mnt, &["-r"], &[]);
    assert_same_bytes(
        "kept.bin, mounted again",
        &std::fs::read(mnt.join("kept.bin")).unwrap(),
        &new,
    );
    m.unmount();
    assert_eq!(server.stop().code(), Some(0));
    assert_ne!(
        folder_hashes(&folder),
        before,
        "a persistent mount did not change the disk"
    );
    let kept = file_in_disk(&disk, P1, "kept.bin", dir.path())
        .expect("kept.bin is not in the disk after a persistent mount");
    assert_same_bytes("kept.bin read by qemu-img and debugfs", &kept, &new);
    assert_eq!(
        file_in_disk(&disk, P1, "hello.txt", dir.path()).as_deref(),
        Some(HELLO),
        "the non-persistent mount's deletion reached the disk"
    );
    run("qemu-img", &["check", path_str(&disk)]);
    assert!(
        !Path::new("/run/vdisk-mount")
            .read_dir()
            .map(|d| d
                .flatten()
                .any(|e| std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains(&uri))))
            .unwrap_or(false),
        "a volume record of the URI was left"
    );
}

/// A free TCP port of 127.0.0.1.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn tls_exports_mount_with_the_ca_of_vdisk_nbd_tls_ca() {
    let _guard = setup();
    let dir = tempdir();
    let disk = make_disk(dir.path(), true);
    let folder = disk.parent().unwrap().to_path_buf();
    let pki = TlsPki::new(dir.path());
    let ca = pki.file("ca-cert.pem");
    let expected = qemu_raw(&disk);
    let port = free_port();
    let mut args = pki.server_args(false);
    args.extend(["--persistent".to_string(), path_str(&disk).to_string()]);
    let server = NbdServer::start_tcp(port, &args);
    let before = folder_hashes(&folder);
    let uri = format!("nbds://localhost:{port}/disk.vmdk");
    let env: [(&'static str, &Path); 1] = [("VDISK_NBD_TLS_CA", &ca)];

    // Without the CA the server's certificate is not trusted; plaintext is refused.
    let err = vm_error(&[], &["-p", &uri]);
    assert!(err.contains("certificate") || err.contains("TLS"), "{err}");
    let plain = format!("nbd://127.0.0.1:{port}/disk.vmdk");
    let err = vm_error(&[], &["-p", &plain]);
    assert!(err.contains("TLS"), "{err}");

    let listing = stdout_text(&vm_env(&env, &["-p", &uri]));
    assert!(listing.contains("GPT partition table"), "{listing}");
    assert!(
        listing
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == [
                    "1",
                    "2048",
                    "49152",
                    "Linux",
                    "filesystem",
                    "ext4",
                    "ROOTFS"
                ]),
        "{listing}"
    );
    // A mount whose serving process cannot connect fails with the reason.
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let err = vm_error(&[], &[&uri, "1", path_str(&mnt)]);
    assert!(err.contains(&uri), "{err}");
    assert!(mount_at(&mnt).is_none());

    let m = Mounted::new(&uri, Some("2"), &mnt, &[], &env);
    assert_guest_files(&mnt, "partition 2 over TLS");
    std::fs::write(mnt.join("scratch.bin"), pattern(5, 300_000)).unwrap();
    run("sync", &[] as &[&str]);
    assert_eq!(
        std::fs::read(mnt.join("scratch.bin")).unwrap(),
        pattern(5, 300_000)
    );
    m.unmount();
    assert_files_unchanged(&folder, &before, "after a non-persistent mount over TLS");

    let flat_dir = dir.path().join("flat");
    let m = Mounted::new(&uri, None, &flat_dir, &["-f", "-r"], &env);
    assert_same_bytes(
        "flat over TLS",
        &std::fs::read(flat_dir.join("flat")).unwrap(),
        &expected,
    );
    m.unmount();
    drop(server);
    assert_eq!(folder_hashes(&folder), before);
}
