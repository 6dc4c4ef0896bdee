//! Cost that follows the data, checked by what it leaves behind (no timing): an
//! empty 8 TB disk maps as one unallocated run; holes of raw sources and flat
//! extents are no data (map, convert); writes of zeros where the disk reads zeros
//! allocate nothing, and read back as written.

mod common;

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use common::{new_sparse, Rng};
use vdisk::ops::child::create_child;
use vdisk::ops::convert::{convert, ConvertOptions, ImageFormat};
use vdisk::{create, CreateOptions, Disk, DiskType, OpenOptions, RangeKind};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

fn kinds(d: &Disk) -> Vec<(u64, u64, RangeKind)> {
    d.allocation_map(0, d.capacity())
        .unwrap()
        .into_iter()
        .map(|r| (r.offset, r.length, r.kind))
        .collect()
}

fn data_bytes(d: &Disk) -> u64 {
    d.allocated_bytes().unwrap()
}

/// Bytes the file takes on the host.
fn on_host(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

#[test]
fn an_empty_8_tb_sparse_disk_maps_as_one_unallocated_run() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("e8t.vmdk");
    create(&p, &CreateOptions::new(DiskType::MonolithicSparse, 8 * TIB)).unwrap();
    let d = Disk::open(&p).unwrap();
    assert_eq!(kinds(&d), vec![(0, 8 * TIB, RangeKind::Unallocated)]);
    assert_eq!(data_bytes(&d), 0);
    let info = d.info().unwrap();
    assert_eq!(info.allocated_bytes, Some(0));
    assert!(info.warnings.is_empty(), "{:?}", info.warnings);
    drop(d);
    // Beyond what VMware supports for the type: a warning, not a refusal.
    let big = dir.path().join("e9t.vmdk");
    create(
        &big,
        &CreateOptions::new(DiskType::MonolithicSparse, 9 * TIB),
    )
    .unwrap();
    let info = Disk::open(&big).unwrap().info().unwrap();
    assert_eq!(info.allocated_bytes, Some(0));
    assert!(
        info.warnings
            .iter()
            .any(|w| w.contains("more than VMware supports")),
        "{:?}",
        info.warnings
    );
    // One grain written in the middle: the map finds it, and only it.
    let d = OpenOptions::new().write(true).open(&p).unwrap();
    d.write_at(&[9u8; 4096], 5 * TIB + 64 * KIB).unwrap();
    d.close().unwrap();
    let d = Disk::open(&p).unwrap();
    let data: Vec<_> = kinds(&d)
        .into_iter()
        .filter(|r| r.2 == RangeKind::Data)
        .collect();
    assert_eq!(data, vec![(5 * TIB + 64 * KIB, 64 * KIB, RangeKind::Data)]);
    let mut b = vec![0u8; 8192];
    d.read_at(&mut b, 5 * TIB + 64 * KIB - 4096).unwrap();
    assert!(b[..4096].iter().all(|&x| x == 0) && b[4096..].iter().all(|&x| x == 9));
}

#[test]
fn a_grain_table_written_after_the_map_saw_a_hole_is_seen() {
    // The map remembers a hole of the file; writing into a table inside it must
    // not leave that memory stale.
    let dir = tempfile::tempdir().unwrap();
    let (_, d) = new_sparse(dir.path(), "d.vmdk", 64 * GIB);
    let mut rng = Rng(3);
    let mut written = Vec::new();
    for _ in 0..40 {
        assert_eq!(
            kinds(&d).iter().filter(|r| r.2 == RangeKind::Data).count() > 0,
            !written.is_empty()
        );
        let off = rng.below(64 * GIB / (64 * KIB)) * 64 * KIB;
        d.write_at(&[1u8; 512], off).unwrap();
        d.flush().unwrap();
        written.push(off);
        let got: u64 = data_bytes(&d);
        written.sort();
        written.dedup();
        assert_eq!(got, written.len() as u64 * 64 * KIB);
    }
}

#[test]
fn holes_of_a_raw_source_and_of_a_flat_extent_are_not_data() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("sparse.raw");
    let f = File::create(&raw).unwrap();
    f.set_len(5 * GIB).unwrap();
    let mut rng = Rng(11);
    let runs = [(7 * MIB, MIB), (GIB + 3 * MIB, MIB), (4 * GIB, 2 * MIB)];
    for &(o, l) in &runs {
        f.write_all_at(&rng.bytes(l as usize), o).unwrap();
    }
    drop(f);
    for t in [
        DiskType::MonolithicSparse,
        DiskType::MonolithicFlat,
        DiskType::StreamOptimized,
    ] {
        let out = dir.path().join(format!("{t:?}.vmdk"));
        convert(
            &raw,
            ImageFormat::Raw,
            &out,
            ImageFormat::Vmdk,
            &ConvertOptions::new(t),
            &mut |_, _| true,
        )
        .unwrap();
        let d = Disk::open(&out).unwrap();
        // Flat: the converted file is sparse too; the map says where its data is.
        assert_eq!(data_bytes(&d), 4 * MIB, "{t:?}");
        let mut b = vec![0u8; MIB as usize];
        let mut want = vec![0u8; MIB as usize];
        for &(o, _) in &runs {
            d.read_at(&mut b, o).unwrap();
            File::open(&raw)
                .unwrap()
                .read_exact_at(&mut want, o)
                .unwrap();
            assert!(b == want, "{t:?} at {o}");
        }
        assert!(
            on_host(&out) < 64 * MIB,
            "{t:?}: {} bytes on the host",
            on_host(&out)
        );
    }
    // An all-hole flat disk: one zero run; converting it writes no data.
    let flat = dir.path().join("empty-flat.vmdk");
    create(
        &flat,
        &CreateOptions::new(DiskType::MonolithicFlat, 16 * GIB),
    )
    .unwrap();
    let d = Disk::open(&flat).unwrap();
    assert_eq!(kinds(&d), vec![(0, 16 * GIB, RangeKind::Zero)]);
    let out = dir.path().join("from-flat.vmdk");
    let stats = convert(
        &flat,
        ImageFormat::Vmdk,
        &out,
        ImageFormat::Vmdk,
        &ConvertOptions::new(DiskType::MonolithicSparse),
        &mut |_, _| true,
    )
    .unwrap();
    assert_eq!(stats.written, 0);
}

#[test]
fn zeros_written_where_the_disk_reads_zeros_allocate_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (p, d) = new_sparse(dir.path(), "d.vmdk", 64 * MIB);
    let mut rng = Rng(5);
    // A half-empty image, written whole as a VDDK client copying it does.
    let mut image = vec![0u8; 64 * MIB as usize];
    let mut data = 0;
    for slot in 0..64u64 {
        if slot % 2 == 0 {
            let at = (slot * MIB) as usize;
            rng.fill(&mut image[at..at + MIB as usize]);
            data += MIB;
        }
    }
    // Unaligned pieces, so zero grains sit at both edges of some writes.
    let mut at = 0usize;
    while at < image.len() {
        let n = (rng.range(1, 3 * MIB) as usize).min(image.len() - at) / 512 * 512;
        let n = n.max(512).min(image.len() - at);
        d.write_at(&image[at..at + n], at as u64).unwrap();
        at += n;
    }
    d.flush().unwrap();
    assert_eq!(data_bytes(&d), data);
    let mut back = vec![0u8; image.len()];
    d.read_at(&mut back, 0).unwrap();
    assert!(back == image);
    // Zeros over data are written (the data is gone; its grains stay allocated),
    // zeros elsewhere are not.
    d.write_at(&vec![0u8; 3 * MIB as usize], 0).unwrap();
    assert_eq!(data_bytes(&d), data);
    let mut b = vec![1u8; 3 * MIB as usize];
    d.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    // The grain that held data now holds zeros: still allocated, reads zeros.
    assert!(kinds(&d).iter().any(|r| r.0 == 0 && r.2 == RangeKind::Data));
    d.close().unwrap();
    let d = Disk::open(&p).unwrap();
    let mut back = vec![0u8; image.len()];
    d.read_at(&mut back, 0).unwrap();
    image[..3 * MIB as usize].fill(0);
    assert!(back == image);
}

/// Bytes of every file of the link whose descriptor is `child.vmdk` in `dir`.
fn child_file_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().starts_with("child"))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

/// Zeros written over a parent's data hide it, and whole grains of them are marked
/// zeroed (hosted sparse: entry 1 in a file that becomes version 2; seSparse: type 2
/// entries) rather than stored; COWD has no such entry and stores them. A partial
/// grain of zeros is still completed from the parent.
#[test]
fn zeros_over_a_parents_data_are_marked_not_stored() {
    for (ty, marks) in [
        (DiskType::MonolithicSparse, true),
        (DiskType::SeSparse, true),
        (DiskType::VmfsSparse, false),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (base, d) = new_sparse(dir.path(), "base.vmdk", 8 * MIB);
        d.write_at(&[7u8; 4 * MIB as usize], MIB).unwrap();
        drop(d);
        let child = dir.path().join("child.vmdk");
        create_child(&base, &child, ty).unwrap();
        let before = child_file_bytes(dir.path());
        let d = OpenOptions::new().write(true).open(&child).unwrap();
        // 2 MiB of whole grains of zeros through write_at, 1 MiB through
        // write_zeroes, and 1000 zero bytes inside a grain.
        d.write_at(&vec![0u8; 2 * MIB as usize], MIB).unwrap();
        d.write_zeroes(3 * MIB, MIB, false).unwrap();
        d.write_at(&[0u8; 1000], 4 * MIB + 100).unwrap();
        d.close().unwrap();
        let d = Disk::open(&child).unwrap();
        let mut b = vec![1u8; 8 * MIB as usize];
        d.read_at(&mut b, 0).unwrap();
        let mut want = vec![0u8; 8 * MIB as usize];
        want[4 * MIB as usize..5 * MIB as usize].fill(7);
        want[4 * MIB as usize + 100..4 * MIB as usize + 1100].fill(0);
        assert!(b == want, "{ty:?}: does not read as written");
        let grown = child_file_bytes(dir.path()) - before;
        if marks {
            assert!(
                grown < 256 * KIB,
                "{ty:?}: 3 MiB of zeros grew the child by {grown} bytes"
            );
            // The child answers for the whole grains as zeros, not as data.
            let child_says: Vec<_> = d
                .allocation_map(0, d.capacity())
                .unwrap()
                .into_iter()
                .filter(|r| r.depth == 0)
                .map(|r| (r.offset, r.length, r.kind))
                .collect();
            let g = d.grain_bytes();
            assert!(
                child_says
                    .iter()
                    .any(|&(o, l, k)| k == RangeKind::Zero && o <= MIB && o + l >= 4 * MIB),
                "{ty:?}: {child_says:?}"
            );
            // The parent's last MiB shows through, but for the grain written partly.
            let in_child: u64 = child_says
                .iter()
                .filter(|r| r.2 == RangeKind::Data)
                .map(|r| r.1)
                .sum();
            assert_eq!(in_child, g, "{ty:?}: only the partial grain is data");
        } else {
            assert!(grown >= 3 * MIB, "{ty:?}: grew by only {grown} bytes");
        }
        if ty == DiskType::MonolithicSparse {
            let mut h = [0u8; 12];
            File::open(&child)
                .unwrap()
                .read_exact_at(&mut h, 0)
                .unwrap();
            assert_eq!(&h[4..8], &2u32.to_le_bytes(), "version");
            assert_eq!(
                u32::from_le_bytes(h[8..12].try_into().unwrap()) & 4,
                4,
                "zeroed-grain flag"
            );
        }
    }
}
