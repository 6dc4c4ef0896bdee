//! Names inside descriptors that point outside the disk's folder or at things that
//! are not disk files (see `vdisk::paths`):
//! - the strict policy refuses absolute extent names, `..`, symbolic links and block
//!   devices (AccessDenied), for read-only and read-write opens, changing no file;
//! - the default policy follows names (VMware does), but never opens a FIFO, socket,
//!   character device or folder as a disk file - a FIFO would block the open forever;
//! - the disk path handed to `open` is checked the same way.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use vdisk::{create, CreateOptions, DiskType, ErrorKind, OpenOptions};

const MIB: u64 = 1 << 20;

/// A flat extent of 1 MiB filled with 0x5a, at `path`.
fn flat_extent(path: &Path) {
    std::fs::write(path, vec![0x5au8; MIB as usize]).unwrap();
}

/// A monolithicFlat descriptor `d.vmdk` in `dir` whose extent name is `name`.
fn descriptor(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join("d.vmdk");
    std::fs::write(
        &p,
        format!(
            "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
             createType=\"monolithicFlat\"\n\n# Extent description\n\
             RW 2048 FLAT \"{name}\" 0\n\n# The Disk Data Base\n#DDB\n\n\
             ddb.adapterType = \"lsilogic\"\n"
        ),
    )
    .unwrap();
    p
}

fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            out.insert(e.path(), std::fs::read(e.path()).unwrap());
        }
    }
    out
}

/// Opens `path` with `opts` in a thread with a deadline (a FIFO must not hang us).
fn open_within(path: &Path, opts: OpenOptions) -> vdisk::Result<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    let p = path.to_path_buf();
    std::thread::spawn(move || {
        let r = opts.open(&p).and_then(|d| {
            let mut buf = vec![0u8; 4096];
            d.read_at(&mut buf, 0)?;
            Ok(buf)
        });
        let _ = tx.send(r);
    });
    rx.recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("opening {} hung", path.display()))
}

fn strict() -> [OpenOptions; 2] {
    [
        OpenOptions::new().strict_paths(true),
        OpenOptions::new().strict_paths(true).write(true),
    ]
}

/// Every strict open of `disk` fails with AccessDenied naming `needle`, changing no
/// file in `dir`; the default policy opens it and reads the extent's 0x5a bytes.
fn refused_only_when_strict(dir: &Path, disk: &Path, needle: &str, ctx: &str) {
    let before = files(dir);
    for o in strict() {
        let e = open_within(disk, o.clone()).expect_err(ctx);
        assert_eq!(e.kind(), ErrorKind::AccessDenied, "{ctx}: {o:?}: {e}");
        assert!(e.to_string().contains(needle), "{ctx}: {e}");
        assert_eq!(files(dir), before, "{ctx}: a refused open changed a file");
    }
    let data = open_within(disk, OpenOptions::new()).unwrap_or_else(|e| panic!("{ctx}: {e}"));
    assert!(data.iter().all(|&b| b == 0x5a), "{ctx}: wrong data");
}

#[test]
fn strict_policy_keeps_extents_in_the_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside-flat.vmdk");
    flat_extent(&outside);
    let dir = tmp.path().join("vm");
    std::fs::create_dir(&dir).unwrap();

    let disk = descriptor(&dir, outside.to_str().unwrap());
    refused_only_when_strict(&dir, &disk, "is absolute", "absolute extent name");

    let disk = descriptor(&dir, "../outside-flat.vmdk");
    refused_only_when_strict(&dir, &disk, "leaves the disk's folder", "`..` extent");

    std::os::unix::fs::symlink(&outside, dir.join("d-flat.vmdk")).unwrap();
    let disk = descriptor(&dir, "d-flat.vmdk");
    refused_only_when_strict(&dir, &disk, "symbolic link", "symlinked extent");

    std::os::unix::fs::symlink(tmp.path(), dir.join("up")).unwrap();
    let disk = descriptor(&dir, "up/outside-flat.vmdk");
    refused_only_when_strict(&dir, &disk, "symbolic link", "symlinked folder");

    // A plain extent in a subfolder of the disk's folder is fine under strict.
    std::fs::create_dir(dir.join("sub")).unwrap();
    flat_extent(&dir.join("sub/e-flat.vmdk"));
    let disk = descriptor(&dir, "sub/e-flat.vmdk");
    for o in strict() {
        let data = open_within(&disk, o).unwrap();
        assert!(data.iter().all(|&b| b == 0x5a));
    }
}

#[test]
fn special_files_are_never_disk_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let fifo = dir.join("f-flat.vmdk");
    let st = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::create_dir(dir.join("folder-flat.vmdk")).unwrap();
    for (name, needle) in [
        ("f-flat.vmdk", "a FIFO"),
        ("/dev/null", "a character device"),
        ("/dev/zero", "a character device"),
        ("folder-flat.vmdk", "a folder"),
    ] {
        let disk = descriptor(dir, name);
        let before = files(dir);
        for (o, is_strict) in [
            (OpenOptions::new(), false),
            (OpenOptions::new().write(true), false),
            (OpenOptions::new().strict_paths(true), true),
        ] {
            let e = open_within(&disk, o.clone()).expect_err(name);
            assert_eq!(e.kind(), ErrorKind::AccessDenied, "{name}: {o:?}: {e}");
            // Strict refuses absolute names before looking at what they name.
            let needle = if is_strict && name.starts_with('/') {
                "is absolute"
            } else {
                needle
            };
            assert!(e.to_string().contains(needle), "{name}: {e}");
            assert_eq!(files(dir), before, "{name}: a refused open changed a file");
        }
    }
    // The path handed to open is checked too.
    for (p, needle) in [(fifo.as_path(), "a FIFO"), (dir, "a folder")] {
        let e = open_within(p, OpenOptions::new()).expect_err("special top file");
        assert_eq!(e.kind(), ErrorKind::AccessDenied, "{e}");
        assert!(e.to_string().contains(needle), "{e}");
    }
}

/// A block device named by a descriptor is refused by the strict policy (raw device
/// mappings name them, so the default policy allows them).
#[test]
fn strict_policy_refuses_block_devices() {
    use std::os::unix::fs::FileTypeExt;
    let Some(dev) = std::fs::read_dir("/dev").ok().and_then(|rd| {
        rd.flatten()
            .map(|e| e.path())
            .find(|p| std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device()))
    }) else {
        eprintln!("no block device under /dev: nothing to check");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let name = dev.to_str().unwrap();
    let disk = descriptor(tmp.path(), name);
    // Absolute names are refused before the file type is looked at; a block device
    // reached by a plain name is refused for what it is.
    let e = open_within(&disk, OpenOptions::new().strict_paths(true)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AccessDenied, "{e}");
    let e = vdisk::paths::check_file_type(&dev, true).unwrap_err();
    assert!(e.to_string().contains("a block device"), "{e}");
    assert!(vdisk::paths::check_file_type(&dev, false).is_ok());
}

/// Sparse parents and children keep working under the strict policy when every name
/// is a plain name in the folder.
#[test]
fn strict_policy_opens_ordinary_disks() {
    let tmp = tempfile::tempdir().unwrap();
    for t in [
        DiskType::MonolithicSparse,
        DiskType::TwoGbMaxExtentSparse,
        DiskType::MonolithicFlat,
        DiskType::TwoGbMaxExtentFlat,
        DiskType::StreamOptimized,
    ] {
        let p = tmp.path().join(format!("{t:?}.vmdk"));
        create(&p, &CreateOptions::new(t, 4 * MIB)).unwrap();
        for o in strict() {
            let o = if t == DiskType::StreamOptimized {
                o.write(false)
            } else {
                o
            };
            let d = o.open(&p).unwrap_or_else(|e| panic!("{t:?}: {e}"));
            let mut buf = vec![1u8; 4096];
            d.read_at(&mut buf, 0).unwrap();
            assert!(buf.iter().all(|&b| b == 0));
        }
    }
}

/// The change-tracking sidecar is rewritten on every writable open: one replaced by
/// a symbolic link is refused instead of written through.
#[test]
fn tracking_sidecar_is_never_written_through_a_link() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("t.vmdk");
    create(&p, &CreateOptions::new(DiskType::MonolithicSparse, 4 * MIB)).unwrap();
    vdisk::cbt::enable(&p).unwrap();
    let sidecar = tmp.path().join("t-cbt.vdcbt");
    assert!(sidecar.is_file());
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    std::fs::remove_file(&sidecar).unwrap();
    std::os::unix::fs::symlink(&victim, &sidecar).unwrap();
    let e = OpenOptions::new().write(true).open(&p).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AccessDenied, "{e}");
    assert!(e.to_string().contains("not a regular file"), "{e}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
}

/// Check and repair never open a FIFO (the open would block forever).
#[test]
fn check_refuses_special_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let fifo = dir.join("f-flat.vmdk");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let disk = descriptor(dir, "f-flat.vmdk");
    for (p, repair) in [(&disk, false), (&disk, true), (&fifo, false)] {
        let (tx, rx) = mpsc::channel();
        let p2 = p.clone();
        std::thread::spawn(move || {
            let _ = tx.send(vdisk::ops::check::check(&p2, repair));
        });
        let r = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("check of {} hung", p.display()));
        let e = r.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AccessDenied, "{e}");
        assert!(e.to_string().contains("a FIFO"), "{e}");
    }
}
