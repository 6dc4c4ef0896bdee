//! The mount library in-process: `mount`, the files it serves, `unmount` and drop,
//! in each mode. Needs root and FUSE (`/dev/fuse`, `fusermount3` from the fuse3
//! package); the command-line tool is tested in `tests/tests/mount_interop.rs`.

use std::fs::File;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;

use vdisk::{create, CreateOptions, DiskType};
use vdisk_mount::mountinfo::{vdisk_mount_at, FS_TYPE};
use vdisk_mount::{mount, Mode, MountError, MountOptions};

const MIB: u64 = 1 << 20;

fn check_environment() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "these tests need /dev/fuse (the fuse kernel module)"
    );
    assert!(
        vdisk_mount::fusermount3().is_some(),
        "these tests need fusermount3: apt-get install fuse3"
    );
}

/// A 16 MiB monolithicSparse disk with an MBR partition at 1 MiB (8 MiB long) and
/// known data in it.
fn disk(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("disk.vmdk");
    create(
        &path,
        &CreateOptions::new(DiskType::MonolithicSparse, 16 * MIB),
    )
    .unwrap();
    let d = vdisk::OpenOptions::new().write(true).open(&path).unwrap();
    let mut mbr = [0u8; 512];
    mbr[446 + 4] = 0x83;
    mbr[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
    mbr[446 + 12..446 + 16].copy_from_slice(&16384u32.to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    d.write_at(&mbr, 0).unwrap();
    d.write_at(b"partition data", MIB).unwrap();
    d.close().unwrap();
    path
}

fn sha(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[test]
fn non_persistent_mount_serves_flat_and_partitions_and_changes_nothing() {
    check_environment();
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path());
    let before = sha(&path);
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let m = mount(&path, &mnt, &MountOptions::default()).unwrap();
    let entry = vdisk_mount_at(&mnt).unwrap().expect("listed in mountinfo");
    assert_eq!(entry.fs_type, FS_TYPE);
    assert_eq!(Path::new(&entry.source), path.canonicalize().unwrap());
    let names: Vec<&str> = m.files().iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["flat", "p1"]);
    assert!(m.warnings().is_empty());

    let flat = m.mountpoint().join("flat");
    let p1 = m.mountpoint().join("p1");
    assert_eq!(std::fs::metadata(&flat).unwrap().len(), 16 * MIB);
    assert_eq!(std::fs::metadata(&p1).unwrap().len(), 8 * MIB);
    assert_eq!(
        std::fs::metadata(&p1).unwrap().permissions().mode() & 0o777,
        0o644
    );
    let mut buf = [0u8; 14];
    File::open(&p1).unwrap().read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"partition data");
    // A large write through a partition file, read back through flat.
    let data: Vec<u8> = (0..3 * MIB as usize).map(|i| (i * 7 % 251) as u8).collect();
    let f = std::fs::OpenOptions::new().write(true).open(&p1).unwrap();
    f.write_all_at(&data, 4096 + 1).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let mut back = vec![0u8; data.len()];
    File::open(&flat)
        .unwrap()
        .read_exact_at(&mut back, MIB + 4097)
        .unwrap();
    assert!(back == data, "data written through p1 differs through flat");
    m.unmount().unwrap();
    assert!(vdisk_mount_at(&mnt).unwrap().is_none());
    assert!(
        sha(&path) == before,
        "a non-persistent mount changed the disk"
    );
}

#[test]
fn persistent_and_read_only_mounts() {
    check_environment();
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path());
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let opts = MountOptions {
        mode: Mode::Persistent,
        ..Default::default()
    };
    let m = mount(&path, &mnt, &opts).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.mountpoint().join("flat"))
        .unwrap();
    f.write_all_at(b"persistent", 10 * MIB).unwrap();
    drop(f);
    // Dropping the mount unmounts it and closes the disk.
    drop(m);
    assert!(vdisk_mount_at(&mnt).unwrap().is_none());
    let d = vdisk::Disk::open(&path).unwrap();
    let mut buf = [0u8; 10];
    d.read_at(&mut buf, 10 * MIB).unwrap();
    assert_eq!(&buf, b"persistent");
    drop(d);

    let opts = MountOptions {
        mode: Mode::ReadOnly,
        ..Default::default()
    };
    let m = mount(&path, &mnt, &opts).unwrap();
    let flat = m.mountpoint().join("flat");
    assert_eq!(
        std::fs::metadata(&flat).unwrap().permissions().mode() & 0o777,
        0o444
    );
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(&flat)
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(30), "EROFS expected: {err}");
    m.unmount().unwrap();
}

#[test]
fn mount_errors_name_what_is_wrong() {
    check_environment();
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path());
    let missing = dir.path().join("nowhere");
    let e = mount(&path, &missing, &MountOptions::default()).unwrap_err();
    assert!(matches!(e, MountError::Mountpoint { .. }), "{e}");
    assert!(e.to_string().ends_with("nowhere: does not exist"), "{e}");
    let e = mount(&path, &path, &MountOptions::default()).unwrap_err();
    assert!(e.to_string().ends_with("is not a directory"), "{e}");
    let e = mount(
        &dir.path().join("absent.vmdk"),
        dir.path(),
        &MountOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(e, MountError::Open { .. }), "{e}");
    assert!(e.to_string().contains("absent.vmdk"), "{e}");
}
