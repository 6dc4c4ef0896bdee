//! vdisk's NBD client (`vdisk_nbd::client::RemoteDisk`) against other servers:
//! `qemu-nbd` exporting a VMDK and a qcow2 (with a dirty bitmap, read as
//! `qemu:dirty-bitmap:NAME`) and `nbdkit file`: every byte read equals
//! `qemu-img convert -O raw` of the same image, the map's data areas equal
//! `qemu-img map`'s; and the `vdisk-nbd` program killed with SIGKILL under reads:
//! every read fails within seconds, none hangs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vdisk::{create, CreateOptions, DiskType, ErrorKind, OpenOptions, RangeKind, VirtualDisk};
use vdisk_interop::{
    data_ranges_of_map_json, merge_ranges, path_str, qemu_raw, require_tool_from, run, stdout_text,
    tempdir, NbdServer,
};
use vdisk_nbd::client::{ClientOptions, Endpoint, RemoteDisk};

const MIB: u64 = 1 << 20;

/// A server process stopped (SIGKILL) when dropped.
struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cmd` and waits for its Unix socket `sock`.
fn start(cmd: &mut Command, sock: &Path) -> Peer {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the server");
    let p = Peer(child);
    let t0 = Instant::now();
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{cmd:?} did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

fn opts() -> ClientOptions {
    ClientOptions {
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    }
}

/// The whole disk read in 1 MiB pieces.
fn read_all(d: &dyn VirtualDisk) -> Vec<u8> {
    let mut out = vec![0u8; d.capacity() as usize];
    for (i, c) in out.chunks_mut(MIB as usize).enumerate() {
        d.read_at(c, i as u64 * MIB).unwrap();
    }
    out
}

fn data_ranges(d: &dyn VirtualDisk) -> Vec<(u64, u64)> {
    let mut v = Vec::new();
    d.for_each_range(0, d.capacity(), &mut |r| {
        if r.kind == RangeKind::Data {
            v.push((r.offset, r.length));
        }
        Ok(())
    })
    .unwrap();
    merge_ranges(v)
}

fn qemu_data_ranges(image: &Path, format: &str) -> Vec<(u64, u64)> {
    let out = run(
        "qemu-img",
        &["map", "--output=json", "-f", format, path_str(image)],
    );
    data_ranges_of_map_json(&stdout_text(&out))
}

fn qemu_io(image: &Path, format: &str, cmds: &[&str]) {
    let mut args = vec!["-f", format];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(path_str(image));
    run("qemu-io", &args);
}

fn qemu_nbd(image: &Path, format: &str, sock: &Path, extra: &[&str]) -> Peer {
    let mut cmd = Command::new(require_tool_from("qemu-nbd", "qemu-utils"));
    cmd.args(["-r", "-t", "-e", "0", "-f", format, "-x", "disk", "-k"])
        .arg(sock)
        .args(extra)
        .arg(image);
    start(&mut cmd, sock)
}

#[test]
fn qemu_nbd_exports_read_and_map_as_qemu_img_sees_them() {
    require_tool_from("qemu-img", "qemu-utils");
    require_tool_from("qemu-io", "qemu-utils");
    let dir = tempdir();
    // A VMDK with data, a zeroed grain, and holes.
    let vmdk = dir.path().join("d.vmdk");
    run(
        "qemu-img",
        &["create", "-f", "vmdk", path_str(&vmdk), "48M"],
    );
    qemu_io(
        &vmdk,
        "vmdk",
        &[
            "write -P 0x11 0 100k",
            "write -P 0x22 5M 3M",
            "write -z 20M 64k",
            "write -P 0x33 47M 1M",
        ],
    );
    let sock = dir.path().join("vmdk.sock");
    let _server = qemu_nbd(&vmdk, "vmdk", &sock, &[]);
    let d = RemoteDisk::open(&Endpoint::Unix(sock.clone()), "disk", &opts()).unwrap();
    assert!(d.connections() > 1, "qemu-nbd -e 0 allows multi-conn");
    let want = qemu_raw(&vmdk);
    assert_eq!(d.capacity(), want.len() as u64);
    assert!(read_all(&d) == want, "vmdk bytes through qemu-nbd");
    assert_eq!(data_ranges(&d), qemu_data_ranges(&vmdk, "vmdk"));
    d.close().unwrap();

    // A qcow2 with a dirty bitmap: changed areas from qemu:dirty-bitmap:b0.
    let qcow = dir.path().join("d.qcow2");
    run(
        "qemu-img",
        &["create", "-f", "qcow2", path_str(&qcow), "64M"],
    );
    qemu_io(&qcow, "qcow2", &["write -P 0x44 1M 64k"]);
    run(
        "qemu-img",
        &["bitmap", "--add", "--enable", path_str(&qcow), "b0"],
    );
    qemu_io(
        &qcow,
        "qcow2",
        &["write -P 0xab 4M 128k", "write -P 0xcd 40M 64k"],
    );
    let sock = dir.path().join("qcow.sock");
    let _server = qemu_nbd(&qcow, "qcow2", &sock, &["-B", "b0"]);
    let d = RemoteDisk::open(&Endpoint::Unix(sock), "disk", &opts()).unwrap();
    let want = qemu_raw(&qcow);
    assert!(read_all(&d) == want, "qcow2 bytes through qemu-nbd");
    assert_eq!(data_ranges(&d), qemu_data_ranges(&qcow, "qcow2"));
    let mut changed = Vec::new();
    d.for_each_changed_area("qemu:dirty-bitmap:b0", 0, d.capacity(), &mut |o, l| {
        changed.push((o, l));
        Ok(())
    })
    .unwrap();
    assert_eq!(changed, vec![(4 * MIB, 128 << 10), (40 * MIB, 64 << 10)]);
    let e = d
        .for_each_changed_area("qemu:dirty-bitmap:nope", 0, MIB, &mut |_, _| Ok(()))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ChangeIdRefused, "{e}");
    d.close().unwrap();
}

#[test]
fn nbdkit_file_reads_and_maps_as_qemu_img_sees_the_file() {
    let nbdkit = require_tool_from("nbdkit", "nbdkit");
    let dir = tempdir();
    let raw = dir.path().join("disk.raw");
    run("qemu-img", &["create", "-f", "raw", path_str(&raw), "32M"]);
    qemu_io(
        &raw,
        "raw",
        &[
            "write -P 0x5a 0 1M",
            "write -P 0x6b 17M 2M",
            "write -P 1 31M 512k",
        ],
    );
    let sock = dir.path().join("kit.sock");
    let _server = start(
        Command::new(nbdkit)
            .args(["-f", "-U"])
            .arg(&sock)
            .arg("file")
            .arg(&raw),
        &sock,
    );
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let d = RemoteDisk::open_uri(&uri, &opts()).unwrap();
    assert!(d.is_writable());
    let want = qemu_raw(&raw);
    assert!(read_all(&d) == want, "bytes through nbdkit file");
    assert_eq!(data_ranges(&d), qemu_data_ranges(&raw, "raw"));
    d.close().unwrap();
}

#[test]
fn vdisk_nbd_killed_mid_read_fails_every_read_within_seconds() {
    let dir = tempdir();
    let disk: PathBuf = dir.path().join("d.vmdk");
    create(
        &disk,
        &CreateOptions::new(DiskType::MonolithicSparse, 256 * MIB),
    )
    .unwrap();
    let w = OpenOptions::new().write(true).open(&disk).unwrap();
    w.write_at(&vec![0x5au8; 200 << 20], 0).unwrap();
    w.close().unwrap();
    let server = NbdServer::start(&["-r", path_str(&disk)]);
    let d = RemoteDisk::open(&Endpoint::Unix(server.socket.clone()), "d.vmdk", &opts()).unwrap();
    // Reads without end (the submitter waits when the connections are full),
    // the server killed 300 ms in.
    let killed = std::sync::Arc::new(std::sync::Mutex::new(None));
    let k = std::sync::Arc::clone(&killed);
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        server.kill();
        *k.lock().unwrap() = Some(Instant::now());
    });
    let (tx, rx) = mpsc::channel();
    let n = 400u64;
    for i in 0..n {
        let tx = tx.clone();
        d.read_async(
            (i % 50) * 4 * MIB,
            4 << 20,
            Box::new(move |r| tx.send(r).unwrap()),
        );
    }
    drop(tx);
    let mut failed = 0;
    for _ in 0..n {
        let r = rx
            .recv_timeout(Duration::from_secs(15))
            .expect("every read answered");
        if let Err(e) = r {
            assert_eq!(e.kind(), ErrorKind::ConnectionLost, "{e}");
            failed += 1;
        }
    }
    killer.join().unwrap();
    let since_kill = killed.lock().unwrap().unwrap().elapsed();
    assert!(failed > 0, "reads were in flight when the server died");
    assert!(since_kill < Duration::from_secs(5), "{since_kill:?}");
    // Reads after the kill: the one reconnection fails (nothing listens).
    let t0 = Instant::now();
    let e = d.read_at(&mut [0u8; 4096], 0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionLost, "{e}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    drop(d);
}
