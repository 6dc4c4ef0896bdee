//! Every supported source type converted to every target type (raw included): each
//! result compares identical to the source in `qemu-img compare`, and sparse results
//! pass `qemu-img check`. Half of the VMDK-to-VMDK conversions use vmware-vdiskmanager's
//! `-r SRC -t N DST` syntax, the rest the `convert` subcommand.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use vdisk_interop::{
    assert_qemu_check_clean, assert_qemu_identical, path_str, pattern, require_tool_from, tempdir,
    vdiskmanager, vdiskmanager_bin, vdiskmanager_convert, MIB,
};

/// vdiskmanager `-t` numbers of every VMDK type we write.
const TYPES: [u32; 7] = [0, 1, 2, 3, 4, 5, 6];

fn make_source(path: &Path) {
    // 10 MiB + 3 sectors: data and zero runs, unaligned run ends, a partial last grain.
    let len = 10 * MIB as usize + 1536;
    let mut v = vec![0u8; len];
    let mut off = 0;
    let mut seed = 7;
    while off < len {
        let run = (200 * 1024 + 512).min(len - off);
        if seed % 2 == 1 {
            v[off..off + run].copy_from_slice(&pattern(seed, run));
        }
        off += run + 300 * 1024;
        seed += 1;
    }
    v[len - 512..].fill(0xa5);
    std::fs::write(path, v).unwrap();
}

#[test]
fn every_type_converts_to_every_type_identically() {
    let dir = tempdir();
    let raw = dir.path().join("source.raw");
    make_source(&raw);
    for s in TYPES {
        let src = dir.path().join(format!("src{s}.vmdk"));
        vdiskmanager_convert("raw", "vmdk", Some(s), &raw, &src);
        assert_qemu_identical(&raw, "raw", &src, "vmdk", &format!("raw -> type {s}"));
        // To raw.
        let out_raw = dir.path().join(format!("src{s}-to.raw"));
        vdiskmanager_convert("vmdk", "raw", None, &src, &out_raw);
        assert_qemu_identical(&raw, "raw", &out_raw, "raw", &format!("type {s} -> raw"));
        // To every VMDK type.
        for t in TYPES {
            let what = format!("type {s} -> type {t}");
            let dst = dir.path().join(format!("s{s}-t{t}.vmdk"));
            if (s + t) % 2 == 0 {
                vdiskmanager(&[
                    "-q",
                    "-r",
                    path_str(&src),
                    "-t",
                    &t.to_string(),
                    path_str(&dst),
                ]);
            } else {
                vdiskmanager_convert("vmdk", "vmdk", Some(t), &src, &dst);
            }
            assert_qemu_identical(&raw, "raw", &dst, "vmdk", &what);
            if matches!(t, 0 | 1 | 5) {
                assert_qemu_check_clean(&dst, &what);
            }
        }
    }
}

/// The names in `dir` that are not hidden (temporary) ones.
fn visible(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    v.sort();
    v
}

/// `vdiskmanager convert -f raw -O FMT [-t T] src dst` under strace, SIGKILLed on
/// entry of the `nth` call of `call` by one thread (so that call does not happen). Panics if the
/// conversion ended otherwise.
fn convert_killed_at(src: &Path, t: Option<u32>, dst: &Path, call: &str, nth: u32) {
    let mut cmd = Command::new(require_tool_from("strace", "strace"));
    cmd.args([
        "-f",
        "-qq",
        "-o",
        "/dev/null",
        "-e",
        &format!("trace={call}"),
    ])
    .args(["-e", &format!("inject={call}:signal=KILL:when={nth}")])
    .arg("--")
    .arg(vdiskmanager_bin())
    .args(["convert", "-q", "-f", "raw", "-O"]);
    match t {
        Some(t) => cmd.args(["vmdk", "-t", &t.to_string()]),
        None => cmd.arg("raw"),
    };
    let status = cmd
        .arg(src)
        .arg(dst)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(
        status.signal(),
        Some(9),
        "convert to {} (type {t:?}) was not killed at {call} #{nth}: {status}",
        dst.display()
    );
}

/// A conversion killed part way, while it writes data or while it moves the finished
/// files into place, never leaves a file under the destination's name (nor, before
/// the moves, under any of its extent files' names): only a hidden temporary folder,
/// which a retry does not trip over; the retry gives a disk identical to the source.
#[test]
fn a_killed_convert_leaves_no_file_under_the_destination_name() {
    let dir = tempdir();
    let src = dir.path().join("source.raw");
    // 16 MiB, data in every block: a write per chunk.
    let data: Vec<u8> = (0..16)
        .flat_map(|i| pattern(100 + i, MIB as usize))
        .collect();
    std::fs::write(&src, data).unwrap();
    let mut kinds: Vec<Option<u32>> = vec![None];
    kinds.extend(TYPES.map(Some));
    for t in kinds {
        let name = if t.is_some() { "d.vmdk" } else { "d.raw" };
        let what = format!("destination type {t:?}");
        let work: PathBuf = dir.path().join(format!("kill-{}", t.map_or(99, |t| t)));
        std::fs::create_dir(&work).unwrap();
        let dst = work.join(name);
        // Killed while writing data (strace counts each thread's calls: two workers
        // write eight chunks each; the stream writer buffers compressed grains and
        // writes twice).
        let nth = if t == Some(5) { 1 } else { 6 };
        convert_killed_at(&src, t, &dst, "pwrite64", nth);
        assert_eq!(
            visible(&work),
            Vec::<String>::new(),
            "{what}: killed while copying"
        );
        let left: Vec<_> = std::fs::read_dir(&work).unwrap().collect();
        assert_eq!(left.len(), 1, "{what}: one hidden temporary folder is left");
        // Killed at the first move into place: nothing is there yet; for a split
        // disk, killed at the second: an extent file is, the descriptor is not.
        convert_killed_at(&src, t, &dst, "linkat", 1);
        assert_eq!(
            visible(&work),
            Vec::<String>::new(),
            "{what}: killed at the first move"
        );
        if matches!(t, Some(1 | 3)) {
            convert_killed_at(&src, t, &dst, "linkat", 2);
            assert!(
                !dst.exists(),
                "{what}: the descriptor was moved before an extent"
            );
            for f in visible(&work) {
                std::fs::remove_file(work.join(f)).unwrap();
            }
        }
        // The leftovers of the killed runs do not stop a retry.
        match t {
            Some(t) => vdiskmanager_convert("raw", "vmdk", Some(t), &src, &dst),
            None => vdiskmanager_convert("raw", "raw", None, &src, &dst),
        }
        let format = if t.is_some() { "vmdk" } else { "raw" };
        assert_qemu_identical(&src, "raw", &dst, format, &format!("{what}: retry"));
    }
}

/// In the library: a conversion cancelled by its progress callback, or whose
/// callback panics, leaves nothing behind at all (the temporary folder is removed).
#[test]
fn a_cancelled_or_panicking_convert_leaves_nothing() {
    let dir = tempdir();
    let src = dir.path().join("source.raw");
    make_source(&src);
    for t in TYPES {
        let work = dir.path().join(format!("w{t}"));
        std::fs::create_dir(&work).unwrap();
        let dst = work.join("d.vmdk");
        let disk_type: vdisk::DiskType = t.to_string().parse().unwrap();
        let opts = vdisk::ConvertOptions::new(disk_type);
        let run = |stop: &dyn Fn(u64) -> bool| {
            vdisk::convert(
                &src,
                vdisk::ImageFormat::Raw,
                &dst,
                vdisk::ImageFormat::Vmdk,
                &opts,
                &mut |done, _| stop(done),
            )
        };
        let e = run(&|done| done < 2 * MIB).unwrap_err();
        assert_eq!(e.kind(), vdisk::ErrorKind::Cancelled, "type {t}: {e}");
        let all: Vec<_> = std::fs::read_dir(&work).unwrap().collect();
        assert!(all.is_empty(), "type {t}: cancelled convert left {all:?}");
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run(&|done| {
                assert!(done < 2 * MIB, "a progress callback that panics");
                true
            })
        }));
        assert!(panicked.is_err(), "type {t}: the callback did not panic");
        assert!(
            !dst.exists(),
            "type {t}: a panicking convert left {}",
            dst.display()
        );
        let all: Vec<_> = std::fs::read_dir(&work).unwrap().collect();
        assert!(all.is_empty(), "type {t}: panicking convert left {all:?}");
    }
}
