//! Changed-block tracking with real peers: a write by qemu (which does not track)
//! makes old change IDs refused; 1% random writes to a 2 GiB disk are covered by
//! the changed areas with little else; incremental backups (streamOptimized
//! children) read identical in qemu and take a fraction of a full backup's time.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use vdisk::ops::backup::write_backup;
use vdisk::{cbt, create, CreateOptions, Disk, DiskType, ErrorKind, OpenOptions};
use vdisk_interop::{
    assert_qemu_identical, path_str, qemu_io_write, run, stderr_text, stdout_text, tempdir,
    vdiskmanager, vdiskmanager_bin, vdiskmanager_failing,
};

const MIB: u64 = 1 << 20;

fn status_json(disk: &Path) -> serde_json::Value {
    serde_json::from_str(&stdout_text(&vdiskmanager(&[
        "cbt",
        "status",
        "--json",
        path_str(disk),
    ])))
    .unwrap()
}

#[test]
fn a_qemu_write_refuses_old_change_ids_until_tracking_restarts() {
    let dir = tempdir();
    let disk = dir.path().join("d.vmdk");
    vdiskmanager(&["-c", "-s", "64MB", "-t", "0", "-q", path_str(&disk)]);
    let out = stdout_text(&vdiskmanager(&["cbt", "enable", path_str(&disk)]));
    let id = out.trim().rsplit(' ').next().unwrap().to_string();
    let st = status_json(&disk);
    assert_eq!(st["trusted"], true, "{st}");
    assert_eq!(st["change_id"], id.as_str());
    // Our writes are tracked.
    let d = OpenOptions::new().write(true).open(&disk).unwrap();
    d.write_at(&[7u8; 10_000], 3 * MIB + 100).unwrap();
    d.close().unwrap();
    let json: serde_json::Value = serde_json::from_str(&stdout_text(&vdiskmanager(&[
        "cbt",
        "changes",
        "--json",
        "--since",
        &id,
        path_str(&disk),
    ])))
    .unwrap();
    assert_eq!(json["areas"][0]["start"], 3 * MIB);
    assert_eq!(json["bytes"], 12 << 10);
    run("qemu-img", &["check", path_str(&disk)]);
    // qemu writes without tracking: the history cannot be trusted any more.
    qemu_io_write(&disk, &[(0x41, 10 * MIB, 4096)]);
    let out = vdiskmanager_failing(&["cbt", "changes", "--since", &id, path_str(&disk)]);
    let err = stderr_text(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("does not track changes"), "{err}");
    assert!(err.contains("full backup"), "{err}");
    let st = status_json(&disk);
    assert_eq!(st["trusted"], false, "{st}");
    // A full backup ("*") is still possible, and matches qemu's view.
    let d = Disk::open(&disk).unwrap();
    let all = d.changed_areas(cbt::ALL, 0, d.capacity()).unwrap();
    assert!(all.iter().any(|&(o, l)| o <= 10 * MIB && 10 * MIB < o + l));
    drop(d);
    // Our next open for writing starts a new history; the old ID stays refused.
    OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap()
        .close()
        .unwrap();
    let st = status_json(&disk);
    assert_eq!(st["trusted"], true, "{st}");
    assert!(
        st["note"].as_str().unwrap().contains("does not track"),
        "{st}"
    );
    let e = Disk::open(&disk)
        .unwrap()
        .changed_areas(&id, 0, 64 * MIB)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ChangeIdRefused);
    // qemu and vmdkinfo still read the tracked disk (the key is a DDB entry).
    run("qemu-img", &["check", path_str(&disk)]);
    run("vmdkinfo", &[path_str(&disk)]);
    vdiskmanager(&["cbt", "disable", path_str(&disk)]);
    assert!(!dir.path().join("d-cbt.vdcbt").exists());
}

/// `vdiskmanager args...` run in the folder `dir`, asserted to succeed.
fn vdiskmanager_in(dir: &Path, args: &[&str]) -> Output {
    let out = Command::new(vdiskmanager_bin())
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "vdiskmanager {args:?} in {}: {}",
        dir.display(),
        stderr_text(&out)
    );
    out
}

/// `vdiskmanager cbt enable d.vmdk` in the disk's folder, then writers and readers
/// that spell the path differently (the library by the absolute path, as every VDDK
/// client opens a disk; the CLI by `./d.vmdk`, through a symbolic link to the
/// folder, with `..`): the first change ID stays accepted and the changed areas are
/// exactly the writes.
#[test]
fn change_ids_hold_however_the_disk_path_is_spelled() {
    let tmp = tempdir();
    let root = tmp.path().canonicalize().unwrap();
    let dir = root.join("vm");
    std::fs::create_dir_all(dir.join("a")).unwrap();
    std::os::unix::fs::symlink(&dir, root.join("link")).unwrap();
    vdiskmanager_in(&dir, &["-c", "-s", "16MB", "-t", "1", "-q", "d.vmdk"]);
    let out = stdout_text(&vdiskmanager_in(&dir, &["cbt", "enable", "d.vmdk"]));
    let id = out.trim().rsplit(' ').next().unwrap().to_string();
    let spellings: Vec<PathBuf> = vec![
        PathBuf::from("d.vmdk"),
        PathBuf::from("./d.vmdk"),
        dir.join("d.vmdk"),
        root.join("link/d.vmdk"),
        PathBuf::from("a/../d.vmdk"),
    ];
    let mut written: Vec<serde_json::Value> = Vec::new();
    for (i, s) in spellings.iter().enumerate() {
        // A data write through the library by the absolute path, then a tracked
        // writer through the CLI by this spelling (meta set opens for writing).
        let at = (i as u64 + 1) * MIB;
        let d = OpenOptions::new()
            .write(true)
            .open(dir.join("d.vmdk"))
            .unwrap();
        d.write_at(&[i as u8 + 1; 8192], at).unwrap();
        d.close().unwrap();
        written.push(serde_json::json!({"start": at, "length": 8192}));
        vdiskmanager_in(&dir, &["meta", "set", "note", &i.to_string(), path_str(s)]);
        for r in &spellings {
            let r = path_str(r);
            let st: serde_json::Value = serde_json::from_str(&stdout_text(&vdiskmanager_in(
                &dir,
                &["cbt", "status", "--json", r],
            )))
            .unwrap();
            assert_eq!(
                st["trusted"],
                true,
                "written via {}, status of {r}: {st}",
                s.display()
            );
            let ch: serde_json::Value = serde_json::from_str(&stdout_text(&vdiskmanager_in(
                &dir,
                &["cbt", "changes", "--json", "--since", &id, r],
            )))
            .unwrap();
            assert_eq!(ch["areas"], serde_json::Value::from(written.clone()), "{r}");
        }
    }
}

/// A small deterministic generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn one_percent_random_writes_to_2_gib_are_found_and_backed_up_incrementally() {
    let dir = tempdir();
    let size = 2048 * MIB;
    let disk = dir.path().join("vm.vmdk");
    create(&disk, &CreateOptions::new(DiskType::MonolithicSparse, size)).unwrap();
    let mut rng = Rng(0x2026_1124);
    // 512 MiB of data in 1 MiB runs spread over the disk.
    {
        let d = OpenOptions::new().write(true).open(&disk).unwrap();
        let mut buf = vec![0u8; MIB as usize];
        for i in 0..512u64 {
            for c in buf.chunks_mut(8) {
                c.copy_from_slice(&rng.next().to_le_bytes());
            }
            d.write_at(&buf, (i * 4 + rng.next() % 3) * MIB).unwrap();
        }
        d.close().unwrap();
    }
    cbt::enable(&disk).unwrap();
    // Full backup.
    let d = Disk::open(&disk).unwrap();
    let full_id = d.change_id().unwrap();
    let areas = d.changed_areas(cbt::ALL, 0, size).unwrap();
    let full = dir.path().join("full.vmdk");
    let t = Instant::now();
    let full_stats = write_backup(&d, &areas, &full, None, &mut |_, _| true).unwrap();
    let full_time = t.elapsed();
    drop(d);
    // 1% of the disk in random writes of 512 B to 64 KiB at random offsets.
    let mut written = Vec::new();
    let mut total = 0;
    let d = OpenOptions::new().write(true).open(&disk).unwrap();
    while total < size / 100 {
        let len = 512 + rng.next() % (64 << 10);
        let off = rng.next() % (size - len);
        let data: Vec<u8> = (0..len).map(|i| (i as u8) ^ (off as u8)).collect();
        d.write_at(&data, off).unwrap();
        written.push((off, len));
        total += len;
    }
    d.close().unwrap();
    let d = Disk::open(&disk).unwrap();
    let areas = d.changed_areas(&full_id, 0, size).unwrap();
    let covered: u64 = areas.iter().map(|a| a.1).sum();
    for &(o, l) in &written {
        let mut pos = o;
        for &(a, al) in &areas {
            if a <= pos && pos < a + al {
                pos = (a + al).min(o + l);
            }
        }
        assert!(
            pos >= o + l,
            "write at {o} (+{l}) is not in the changed areas"
        );
    }
    let incr = dir.path().join("incr.vmdk");
    let t = Instant::now();
    let incr_stats = write_backup(&d, &areas, &incr, Some(&full), &mut |_, _| true).unwrap();
    let incr_time = t.elapsed();
    drop(d);
    println!(
        "1% random writes to 2 GiB: {} writes, {total} bytes written; changed areas {covered} \
         bytes ({:.2}x); incremental backup read {} bytes ({:.2}x), file {} bytes; \
         full backup {:.3} s ({} bytes read), incremental {:.3} s ({:.1}% of the full)",
        written.len(),
        covered as f64 / total as f64,
        incr_stats.bytes_read,
        incr_stats.bytes_read as f64 / total as f64,
        incr_stats.file_bytes,
        full_time.as_secs_f64(),
        full_stats.bytes_read,
        incr_time.as_secs_f64(),
        100.0 * incr_time.as_secs_f64() / full_time.as_secs_f64()
    );
    // Block granularity (4 KiB) adds at most a block at each end of each write.
    assert!(
        covered <= total + written.len() as u64 * 8192,
        "{covered} for {total}"
    );
    assert!(incr_stats.bytes_read < full_stats.bytes_read);
    // The backup chain reads as the disk in qemu.
    assert_qemu_identical(
        &incr,
        "vmdk",
        &disk,
        "vmdk",
        "incremental backup chain vs disk",
    );
    run("qemu-img", &["check", path_str(&incr)]);
}
