//! Descriptor rewrites: a descriptor file is replaced whole (a new file renamed over
//! it) and the writer keeps its lock across the swap; a process that waited for the
//! old file's lock never ends up holding a disk through it; leftovers of a killed
//! rewrite are cleared; a commit that keeps its child re-points it in steps that
//! each leave a chain that opens. (The kill points themselves are exercised in
//! `tests/tests/crash_kill.rs`.)

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vdisk::chain::PENDING_PARENT_CID_KEY;
use vdisk::ops::child::create_child;
use vdisk::ops::commit::{commit, CommitOptions};
use vdisk::storage::{FileStorage, LockMode};
use vdisk::{create, CreateOptions, Disk, DiskType, ErrorKind, OpenOptions};

const MIB: u64 = 1 << 20;

fn new_disk(dir: &Path, t: DiskType) -> PathBuf {
    let p = dir.join("disk.vmdk");
    create(&p, &CreateOptions::new(t, 8 * MIB)).unwrap();
    let d = OpenOptions::new().write(true).open(&p).unwrap();
    d.write_at(&[0x5a; 4096], MIB).unwrap();
    d.close().unwrap();
    p
}

fn inode(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().ino()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_descriptor_file_is_replaced_whole_and_stays_locked() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_disk(dir.path(), DiskType::TwoGbMaxExtentSparse);
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
    let before = names(dir.path());
    let old = inode(&p);
    let d = OpenOptions::new().write(true).open(&p).unwrap();
    d.set_metadata("vdisk.test", &"v".repeat(300)).unwrap();
    // Another file took the name (the old one was never written in place) ...
    assert_ne!(inode(&p), old);
    assert_eq!(names(dir.path()), before, "no temporary file is left");
    assert_eq!(
        std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
        0o640
    );
    // ... and the writer holds its lock: others are refused.
    for opts in [OpenOptions::new().write(true), OpenOptions::new()] {
        let e = opts.open(&p).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Locked, "{e}");
    }
    // A shorter text replaces a longer one exactly.
    d.set_metadata("vdisk.test", "short").unwrap();
    d.close().unwrap();
    let text = std::fs::read_to_string(&p).unwrap();
    assert!(text.contains("ddb.vdisk.test = \"short\""), "{text}");
    assert!(!text.contains("vvv"));
    assert_eq!(
        Disk::open(&p).unwrap().metadata("vdisk.test").unwrap(),
        "short"
    );
}

#[test]
fn a_symbolic_link_to_a_descriptor_stays_a_link() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_disk(dir.path(), DiskType::MonolithicFlat);
    let link = dir.path().join("alias.vmdk");
    std::os::unix::fs::symlink("disk.vmdk", &link).unwrap();
    let d = OpenOptions::new().write(true).open(&link).unwrap();
    d.set_metadata("vdisk.test", "1").unwrap();
    d.close().unwrap();
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(Disk::open(&p).unwrap().metadata("vdisk.test").unwrap(), "1");
}

/// The lock hand-over: a reader that opened the descriptor while a writer held it
/// waits for the lock of that (old) file. The writer's rewrite replaces the file and
/// lets the old one go: the waiting reader must notice that the name now belongs to
/// another file (which the writer holds) and be refused, not go on believing it
/// holds the disk.
#[test]
fn a_waiting_opener_never_holds_the_lock_of_a_replaced_descriptor() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_disk(dir.path(), DiskType::TwoGbMaxExtentSparse);
    for waiter_writes in [false, true] {
        let writer = OpenOptions::new().write(true).open(&p).unwrap();
        let q = p.clone();
        let waiter = std::thread::spawn(move || {
            let t0 = Instant::now();
            let r = FileStorage::open(
                &q,
                waiter_writes,
                if waiter_writes {
                    LockMode::Exclusive
                } else {
                    LockMode::Shared
                },
            );
            (r.map(drop), t0.elapsed())
        });
        // The waiter is now retrying the old file's lock.
        std::thread::sleep(Duration::from_millis(40));
        writer.set_metadata("vdisk.swap", "1").unwrap();
        // The writer keeps the disk past the waiter's patience.
        std::thread::sleep(vdisk::limits::LOCK_RETRY * 2);
        let (got, waited) = waiter.join().unwrap();
        let e = got.expect_err("the waiter took the lock of a replaced descriptor");
        assert_eq!(e.kind(), ErrorKind::Locked, "{e}");
        assert!(waited >= vdisk::limits::LOCK_RETRY, "{waited:?}");
        // The writer still excludes a second writer, and goes on working.
        let e = OpenOptions::new().write(true).open(&p).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Locked);
        writer.write_at(&[1; 512], 0).unwrap();
        writer.close().unwrap();
    }
    // A waiter whose writer closes in time gets the current file.
    let writer = OpenOptions::new().write(true).open(&p).unwrap();
    let q = p.clone();
    let waiter = std::thread::spawn(move || Disk::open(&q).map(|d| d.cid().unwrap()));
    std::thread::sleep(Duration::from_millis(40));
    writer.write_at(&[2; 512], 0).unwrap(); // a new CID: the descriptor is rewritten
    let cid = writer.cid().unwrap();
    writer.close().unwrap();
    assert_eq!(waiter.join().unwrap().unwrap(), cid);
}

#[test]
fn leftovers_of_a_killed_rewrite_are_cleared_and_a_live_one_is_respected() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_disk(dir.path(), DiskType::MonolithicFlat);
    let before = names(dir.path());
    let temp = vdisk::replace::temp_name(&p).unwrap();
    std::fs::write(&temp, b"half a descriptor").unwrap();
    let d = OpenOptions::new().write(true).open(&p).unwrap();
    d.set_metadata("vdisk.test", "1").unwrap();
    assert_eq!(names(dir.path()), before);
    // A temporary file another process is writing (it holds its lock).
    std::fs::write(&temp, b"being written").unwrap();
    let busy = std::fs::File::open(&temp).unwrap();
    busy.lock().unwrap();
    let e = d.set_metadata("vdisk.test", "2").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Locked, "{e}");
    assert_eq!(std::fs::read(&temp).unwrap(), b"being written");
    assert_eq!(d.metadata("vdisk.test").unwrap(), "1");
    drop(busy);
    d.set_metadata("vdisk.test", "3").unwrap();
    d.close().unwrap();
    assert_eq!(Disk::open(&p).unwrap().metadata("vdisk.test").unwrap(), "3");
}

#[test]
fn a_new_disk_appears_whole_under_its_name() {
    let dir = tempfile::tempdir().unwrap();
    for t in [DiskType::MonolithicSparse, DiskType::TwoGbMaxExtentFlat] {
        let p = dir.path().join(format!("{t}.vmdk"));
        create(&p, &CreateOptions::new(t, 4 * MIB)).unwrap();
        assert!(!names(dir.path()).iter().any(|n| n.starts_with('.')));
        // A taken name is refused before any file of the new disk is made.
        let before = names(dir.path());
        let e = create(
            &p,
            &CreateOptions::new(DiskType::TwoGbMaxExtentSparse, 4 * MIB),
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
        assert_eq!(names(dir.path()), before);
    }
}

/// The states a commit that keeps its child passes through between its two
/// descriptor rewrites: the child records the CID its parent is about to get; the
/// parent has it; the child's parentCID follows. Each opens; a commit run again
/// from each finishes.
#[test]
fn commit_keeping_the_child_leaves_a_chain_that_opens_between_its_rewrites() {
    let dir = tempfile::tempdir().unwrap();
    let base = new_disk(dir.path(), DiskType::MonolithicSparse);
    let top = dir.path().join("disk-000001.vmdk");
    create_child(&base, &top, DiskType::MonolithicSparse).unwrap();
    let d = OpenOptions::new().write(true).open(&top).unwrap();
    d.write_at(&[7; 8192], 2 * MIB).unwrap();
    d.close().unwrap();
    let read = |p: &Path| {
        let d = Disk::open(p).unwrap();
        let mut b = vec![0u8; 4 * MIB as usize];
        d.read_at(&mut b, 0).unwrap();
        b
    };
    let content = read(&top);
    let set = |p: &Path, f: &dyn Fn(&mut vdisk::descriptor::Descriptor)| {
        let d = OpenOptions::new()
            .write(true)
            .single_link(true)
            .open(p)
            .unwrap();
        let l = &d.links()[0];
        let mut desc = l.descriptor().unwrap();
        f(&mut desc);
        l.save_descriptor(&desc).unwrap();
        drop(desc);
        d.close().unwrap();
    };
    let base_cid = Disk::open(&base).unwrap().cid().unwrap();
    // After the first rewrite: the child records the coming CID.
    set(&top, &|d| d.set_ddb(PENDING_PARENT_CID_KEY, "12345678"));
    assert_eq!(read(&top), content);
    // After the second: the parent has it, the child's parentCID is still the old.
    set(&base, &|d| d.set_cid(0x1234_5678));
    assert_eq!(read(&top), content, "the pending CID is accepted");
    // Without the record that is a CID mismatch.
    set(&top, &|d| {
        d.remove_ddb(PENDING_PARENT_CID_KEY);
    });
    assert_eq!(Disk::open(&top).unwrap_err().kind(), ErrorKind::CidMismatch);
    set(&top, &|d| d.set_ddb(PENDING_PARENT_CID_KEY, "12345678"));
    // Running the commit again finishes: the record goes, the chain opens as usual.
    let opts = CommitOptions {
        keep_child: true,
        ..CommitOptions::default()
    };
    let stats = commit(&top, &opts, &mut |_, _| true).unwrap();
    assert_ne!(stats.cid, base_cid);
    let child = Disk::open(&top).unwrap();
    assert!(child.metadata("vdisk.pendingParentCID").is_err());
    assert_eq!(
        child.links()[1].descriptor().unwrap().cid(),
        Some(stats.cid)
    );
    drop(child);
    assert_eq!(read(&top), content);
    assert_eq!(read(&base), content);
}
