//! Renaming and deleting disks: every file of every layout moves (or goes), the
//! renamed disk reads the same, and a disk in use is refused.

use std::path::Path;

use vdisk::ops::files::{rename, unlink};
use vdisk::{create, CreateOptions, Disk, DiskType, ErrorKind, OpenOptions};

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn make(dir: &Path, t: DiskType) -> std::path::PathBuf {
    let p = dir.join("old.vmdk");
    create(&p, &CreateOptions::new(t, 3 << 20)).unwrap();
    if t != DiskType::StreamOptimized {
        let d = OpenOptions::new().write(true).open(&p).unwrap();
        d.write_at(&[0x5a; 4096], 1 << 20).unwrap();
        d.close().unwrap();
    }
    p
}

fn content(p: &Path) -> Vec<u8> {
    let d = Disk::open(p).unwrap();
    let mut v = vec![0u8; d.capacity() as usize];
    d.read_at(&mut v, 0).unwrap();
    v
}

#[test]
fn rename_moves_every_file_and_keeps_the_content() {
    for t in [
        DiskType::MonolithicSparse,
        DiskType::TwoGbMaxExtentSparse,
        DiskType::MonolithicFlat,
        DiskType::TwoGbMaxExtentFlat,
        DiskType::Vmfs,
        DiskType::StreamOptimized,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let old = make(dir.path(), t);
        let before = content(&old);
        let new = dir.path().join("new name.vmdk");
        rename(&old, &new).unwrap();
        assert!(
            files(dir.path()).iter().all(|f| f.starts_with("new name")),
            "{t}: {:?}",
            files(dir.path())
        );
        assert_eq!(content(&new), before, "{t}");
        let d = Disk::open(&new).unwrap();
        for e in d.links()[0].extents() {
            let f = e
                .path
                .as_ref()
                .unwrap()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            assert!(f.starts_with("new name"), "{t}: extent {f}");
        }
    }
}

#[test]
fn rename_onto_an_existing_name_fails_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let old = make(dir.path(), DiskType::MonolithicFlat);
    std::fs::write(dir.path().join("new-flat.vmdk"), b"in the way").unwrap();
    let before = files(dir.path());
    let e = rename(&old, &dir.path().join("new.vmdk")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    assert_eq!(files(dir.path()), before);
    assert_eq!(content(&old)[1 << 20], 0x5a);
}

#[test]
fn unlink_deletes_every_file_and_refuses_a_disk_in_use() {
    for t in [
        DiskType::MonolithicSparse,
        DiskType::TwoGbMaxExtentSparse,
        DiskType::TwoGbMaxExtentFlat,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let p = make(dir.path(), t);
        let open = OpenOptions::new().write(true).open(&p).unwrap();
        assert_eq!(unlink(&p).unwrap_err().kind(), ErrorKind::Locked, "{t}");
        drop(open);
        unlink(&p).unwrap();
        assert!(files(dir.path()).is_empty(), "{t}: {:?}", files(dir.path()));
    }
}
