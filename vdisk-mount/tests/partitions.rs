//! Partition tables and file systems made by the real tools (sfdisk, mkfs.*), read from
//! raw files and from VMDKs, and hand-made hostile tables.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vdisk_mount::limits::MAX_GPT_ENTRY_ARRAY;
use vdisk_mount::{
    read_partitions, FsKind, GptHeaderError, PartError, PartWarning, Partition, PartitionKind,
    PartitionTable, Scheme,
};

// ---------------------------------------------------------------------------------
// Tools

/// The path of `name` (searched in PATH and the sbin folders). A missing required
/// tool is a failure naming its Debian package (run-tests.sh installs them all).
fn tool(name: &str, package: &str, required: bool) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Some(candidate);
        }
    }
    assert!(
        !required,
        "this test needs `{name}` from the Debian package `{package}`: apt-get install {package}"
    );
    eprintln!("skipping the {name} part of this test: `{name}` ({package}) is not installed");
    None
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn sized_file(path: &Path, size: u64) {
    File::create(path).unwrap().set_len(size).unwrap();
}

fn sfdisk_write(image: &Path, script: &str) {
    let sfdisk = tool("sfdisk", "fdisk", true).unwrap();
    let mut child = Command::new(sfdisk)
        .arg("-q")
        .arg(image)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "sfdisk failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Partitions as `sfdisk --json` lists them: (number, start sector, sectors, type).
fn sfdisk_list(image: &Path) -> (String, Vec<(u32, u64, u64, String)>) {
    let sfdisk = tool("sfdisk", "fdisk", true).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&run(Command::new(sfdisk).arg("--json").arg(image))).unwrap();
    let table = &json["partitiontable"];
    let parts = table["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let node = p["node"].as_str().unwrap();
            let digits = node.len() - node.bytes().rev().take_while(u8::is_ascii_digit).count();
            (
                node[digits..].parse().unwrap(),
                p["start"].as_u64().unwrap(),
                p["size"].as_u64().unwrap(),
                p["type"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    (table["id"].as_str().unwrap().to_string(), parts)
}

/// Our partitions in sfdisk's terms.
fn our_list(table: &PartitionTable) -> Vec<(u32, u64, u64, String)> {
    table
        .partitions
        .iter()
        .map(|p| {
            let ty = match &p.kind {
                PartitionKind::Mbr { type_byte, .. } => format!("{type_byte:x}"),
                PartitionKind::Gpt { type_guid, .. } => type_guid.clone(),
            };
            (p.number, p.start / 512, p.length / 512, ty)
        })
        .collect()
}

fn open(path: &Path) -> File {
    File::open(path).unwrap()
}

/// The `vdiskmanager` binary of this build (target/<profile>/vdiskmanager).
fn vdiskmanager() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let mut dir = exe.parent().unwrap();
    if dir.file_name() == Some(std::ffi::OsStr::new("deps")) {
        dir = dir.parent().unwrap();
    }
    let bin = dir.join("vdiskmanager");
    assert!(
        bin.is_file(),
        "{} not found: run `cargo build -p vdisk-utils` first (cargo test --workspace builds it)",
        bin.display()
    );
    bin
}

/// Converts a raw image into a monolithicSparse VMDK and reads its partitions through
/// `vdisk::Disk`.
fn read_through_vmdk(raw: &Path) -> PartitionTable {
    let vmdk = raw.with_extension("vmdk");
    run(Command::new(vdiskmanager())
        .args(["convert", "-q", "-f", "raw", "-O", "vmdk", "-t", "0"])
        .arg(raw)
        .arg(&vmdk));
    let disk = vdisk::Disk::open(&vmdk).unwrap();
    read_partitions(&disk).unwrap()
}

/// Copies `fs` into `image` at byte `offset`, skipping zero blocks (both are sparse).
fn copy_into(image: &Path, offset: u64, fs: &Path) {
    let out = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    let mut input = open(fs);
    let mut buf = vec![0u8; 1 << 16];
    let mut pos = 0u64;
    loop {
        let n = input.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            out.write_all_at(&buf[..n], offset + pos).unwrap();
        }
        pos += n as u64;
    }
}

// ---------------------------------------------------------------------------------
// Tables made by sfdisk

const MIB: u64 = 1 << 20;

#[test]
fn mbr_with_logicals_matches_sfdisk() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("mbr.img");
    sized_file(&img, 64 * MIB);
    let n = img.display();
    sfdisk_write(
        &img,
        &format!(
            "label: dos\n{n}1 : start=2048, size=8192, type=83, bootable\n{n}2 : size=8192, type=c\n\
             {n}3 : size=40960, type=5\n{n}5 : size=4096, type=83\n{n}6 : size=4096, type=82\n\
             {n}7 : size=4096, type=83\n"
        ),
    );
    let table = read_partitions(&open(&img)).unwrap();
    assert_eq!(table.scheme, Scheme::Mbr);
    assert!(table.warnings.is_empty(), "{:?}", table.warnings);
    let (id, theirs) = sfdisk_list(&img);
    assert_eq!(table.id.as_deref(), Some(&*id));
    assert_eq!(our_list(&table), theirs);
    assert_eq!(
        table
            .partitions
            .iter()
            .map(|p| p.number)
            .collect::<Vec<_>>(),
        [1, 2, 3, 5, 6, 7]
    );
    assert!(matches!(
        table.partitions[0].kind,
        PartitionKind::Mbr { bootable: true, .. }
    ));
    assert!(matches!(
        table.partitions[1].kind,
        PartitionKind::Mbr {
            bootable: false,
            ..
        }
    ));
    assert!(table.partitions[2].is_extended());
}

#[test]
fn gpt_matches_sfdisk() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("gpt.img");
    sized_file(&img, 32 * MIB);
    sfdisk_write(
        &img,
        "label: gpt\nsize=4096, type=L, name=\"root fs\"\nsize=8192, type=S\nsize=2048, type=U, name=\"EFI\"\n",
    );
    let table = read_partitions(&open(&img)).unwrap();
    assert_eq!(table.scheme, Scheme::Gpt);
    assert!(table.warnings.is_empty(), "{:?}", table.warnings);
    let (id, theirs) = sfdisk_list(&img);
    assert_eq!(table.id.as_deref(), Some(&*id));
    assert_eq!(our_list(&table), theirs);
    let names: Vec<_> = table
        .partitions
        .iter()
        .map(|p| match &p.kind {
            PartitionKind::Gpt { name, .. } => name.as_str(),
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(names, ["root fs", "", "EFI"]);

    // Through a VMDK: the same table.
    assert_eq!(read_through_vmdk(&img), table);
}

// ---------------------------------------------------------------------------------
// File systems made by mkfs

struct Fs {
    size_mib: u64,
    kind: FsKind,
    label: Option<&'static str>,
    /// Tool, its Debian package, whether the test command installs it, arguments
    /// before the file.
    tool: (&'static str, &'static str, bool),
    args: &'static [&'static str],
}

const FILESYSTEMS: &[Fs] = &[
    Fs {
        size_mib: 4,
        kind: FsKind::Ext2,
        label: Some("e2"),
        tool: ("mkfs.ext2", "e2fsprogs", true),
        args: &["-F", "-q", "-L", "e2"],
    },
    Fs {
        size_mib: 8,
        kind: FsKind::Ext3,
        label: Some("e3"),
        tool: ("mkfs.ext3", "e2fsprogs", true),
        args: &["-F", "-q", "-L", "e3"],
    },
    Fs {
        size_mib: 8,
        kind: FsKind::Ext4,
        label: Some("root"),
        tool: ("mkfs.ext4", "e2fsprogs", true),
        args: &["-F", "-q", "-L", "root"],
    },
    Fs {
        size_mib: 4,
        kind: FsKind::Fat12,
        label: Some("SMALL"),
        tool: ("mkfs.fat", "dosfstools", true),
        args: &["-F", "12", "-n", "SMALL"],
    },
    Fs {
        size_mib: 8,
        kind: FsKind::Fat16,
        label: None,
        tool: ("mkfs.fat", "dosfstools", true),
        args: &["-F", "16", "-s", "1"],
    },
    Fs {
        size_mib: 40,
        kind: FsKind::Fat32,
        label: Some("BIGFAT"),
        tool: ("mkfs.fat", "dosfstools", true),
        args: &["-F", "32", "-s", "1", "-n", "BIGFAT"],
    },
    Fs {
        size_mib: 4,
        kind: FsKind::Swap,
        label: Some("swp"),
        tool: ("mkswap", "util-linux", true),
        args: &["-L", "swp"],
    },
    Fs {
        size_mib: 8,
        kind: FsKind::Ntfs,
        label: None,
        tool: ("mkfs.ntfs", "ntfs-3g", false),
        args: &["-F", "-f", "-q"],
    },
    Fs {
        size_mib: 8,
        kind: FsKind::ExFat,
        label: None,
        tool: ("mkfs.exfat", "exfatprogs", false),
        args: &[],
    },
    Fs {
        size_mib: 300,
        kind: FsKind::Xfs,
        label: Some("xfsvol"),
        tool: ("mkfs.xfs", "xfsprogs", false),
        args: &["-f", "-q", "-L", "xfsvol"],
    },
    Fs {
        size_mib: 120,
        kind: FsKind::Btrfs,
        label: Some("bt"),
        tool: ("mkfs.btrfs", "btrfs-progs", false),
        args: &["-f", "-q", "-L", "bt"],
    },
];

#[test]
fn mkfs_filesystems_are_detected_in_raw_and_vmdk() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fs.img");
    let total: u64 = FILESYSTEMS.iter().map(|f| f.size_mib).sum::<u64>() + 2;
    sized_file(&img, total * MIB);
    let mut script = String::from("label: gpt\n");
    for f in FILESYSTEMS {
        script += &format!("size={}, type=L\n", f.size_mib * 2048);
    }
    sfdisk_write(&img, &script);
    let layout = read_partitions(&open(&img)).unwrap();
    assert_eq!(layout.partitions.len(), FILESYSTEMS.len());

    let mut expected = Vec::new();
    for (f, p) in FILESYSTEMS.iter().zip(&layout.partitions) {
        // Every mkfs tool is required: the test command installs them all.
        let (name, package, _) = f.tool;
        let Some(mkfs) = tool(name, package, true) else {
            expected.push(None);
            continue;
        };
        let file = dir.path().join(format!("p{}.fs", p.number));
        sized_file(&file, f.size_mib * MIB);
        run(Command::new(mkfs).args(f.args).arg(&file));
        copy_into(&img, p.start, &file);
        expected.push(Some((f.kind, f.label.map(String::from))));
    }

    let table = read_partitions(&open(&img)).unwrap();
    assert!(table.warnings.is_empty(), "{:?}", table.warnings);
    let found: Vec<_> = table
        .partitions
        .iter()
        .map(|p| p.filesystem.clone().map(|fs| (fs.kind, fs.label)))
        .collect();
    assert_eq!(found, expected);
    let fat32 = table.partitions[5].filesystem.as_ref().unwrap();
    assert_eq!(
        (fat32.kind.mount_type(), fat32.kind.to_string()),
        ("vfat", "FAT32".to_string())
    );

    // A file system on the whole disk, without a table.
    let whole = dir.path().join("whole.img");
    sized_file(&whole, 8 * MIB);
    run(Command::new(tool("mkfs.ext4", "e2fsprogs", true).unwrap())
        .args(["-F", "-q"])
        .arg(&whole));
    let t = read_partitions(&open(&whole)).unwrap();
    assert_eq!((t.scheme, t.partitions.len()), (Scheme::None, 0));
    assert_eq!(t.filesystem.map(|f| f.kind), Some(FsKind::Ext4));
    let fat = dir.path().join("fat.img");
    sized_file(&fat, 8 * MIB);
    run(Command::new(tool("mkfs.fat", "dosfstools", true).unwrap()).arg(&fat));
    let t = read_partitions(&open(&fat)).unwrap();
    assert_eq!((t.scheme, t.partitions.len()), (Scheme::None, 0));
    assert_eq!(t.filesystem.map(|f| f.kind.mount_type()), Some("vfat"));

    // The same disk as a VMDK, read through vdisk::Disk.
    assert_eq!(read_through_vmdk(&img), table);
}

// ---------------------------------------------------------------------------------
// Hostile tables, built by hand

const SECTOR: usize = 512;

fn mbr_entry(sector: &mut [u8], slot: usize, ty: u8, start: u32, sectors: u32) {
    let e = &mut sector[446 + slot * 16..446 + slot * 16 + 16];
    e[4] = ty;
    e[8..12].copy_from_slice(&start.to_le_bytes());
    e[12..16].copy_from_slice(&sectors.to_le_bytes());
    sector[510] = 0x55;
    sector[511] = 0xAA;
}

fn sector_mut(img: &mut [u8], lba: usize) -> &mut [u8] {
    &mut img[lba * SECTOR..(lba + 1) * SECTOR]
}

/// Asserts the table is read within a second (no hang on hostile input).
fn read_fast(img: &Vec<u8>) -> Result<PartitionTable, PartError> {
    let t0 = Instant::now();
    let r = read_partitions(img);
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t0.elapsed()
    );
    r
}

#[test]
fn looping_ebr_chain_is_cut() {
    let mut img = vec![0u8; 64 * SECTOR];
    mbr_entry(sector_mut(&mut img, 0), 0, 0x05, 8, 56);
    // EBR at 8 -> EBR at 24 -> EBR at 8 again.
    mbr_entry(sector_mut(&mut img, 8), 0, 0x83, 2, 4);
    mbr_entry(sector_mut(&mut img, 8), 1, 0x05, 16, 8);
    mbr_entry(sector_mut(&mut img, 24), 0, 0x83, 2, 4);
    mbr_entry(sector_mut(&mut img, 24), 1, 0x05, 0, 8);
    let t = read_fast(&img).unwrap();
    assert_eq!(
        t.partitions.iter().map(|p| p.number).collect::<Vec<_>>(),
        [1, 5, 6]
    );
    assert_eq!(t.warnings, [PartWarning::EbrLoop { offset: 8 * 512 }]);
}

#[test]
fn overlapping_and_past_the_end() {
    let mut img = vec![0u8; 64 * SECTOR];
    mbr_entry(sector_mut(&mut img, 0), 0, 0x83, 2, 20);
    mbr_entry(sector_mut(&mut img, 0), 1, 0x83, 10, 20);
    mbr_entry(sector_mut(&mut img, 0), 2, 0x83, 40, 100);
    mbr_entry(sector_mut(&mut img, 0), 3, 0x83, u32::MAX, u32::MAX);
    let t = read_fast(&img).unwrap();
    assert_eq!(t.partitions.len(), 4);
    assert_eq!(
        t.warnings,
        [
            PartWarning::PastEnd {
                number: 3,
                end: 140 * 512,
                size: 64 * 512
            },
            PartWarning::PastEnd {
                number: 4,
                end: (2 * u64::from(u32::MAX)) * 512,
                size: 64 * 512
            },
            PartWarning::Overlap {
                first: 1,
                second: 2
            },
        ]
    );
    assert!(t
        .partitions
        .iter()
        .all(|p: &Partition| p.filesystem.is_none()));
}

/// A GPT disk of `sectors` sectors with 128 entries of 128 bytes at LBA 2 and at the
/// end, and partitions (first LBA, last LBA).
fn gpt_image(sectors: usize, parts: &[(u64, u64)]) -> Vec<u8> {
    let mut img = vec![0u8; sectors * SECTOR];
    mbr_entry(sector_mut(&mut img, 0), 0, 0xEE, 1, sectors as u32 - 1);
    let mut entries = vec![0u8; 128 * 128];
    let linux = [
        0xAF, 0x3D, 0xC6, 0x0F, 0x83, 0x84, 0x72, 0x47, 0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47, 0x7D,
        0xE4,
    ];
    for (i, &(first, last)) in parts.iter().enumerate() {
        let e = &mut entries[i * 128..(i + 1) * 128];
        e[..16].copy_from_slice(&linux);
        e[16] = i as u8 + 1;
        e[32..40].copy_from_slice(&first.to_le_bytes());
        e[40..48].copy_from_slice(&last.to_le_bytes());
    }
    let last = sectors - 1;
    img[2 * SECTOR..2 * SECTOR + entries.len()].copy_from_slice(&entries);
    let backup_entries = last - 32;
    img[backup_entries * SECTOR..last * SECTOR].copy_from_slice(&entries);
    let crc = crc32fast::hash(&entries);
    for (lba, alt, array) in [(1, last, 2), (last, 1, backup_entries)] {
        let h = sector_mut(&mut img, lba);
        h[..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&(lba as u64).to_le_bytes());
        h[32..40].copy_from_slice(&(alt as u64).to_le_bytes());
        h[40..48].copy_from_slice(&34u64.to_le_bytes());
        h[48..56].copy_from_slice(&(last as u64 - 33).to_le_bytes());
        h[56] = 0x42;
        h[72..80].copy_from_slice(&(array as u64).to_le_bytes());
        h[80..84].copy_from_slice(&128u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        h[88..92].copy_from_slice(&crc.to_le_bytes());
        reseal(h);
    }
    img
}

/// Recomputes the CRC of the GPT header in `h`.
fn reseal(h: &mut [u8]) {
    h[16..20].fill(0);
    let crc = crc32fast::hash(&h[..92]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn gpt_hand_made_is_read() {
    let img = gpt_image(200, &[(34, 99), (100, 149)]);
    let t = read_fast(&img).unwrap();
    assert_eq!(t.scheme, Scheme::Gpt);
    assert!(t.warnings.is_empty(), "{:?}", t.warnings);
    assert_eq!(
        t.partitions
            .iter()
            .map(|p| (p.number, p.start, p.length))
            .collect::<Vec<_>>(),
        [(1, 34 * 512, 66 * 512), (2, 100 * 512, 50 * 512)]
    );
}

#[test]
fn bad_primary_gpt_falls_back_to_backup() {
    let good = read_fast(&gpt_image(200, &[(34, 99)])).unwrap();

    let mut img = gpt_image(200, &[(34, 99)]);
    img[SECTOR + 16] ^= 0xFF; // header CRC
    let t = read_fast(&img).unwrap();
    assert_eq!(t.partitions, good.partitions);
    assert!(matches!(
        t.warnings[..],
        [PartWarning::GptPrimaryInvalid(
            GptHeaderError::HeaderCrc { .. }
        )]
    ));

    let mut img = gpt_image(200, &[(34, 99)]);
    img[2 * SECTOR + 40] ^= 1; // primary entry array
    let t = read_fast(&img).unwrap();
    assert_eq!(t.partitions, good.partitions);
    assert!(matches!(
        t.warnings[..],
        [PartWarning::GptPrimaryInvalid(
            GptHeaderError::EntriesCrc { .. }
        )]
    ));

    let mut img = gpt_image(200, &[(34, 99)]);
    img[199 * SECTOR..].fill(0); // backup header gone
    let t = read_fast(&img).unwrap();
    assert_eq!(t.partitions, good.partitions);
    assert_eq!(
        t.warnings,
        [PartWarning::GptBackupInvalid(GptHeaderError::NoSignature {
            lba: 199
        })]
    );
}

#[test]
fn both_gpt_headers_bad_is_an_error() {
    let mut img = gpt_image(200, &[(34, 99)]);
    img[SECTOR + 16] ^= 0xFF;
    img[199 * SECTOR + 16] ^= 0xFF;
    match read_fast(&img) {
        Err(PartError::Gpt {
            primary: GptHeaderError::HeaderCrc { .. },
            backup: GptHeaderError::HeaderCrc { .. },
        }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn absurd_gpt_entry_arrays_are_refused() {
    let mut img = gpt_image(200, &[(34, 99)]);
    for lba in [1, 199] {
        let h = sector_mut(&mut img, lba);
        h[80..84].copy_from_slice(&u32::MAX.to_le_bytes());
        reseal(h);
    }
    let err = read_fast(&img).unwrap_err();
    let expected = GptHeaderError::EntryArrayTooLarge {
        count: u32::MAX,
        entry_size: 128,
        max: MAX_GPT_ENTRY_ARRAY,
    };
    match &err {
        PartError::Gpt { primary, backup } => {
            assert!(primary == &expected && backup == &expected, "{err}")
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("exceeds 1048576 bytes"), "{err}");

    let mut img = gpt_image(200, &[(34, 99)]);
    let h = sector_mut(&mut img, 1);
    h[84..88].copy_from_slice(&u32::MAX.to_le_bytes());
    reseal(h);
    let h = sector_mut(&mut img, 199);
    h[72..80].copy_from_slice(&u64::MAX.to_le_bytes());
    reseal(h);
    match read_fast(&img) {
        Err(PartError::Gpt {
            primary: GptHeaderError::EntrySize(u32::MAX),
            backup: GptHeaderError::EntryArrayOutOfRange { lba: u64::MAX, .. },
        }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn gpt_entries_past_the_end_and_inverted() {
    let t = read_fast(&gpt_image(200, &[(34, 99), (150, 100), (100, 1 << 40)])).unwrap();
    assert_eq!(
        t.partitions.iter().map(|p| p.number).collect::<Vec<_>>(),
        [1, 3]
    );
    assert_eq!(
        t.warnings,
        [
            PartWarning::GptEntryInverted {
                number: 2,
                first: 150,
                last: 100
            },
            PartWarning::PastEnd {
                number: 3,
                end: ((1 << 40) + 1) * 512,
                size: 200 * 512
            },
        ]
    );
}

/// Random corruption of valid tables never panics or hangs.
#[test]
fn mutated_tables_never_panic() {
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut mbr = vec![0u8; 64 * SECTOR];
    mbr_entry(sector_mut(&mut mbr, 0), 0, 0x83, 1, 4);
    mbr_entry(sector_mut(&mut mbr, 0), 1, 0x05, 8, 56);
    mbr_entry(sector_mut(&mut mbr, 8), 0, 0x83, 2, 4);
    mbr_entry(sector_mut(&mut mbr, 8), 1, 0x05, 16, 8);
    mbr_entry(sector_mut(&mut mbr, 24), 0, 0x83, 2, 4);
    let gpt = gpt_image(200, &[(34, 99), (100, 150)]);
    let t0 = Instant::now();
    for round in 0..3000 {
        let (mut img, hot) = if round % 2 == 0 {
            (mbr.clone(), 26 * SECTOR)
        } else {
            (gpt.clone(), 3 * SECTOR)
        };
        for _ in 0..(next() % 8 + 1) {
            let at = (next() as usize) % hot;
            img[at] = next() as u8;
        }
        if round % 2 == 1 && next() % 2 == 0 {
            reseal(sector_mut(&mut img, 1));
        }
        let _ = read_partitions(&img);
    }
    assert!(t0.elapsed() < Duration::from_secs(20));
}
