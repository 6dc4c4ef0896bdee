//! Replays the `partitions` fuzzing corpus (`fuzz/corpus/partitions/`) and the inputs
//! that once crashed it (`fuzz/regressions/partitions/`) through
//! `vdisk_mount::fuzzing::partitions`, the fuzz target's body: no input may panic or
//! take long, and each regression input must give the answer listed in
//! [`REGRESSIONS`].
//!
//! `make_partition_seeds` (ignored) writes the seed inputs the corpus was grown from
//! into `fuzz/work/seeds/partitions/`: MBR (with logical partitions) and GPT disks
//! made by sfdisk, file systems made by mkfs, whole-disk file systems, hand-made
//! hostile tables. See `fuzz/run.sh`.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use vdisk::fuzzing::{input_files, replay_input};
use vdisk_mount::fuzzing::{partitions, SparseImage, FIX_GPT_CRCS};

/// The most one input may take (the tests are a debug build).
const MAX_PER_INPUT: Duration = Duration::from_secs(2);

/// What each regression input gives now: `Ok(partitions)` or `Err(error text start)`.
const REGRESSIONS: &[(&str, Result<usize, &str>)] = &[];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// Runs one input: the number of partitions or the error text, or a failure
/// message for a panic or a slow run.
fn run(path: &Path) -> Result<Result<usize, String>, String> {
    replay_input("partitions", path, MAX_PER_INPUT, partitions)
        .map(|r| r.map(|t| t.partitions.len()).map_err(|e| e.to_string()))
}

#[test]
fn partitions_corpus_never_panics_or_hangs() {
    let inputs = input_files(&fuzz_dir().join("corpus/partitions"));
    assert!(!inputs.is_empty(), "no corpus for partitions");
    let failures: Vec<String> = inputs.iter().filter_map(|p| run(p).err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {} inputs failed:\n{}",
        failures.len(),
        inputs.len(),
        failures.join("\n")
    );
}

#[test]
fn partitions_regressions_give_their_answer() {
    let mut failures = Vec::new();
    let inputs = input_files(&fuzz_dir().join("regressions/partitions"));
    for p in &inputs {
        let file = p.file_name().unwrap().to_str().unwrap();
        let Some((_, want)) = REGRESSIONS.iter().find(|(f, _)| *f == file) else {
            failures.push(format!("{file}: not listed in REGRESSIONS"));
            continue;
        };
        match run(p) {
            Err(m) => failures.push(m),
            Ok(got) => {
                let same = match (&got, want) {
                    (Ok(n), Ok(m)) => n == m,
                    (Err(e), Err(m)) => e.starts_with(m),
                    _ => false,
                };
                if !same {
                    failures.push(format!("{file}: expected {want:?}, got {got:?}"));
                }
            }
        }
    }
    assert_eq!(
        inputs.len(),
        REGRESSIONS.len(),
        "REGRESSIONS lists missing files"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------
// Seeds

const MIB: u64 = 1 << 20;

/// Runs a tool; false (with a note) if it is missing or fails.
fn tool(cmd: &mut Command) -> bool {
    match cmd.stdout(Stdio::null()).stderr(Stdio::piped()).output() {
        Ok(o) if o.status.success() => true,
        Ok(o) => {
            eprintln!("{cmd:?}: {}", String::from_utf8_lossy(&o.stderr));
            false
        }
        Err(e) => {
            eprintln!("{cmd:?}: {e}: skipping its seeds");
            false
        }
    }
}

fn sfdisk(image: &Path, script: &str) -> bool {
    let child = Command::new("sfdisk")
        .arg("-q")
        .arg(image)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        eprintln!("sfdisk missing: skipping its seeds");
        return false;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    child.wait().unwrap().success()
}

/// A file system made by `mkfs` (with `args`) in a file of `mib` MiB, as bytes.
fn mkfs(dir: &Path, mkfs: &str, args: &[&str], mib: u64) -> Option<Vec<u8>> {
    let f = dir.join(format!("{mkfs}.img"));
    File::create(&f).unwrap().set_len(mib * MIB).unwrap();
    tool(Command::new(mkfs).args(args).arg(&f)).then(|| std::fs::read(&f).unwrap())
}

/// `(start, length)` of the partitions sfdisk made (from its JSON listing).
fn sfdisk_parts(image: &Path) -> Vec<(u64, u64)> {
    let out = Command::new("sfdisk")
        .arg("--json")
        .arg(image)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["start"].as_u64().unwrap() * 512,
                p["size"].as_u64().unwrap() * 512,
            )
        })
        .collect()
}

/// The encoded seed of a raw image: its non-zero sectors in the first MiB, the
/// last 64 KiB, and from 1 MiB before to 256 KiB after the start of each partition
/// (where extended boot records and superblocks are).
fn seed_of(image: &[u8], parts: &[(u64, u64)], flags: u8) -> Vec<u8> {
    let size = image.len() as u64;
    let mut keep = vec![(0, MIB), (size.saturating_sub(64 << 10), size)];
    for &(start, _) in parts {
        keep.push((start.saturating_sub(MIB), start + (256 << 10)));
    }
    SparseImage::from_raw(image, &keep).encode(flags)
}

#[test]
#[ignore = "writes seed inputs into fuzz/work/seeds/partitions (needs sfdisk, mkfs.*)"]
fn make_partition_seeds() {
    let out = fuzz_dir().join("work/seeds/partitions");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let put = |name: &str, data: &[u8]| std::fs::write(out.join(name), data).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();

    let fs: Vec<(&str, Option<Vec<u8>>)> = vec![
        ("ext4", mkfs(t, "mkfs.ext4", &["-F", "-q", "-L", "root"], 8)),
        ("ext2", mkfs(t, "mkfs.ext2", &["-F", "-q"], 4)),
        (
            "fat12",
            mkfs(t, "mkfs.fat", &["-F", "12", "-n", "SMALL"], 4),
        ),
        (
            "fat32",
            mkfs(t, "mkfs.fat", &["-F", "32", "-s", "1", "-n", "BIGFAT"], 40),
        ),
        ("swap", mkfs(t, "mkswap", &["-L", "swp"], 4)),
        ("ntfs", mkfs(t, "mkfs.ntfs", &["-F", "-f", "-q"], 8)),
        ("exfat", mkfs(t, "mkfs.exfat", &[], 8)),
        (
            "xfs",
            mkfs(t, "mkfs.xfs", &["-f", "-q", "-L", "xfsvol"], 300),
        ),
        (
            "btrfs",
            mkfs(t, "mkfs.btrfs", &["-f", "-q", "-L", "bt"], 120),
        ),
    ];
    // Whole-disk file systems (no table).
    for (name, img) in &fs {
        if let Some(img) = img {
            put(&format!("whole-{name}"), &seed_of(img, &[], 0));
        }
    }
    // MBR with primaries and logicals, GPT: each file system in a partition.
    let fits: Vec<&(&str, Option<Vec<u8>>)> = fs
        .iter()
        .filter(|(_, i)| i.as_ref().is_some_and(|i| i.len() as u64 <= 8 * MIB))
        .collect();
    for (scheme, script) in [
        (
            "mbr",
            "label: dos\n,8M,83\n,8M,7\n,8M,83\n,,5\n,8M,c\n,8M,82\n,8M,83\n",
        ),
        (
            "gpt",
            "label: gpt\n,8M,L\n,8M,L\n,8M,L\n,8M,L\n,8M,L\n,8M,L\n,8M,L\n",
        ),
    ] {
        let image = t.join(format!("{scheme}.img"));
        File::create(&image).unwrap().set_len(64 * MIB).unwrap();
        if !sfdisk(&image, script) {
            continue;
        }
        let parts = sfdisk_parts(&image);
        let mut img = std::fs::read(&image).unwrap();
        let data: Vec<&(u64, u64)> = parts.iter().filter(|p| p.1 == 8 * MIB).collect();
        for (&&(start, _), (_, fsimg)) in data.iter().zip(fits.iter()) {
            let fsimg = fsimg.as_ref().unwrap();
            img[start as usize..start as usize + fsimg.len()].copy_from_slice(fsimg);
        }
        put(&format!("sfdisk-{scheme}"), &seed_of(&img, &parts, 0));
        if scheme == "gpt" {
            put("sfdisk-gpt-fix-crcs", &seed_of(&img, &parts, FIX_GPT_CRCS));
            // Primary header damaged: the backup is used.
            img[512 + 20] ^= 0xff;
            put("sfdisk-gpt-bad-primary", &seed_of(&img, &parts, 0));
        }
    }
    // Hand-made: an EBR chain that loops, overlapping and past-the-end partitions.
    let mut img = vec![0u8; 64 * 512];
    let entry = |img: &mut [u8], lba: usize, slot: usize, ty: u8, start: u32, n: u32| {
        let s = &mut img[lba * 512..lba * 512 + 512];
        let e = &mut s[446 + slot * 16..446 + slot * 16 + 16];
        e[4] = ty;
        e[8..12].copy_from_slice(&start.to_le_bytes());
        e[12..16].copy_from_slice(&n.to_le_bytes());
        s[510] = 0x55;
        s[511] = 0xAA;
    };
    entry(&mut img, 0, 0, 0x05, 8, 56);
    entry(&mut img, 8, 0, 0x83, 2, 4);
    entry(&mut img, 8, 1, 0x05, 16, 8);
    entry(&mut img, 24, 0, 0x83, 2, 4);
    entry(&mut img, 24, 1, 0x05, 0, 8);
    put("ebr-loop", &seed_of(&img, &[], 0));
    let mut img = vec![0u8; 64 * 512];
    entry(&mut img, 0, 0, 0x83, 2, 20);
    entry(&mut img, 0, 1, 0x83, 10, 20);
    entry(&mut img, 0, 2, 0x83, 40, 100);
    entry(&mut img, 0, 3, 0x83, u32::MAX, u32::MAX);
    put("mbr-overlap-past-end", &seed_of(&img, &[], 0));
}
