//! Replays the fuzzing corpus (`fuzz/corpus/<target>/` and the whole real files of
//! `fuzz/seeds/<target>/`) and the inputs that once crashed a target
//! (`fuzz/regressions/<target>/`) through the same functions the fuzz targets run
//! (`vdisk::fuzzing`): no input may panic or take long, and each regression input
//! must give the answer listed in [`REGRESSIONS`].
//!
//! `make_seeds` (ignored) writes the seed inputs the corpus was grown from into
//! `fuzz/work/seeds/<target>/`: disks made by `vdisk::create` and qemu-img, the small
//! genuine VMware disks and hand-made descriptors. See `fuzz/run.sh`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use vdisk::fuzzing;
use vdisk::fuzzing::{input_files, replay_input};
use vdisk::ErrorKind;

type Target = fn(&[u8]) -> vdisk::Result<()>;

/// The targets of the vdisk crate (`partitions` is replayed by vdisk-mount).
const TARGETS: [(&str, Target); 6] = [
    ("descriptor", fuzzing::descriptor),
    ("sparse_header", fuzzing::sparse),
    ("stream", fuzzing::stream),
    ("cowd", fuzzing::cowd),
    ("sesparse", fuzzing::sesparse),
    ("open_and_read", fuzzing::open_and_read),
];

/// The most one input may take (a debug build of the tests is slower than the
/// fuzzer's optimised build; a hang or a slow unit takes far longer).
const MAX_PER_INPUT: Duration = Duration::from_secs(2);

/// What each regression input gives now: `None` = opens and reads fine.
const REGRESSIONS: &[(&str, &str, Option<ErrorKind>)] = &[
    // An edit inserted a line before a first line starting with a byte order mark,
    // which then no longer parsed (the BOM is now the file's, not the line's).
    (
        "descriptor",
        "bom-on-first-line-then-header-inserted-before-it",
        None,
    ),
    // A stream whose directory has 16000 empty entries of 4096 grains: mapping it
    // looked up every one of 65 Mi grains (13 s); whole empty tables are skipped now.
    (
        "stream",
        "empty-directory-of-16000-tables-mapped-grain-by-grain",
        None,
    ),
    // A stream header's embedded descriptor offset times 512 overflowed (a panic
    // with overflow checks); it is now checked against the file.
    (
        "stream",
        "descriptor-offset-overflows-when-multiplied-by-512",
        Some(ErrorKind::InvalidDisk),
    ),
    // Disk::metadata sliced a DDB key at byte 4, inside a multi-byte character.
    (
        "open_and_read",
        "ddb-key-with-a-multibyte-char-across-byte-4",
        None,
    ),
    // The fuzz check, not the library: a Latin-1 descriptor whose only non-UTF-8
    // bytes are in a line an edit replaces reads back as UTF-8 (same name bytes).
    (
        "descriptor",
        "latin1-becomes-utf8-when-its-only-non-utf8-line-is-replaced",
        None,
    ),
    // The fuzz harness, not the library: grains go at the header's overHead, far
    // past the end of a small file (a hole in a real file); the in-memory file is
    // bounded and the write fails.
    (
        "sparse_header",
        "overhead-far-past-the-end-of-a-small-file",
        Some(ErrorKind::FileTooBig),
    ),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn target(name: &str) -> Target {
    TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| *f)
        .unwrap_or_else(|| panic!("no fuzz target {name}"))
}

/// Runs one input: its result, or a failure message for a panic or a slow run.
fn run(name: &str, path: &Path) -> Result<vdisk::Result<()>, String> {
    replay_input(name, path, MAX_PER_INPUT, target(name))
}

#[test]
fn corpus_inputs_never_panic_or_hang() {
    let mut failures = Vec::new();
    let mut count = 0;
    for (name, _) in TARGETS {
        let dir = fuzz_dir().join("corpus").join(name);
        let mut inputs = input_files(&dir);
        assert!(
            !inputs.is_empty(),
            "no corpus for {name} in {}",
            dir.display()
        );
        inputs.extend(input_files(&fuzz_dir().join("seeds").join(name)));
        for p in inputs {
            count += 1;
            if let Err(m) = run(name, &p) {
                failures.push(m);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {count} inputs failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn regression_inputs_give_their_answer() {
    let mut failures = Vec::new();
    let mut seen = 0;
    for (name, _) in TARGETS {
        for p in input_files(&fuzz_dir().join("regressions").join(name)) {
            seen += 1;
            let file = p.file_name().unwrap().to_str().unwrap();
            let Some(&(_, _, want)) = REGRESSIONS
                .iter()
                .find(|(t, f, _)| *t == name && *f == file)
            else {
                failures.push(format!("{name}/{file}: not listed in REGRESSIONS"));
                continue;
            };
            match run(name, &p) {
                Err(m) => failures.push(m),
                Ok(r) => {
                    let got = r.as_ref().err().map(|e| e.kind());
                    if got != want {
                        failures.push(format!(
                            "{name}/{file}: expected {want:?}, got {got:?} ({:?})",
                            r.err().map(|e| e.to_string())
                        ));
                    }
                }
            }
        }
    }
    assert_eq!(
        seen,
        REGRESSIONS.len(),
        "REGRESSIONS lists files that do not exist"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------
// Seeds

mod seeds {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    use vdisk::ops::child::create_child;
    use vdisk::{create, CreateOptions, DiskType, OpenOptions};

    pub struct Out {
        root: PathBuf,
    }

    impl Out {
        /// Seeds under `root`, the folders of the vdisk targets emptied first.
        pub fn new(root: PathBuf) -> Out {
            for (name, _) in super::TARGETS {
                let _ = std::fs::remove_dir_all(root.join(name));
            }
            Out { root }
        }

        pub fn put(&self, target: &str, name: &str, data: &[u8]) {
            let dir = self.root.join(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), data).unwrap();
        }
    }

    /// `qemu-img`/`qemu-io` with arguments; false if the tool is missing or fails.
    pub fn qemu(tool: &str, args: &[&str]) -> bool {
        match Command::new(tool).args(args).output() {
            Ok(o) if o.status.success() => true,
            Ok(o) => {
                eprintln!("{tool} {args:?}: {}", String::from_utf8_lossy(&o.stderr));
                false
            }
            Err(_) => {
                eprintln!("{tool} not installed: skipping its seeds");
                false
            }
        }
    }

    /// The descriptor text of a disk file: the whole file, or a sparse file's
    /// embedded descriptor (up to its first NUL).
    pub fn descriptor_of(file: &[u8]) -> Option<Vec<u8>> {
        if file.starts_with(b"KDMV") {
            let off = u64::from_le_bytes(file[28..36].try_into().unwrap()) as usize * 512;
            let len = u64::from_le_bytes(file[36..44].try_into().unwrap()) as usize * 512;
            let area = file.get(off..off + len)?;
            let end = area.iter().position(|&b| b == 0).unwrap_or(area.len());
            (off != 0).then(|| area[..end].to_vec())
        } else if file.len() < 64 << 10 && file.is_ascii() {
            Some(file.to_vec())
        } else {
            None
        }
    }

    /// Every file of `dir`, (name, bytes), sorted with `first` first.
    pub fn bundle_of(dir: &Path, first: &str) -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.path().is_file())
            .map(|e| {
                (
                    e.file_name().to_str().unwrap().to_string(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort_by_key(|(n, _)| (n != first, n.clone()));
        v
    }

    pub fn pack(files: &[(String, Vec<u8>)]) -> Vec<u8> {
        let refs: Vec<(&str, &[u8])> = files
            .iter()
            .map(|(n, d)| (n.as_str(), d.as_slice()))
            .collect();
        vdisk::fuzzing::pack_files(&refs)
    }

    /// A new disk of `disk_type` with a few sectors written (start, a grain
    /// boundary, the end; one grain of zeros).
    pub fn made(dir: &Path, name: &str, disk_type: DiskType, capacity: u64) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let p = dir.join(name);
        create(&p, &CreateOptions::new(disk_type, capacity)).unwrap();
        if disk_type != DiskType::StreamOptimized {
            write_some(&p, capacity);
        }
        p
    }

    pub fn write_some(p: &Path, capacity: u64) {
        let d = OpenOptions::new().write(true).open(p).unwrap();
        d.write_at(&[0x5a; 512], 0).unwrap();
        d.write_at(&[0xa5; 1024], (64 << 10) - 512).unwrap();
        d.write_at(&[0x11; 512], capacity - 512).unwrap();
        d.close().unwrap();
    }

    pub fn child(dir: &Path, parent: &str, name: &str, t: DiskType, capacity: u64) -> PathBuf {
        let c = dir.join(name);
        create_child(&dir.join(parent), &c, t).unwrap();
        let d = OpenOptions::new().write(true).open(&c).unwrap();
        d.write_at(&[0x77; 4096], 8192).unwrap();
        if t != DiskType::MonolithicSparse {
            d.write_at(&[0x00; 4096], capacity - 4096).unwrap();
        }
        d.close().unwrap();
        c
    }

    /// A monolithicSparse disk of `capacity` bytes with 4 KiB grains and 64-entry
    /// grain tables (several tables in a small file), written like [`made`].
    pub fn small_grain_sparse(dir: &Path, name: &str, capacity: u64) -> PathBuf {
        use vdisk::extent::sparse::header::new_sparse_header;
        use vdisk::storage::FileStorage;
        let p = made(dir, name, DiskType::MonolithicSparse, capacity);
        let text = descriptor_of(&std::fs::read(&p).unwrap()).unwrap();
        std::fs::remove_file(&p).unwrap();
        let mut h = new_sparse_header(capacity / 512, 8, 20).unwrap();
        h.num_gtes_per_gt = 64;
        let h = h.fresh_layout().unwrap();
        let s = FileStorage::create_new(&p).unwrap();
        vdisk::ops::create::write_new_sparse(&s, &h, Some(&text)).unwrap();
        drop(s);
        write_some(&p, capacity);
        p
    }

    /// A seSparse extent of `sectors` with the smallest layout the reader accepts
    /// (no journal, bitmap or backmap; regions packed, not 1 MiB-aligned), a few
    /// grains written: a file of tens of KiB where ESXi's layout takes megabytes.
    pub fn compact_sesparse(path: &Path, sectors: u64) {
        use vdisk::extent::SeSparseExtent;
        use vdisk::storage::{FileStorage, LockMode};
        let gdes = sectors.div_ceil(8 * 4096);
        let gd_sectors = (gdes * 8).div_ceil(512);
        let gt_at = 2 + gd_sectors;
        let grains_at = gt_at + 64 * gdes;
        let fields: [u64; 26] = [
            0xCAFE_BABE,
            0x0000_0002_0000_0001,
            sectors,
            8,
            64,
            0,
            0,
            0,
            0,
            0,
            1,
            1, // volatile header
            0,
            0,
            0,
            0, // journal header, journal
            2,
            gd_sectors,
            gt_at,
            64 * gdes,
            0,
            0,
            0,
            0, // free bitmap, backmap
            grains_at,
            sectors.div_ceil(8) * 8,
        ];
        let mut b = vec![0u8; (grains_at * 512) as usize];
        for (i, f) in fields.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&f.to_le_bytes());
        }
        b[512..520].copy_from_slice(&0xCAFE_CAFEu64.to_le_bytes());
        std::fs::write(path, &b).unwrap();
        let e = SeSparseExtent::open(FileStorage::open(path, true, LockMode::None).unwrap(), true)
            .unwrap();
        let zeros = |_: u64, buf: &mut [u8]| {
            buf.fill(0);
            Ok(())
        };
        e.write(0, &[0x5a; 512], &zeros).unwrap();
        e.write(8192, &[0x6b; 8192], &zeros).unwrap();
        e.write(sectors * 512 - 512, &[0x7c; 512], &zeros).unwrap();
        e.close().unwrap();
    }

    /// A small streamOptimized file (4 KiB grains, 64-entry tables, 512 KiB, three
    /// grains, one in the second table): with the directory at the end behind a
    /// footer (`footer`) or up front with its tables (no footer), ending in an EOS
    /// marker. A few KiB where real streams have a 64 KiB head.
    pub fn small_stream(footer: bool) -> Vec<u8> {
        use flate2::{write::ZlibEncoder, Compression};
        use std::io::Write;
        const GRAIN: u64 = 8;
        const GTES: u64 = 64;
        const SECTORS: u64 = 1024;
        let header = |gd: u64, overhead: u64| {
            let mut h = vec![0u8; 512];
            h[..4].copy_from_slice(b"KDMV");
            h[4..8].copy_from_slice(&3u32.to_le_bytes());
            h[8..12].copy_from_slice(&0x3_0001u32.to_le_bytes());
            h[12..20].copy_from_slice(&SECTORS.to_le_bytes());
            h[20..28].copy_from_slice(&GRAIN.to_le_bytes());
            h[28..36].copy_from_slice(&1u64.to_le_bytes());
            h[36..44].copy_from_slice(&1u64.to_le_bytes());
            h[44..48].copy_from_slice(&(GTES as u32).to_le_bytes());
            h[56..64].copy_from_slice(&gd.to_le_bytes());
            h[64..72].copy_from_slice(&overhead.to_le_bytes());
            h[73..77].copy_from_slice(&[0x0a, 0x20, 0x0d, 0x0a]);
            h[77..79].copy_from_slice(&1u16.to_le_bytes());
            h
        };
        let marker = |sectors: u64, kind: u32| {
            let mut m = vec![0u8; 512];
            m[..8].copy_from_slice(&sectors.to_le_bytes());
            m[12..16].copy_from_slice(&kind.to_le_bytes());
            m
        };
        let pad = |v: &mut Vec<u8>| v.resize(v.len().div_ceil(512) * 512, 0);
        let mut desc = b"# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"streamOptimized\"\n\nRW 1024 SPARSE \"s.vmdk\"\n\nddb.adapterType = \"lsilogic\"\n".to_vec();
        pad(&mut desc);
        let gd_sectors = 1u64;
        let grains = [0u64, 5, 70];
        // Front layout: GD at 2, tables at 3 and 4, grains from 5.
        let first_grain_sector = if footer { 2 } else { 2 + gd_sectors + 2 };
        let mut out = header(if footer { u64::MAX } else { 2 }, first_grain_sector);
        out.extend_from_slice(&desc);
        let mut gts = vec![vec![0u32; GTES as usize]; 2];
        let mut body = Vec::new();
        for g in grains {
            let sector = first_grain_sector + body.len() as u64 / 512;
            let data: Vec<u8> = (0..GRAIN * 512).map(|i| (i as u8) ^ (g as u8)).collect();
            let mut z = ZlibEncoder::new(Vec::new(), Compression::default());
            z.write_all(&data).unwrap();
            let z = z.finish().unwrap();
            body.extend_from_slice(&(g * GRAIN).to_le_bytes());
            body.extend_from_slice(&(z.len() as u32).to_le_bytes());
            body.extend_from_slice(&z);
            pad(&mut body);
            gts[(g / GTES) as usize][(g % GTES) as usize] = sector as u32;
        }
        let table = |t: &[u32]| {
            let mut b: Vec<u8> = t.iter().flat_map(|e| e.to_le_bytes()).collect();
            pad(&mut b);
            b
        };
        if footer {
            let mut gd = Vec::new();
            for t in &gts {
                body.extend_from_slice(&marker(1, 1));
                gd.push((first_grain_sector + body.len() as u64 / 512) as u32);
                body.extend_from_slice(&table(t));
            }
            body.extend_from_slice(&marker(gd_sectors, 2));
            let gd_at = first_grain_sector + body.len() as u64 / 512;
            body.extend_from_slice(&table(&gd));
            body.extend_from_slice(&marker(1, 3));
            body.extend_from_slice(&header(gd_at, first_grain_sector));
        } else {
            out.extend_from_slice(&table(&[3, 4]));
            for t in &gts {
                out.extend_from_slice(&table(t));
            }
        }
        out.extend_from_slice(&body);
        out.extend_from_slice(&[0u8; 512]); // EOS
        out
    }
}

/// Hand-made descriptors: the cases of vmdk-format.md section 10 (D1-D24).
const DESCRIPTOR_CASES: &[(&str, &str)] = &[
    ("crlf", "# Disk DescriptorFile\r\nversion=1\r\nCID=fffffffe\r\nparentCID=ffffffff\r\ncreateType=\"monolithicFlat\"\r\n\r\nRW 2048 FLAT \"a-flat.vmdk\" 0\r\n\r\nddb.adapterType = \"lsilogic\"\r\n"),
    ("mixed-eol-nul-pad", "# Disk DescriptorFile\nversion=1\r\nCID=11c0a93\nparentCID=ffffffff\ncreateType=\"vmfs\"\nRW 100 VMFS \"x.vmdk\"\n\0\0\0\0\0\0\0\0"),
    ("spaces-lowercase-unquoted", "  \n\t# Disk DescriptorFile\n version = 1 \ncreatetype = twoGbMaxExtentSparse\ncid=0001\nparentcid = ffffffff\nrw 4192256 sparse \"d-s001.vmdk\"\nRDONLY 10 sparse \"d-s002.vmdk\"\nNOACCESS 1 zero\n"),
    ("seven-fields-tabs", "version=1\nCID=1\nparentCID=ffffffff\ncreateType=\"custom\"\nRW\t100\tFLAT\t\"dev.vmdk\"\t0\t\"part-uuid\"\t7\nRW 8 VMFSRDM \"rdm.vmdk\"\nRW 8 VSANSPARSE \"v.vmdk\"\nRW 8 WEIRD \"w.vmdk\"\n"),
    ("parent-before-cid", "version=3\nparentCID=12345678\nCID=abcdef01\nparentFileNameHint=\"../base dir/base.vmdk\"\ncreateType=\"seSparse\"\nchangeTrackPath=\"x-ctk.vmdk\"\nRW 8388608 SESPARSE \"x-sesparse.vmdk\"\n# The Disk Data Base\n#DDB\nddb.longContentID = \"\"\nddb.uuid = \"\"\nddb.geometry.cylinders = \"0\"\n"),
    ("latin1-names", "version=1\nencoding=\"windows-1252\"\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"caf\u{e9}-flat.vmdk\" 0\n"),
    ("huge-numbers-duplicates", "version=99999999999999999999\nCID=1ffffffff\nCID=2\nparentCID=ffffffff\ncreateType=\"streamOptimized\"\ncreateType=\"monolithicSparse\"\nRW 18446744073709551615 SPARSE \"big.vmdk\"\nRW 99999999999999999999 FLAT \"over.vmdk\" 18446744073709551616\n"),
    ("no-ddb-no-header-comment", "version=2\nCID=1\nparentCID=ffffffff\ncreateType=\"vmfsSparse\"\nparentFileNameHint=\"/abs/base.vmdk\"\nRW 100 VMFSSPARSE \"d-delta.vmdk\"\n"),
    ("bad-quotes", "version=1\ncreateType=\"monolithicFlat\nRW 1 FLAT \"a\"b\" 0\nddb.x = \"unterminated\n"),
];

#[test]
#[ignore = "writes seed inputs into fuzz/work/seeds (needs qemu-img for some)"]
fn make_seeds() {
    use seeds::*;
    use vdisk::DiskType::*;

    let out = Out::new(fuzz_dir().join("work/seeds"));
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let mib = 1u64 << 20;

    // Disks made by vdisk::create (writes at the start, across a grain boundary, at
    // the end), one folder each, and their bundles.
    let kinds = [
        ("monolithicSparse", MonolithicSparse, mib),
        ("twoGbMaxExtentSparse", TwoGbMaxExtentSparse, mib),
        ("monolithicFlat", MonolithicFlat, 128 << 10),
        ("twoGbMaxExtentFlat", TwoGbMaxExtentFlat, 128 << 10),
        ("vmfs", Vmfs, 128 << 10),
        ("vmfsThin", VmfsThin, 128 << 10),
        ("streamOptimized", StreamOptimized, mib),
    ];
    for (name, kind, cap) in kinds {
        let dir = t.join(name);
        let p = made(&dir, "disk.vmdk", kind, cap);
        let bundle = bundle_of(&dir, "disk.vmdk");
        out.put("open_and_read", &format!("vdisk-{name}"), &pack(&bundle));
        if let Some(text) = descriptor_of(&std::fs::read(&p).unwrap()) {
            out.put("descriptor", &format!("vdisk-{name}"), &text);
        }
        for (file, data) in &bundle {
            if data.starts_with(b"KDMV") {
                let target = if data[10] & 1 == 1 {
                    "stream"
                } else {
                    "sparse_header"
                };
                out.put(target, &format!("vdisk-{name}-{file}"), data);
            }
        }
    }
    // A stream with data, written by convert (GD at the end, footer, EOS).
    {
        let dir = t.join("stream-data");
        let src = made(&dir, "src.vmdk", MonolithicSparse, mib);
        let dst = dir.join("out.vmdk");
        vdisk::convert(
            &src,
            vdisk::ImageFormat::Vmdk,
            &dst,
            vdisk::ImageFormat::Vmdk,
            &vdisk::ConvertOptions::new(StreamOptimized),
            &mut |_, _| true,
        )
        .unwrap();
        if let Ok(data) = std::fs::read(&dst) {
            out.put("stream", "vdisk-convert-stream", &data);
            out.put(
                "open_and_read",
                "vdisk-convert-stream",
                &pack(&[("out.vmdk".into(), data)]),
            );
        }
    }
    // Small hand-made streams (directory behind a footer, or up front).
    for (name, footer) in [("small-stream-footer", true), ("small-stream-front", false)] {
        let data = small_stream(footer);
        vdisk::fuzzing::stream(&data).unwrap();
        out.put("stream", name, &data);
        out.put("open_and_read", name, &pack(&[("s.vmdk".into(), data)]));
    }
    // Chains: a sparse base with sparse, vmfsSparse (COWD) and seSparse children.
    let dir = t.join("chains");
    made(&dir, "base.vmdk", MonolithicSparse, mib);
    made(&dir, "flat.vmdk", Vmfs, 128 << 10);
    child(
        &dir,
        "base.vmdk",
        "sparse-child.vmdk",
        MonolithicSparse,
        mib,
    );
    child(&dir, "flat.vmdk", "cowd-child.vmdk", VmfsSparse, 128 << 10);
    child(&dir, "flat.vmdk", "se-child.vmdk", SeSparse, 128 << 10);
    // Small files with several grain tables: 4 KiB grains (hosted sparse), the
    // packed seSparse layout (in place of the 6 MiB one create_child made).
    let small = small_grain_sparse(&dir, "small.vmdk", mib);
    child(
        &dir,
        "small.vmdk",
        "small-child.vmdk",
        MonolithicSparse,
        mib,
    );
    compact_sesparse(&dir.join("se-child-sesparse.vmdk"), 256);
    out.put(
        "sparse_header",
        "vdisk-small-grain",
        &std::fs::read(&small).unwrap(),
    );
    let all = bundle_of(&dir, "");
    let get = |n: &str| all.iter().find(|(f, _)| f == n).unwrap().clone();
    out.put("cowd", "vdisk-cowd-child", &get("cowd-child-delta.vmdk").1);
    out.put(
        "sesparse",
        "vdisk-se-child",
        &get("se-child-sesparse.vmdk").1,
    );
    for n in ["cowd-child.vmdk", "se-child.vmdk", "sparse-child.vmdk"] {
        out.put(
            "descriptor",
            &format!("vdisk-{n}"),
            &descriptor_of(&get(n).1).unwrap(),
        );
    }
    out.put(
        "open_and_read",
        "vdisk-chain-sparse",
        &pack(&[get("small-child.vmdk"), get("small.vmdk")]),
    );
    out.put(
        "open_and_read",
        "vdisk-small-grain",
        &pack(&[get("small.vmdk")]),
    );
    out.put(
        "open_and_read",
        "vdisk-chain-cowd",
        &pack(&[
            get("cowd-child.vmdk"),
            get("cowd-child-delta.vmdk"),
            get("flat.vmdk"),
            get("flat-flat.vmdk"),
        ]),
    );
    out.put(
        "open_and_read",
        "vdisk-chain-sesparse",
        &pack(&[
            get("se-child.vmdk"),
            get("se-child-sesparse.vmdk"),
            get("flat.vmdk"),
            get("flat-flat.vmdk"),
        ]),
    );

    // qemu-img: sparse (v1, zeroed-grain v2, split), stream, flat descriptors.
    let q = t.join("qemu");
    std::fs::create_dir_all(&q).unwrap();
    let qs = |n: &str| q.join(n).to_str().unwrap().to_string();
    let raw = qs("raw.img");
    std::fs::write(&raw, {
        let mut v = vec![0u8; mib as usize];
        v[..4096].fill(0xab);
        v[30_000..30_512].fill(0x3c);
        v[mib as usize - 512..].fill(0xef);
        v
    })
    .unwrap();
    for (name, opts) in [
        ("sparse", "subformat=monolithicSparse"),
        ("zeroed", "subformat=monolithicSparse,zeroed_grain=on"),
        ("stream", "subformat=streamOptimized"),
    ] {
        let f = qs(&format!("{name}.vmdk"));
        if qemu(
            "qemu-img",
            &["convert", "-f", "raw", "-O", "vmdk", "-o", opts, &raw, &f],
        ) {
            if name == "zeroed" {
                qemu("qemu-io", &["-f", "vmdk", "-c", "write -z 65536 65536", &f]);
            }
            let data = std::fs::read(&f).unwrap();
            let target = if name == "stream" {
                "stream"
            } else {
                "sparse_header"
            };
            out.put(target, &format!("qemu-{name}"), &data);
            out.put(
                "descriptor",
                &format!("qemu-{name}"),
                &descriptor_of(&data).unwrap(),
            );
            out.put(
                "open_and_read",
                &format!("qemu-{name}"),
                &pack(&[(format!("{name}.vmdk"), data)]),
            );
        }
    }
    let empty = qs("empty-stream.vmdk");
    if qemu(
        "qemu-img",
        &[
            "create",
            "-f",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            &empty,
            "1G",
        ],
    ) {
        out.put(
            "stream",
            "qemu-empty-stream-1g",
            &std::fs::read(&empty).unwrap(),
        );
    }
    for sub in [
        "twoGbMaxExtentSparse",
        "monolithicFlat",
        "twoGbMaxExtentFlat",
    ] {
        let d = q.join(sub);
        std::fs::create_dir_all(&d).unwrap();
        let f = d.join("q.vmdk");
        if qemu(
            "qemu-img",
            &[
                "create",
                "-f",
                "vmdk",
                "-o",
                &format!("subformat={sub}"),
                f.to_str().unwrap(),
                "256K",
            ],
        ) {
            let bundle = bundle_of(&d, "q.vmdk");
            out.put("descriptor", &format!("qemu-{sub}"), &bundle[0].1);
            out.put("open_and_read", &format!("qemu-{sub}"), &pack(&bundle));
            if let Some((_, s)) = bundle.iter().find(|(_, d)| d.starts_with(b"KDMV")) {
                out.put("sparse_header", &format!("qemu-{sub}-extent"), s);
            }
        }
    }

    // The small genuine VMware disks (the 3 MB ones only as descriptors).
    let vmw = Path::new("/work/shared/corpus/vmware");
    if vmw.is_dir() {
        for e in std::fs::read_dir(vmw).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_str().unwrap().to_string();
            if !name.ends_with(".vmdk") {
                continue;
            }
            let data = std::fs::read(&p).unwrap();
            if let Some(text) = descriptor_of(&data) {
                out.put("descriptor", &format!("vmware-{name}"), &text);
            }
            if name == "streamOptimized.vmdk" {
                out.put("stream", "vmware-streamOptimized", &data);
                out.put(
                    "open_and_read",
                    "vmware-streamOptimized",
                    &pack(&[(name, data)]),
                );
            } else if data.len() < 4096 {
                out.put(
                    "open_and_read",
                    &format!("vmware-{name}"),
                    &pack(&[(name, data)]),
                );
            }
        }
    }

    for (name, text) in DESCRIPTOR_CASES {
        let mut bytes = text.as_bytes().to_vec();
        if *name == "latin1-names" {
            // One byte 0xe9, not UTF-8.
            bytes = text.chars().map(|c| c as u32 as u8).collect();
        }
        out.put("descriptor", &format!("case-{name}"), &bytes);
        out.put(
            "open_and_read",
            &format!("case-{name}"),
            &pack(&[("d.vmdk".into(), bytes)]),
        );
    }
}
