//! The `vdiskmanager` command line: one-line errors, `meta` round trips, `info --json`
//! and refusal to write a disk another handle holds open for writing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use vdisk::{Disk, OpenOptions};
use vdisk_interop::{
    path_str, qemu_info, qemu_raw, run, stderr_text, stdout_text, tempdir, vdiskmanager,
    vdiskmanager_bin, vdiskmanager_failing, vdiskmanager_info, MIB,
};

/// Asserts the failure printed exactly one line, starting with
/// `vdiskmanager: error:`, on stderr and nothing on stdout; returns that line.
fn assert_one_error_line(what: &str, out: &Output) -> String {
    assert!(!out.status.success(), "{what}: exit status {}", out.status);
    let err = stderr_text(out);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{what}: stderr is not one line:\n{err}");
    assert!(
        lines[0].starts_with("vdiskmanager: error:"),
        "{what}: stderr is {err:?}"
    );
    assert!(
        stdout_text(out).is_empty(),
        "{what}: stdout is not empty: {}",
        stdout_text(out)
    );
    lines[0].to_string()
}

/// Creates a disk of type `t` and `size` (vdiskmanager syntax) in `dir`.
fn create(dir: &Path, name: &str, t: u32, size: &str) -> PathBuf {
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

/// All files in `dir`, sorted.
fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn missing_disk_fails_with_one_error_line() {
    let dir = tempdir();
    let missing = dir.path().join("missing.vmdk");
    for args in [
        vec!["info", path_str(&missing)],
        vec!["info", "--json", path_str(&missing)],
        vec!["map", "--json", path_str(&missing)],
        vec!["meta", "list", path_str(&missing)],
        vec!["meta", "get", "adapterType", path_str(&missing)],
        vec!["meta", "set", "k", "v", path_str(&missing)],
    ] {
        let line = assert_one_error_line(&args.join(" "), &vdiskmanager_failing(&args));
        assert!(line.contains("missing.vmdk"), "{line}");
    }
    assert!(files_in(dir.path()).is_empty(), "no file may be created");
}

#[test]
fn no_operation_fails_with_one_error_line() {
    assert_one_error_line("no arguments", &vdiskmanager_failing::<&str>(&[]));
}

#[test]
fn bad_disk_type_fails_with_one_error_line_and_creates_nothing() {
    let dir = tempdir();
    let disk = dir.path().join("d.vmdk");
    for t in ["9", "7", "x", "monolithicSparsely"] {
        let out = vdiskmanager_failing(&["-c", "-s", "64MB", "-t", t, path_str(&disk)]);
        assert_one_error_line(&format!("-t {t}"), &out);
    }
    let src = dir.path().join("src.raw");
    std::fs::write(&src, vec![1u8; 4096]).expect("write src");
    let out = vdiskmanager_failing(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-t",
        "42",
        path_str(&src),
        path_str(&disk),
    ]);
    assert_one_error_line("convert -t 42", &out);
    assert_eq!(files_in(dir.path()), vec!["src.raw"]);
}

#[test]
fn bad_size_fails_with_one_error_line_and_creates_nothing() {
    let dir = tempdir();
    let disk = dir.path().join("d.vmdk");
    for size in ["12XB", "0", "0MB", "abc", ""] {
        let out = vdiskmanager_failing(&["-c", "-s", size, "-t", "0", path_str(&disk)]);
        assert_one_error_line(&format!("-s {size:?}"), &out);
    }
    assert!(files_in(dir.path()).is_empty());
}

#[test]
fn malformed_arguments_fail_with_one_error_line_and_no_files() {
    // Values that look like options (`-t -1`) and unknown options are rejected by
    // the argument parser; its message is folded into the one error line too.
    let dir = tempdir();
    let disk = dir.path().join("d.vmdk");
    for args in [
        vec!["-c", "-s", "64MB", "-t", "-1", path_str(&disk)],
        vec!["-c", "-s", "-5MB", "-t", "0", path_str(&disk)],
        vec!["-c", "--bogus", "-s", "64MB", "-t", "0", path_str(&disk)],
        vec!["info", "--bogus", path_str(&disk)],
        vec!["convert", "-f", "qcow2", path_str(&disk), path_str(&disk)],
        vec!["meta", "get", path_str(&disk)],
    ] {
        let out = vdiskmanager_failing(&args);
        assert_one_error_line(&format!("{args:?}"), &out);
    }
    assert!(files_in(dir.path()).is_empty());
}

#[test]
fn unknown_adapter_fails_with_one_error_line_and_creates_nothing() {
    let dir = tempdir();
    let disk = dir.path().join("d.vmdk");
    for adapter in ["scsi", "sata", "nvme", ""] {
        let out = vdiskmanager_failing(&[
            "-c",
            "-s",
            "64MB",
            "-a",
            adapter,
            "-t",
            "0",
            path_str(&disk),
        ]);
        let line = assert_one_error_line(&format!("-a {adapter:?}"), &out);
        assert!(line.contains("adapter"), "{line}");
    }
    assert!(files_in(dir.path()).is_empty());
}

#[test]
fn convert_to_existing_destination_fails_and_leaves_it_unchanged() {
    let dir = tempdir();
    let src = create(dir.path(), "src.vmdk", 0, "1MB");
    let raw = dir.path().join("existing.raw");
    std::fs::write(&raw, b"precious data").expect("write raw");
    let out = vdiskmanager_failing(&[
        "convert",
        "-q",
        "-f",
        "vmdk",
        "-O",
        "raw",
        path_str(&src),
        path_str(&raw),
    ]);
    let line = assert_one_error_line("convert to an existing raw file", &out);
    assert!(line.contains("existing.raw"), "{line}");
    assert_eq!(std::fs::read(&raw).expect("read"), b"precious data");

    // An existing VMDK destination (descriptor and extent) is left alone too.
    let dst = create(dir.path(), "dst.vmdk", 2, "1MB");
    let flat = dir.path().join("dst-flat.vmdk");
    let descriptor_before = std::fs::read(&dst).expect("read");
    let flat_before = std::fs::read(&flat).expect("read");
    for t in ["0", "2"] {
        let out = vdiskmanager_failing(&["convert", "-q", "-t", t, path_str(&src), path_str(&dst)]);
        assert_one_error_line("convert to an existing vmdk", &out);
        assert_eq!(std::fs::read(&dst).expect("read"), descriptor_before);
        assert_eq!(std::fs::read(&flat).expect("read"), flat_before);
    }

    // Only the extent file of the destination exists: creation must fail without
    // touching or removing it, and without leaving a descriptor behind.
    let stray = dir.path().join("new-flat.vmdk");
    std::fs::write(&stray, b"someone else's extent").expect("write");
    let new = dir.path().join("new.vmdk");
    let out = vdiskmanager_failing(&["convert", "-q", "-t", "2", path_str(&src), path_str(&new)]);
    assert_one_error_line("convert onto an existing extent file", &out);
    assert_eq!(
        std::fs::read(&stray).expect("stray extent was removed"),
        b"someone else's extent"
    );
    assert!(!new.exists(), "a descriptor was left behind");
    // A refused convert removes its temporary folder.
    let files = files_in(dir.path());
    assert!(
        !files.iter().any(|f| f.starts_with(".vdisk-convert")),
        "{files:?}"
    );
}

/// `meta set` then `meta get` / `meta list` round-trip on `disk`; the value is
/// visible through the library, the data and the disk's validity for qemu survive.
fn meta_round_trip(disk: &Path) {
    let what = disk.display().to_string();
    run(
        "qemu-io",
        &[
            "-f",
            "vmdk",
            "-c",
            "write -P 0x3c 65024 1024",
            path_str(disk),
        ],
    );
    let content_before = qemu_raw(disk);

    vdiskmanager(&["meta", "set", "interopKey", "first value", path_str(disk)]);
    vdiskmanager(&[
        "meta",
        "set",
        "ddb.interopKey",
        "hello world 42",
        path_str(disk),
    ]);
    for key in ["interopKey", "ddb.interopKey"] {
        let out = vdiskmanager(&["meta", "get", key, path_str(disk)]);
        assert_eq!(stdout_text(&out), "hello world 42\n", "{what}: get {key}");
    }
    let list = stdout_text(&vdiskmanager(&["meta", "list", path_str(disk)]));
    let lines: Vec<&str> = list.lines().filter(|l| l.contains("interopKey")).collect();
    assert_eq!(
        lines,
        vec![r#"interopKey = "hello world 42""#],
        "{what}: list:\n{list}"
    );
    assert!(
        list.contains(r#"adapterType = "lsilogic""#),
        "{what}: list:\n{list}"
    );

    // The library re-parses the saved descriptor.
    let d = Disk::open(disk).expect("open");
    assert_eq!(d.metadata("interopKey").expect("key"), "hello world 42");
    assert_eq!(d.metadata("adapterType").expect("key"), "lsilogic");
    drop(d);
    // The descriptor text itself holds the entry (read without the library).
    let bytes = std::fs::read(disk).expect("read");
    let text = String::from_utf8_lossy(&bytes);
    assert_eq!(
        text.matches(r#"ddb.interopKey = "hello world 42""#).count(),
        1,
        "{what}: descriptor text"
    );
    // Other tools still accept the disk and read the same data.
    run("qemu-img", &["check", "-f", "vmdk", path_str(disk)]);
    run("vmdkinfo", &[path_str(disk)]);
    assert_eq!(qemu_raw(disk), content_before, "{what}: data changed");
}

#[test]
fn meta_set_then_get_and_list_round_trip_on_monolithic_sparse() {
    let dir = tempdir();
    meta_round_trip(&create(dir.path(), "sparse.vmdk", 0, "16MB"));
}

#[test]
fn meta_set_then_get_and_list_round_trip_on_monolithic_flat() {
    let dir = tempdir();
    meta_round_trip(&create(dir.path(), "flat.vmdk", 2, "16MB"));
}

#[test]
fn meta_get_of_missing_key_fails() {
    let dir = tempdir();
    let disk = create(dir.path(), "d.vmdk", 0, "1MB");
    let out = vdiskmanager_failing(&["meta", "get", "noSuchKey", path_str(&disk)]);
    let line = assert_one_error_line("meta get noSuchKey", &out);
    assert!(line.contains("noSuchKey"), "{line}");
}

#[test]
fn info_json_reports_capacity_type_adapter_geometry_cid_and_extents() {
    let dir = tempdir();
    for (t, create_type, extent_type, extents) in [
        (0, "monolithicSparse", "SPARSE", 1),
        (1, "twoGbMaxExtentSparse", "SPARSE", 2),
        (2, "monolithicFlat", "FLAT", 1),
        (3, "twoGbMaxExtentFlat", "FLAT", 2),
        (4, "vmfs", "VMFS", 1),
    ] {
        let size = 2047 * MIB + MIB;
        let disk = create(
            dir.path(),
            &format!("t{t}.vmdk"),
            t,
            &format!("{}", size / 512),
        );
        let info = vdiskmanager_info(&disk);
        let what = format!("type {t}: {info}");
        assert_eq!(info["capacity"].as_u64(), Some(size), "{what}");
        assert_eq!(info["createType"], create_type, "{what}");
        assert_eq!(info["adapterType"], "lsilogic", "{what}");
        for k in ["cylinders", "heads", "sectors"] {
            assert!(
                info["geometry"][k].as_u64().is_some_and(|n| n > 0),
                "{what}"
            );
        }
        let g = &info["geometry"];
        assert!(
            g["cylinders"].as_u64().unwrap_or(0)
                * g["heads"].as_u64().unwrap_or(0)
                * g["sectors"].as_u64().unwrap_or(0)
                <= size / 512,
            "{what}: geometry larger than the disk"
        );
        let cid = info["cid"].as_str().expect("cid is a string");
        assert!(
            cid.len() == 8 && cid.chars().all(|c| c.is_ascii_hexdigit()),
            "{what}"
        );
        let qemu_cid = qemu_info(&disk)["format-specific"]["data"]["cid"].as_u64();
        assert_eq!(
            qemu_cid,
            Some(u64::from(u32::from_str_radix(cid, 16).expect("hex"))),
            "{what}: cid differs from qemu-img info"
        );
        let ext = info["chain"][0]["extents"]
            .as_array()
            .expect("chain[0].extents");
        assert_eq!(ext.len(), extents, "{what}");
        let sectors: u64 = ext.iter().map(|e| e["sectors"].as_u64().unwrap_or(0)).sum();
        assert_eq!(sectors, size / 512, "{what}");
        for e in ext {
            assert_eq!(e["type"], extent_type, "{what}");
            assert_eq!(e["access"], "RW", "{what}");
            let file = e["file"].as_str().expect("extent file");
            assert!(dir.path().join(file).is_file() || Path::new(file).is_file());
            assert!(e["fileBytes"].as_u64().is_some(), "{what}");
        }
    }
}

#[test]
fn meta_set_fails_with_lock_error_while_the_disk_is_open_for_writing() {
    let dir = tempdir();
    for (t, name) in [(0, "sparse.vmdk"), (2, "flat.vmdk"), (1, "split.vmdk")] {
        let disk = create(dir.path(), name, t, "8MB");
        let held = OpenOptions::new()
            .write(true)
            .open(&disk)
            .expect("open for writing");
        let out = vdiskmanager_failing(&["meta", "set", "k", "v", path_str(&disk)]);
        let line = assert_one_error_line(&format!("{name}: meta set while held"), &out);
        assert!(line.to_lowercase().contains("lock"), "{name}: {line}");
        held.close().expect("close");

        vdiskmanager(&["meta", "set", "k", "v", path_str(&disk)]);
        let out = vdiskmanager(&["meta", "get", "k", path_str(&disk)]);
        assert_eq!(stdout_text(&out), "v\n");
    }
    // The binary is the one the helpers found.
    assert!(vdiskmanager_bin().is_file());
}

#[test]
fn meta_set_too_big_for_the_embedded_descriptor_fails_and_changes_nothing() {
    let dir = tempdir();
    let disk = create(dir.path(), "d.vmdk", 0, "1MB");
    run(
        "qemu-io",
        &["-f", "vmdk", "-c", "write -P 0x7 0 65536", path_str(&disk)],
    );
    let before = std::fs::read(&disk).expect("read");
    let value = "x".repeat(12_000);
    let out = vdiskmanager_failing(&["meta", "set", "big", &value, path_str(&disk)]);
    assert_one_error_line("meta set of 12000 bytes", &out);
    assert_eq!(std::fs::read(&disk).expect("read"), before, "disk changed");
    // A value that fits still works, and qemu still reads the data.
    let value = "y".repeat(8_000);
    vdiskmanager(&["meta", "set", "big", &value, path_str(&disk)]);
    let out = vdiskmanager(&["meta", "get", "big", path_str(&disk)]);
    assert_eq!(stdout_text(&out).trim_end(), value);
    run("qemu-img", &["check", "-f", "vmdk", path_str(&disk)]);
    assert!(qemu_raw(&disk)[..65536].iter().all(|&b| b == 7));
}

#[test]
fn rename_with_dash_n_then_unlink_removes_every_file() {
    let dir = tempdir();
    let disk = create(dir.path(), "a.vmdk", 1, "64MB");
    let renamed = dir.path().join("b.vmdk");
    vdiskmanager(&["-q", "-n", path_str(&disk), path_str(&renamed)]);
    assert_eq!(
        files_in(dir.path()),
        vec!["b-s001.vmdk".to_string(), "b.vmdk".to_string()]
    );
    vdiskmanager_info(&renamed);
    vdiskmanager(&["unlink", path_str(&renamed)]);
    assert!(
        files_in(dir.path()).is_empty(),
        "{:?}",
        files_in(dir.path())
    );
    let out = vdiskmanager_failing(&["unlink", path_str(&renamed)]);
    assert_one_error_line("unlink of a missing disk", &out);
}

/// A monolithicSparse file of `sectors` sectors with 1-sector grains whose grain
/// tables alternate allocated and unallocated grains (every allocated entry names the
/// same data sector): a file of about 2 MiB whose allocation map has one range per
/// sector.
fn alternating_sparse(path: &Path, sectors: u64) {
    use vdisk::extent::sparse::header::new_sparse_header;
    use vdisk::storage::{FileStorage, Storage};
    let h = new_sparse_header(sectors, 1, 20).unwrap();
    let name = path.file_name().unwrap().to_str().unwrap();
    let descriptor = format!(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
         createType=\"monolithicSparse\"\n\nRW {sectors} SPARSE \"{name}\"\n"
    );
    let f = FileStorage::create_new(path).unwrap();
    vdisk::ops::create::write_new_sparse(&f, &h, Some(descriptor.as_bytes())).unwrap();
    let data = h.overhead;
    f.write_all_at(&[0x5a; 512], data * 512).unwrap();
    let table: Vec<u8> = (0..h.num_gtes_per_gt)
        .flat_map(|i| if i % 2 == 0 { data as u32 } else { 0 }.to_le_bytes())
        .collect();
    let mut gd = vec![0u8; (h.num_gdes() * 4) as usize];
    f.read_exact_at(&mut gd, h.gd_offset * 512).unwrap();
    for e in gd.chunks(4) {
        let gt = u32::from_le_bytes(e.try_into().unwrap());
        f.write_all_at(&table, u64::from(gt) * 512).unwrap();
    }
    f.sync().unwrap();
}

/// Runs `vdiskmanager args...` with its output in the file `out`; returns its peak
/// resident memory in KiB (GNU time, package `time`).
fn peak_rss_kib(args: &[&str], out: &Path) -> u64 {
    let time = vdisk_interop::require_tool_from("time", "time");
    let report = out.with_extension("rss");
    let status = Command::new(time)
        .args(["-f", "%M", "-o", path_str(&report)])
        .arg(vdiskmanager_bin())
        .args(args)
        .stdout(Stdio::from(std::fs::File::create(out).unwrap()))
        .status()
        .unwrap();
    assert!(status.success(), "vdiskmanager {args:?}: {status}");
    let text = std::fs::read_to_string(&report).unwrap();
    text.trim().lines().last().unwrap().parse().unwrap()
}

/// One entry of `map --json`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MapEntry {
    start: u64,
    length: u64,
    depth: u64,
    present: bool,
    zero: bool,
    data: bool,
}

/// One area of `cbt changes --json`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Area {
    start: u64,
    length: u64,
}

/// What `cbt changes --json` prints.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Changes {
    since: String,
    change_id: Option<String>,
    bytes: u64,
    areas: Vec<Area>,
}

/// `map --json` and `cbt changes --json` of a file whose allocation map has a
/// quarter of a million ranges are written as they are found: the output is complete
/// and parses, and the tool's peak memory stays small (building the whole document
/// first took hundreds of MiB; 2 GB for an 8.5 MB file of this kind).
#[test]
fn map_and_changes_json_of_very_many_ranges_stream_in_bounded_memory() {
    const SECTORS: u64 = 1 << 18;
    const LIMIT_KIB: u64 = 64 << 10;
    let dir = tempdir();
    let disk = dir.path().join("alt.vmdk");
    alternating_sparse(&disk, SECTORS);
    let out = dir.path().join("map.json");
    let rss = peak_rss_kib(&["map", "--json", path_str(&disk)], &out);
    let map: Vec<MapEntry> =
        serde_json::from_reader(std::io::BufReader::new(std::fs::File::open(&out).unwrap()))
            .expect("map --json output is not complete JSON");
    assert_eq!(map.len() as u64, SECTORS);
    let mut at = 0;
    for (i, r) in map.iter().enumerate() {
        assert_eq!((r.start, r.length, r.depth), (at, 512, 0), "entry {i}");
        let data = i % 2 == 0;
        assert_eq!(
            (r.data, r.present, r.zero),
            (data, data, !data),
            "entry {i}"
        );
        at += 512;
    }
    println!("map --json of {SECTORS} ranges: peak RSS {} KiB", rss);
    assert!(rss < LIMIT_KIB, "map --json peaked at {rss} KiB");
    let out = dir.path().join("changes.json");
    let rss = peak_rss_kib(
        &["cbt", "changes", "--json", "--since", "*", path_str(&disk)],
        &out,
    );
    let ch: Changes =
        serde_json::from_reader(std::io::BufReader::new(std::fs::File::open(&out).unwrap()))
            .expect("cbt changes --json output is not complete JSON");
    assert_eq!((ch.since.as_str(), ch.change_id), ("*", None));
    assert_eq!(ch.areas.len() as u64, SECTORS / 2);
    assert_eq!(ch.bytes, SECTORS / 2 * 512);
    for (i, a) in ch.areas.iter().enumerate() {
        assert_eq!((a.start, a.length), (i as u64 * 1024, 512), "area {i}");
    }
    println!(
        "cbt changes --json of {} areas: peak RSS {} KiB",
        SECTORS / 2,
        rss
    );
    assert!(rss < LIMIT_KIB, "cbt changes --json peaked at {rss} KiB");
    // The layout is the one of the whole document serde_json printed before (keys
    // sorted, two-space indents), on a small tracked disk with data.
    let small = create(dir.path(), "small.vmdk", 1, "8MB");
    let d = OpenOptions::new().write(true).open(&small).unwrap();
    d.write_at(&[1; 70_000], MIB).unwrap();
    d.close().unwrap();
    vdiskmanager(&["cbt", "enable", path_str(&small)]);
    for args in [
        vec!["map", "--json", path_str(&small)],
        vec!["cbt", "changes", "--json", path_str(&small)],
        vec!["map", "--json", path_str(&disk)],
    ] {
        let text = stdout_text(&vdiskmanager(&args));
        let whole: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            text,
            format!("{}\n", serde_json::to_string_pretty(&whole).unwrap()),
            "{args:?}"
        );
    }
}

/// A disk that opens and reads but whose allocation map cannot be walked (one grain
/// table entry points past the end of the file): `info` says what it knows from the
/// header and descriptor, allocated bytes unknown with the reason as a warning, exit
/// status 0; `--json` gives null and the warning.
#[test]
fn info_of_a_disk_with_one_bad_grain_table_entry_says_what_it_knows() {
    let dir = tempdir();
    let disk = vdisk_interop::sparse_with_a_grain_past_the_end(dir.path());
    // The library: reads elsewhere work, info answers.
    let d = Disk::open(&disk).unwrap();
    let mut buf = vec![0u8; 65536];
    d.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0x42));
    d.read_at(&mut buf, 6 * MIB).unwrap();
    assert!(d.read_at(&mut buf, 4 * MIB).is_err());
    let info = d.info().expect("info of a disk that opens and reads");
    assert_eq!(info.capacity, 8 * MIB);
    assert_eq!(info.allocated_bytes, None);
    assert_eq!(info.warnings.len(), 1, "{:?}", info.warnings);
    assert!(
        info.warnings[0].contains("allocated"),
        "{:?}",
        info.warnings
    );
    drop(d);
    // The CLI.
    let out = vdiskmanager(&["info", path_str(&disk)]);
    let text = stdout_text(&out);
    assert!(text.contains("Capacity:         8388608 bytes"), "{text}");
    assert!(text.contains("Allocated:        unknown"), "{text}");
    let err = stderr_text(&out);
    assert!(
        err.starts_with("vdiskmanager: warning: ") && err.contains("allocated"),
        "{err}"
    );
    let json: serde_json::Value = serde_json::from_str(&stdout_text(&vdiskmanager(&[
        "info",
        "--json",
        path_str(&disk),
    ])))
    .unwrap();
    assert_eq!(json["capacity"], 8 * MIB);
    assert_eq!(json["allocatedBytes"], serde_json::Value::Null);
    assert!(
        json["warnings"][0].as_str().unwrap().contains("allocated"),
        "{json}"
    );
    // A sound disk has no warnings.
    let sound = create(dir.path(), "sound.vmdk", 0, "8MB");
    let json = vdiskmanager_info(&sound);
    assert_eq!(json["allocatedBytes"], 0);
    assert_eq!(json["warnings"], serde_json::json!([]));
}

/// An empty 8 TB disk costs what its data costs (nothing), not what its size is:
/// `info` reports 0 allocated bytes and no warning (8 TB is within what VMware
/// supports for hosted disks; 9 TB draws one), `map --json` is one unallocated run,
/// and a convert to streamOptimized copies nothing and makes a small file - each in
/// under 128 MiB of memory (the grain directory of 8 TB alone is 1 MiB; its 512
/// MiB of preallocated, never-written grain tables are holes that are not read).
#[test]
fn an_empty_8_tb_disk_costs_its_data_not_its_size() {
    const LIMIT_KIB: u64 = 128 << 10;
    let dir = tempdir();
    let disk = dir.path().join("e8t.vmdk");
    let made = vdiskmanager(&["-c", "-s", "8TB", "-t", "0", "-q", path_str(&disk)]);
    assert!(
        !stderr_text(&made).contains("warning"),
        "{}",
        stderr_text(&made)
    );
    let out = dir.path().join("info.json");
    let rss = peak_rss_kib(&["info", "--json", path_str(&disk)], &out);
    let info: serde_json::Value =
        serde_json::from_reader(std::fs::File::open(&out).unwrap()).unwrap();
    assert_eq!(info["capacitySectors"].as_u64(), Some(8 << 31), "{info}");
    assert_eq!(info["allocatedBytes"].as_u64(), Some(0), "{info}");
    assert_eq!(info["warnings"].as_array().map(Vec::len), Some(0), "{info}");
    println!("info of an empty 8 TB disk: peak RSS {rss} KiB");
    assert!(rss < LIMIT_KIB, "info peaked at {rss} KiB");
    let out = dir.path().join("map.json");
    let rss = peak_rss_kib(&["map", "--json", path_str(&disk)], &out);
    let map: Vec<MapEntry> = serde_json::from_reader(std::fs::File::open(&out).unwrap()).unwrap();
    assert_eq!(map.len(), 1);
    assert_eq!(
        (map[0].start, map[0].length, map[0].data, map[0].zero),
        (0, 8 << 40, false, true)
    );
    println!("map of an empty 8 TB disk: peak RSS {rss} KiB");
    assert!(rss < LIMIT_KIB, "map peaked at {rss} KiB");
    let stream = dir.path().join("s.vmdk");
    let out = dir.path().join("convert.out");
    let rss = peak_rss_kib(
        &[
            "convert",
            "-q",
            "-f",
            "vmdk",
            "-O",
            "vmdk",
            "-t",
            "5",
            path_str(&disk),
            path_str(&stream),
        ],
        &out,
    );
    let size = std::fs::metadata(&stream).unwrap().len();
    println!("convert of an empty 8 TB disk to streamOptimized: {size} bytes, peak RSS {rss} KiB");
    assert!(rss < LIMIT_KIB, "convert peaked at {rss} KiB");
    assert!(
        size < 64 << 20,
        "an empty 8 TB streamOptimized disk takes {size} bytes"
    );
    vdisk_interop::assert_qemu_check_clean(&stream, "empty 8 TB streamOptimized");
    // 9 TB is more than VMware supports for monolithicSparse: a warning, not a refusal.
    let big = dir.path().join("e9t.vmdk");
    let made = vdiskmanager(&["-c", "-s", "9TB", "-t", "0", "-q", path_str(&big)]);
    assert!(
        stderr_text(&made).contains("more than VMware supports"),
        "{}",
        stderr_text(&made)
    );
}
