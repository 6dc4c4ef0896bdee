//! Snapshot chains against qemu: chains built by `qemu-img create -b` and written by
//! `qemu-io` read identically through the library and map alike (depth included);
//! chains built by the library (every growable child type, flat and sparse bases,
//! mixed) read identically in qemu; `vdiskmanager snapshot`, `commit` (also with
//! `--links` and `--keep-child`, and killed mid-way) and `info` on chains.
//!
//! qemu never writes vmfsSparse (COWD) files here: it corrupts them; it only reads them.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vdisk::ops::child::create_child;
use vdisk::{create, CreateOptions, Disk, DiskType, OpenOptions};
use vdisk_interop::{
    assert_ours_equals_raw_file, assert_qemu_check_clean, assert_qemu_identical, assert_same_bytes,
    path_str, qemu_info, qemu_io_write, qemu_map_json, qemu_raw, read_all_ours, run, sha256_file,
    stdout_text, tempdir, vdiskmanager, vdiskmanager_bin, vdiskmanager_failing, vdiskmanager_info,
    vdiskmanager_map_json, KIB, MIB,
};

const GRAIN: u64 = 64 * KIB;

/// A qemu-io write: `(pattern byte, offset, length)`; pattern 0 means `write -z`.
type QWrite = (u8, u64, u64);

/// splitmix64: seedable test inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        for chunk in v.chunks_mut(8) {
            let x = self.next().to_le_bytes();
            chunk.copy_from_slice(&x[..chunk.len()]);
        }
        v
    }
}

/// Random-ish qemu-io writes for one level of a chain over a disk of `cap` bytes:
/// whole grains, partial grains (sector-aligned and not), pieces across grain and
/// grain-table (32 MiB) boundaries, the last bytes, and `write -z` over data written
/// by lower levels (`earlier`) and over unallocated space.
fn level_writes(rng: &mut Rng, cap: u64, level: u64, earlier: &[QWrite]) -> Vec<QWrite> {
    let mut out = Vec::new();
    let grains = cap / GRAIN;
    for i in 0..14u64 {
        let p = (1 + (level * 41 + i * 7) % 250) as u8;
        let (off, len) = match i % 7 {
            0 => (rng.below(grains) * GRAIN, GRAIN * rng.range(1, 3)),
            1 => (rng.below(cap / 512) * 512, rng.range(1, 20) * 512),
            2 => (rng.below(cap), rng.range(1, 9000)),
            3 => {
                let b = rng.range(1, grains - 1) * GRAIN;
                (b - rng.range(1, 4000), rng.range(4001, 9000))
            }
            4 => (
                32 * MIB - rng.range(1, 100 * KIB),
                rng.range(100 * KIB, 300 * KIB),
            ),
            5 => {
                let len = rng.range(1, 3000);
                (cap - len, len)
            }
            _ => (rng.below(cap), rng.range(1, 150 * KIB)),
        };
        let off = off.min(cap - 1);
        out.push((p, off, len.min(cap - off)));
    }
    // Zero writes: over earlier data (whole grains and pieces), and over nothing.
    let data: Vec<&QWrite> = earlier.iter().filter(|w| w.0 != 0).collect();
    for k in 0..3 {
        if data.is_empty() {
            break;
        }
        let w = data[rng.below(data.len() as u64) as usize];
        let (off, len) = if k == 0 {
            (w.1 / GRAIN * GRAIN, GRAIN)
        } else {
            (w.1 + w.2 / 3, (w.2 / 2).max(1))
        };
        let off = off.min(cap - 1);
        out.push((0, off, len.min(cap - off)));
    }
    let off = rng.below(cap / GRAIN) * GRAIN;
    out.push((0, off, GRAIN.min(cap - off)));
    out
}

fn apply(content: &mut [u8], writes: &[QWrite]) {
    for &(p, off, len) in writes {
        content[off as usize..(off + len) as usize].fill(p);
    }
}

/// One run of a map: `(start, length, depth, present, data, zero-not-data)`.
type MapRun = (u64, u64, u64, bool, bool, bool);

/// The runs of a `qemu-img map --output=json`-style array, adjacent runs with the
/// same depth and flags merged (qemu splits runs where host offsets jump). A run
/// that reads as zeros counts as zero, not data: qemu says `"data": true, "zero":
/// true` for the holes of a flat extent's file, we say `"data": false, "zero":
/// true` (a hole holds no data: map, convert and backups skip it).
fn map_runs(json: &str) -> Vec<MapRun> {
    let v: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("map is not JSON ({e}):\n{json}"));
    let mut out: Vec<MapRun> = Vec::new();
    for r in v.as_array().expect("map is not an array") {
        let b = |k: &str| r[k].as_bool().unwrap_or_else(|| panic!("no {k} in {r}"));
        let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("no {k} in {r}"));
        let zero = b("zero");
        let run = (
            n("start"),
            n("length"),
            n("depth"),
            b("present"),
            b("data") && !zero,
            zero,
        );
        match out.last_mut() {
            Some(l)
                if l.0 + l.1 == run.0 && (l.2, l.3, l.4, l.5) == (run.2, run.3, run.4, run.5) =>
            {
                l.1 += run.1
            }
            _ => out.push(run),
        }
    }
    out
}

/// Our map and qemu's agree run by run, depth included.
fn assert_maps_agree(top: &Path, what: &str) {
    let theirs = qemu_map_json(top);
    let ours = vdiskmanager_map_json(top);
    let (t, o) = (map_runs(&theirs), map_runs(&ours));
    if t != o {
        let i = t
            .iter()
            .zip(&o)
            .position(|(a, b)| a != b)
            .unwrap_or(t.len().min(o.len()));
        panic!(
            "{what}: allocation maps differ at run {i}: qemu {:?}, ours {:?}\n\
             (start, length, depth, present, data, zero)\nqemu: {t:?}\nours: {o:?}",
            t.get(i),
            o.get(i)
        );
    }
    // Something at every depth that was written.
    assert!(o.iter().any(|r| r.4), "{what}: no data at all in the map");
}

/// Number of links `vdiskmanager info --json` lists.
fn info_chain_len(top: &Path) -> usize {
    let v = vdiskmanager_info(top);
    v["chain"]
        .as_array()
        .unwrap_or_else(|| panic!("info --json has no chain array: {v}"))
        .len()
}

/// Number of images `qemu-img info --backing-chain` lists.
fn qemu_chain_len(top: &Path) -> usize {
    let out = run(
        "qemu-img",
        &["info", "--backing-chain", "--output=json", path_str(top)],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array().expect("qemu-img info --backing-chain").len()
}

/// `qemu-img create -q -f vmdk [-o OPTS] [-b BACKING -F vmdk] NAME [SIZE]`, run in
/// `dir` (so relative names stay relative).
fn qemu_create(dir: &Path, name: &str, opts: &str, backing: Option<&str>, size: Option<u64>) {
    let mut args: Vec<String> = vec!["create".into(), "-q".into(), "-f".into(), "vmdk".into()];
    if !opts.is_empty() {
        args.extend(["-o".into(), opts.into()]);
    }
    if let Some(b) = backing {
        args.extend(["-b".into(), b.into(), "-F".into(), "vmdk".into()]);
    }
    args.push(name.into());
    if let Some(s) = size {
        args.push(s.to_string());
    }
    let out = Command::new(vdisk_interop::require_tool("qemu-img"))
        .args(&args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A chain made by qemu: base of `base_opts`, children made with `child_opts(level)`,
/// parent names absolute or relative; each level written by qemu-io. At every depth
/// (1 to 5 children) the library reads what qemu reads, the maps agree and both list
/// the whole chain.
fn qemu_chain(what: &str, base_opts: &str, relative: bool, child_opts: fn(u64) -> &'static str) {
    let cap = 40 * MIB + 512;
    let tmp = tempdir();
    let dir = tmp.path();
    let mut rng = Rng(0x9e_0000 + cap + relative as u64);
    qemu_create(dir, "base.vmdk", base_opts, None, Some(cap));
    let mut content = vec![0u8; cap as usize];
    let mut all: Vec<QWrite> = Vec::new();
    let w = level_writes(&mut rng, cap, 0, &all);
    qemu_io_write(&dir.join("base.vmdk"), &w);
    apply(&mut content, &w);
    all.extend(w);
    let mut parent = "base.vmdk".to_string();
    for level in 1..=5u64 {
        let name = format!("snap{level}.vmdk");
        let hint = if relative {
            parent.clone()
        } else {
            path_str(&dir.join(&parent)).to_string()
        };
        qemu_create(dir, &name, child_opts(level), Some(&hint), None);
        let top = dir.join(&name);
        let ctx = format!("{what}: depth {level}");
        // Fresh child: reads as its parent.
        assert_same_bytes(
            &format!("{ctx}: fresh child"),
            &read_all_ours(&top),
            &content,
        );
        let w = level_writes(&mut rng, cap, level, &all);
        qemu_io_write(&top, &w);
        apply(&mut content, &w);
        all.extend(w);
        let theirs = qemu_raw(&top);
        assert_same_bytes(&format!("{ctx}: qemu vs the writes"), &theirs, &content);
        assert_same_bytes(
            &format!("{ctx}: vdisk vs qemu"),
            &read_all_ours(&top),
            &theirs,
        );
        assert_maps_agree(&top, &ctx);
        assert_eq!(
            info_chain_len(&top),
            level as usize + 1,
            "{ctx}: info chain"
        );
        assert_eq!(
            qemu_chain_len(&top),
            level as usize + 1,
            "{ctx}: qemu chain"
        );
        parent = name;
    }
}

#[test]
fn qemu_chains_sparse_base_absolute_names() {
    qemu_chain("monolithicSparse base", "", false, |_| "");
}

#[test]
fn qemu_chains_split_base_relative_names_zeroed_grains() {
    qemu_chain(
        "twoGbMaxExtentSparse base",
        "subformat=twoGbMaxExtentSparse",
        true,
        |level| {
            if level % 2 == 1 {
                "zeroed_grain=on"
            } else {
                "subformat=twoGbMaxExtentSparse"
            }
        },
    );
}

#[test]
fn qemu_chains_flat_base_mixed_children() {
    qemu_chain(
        "monolithicFlat base",
        "subformat=monolithicFlat",
        true,
        |level| match level % 3 {
            0 => "subformat=twoGbMaxExtentSparse,zeroed_grain=on",
            1 => "",
            _ => "zeroed_grain=on",
        },
    );
}

/// One library write: offset and data.
type OWrite = (u64, Vec<u8>);

/// Random writes over a disk of `cap` bytes, some around `hot` offsets.
fn our_writes(rng: &mut Rng, cap: u64, n: usize, hot: &[u64]) -> Vec<OWrite> {
    let grains = cap / GRAIN;
    let mut out = Vec::new();
    for i in 0..n {
        let (off, len, zero) = match i % 8 {
            0 => (rng.below(grains) * GRAIN, GRAIN * rng.range(1, 3), false),
            1 => (rng.below(cap / 512) * 512, rng.range(1, 16) * 512, false),
            2 => (rng.below(cap), rng.range(1, 10_000), false),
            3 => {
                let b = rng.range(1, grains - 1) * GRAIN;
                (b - rng.range(1, 3000), rng.range(3001, 9000), false)
            }
            4 => (rng.below(cap), rng.range(1, 200 * KIB), true),
            5 => {
                let len = rng.range(1, 4096);
                (cap - len, len, false)
            }
            6 => {
                let h = hot[rng.below(hot.len() as u64) as usize];
                (
                    h.saturating_sub(rng.below(200 * KIB)),
                    rng.range(1, 300 * KIB),
                    false,
                )
            }
            _ => (
                rng.below(grains) * GRAIN + rng.below(GRAIN),
                rng.range(1, GRAIN),
                true,
            ),
        };
        let off = off.min(cap - 1);
        let len = len.min(cap - off);
        let data = if zero {
            vec![0u8; len as usize]
        } else {
            rng.bytes(len as usize)
        };
        out.push((off, data));
    }
    out
}

/// Writes into the disk `disk` through the library and into the raw file `raw`.
fn write_both(disk: &Path, raw: &Path, writes: &[OWrite]) {
    let d = OpenOptions::new()
        .write(true)
        .open(disk)
        .unwrap_or_else(|e| panic!("open {} read-write: {e}", disk.display()));
    let f = std::fs::OpenOptions::new().write(true).open(raw).unwrap();
    for (off, data) in writes {
        d.write_at(data, *off).unwrap_or_else(|e| {
            panic!("write {} at {off} into {}: {e}", data.len(), disk.display())
        });
        f.write_all_at(data, *off).unwrap();
    }
    d.close().unwrap();
}

/// A sparse raw file of `cap` bytes, all zeros.
fn new_raw(path: &Path, cap: u64) {
    File::create(path).unwrap().set_len(cap).unwrap();
}

/// Chains built by the library, mixed types on flat and sparse bases: qemu reads the
/// top as the expected content at every level, the maps agree, qemu lists the chain.
#[test]
fn our_chains_read_identically_in_qemu() {
    let boundary = 2047 * MIB;
    let cases: [(DiskType, u64, &[DiskType]); 5] = [
        (
            DiskType::MonolithicFlat,
            24 * MIB + 512,
            &[
                DiskType::MonolithicSparse,
                DiskType::VmfsSparse,
                DiskType::TwoGbMaxExtentSparse,
            ],
        ),
        (
            DiskType::Vmfs,
            16 * MIB,
            &[
                DiskType::VmfsSparse,
                DiskType::VmfsSparse,
                DiskType::MonolithicSparse,
            ],
        ),
        (
            DiskType::TwoGbMaxExtentFlat,
            20 * MIB,
            &[DiskType::TwoGbMaxExtentSparse, DiskType::MonolithicSparse],
        ),
        (
            DiskType::MonolithicSparse,
            40 * MIB,
            &[
                DiskType::VmfsSparse,
                DiskType::MonolithicSparse,
                DiskType::SeSparse,
                DiskType::VmfsSparse,
            ],
        ),
        (
            DiskType::TwoGbMaxExtentSparse,
            2100 * MIB,
            &[
                DiskType::MonolithicSparse,
                DiskType::TwoGbMaxExtentSparse,
                DiskType::VmfsSparse,
            ],
        ),
    ];
    for (base_t, cap, children) in cases {
        let tmp = tempdir();
        let dir = tmp.path();
        let hot = [boundary.min(cap / 2), 32 * MIB % cap, cap - 100 * KIB];
        let mut rng = Rng(0x0e_c4a1 ^ cap);
        let raw = dir.join("expected.raw");
        new_raw(&raw, cap);
        let base = dir.join("disk.vmdk");
        create(&base, &CreateOptions::new(base_t, cap)).unwrap();
        write_both(&base, &raw, &our_writes(&mut rng, cap, 24, &hot));
        let mut top = base.clone();
        for (i, &t) in children.iter().enumerate() {
            let ctx = format!("{base_t:?} base, level {} {t:?}", i + 1);
            let c = dir.join(format!("disk-{:06}.vmdk", i + 1));
            create_child(&top, &c, t).unwrap_or_else(|e| panic!("{ctx}: create_child: {e}"));
            if cap <= 64 * MIB {
                // (qemu is slow on big vmfsSparse files: the big chain is compared once
                // per level.)
                assert_qemu_identical(&raw, "raw", &c, "vmdk", &format!("{ctx}: fresh child"));
            }
            write_both(&c, &raw, &our_writes(&mut rng, cap, 32, &hot));
            assert_qemu_identical(&raw, "raw", &c, "vmdk", &ctx);
            if matches!(
                t,
                DiskType::MonolithicSparse | DiskType::TwoGbMaxExtentSparse
            ) {
                // Zeros over the parent's data made it a zeroed-grain (version 2) file.
                assert_qemu_check_clean(&c, &ctx);
            }
            assert_maps_agree(&c, &ctx);
            assert_eq!(qemu_chain_len(&c), i + 2, "{ctx}: qemu chain length");
            top = c;
        }
        if cap <= 64 * MIB {
            assert_ours_equals_raw_file(&top, &raw);
        }
    }
}

/// `vdiskmanager snapshot` picks VMware's names and the child type that suits the
/// parent, `-t` overrides it, bad types and existing names are refused; `info`
/// shows the chain.
#[test]
fn cli_snapshot_names_types_and_info() {
    let tmp = tempdir();
    let dir = tmp.path();
    let vm = |n: &str| dir.join(n);
    let s = |p: &Path| path_str(p).to_string();

    // monolithicSparse parent -> monolithicSparse child, next names.
    vdiskmanager(&["-c", "-s", "64MB", "-t", "0", &s(&vm("a.vmdk"))]);
    qemu_io_write(&vm("a.vmdk"), &[(0x61, 0, 100_000)]);
    vdiskmanager(&["snapshot", "-q", &s(&vm("a.vmdk"))]);
    assert!(vm("a-000001.vmdk").is_file());
    vdiskmanager(&["snapshot", "-q", &s(&vm("a-000001.vmdk"))]);
    assert!(vm("a-000002.vmdk").is_file());
    qemu_io_write(&vm("a-000002.vmdk"), &[(0x62, 50_000, 100_000)]);
    let info = vdiskmanager_info(&vm("a-000002.vmdk"));
    let chain = info["chain"].as_array().expect("chain array");
    assert_eq!(chain.len(), 3, "{info}");
    assert_eq!(chain[0]["createType"], "monolithicSparse");
    assert_eq!(chain[0]["parentFileNameHint"], "a-000001.vmdk");
    assert_eq!(chain[1]["parentFileNameHint"], "a.vmdk");
    assert!(chain[2]["parentFileNameHint"].is_null(), "{info}");
    for k in 0..2 {
        assert_eq!(
            chain[k]["parentCID"],
            chain[k + 1]["cid"],
            "link {k}: {info}"
        );
    }
    assert_eq!(chain[2]["parentCID"], "ffffffff");
    assert_eq!(info["cid"], chain[0]["cid"]);
    let text = stdout_text(&vdiskmanager(&["info", &s(&vm("a-000002.vmdk"))]));
    for k in 0..3 {
        assert!(text.contains(&format!("Link {k}:")), "{text}");
    }
    let mut want = vec![0u8; 64 * MIB as usize];
    want[..100_000].fill(0x61);
    want[50_000..150_000].fill(0x62);
    assert_same_bytes("CLI chain", &read_all_ours(&vm("a-000002.vmdk")), &want);
    assert_same_bytes("CLI chain in qemu", &qemu_raw(&vm("a-000002.vmdk")), &want);

    // vmfs parent -> vmfsSparse child with a -delta file.
    vdiskmanager(&["-c", "-s", "8MB", "-t", "4", &s(&vm("esx.vmdk"))]);
    vdiskmanager(&["snapshot", "-q", &s(&vm("esx.vmdk"))]);
    assert!(vm("esx-000001.vmdk").is_file());
    assert!(vm("esx-000001-delta.vmdk").is_file());
    assert_eq!(
        vdiskmanager_info(&vm("esx-000001.vmdk"))["createType"],
        "vmfsSparse"
    );
    assert_eq!(qemu_chain_len(&vm("esx-000001.vmdk")), 2);

    // twoGbMaxExtentFlat parent -> twoGbMaxExtentSparse child.
    vdiskmanager(&["-c", "-s", "8MB", "-t", "3", &s(&vm("split.vmdk"))]);
    vdiskmanager(&["snapshot", "-q", &s(&vm("split.vmdk"))]);
    assert!(vm("split-000001-s001.vmdk").is_file());
    assert_eq!(
        vdiskmanager_info(&vm("split-000001.vmdk"))["createType"],
        "twoGbMaxExtentSparse"
    );

    // -t overrides, with an explicit name.
    vdiskmanager(&[
        "snapshot",
        "-q",
        "-t",
        "vmfsSparse",
        &s(&vm("a.vmdk")),
        &s(&vm("other.vmdk")),
    ]);
    assert!(vm("other-delta.vmdk").is_file());
    let o = vdiskmanager_info(&vm("other.vmdk"));
    assert_eq!(o["createType"], "vmfsSparse");
    assert_eq!(o["chain"].as_array().unwrap().len(), 2);
    assert_eq!(o["chain"][0]["parentFileNameHint"], "a.vmdk");
    vdiskmanager(&[
        "snapshot",
        "-q",
        "-t",
        "twoGbMaxExtentSparse",
        &s(&vm("esx.vmdk")),
        &s(&vm("esx-split.vmdk")),
    ]);
    assert_eq!(
        vdiskmanager_info(&vm("esx-split.vmdk"))["createType"],
        "twoGbMaxExtentSparse"
    );

    // Refusals leave no file behind.
    let listing = || {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let before = listing();
    let a_sum = sha256_file(&vm("a.vmdk"));
    vdiskmanager_failing(&[
        "snapshot",
        "-t",
        "2",
        &s(&vm("a.vmdk")),
        &s(&vm("flat.vmdk")),
    ]);
    vdiskmanager_failing(&[
        "snapshot",
        "-t",
        "streamOptimized",
        &s(&vm("a.vmdk")),
        &s(&vm("so.vmdk")),
    ]);
    vdiskmanager_failing(&["snapshot", &s(&vm("a.vmdk")), &s(&vm("a-000001.vmdk"))]);
    vdiskmanager_failing(&["snapshot", &s(&vm("missing.vmdk"))]);
    assert_eq!(listing(), before, "a refused snapshot left files");
    assert_eq!(sha256_file(&vm("a.vmdk")), a_sum, "the parent changed");
}

/// `vdiskmanager commit` of a qemu-made chain (zeroed grains and zero writes
/// included), link by link: after each commit the target alone reads as the whole
/// chain did, in qemu too, and qemu-img check finds it clean.
#[test]
fn cli_commit_qemu_chain_sparse_base() {
    cli_commit_qemu_chain("");
}

#[test]
fn cli_commit_qemu_chain_flat_base() {
    cli_commit_qemu_chain("subformat=monolithicFlat");
}

fn cli_commit_qemu_chain(base_opts: &str) {
    let cap = 40 * MIB;
    let tmp = tempdir();
    let dir = tmp.path();
    let mut rng = Rng(0xc0_4417);
    qemu_create(dir, "base.vmdk", base_opts, None, Some(cap));
    let mut content = vec![0u8; cap as usize];
    let mut all: Vec<QWrite> = Vec::new();
    let mut names = vec!["base.vmdk".to_string()];
    for level in 0..4u64 {
        if level > 0 {
            let name = format!("c{level}.vmdk");
            let opts = if level < 3 { "zeroed_grain=on" } else { "" };
            qemu_create(dir, &name, opts, Some(names.last().unwrap()), None);
            names.push(name);
        }
        let w = level_writes(&mut rng, cap, level, &all);
        qemu_io_write(&dir.join(names.last().unwrap()), &w);
        apply(&mut content, &w);
        all.extend(w);
    }
    let raw = dir.join("expected.raw");
    std::fs::write(&raw, &content).unwrap();
    assert_qemu_identical(&raw, "raw", &dir.join("c3.vmdk"), "vmdk", "before commits");
    // The file holding the base's data.
    let base_file = if base_opts.is_empty() {
        dir.join("base.vmdk")
    } else {
        dir.join("base-flat.vmdk")
    };
    let base_bytes = std::fs::read(&base_file).unwrap();
    // c3 into c2, then c2 into c1, then c1 into base.
    for target in [2usize, 1, 0] {
        let top = dir.join(&names[target + 1]);
        let t = dir.join(&names[target]);
        let what = format!("commit {} into {}", names[target + 1], names[target]);
        let out = vdiskmanager(&["commit", path_str(&top)]);
        assert!(
            stdout_text(&out).contains("Committed"),
            "{what}: {}",
            stdout_text(&out)
        );
        assert!(!top.exists(), "{what}: the child is still there");
        assert_qemu_identical(&raw, "raw", &t, "vmdk", &what);
        assert_ours_equals_raw_file(&t, &raw);
        if target > 0 || base_opts.is_empty() {
            assert_qemu_check_clean(&t, &what);
        }
        assert_eq!(info_chain_len(&t), target + 1, "{what}");
        if target > 0 {
            assert!(
                std::fs::read(&base_file).unwrap() == base_bytes,
                "{what}: base changed"
            );
        }
    }
    let q = qemu_info(&dir.join("base.vmdk"));
    assert!(q.get("backing-filename").is_none(), "{q}");
}

/// Builds `base <- c1 <- c2 <- c3` with the library (types given), each written;
/// returns the paths (base first) and the raw file with the expected content.
fn our_chain(
    dir: &Path,
    cap: u64,
    base_t: DiskType,
    children: &[DiskType],
) -> (Vec<PathBuf>, PathBuf) {
    let mut rng = Rng(0xc4a1 ^ cap);
    let raw = dir.join("expected.raw");
    new_raw(&raw, cap);
    let base = dir.join("d.vmdk");
    create(&base, &CreateOptions::new(base_t, cap)).unwrap();
    write_both(&base, &raw, &our_writes(&mut rng, cap, 20, &[cap / 2]));
    let mut paths = vec![base];
    for (i, &t) in children.iter().enumerate() {
        let c = dir.join(format!("d-{:06}.vmdk", i + 1));
        create_child(paths.last().unwrap(), &c, t).unwrap();
        write_both(&c, &raw, &our_writes(&mut rng, cap, 24, &[cap / 2]));
        paths.push(c);
    }
    (paths, raw)
}

/// `commit --links 2` merges two links into the one below; `--keep-child` keeps the
/// child re-pointed at the updated parent; a flat target takes a vmfsSparse child.
#[test]
fn cli_commit_links_keep_child_and_flat_target() {
    // --links 2: c3 and c2 into c1.
    let tmp = tempdir();
    let dir = tmp.path();
    let (p, raw) = our_chain(
        dir,
        24 * MIB,
        DiskType::MonolithicSparse,
        &[
            DiskType::TwoGbMaxExtentSparse,
            DiskType::VmfsSparse,
            DiskType::MonolithicSparse,
        ],
    );
    let base_sum = sha256_file(&p[0]);
    vdiskmanager(&["commit", "-q", "--links", "2", path_str(&p[3])]);
    assert!(!p[3].exists() && !p[2].exists(), "merged links left");
    assert!(!dir.join("d-000002-delta.vmdk").exists(), "delta file left");
    assert_eq!(
        sha256_file(&p[0]),
        base_sum,
        "the link below the target changed"
    );
    assert_qemu_identical(&raw, "raw", &p[1], "vmdk", "--links 2");
    assert_ours_equals_raw_file(&p[1], &raw);
    assert_qemu_check_clean(&p[1], "--links 2 target");
    assert_eq!(info_chain_len(&p[1]), 2);
    // Too many links: refused, nothing changes.
    let sum1 = sha256_file(&dir.join("d-000001-s001.vmdk"));
    vdiskmanager_failing(&["commit", "--links", "2", path_str(&p[1])]);
    assert_eq!(sha256_file(&dir.join("d-000001-s001.vmdk")), sum1);
    assert_eq!(sha256_file(&p[0]), base_sum);

    // --keep-child: the child stays, valid, on the updated parent.
    let tmp = tempdir();
    let dir = tmp.path();
    let (p, raw) = our_chain(
        dir,
        24 * MIB,
        DiskType::TwoGbMaxExtentSparse,
        &[DiskType::MonolithicSparse],
    );
    let child_sum = sha256_file(&p[1]);
    vdiskmanager(&["commit", "-q", "--keep-child", path_str(&p[1])]);
    assert!(p[1].exists(), "--keep-child removed the child");
    assert_qemu_identical(&raw, "raw", &p[0], "vmdk", "--keep-child target");
    assert_qemu_check_clean(&p[0], "--keep-child target");
    assert_qemu_identical(&raw, "raw", &p[1], "vmdk", "--keep-child child");
    assert_ours_equals_raw_file(&p[1], &raw);
    let info = vdiskmanager_info(&p[1]);
    assert_eq!(
        info["chain"][0]["parentCID"], info["chain"][1]["cid"],
        "{info}"
    );
    assert_ne!(
        sha256_file(&p[1]),
        child_sum,
        "the kept child was not re-pointed"
    );

    // A vmfsSparse child into a vmfs (flat) base, and into a monolithicFlat base.
    for base_t in [DiskType::Vmfs, DiskType::MonolithicFlat] {
        let tmp = tempdir();
        let dir = tmp.path();
        let (p, raw) = our_chain(dir, 16 * MIB, base_t, &[DiskType::VmfsSparse]);
        vdiskmanager(&["commit", "-q", path_str(&p[1])]);
        assert!(!p[1].exists() && !dir.join("d-000001-delta.vmdk").exists());
        assert_qemu_identical(&raw, "raw", &p[0], "vmdk", &format!("{base_t:?} target"));
        assert_ours_equals_raw_file(&p[0], &raw);
    }
}

/// Deterministic non-zero content for the 4 MiB chunk `i` of the big child: a byte
/// per chunk with the offset stamped every 4 KiB (misplaced data shows).
fn chunk_data(i: u64, len: usize) -> Vec<u8> {
    let mut v = vec![(i % 251) as u8 + 1; len];
    for (k, piece) in v.chunks_mut(4096).enumerate() {
        let stamp = (i * 4 * MIB + k as u64 * 4096).to_le_bytes();
        let n = piece.len().min(8);
        piece[..n].copy_from_slice(&stamp[..n]);
    }
    v
}

/// Length, modification time and the first 2 MiB (header, descriptor, grain
/// directories and tables of a fresh sparse file) of a file.
fn file_summary(p: &Path) -> (u64, std::time::SystemTime, Vec<u8>) {
    let m = std::fs::metadata(p).unwrap();
    let mut head = vec![0u8; (2 * MIB).min(m.len()) as usize];
    File::open(p).unwrap().read_exact_at(&mut head, 0).unwrap();
    (m.len(), m.modified().unwrap(), head)
}

/// `vdiskmanager commit` killed (SIGKILL) while it copies: the chain still reads as
/// before, in the library and in qemu; run again, the commit completes and the
/// target is clean.
#[test]
fn cli_commit_killed_midway_then_rerun() {
    let cap = 640 * MIB;
    let data_len = 320 * MIB;
    let tmp = tempdir();
    let dir = tmp.path();
    let base = dir.join("big.vmdk");
    let top = dir.join("big-000001.vmdk");
    let raw = dir.join("expected.raw");
    new_raw(&raw, cap);
    create(&base, &CreateOptions::new(DiskType::MonolithicSparse, cap)).unwrap();
    let mut rng = Rng(0x4b_111);
    write_both(&base, &raw, &our_writes(&mut rng, cap, 20, &[MIB]));
    create_child(&base, &top, DiskType::MonolithicSparse).unwrap();
    {
        let d = OpenOptions::new().write(true).open(&top).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
        // Data from 64 MiB + 4 KiB on (unaligned to grains), plus scattered pieces.
        let start = 64 * MIB + 4096;
        for i in 0..data_len / (4 * MIB) {
            let data = chunk_data(i, 4 * MIB as usize);
            let off = start + i * 4 * MIB;
            d.write_at(&data, off).unwrap();
            f.write_all_at(&data, off).unwrap();
        }
        for (off, data) in our_writes(&mut rng, cap, 20, &[MIB]) {
            d.write_at(&data, off).unwrap();
            f.write_all_at(&data, off).unwrap();
        }
        d.close().unwrap();
    }
    let top_before = file_summary(&top);
    let base_len = std::fs::metadata(&base).unwrap().len();

    let mut proc = Command::new(vdiskmanager_bin())
        .args(["commit", "-q", path_str(&top)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start vdiskmanager commit");
    let started = Instant::now();
    let mut grown = false;
    while started.elapsed() < Duration::from_secs(30) {
        if proc.try_wait().unwrap().is_some() {
            break;
        }
        if std::fs::metadata(&base).unwrap().len() > base_len + 8 * MIB {
            grown = true;
            break;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    proc.kill().expect("kill vdiskmanager");
    let status = proc.wait().unwrap();
    assert!(
        grown && !status.success(),
        "the commit was not caught mid-way (grown {grown}, status {status}); it finished too fast"
    );
    let base_len_killed = std::fs::metadata(&base).unwrap().len();
    assert!(
        base_len_killed < base_len + data_len,
        "the target already holds all the data ({base_len_killed} bytes)"
    );
    // The child is untouched and the chain reads as before.
    assert!(top.exists(), "the child is gone after the kill");
    assert!(
        file_summary(&top) == top_before,
        "the killed commit changed the child's metadata"
    );
    assert_ours_equals_raw_file(&top, &raw);
    assert_qemu_identical(&raw, "raw", &top, "vmdk", "chain after the killed commit");

    // Run it again, to completion.
    vdiskmanager(&["commit", "-q", path_str(&top)]);
    assert!(!top.exists(), "the child is still there");
    assert_qemu_identical(&raw, "raw", &base, "vmdk", "target after the re-run");
    assert_ours_equals_raw_file(&base, &raw);
    assert_qemu_check_clean(&base, "target after the re-run");
    let d = Disk::open(&base).unwrap();
    assert_eq!(d.links().len(), 1);
}

/// A qemu-made chain whose parent qemu changed after the snapshot, and one whose
/// parent is missing: vdiskmanager refuses both, naming the problem, and changes
/// nothing.
#[test]
fn cli_refuses_broken_qemu_chains() {
    let tmp = tempdir();
    let dir = tmp.path();
    qemu_create(dir, "base.vmdk", "", None, Some(8 * MIB));
    qemu_io_write(&dir.join("base.vmdk"), &[(0x10, 0, 100_000)]);
    qemu_create(dir, "child.vmdk", "", Some("base.vmdk"), None);
    qemu_io_write(&dir.join("child.vmdk"), &[(0x20, 4096, 4096)]);
    let child = dir.join("child.vmdk");
    assert_eq!(info_chain_len(&child), 2);
    // The parent changes: its CID no longer matches.
    qemu_io_write(&dir.join("base.vmdk"), &[(0x30, MIB, 512)]);
    let sums: Vec<String> = ["base.vmdk", "child.vmdk"]
        .iter()
        .map(|n| sha256_file(&dir.join(n)))
        .collect();
    for args in [
        vec!["info", path_str(&child)],
        vec!["map", "--json", path_str(&child)],
        vec!["commit", "-q", path_str(&child)],
        vec!["snapshot", "-q", path_str(&child)],
    ] {
        let out = vdiskmanager_failing(&args);
        let err = vdisk_interop::stderr_text(&out);
        assert!(err.contains("CID"), "{args:?}: {err}");
    }
    let now: Vec<String> = ["base.vmdk", "child.vmdk"]
        .iter()
        .map(|n| sha256_file(&dir.join(n)))
        .collect();
    assert_eq!(now, sums, "a refused command changed a file");
    assert!(!dir.join("child-000001.vmdk").exists());

    // The parent goes missing.
    std::fs::rename(dir.join("base.vmdk"), dir.join("moved.vmdk")).unwrap();
    let out = vdiskmanager_failing(&["info", path_str(&child)]);
    let err = vdisk_interop::stderr_text(&out);
    assert!(err.contains("base.vmdk"), "missing parent: {err}");
    vdiskmanager_failing(&["commit", "-q", path_str(&child)]);
    assert_eq!(sha256_file(&child), sums[1], "child changed");
}
