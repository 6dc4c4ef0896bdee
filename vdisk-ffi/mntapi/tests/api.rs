//! The C API of libvixMntapi, called from Rust, without mounting (the mounts need
//! root and are tested by tests/c/run.sh): the version check, handle validation,
//! connection and disk-handle checks through the real libvixDiskLib.so, volume
//! enumeration of MBR and GPT disks, the refusals that come before any mount.
//!
//! libvixDiskLib.so is the copy cargo builds for this test (a dev-dependency),
//! loaded with dlopen, as a C client has it loaded.

use std::ffi::{c_char, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::ptr::{null, null_mut};
use std::sync::{Mutex, MutexGuard, OnceLock};

use vixMntapi::api_lib::{VixMntapi_Exit, VixMntapi_Init};
use vixMntapi::api_set::*;
use vixMntapi::api_volume::*;
use vixMntapi::types::*;

const VIX_OK: VixError = 0;
const VIX_E_INVALID_ARG: VixError = 3;
const VIX_E_FILE_NOT_FOUND: VixError = 4;
const VIX_E_NOT_SUPPORTED: VixError = 6;
const VIX_E_DISK_NOINIT: VixError = 16001;
const VIX_E_DISK_INVALID_CONNECTION: VixError = 16054;
const VIX_E_MNTAPI_NO_ROOT: VixError = 24017;
const VIX_E_MNTAPI_INCOMPATIBLE_VERSION: VixError = 24300;
const VIX_E_MNTAPI_VOLUME_NOT_MOUNTED: VixError = 24304;
const VIX_E_MNTAPI_ITEM_NOT_FOUND: VixError = 24309;
const VIX_E_MNTAPI_VOLUME_NOT_WRITABLE: VixError = 24322;
const FLAG_SINGLE_LINK: u32 = 2;
const FLAG_READ_ONLY: u32 = 4;

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
    *const c_void,
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

/// The functions of the loaded libvixDiskLib.so that the tests use.
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
        assert!(
            so.exists(),
            "{} is missing (cargo builds it for this test)",
            so.display()
        );
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

/// A local connection (read-only if asked).
fn connect(read_only: bool) -> VixDiskLibConnection {
    let mut c: VixDiskLibConnection = null_mut();
    // SAFETY: NULL params (local), a valid out pointer.
    let rc =
        unsafe { (disklib().connect_ex)(null(), Bool::from(read_only), null(), null(), &mut c) };
    assert_eq!(rc, VIX_OK);
    assert!(!c.is_null());
    c
}

/// The tests share the library's global state: one at a time, each between Init
/// (with a configuration file naming a private tmpDirectory) and Exit.
struct Session {
    _lock: MutexGuard<'static, ()>,
    dir: tempfile::TempDir,
}

impl Session {
    fn start() -> Session {
        static LOCK: Mutex<()> = Mutex::new(());
        let lock = LOCK.lock().unwrap_or_else(|p| p.into_inner());
        disklib();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tmp")).unwrap();
        let cfg = dir.path().join("vddk.cfg");
        std::fs::write(
            &cfg,
            format!(
                "# test\ntmpDirectory = \"{}\"\nvixMntapi.cfg.LogLevel = 0\n",
                dir.path().join("tmp").display()
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
        Session { _lock: lock, dir }
    }

    fn tmp(&self) -> PathBuf {
        self.dir.path().join("tmp")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        VixMntapi_Exit();
    }
}

fn cstr(p: &Path) -> CString {
    CString::new(p.to_str().unwrap()).unwrap()
}

/// `VixMntapi_OpenDisks` of `names` through `conn`.
fn open_disks(
    conn: VixDiskLibConnection,
    names: &[&Path],
    flags: u32,
) -> (VixError, VixDiskSetHandle) {
    let owned: Vec<CString> = names.iter().map(|p| cstr(p)).collect();
    let mut ptrs: Vec<*const c_char> = owned.iter().map(|c| c.as_ptr()).collect();
    let mut set: VixDiskSetHandle = 0x10 as VixDiskSetHandle;
    // SAFETY: `ptrs` holds names.len() valid strings; a valid out pointer.
    let rc = unsafe { VixMntapi_OpenDisks(conn, ptrs.as_mut_ptr(), ptrs.len(), flags, &mut set) };
    if rc != VIX_OK {
        assert!(set.is_null(), "the out handle is NULL after a failure");
    }
    (rc, set)
}

fn volume_handles(set: VixDiskSetHandle) -> Vec<VixVolumeHandle> {
    let mut n = 99usize;
    let mut arr: *mut VixVolumeHandle = null_mut();
    // SAFETY: valid out pointers.
    let rc = unsafe { VixMntapi_GetVolumeHandles(set, &mut n, &mut arr) };
    assert_eq!(rc, VIX_OK);
    assert!(!arr.is_null());
    // SAFETY: the library returned `n` handles in `arr`.
    let v = unsafe { std::slice::from_raw_parts(arr, n) }.to_vec();
    // SAFETY: from GetVolumeHandles, freed once.
    unsafe { VixMntapi_FreeVolumeHandles(arr) };
    v
}

/// (type, isMounted, symbolicLink, numGuestMountPoints) of a volume.
fn volume_info(v: VixVolumeHandle) -> (u32, Bool, Option<String>, usize) {
    let mut info: *mut VixVolumeInfo = null_mut();
    // SAFETY: a valid out pointer.
    let rc = unsafe { VixMntapi_GetVolumeInfo(v, &mut info) };
    assert_eq!(rc, VIX_OK);
    // SAFETY: a struct from GetVolumeInfo, read then freed once.
    unsafe {
        let i = &*info;
        let link = (!i.symbolicLink.is_null()).then(|| {
            CStr::from_ptr(i.symbolicLink)
                .to_string_lossy()
                .into_owned()
        });
        let out = (i.r#type, i.isMounted, link, i.numGuestMountPoints);
        VixMntapi_FreeVolumeInfo(info);
        out
    }
}

/// A 64 MiB monolithic sparse disk holding `image` from byte 0.
fn make_disk(path: &Path, image: &[u8]) {
    vdisk::create(
        path,
        &vdisk::CreateOptions::new(vdisk::DiskType::MonolithicSparse, 64 << 20),
    )
    .unwrap();
    let d = vdisk::OpenOptions::new().write(true).open(path).unwrap();
    d.write_at(image, 0).unwrap();
    d.close().unwrap();
}

/// An ext4 superblock signature at byte `base` of `img`.
fn put_ext4(img: &mut [u8], base: usize) {
    let sb = base + 1024;
    img[sb + 56..sb + 58].copy_from_slice(&0xEF53u16.to_le_bytes());
    img[sb + 96..sb + 100].copy_from_slice(&0x40u32.to_le_bytes());
}

/// An MBR image: p1 ext4 (1-9 MiB), p2 swap (9-13 MiB), p3 empty (13-17 MiB).
fn mbr_image() -> Vec<u8> {
    let mut img = vec![0u8; 17 << 20];
    for (i, (ty, start, len)) in [
        (0x83u8, 2048u32, 16384u32),
        (0x82, 18432, 8192),
        (0x83, 26624, 8192),
    ]
    .into_iter()
    .enumerate()
    {
        let e = 446 + 16 * i;
        img[e + 4] = ty;
        img[e + 8..e + 12].copy_from_slice(&start.to_le_bytes());
        img[e + 12..e + 16].copy_from_slice(&len.to_le_bytes());
    }
    img[510] = 0x55;
    img[511] = 0xAA;
    put_ext4(&mut img, 2048 * 512);
    let swap = 18432 * 512;
    img[swap + 4086..swap + 4096].copy_from_slice(b"SWAPSPACE2");
    img
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A GPT image (primary header and entries only: the disk is 64 MiB, so the table
/// is read from LBA 1) with one Linux partition holding ext4 at 1 MiB.
fn gpt_image() -> Vec<u8> {
    let mut img = vec![0u8; 10 << 20];
    // Protective MBR.
    img[446 + 4] = 0xEE;
    img[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
    img[446 + 12..446 + 16].copy_from_slice(&u32::MAX.to_le_bytes());
    img[510] = 0x55;
    img[511] = 0xAA;
    // One entry at LBA 2: Linux filesystem type GUID, LBAs 2048..=18431.
    let mut entries = vec![0u8; 128 * 128];
    let linux: [u8; 16] = [
        0xAF, 0x3D, 0xC6, 0x0F, 0x83, 0x84, 0x72, 0x47, 0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47, 0x7D,
        0xE4,
    ];
    entries[..16].copy_from_slice(&linux);
    entries[16] = 1; // unique GUID, non-zero
    entries[32..40].copy_from_slice(&2048u64.to_le_bytes());
    entries[40..48].copy_from_slice(&18431u64.to_le_bytes());
    img[1024..1024 + entries.len()].copy_from_slice(&entries);
    let last = (64u64 << 20) / 512 - 1;
    let mut h = vec![0u8; 92];
    h[..8].copy_from_slice(b"EFI PART");
    h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
    h[12..16].copy_from_slice(&92u32.to_le_bytes());
    h[24..32].copy_from_slice(&1u64.to_le_bytes());
    h[32..40].copy_from_slice(&last.to_le_bytes());
    h[40..48].copy_from_slice(&34u64.to_le_bytes());
    h[48..56].copy_from_slice(&(last - 33).to_le_bytes());
    h[56] = 7; // disk GUID
    h[72..80].copy_from_slice(&2u64.to_le_bytes());
    h[80..84].copy_from_slice(&128u32.to_le_bytes());
    h[84..88].copy_from_slice(&128u32.to_le_bytes());
    h[88..92].copy_from_slice(&crc32(&entries).to_le_bytes());
    let c = crc32(&h);
    h[16..20].copy_from_slice(&c.to_le_bytes());
    img[512..512 + 92].copy_from_slice(&h);
    put_ext4(&mut img, 2048 * 512);
    img
}

fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn init_takes_version_1_0_only() {
    let _s = Session::start();
    for (major, minor) in [(2, 0), (1, 1), (0, 0), (8, 0)] {
        // SAFETY: NULL callbacks and strings.
        let rc = unsafe {
            VixMntapi_Init(
                major,
                minor,
                null_mut(),
                null_mut(),
                null_mut(),
                null(),
                null(),
            )
        };
        assert_eq!(rc, VIX_E_MNTAPI_INCOMPATIBLE_VERSION, "{major}.{minor}");
    }
    let missing = CString::new("/nonexistent/vddk.cfg").unwrap();
    // SAFETY: as above.
    let rc = unsafe {
        VixMntapi_Init(
            1,
            0,
            null_mut(),
            null_mut(),
            null_mut(),
            null(),
            missing.as_ptr(),
        )
    };
    assert_eq!(rc, VIX_E_FILE_NOT_FOUND);
}

#[test]
fn nothing_opens_before_init_or_after_exit() {
    let s = Session::start();
    VixMntapi_Exit();
    let disk = s.path("d.vmdk");
    make_disk(&disk, &mbr_image());
    let conn = connect(false);
    assert_eq!(open_disks(conn, &[&disk], 0).0, VIX_E_DISK_NOINIT);
    // SAFETY: a live connection.
    assert_eq!(unsafe { (disklib().disconnect)(conn) }, VIX_OK);
}

#[test]
fn bad_handles_are_errors_and_out_pointers_are_nulled() {
    let _s = Session::start();
    let made_up = [
        null_mut(),
        0x10 as *mut c_void,
        0x123450 as *mut c_void,
        7 as *mut c_void,
    ];
    for h in made_up {
        let mut info: *mut VixDiskSetInfo = 0x40 as *mut VixDiskSetInfo;
        // SAFETY: a valid out pointer; the handle is only looked up.
        let rc = unsafe { VixMntapi_GetDiskSetInfo(h.cast(), &mut info) };
        assert_eq!(rc, VIX_E_INVALID_ARG);
        assert!(info.is_null());
        let (mut n, mut arr) = (5usize, 0x40 as *mut VixVolumeHandle);
        // SAFETY: valid out pointers.
        let rc = unsafe { VixMntapi_GetVolumeHandles(h.cast(), &mut n, &mut arr) };
        assert_eq!(rc, VIX_E_INVALID_ARG);
        assert_eq!((n, arr), (0, null_mut()));
        let mut os: *mut VixOsInfo = 0x40 as *mut VixOsInfo;
        // SAFETY: a valid out pointer.
        let rc = unsafe { VixMntapi_GetOsInfo(h.cast(), &mut os) };
        assert_eq!(rc, VIX_E_INVALID_ARG);
        assert!(os.is_null());
        assert_eq!(VixMntapi_CloseDiskSet(h.cast()), VIX_E_INVALID_ARG);
        assert_eq!(VixMntapi_MountVolume(h.cast(), 1), VIX_E_INVALID_ARG);
        assert_eq!(VixMntapi_DismountVolume(h.cast(), 1), VIX_E_INVALID_ARG);
        let mut vi: *mut VixVolumeInfo = 0x40 as *mut VixVolumeInfo;
        // SAFETY: a valid out pointer.
        let rc = unsafe { VixMntapi_GetVolumeInfo(h.cast(), &mut vi) };
        assert_eq!(rc, VIX_E_INVALID_ARG);
        assert!(vi.is_null());
    }
    // NULL out pointers are errors too; the Free functions take NULL.
    // SAFETY: NULL out pointers are checked before use.
    unsafe {
        assert_eq!(
            VixMntapi_GetDiskSetInfo(null_mut(), null_mut()),
            VIX_E_INVALID_ARG
        );
        assert_eq!(
            VixMntapi_GetVolumeInfo(null_mut(), null_mut()),
            VIX_E_INVALID_ARG
        );
        VixMntapi_FreeDiskSetInfo(null_mut());
        VixMntapi_FreeVolumeInfo(null_mut());
        VixMntapi_FreeOsInfo(null_mut());
        VixMntapi_FreeVolumeHandles(null_mut());
    }
}

#[test]
fn open_disks_checks_its_arguments() {
    let s = Session::start();
    let disk = s.path("d.vmdk");
    make_disk(&disk, &mbr_image());
    let conn = connect(false);
    assert_eq!(
        open_disks(null_mut(), &[&disk], 0).0,
        VIX_E_DISK_INVALID_CONNECTION
    );
    assert_eq!(
        open_disks(0x7770 as VixDiskLibConnection, &[&disk], 0).0,
        VIX_E_DISK_INVALID_CONNECTION
    );
    assert_eq!(open_disks(conn, &[&disk, &disk], 0).0, VIX_E_NOT_SUPPORTED);
    assert_eq!(open_disks(conn, &[], 0).0, VIX_E_INVALID_ARG);
    assert_eq!(
        open_disks(conn, &[&disk], FLAG_SINGLE_LINK).0,
        VIX_E_NOT_SUPPORTED
    );
    assert_eq!(open_disks(conn, &[&disk], 0x10000).0, VIX_E_INVALID_ARG);
    assert_eq!(
        open_disks(conn, &[&s.path("missing.vmdk")], 0).0,
        VIX_E_FILE_NOT_FOUND
    );
    let name = cstr(&disk);
    let mut names = [name.as_ptr()];
    // SAFETY: NULL pointers are checked; `names` is valid.
    unsafe {
        assert_eq!(
            VixMntapi_OpenDisks(conn, names.as_mut_ptr(), 1, 0, null_mut()),
            VIX_E_INVALID_ARG
        );
        let mut set: VixDiskSetHandle = null_mut();
        assert_eq!(
            VixMntapi_OpenDisks(conn, null_mut(), 1, 0, &mut set),
            VIX_E_INVALID_ARG
        );
    }
    // A disconnected connection is stale.
    // SAFETY: a live connection.
    assert_eq!(unsafe { (disklib().disconnect)(conn) }, VIX_OK);
    assert_eq!(
        open_disks(conn, &[&disk], 0).0,
        VIX_E_DISK_INVALID_CONNECTION
    );
}

#[test]
fn mbr_volumes_are_listed_and_refusals_come_before_any_mount() {
    let s = Session::start();
    let disk = s.path("mbr.vmdk");
    make_disk(&disk, &mbr_image());
    let before = std::fs::read(&disk).unwrap();
    let conn = connect(false);
    let (rc, set) = open_disks(conn, &[&disk], FLAG_READ_ONLY);
    assert_eq!(rc, VIX_OK);

    let mut info: *mut VixDiskSetInfo = null_mut();
    // SAFETY: a valid out pointer; the struct is read, then freed once.
    let mount_path = unsafe {
        assert_eq!(VixMntapi_GetDiskSetInfo(set, &mut info), VIX_OK);
        assert_eq!((*info).openFlags, FLAG_READ_ONLY);
        let p = PathBuf::from(CStr::from_ptr((*info).mountPath).to_str().unwrap());
        VixMntapi_FreeDiskSetInfo(info);
        p
    };
    assert_eq!(mount_path.parent(), Some(s.tmp().as_path()));
    assert!(mount_path.is_dir());

    let vols = volume_handles(set);
    assert_eq!(vols.len(), 3, "ext4, swap and an empty partition");
    assert_eq!(volume_handles(set), vols, "the same handles every time");
    for &v in &vols {
        assert_eq!(volume_info(v), (VIXMNTAPI_BASIC_PARTITION, 0, None, 0));
    }
    // The swap area and the empty partition cannot be mounted; the ext4 volume
    // cannot be mounted read-write in a read-only set; nothing is mounted to dismount.
    assert_eq!(VixMntapi_MountVolume(vols[1], 1), VIX_E_NOT_SUPPORTED);
    assert_eq!(VixMntapi_MountVolume(vols[2], 1), VIX_E_NOT_SUPPORTED);
    assert_eq!(
        VixMntapi_MountVolume(vols[0], 0),
        VIX_E_MNTAPI_VOLUME_NOT_WRITABLE
    );
    assert_eq!(
        VixMntapi_DismountVolume(vols[0], 0),
        VIX_E_MNTAPI_VOLUME_NOT_MOUNTED
    );
    if !is_root() {
        assert_eq!(VixMntapi_MountVolume(vols[0], 1), VIX_E_MNTAPI_NO_ROOT);
    }
    // The fake ext4 holds no system (as root it is mounted to look, and fails).
    let mut os: *mut VixOsInfo = 0x40 as *mut VixOsInfo;
    // SAFETY: a valid out pointer.
    let rc = unsafe { VixMntapi_GetOsInfo(set, &mut os) };
    assert_eq!(rc, VIX_E_MNTAPI_ITEM_NOT_FOUND);
    assert!(os.is_null());
    assert_eq!(volume_info(vols[0]).1, 0, "nothing left mounted");

    // A set handle is not a volume handle and the other way round.
    assert_eq!(VixMntapi_MountVolume(set.cast(), 1), VIX_E_INVALID_ARG);
    assert_eq!(VixMntapi_CloseDiskSet(vols[0].cast()), VIX_E_INVALID_ARG);

    assert_eq!(VixMntapi_CloseDiskSet(set), VIX_OK);
    assert!(!mount_path.exists(), "the set's folder is removed");
    // Stale handles.
    assert_eq!(VixMntapi_CloseDiskSet(set), VIX_E_INVALID_ARG);
    assert_eq!(VixMntapi_MountVolume(vols[0], 1), VIX_E_INVALID_ARG);
    let mut vi: *mut VixVolumeInfo = null_mut();
    // SAFETY: a valid out pointer.
    let rc = unsafe { VixMntapi_GetVolumeInfo(vols[0], &mut vi) };
    assert_eq!(rc, VIX_E_INVALID_ARG);
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        before,
        "a read-only set changes nothing"
    );
    // SAFETY: a live connection.
    assert_eq!(unsafe { (disklib().disconnect)(conn) }, VIX_OK);
}

#[test]
fn gpt_volumes_and_read_only_connections() {
    let s = Session::start();
    let disk = s.path("gpt.vmdk");
    make_disk(&disk, &gpt_image());
    let conn = connect(true);
    // A read-only connection makes the set read-only whatever the flags say.
    let (rc, set) = open_disks(conn, &[&disk], 0);
    assert_eq!(rc, VIX_OK);
    let vols = volume_handles(set);
    assert_eq!(vols.len(), 1);
    assert_eq!(volume_info(vols[0]), (VIXMNTAPI_GPT_PARTITION, 0, None, 0));
    assert_eq!(
        VixMntapi_MountVolume(vols[0], 0),
        VIX_E_MNTAPI_VOLUME_NOT_WRITABLE
    );
    let mut info: *mut VixDiskSetInfo = null_mut();
    // SAFETY: a valid out pointer; freed once.
    unsafe {
        assert_eq!(VixMntapi_GetDiskSetInfo(set, &mut info), VIX_OK);
        assert_eq!((*info).openFlags, FLAG_READ_ONLY);
        VixMntapi_FreeDiskSetInfo(info);
    }
    // Exit closes what is still open: the handles go stale.
    VixMntapi_Exit();
    assert_eq!(VixMntapi_CloseDiskSet(set), VIX_E_INVALID_ARG);
    assert!(
        std::fs::read_dir(s.tmp()).unwrap().next().is_none(),
        "no folder left"
    );
    // SAFETY: a live connection.
    assert_eq!(unsafe { (disklib().disconnect)(conn) }, VIX_OK);
}

#[test]
fn a_blank_disk_has_no_volumes_but_an_array() {
    let s = Session::start();
    let disk = s.path("blank.vmdk");
    make_disk(&disk, &[0u8; 512]);
    let conn = connect(false);
    let (rc, set) = open_disks(conn, &[&disk], 0);
    assert_eq!(rc, VIX_OK);
    assert!(volume_handles(set).is_empty());
    let mut info: *mut VixDiskSetInfo = null_mut();
    // SAFETY: a valid out pointer; freed once.
    unsafe {
        assert_eq!(VixMntapi_GetDiskSetInfo(set, &mut info), VIX_OK);
        assert_eq!((*info).openFlags, 0);
        VixMntapi_FreeDiskSetInfo(info);
    }
    assert_eq!(VixMntapi_CloseDiskSet(set), VIX_OK);
    // SAFETY: a live connection.
    assert_eq!(unsafe { (disklib().disconnect)(conn) }, VIX_OK);
}

#[test]
fn open_disk_set_takes_read_only_disk_handles() {
    let s = Session::start();
    let disk = s.path("mbr.vmdk");
    make_disk(&disk, &mbr_image());
    let conn = connect(false);
    let name = cstr(&disk);
    let open = |flags: u32| {
        let mut h: VixDiskLibHandle = null_mut();
        // SAFETY: a live connection, a valid path and out pointer.
        let rc = unsafe { (disklib().open)(conn, name.as_ptr(), flags, &mut h) };
        assert_eq!(rc, VIX_OK);
        h
    };
    let set_of = |handles: &mut [VixDiskLibHandle], mode: u32| {
        let mut set: VixDiskSetHandle = 0x10 as VixDiskSetHandle;
        // SAFETY: `handles` is valid for its length; a valid out pointer.
        let rc =
            unsafe { VixMntapi_OpenDiskSet(handles.as_mut_ptr(), handles.len(), mode, &mut set) };
        if rc != VIX_OK {
            assert!(set.is_null());
        }
        (rc, set)
    };
    let ro = open(FLAG_READ_ONLY);
    let (rc, set) = set_of(&mut [ro], 0);
    assert_eq!(rc, VIX_OK);
    assert_eq!(volume_handles(set).len(), 3);
    let mut info: *mut VixDiskSetInfo = null_mut();
    // SAFETY: a valid out pointer; freed once.
    unsafe {
        assert_eq!(VixMntapi_GetDiskSetInfo(set, &mut info), VIX_OK);
        assert_eq!((*info).openFlags & FLAG_READ_ONLY, FLAG_READ_ONLY);
        VixMntapi_FreeDiskSetInfo(info);
    }
    assert_eq!(VixMntapi_CloseDiskSet(set), VIX_OK);
    assert_eq!(set_of(&mut [ro, ro], 0).0, VIX_E_NOT_SUPPORTED);
    assert_eq!(set_of(&mut [ro], 1).0, VIX_E_INVALID_ARG);
    assert_eq!(set_of(&mut [null_mut()], 0).0, VIX_E_INVALID_ARG);
    assert_eq!(
        set_of(&mut [0x5550 as VixDiskLibHandle], 0).0,
        VIX_E_INVALID_ARG
    );
    // SAFETY: an open handle, closed once.
    assert_eq!(unsafe { (disklib().close)(ro) }, VIX_OK);
    assert_eq!(
        set_of(&mut [ro], 0).0,
        VIX_E_INVALID_ARG,
        "a closed handle is stale"
    );
    let rw = open(0);
    assert_eq!(set_of(&mut [rw], 0).0, VIX_E_NOT_SUPPORTED);
    // SAFETY: an open handle, closed once.
    assert_eq!(unsafe { (disklib().close)(rw) }, VIX_OK);
    // SAFETY: a live connection.
    assert_eq!(unsafe { (disklib().disconnect)(conn) }, VIX_OK);
}

#[test]
fn folders_of_dead_processes_are_swept_when_empty() {
    let s = Session::start();
    let disk = s.path("blank.vmdk");
    make_disk(&disk, &[0u8; 512]);
    // Process IDs above Linux's pid_max (4194304) never run.
    let dead = s.tmp().join("vixmntapi-999999999-3");
    std::fs::create_dir_all(dead.join("p1")).unwrap();
    let busy = s.tmp().join("vixmntapi-999999998-1");
    std::fs::create_dir_all(busy.join("p1")).unwrap();
    std::fs::write(busy.join("p1/file"), "something mounted here").unwrap();
    let other = s.tmp().join("unrelated-1-1");
    std::fs::create_dir_all(&other).unwrap();
    let conn = connect(false);
    let (rc, set) = open_disks(conn, &[&disk], 0);
    assert_eq!(rc, VIX_OK);
    assert!(
        !dead.exists(),
        "an empty folder of a dead process is removed"
    );
    assert!(
        busy.join("p1/file").exists(),
        "a folder that is not empty stays"
    );
    assert!(other.exists(), "other folders are not touched");
    assert_eq!(VixMntapi_CloseDiskSet(set), VIX_OK);
    // SAFETY: a live connection.
    assert_eq!(unsafe { (disklib().disconnect)(conn) }, VIX_OK);
}
