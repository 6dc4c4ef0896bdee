//! Check and repair stay within bounded memory whatever a file holds (their own test
//! binary, one test, so the process's peak memory is theirs alone).
//!
//! Two crafted files made the earlier check and repair allocate without bound:
//! * a hosted sparse file whose 4 Mi directory entries (and as many redundant ones)
//!   all name one table whose entry names one grain: one finding per entry (millions
//!   of them) - check alone went past 10 GB on a file of this kind;
//! * a table whose 4096 entries all name one 1 MiB grain: repair held a copy of the
//!   grain for every entry (4 GB) before writing any.
//!
//! Each case: the peak resident memory of check and of repair (reset before each
//! through `/proc/self/clear_refs`) stays under [`LIMIT_MIB`]; findings beyond the
//! listed ones are counted; after the repair the disk checks clean and a second
//! repair writes nothing.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vdisk::extent::sparse::header::{SparseHeader, FLAG_REDUNDANT_GD, FLAG_VALID_NEWLINE};
use vdisk::ops::check::{check, MAX_LISTED_FINDINGS};

const SECTOR: u64 = 512;
const LIMIT_MIB: u64 = 256;

fn peak_rss_mib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        / 1024
}

fn reset_peak() {
    // "5" resets the peak resident set size (Linux >= 4.0).
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
}

fn descriptor(capacity: u64) -> Vec<u8> {
    format!(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"monolithicSparse\"\n\nRW {capacity} SPARSE \"x.vmdk\"\n\nddb.adapterType = \"lsilogic\"\n"
    )
    .into_bytes()
}

/// A monolithic sparse file: header, descriptor (20 sectors from sector 1), the
/// redundant directory, the directory, then `body` placed by the caller.
struct Crafted {
    file: File,
    header: SparseHeader,
}

fn craft(path: &Path, capacity: u64, grain: u64, gtes: u32) -> Crafted {
    let mut h = SparseHeader {
        version: 1,
        flags: FLAG_VALID_NEWLINE | FLAG_REDUNDANT_GD,
        capacity,
        grain_size: grain,
        descriptor_offset: 1,
        descriptor_size: 20,
        num_gtes_per_gt: gtes,
        rgd_offset: 21,
        gd_offset: 0,
        overhead: 0,
        unclean_shutdown: false,
        compress_algorithm: 0,
    };
    h.gd_offset = h.rgd_offset + h.gd_sectors();
    h.overhead = (h.gd_offset + h.gd_sectors()).div_ceil(grain) * grain;
    let file = File::create(path).unwrap();
    file.write_all_at(&h.to_bytes(), 0).unwrap();
    file.write_all_at(&descriptor(capacity), SECTOR).unwrap();
    Crafted { file, header: h }
}

impl Crafted {
    fn put_u32s(&self, sector: u64, values: &[u32]) {
        let b: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.file.write_all_at(&b, sector * SECTOR).unwrap();
    }
}

/// 4 Mi directory entries (and redundant ones) naming one table each; each table's
/// one entry names one grain.
fn all_share_one_table(dir: &Path) -> PathBuf {
    let p = dir.join("x.vmdk");
    let n: u64 = 1 << 22;
    let c = craft(&p, n, 1, 1);
    let h = &c.header;
    assert_eq!(h.num_gdes(), n);
    let t = h.overhead;
    let t2 = t + 1;
    let g = t + 2;
    c.put_u32s(h.gd_offset, &vec![t as u32; n as usize]);
    c.put_u32s(h.rgd_offset, &vec![t2 as u32; n as usize]);
    c.put_u32s(t, &[g as u32]);
    c.put_u32s(t2, &[g as u32]);
    c.file.write_all_at(&[0xa5; 512], g * SECTOR).unwrap();
    p
}

/// One table of 4096 entries naming one 1 MiB grain.
fn all_share_one_grain(dir: &Path) -> PathBuf {
    let p = dir.join("x.vmdk");
    let grain = 2048;
    let c = craft(&p, 4096 * grain, grain, 4096);
    let h = &c.header;
    let t = h.overhead;
    let t2 = t + h.gt_sectors();
    let g = (t2 + h.gt_sectors()).div_ceil(grain) * grain;
    c.put_u32s(h.gd_offset, &[t as u32]);
    c.put_u32s(h.rgd_offset, &[t2 as u32]);
    c.put_u32s(t, &[g as u32; 4096]);
    c.put_u32s(t2, &[g as u32; 4096]);
    c.file
        .write_all_at(&vec![0x5a; (grain * SECTOR) as usize], g * SECTOR)
        .unwrap();
    p
}

#[test]
fn check_and_repair_memory_is_bounded() {
    type Build = fn(&Path) -> PathBuf;
    let cases: [(&str, Build); 2] = [
        (
            "4 Mi directory entries share one table",
            all_share_one_table,
        ),
        ("4096 entries share one 1 MiB grain", all_share_one_grain),
    ];
    for (name, build) in cases {
        let dir = tempfile::tempdir().unwrap();
        let p = build(dir.path());
        let size = std::fs::metadata(&p).unwrap().len();
        reset_peak();
        let t = std::time::Instant::now();
        let found = check(&p, false).unwrap_or_else(|e| panic!("{name}: check: {e}"));
        let check_peak = peak_rss_mib();
        let check_time = t.elapsed();
        assert!(!found.is_clean(), "{name}: nothing found");
        reset_peak();
        let t = std::time::Instant::now();
        let fixed = check(&p, true).unwrap_or_else(|e| panic!("{name}: repair: {e}"));
        let repair_peak = peak_rss_mib();
        let repair_time = t.elapsed();
        let grown = std::fs::metadata(&p).unwrap().len();
        println!(
            "{name} ({size} bytes): {} problems ({} listed); check {check_peak} MiB {:.1} s, repair {repair_peak} MiB {:.1} s; file {size} -> {grown} bytes",
            found.problems(),
            found.findings.len(),
            check_time.as_secs_f64(),
            repair_time.as_secs_f64()
        );
        assert!(
            check_peak < LIMIT_MIB,
            "{name}: check peaked at {check_peak} MiB"
        );
        assert!(
            repair_peak < LIMIT_MIB,
            "{name}: repair peaked at {repair_peak} MiB"
        );
        assert!(found.findings.len() <= MAX_LISTED_FINDINGS);
        assert!(
            fixed.repaired && fixed.unrepaired() == 0,
            "{name}: {:?}",
            &fixed.findings[..fixed.findings.len().min(5)]
        );
        // Repair must not grow a small file without bound either.
        assert!(
            grown <= size + (128 << 20),
            "{name}: the file grew to {grown} bytes"
        );
        let again = check(&p, false).unwrap();
        assert!(
            again.is_clean(),
            "{name}: {:?}",
            &again.findings[..again.findings.len().min(5)]
        );
        let twice = check(&p, true).unwrap();
        assert!(
            !twice.repaired && twice.is_clean(),
            "{name}: a second repair wrote"
        );
    }
}
