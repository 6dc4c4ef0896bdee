//! Genuine VMware-made samples (`/work/shared/corpus/vmware`, see its README.md) read
//! to their documented content; unsupported and incomplete ones fail clearly.

use std::path::Path;

use tempfile::TempDir;
use vdisk::{Disk, ErrorKind};
use vdisk_interop::{
    corpus_dir, path_str, qemu_data_ranges, qemu_raw, read_all_ours, sha256_bytes, sha256_file,
    sha256_ours, stderr_text, tempdir, vdiskmanager_convert, vdiskmanager_data_ranges,
    vdiskmanager_failing, vdiskmanager_info,
};

/// Copies every sample into a fresh temporary folder (the corpus is read-only and
/// must never be opened by code that might write).
fn corpus_copy() -> TempDir {
    let dir = tempdir();
    for entry in std::fs::read_dir(corpus_dir()).expect("read corpus dir") {
        let entry = entry.expect("corpus entry");
        let name = entry.file_name();
        if Path::new(&name).extension().is_some_and(|e| e == "vmdk") {
            std::fs::copy(entry.path(), dir.path().join(&name)).expect("copy sample");
        }
    }
    dir
}

/// The sha256 the README's table gives for the row whose first cell starts with
/// `file`.
fn readme_sha256(file: &str) -> String {
    let readme =
        std::fs::read_to_string(corpus_dir().join("README.md")).expect("read corpus README");
    for line in readme.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() > 4 && cells[1].starts_with(file) {
            let sha = cells[4];
            assert!(
                sha.len() == 64 && sha.chars().all(|c| c.is_ascii_hexdigit()),
                "README row of {file} has no sha256: {line}"
            );
            return sha.to_string();
        }
    }
    panic!("README.md has no row for {file}");
}

/// The sample reads (through the library, streaming and whole, and through
/// `vdiskmanager convert -O raw`) to the README's sha256, and qemu agrees.
fn vmware_sample_reads_to_readme_sha256(file: &str, capacity: u64) {
    let expected = readme_sha256(file);
    let dir = corpus_copy();
    let disk = dir.path().join(file);
    let opened = Disk::open(&disk).unwrap_or_else(|e| panic!("{file}: {e}"));
    assert_eq!(opened.capacity(), capacity, "{file}: capacity");
    assert!(!opened.is_writable());
    drop(opened);

    let ours = read_all_ours(&disk);
    assert_eq!(sha256_bytes(&ours), expected, "{file}: vdisk read");
    assert_eq!(sha256_ours(&disk), expected, "{file}: vdisk streaming read");
    assert_eq!(
        sha256_bytes(&qemu_raw(&disk)),
        expected,
        "{file}: qemu reads a different content than the README says"
    );

    let raw = dir.path().join("out.raw");
    vdiskmanager_convert("vmdk", "raw", None, &disk, &raw);
    assert_eq!(sha256_file(&raw), expected, "{file}: vdiskmanager convert");
}

#[test]
fn vmware_monolithic_sparse_reads_to_readme_sha256() {
    vmware_sample_reads_to_readme_sha256("monolithicSparse.vmdk", 10_485_760);
}

#[test]
fn vmware_two_gb_sparse_reads_to_readme_sha256() {
    vmware_sample_reads_to_readme_sha256("twoGbMaxExtentSparse.vmdk", 10_485_760);
}

#[test]
fn vmware_vmfs_thick_reads_to_readme_sha256() {
    vmware_sample_reads_to_readme_sha256("vmfs_thick.vmdk", 2_097_152);
}

#[test]
fn vmware_stream_optimized_reads_to_readme_sha256() {
    // VMware's layout: grain directory near the front, only an end-of-stream marker.
    vmware_sample_reads_to_readme_sha256("streamOptimized.vmdk", 10_485_760);
}

#[test]
fn vmware_stream_optimized_refuses_write_opens() {
    let dir = corpus_copy();
    let disk = dir.path().join("streamOptimized.vmdk");
    let before = std::fs::read(&disk).unwrap();
    let e = vdisk::OpenOptions::new()
        .write(true)
        .open(&disk)
        .expect_err("stream disks cannot be written in place");
    assert_eq!(e.kind(), ErrorKind::NotSupported, "{e}");
    assert_eq!(std::fs::read(&disk).unwrap(), before, "file changed");
    let out = vdiskmanager_failing(&["meta", "set", "x", "y", path_str(&disk)]);
    assert!(
        stderr_text(&out).starts_with("vdiskmanager: error:"),
        "{}",
        stderr_text(&out)
    );
}

#[test]
fn vmware_descriptor_only_samples_fail_naming_the_missing_extent() {
    let dir = corpus_copy();
    for (file, missing) in [
        ("monolithicFlat.vmdk", "monolithicFlat-flat.vmdk"),
        ("twoGbMaxExtentFlat.vmdk", "twoGbMaxExtentFlat-f001.vmdk"),
        ("vmfs_thick-000001.vmdk", "vmfs_thick-000001-delta.vmdk"),
    ] {
        let disk = dir.path().join(file);
        let descriptor = std::fs::read_to_string(&disk).expect("read descriptor");
        assert!(
            descriptor.contains(&format!("\"{missing}\"")),
            "{file} does not name {missing}"
        );
        assert!(!dir.path().join(missing).exists());

        let e = Disk::open(&disk).expect_err("an extent is missing");
        assert_eq!(e.kind(), ErrorKind::FileNotFound, "{file}: {e}");
        assert!(
            e.to_string().contains(missing),
            "{file}: the error does not name {missing}: {e}"
        );

        let out = vdiskmanager_failing(&["info", path_str(&disk)]);
        let err = stderr_text(&out);
        assert!(
            err.starts_with("vdiskmanager: error:") && err.contains(missing),
            "{file}: vdiskmanager info stderr: {err}"
        );
    }
}

#[test]
fn vmware_monolithic_sparse_map_matches_qemu_map() {
    let dir = corpus_copy();
    let disk = dir.path().join("monolithicSparse.vmdk");
    let theirs = qemu_data_ranges(&disk);
    assert!(!theirs.is_empty(), "qemu sees no data in the sample");
    assert_eq!(vdiskmanager_data_ranges(&disk), theirs);
    let disk = dir.path().join("twoGbMaxExtentSparse.vmdk");
    assert_eq!(vdiskmanager_data_ranges(&disk), qemu_data_ranges(&disk));
}

#[test]
fn vmware_monolithic_sparse_info_reports_buslogic_and_geometry() {
    let dir = corpus_copy();
    let disk = dir.path().join("monolithicSparse.vmdk");
    let info = vdiskmanager_info(&disk);
    assert_eq!(info["capacity"].as_u64(), Some(10_485_760), "{info}");
    assert_eq!(info["adapterType"], "buslogic", "{info}");
    assert_eq!(info["createType"], "monolithicSparse", "{info}");
    assert_eq!(info["geometry"]["cylinders"].as_u64(), Some(301), "{info}");
    assert_eq!(info["geometry"]["heads"].as_u64(), Some(4), "{info}");
    assert_eq!(info["geometry"]["sectors"].as_u64(), Some(17), "{info}");
    assert_eq!(info["cid"], "00000000", "{info}");
    // Reading must not have modified the sample.
    assert_eq!(
        sha256_file(&disk),
        sha256_file(&corpus_dir().join("monolithicSparse.vmdk"))
    );
}
