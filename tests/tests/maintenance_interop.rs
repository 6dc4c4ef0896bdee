//! Disk maintenance through `vdiskmanager` on disks made by qemu-img / qemu-io and by
//! vdiskmanager itself: grow (`-x`), shrink (`-k`), defragment (`-d`), check (`-e`)
//! and repair (`-R`). After each operation `qemu-img check` must accept the disk and
//! `qemu-img compare` must find it identical to a raw copy taken before (grown with
//! `truncate` for `-x`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use vdisk::extent::sparse::header::{SparseHeader, HEADER_SIZE};
use vdisk_interop::{
    assert_ours_equals_raw_file, assert_qemu_check_clean, assert_qemu_identical, path_str,
    qemu_info, qemu_raw_to, run, run_unchecked, stderr_text, stdout_text, tempdir, vdiskmanager,
    vdiskmanager_bin, vdiskmanager_failing, GIB, KIB, MIB,
};

const SECTOR: u64 = 512;
const GRAIN: u64 = 64 * KIB;

/// `dir/s.vmdk`: `disk` converted by qemu-img to streamOptimized.
fn qemu_stream_of(disk: &Path, dir: &Path) -> PathBuf {
    let stream = dir.join("s.vmdk");
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            path_str(disk),
            path_str(&stream),
        ],
    );
    stream
}

/// `qemu-img create -f vmdk -o subformat=SUB dir/name SIZE`.
fn qemu_create(dir: &Path, name: &str, subformat: &str, size: &str) -> PathBuf {
    let disk = dir.join(name);
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            &format!("subformat={subformat}"),
            path_str(&disk),
            size,
        ],
    );
    disk
}

/// `vdiskmanager -c -s SIZE -t T dir/name`.
fn ours_create(dir: &Path, name: &str, t: u32, size: &str) -> PathBuf {
    let disk = dir.join(name);
    vdiskmanager(&[
        "-c",
        "-q",
        "-s",
        size,
        "-a",
        "lsilogic",
        "-t",
        &t.to_string(),
        path_str(&disk),
    ]);
    disk
}

/// One qemu-io run with the given `-c` commands (`write -P 0` is a data write of
/// zeros, unlike `write -z`).
fn qemu_io(disk: &Path, cmds: &[String]) {
    let mut args = vec!["-f".to_string(), "vmdk".to_string()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(path_str(disk).to_string());
    run("qemu-io", &args);
}

/// The raw content of `disk` as qemu reads it, in `dir/name`.
fn raw_copy(disk: &Path, dir: &Path, name: &str) -> PathBuf {
    let raw = dir.join(name);
    qemu_raw_to(disk, &raw);
    raw
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).expect("metadata").len()
}

fn virtual_size(disk: &Path) -> u64 {
    qemu_info(disk)["virtual-size"]
        .as_u64()
        .expect("qemu-img info without virtual-size")
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = File::open(path).expect("open");
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).expect("read");
    buf
}

fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for writing");
    f.write_all_at(data, offset).expect("write");
    f.sync_all().expect("sync");
}

fn header(path: &Path) -> SparseHeader {
    let mut b = [0u8; HEADER_SIZE];
    b.copy_from_slice(&read_at(path, 0, HEADER_SIZE));
    SparseHeader::parse(&b).expect("sparse header")
}

fn u32s(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The primary grain directory of a sparse file.
fn directory(path: &Path, h: &SparseHeader) -> Vec<u32> {
    u32s(&read_at(
        path,
        h.gd_offset * SECTOR,
        h.num_gdes() as usize * 4,
    ))
}

/// 1 + the places where the next allocated grain in guest order does not follow
/// the previous one in the file (0 without data).
fn fragments(path: &Path) -> u64 {
    let h = header(path);
    let mut grains = Vec::new();
    for gde in directory(path, &h) {
        if gde == 0 {
            continue;
        }
        let gt = u32s(&read_at(
            path,
            u64::from(gde) * SECTOR,
            h.num_gtes_per_gt as usize * 4,
        ));
        grains.extend(gt.into_iter().filter(|&g| g > 1).map(u64::from));
    }
    if grains.is_empty() {
        return 0;
    }
    1 + grains
        .windows(2)
        .filter(|w| w[1] != w[0] + h.grain_size)
        .count() as u64
}

/// The non-empty lines a command printed on stdout.
fn output_lines(out: &Output) -> Vec<String> {
    stdout_text(out)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

fn all_output(out: &Output) -> String {
    format!(
        "--- stdout ---\n{}--- stderr ---\n{}",
        stdout_text(out),
        stderr_text(out)
    )
}

/// Grows `disk` with `-x SIZE` and checks it against `raw` grown with truncate.
fn grow_and_compare(disk: &Path, raw: &Path, size: &str, new_cap: u64, what: &str) {
    vdiskmanager(&["-x", size, path_str(disk)]);
    assert_eq!(virtual_size(disk), new_cap, "{what}: virtual size");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(raw)
        .expect("open raw");
    f.set_len(new_cap).expect("truncate raw");
    drop(f);
    assert_qemu_check_clean(disk, what);
    assert_qemu_identical(raw, "raw", disk, "vmdk", what);
}

// =================================================================================
// Grow
// =================================================================================

#[test]
fn grow_qemu_monolithic_sparse_then_qemu_writes_into_the_new_space() {
    let dir = tempdir();
    let disk = qemu_create(dir.path(), "q.vmdk", "monolithicSparse", "64M");
    qemu_io(
        &disk,
        &[
            "write -P 0x11 0 1M".into(),
            "write -P 0x22 40M 300K".into(),
            format!("write -P 0x33 {} 64K", 64 * MIB - GRAIN),
        ],
    );
    let raw = raw_copy(&disk, dir.path(), "before.raw");
    grow_and_compare(
        &disk,
        &raw,
        "200MB",
        200 * MIB,
        "qemu monolithicSparse -x 200MB",
    );
    // qemu writes past the old end; qemu and vdisk read the same.
    qemu_io(
        &disk,
        &[
            format!("write -P 0x44 {} 128K", 64 * MIB - GRAIN),
            format!("write -P 0x55 {} 64K", 200 * MIB - GRAIN),
        ],
    );
    assert_qemu_check_clean(&disk, "after qemu writes into the grown disk");
    let after = raw_copy(&disk, dir.path(), "after.raw");
    assert_ours_equals_raw_file(&disk, &after);
    let out = vdiskmanager(&["-e", path_str(&disk)]);
    assert!(out.status.success(), "{}", all_output(&out));
}

/// qemu's split files hold 2 GiB each; the 1 GiB last extent fills up and a new
/// file is added.
#[test]
fn grow_qemu_two_gb_sparse_across_the_extent_boundary() {
    let dir = tempdir();
    let disk = qemu_create(dir.path(), "t.vmdk", "twoGbMaxExtentSparse", "3G");
    qemu_io(
        &disk,
        &[
            "write -P 0x11 1M 128K".into(),
            format!("write -P 0x22 {} 256K", 2 * GIB - 128 * KIB),
            format!("write -P 0x33 {} 64K", 3 * GIB - GRAIN),
        ],
    );
    let raw = raw_copy(&disk, dir.path(), "before.raw");
    grow_and_compare(
        &disk,
        &raw,
        "5GB",
        5 * GIB,
        "qemu twoGbMaxExtentSparse -x 5GB",
    );
    assert!(
        dir.path().join("t-s003.vmdk").is_file(),
        "no third extent file"
    );
    for i in 1..=3 {
        let f = dir.path().join(format!("t-s{i:03}.vmdk"));
        assert!(file_len(&f) < 64 * MIB, "{} should stay small", f.display());
    }
    qemu_io(
        &disk,
        &[format!("write -P 0x44 {} 1M", 3 * GIB - 512 * KIB)],
    );
    assert_qemu_check_clean(&disk, "after qemu writes across the old end");
}

/// Disks made by vdiskmanager, every growable type, written by qemu-io.
#[test]
fn grow_our_disks_of_every_growable_type() {
    for t in [0u32, 1, 2, 3, 4, 6] {
        let dir = tempdir();
        let disk = ours_create(dir.path(), "o.vmdk", t, "32MB");
        qemu_io(
            &disk,
            &[
                "write -P 0x61 4096 100K".into(),
                format!("write -P 0x62 {} 8K", 32 * MIB - 8 * KIB),
            ],
        );
        let raw = raw_copy(&disk, dir.path(), "before.raw");
        grow_and_compare(&disk, &raw, "100MB", 100 * MIB, &format!("-t {t} -x 100MB"));
    }
}

/// A loop device, detached when dropped.
struct LoopDevice(String);

impl LoopDevice {
    /// Attaches `file` (needs root and losetup).
    fn attach(file: &Path) -> LoopDevice {
        let uid = stdout_text(&run("id", &["-u"]));
        assert_eq!(uid.trim(), "0", "this test needs root (a loop device)");
        let losetup = vdisk_interop::require_tool_from("losetup", "mount");
        let out = run(&losetup, &["--find", "--show", path_str(file)]);
        LoopDevice(stdout_text(&out).trim().to_string())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let losetup = vdisk_interop::require_tool_from("losetup", "mount");
        let _ = std::process::Command::new(losetup)
            .args(["-d", &self.0])
            .status();
    }
}

/// A raw device mapping (a FLAT extent naming a block device) grows inside the
/// device: what the device held past the old extent end reads as zeros in the grown
/// disk (the device cannot be cut, so zeros are written), bytes beyond the new end
/// are not touched, and a device too small for the new size is refused with the
/// descriptor unchanged.
#[test]
fn grow_of_a_raw_device_mapping_zeroes_the_new_space_in_the_device() {
    let dir = tempdir();
    let backing = dir.path().join("device.img");
    std::fs::write(&backing, vec![0xeeu8; 16 * MIB as usize]).expect("write");
    let dev = LoopDevice::attach(&backing);
    let disk = dir.path().join("rdm.vmdk");
    std::fs::write(
        &disk,
        format!(
            "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
             createType=\"monolithicFlat\"\n\nRW 8192 FLAT \"{}\" 0\n\n\
             ddb.adapterType = \"lsilogic\"\n",
            dev.0
        ),
    )
    .expect("write");
    vdiskmanager(&["-x", "8MB", path_str(&disk)]);
    let d = vdisk::Disk::open(&disk).expect("open the grown disk");
    assert_eq!(d.capacity(), 8 * MIB);
    let mut buf = vec![0u8; 8 * MIB as usize];
    d.read_at(&mut buf, 0).expect("read");
    drop(d);
    assert!(
        buf[..4 * MIB as usize].iter().all(|&b| b == 0xee),
        "old content changed"
    );
    if let Some(i) = buf[4 * MIB as usize..].iter().position(|&b| b != 0) {
        panic!(
            "grown space shows a stale byte at disk offset {}",
            4 * MIB as usize + i
        );
    }
    let device = std::fs::read(&dev.0).expect("read the device");
    assert!(
        device[8 * MIB as usize..].iter().all(|&b| b == 0xee),
        "bytes past the new end changed"
    );
    let before = std::fs::read(&disk).expect("read");
    let out = vdiskmanager_failing(&["-x", "32MB", path_str(&disk)]);
    assert!(stderr_text(&out).contains("needs"), "{}", stderr_text(&out));
    assert_eq!(
        std::fs::read(&disk).expect("read"),
        before,
        "descriptor changed"
    );
}

#[test]
fn grow_smaller_or_stream_fails_and_keeps_the_disk() {
    let dir = tempdir();
    let disk = ours_create(dir.path(), "o.vmdk", 0, "32MB");
    qemu_io(&disk, &["write -P 0x71 0 64K".into()]);
    let before = std::fs::read(&disk).expect("read");
    let out = vdiskmanager_failing(&["-x", "16MB", path_str(&disk)]);
    assert!(!stderr_text(&out).is_empty(), "no error message");
    assert_eq!(std::fs::read(&disk).expect("read"), before, "file changed");
    assert_eq!(virtual_size(&disk), 32 * MIB);

    let stream = qemu_stream_of(&disk, dir.path());
    let before = std::fs::read(&stream).expect("read");
    vdiskmanager_failing(&["-x", "64MB", path_str(&stream)]);
    assert_eq!(
        std::fs::read(&stream).expect("read"),
        before,
        "stream changed"
    );
}

// =================================================================================
// Shrink
// =================================================================================

/// Data written by qemu, part of it overwritten with zero data (`write -P 0`): the
/// shrunk file is smaller by about the zeroed amount and reads the same.
#[test]
fn shrink_qemu_disk_after_zero_data_writes() {
    let dir = tempdir();
    let disk = qemu_create(dir.path(), "q.vmdk", "monolithicSparse", "64M");
    qemu_io(
        &disk,
        &[
            "write -P 0x11 0 8M".into(),
            "write -P 0x22 40M 4M".into(),
            "write -P 0 2M 4M".into(),
        ],
    );
    let raw = raw_copy(&disk, dir.path(), "before.raw");
    let before = file_len(&disk);
    vdiskmanager(&["-k", path_str(&disk)]);
    let after = file_len(&disk);
    assert!(
        after + 4 * MIB <= before,
        "file went from {before} to {after} bytes; 4 MiB were zeros"
    );
    assert!(
        after >= 8 * MIB,
        "file is {after} bytes but 8 MiB of data remain"
    );
    assert_qemu_check_clean(&disk, "qemu disk after -k");
    assert_qemu_identical(&raw, "raw", &disk, "vmdk", "qemu disk after -k");
    // qemu can keep writing to it.
    qemu_io(
        &disk,
        &["write -P 0x33 3M 1M".into(), "write -P 0x34 60M 64K".into()],
    );
    assert_qemu_check_clean(&disk, "qemu writes after -k");
    let now = raw_copy(&disk, dir.path(), "now.raw");
    assert_ours_equals_raw_file(&disk, &now);
}

#[test]
fn shrink_our_split_sparse_disk() {
    let dir = tempdir();
    let disk = ours_create(dir.path(), "o.vmdk", 1, "2100MB");
    let second = 2047 * MIB;
    qemu_io(
        &disk,
        &[
            "write -P 0x41 0 2M".into(),
            format!("write -P 0x42 {second} 2M"),
            "write -P 0 0 1M".into(),
            format!("write -P 0 {} 1M", second + MIB),
        ],
    );
    let raw = raw_copy(&disk, dir.path(), "before.raw");
    let s1 = dir.path().join("o-s001.vmdk");
    let s2 = dir.path().join("o-s002.vmdk");
    let (l1, l2) = (file_len(&s1), file_len(&s2));
    vdiskmanager(&["-k", path_str(&disk)]);
    assert!(file_len(&s1) + MIB <= l1, "first extent did not shrink");
    assert!(file_len(&s2) + MIB <= l2, "second extent did not shrink");
    assert_qemu_check_clean(&disk, "split disk after -k");
    assert_qemu_identical(&raw, "raw", &disk, "vmdk", "split disk after -k");
}

#[test]
fn shrink_of_a_flat_disk_fails_and_changes_nothing() {
    let dir = tempdir();
    let disk = ours_create(dir.path(), "f.vmdk", 2, "8MB");
    qemu_io(&disk, &["write -P 0x51 0 64K".into()]);
    let flat = dir.path().join("f-flat.vmdk");
    let before = (
        std::fs::read(&disk).expect("read"),
        std::fs::read(&flat).expect("read"),
    );
    let out = vdiskmanager_failing(&["-k", path_str(&disk)]);
    assert!(!stderr_text(&out).is_empty(), "no error message");
    assert_eq!(
        (
            std::fs::read(&disk).expect("read"),
            std::fs::read(&flat).expect("read")
        ),
        before,
        "a refused shrink changed the files"
    );
}

// =================================================================================
// Defragment
// =================================================================================

/// qemu allocates grains in write order: grains written last-to-first lie reversed
/// in the file. `-d` puts them in guest order; qemu still reads the same.
#[test]
fn defragment_qemu_disk_written_backwards() {
    let dir = tempdir();
    let disk = qemu_create(dir.path(), "q.vmdk", "monolithicSparse", "64M");
    let mut cmds: Vec<String> = (0..24u64)
        .rev()
        .map(|g| format!("write -P {:#04x} {} 64K", 0x10 + g, g * GRAIN))
        .collect();
    cmds.extend(
        (0..8u64)
            .rev()
            .map(|g| format!("write -P {:#04x} {} 64K", 0x80 + g, 33 * MIB + g * GRAIN)),
    );
    qemu_io(&disk, &cmds);
    assert_eq!(fragments(&disk), 32, "test setup: grains reversed");
    let raw = raw_copy(&disk, dir.path(), "before.raw");
    let before = file_len(&disk);
    vdiskmanager(&["-d", path_str(&disk)]);
    assert_eq!(fragments(&disk), 1, "grains not in guest order after -d");
    assert!(file_len(&disk) <= before, "-d grew the file");
    assert_qemu_check_clean(&disk, "after -d");
    assert_qemu_identical(&raw, "raw", &disk, "vmdk", "after -d");
}

// =================================================================================
// Check and repair
// =================================================================================

/// `-e` on a damaged disk: non-zero exit, one stdout line per finding of the
/// library's check (naming the file at fault) and one error line on stderr; returns
/// the stdout lines.
fn check_fails(disk: &Path, what: &str) -> Vec<String> {
    let report = vdisk::ops::check::check(disk, false)
        .unwrap_or_else(|e| panic!("{what}: library check failed: {e}"));
    assert!(
        !report.findings.is_empty(),
        "{what}: the library finds nothing"
    );
    let out = run_unchecked(vdiskmanager_bin(), &["-e", path_str(disk)]);
    assert!(
        !out.status.success(),
        "{what}: -e exited 0 on a damaged disk\n{}",
        all_output(&out)
    );
    let lines: Vec<String> = stdout_text(&out).lines().map(str::to_string).collect();
    assert_eq!(
        lines.len(),
        report.findings.len(),
        "{what}: -e should print one line per finding\n{}",
        all_output(&out)
    );
    for (line, f) in lines.iter().zip(&report.findings) {
        assert!(
            line.contains(path_str(&f.file)) && line.contains(&f.problem),
            "{what}: line {line:?} does not name {} and {:?}",
            f.file.display(),
            f.problem
        );
    }
    let err = stderr_text(&out);
    assert_eq!(err.lines().count(), 1, "{what}: stderr:\n{err}");
    assert!(err.starts_with("vdiskmanager: error:"), "{what}: {err}");
    lines
}

fn check_passes(disk: &Path, what: &str) {
    let out = run_unchecked(vdiskmanager_bin(), &["-e", path_str(disk)]);
    assert!(
        out.status.success(),
        "{what}: -e failed on a sound disk\n{}",
        all_output(&out)
    );
}

/// A qemu-made disk whose primary grain table 0 is overwritten with junk: `-e` fails
/// and names the file, `-R` repairs from the redundant table, qemu reads the
/// content from before the damage and `qemu-img check` is clean.
#[test]
fn repair_qemu_disk_with_a_damaged_primary_grain_table() {
    for junk in [false, true] {
        let dir = tempdir();
        let disk = qemu_create(dir.path(), "q.vmdk", "monolithicSparse", "64M");
        qemu_io(
            &disk,
            &[
                "write -P 0x11 0 1M".into(),
                "write -P 0x22 5M 200K".into(),
                "write -P 0x33 40M 1M".into(),
            ],
        );
        let raw = raw_copy(&disk, dir.path(), "before.raw");
        check_passes(&disk, "qemu disk before damage");
        let h = header(&disk);
        let gd = directory(&disk, &h);
        let n = h.num_gtes_per_gt as usize * 4;
        let bad: Vec<u8> = if junk {
            (0..n).map(|i| (i * 7 + 3) as u8).collect()
        } else {
            vec![0u8; n]
        };
        write_at(&disk, u64::from(gd[0]) * SECTOR, &bad);
        let what = if junk { "junk table" } else { "zeroed table" };
        let lines = check_fails(&disk, what);
        assert!(
            lines.iter().any(|l| l.contains("q.vmdk")),
            "{what}: no line names the file: {lines:?}"
        );
        let before = std::fs::read(&disk).expect("read");
        check_fails(&disk, what);
        assert_eq!(
            std::fs::read(&disk).expect("read"),
            before,
            "{what}: -e changed the file"
        );
        let out = vdiskmanager(&["-R", path_str(&disk)]);
        assert!(
            !output_lines(&out).is_empty(),
            "{what}: -R printed nothing about what it did"
        );
        check_passes(&disk, &format!("{what}: after -R"));
        assert_qemu_check_clean(&disk, &format!("{what}: after -R"));
        assert_qemu_identical(&raw, "raw", &disk, "vmdk", &format!("{what}: after -R"));
    }
}

/// Our own disk left with the uncleanShutdown flag set (a crashed writer): found by
/// `-e`, cleared by `-R`.
#[test]
fn repair_unclean_shutdown_flag_of_our_disk() {
    let dir = tempdir();
    let disk = ours_create(dir.path(), "o.vmdk", 0, "16MB");
    qemu_io(&disk, &["write -P 0x21 64K 128K".into()]);
    let raw = raw_copy(&disk, dir.path(), "before.raw");
    write_at(&disk, 72, &[1]);
    check_fails(&disk, "uncleanShutdown");
    vdiskmanager(&["-R", path_str(&disk)]);
    assert_eq!(read_at(&disk, 72, 1), [0], "flag still set after -R");
    check_passes(&disk, "uncleanShutdown after -R");
    assert_qemu_check_clean(&disk, "uncleanShutdown after -R");
    assert_qemu_identical(&raw, "raw", &disk, "vmdk", "uncleanShutdown after -R");
}

/// A qemu disk cut short (its last grain lies past the end): `-R` leaves a disk
/// qemu checks clean; the intact grains read as before.
#[test]
fn repair_truncated_qemu_disk() {
    let dir = tempdir();
    let disk = qemu_create(dir.path(), "q.vmdk", "monolithicSparse", "64M");
    qemu_io(
        &disk,
        &["write -P 0x11 0 1M".into(), "write -P 0x22 30M 64K".into()],
    );
    let len = file_len(&disk);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .expect("open");
    f.set_len(len - GRAIN / 2).expect("truncate");
    drop(f);
    check_fails(&disk, "truncated");
    vdiskmanager(&["-R", path_str(&disk)]);
    check_passes(&disk, "truncated after -R");
    assert_qemu_check_clean(&disk, "truncated after -R");
    let out = run(
        "qemu-io",
        &[
            "-f",
            "vmdk",
            "-c",
            "read -P 0x11 0 1M",
            "-c",
            "read -P 0 1M 29M",
            path_str(&disk),
        ],
    );
    assert!(
        !stdout_text(&out).contains("Pattern verification failed"),
        "intact data changed after -R:\n{}",
        stdout_text(&out)
    );
}

/// qemu-img's streamOptimized output (directory and a redundant copy at the front,
/// grain markers only, no end-of-stream marker - also for an empty disk) is whole:
/// `-e` passes. The same file cut at a grain boundary is found truncated (the
/// tables name grains past its end), and `-R` does not pretend to fix it.
#[test]
fn check_of_qemu_streams_and_a_cut_one() {
    for (size, writes) in [
        (
            "8M",
            vec![
                "write -P 0x5a 1M 300K".to_string(),
                "write -P 0x11 7M 64K".into(),
            ],
        ),
        ("4M", vec![]),
    ] {
        let dir = tempdir();
        let src = qemu_create(dir.path(), "src.vmdk", "monolithicSparse", size);
        if !writes.is_empty() {
            qemu_io(&src, &writes);
        }
        let stream = qemu_stream_of(&src, dir.path());
        let what = format!("qemu stream of {size}");
        check_passes(&stream, &what);
        if writes.is_empty() {
            continue;
        }
        // Cut after the first two grains (qemu starts them at sector 128; what
        // follows its last grain is zeros): the tables name grains past the end.
        assert!(file_len(&stream) > 140 * SECTOR);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&stream)
            .expect("open");
        f.set_len(130 * SECTOR).expect("truncate");
        drop(f);
        check_fails(&stream, &format!("{what}, cut"));
        let out = run_unchecked(vdiskmanager_bin(), &["-R", path_str(&stream)]);
        assert!(
            !out.status.success(),
            "{what}: -R claims to have repaired a cut stream\n{}",
            all_output(&out)
        );
    }
}
