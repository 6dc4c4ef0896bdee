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

/// The extent files of the disk at `p` (not the descriptor).
fn extent_files(p: &Path) -> Vec<std::path::PathBuf> {
    let d = Disk::open(p).unwrap();
    d.links()[0]
        .extents()
        .iter()
        .filter_map(|e| e.path.clone())
        .filter(|e| e != p)
        .collect()
}

/// Renames every `old` in the extent lines of the descriptor at `p` to `new`
/// (the text written whole, as the rename writes it).
fn rename_lines(p: &Path, new_prefix: &str) {
    let text = std::fs::read_to_string(p).unwrap();
    std::fs::write(p, text.replace("\"old-", &format!("\"{new_prefix}"))).unwrap();
}

/// The states an interrupted rename of a disk with extent files leaves, made by
/// hand (links made; the old descriptor naming the new links; the descriptor
/// renamed; some old names removed): in each exactly one descriptor opens and reads
/// the disk, and the rename run again finishes. (Before, the first of them made a
/// retry fail with AlreadyExists, and the rename went through a state where both
/// descriptors named the same, hard-linked, extent files.)
#[test]
fn an_interrupted_rename_finishes_when_run_again() {
    let cases = [
        (DiskType::TwoGbMaxExtentSparse, 3 << 20),
        (DiskType::MonolithicFlat, 3 << 20),
        (DiskType::TwoGbMaxExtentFlat, 3 << 20),
        // Two extent files, so that a retry can find only some old names left.
        (DiskType::TwoGbMaxExtentSparse, 2100 << 20),
    ];
    for (t, capacity) in cases {
        for stage in 1..=4 {
            let ctx = format!("{t} of {capacity} bytes, interrupted after step {stage}");
            let dir = tempfile::tempdir().unwrap();
            let old = dir.path().join("old.vmdk");
            create(&old, &CreateOptions::new(t, capacity)).unwrap();
            let d = OpenOptions::new().write(true).open(&old).unwrap();
            d.write_at(&[0x5a; 4096], 1 << 20).unwrap();
            d.write_at(&[0xa5; 4096], capacity - 4096).unwrap();
            d.close().unwrap();
            let probe = |p: &Path| {
                let d = Disk::open(p)?;
                let mut b = vec![0u8; 8192];
                d.read_at(&mut b[..4096], 1 << 20)?;
                d.read_at(&mut b[4096..], capacity - 4096)?;
                Ok::<_, vdisk::Error>(b)
            };
            let before = probe(&old).unwrap();
            let new = dir.path().join("new.vmdk");
            let extents = extent_files(&old);
            for e in &extents {
                let name = e.file_name().unwrap().to_str().unwrap();
                std::fs::hard_link(e, dir.path().join(name.replacen("old", "new", 1))).unwrap();
            }
            if stage >= 2 {
                rename_lines(&old, "new-");
            }
            if stage >= 3 {
                std::fs::rename(&old, &new).unwrap();
            }
            if stage >= 4 {
                if extents.len() < 2 {
                    continue;
                }
                std::fs::remove_file(&extents[0]).unwrap();
            }
            let opens: Vec<bool> = [&old, &new].iter().map(|p| probe(p).is_ok()).collect();
            assert_eq!(opens.iter().filter(|&&o| o).count(), 1, "{ctx}: {opens:?}");
            rename(&old, &new).unwrap_or_else(|e| panic!("{ctx}: {e}"));
            assert!(
                files(dir.path()).iter().all(|f| f.starts_with("new")),
                "{ctx}: {:?}",
                files(dir.path())
            );
            assert_eq!(probe(&new).unwrap(), before, "{ctx}");
            // Nothing left to finish: the source is reported missing.
            let e = rename(&old, &new).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::FileNotFound, "{ctx}: {e}");
        }
    }
}

#[test]
fn rename_into_another_folder_is_restartable_too() {
    let root = tempfile::tempdir().unwrap();
    let (a, b) = (root.path().join("a"), root.path().join("b"));
    std::fs::create_dir(&a).unwrap();
    std::fs::create_dir(&b).unwrap();
    // Uninterrupted.
    let old = make(&a, DiskType::TwoGbMaxExtentSparse);
    let before = content(&old);
    rename(&old, &b.join("new.vmdk")).unwrap();
    assert!(files(&a).is_empty(), "{:?}", files(&a));
    assert_eq!(content(&b.join("new.vmdk")), before);
    let text = std::fs::read_to_string(b.join("new.vmdk")).unwrap();
    assert!(text.contains("\"new-s001.vmdk\""), "{text}");
    // Interrupted after the move: the descriptor names the new files by absolute
    // names, the old names are still links.
    let old = make(&a, DiskType::TwoGbMaxExtentSparse);
    let new = b.join("other.vmdk");
    for e in extent_files(&old) {
        let name = e.file_name().unwrap().to_str().unwrap();
        std::fs::hard_link(&e, b.join(name.replacen("old", "other", 1))).unwrap();
    }
    let abs = format!("{}/other-", b.canonicalize().unwrap().display());
    rename_lines(&old, &abs);
    std::fs::rename(&old, &new).unwrap();
    assert_eq!(content(&new), before);
    rename(&old, &new).unwrap();
    assert!(files(&a).is_empty(), "{:?}", files(&a));
    let text = std::fs::read_to_string(&new).unwrap();
    assert!(text.contains("\"other-s001.vmdk\""), "{text}");
    assert_eq!(content(&new), before);
}

#[test]
fn an_interrupted_monolithic_rename_finishes_and_unrelated_disks_are_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let old = make(dir.path(), DiskType::MonolithicSparse);
    let before = content(&old);
    let new = dir.path().join("new.vmdk");
    // Interrupted after the embedded extent line got the new name.
    let d = OpenOptions::new().write(true).open(&old).unwrap();
    {
        let l = &d.links()[0];
        let mut desc = l.descriptor().unwrap();
        let mut lines = desc.extents();
        lines[0].file = Some("new.vmdk".into());
        desc.set_extents(&lines);
        l.save_descriptor(&desc).unwrap();
    }
    d.close().unwrap();
    rename(&old, &new).unwrap();
    assert_eq!(files(dir.path()), ["new.vmdk"]);
    assert_eq!(content(&new), before);
    let d = Disk::open(&new).unwrap();
    let line = d.links()[0].descriptor().unwrap().extents()[0].file.clone();
    assert_eq!(line.as_deref(), Some("new.vmdk"));
    drop(d);
    // A missing source and an unrelated disk at the destination: nothing to finish.
    let other = make(dir.path(), DiskType::TwoGbMaxExtentSparse);
    let snapshot: Vec<(String, Vec<u8>)> = files(dir.path())
        .into_iter()
        .map(|f| (f.clone(), std::fs::read(dir.path().join(&f)).unwrap()))
        .collect();
    let e = rename(&dir.path().join("gone.vmdk"), &other).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FileNotFound, "{e}");
    let e = rename(&new, &other).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    for (f, bytes) in snapshot {
        assert_eq!(std::fs::read(dir.path().join(&f)).unwrap(), bytes, "{f}");
    }
}
