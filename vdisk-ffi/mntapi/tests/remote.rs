//! libvixMntapi on a remote connection (root): a disk with an MBR and two ext4
//! partitions (sfdisk, mkfs.ext4 -d) served by the `vdisk-nbd` program in
//! `--persistent` mode; libvixDiskLib.so connects with `serverName` set (the `nbd`
//! transport), `VixMntapi_OpenDisks` lists the volumes of the export and
//! `VixMntapi_MountVolume` mounts them: the files read back identical through
//! `symbolicLink`, writes are visible while mounted and leave the served disk's
//! files unchanged (non-persistent, the default), `OpenDiskSet` takes a read-write
//! remote disk handle, a read-only set refuses read-write mounts, and with
//! `vdisk.mntapi.remoteWrites = persistent` a file written reaches the disk
//! (qemu-img convert + debugfs after the server stopped).
//!
//! libvixDiskLib.so is the copy cargo builds for this test, loaded with dlopen as a
//! C client has it.

use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::ptr::{null, null_mut};
use std::sync::{Mutex, MutexGuard, OnceLock};

use disklib::types::VixDiskLibConnectParams;
use vdisk_interop::{
    assert_files_unchanged, assert_same_bytes, folder_hashes, path_str, pattern, qemu_raw_to,
    require_tool_from, run, stderr_text, vdiskmanager, NbdServer, MIB,
};
use vixMntapi::api_lib::{VixMntapi_Exit, VixMntapi_Init};
use vixMntapi::api_set::*;
use vixMntapi::api_volume::*;
use vixMntapi::types::*;

const VIX_OK: VixError = 0;
const VIX_E_MNTAPI_VOLUME_NOT_WRITABLE: VixError = 24322;
const FLAG_READ_ONLY: u32 = 4;
const SECTOR: u64 = 512;
/// Partition 1 (24 MiB) and 2 (16 MiB) of the disk.
const P1: (u64, u64) = (2048 * SECTOR, 49152 * SECTOR);
const P2: (u64, u64) = (51200 * SECTOR, 32768 * SECTOR);
/// The export: a VDDK-style path, as `VixDiskLib_Open` takes it.
const EXPORT: &str = "[datastore1] vm/vm.vmdk";

type InitExFn = unsafe extern "C" fn(
    u32,
    u32,
    *mut c_void,
    *mut c_void,
    *mut c_void,
    *const c_char,
    *const c_char,
) -> VixError;
type ConnectExFn = unsafe extern "C" fn(
    *const VixDiskLibConnectParams,
    Bool,
    *const c_char,
    *const c_char,
    *mut VixDiskLibConnection,
) -> VixError;
type DisconnectFn = unsafe extern "C" fn(VixDiskLibConnection) -> VixError;
type OpenFn = unsafe extern "C" fn(
    VixDiskLibConnection,
    *const c_char,
    u32,
    *mut VixDiskLibHandle,
) -> VixError;
type CloseFn = unsafe extern "C" fn(VixDiskLibHandle) -> VixError;

struct DiskLib {
    connect_ex: ConnectExFn,
    disconnect: DisconnectFn,
    open: OpenFn,
    close: CloseFn,
}

/// Loads libvixDiskLib.so (once) from cargo's output folder and initialises it.
fn disklib() -> &'static DiskLib {
    static LIB: OnceLock<DiskLib> = OnceLock::new();
    LIB.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable");
        let so = exe.parent().expect("deps folder").join("libvixDiskLib.so");
        assert!(so.exists(), "{} is missing", so.display());
        let name = CString::new(so.to_str().expect("UTF-8 path")).unwrap();
        // SAFETY: loading our own libvixDiskLib (its constructors are Rust's, safe).
        let h = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        assert!(!h.is_null(), "dlopen {}", so.display());
        let sym = |n: &CStr| {
            // SAFETY: a live handle and a NUL-terminated name.
            let p = unsafe { libc::dlsym(h, n.as_ptr()) };
            assert!(!p.is_null(), "{n:?} missing");
            p
        };
        // SAFETY: each symbol is the vdisk-ffi export of the named C type.
        let lib = unsafe {
            DiskLib {
                connect_ex: std::mem::transmute::<*mut c_void, ConnectExFn>(sym(
                    c"VixDiskLib_ConnectEx",
                )),
                disconnect: std::mem::transmute::<*mut c_void, DisconnectFn>(sym(
                    c"VixDiskLib_Disconnect",
                )),
                open: std::mem::transmute::<*mut c_void, OpenFn>(sym(c"VixDiskLib_Open")),
                close: std::mem::transmute::<*mut c_void, CloseFn>(sym(c"VixDiskLib_Close")),
            }
        };
        // SAFETY: as above.
        let init =
            unsafe { std::mem::transmute::<*mut c_void, InitExFn>(sym(c"VixDiskLib_InitEx")) };
        // SAFETY: NULL callbacks and strings are allowed.
        let rc = unsafe { init(8, 0, null_mut(), null_mut(), null_mut(), null(), null()) };
        assert_eq!(rc, VIX_OK);
        lib
    })
}

/// A remote connection to `server` (`unix:PATH` or an NBD URI) with the `nbd`
/// transport.
fn connect(server: &str, read_only: bool) -> VixDiskLibConnection {
    let server = CString::new(server).unwrap();
    let modes = CString::new("nbd").unwrap();
    // SAFETY: all-zero is a valid (empty) parameter struct.
    let mut params: VixDiskLibConnectParams = unsafe { std::mem::zeroed() };
    params.serverName = server.as_ptr() as *mut c_char;
    let mut c: VixDiskLibConnection = null_mut();
    // SAFETY: a parameter struct whose string outlives the call, a valid out pointer.
    let rc = unsafe {
        (disklib().connect_ex)(
            &params,
            Bool::from(read_only),
            null(),
            modes.as_ptr(),
            &mut c,
        )
    };
    assert_eq!(rc, VIX_OK, "ConnectEx {server:?}");
    c
}

fn disconnect(c: VixDiskLibConnection) {
    // SAFETY: a live connection.
    assert_eq!(unsafe { (disklib().disconnect)(c) }, VIX_OK);
}

/// Only one test at a time: the libraries' state is global.
static SERIAL: Mutex<()> = Mutex::new(());

/// VixMntapi between Init (with a configuration file: a private tmpDirectory and
/// the `extra` lines) and Exit.
struct Session {
    _dir: tempfile::TempDir,
    tmp: PathBuf,
}

impl Session {
    fn start(extra: &str) -> Session {
        disklib();
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("tmp");
        std::fs::create_dir(&tmp).unwrap();
        let cfg = dir.path().join("vddk.cfg");
        std::fs::write(
            &cfg,
            format!(
                "tmpDirectory = \"{}\"\nvixMntapi.cfg.LogLevel = 0\n{extra}",
                tmp.display()
            ),
        )
        .unwrap();
        let cfg = CString::new(cfg.to_str().unwrap()).unwrap();
        // SAFETY: NULL callbacks; NUL-terminated strings.
        let rc = unsafe {
            VixMntapi_Init(
                1,
                0,
                null_mut(),
                null_mut(),
                null_mut(),
                null(),
                cfg.as_ptr(),
            )
        };
        assert_eq!(rc, VIX_OK);
        Session { _dir: dir, tmp }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        VixMntapi_Exit();
    }
}

fn open_disks(conn: VixDiskLibConnection, name: &str, flags: u32) -> VixDiskSetHandle {
    let name = CString::new(name).unwrap();
    let mut names = [name.as_ptr()];
    let mut set: VixDiskSetHandle = null_mut();
    // SAFETY: one valid name; a valid out pointer.
    let rc = unsafe { VixMntapi_OpenDisks(conn, names.as_mut_ptr(), 1, flags, &mut set) };
    assert_eq!(rc, VIX_OK, "OpenDisks");
    set
}

fn set_flags(set: VixDiskSetHandle) -> (u32, PathBuf) {
    let mut info: *mut VixDiskSetInfo = null_mut();
    // SAFETY: a valid out pointer.
    assert_eq!(unsafe { VixMntapi_GetDiskSetInfo(set, &mut info) }, VIX_OK);
    // SAFETY: a struct from GetDiskSetInfo, read then freed once.
    unsafe {
        let out = (
            (*info).openFlags,
            PathBuf::from(CStr::from_ptr((*info).mountPath).to_str().unwrap()),
        );
        VixMntapi_FreeDiskSetInfo(info);
        out
    }
}

fn volume_handles(set: VixDiskSetHandle) -> Vec<VixVolumeHandle> {
    let mut n = 0usize;
    let mut arr: *mut VixVolumeHandle = null_mut();
    // SAFETY: valid out pointers.
    let rc = unsafe { VixMntapi_GetVolumeHandles(set, &mut n, &mut arr) };
    assert_eq!(rc, VIX_OK);
    // SAFETY: the library returned `n` handles in `arr`.
    let v = unsafe { std::slice::from_raw_parts(arr, n) }.to_vec();
    // SAFETY: from GetVolumeHandles, freed once.
    unsafe { VixMntapi_FreeVolumeHandles(arr) };
    v
}

/// (type, symbolicLink) of a volume.
fn volume_info(v: VixVolumeHandle) -> (u32, Option<PathBuf>) {
    let mut info: *mut VixVolumeInfo = null_mut();
    // SAFETY: a valid out pointer.
    assert_eq!(unsafe { VixMntapi_GetVolumeInfo(v, &mut info) }, VIX_OK);
    // SAFETY: a struct from GetVolumeInfo, read then freed once.
    unsafe {
        let i = &*info;
        let link = (!i.symbolicLink.is_null())
            .then(|| PathBuf::from(CStr::from_ptr(i.symbolicLink).to_str().unwrap()));
        let out = (i.r#type, link);
        VixMntapi_FreeVolumeInfo(info);
        out
    }
}

/// Mounts volume `v` and returns where.
fn mount(v: VixVolumeHandle, read_only: bool) -> PathBuf {
    assert_eq!(
        VixMntapi_MountVolume(v, Bool::from(read_only)),
        VIX_OK,
        "MountVolume"
    );
    volume_info(v)
        .1
        .expect("a mounted volume has a symbolicLink")
}

fn dismount(v: VixVolumeHandle) {
    assert_eq!(VixMntapi_DismountVolume(v, 0), VIX_OK, "DismountVolume");
}

// ---------------------------------------------------------------------------------
// The disk

fn guest_files() -> BTreeMap<&'static str, Vec<u8>> {
    BTreeMap::from([
        ("hello.txt", b"hello from the remote guest\n".to_vec()),
        ("data.bin", pattern(21, 2_000_000)),
        (
            "etc/os-release",
            b"NAME=\"Remote Linux\"\nVERSION_ID=\"1.2\"\n".to_vec(),
        ),
    ])
}

fn assert_guest_files(dir: &Path, what: &str) {
    for (name, data) in guest_files() {
        let got = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{what}: {name}: {e}"));
        assert_same_bytes(&format!("{what}: {name}"), &got, &data);
    }
    assert!(!dir.join("new.bin").exists(), "{what}: new.bin is there");
}

fn sfdisk(image: &Path, script: &str) {
    let mut child = Command::new(require_tool_from("sfdisk", "fdisk"))
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

/// `dir/served/vm.vmdk`: 64 MiB, an MBR with two ext4 partitions holding
/// [`guest_files`].
fn make_disk(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    for (name, data) in guest_files() {
        let p = src.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
    let raw = dir.join("disk.raw");
    File::create(&raw).unwrap().set_len(64 * MIB).unwrap();
    sfdisk(
        &raw,
        "label: dos\nstart=2048, size=49152, type=83\nstart=51200, size=32768, type=83\n",
    );
    for (i, part) in [P1, P2].into_iter().enumerate() {
        let img = dir.join(format!("p{i}.img"));
        File::create(&img).unwrap().set_len(part.1).unwrap();
        run(
            require_tool_from("mkfs.ext4", "e2fsprogs"),
            &["-q", "-F", "-d", path_str(&src), path_str(&img)],
        );
        let data = std::fs::read(&img).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &data, part.0).unwrap();
    }
    let folder = dir.join("served");
    std::fs::create_dir_all(&folder).unwrap();
    let vmdk = folder.join("vm.vmdk");
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

fn setup() -> MutexGuard<'static, ()> {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "the remote mount tests of libvixMntapi need root (FUSE, loop mounts)"
    );
    assert!(Path::new("/dev/fuse").exists(), "no /dev/fuse");
    require_tool_from("fusermount3", "fuse3");
    guard
}

/// Whether anything is mounted on `dir`.
fn is_mounted(dir: &Path) -> bool {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines()
        .any(|l| l.split(' ').nth(4) == Some(path_str(dir)))
}

#[test]
fn volumes_of_a_remote_disk_mount_read_back_and_leave_the_served_files_unchanged() {
    let _guard = setup();
    let dir = tempfile::tempdir().unwrap();
    let disk = make_disk(dir.path());
    let folder = disk.parent().unwrap().to_path_buf();
    let before = folder_hashes(&folder);
    let server = NbdServer::start(&[
        "--persistent",
        "--export",
        &format!("{EXPORT}={}", path_str(&disk)),
    ]);
    let server_name = format!("unix:{}", server.socket.display());
    let new = pattern(22, 1_000_000);
    {
        let s = Session::start("");
        let conn = connect(&server_name, false);

        // OpenDisks: the export's two volumes; a read-write mount takes writes that
        // are seen while mounted and never reach the server.
        let set = open_disks(conn, EXPORT, 0);
        let (flags, mount_path) = set_flags(set);
        assert_eq!(flags, 0);
        assert!(mount_path.starts_with(&s.tmp), "{}", mount_path.display());
        let vols = volume_handles(set);
        assert_eq!(vols.len(), 2);
        assert_eq!(volume_info(vols[0]).0, 1, "VIXMNTAPI_BASIC_PARTITION");
        let link = mount(vols[0], false);
        assert!(link.starts_with(&mount_path), "{}", link.display());
        assert_guest_files(&link, "volume 1, read-write");
        let fuse_source = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(" - fuse.vdisk "))
            .filter_map(|l| l.split(" - fuse.vdisk ").nth(1))
            .map(|rest| rest.split(' ').next().unwrap_or("").to_string())
            .find(|src| src.contains(&server.socket.display().to_string()));
        assert!(
            fuse_source
                .as_deref()
                .is_some_and(|s| s.starts_with("nbd+unix:///%5Bdatastore1%5D%20vm/vm.vmdk?socket=")),
            "the FUSE mount under the volume: {fuse_source:?}"
        );
        std::fs::write(link.join("new.bin"), &new).unwrap();
        std::fs::remove_file(link.join("hello.txt")).unwrap();
        std::fs::write(link.join("data.bin"), b"changed\n").unwrap();
        run("sync", &[] as &[&str]);
        std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
        assert_same_bytes(
            "new.bin",
            &std::fs::read(link.join("new.bin")).unwrap(),
            &new,
        );
        assert_eq!(std::fs::read(link.join("data.bin")).unwrap(), b"changed\n");
        let link2 = mount(vols[1], true);
        assert_guest_files(&link2, "volume 2, read-only");
        assert!(std::fs::write(link2.join("x"), b"x").is_err());
        dismount(vols[0]);
        dismount(vols[1]);
        assert!(!is_mounted(&link) && !is_mounted(&link2));
        assert_eq!(VixMntapi_CloseDiskSet(set), VIX_OK);
        assert_files_unchanged(&folder, &before, "after a non-persistent read-write mount");

        // A read-only set refuses read-write mounts.
        let set = open_disks(conn, EXPORT, FLAG_READ_ONLY);
        assert_eq!(set_flags(set).0, FLAG_READ_ONLY);
        let vols = volume_handles(set);
        assert_eq!(
            VixMntapi_MountVolume(vols[0], 0),
            VIX_E_MNTAPI_VOLUME_NOT_WRITABLE
        );
        let link = mount(vols[0], true);
        assert_guest_files(&link, "volume 1 of a read-only set");
        assert_eq!(VixMntapi_CloseDiskSet(set), VIX_OK);
        assert!(!is_mounted(&link), "CloseDiskSet dismounts");

        // OpenDiskSet from a read-write remote disk handle: the changes above are
        // gone; a mount may write (non-persistent).
        let name = CString::new(EXPORT).unwrap();
        let mut h: VixDiskLibHandle = null_mut();
        // SAFETY: a live connection, a NUL-terminated name, a valid out pointer.
        let rc = unsafe { (disklib().open)(conn, name.as_ptr(), 0, &mut h) };
        assert_eq!(rc, VIX_OK);
        let mut handles = [h];
        let mut set: VixDiskSetHandle = null_mut();
        // SAFETY: one valid handle; a valid out pointer.
        let rc = unsafe { VixMntapi_OpenDiskSet(handles.as_mut_ptr(), 1, 0, &mut set) };
        assert_eq!(rc, VIX_OK, "OpenDiskSet of a read-write remote handle");
        assert_eq!(set_flags(set).0, 0);
        let vols = volume_handles(set);
        let link = mount(vols[0], false);
        assert_guest_files(&link, "volume 1 through OpenDiskSet");
        std::fs::write(link.join("other.bin"), &new).unwrap();
        assert_eq!(VixMntapi_CloseDiskSet(set), VIX_OK);
        // SAFETY: a live handle, closed once.
        assert_eq!(unsafe { (disklib().close)(h) }, VIX_OK);
        disconnect(conn);
        drop(s);
        assert_files_unchanged(&folder, &before, "after OpenDiskSet");
    }

    // vdisk.mntapi.remoteWrites = persistent: the file written reaches the disk.
    {
        let _s = Session::start("vdisk.mntapi.remoteWrites = \"persistent\"\n");
        let conn = connect(&server_name, false);
        let set = open_disks(conn, EXPORT, 0);
        let vols = volume_handles(set);
        let link = mount(vols[1], false);
        std::fs::write(link.join("kept.bin"), &new).unwrap();
        dismount(vols[1]);
        assert_eq!(VixMntapi_CloseDiskSet(set), VIX_OK);
        disconnect(conn);
    }
    assert_eq!(server.stop().code(), Some(0));
    assert_ne!(
        folder_hashes(&folder),
        before,
        "a persistent mount changed nothing"
    );
    let raw = dir.path().join("back.raw");
    qemu_raw_to(&disk, &raw);
    let all = std::fs::read(&raw).unwrap();
    let img = dir.path().join("back-p2.img");
    std::fs::write(&img, &all[P2.0 as usize..(P2.0 + P2.1) as usize]).unwrap();
    let out = dir.path().join("kept.out");
    run(
        require_tool_from("debugfs", "e2fsprogs"),
        &[
            "-R",
            &format!("dump /kept.bin {}", path_str(&out)),
            path_str(&img),
        ],
    );
    assert_same_bytes(
        "kept.bin (qemu-img convert + debugfs)",
        &std::fs::read(&out).expect("kept.bin is not in the disk"),
        &new,
    );
    run(
        require_tool_from("e2fsck", "e2fsprogs"),
        &["-fn", path_str(&img)],
    );
    // Partition 1 kept its files: the non-persistent writes never reached it.
    let img1 = dir.path().join("back-p1.img");
    std::fs::write(&img1, &all[P1.0 as usize..(P1.0 + P1.1) as usize]).unwrap();
    let hello = dir.path().join("hello.out");
    run(
        require_tool_from("debugfs", "e2fsprogs"),
        &[
            "-R",
            &format!("dump /hello.txt {}", path_str(&hello)),
            path_str(&img1),
        ],
    );
    assert_eq!(std::fs::read(&hello).unwrap(), guest_files()["hello.txt"]);
}
