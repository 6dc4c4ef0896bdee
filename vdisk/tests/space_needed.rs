//! SpaceNeededForClone: the estimate is an upper bound of what a clone really takes.

use vdisk::ops::space::space_needed_for_clone;
use vdisk::{
    convert, create, ConvertOptions, CreateOptions, Disk, DiskType, ImageFormat, OpenOptions,
};

fn file_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

#[test]
fn estimate_bounds_the_real_clone_size_of_every_type() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.vmdk");
    create(
        &src,
        &CreateOptions::new(DiskType::MonolithicSparse, 40 << 20),
    )
    .unwrap();
    let d = OpenOptions::new().write(true).open(&src).unwrap();
    for i in 0..20u64 {
        d.write_at(&[i as u8 + 1; 100_000], i * (2 << 20) + 4096)
            .unwrap();
    }
    d.close().unwrap();
    let disk = Disk::open(&src).unwrap();
    for t in [
        DiskType::MonolithicSparse,
        DiskType::TwoGbMaxExtentSparse,
        DiskType::MonolithicFlat,
        DiskType::TwoGbMaxExtentFlat,
        DiskType::Vmfs,
        DiskType::StreamOptimized,
    ] {
        let estimate = space_needed_for_clone(&disk, t).unwrap();
        let out = tempfile::tempdir().unwrap();
        let dst = out.path().join("dst.vmdk");
        convert(
            &src,
            ImageFormat::Vmdk,
            &dst,
            ImageFormat::Vmdk,
            &ConvertOptions::new(t),
            &mut |_, _| true,
        )
        .unwrap();
        let real = file_bytes(out.path());
        assert!(
            real <= estimate,
            "{t}: clone takes {real} bytes, estimate {estimate}"
        );
        // Not absurdly pessimistic for sparse types either.
        if t.is_sparse() {
            assert!(estimate < 8 << 20, "{t}: estimate {estimate}");
        }
    }
}
