//! `Disk::for_each_source`: the pieces it gives (host file ranges and ranges to
//! read) put back together equal `read_at` of the same range, on every base type
//! this library creates, through a chain, and for streamOptimized (compressed: nothing to send from the
//! file as it is).

mod common;

use std::os::unix::fs::FileExt;

use common::{assert_same, Rng};
use vdisk::ops::child::create_child;
use vdisk::ops::convert::{convert, ConvertOptions, ImageFormat};
use vdisk::{create, CreateOptions, DataSource, Disk, DiskType, OpenOptions};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const CAPACITY: u64 = 8 * MIB;

/// Pieces of each kind that `[offset, offset+len)` came in.
#[derive(Default, Debug)]
struct Counts {
    file: usize,
    read: usize,
}

/// `[offset, offset+len)` assembled from the pieces; checks they tile the range.
fn assemble(disk: &Disk, offset: u64, len: u64) -> (Vec<u8>, Counts) {
    let mut out = Vec::with_capacity(len as usize);
    let mut counts = Counts::default();
    let mut last: Option<DataSource<'_>> = None;
    disk.for_each_source(offset, len, |piece| {
        match piece {
            DataSource::File { fd, offset, length } => {
                counts.file += 1;
                let file = std::fs::File::from(fd.try_clone_to_owned().unwrap());
                let at = out.len();
                out.resize(at + length as usize, 0);
                file.read_exact_at(&mut out[at..], offset).unwrap();
            }
            DataSource::Read { offset: o, length } => {
                counts.read += 1;
                assert_eq!(o, offset + out.len() as u64, "pieces out of order");
                let at = out.len();
                out.resize(at + length as usize, 0);
                disk.read_at(&mut out[at..], o).unwrap();
            }
        }
        if let (Some(DataSource::Read { .. }), DataSource::Read { .. }) = (last, piece) {
            panic!("two read pieces back to back were not joined");
        }
        last = Some(piece);
        Ok(())
    })
    .unwrap();
    assert_eq!(out.len() as u64, len, "the pieces do not cover the range");
    (out, counts)
}

/// Random writes of 1 B - 200 KiB, some on grain boundaries.
fn scribble(disk: &Disk, rng: &mut Rng, n: usize) {
    for _ in 0..n {
        let len = rng.range(1, 200 * KIB);
        let off = rng.below(CAPACITY - len);
        disk.write_at(&rng.bytes(len as usize), off).unwrap();
    }
    disk.flush().unwrap();
}

fn check_ranges(disk: &Disk, rng: &mut Rng, ctx: &str) -> Counts {
    let mut total = Counts::default();
    let mut ranges = vec![(0, CAPACITY), (0, 1), (CAPACITY - 512, 512)];
    for _ in 0..40 {
        let len = rng.range(1, 3 * MIB);
        ranges.push((rng.below(CAPACITY - len), len));
    }
    for (off, len) in ranges {
        let (got, c) = assemble(disk, off, len);
        let mut want = vec![0u8; len as usize];
        disk.read_at(&mut want, off).unwrap();
        assert_same(&got, &want, off, ctx);
        total.file += c.file;
        total.read += c.read;
    }
    total
}

#[test]
fn pieces_equal_read_at_on_every_base_type_and_through_a_chain() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x50_75_72_63);
    for base_type in [
        DiskType::MonolithicSparse,
        DiskType::TwoGbMaxExtentSparse,
        DiskType::MonolithicFlat,
        DiskType::Vmfs,
        DiskType::VmfsThin,
    ] {
        let ctx = format!("{base_type:?}");
        let base = dir.path().join(format!("{base_type:?}.vmdk"));
        create(&base, &CreateOptions::new(base_type, CAPACITY)).unwrap();
        {
            let d = OpenOptions::new().write(true).open(&base).unwrap();
            scribble(&d, &mut rng, 30);
            let c = check_ranges(&d, &mut rng, &ctx);
            assert!(c.file > 0, "{ctx}: no piece came from the file");
        }
        let child = dir.path().join(format!("{base_type:?}-child.vmdk"));
        create_child(&base, &child, DiskType::MonolithicSparse).unwrap();
        let d = OpenOptions::new().write(true).open(&child).unwrap();
        scribble(&d, &mut rng, 30);
        let c = check_ranges(&d, &mut rng, &format!("{ctx} + child"));
        assert!(c.file > 0, "{ctx} + child: {c:?}");
        // Holes at the bottom of a chain are zeros to read; a flat (or thin, a flat file here) base has none.
        let flat = matches!(
            base_type,
            DiskType::MonolithicFlat | DiskType::Vmfs | DiskType::VmfsThin
        );
        assert_eq!(c.read > 0, !flat, "{ctx} + child: {c:?}");
    }
}

#[test]
fn a_stream_optimized_disk_is_read_not_sent() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(7);
    let sparse = dir.path().join("s.vmdk");
    create(
        &sparse,
        &CreateOptions::new(DiskType::MonolithicSparse, CAPACITY),
    )
    .unwrap();
    {
        let d = OpenOptions::new().write(true).open(&sparse).unwrap();
        scribble(&d, &mut rng, 20);
    }
    let stream = dir.path().join("stream.vmdk");
    convert(
        &sparse,
        ImageFormat::Vmdk,
        &stream,
        ImageFormat::Vmdk,
        &ConvertOptions::new(DiskType::StreamOptimized),
        &mut |_, _| true,
    )
    .unwrap();
    let d = Disk::open(&stream).unwrap();
    let c = check_ranges(&d, &mut rng, "streamOptimized");
    assert_eq!(c.file, 0, "a compressed grain was given as file bytes");
}

#[test]
fn a_range_past_the_end_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.vmdk");
    create(
        &p,
        &CreateOptions::new(DiskType::MonolithicSparse, CAPACITY),
    )
    .unwrap();
    let d = Disk::open(&p).unwrap();
    let e = d
        .for_each_source(CAPACITY - 512, 1024, |_| Ok(()))
        .unwrap_err();
    assert_eq!(e.kind(), vdisk::ErrorKind::OutOfRange);
    let e = d.for_each_source(u64::MAX, 2, |_| Ok(())).unwrap_err();
    assert_eq!(e.kind(), vdisk::ErrorKind::OutOfRange);
}
