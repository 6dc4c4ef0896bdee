//! Disks made by other tools (`/work/shared/corpus/third-party`, see its README.md):
//! each reads to the content `expected.tsv` gives, or is refused cleanly, as listed -
//! through the library, `vdiskmanager convert` and `vdiskmanager -e`.
//!
//! `expected.tsv`: file, virtual bytes, sha256 of the raw content, expectation:
//! `read` (must read exactly this), `refuse` (must fail cleanly: exit status 1, one
//! error line, no panic, no output file), `refuse-or-read` (either).

use std::path::{Path, PathBuf};

use vdisk::Disk;
use vdisk_interop::{
    path_str, run_unchecked, sha256_file, sha256_ours, stderr_text, tempdir, vdiskmanager_bin,
};

fn corpus() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus/third-party");
    assert!(
        dir.join("expected.tsv").is_file(),
        "the third-party corpus was not found at {}",
        dir.display()
    );
    dir
}

struct Row {
    file: String,
    bytes: u64,
    sha256: String,
    expect: String,
}

fn rows() -> Vec<Row> {
    let text = std::fs::read_to_string(corpus().join("expected.tsv")).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let c: Vec<&str> = l.split('\t').collect();
            assert_eq!(c.len(), 4, "expected.tsv line: {l}");
            Row {
                file: c[0].to_string(),
                bytes: c[1].parse().unwrap(),
                sha256: c[2].to_string(),
                expect: c[3].to_string(),
            }
        })
        .collect()
}

/// A copy of the file in a fresh folder under its own name (an embedded descriptor
/// names its own file; the corpus itself is read-only).
fn copy(row: &Row) -> (tempfile::TempDir, PathBuf) {
    let dir = tempdir();
    let src = corpus().join(&row.file);
    let dst = dir.path().join(src.file_name().unwrap());
    std::fs::copy(&src, &dst).unwrap();
    (dir, dst)
}

/// Whether the library reads the whole disk; with the sha256 of what it read.
fn library_read(p: &Path) -> Result<(u64, String), String> {
    let d = Disk::open(p).map_err(|e| e.to_string())?;
    let cap = d.capacity();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < cap {
        let n = (cap - off).min(buf.len() as u64) as usize;
        d.read_at(&mut buf[..n], off).map_err(|e| e.to_string())?;
        off += n as u64;
    }
    drop(d);
    Ok((cap, sha256_ours(p)))
}

#[test]
fn third_party_disks_read_to_their_content_or_are_refused() {
    let rows = rows();
    assert!(rows.len() >= 6, "expected.tsv lists {} files", rows.len());
    for row in &rows {
        let ctx = format!("{} ({})", row.file, row.expect);
        let (dir, p) = copy(row);
        let before = std::fs::read(&p).unwrap();
        let lib = library_read(&p);
        let out = dir.path().join("out.raw");
        let conv = run_unchecked(
            vdiskmanager_bin(),
            &[
                "convert",
                "-q",
                "-f",
                "vmdk",
                "-O",
                "raw",
                path_str(&p),
                path_str(&out),
            ],
        );
        let check = run_unchecked(vdiskmanager_bin(), &["-e", path_str(&p)]);
        let read_ok = match row.expect.as_str() {
            "read" => true,
            "refuse" => false,
            "refuse-or-read" => lib.is_ok(),
            other => panic!("{ctx}: unknown expectation {other}"),
        };
        if read_ok {
            let (cap, sha) = lib.unwrap_or_else(|e| panic!("{ctx}: the library refuses it: {e}"));
            assert_eq!(cap, row.bytes, "{ctx}: capacity");
            assert_eq!(sha, row.sha256, "{ctx}: content read by the library");
            assert!(
                conv.status.success(),
                "{ctx}: convert: {}",
                stderr_text(&conv)
            );
            assert_eq!(sha256_file(&out), row.sha256, "{ctx}: content converted");
            assert!(
                check.status.success(),
                "{ctx}: vdiskmanager -e: {}{}",
                String::from_utf8_lossy(&check.stdout),
                stderr_text(&check)
            );
        } else {
            assert!(
                lib.is_err(),
                "{ctx}: the library reads a file it must refuse"
            );
            for (what, o) in [("convert", &conv), ("-e", &check)] {
                assert_eq!(o.status.code(), Some(1), "{ctx}: {what} exit status");
                let err = stderr_text(o);
                assert!(!err.contains("panicked"), "{ctx}: {what} panicked: {err}");
            }
            let err = stderr_text(&conv);
            assert_eq!(
                err.lines().count(),
                1,
                "{ctx}: convert must print one error line: {err}"
            );
            assert!(err.starts_with("vdiskmanager: error:"), "{ctx}: {err}");
            assert!(
                !out.exists(),
                "{ctx}: a refused convert left {} behind",
                out.display()
            );
        }
        assert_eq!(
            std::fs::read(&p).unwrap(),
            before,
            "{ctx}: the file changed"
        );
    }
}

/// The truncated VMware export (no footer, no end-of-stream marker) is refused with a
/// message that says so, where it once read as zeros past the cut.
#[test]
fn the_truncated_stream_is_refused_as_truncated() {
    let row = rows()
        .into_iter()
        .find(|r| r.file.starts_with("govmomi/"))
        .unwrap();
    let (_dir, p) = copy(&row);
    let e = Disk::open(&p).expect_err("a truncated stream");
    assert!(e.to_string().contains("truncated"), "{e}");
    let check = run_unchecked(vdiskmanager_bin(), &["-e", path_str(&p)]);
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(
        text.contains("truncated"),
        "vdiskmanager -e does not report the truncation: {text}{}",
        stderr_text(&check)
    );
}
