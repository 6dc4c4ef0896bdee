//! streamOptimized files in every layout found in the wild, built here byte by byte:
//! footer at the end (with and without padding or junk after it), no directory at
//! all (map rebuilt from markers, unordered grains, progress markers), the directory
//! up front (VMware's layout) with a partial last grain; and damaged grains.

use std::io::Write;
use std::path::Path;

use flate2::write::ZlibEncoder;
use flate2::Compression;
use vdisk::{Disk, ErrorKind};

const GRAIN: u64 = 128; // sectors
const GB: usize = (GRAIN * 512) as usize;

#[derive(Clone, Copy, PartialEq)]
enum Layout {
    /// gdOffset = GD_AT_END; GT, GD, footer and EOS markers at the end.
    FooterAtEnd,
    /// gdOffset = GD_AT_END, only grain markers and an EOS: the map must be rebuilt.
    NoDirectory,
    /// The directory and tables right after the descriptor (VMware's layout).
    HeaderGd,
}

struct Spec {
    capacity: u64, // sectors
    grains: Vec<(u64, Vec<u8>)>,
    layout: Layout,
    trailing: Vec<u8>,
    progress_markers: bool,
}

fn pad(buf: &mut Vec<u8>) {
    let n = buf.len().div_ceil(512) * 512;
    buf.resize(n, 0);
}

fn header(capacity: u64, gd_offset: u64) -> Vec<u8> {
    let mut h = vec![0u8; 512];
    h[0..4].copy_from_slice(b"KDMV");
    h[4..8].copy_from_slice(&3u32.to_le_bytes());
    h[8..12].copy_from_slice(&0x30001u32.to_le_bytes());
    h[12..20].copy_from_slice(&capacity.to_le_bytes());
    h[20..28].copy_from_slice(&GRAIN.to_le_bytes());
    h[28..36].copy_from_slice(&1u64.to_le_bytes());
    h[36..44].copy_from_slice(&20u64.to_le_bytes());
    h[44..48].copy_from_slice(&512u32.to_le_bytes());
    h[56..64].copy_from_slice(&gd_offset.to_le_bytes());
    h[64..72].copy_from_slice(&128u64.to_le_bytes());
    h[73..77].copy_from_slice(&[0x0a, 0x20, 0x0d, 0x0a]);
    h[77..79].copy_from_slice(&1u16.to_le_bytes());
    h
}

fn marker(num_sectors: u64, kind: u32) -> Vec<u8> {
    let mut m = vec![0u8; 512];
    m[0..8].copy_from_slice(&num_sectors.to_le_bytes());
    m[12..16].copy_from_slice(&kind.to_le_bytes());
    m
}

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut e = ZlibEncoder::new(Vec::new(), Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Builds the file; returns its bytes and the expected raw content.
fn build(spec: &Spec) -> (Vec<u8>, Vec<u8>) {
    let cap_bytes = (spec.capacity * 512) as usize;
    let n_grains = spec.capacity.div_ceil(GRAIN);
    let n_gts = n_grains.div_ceil(512);
    let gd_sectors = (n_gts * 4).div_ceil(512);
    let mut expected = vec![0u8; cap_bytes];
    let real_gd = 21u64;
    let gd_offset = if spec.layout == Layout::HeaderGd {
        real_gd
    } else {
        u64::MAX
    };
    let mut f = header(spec.capacity, gd_offset);
    let desc = format!(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"streamOptimized\"\n\nRW {} SPARSE \"s.vmdk\"\n\nddb.adapterType = \"lsilogic\"\n",
        spec.capacity
    );
    f.extend_from_slice(desc.as_bytes());
    f.resize(128 * 512, 0);
    let mut gts = vec![vec![0u32; 512]; n_gts as usize];
    for (i, (grain, data)) in spec.grains.iter().enumerate() {
        let start = (*grain * GRAIN * 512) as usize;
        let len = data.len().min(cap_bytes - start);
        expected[start..start + len].copy_from_slice(&data[..len]);
        if spec.progress_markers && i % 2 == 1 {
            f.extend_from_slice(&marker(0, 4));
        }
        let sector = (f.len() / 512) as u32;
        gts[(*grain / 512) as usize][(*grain % 512) as usize] = sector;
        let z = zlib(&data[..len]);
        f.extend_from_slice(&(*grain * GRAIN).to_le_bytes());
        f.extend_from_slice(&(z.len() as u32).to_le_bytes());
        f.extend_from_slice(&z);
        pad(&mut f);
    }
    match spec.layout {
        Layout::FooterAtEnd => {
            let mut gd = vec![0u32; n_gts as usize];
            for (i, gt) in gts.iter().enumerate() {
                if gt.iter().all(|&e| e == 0) {
                    continue; // empty tables are omitted
                }
                f.extend_from_slice(&marker(4, 1));
                gd[i] = (f.len() / 512) as u32;
                for e in gt {
                    f.extend_from_slice(&e.to_le_bytes());
                }
            }
            f.extend_from_slice(&marker(gd_sectors, 2));
            let gd_at = (f.len() / 512) as u64;
            for e in &gd {
                f.extend_from_slice(&e.to_le_bytes());
            }
            pad(&mut f);
            f.extend_from_slice(&marker(1, 3));
            f.extend_from_slice(&header(spec.capacity, gd_at));
        }
        Layout::HeaderGd => {
            let mut gd = Vec::new();
            for (i, gt) in gts.iter().enumerate() {
                let at = real_gd + gd_sectors + 4 * i as u64;
                gd.extend_from_slice(&(at as u32).to_le_bytes());
                let mut bytes = Vec::new();
                for e in gt {
                    bytes.extend_from_slice(&e.to_le_bytes());
                }
                let o = (at * 512) as usize;
                f[o..o + bytes.len()].copy_from_slice(&bytes);
            }
            let o = (real_gd * 512) as usize;
            f[o..o + gd.len()].copy_from_slice(&gd);
        }
        Layout::NoDirectory => {}
    }
    f.extend_from_slice(&marker(0, 0)); // EOS
    f.extend_from_slice(&spec.trailing);
    (f, expected)
}

fn data(seed: u64, len: usize, compressible: bool) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if compressible {
                b"the quick brown fox "[(i + seed as usize) % 20]
            } else {
                x as u8
            }
        })
        .collect()
}

fn spec(layout: Layout) -> Spec {
    // 40 MiB + 3 sectors: two grain tables, a partial last grain.
    let capacity = 40 * 2048 + 3;
    let last = capacity / GRAIN;
    Spec {
        capacity,
        grains: vec![
            (0, data(1, GB, true)),
            (3, data(2, GB, false)), // incompressible: compressed size > grain
            (511, data(3, GB, true)),
            (512, data(4, GB, true)),
            (600, data(5, GB, false)),
            (last, data(6, GB, true)),
        ],
        layout,
        trailing: Vec::new(),
        progress_markers: false,
    }
}

fn check(spec: &Spec) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.vmdk");
    let (bytes, expected) = build(spec);
    std::fs::write(&path, &bytes).unwrap();
    let disk = Disk::open(&path).unwrap();
    assert_eq!(disk.capacity(), spec.capacity * 512);
    let mut got = vec![0u8; expected.len()];
    disk.read_at(&mut got, 0).unwrap();
    assert!(got == expected, "content differs");
    // Small unaligned reads across grain boundaries.
    for off in [
        GB as u64 - 700,
        511 * GB as u64 + 100,
        expected.len() as u64 - 1500,
    ] {
        let mut b = vec![0u8; 1400];
        disk.read_at(&mut b, off).unwrap();
        assert_eq!(b, expected[off as usize..off as usize + 1400]);
    }
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes,
        "reading changed the file"
    );
    // The allocation map reports exactly the stored grains as data.
    let data_bytes: u64 = disk
        .allocation_map(0, disk.capacity())
        .unwrap()
        .iter()
        .filter(|r| r.kind == vdisk::RangeKind::Data)
        .map(|r| r.length)
        .sum();
    assert_eq!(data_bytes, 5 * GB as u64 + 3 * 512);
}

#[test]
fn stream_with_footer_at_end_reads_identical() {
    check(&spec(Layout::FooterAtEnd));
}

#[test]
fn stream_with_padding_after_the_end_marker_reads_identical() {
    let mut s = spec(Layout::FooterAtEnd);
    s.trailing = vec![0u8; 10 * 1024];
    check(&s);
}

#[test]
fn stream_with_odd_trailing_junk_reads_identical() {
    let mut s = spec(Layout::FooterAtEnd);
    s.trailing = data(9, 1001, false);
    check(&s);
}

#[test]
fn stream_without_any_directory_is_rebuilt_from_markers() {
    let mut s = spec(Layout::NoDirectory);
    s.progress_markers = true;
    s.grains.reverse(); // unordered grains
    check(&s);
}

#[test]
fn stream_with_directory_up_front_reads_identical() {
    check(&spec(Layout::HeaderGd));
}

fn damaged(f: impl FnOnce(&mut Vec<u8>)) -> vdisk::Error {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.vmdk");
    let (mut bytes, expected) = build(&spec(Layout::FooterAtEnd));
    f(&mut bytes);
    std::fs::write(&path, &bytes).unwrap();
    let before = std::fs::read(&path).unwrap();
    let e = match Disk::open(&path) {
        Ok(disk) => {
            let mut got = vec![0u8; expected.len()];
            disk.read_at(&mut got, 0).unwrap_err()
        }
        Err(e) => e,
    };
    assert_eq!(std::fs::read(Path::new(&path)).unwrap(), before);
    e
}

#[test]
fn corrupt_compressed_grain_is_an_invalid_disk_error() {
    // The first grain's zlib data starts at sector 128, byte 12.
    let e = damaged(|b| {
        for x in &mut b[128 * 512 + 14..128 * 512 + 40] {
            *x ^= 0x55;
        }
    });
    assert_eq!(e.kind(), ErrorKind::InvalidDisk, "{e}");
    assert!(e.to_string().contains("corrupt"), "{e}");
}

#[test]
fn grain_marker_with_wrong_lba_is_an_error() {
    let e = damaged(|b| b[128 * 512..128 * 512 + 8].copy_from_slice(&(GRAIN * 7).to_le_bytes()));
    assert_eq!(e.kind(), ErrorKind::InvalidDisk, "{e}");
}

#[test]
fn grain_marker_with_absurd_size_is_an_error() {
    let e = damaged(|b| b[128 * 512 + 8..128 * 512 + 12].copy_from_slice(&u32::MAX.to_le_bytes()));
    assert_eq!(e.kind(), ErrorKind::InvalidDisk, "{e}");
    assert!(e.to_string().contains("compressed size"), "{e}");
}
