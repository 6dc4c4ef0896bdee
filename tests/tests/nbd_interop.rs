//! `vdisk-nbd` against real NBD peers: libnbd's `nbdinfo`, `nbdcopy` and `nbdfuse`,
//! qemu's `qemu-img`/`qemu-io` (extended headers over TCP), and `nbdkit`'s nbd
//! plugin as a proxy. Every disk kind the library reads is served; what the peers
//! read must be what qemu-img reads from the files, what they write must read back,
//! non-persistent exports must leave every file as it was, and the changed-blocks
//! context must list exactly what was written since a change ID.

use std::path::{Path, PathBuf};

use vdisk::ops::child::create_child;
use vdisk::{create, CreateOptions, DiskType, OpenOptions};
use vdisk_interop::{
    merge_ranges, path_str, qemu_data_ranges, qemu_raw, require_tool_from, run, run_unchecked,
    sha256_file, stdout_text, tempdir, NbdServer,
};

const MIB: u64 = 1 << 20;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

fn write(p: &Path, writes: &[(u64, usize, u8)]) {
    let d = OpenOptions::new().write(true).open(p).unwrap();
    for &(off, len, seed) in writes {
        d.write_at(&pattern(seed, len), off).unwrap();
    }
    d.close().unwrap();
}

/// Disks of every kind (with data) in `dir`: (relative name, path).
fn every_kind(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let data = [(MIB + 512, 300_000, 1u8), (9 * MIB, 70_000, 2u8)];
    for (name, t) in [
        ("sparse.vmdk", DiskType::MonolithicSparse),
        ("split.vmdk", DiskType::TwoGbMaxExtentSparse),
        ("flat.vmdk", DiskType::MonolithicFlat),
        ("vmfs.vmdk", DiskType::Vmfs),
    ] {
        let p = dir.join(name);
        create(&p, &CreateOptions::new(t, 16 * MIB)).unwrap();
        write(&p, &data);
        out.push((name.to_string(), p));
    }
    // Children (vmfsSparse, seSparse) over their own bases, in folders.
    for (sub, t) in [("cowd", DiskType::VmfsSparse), ("se", DiskType::SeSparse)] {
        std::fs::create_dir(dir.join(sub)).unwrap();
        let base = dir.join(sub).join("base.vmdk");
        create(
            &base,
            &CreateOptions::new(DiskType::MonolithicSparse, 16 * MIB),
        )
        .unwrap();
        write(&base, &data);
        let child = dir.join(sub).join("base-000001.vmdk");
        create_child(&base, &child, t).unwrap();
        write(&child, &[(2 * MIB, 5000, 3), (12 * MIB, 100_000, 4)]);
        out.push((format!("{sub}/base-000001.vmdk"), child));
    }
    // A three-link chain.
    std::fs::create_dir(dir.join("chain")).unwrap();
    let mut top = dir.join("chain").join("c.vmdk");
    create(
        &top,
        &CreateOptions::new(DiskType::MonolithicSparse, 16 * MIB),
    )
    .unwrap();
    write(&top, &data);
    for i in 1..3u8 {
        let child = dir.join("chain").join(format!("c-00000{i}.vmdk"));
        create_child(&top, &child, DiskType::MonolithicSparse).unwrap();
        write(&child, &[(u64::from(i) * 3 * MIB, 65_536 + 512, 10 + i)]);
        top = child;
    }
    out.push(("chain/c-000002.vmdk".into(), top));
    // streamOptimized.
    let s = dir.join("stream.vmdk");
    let raw = dir.join("stream-src.raw");
    let mut bytes = vec![0u8; 16 * MIB as usize];
    bytes[MIB as usize..MIB as usize + 300_000].copy_from_slice(&pattern(5, 300_000));
    std::fs::write(&raw, &bytes).unwrap();
    vdisk::convert(
        &raw,
        vdisk::ImageFormat::Raw,
        &s,
        vdisk::ImageFormat::Vmdk,
        &vdisk::ConvertOptions::new(DiskType::StreamOptimized),
        &mut |_, _| true,
    )
    .unwrap();
    std::fs::remove_file(&raw).unwrap();
    out.push(("stream.vmdk".into(), s));
    out
}

/// Data ranges of `nbdinfo --map[=ctx]` output lines `offset length flags ...`
/// whose flags satisfy `keep`.
fn nbdinfo_ranges(uri: &str, ctx: Option<&str>, keep: impl Fn(u64) -> bool) -> Vec<(u64, u64)> {
    let arg = match ctx {
        Some(c) => format!("--map={c}"),
        None => "--map".into(),
    };
    let out = run("nbdinfo", &[arg.as_str(), uri]);
    let mut r = Vec::new();
    for line in stdout_text(&out).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        let (o, l, fl): (u64, u64, u64) = (
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
        );
        if keep(fl) {
            r.push((o, l));
        }
    }
    merge_ranges(r)
}

fn sha_all(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut v = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let s = sha256_file(&p);
                v.push((p, s));
            }
        }
    }
    v.sort();
    v
}

fn tools() {
    require_tool_from("nbdinfo", "libnbd-bin");
    require_tool_from("nbdcopy", "libnbd-bin");
}

/// Acceptance 1 and 2: every export is listed; `nbdinfo --map` equals `qemu-img map`
/// of the file for every kind; `nbdcopy` (one and four connections) reads what
/// `qemu-img convert` reads; and a non-persistent server changes no file.
#[test]
fn every_disk_kind_lists_maps_and_copies_like_qemu_reads_it() {
    tools();
    let dir = tempdir();
    let disks = every_kind(dir.path());
    let before = sha_all(dir.path());
    let server = NbdServer::start(&["--datastore", &format!("ds1={}", dir.path().display())]);
    let list = stdout_text(&run(
        "nbdinfo",
        &[
            "--list",
            &format!("nbd+unix:///?socket={}", server.socket.display()),
        ],
    ));
    for (name, path) in &disks {
        let export = format!("[ds1] {name}");
        assert!(
            list.contains(&format!("export=\"{export}\"")),
            "{export} not listed:\n{list}"
        );
        let uri = server.uri(&export);
        let ours = nbdinfo_ranges(&uri, None, |f| f & 1 == 0);
        assert_eq!(ours, qemu_data_ranges(path), "{name}: nbdinfo --map");
        let want = qemu_raw(path);
        for c in ["1", "4"] {
            let out = dir.path().join("copy.raw");
            run("nbdcopy", &["-C", c, &uri, path_str(&out)]);
            assert!(
                std::fs::read(&out).unwrap() == want,
                "{name}: nbdcopy -C {c}"
            );
            std::fs::remove_file(&out).unwrap();
        }
    }
    // Extent files are not exports; nothing outside the datastore is.
    assert!(!list.contains("-s001.vmdk"), "{list}");
    assert!(
        !list.contains("-delta.vmdk") && !list.contains("-sesparse.vmdk"),
        "{list}"
    );
    let outside = run_unchecked("nbdinfo", &[&server.uri("[ds1] ../../etc/passwd")]);
    assert!(!outside.status.success());
    let status = server.stop();
    assert!(status.success(), "vdisk-nbd exit status {status}");
    assert_eq!(sha_all(dir.path()), before, "a file changed");
}

/// Acceptance 2: writes through qemu-io (unaligned, FUA, zeroes, trim) and nbdcopy
/// into a persistent export read back identical (also after the server stopped),
/// and qemu-img check passes; the same writes into a non-persistent export are seen
/// while the server runs and leave the files unchanged.
#[test]
fn writes_read_back_and_persist_only_when_asked() {
    tools();
    for persistent in [true, false] {
        let dir = tempdir();
        let disk = dir.path().join("d.vmdk");
        create(
            &disk,
            &CreateOptions::new(DiskType::TwoGbMaxExtentSparse, 32 * MIB),
        )
        .unwrap();
        write(&disk, &[(5 * MIB, 200_000, 7)]);
        let before = sha_all(dir.path());
        let model = dir.path().join("model.raw");
        std::fs::write(&model, qemu_raw(&disk)).unwrap();
        let mode: &[&str] = if persistent { &["--persistent"] } else { &[] };
        let mut args: Vec<String> = mode.iter().map(|s| s.to_string()).collect();
        args.push(path_str(&disk).into());
        let server = NbdServer::start(&args);
        let uri = server.uri("d.vmdk");
        let cmds = [
            "write -P 0x55 100 70000",
            "write -P 0x66 -f 3M 64k",
            "write -z 5M 100000",
            "discard 5242880 65536",
            "write -P 0x77 31M 1M",
            "flush",
        ];
        let mut a = vec!["-f".to_string(), "raw".to_string()];
        for c in cmds {
            a.push("-c".into());
            a.push(c.into());
        }
        let mut on_nbd = a.clone();
        on_nbd.push(uri.clone());
        run("qemu-io", &on_nbd);
        a.push(path_str(&model).into());
        run("qemu-io", &a);
        // A file's bytes written into both (qemu-io -s).
        let half = dir.path().join("half.raw");
        std::fs::write(&half, pattern(9, 4 * MIB as usize)).unwrap();
        run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                &format!("write -s {} 20M 4M", path_str(&half)),
                path_str(&model),
            ],
        );
        run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                &format!("write -s {} 20M 4M", path_str(&half)),
                &uri,
            ],
        );
        // nbdcopy as the writer: the model (with its holes, which nbdcopy zeroes)
        // copied over the whole export, flushed on every connection.
        let shifted = dir.path().join("shifted.raw");
        let mut m = std::fs::read(&model).unwrap();
        m.rotate_left(3 * MIB as usize);
        std::fs::write(&shifted, &m).unwrap();
        run("nbdcopy", &["--flush", "-C", "4", path_str(&shifted), &uri]);
        std::fs::copy(&shifted, &model).unwrap();
        std::fs::remove_file(&shifted).unwrap();
        let got = dir.path().join("got.raw");
        run("nbdcopy", &["-C", "4", &uri, path_str(&got)]);
        assert!(
            std::fs::read(&got).unwrap() == std::fs::read(&model).unwrap(),
            "persistent={persistent}: what was written does not read back"
        );
        std::fs::remove_file(&got).unwrap();
        let status = server.stop();
        assert!(status.success());
        if persistent {
            vdisk_interop::assert_qemu_check_clean(&disk, "after the server stopped");
            assert!(
                qemu_raw(&disk) == std::fs::read(&model).unwrap(),
                "the writes did not reach the disk"
            );
        } else {
            let mut after = sha_all(dir.path());
            after.retain(|(p, _)| !p.ends_with("model.raw") && !p.ends_with("half.raw"));
            let mut before = before.clone();
            before.retain(|(p, _)| !p.ends_with("model.raw"));
            assert_eq!(after, before, "a non-persistent export changed a file");
        }
    }
}

/// Acceptance 1 and 3: `x-vdisk:changed:ID` lists exactly the areas written since
/// the change ID (written through a persistent export, so change tracking saw them),
/// for nbdinfo and for qemu's dirty-bitmap reader over TCP with extended headers.
#[test]
fn the_changed_blocks_context_lists_what_was_written_since_a_change_id() {
    tools();
    let dir = tempdir();
    let disk = dir.path().join("d.vmdk");
    create(
        &disk,
        &CreateOptions::new(DiskType::MonolithicSparse, 64 * MIB),
    )
    .unwrap();
    write(&disk, &[(0, 4 * MIB as usize, 1)]);
    let id = vdisk::cbt::enable(&disk).unwrap();
    let server = NbdServer::start(&["--persistent", path_str(&disk)]);
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 1M 300K",
            "-c",
            "write -P 1 50M 4k",
            &server.uri("d.vmdk"),
        ],
    );
    server.stop();
    let expected = vec![(MIB, 300 << 10), (50 * MIB, 4096)];
    let port = 20000 + (std::process::id() % 20000) as u16;
    let server = NbdServer::start_tcp(port, &["-r", path_str(&disk)]);
    assert!(server.socket.as_os_str().is_empty(), "a TCP server");
    let uri = format!("nbd://127.0.0.1:{port}/d.vmdk");
    let ctx = format!("x-vdisk:changed:{id}");
    assert_eq!(nbdinfo_ranges(&uri, Some(&ctx), |f| f & 1 == 1), expected);
    // The current change ID is listed; an unknown one is refused.
    let list = stdout_text(&run("nbdinfo", &["--list", &uri]));
    assert!(list.contains("x-vdisk:changed:"), "{list}");
    let bad = run_unchecked("nbdinfo", &["--map=x-vdisk:changed:0123/1", &uri]);
    assert!(!bad.status.success());
    // qemu reads the context as a dirty bitmap ("data": false where changed).
    let opts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=d.vmdk,x-dirty-bitmap={ctx}"
    );
    let out = run("qemu-img", &["map", "--output=json", "--image-opts", &opts]);
    let dirty = vdisk_interop::ranges_of_map_json(&stdout_text(&out), |_, _, data| !data);
    assert_eq!(dirty, expected, "qemu-img map with x-dirty-bitmap");
    // Allocation depth: read-only, no redo log on top: 1 where the one link has data.
    let depth = nbdinfo_ranges(&uri, Some("x-vdisk:allocation-depth"), |f| f == 1);
    assert_eq!(depth, vdisk_interop::vdiskmanager_data_ranges(&disk));
}

/// Acceptance 4: nbdkit's nbd plugin in front of the server, and nbdfuse mounting
/// an export, read the same bytes as qemu-img reads from the file.
#[test]
fn a_proxy_and_a_fuse_mount_read_the_same() {
    tools();
    require_tool_from("nbdkit", "nbdkit");
    require_tool_from("nbdfuse", "libnbd-bin");
    let dir = tempdir();
    let disk = dir.path().join("d.vmdk");
    create(
        &disk,
        &CreateOptions::new(DiskType::MonolithicSparse, 16 * MIB),
    )
    .unwrap();
    write(&disk, &[(MIB, 500_000, 3), (15 * MIB, 4096, 4)]);
    let want = qemu_raw(&disk);
    let server = NbdServer::start(&["-r", path_str(&disk)]);
    let got = dir.path().join("proxy.raw");
    let script = format!("nbdcopy \"$uri\" {}", path_str(&got));
    run(
        "nbdkit",
        &[
            "-U",
            "-",
            "nbd",
            &format!("socket={}", server.socket.display()),
            "export=d.vmdk",
            "--run",
            &script,
        ],
    );
    assert!(
        std::fs::read(&got).unwrap() == want,
        "through nbdkit's nbd plugin"
    );
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let file = mnt.join("disk.raw");
    let mut fuse = std::process::Command::new("nbdfuse")
        .args(["-r", path_str(&file), &server.uri("d.vmdk")])
        .spawn()
        .expect("nbdfuse");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) != want.len() as u64 {
        assert!(
            std::time::Instant::now() < deadline,
            "nbdfuse did not mount"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let read = std::fs::read(&file).unwrap();
    let _ = run_unchecked("fusermount3", &["-u", path_str(&mnt)]);
    let _ = fuse.wait();
    assert!(read == want, "through nbdfuse");
}
