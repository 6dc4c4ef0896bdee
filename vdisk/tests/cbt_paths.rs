//! Change tracking identifies a disk's files by what they are (device, inode, size,
//! modification time), never by how their names were spelled: a disk tracked
//! through one spelling of its path and written through another keeps its change
//! IDs, and a writer whose process changes its working folder after the open still
//! closes the sidecar it opened.
//!
//! The test changes the working folder, so it lives alone in this test binary.

use std::path::{Path, PathBuf};

use vdisk::{cbt, create, CreateOptions, Disk, DiskType, OpenOptions};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 8 * MIB;

/// Writes `len` bytes of `byte` at `offset` through the path spelled `spelling`.
fn write_through(spelling: &Path, offset: u64, len: usize, byte: u8) {
    let w = OpenOptions::new()
        .write(true)
        .open(spelling)
        .unwrap_or_else(|e| panic!("open {} for writing: {e}", spelling.display()));
    w.write_at(&vec![byte; len], offset).unwrap();
    w.close().unwrap();
}

/// The areas changed since `id`, read through `spelling`; a refused ID panics with
/// the spelling in the message.
fn changes(spelling: &Path, id: &str) -> Vec<(u64, u64)> {
    let d = Disk::open(spelling).unwrap();
    d.changed_areas(id, 0, SIZE).unwrap_or_else(|e| {
        panic!(
            "change ID {id} refused when the disk is opened as {}: {e}",
            spelling.display()
        )
    })
}

#[test]
fn change_ids_survive_every_spelling_of_the_path_and_a_change_of_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().canonicalize().unwrap();
    let dir = root.join("vm");
    std::fs::create_dir_all(dir.join("a")).unwrap();
    std::os::unix::fs::symlink(&dir, root.join("link")).unwrap();
    let away = root.join("elsewhere");
    std::fs::create_dir_all(&away).unwrap();
    std::env::set_current_dir(&dir).unwrap();
    for (n, t) in [
        DiskType::MonolithicSparse,
        DiskType::TwoGbMaxExtentSparse,
        DiskType::MonolithicFlat,
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("d{n}.vmdk");
        create(Path::new(&name), &CreateOptions::new(t, SIZE)).unwrap();
        let spellings: Vec<PathBuf> = vec![
            PathBuf::from(&name),
            PathBuf::from(format!("./{name}")),
            dir.join(&name),
            root.join("link").join(&name),
            PathBuf::from(format!("a/../{name}")),
        ];
        let first = cbt::enable(&spellings[0]).unwrap();
        let mut expected = Vec::new();
        for (i, s) in spellings.iter().enumerate() {
            // Each spelling writes once; every spelling then sees every write since
            // the first change ID.
            let at = (i as u64 + 1) * MIB;
            write_through(s, at, 4096, i as u8 + 1);
            expected.push((at, 4096));
            for r in &spellings {
                assert_eq!(
                    changes(r, &first),
                    expected,
                    "{t:?}: written as {}, read as {}",
                    s.display(),
                    r.display()
                );
            }
            let status = Disk::open(s).unwrap().tracker().unwrap().status().unwrap();
            assert_eq!(status.invalid, None, "{t:?} as {}", s.display());
            assert!(status.path.is_absolute(), "{}", status.path.display());
            assert_eq!(
                status.path.canonicalize().unwrap(),
                dir.join(format!("d{n}-cbt.vdcbt"))
            );
        }
        // Opened by a relative name, written and closed after the process moved to
        // another folder: the sidecar in the disk's folder is sealed, none appears
        // elsewhere.
        let w = OpenOptions::new().write(true).open(&name).unwrap();
        std::env::set_current_dir(&away).unwrap();
        w.write_at(&[9; 4096], 7 * MIB).unwrap();
        w.close().unwrap();
        assert!(
            !away.join(format!("d{n}-cbt.vdcbt")).exists(),
            "{t:?}: a sidecar was written in the folder the process moved to"
        );
        std::env::set_current_dir(&dir).unwrap();
        expected.push((7 * MIB, 4096));
        for r in &spellings {
            assert_eq!(changes(r, &first), expected, "{t:?}: {}", r.display());
        }
        assert_eq!(
            std::fs::read_dir(&away).unwrap().count(),
            0,
            "{t:?}: files appeared in the folder the process moved to"
        );
    }
}
