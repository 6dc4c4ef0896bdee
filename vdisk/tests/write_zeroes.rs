//! `Disk::write_zeroes` (NBD's WRITE_ZEROES and TRIM): zeroing allocates nothing where
//! the disk already reads zeros, hides a parent's data in a child, and with
//! `only_if_cheap` refuses before writing anything; and a non-persistent open sees
//! the disk's change history without recording its own (redo-log) writes.

use std::path::Path;

use vdisk::ops::child::create_child;
use vdisk::{cbt, create, CreateOptions, Disk, DiskType, ErrorKind, OpenOptions};

const MIB: u64 = 1 << 20;

fn read(p: &Path, off: u64, len: usize) -> Vec<u8> {
    let d = Disk::open(p).unwrap();
    let mut b = vec![0u8; len];
    d.read_at(&mut b, off).unwrap();
    b
}

#[test]
fn zeroing_empty_space_allocates_nothing_and_data_reads_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.vmdk");
    create(
        &p,
        &CreateOptions::new(DiskType::MonolithicSparse, 64 * MIB),
    )
    .unwrap();
    let d = OpenOptions::new().write(true).open(&p).unwrap();
    d.write_at(&[7u8; 100_000], 3 * MIB).unwrap();
    d.flush().unwrap();
    let len = std::fs::metadata(&p).unwrap().len();
    // All of an empty 32 MiB stretch: nothing to write.
    d.write_zeroes(32 * MIB, 32 * MIB, true).unwrap();
    d.write_zeroes(32 * MIB, 32 * MIB, false).unwrap();
    d.flush().unwrap();
    assert_eq!(
        std::fs::metadata(&p).unwrap().len(),
        len,
        "zeros allocated grains"
    );
    // Over data: the cheap variant refuses and changes nothing; the other zeroes.
    let e = d.write_zeroes(3 * MIB + 10, 5000, true).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotSupported);
    d.write_zeroes(3 * MIB + 10, 5000, false).unwrap();
    let e = d.write_zeroes(63 * MIB, 2 * MIB, false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfRange);
    d.close().unwrap();
    let got = read(&p, 3 * MIB, 100_000);
    assert!(got[..10].iter().all(|&b| b == 7));
    assert!(got[10..5010].iter().all(|&b| b == 0));
    assert!(got[5010..].iter().all(|&b| b == 7));
    assert!(vdisk::ops::check::check(&p, false).unwrap().is_clean());
}

#[test]
fn zeroing_in_a_child_hides_the_parents_data() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("b.vmdk");
    create(
        &base,
        &CreateOptions::new(DiskType::MonolithicSparse, 8 * MIB),
    )
    .unwrap();
    let d = OpenOptions::new().write(true).open(&base).unwrap();
    d.write_at(&[9u8; 200_000], 0).unwrap();
    d.close().unwrap();
    let child = dir.path().join("b-000001.vmdk");
    create_child(&base, &child, DiskType::MonolithicSparse).unwrap();
    let d = OpenOptions::new().write(true).open(&child).unwrap();
    d.write_zeroes(1000, 50_000, false).unwrap();
    d.close().unwrap();
    let got = read(&child, 0, 200_000);
    assert!(got[..1000].iter().all(|&b| b == 9));
    assert!(got[1000..51_000].iter().all(|&b| b == 0));
    assert!(got[51_000..].iter().all(|&b| b == 9));
    assert!(
        read(&base, 1000, 100).iter().all(|&b| b == 9),
        "the parent changed"
    );
}

#[test]
fn a_non_persistent_open_sees_the_history_and_does_not_add_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.vmdk");
    create(&p, &CreateOptions::new(DiskType::MonolithicSparse, 8 * MIB)).unwrap();
    let id = cbt::enable(&p).unwrap();
    let d = OpenOptions::new().write(true).open(&p).unwrap();
    d.write_at(&[1u8; 4096], MIB).unwrap();
    d.close().unwrap();
    let np = OpenOptions::new().non_persistent(true).open(&p).unwrap();
    np.write_at(&[2u8; 4096], 4 * MIB).unwrap();
    assert_eq!(
        np.changed_areas(&id, 0, 8 * MIB).unwrap(),
        vec![(MIB, 4096)]
    );
    drop(np);
    let d = Disk::open(&p).unwrap();
    assert_eq!(d.changed_areas(&id, 0, 8 * MIB).unwrap(), vec![(MIB, 4096)]);
    assert!(d.tracker().unwrap().status().unwrap().invalid.is_none());
}
