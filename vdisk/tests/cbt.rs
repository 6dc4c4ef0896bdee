//! Changed-block tracking: change IDs, changed areas, and incremental backups that
//! restore byte-identical disks across sessions, snapshots and consolidations; and
//! the cases where old change IDs must be refused (unclean shutdown, untracked
//! writes, tracking re-enabled).

mod common;

use std::path::{Path, PathBuf};

use common::{assert_same, Rng};
use vdisk::cbt;
use vdisk::ops::child::create_child;
use vdisk::ops::commit::{commit, CommitOptions};
use vdisk::{create, CreateOptions, Disk, DiskType, ErrorKind, OpenOptions};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 24 * MIB;

fn new_disk(dir: &Path, name: &str, t: DiskType) -> PathBuf {
    let p = dir.join(name);
    create(&p, &CreateOptions::new(t, SIZE)).unwrap();
    p
}

fn read_all(path: &Path) -> Vec<u8> {
    let d = Disk::open(path).unwrap();
    let mut buf = vec![0u8; d.capacity() as usize];
    d.read_at(&mut buf, 0).unwrap();
    buf
}

/// Random writes (a few hundred bytes to 200 KiB each) into `path`, mirrored into
/// `model`; returns the ranges written.
fn random_writes(path: &Path, model: &mut [u8], rng: &mut Rng, n: usize) -> Vec<(u64, u64)> {
    let d = OpenOptions::new().write(true).open(path).unwrap();
    let mut written = Vec::new();
    for _ in 0..n {
        let len = rng.range(300, 200_000);
        let off = rng.below(SIZE - len);
        let data = rng.bytes(len as usize);
        d.write_at(&data, off).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
        written.push((off, len));
    }
    d.close().unwrap();
    written
}

/// Applies the areas `since` reports on the disk at `path` to `image`; returns the
/// bytes copied.
fn apply_changes(path: &Path, since: &str, image: &mut [u8]) -> u64 {
    let d = Disk::open(path).unwrap();
    let areas = d.changed_areas(since, 0, d.capacity()).unwrap();
    let mut copied = 0;
    let mut last_end = 0;
    for (off, len) in areas {
        assert!(off >= last_end && len > 0, "areas not sorted and merged");
        last_end = off + len;
        d.read_at(&mut image[off as usize..(off + len) as usize], off)
            .unwrap();
        copied += len;
    }
    copied
}

fn covers(areas: &[(u64, u64)], written: &[(u64, u64)]) -> bool {
    written.iter().all(|&(o, l)| {
        let mut pos = o;
        for &(a, al) in areas {
            if a <= pos && pos < a + al {
                pos = (a + al).min(o + l);
                if pos >= o + l {
                    return true;
                }
            }
        }
        pos >= o + l
    })
}

#[test]
fn change_ids_report_exactly_the_later_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_disk(dir.path(), "d.vmdk", DiskType::MonolithicSparse);
    let first = cbt::enable(&p).unwrap();
    assert_eq!(
        cbt::enable(&p).unwrap(),
        first,
        "enabling twice keeps the history"
    );
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = Rng(7);
    let w1 = random_writes(&p, &mut model, &mut rng, 20);
    let d = Disk::open(&p).unwrap();
    let id1 = d.change_id().unwrap();
    let since_first = d.changed_areas(&first, 0, SIZE).unwrap();
    assert!(covers(&since_first, &w1));
    assert!(d.changed_areas(&id1, 0, SIZE).unwrap().is_empty());
    // Clipping to a range.
    let part = d.changed_areas(&first, MIB, 2 * MIB).unwrap();
    assert!(part.iter().all(|&(o, l)| o >= MIB && o + l <= 3 * MIB));
    drop(d);
    // A change ID taken on a disk open for writing: writes after it are changes.
    let w = OpenOptions::new().write(true).open(&p).unwrap();
    w.write_at(&[1; 1000], 5 * MIB).unwrap();
    let mid = w.change_id().unwrap();
    w.write_at(&[2; 1000], 9 * MIB).unwrap();
    w.close().unwrap();
    let d = Disk::open(&p).unwrap();
    let after_mid = d.changed_areas(&mid, 0, SIZE).unwrap();
    assert_eq!(after_mid, vec![(9 * MIB, 4096)]);
    let after_1 = d.changed_areas(&id1, 0, SIZE).unwrap();
    assert_eq!(after_1, vec![(5 * MIB, 4096), (9 * MIB, 4096)]);
    // "*" is the allocated data.
    let all = d.changed_areas("*", 0, SIZE).unwrap();
    assert!(covers(&all, &w1));
    let e = d.changed_areas("junk", 0, SIZE).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    let newer = format!("{}/999", id1.split('/').next().unwrap());
    assert_eq!(
        d.changed_areas(&newer, 0, SIZE).unwrap_err().kind(),
        ErrorKind::ChangeIdRefused
    );
}

#[test]
fn incremental_backups_across_snapshots_and_commits_restore_identical_disks() {
    for (seed, t) in [
        (1, DiskType::MonolithicSparse),
        (2, DiskType::TwoGbMaxExtentSparse),
        (3, DiskType::MonolithicFlat),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let base = new_disk(dir.path(), "vm.vmdk", t);
        cbt::enable(&base).unwrap();
        let mut rng = Rng(seed);
        let mut model = vec![0u8; SIZE as usize];
        random_writes(&base, &mut model, &mut rng, 30);
        // Full backup of a snapshot: the base is frozen, the guest writes to a child.
        let child = dir.path().join("vm-000001.vmdk");
        create_child(&base, &child, DiskType::MonolithicSparse).unwrap();
        let mut backup = vec![0u8; SIZE as usize];
        apply_changes(&base, "*", &mut backup);
        assert_same(&backup, &model, 0, &format!("{t:?}: full backup"));
        let mut last = Disk::open(&base).unwrap().change_id().unwrap();
        for round in 0..4 {
            let written = random_writes(&child, &mut model, &mut rng, 10);
            // Consolidate the child into the base, then snapshot again for the backup.
            commit(&child, &CommitOptions::default(), &mut |_, _| true).unwrap();
            assert!(!child.exists());
            create_child(&base, &child, DiskType::MonolithicSparse).unwrap();
            let d = Disk::open(&base).unwrap();
            let areas = d.changed_areas(&last, 0, SIZE).unwrap();
            assert!(
                covers(&areas, &written),
                "{t:?} round {round}: a write was missed"
            );
            drop(d);
            let copied = apply_changes(&base, &last, &mut backup);
            let written_bytes: u64 = written.iter().map(|w| w.1).sum();
            assert!(
                copied <= written_bytes + written.len() as u64 * 2 * 4096,
                "{t:?} round {round}: copied {copied} for {written_bytes} written"
            );
            assert_same(&backup, &model, 0, &format!("{t:?}: incremental {round}"));
            assert_same(
                &read_all(&child),
                &model,
                0,
                &format!("{t:?}: child {round}"),
            );
            last = Disk::open(&base).unwrap().change_id().unwrap();
        }
        // The child inherited the history: changes since the last backup are its writes.
        let written = random_writes(&child, &mut model, &mut rng, 5);
        let d = Disk::open(&child).unwrap();
        assert!(covers(&d.changed_areas(&last, 0, SIZE).unwrap(), &written));
    }
}

#[test]
fn unclean_shutdown_and_untracked_writes_refuse_old_change_ids() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_disk(dir.path(), "d.vmdk", DiskType::TwoGbMaxExtentSparse);
    cbt::enable(&p).unwrap();
    let id = Disk::open(&p).unwrap().change_id().unwrap();
    // A writer that dies leaves the tracker's file as it was while the disk was open
    // (marked open, without the stamps of its writes): kept here from a live writer.
    let sidecar = dir.path().join("d-cbt.vdcbt");
    let w = OpenOptions::new().write(true).open(&p).unwrap();
    w.write_at(&[3; 4096], MIB).unwrap();
    let while_open = std::fs::read(&sidecar).unwrap();
    w.close().unwrap();
    std::fs::write(&sidecar, &while_open).unwrap();
    let d = Disk::open(&p).unwrap();
    let e = d.changed_areas(&id, 0, SIZE).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ChangeIdRefused);
    assert!(e.to_string().contains("not closed cleanly"), "{e}");
    assert_eq!(
        d.change_id().unwrap_err().kind(),
        ErrorKind::ChangeIdRefused
    );
    drop(d);
    // The next writer restarts tracking: a new history, old IDs refused for good.
    let w = OpenOptions::new().write(true).open(&p).unwrap();
    w.close().unwrap();
    let d = Disk::open(&p).unwrap();
    let e = d.changed_areas(&id, 0, SIZE).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ChangeIdRefused);
    assert!(e.to_string().contains("another tracking history"), "{e}");
    let fresh = d.change_id().unwrap();
    assert_ne!(fresh.split('/').next(), id.split('/').next());
    assert!(d.changed_areas(&fresh, 0, SIZE).unwrap().is_empty());
    drop(d);
    // A program that does not track changes the disk: here, its CID in the descriptor.
    let text = std::fs::read_to_string(&p).unwrap();
    let cid_line = text.lines().find(|l| l.starts_with("CID=")).unwrap();
    std::fs::write(&p, text.replace(cid_line, "CID=12345678")).unwrap();
    let d = Disk::open(&p).unwrap();
    let e = d.changed_areas(&fresh, 0, SIZE).unwrap_err();
    assert!(e.to_string().contains("does not track changes"), "{e}");
    drop(d);
    // Disabling removes the sidecar and the key.
    assert!(sidecar.is_file());
    assert!(cbt::disable(&p).unwrap());
    assert!(!sidecar.exists());
    assert_eq!(
        Disk::open(&p).unwrap().change_id().unwrap_err().kind(),
        ErrorKind::NotSupported
    );
    assert!(!cbt::disable(&p).unwrap());
}

#[test]
fn damaged_sidecars_and_hostile_names_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_disk(dir.path(), "d.vmdk", DiskType::TwoGbMaxExtentSparse);
    let id = cbt::enable(&p).unwrap();
    let sidecar = dir.path().join("d-cbt.vdcbt");
    let mut bytes = std::fs::read(&sidecar).unwrap();
    bytes[4200] ^= 0xff;
    std::fs::write(&sidecar, &bytes).unwrap();
    let before = std::fs::read(&sidecar).unwrap();
    let d = Disk::open(&p).unwrap();
    let e = d.changed_areas(&id, 0, SIZE).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ChangeIdRefused);
    assert!(e.to_string().contains("checksum"), "{e}");
    drop(d);
    assert_eq!(
        std::fs::read(&sidecar).unwrap(),
        before,
        "a read-only open changed it"
    );
    // A descriptor naming a file outside the disk's folder is refused.
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, text.replace("\"d-cbt.vdcbt\"", "\"../../etc/passwd\"")).unwrap();
    let e = Disk::open(&p).unwrap_err();
    assert!(e.to_string().contains("change-tracking file name"), "{e}");
}

#[test]
fn stream_backup_chains_read_back_as_the_disk_was_at_each_backup() {
    use vdisk::ops::backup::write_backup;
    let dir = tempfile::tempdir().unwrap();
    let base = new_disk(dir.path(), "vm.vmdk", DiskType::MonolithicSparse);
    cbt::enable(&base).unwrap();
    let mut rng = Rng(11);
    let mut model = vec![0u8; SIZE as usize];
    random_writes(&base, &mut model, &mut rng, 25);
    let mut parent: Option<PathBuf> = None;
    let mut since = "*".to_string();
    let mut states = Vec::new();
    for round in 0..3 {
        let d = Disk::open(&base).unwrap();
        let areas = d.changed_areas(&since, 0, SIZE).unwrap();
        let dst = dir.path().join(format!("backup-{round}.vmdk"));
        let st = write_backup(&d, &areas, &dst, parent.as_deref(), &mut |_, _| true).unwrap();
        assert!(st.grains > 0);
        since = d.change_id().unwrap();
        drop(d);
        states.push((dst.clone(), model.clone()));
        parent = Some(dst);
        random_writes(&base, &mut model, &mut rng, 8);
    }
    for (i, (backup, want)) in states.iter().enumerate() {
        assert_same(&read_all(backup), want, 0, &format!("backup {i}"));
    }
    // A full backup leaves out grains of zeros; a wrong parent is refused clearly.
    let other = dir.path().join("small.vmdk");
    create(&other, &CreateOptions::new(DiskType::MonolithicSparse, MIB)).unwrap();
    let d = Disk::open(&base).unwrap();
    let e = write_backup(
        &d,
        &[(0, 512)],
        &dir.path().join("x.vmdk"),
        Some(&other),
        &mut |_, _| true,
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::CapacityMismatch);
    assert!(!dir.path().join("x.vmdk").exists());
}
