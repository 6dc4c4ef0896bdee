//! The production client (`vdisk_nbd::client::RemoteDisk`) against an in-process
//! `vdisk_nbd::Server` over Unix sockets and TCP: what it reads equals what a local
//! `Disk` reads, writes read back, several connections when the server allows
//! multi-conn, every asynchronous completion runs once, the map and the changed
//! areas equal the local ones, TLS with a CA file or a thumbprint (certificates
//! made by openssl at test time), and the failures: a TLS-only server, a stranger
//! on the port, a server that vanishes or stalls mid-read (through a proxy the
//! test cuts), and the one retry a read gets.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use vdisk::{create, CreateOptions, DiskType, ErrorKind, OpenOptions, RangeKind, VirtualDisk};
use vdisk_nbd::client::{ClientOptions, Endpoint, RemoteDisk, TlsPolicy};
use vdisk_nbd::tls::Acceptor;
use vdisk_nbd::{DiskExport, Exports, Mode, Server, TlsMode};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((offset + i) / 512 * 13 + (offset + i) % 241) as u8 | 1)
        .collect()
}

/// Where the test disk holds data.
const DATA: [(u64, usize); 4] = [
    (0, 70_000),
    (MIB + 512, 3 << 20),
    (20 * MIB, 8 << 20),
    (SIZE - 4096, 4096),
];

fn make_disk(p: &Path) {
    create(p, &CreateOptions::new(DiskType::MonolithicSparse, SIZE)).unwrap();
    let d = OpenOptions::new().write(true).open(p).unwrap();
    for (o, l) in DATA {
        d.write_at(&pattern(o, l), o).unwrap();
    }
    d.close().unwrap();
}

/// An in-process server exporting `d.vmdk` on a Unix socket and on TCP.
struct Running {
    server: Server,
    sock: PathBuf,
    port: u16,
    disk: PathBuf,
    threads: Vec<std::thread::JoinHandle<()>>,
    dir: tempfile::TempDir,
}

impl Running {
    fn start(mode: Mode) -> Running {
        Running::start_with(mode, |d| d, TlsMode::Off, None)
    }

    fn start_with(
        mode: Mode,
        prepare: impl FnOnce(PathBuf) -> PathBuf,
        tls: TlsMode,
        acceptor: Option<Acceptor>,
    ) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("d.vmdk");
        make_disk(&disk);
        let disk = prepare(disk);
        let exports = Exports::new(
            vec![DiskExport {
                name: "d.vmdk".into(),
                path: disk.clone(),
            }],
            Vec::new(),
            mode,
        );
        let server = match acceptor {
            Some(a) => Server::with_tls(exports, tls, Some(Box::new(a))),
            None => Server::new(exports),
        };
        let sock = dir.path().join("nbd.sock");
        let ul = UnixListener::bind(&sock).unwrap();
        let tl = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tl.local_addr().unwrap().port();
        let (s1, s2) = (server.clone(), server.clone());
        let threads = vec![
            std::thread::spawn(move || s1.serve_unix(&ul)),
            std::thread::spawn(move || s2.serve_tcp(&tl)),
        ];
        Running {
            server,
            sock,
            port,
            disk,
            threads,
            dir,
        }
    }

    fn unix(&self) -> Endpoint {
        Endpoint::Unix(self.sock.clone())
    }

    fn tcp(&self) -> Endpoint {
        Endpoint::Tcp {
            host: "127.0.0.1".into(),
            port: self.port,
        }
    }

    fn stop(&mut self) {
        self.server.stop();
        let _ = UnixStream::connect(&self.sock);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

fn local(p: &Path) -> vdisk::Disk {
    OpenOptions::new().open(p).unwrap()
}

fn opts() -> ClientOptions {
    ClientOptions {
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    }
}

fn read_all(d: &dyn VirtualDisk, piece: usize) -> Vec<u8> {
    let mut out = vec![0u8; d.capacity() as usize];
    for (i, c) in out.chunks_mut(piece).enumerate() {
        d.read_at(c, (i * piece) as u64).unwrap();
    }
    out
}

fn map_of(d: &dyn VirtualDisk) -> Vec<(u64, u64, RangeKind)> {
    let mut v: Vec<(u64, u64, RangeKind)> = Vec::new();
    d.for_each_range(0, d.capacity(), &mut |r| {
        // The server sends HOLE|ZERO for both; depth is not on the wire.
        let k = if r.kind == RangeKind::Zero {
            RangeKind::Unallocated
        } else {
            r.kind
        };
        match v.last_mut() {
            Some(l) if l.2 == k && l.0 + l.1 == r.offset => l.1 += r.length,
            _ => v.push((r.offset, r.length, k)),
        }
        Ok(())
    })
    .unwrap();
    v
}

#[test]
fn reads_over_unix_and_tcp_equal_a_local_read_with_several_connections() {
    let s = Running::start(Mode::ReadOnly);
    let want = read_all(&local(&s.disk), MIB as usize);
    for ep in [s.unix(), s.tcp()] {
        let d = RemoteDisk::open(&ep, "d.vmdk", &opts()).unwrap();
        assert_eq!(d.capacity(), SIZE);
        assert!(!d.is_writable(), "a read-only export");
        assert_eq!(d.connections(), 4, "multi-conn: four connections");
        assert!(!d.uses_tls());
        assert_eq!(d.export_name(), "d.vmdk");
        let (min, pref, max) = d.block_sizes();
        assert!(
            min >= 1 && pref >= 512 && max >= MIB as u32,
            "{min} {pref} {max}"
        );
        assert_eq!(d.grain_bytes(), u64::from(pref));
        assert!(read_all(&d, MIB as usize) == want, "{ep:?}: 1 MiB pieces");
        // One read larger than a request (split and put together), unaligned.
        let mut big = vec![0u8; 40 << 20];
        d.read_at(&mut big, 12345).unwrap();
        assert!(big[..] == want[12345..12345 + (40 << 20)]);
        let mut odd = vec![0u8; 777];
        d.read_at(&mut odd, MIB + 100).unwrap();
        assert_eq!(odd, want[(MIB + 100) as usize..(MIB + 877) as usize]);
        // Past the end: refused before anything is sent.
        let e = d.read_at(&mut [0u8; 2], SIZE - 1).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OutOfRange);
        let e = d.write_at(&[1u8; 512], 0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ReadOnly);
        assert!(d.describe().starts_with("nbd"), "{}", d.describe());
        d.close().unwrap();
    }
    let list = RemoteDisk::list_exports(&s.unix(), &opts()).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].0, "d.vmdk");
    let e = RemoteDisk::open(&s.unix(), "nope", &opts()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FileNotFound, "{e}");
    // A URI, percent-encoded.
    let uri = format!("nbd+unix:///d%2Evmdk?socket={}", s.sock.display());
    let d = RemoteDisk::open_uri(
        &uri,
        &ClientOptions {
            connections: 1,
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(d.connections(), 1);
    assert_eq!(d.export_name(), "d.vmdk");
}

#[test]
fn writes_and_zeroes_flush_and_read_back_on_other_connections() {
    let s = Running::start(Mode::Persistent);
    let d = RemoteDisk::open(&s.tcp(), "d.vmdk", &opts()).unwrap();
    assert!(d.is_writable());
    let mut model = read_all(&d, 4 * MIB as usize);
    let mut put =
        |o: u64, data: &[u8]| model[o as usize..o as usize + data.len()].copy_from_slice(data);
    // A write larger than one request, unaligned.
    let big = pattern(7, (33 << 20) + 100);
    d.write_at(&big, 5 * MIB + 3).unwrap();
    put(5 * MIB + 3, &big);
    let (tx, rx) = mpsc::channel();
    for i in 0..8u64 {
        let tx = tx.clone();
        let data = vec![i as u8 + 0x40; 65536];
        put(50 * MIB + i * 65536, &data);
        d.write_async(
            50 * MIB + i * 65536,
            data,
            i % 2 == 0,
            Box::new(move |r| tx.send(r).unwrap()),
        );
    }
    for _ in 0..8 {
        rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
    }
    d.write_zeroes(20 * MIB, 2 * MIB, false).unwrap();
    put(20 * MIB, &vec![0u8; 2 << 20]);
    d.flush().unwrap();
    // Another client (another connection) sees it all.
    let other = RemoteDisk::open(&s.unix(), "d.vmdk", &opts()).unwrap();
    assert!(
        read_all(&other, MIB as usize) == model,
        "written data read back"
    );
    assert!(read_all(&d, 3 * MIB as usize) == model);
    other.close().unwrap();
    d.close().unwrap();
    drop(s);
}

#[test]
fn pipelined_read_async_callbacks_run_exactly_once() {
    let s = Running::start(Mode::ReadOnly);
    let d = RemoteDisk::open(
        &s.unix(),
        "d.vmdk",
        &ClientOptions {
            max_in_flight: 8,
            ..opts()
        },
    )
    .unwrap();
    let want = read_all(&local(&s.disk), MIB as usize);
    const N: usize = 300;
    let calls: Arc<Vec<AtomicUsize>> = Arc::new((0..N).map(|_| AtomicUsize::new(0)).collect());
    let (tx, rx) = mpsc::channel();
    for i in 0..N {
        let calls = Arc::clone(&calls);
        let tx = tx.clone();
        let off = (i as u64 * 212_987) % (SIZE - 300_000);
        let len = 1 + (i * 997) % 300_000;
        d.read_async(
            off,
            len,
            Box::new(move |r| {
                calls[i].fetch_add(1, Ordering::SeqCst);
                tx.send((i, off, r)).unwrap();
            }),
        );
    }
    drop(tx);
    let mut seen = 0;
    while let Ok((i, off, r)) = rx.recv_timeout(Duration::from_secs(10)) {
        let data = r.unwrap();
        assert!(
            data[..] == want[off as usize..off as usize + data.len()],
            "read {i}"
        );
        assert_eq!(data.len(), 1 + (i * 997) % 300_000);
        seen += 1;
    }
    assert_eq!(seen, N);
    std::thread::sleep(Duration::from_millis(100));
    assert!(calls.iter().all(|c| c.load(Ordering::SeqCst) == 1));
    d.close().unwrap();
}

/// Memory a read lends out, in a mutex (the client lends disjoint ranges from
/// several reader threads).
struct VecSink(Mutex<Vec<u8>>);

impl vdisk_nbd::replies::ReadSink for VecSink {
    fn with_slice(
        &self,
        at: usize,
        len: usize,
        f: &mut dyn FnMut(&mut [u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let mut v = self.0.lock().unwrap();
        match v.get_mut(at..at + len) {
            Some(b) => f(b),
            None => Err(std::io::Error::other("outside the sink")),
        }
    }
}

#[test]
fn reads_into_lent_memory_fill_it_holes_zeroed() {
    let s = Running::start(Mode::ReadOnly);
    let want = read_all(&local(&s.disk), MIB as usize);
    let d = RemoteDisk::open(&s.unix(), "d.vmdk", &opts()).unwrap();
    // Whole disk in 1 MiB reads and in one read of several pieces (the maximum
    // request is at most 32 MiB), aligned and not, over memory full of 0xAA: the
    // holes must come out as zeros.
    for (offset, len) in [
        (0u64, SIZE as usize),
        (MIB, 40 << 20),
        (20 * MIB, MIB as usize),
        (MIB + 100, 777),
        (4096, 512),
    ] {
        let sink = Arc::new(VecSink(Mutex::new(vec![0xaa; len + 3])));
        let (tx, rx) = mpsc::channel();
        d.read_async_into(
            offset,
            len,
            sink.clone(),
            Box::new(move |r| tx.send(r).unwrap()),
        );
        rx.recv_timeout(Duration::from_secs(20)).unwrap().unwrap();
        let got = sink.0.lock().unwrap();
        assert!(
            got[..len] == want[offset as usize..offset as usize + len],
            "{len} bytes at {offset}"
        );
        assert_eq!(got[len..], [0xaa; 3], "past the read: untouched");
    }
    // Past the end: refused, the memory untouched.
    let sink = Arc::new(VecSink(Mutex::new(vec![0xaa; 1024])));
    let (tx, rx) = mpsc::channel();
    d.read_async_into(
        SIZE - 512,
        1024,
        sink.clone(),
        Box::new(move |r| tx.send(r).unwrap()),
    );
    let e = rx.recv().unwrap().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfRange);
    assert!(sink.0.lock().unwrap().iter().all(|&b| b == 0xaa));
    d.close().unwrap();
}

#[test]
fn the_map_equals_the_local_map() {
    let s = Running::start(Mode::ReadOnly);
    let d = RemoteDisk::open(&s.unix(), "d.vmdk", &opts()).unwrap();
    let want = map_of(&local(&s.disk));
    assert!(want.iter().any(|r| r.2 == RangeKind::Data));
    assert!(want.iter().any(|r| r.2 == RangeKind::Unallocated));
    assert_eq!(map_of(&d), want);
    // A part of it, unaligned.
    let mut got = Vec::new();
    d.for_each_range(MIB + 1000, 10 * MIB, &mut |r| {
        got.push((r.offset, r.length));
        Ok(())
    })
    .unwrap();
    assert_eq!(got.first().unwrap().0, MIB + 1000);
    let last = got.last().unwrap();
    assert_eq!(last.0 + last.1, 11 * MIB + 1000);
    let mut areas = Vec::new();
    d.for_each_changed_area("*", 0, SIZE, &mut |o, l| {
        areas.push((o, l));
        Ok(())
    })
    .unwrap();
    let data: Vec<(u64, u64)> = want
        .iter()
        .filter(|r| r.2 == RangeKind::Data)
        .map(|r| (r.0, r.1))
        .collect();
    assert_eq!(areas, data);
}

#[test]
fn change_ids_and_changed_areas_follow_the_tracking() {
    let s = Running::start_with(
        Mode::Persistent,
        |p| {
            vdisk::cbt::enable(&p).unwrap();
            p
        },
        TlsMode::Off,
        None,
    );
    let d = RemoteDisk::open(&s.unix(), "d.vmdk", &opts()).unwrap();
    let id = d.change_id().unwrap();
    assert!(!id.is_empty());
    d.write_at(&[9u8; 8192], 3 * MIB).unwrap();
    d.write_at(&[8u8; 4096], 40 * MIB).unwrap();
    d.flush().unwrap();
    let mut areas = Vec::new();
    d.for_each_changed_area(&id, 0, SIZE, &mut |o, l| {
        areas.push((o, l));
        Ok(())
    })
    .unwrap();
    assert_eq!(areas, vec![(3 * MIB, 8192), (40 * MIB, 4096)]);
    // Cached: a second walk on the same connection, part of the disk.
    let mut part = Vec::new();
    d.for_each_changed_area(&id, 10 * MIB, 40 * MIB, &mut |o, l| {
        part.push((o, l));
        Ok(())
    })
    .unwrap();
    assert_eq!(part, vec![(40 * MIB, 4096)]);
    let e = d
        .for_each_changed_area("0123456789abcdef/77", 0, SIZE, &mut |_, _| Ok(()))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ChangeIdRefused, "{e}");
    // An untracked export has no change ID.
    let plain = Running::start(Mode::ReadOnly);
    let p = RemoteDisk::open(&plain.unix(), "d.vmdk", &opts()).unwrap();
    assert_eq!(p.change_id().unwrap_err().kind(), ErrorKind::NotSupported);
}

/// A CA and a server certificate for localhost / 127.0.0.1 made by openssl, and
/// the server certificate's SHA-1 and SHA-256 fingerprints.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    sha1: String,
    sha256: String,
}

fn pki(dir: &Path) -> Pki {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (package openssl) must be installed");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "30",
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca-cert.pem",
        "-subj",
        "/CN=client test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server-key.pem",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(
        dir.join("server.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-days",
        "30",
        "-CA",
        "ca-cert.pem",
        "-CAkey",
        "ca-key.pem",
        "-CAcreateserial",
        "-extfile",
        "server.ext",
        "-out",
        "server-cert.pem",
    ]);
    let fp = |alg: &str| {
        let out = openssl(&[
            "x509",
            "-in",
            "server-cert.pem",
            "-noout",
            "-fingerprint",
            alg,
        ]);
        out.trim().split_once('=').unwrap().1.to_string()
    };
    Pki {
        ca: dir.join("ca-cert.pem"),
        cert: dir.join("server-cert.pem"),
        key: dir.join("server-key.pem"),
        sha1: fp("-sha1").to_lowercase(),
        sha256: fp("-sha256"),
    }
}

#[test]
fn tls_with_a_ca_file_or_a_thumbprint_and_the_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let p = pki(dir.path());
    let acceptor = Acceptor::from_files(&p.cert, &p.key, None).unwrap();
    let s = Running::start_with(Mode::ReadOnly, |d| d, TlsMode::Require, Some(acceptor));
    let want = read_all(&local(&s.disk), MIB as usize);
    // CA file, TCP (the host name 127.0.0.1 is in the certificate).
    let ca = ClientOptions {
        tls: TlsPolicy::Require,
        ca_file: Some(p.ca.clone()),
        ..opts()
    };
    let d = RemoteDisk::open(&s.tcp(), "d.vmdk", &ca).unwrap();
    assert!(d.uses_tls());
    assert!(read_all(&d, 4 * MIB as usize) == want);
    d.close().unwrap();
    // Unix socket: checked as localhost. nbds+unix forces TLS.
    let uri = format!("nbds+unix:///d.vmdk?socket={}", s.sock.display());
    let d = RemoteDisk::open_uri(
        &uri,
        &ClientOptions {
            ca_file: Some(p.ca.clone()),
            ..opts()
        },
    )
    .unwrap();
    assert!(d.uses_tls());
    let mut b = vec![0u8; 70_000];
    d.read_at(&mut b, 0).unwrap();
    assert!(b[..] == want[..70_000]);
    drop(d);
    // Thumbprints (SHA-1 lower case, SHA-256 upper case) without any CA: TLS forced.
    for t in [&p.sha1, &p.sha256] {
        let d = RemoteDisk::open(
            &s.tcp(),
            "d.vmdk",
            &ClientOptions {
                thumbprint: Some(t.clone()),
                ..opts()
            },
        )
        .unwrap();
        assert!(d.uses_tls());
        let mut b = vec![0u8; 4096];
        d.read_at(&mut b, SIZE - 4096).unwrap();
        assert!(b[..] == want[(SIZE - 4096) as usize..]);
    }
    // A wrong thumbprint: refused in the handshake, both values named.
    let wrong = ["ab"; 20].join(":");
    let e = RemoteDisk::open(
        &s.tcp(),
        "d.vmdk",
        &ClientOptions {
            thumbprint: Some(wrong),
            ..opts()
        },
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Fail, "{e}");
    let m = e.to_string();
    assert!(
        m.contains(&["AB"; 20].join(":")) && m.contains(&p.sha1.to_uppercase()),
        "{m}"
    );
    // The system CA bundle does not know our CA.
    let e = RemoteDisk::open(
        &s.tcp(),
        "d.vmdk",
        &ClientOptions {
            tls: TlsPolicy::Require,
            ..opts()
        },
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Fail, "{e}");
    // Plaintext against a TLS-only server: a clear refusal.
    let e = RemoteDisk::open(&s.unix(), "d.vmdk", &opts()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AccessDenied, "{e}");
    assert!(e.to_string().contains("requires TLS"), "{e}");
    // TLS required against a plaintext server: no fallback.
    let plain = Running::start(Mode::ReadOnly);
    let e = RemoteDisk::open(&plain.unix(), "d.vmdk", &ca).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AccessDenied, "{e}");
    assert!(e.to_string().contains("STARTTLS"), "{e}");
}

#[test]
fn strangers_and_missing_servers_are_told_apart() {
    // Something that answers like a web server.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let t = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let _ = c.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        std::thread::sleep(Duration::from_millis(300));
    });
    let ep = Endpoint::Tcp {
        host: "127.0.0.1".into(),
        port,
    };
    let e = RemoteDisk::open(&ep, "d", &opts()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Handshake, "{e}");
    assert!(e.to_string().contains("HTTP/1.1 400 Bad Request"), "{e}");
    t.join().unwrap();
    // Nothing listens there any more.
    let e = RemoteDisk::open(&ep, "d", &opts()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
    let e = RemoteDisk::open(
        &Endpoint::Unix("/nonexistent/nbd.sock".into()),
        "d",
        &opts(),
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::HostNotFound, "{e}");
    // A listener that never speaks: the connect timeout.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let ep = Endpoint::Tcp {
        host: "127.0.0.1".into(),
        port: l.local_addr().unwrap().port(),
    };
    let t0 = Instant::now();
    let e = RemoteDisk::open(
        &ep,
        "d",
        &ClientOptions {
            connect_timeout: Duration::from_millis(500),
            ..opts()
        },
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    assert!(t0.elapsed() < Duration::from_secs(3));
    drop(l);
}

/// A Unix socket proxy in front of a server, which the test can cut (every
/// connection shut down at once, like a server that died) or stall (bytes stop
/// flowing, like a hung server).
struct Proxy {
    path: PathBuf,
    accepted: Arc<AtomicUsize>,
    streams: Arc<Mutex<Vec<UnixStream>>>,
    stalled: Arc<AtomicBool>,
    listening: Arc<AtomicBool>,
}

impl Proxy {
    fn start(dir: &Path, target: PathBuf) -> Proxy {
        let path = dir.join("proxy.sock");
        let l = UnixListener::bind(&path).unwrap();
        let p = Proxy {
            path,
            accepted: Arc::new(AtomicUsize::new(0)),
            streams: Arc::new(Mutex::new(Vec::new())),
            stalled: Arc::new(AtomicBool::new(false)),
            listening: Arc::new(AtomicBool::new(true)),
        };
        let (accepted, streams, stalled, listening) = (
            Arc::clone(&p.accepted),
            Arc::clone(&p.streams),
            Arc::clone(&p.stalled),
            Arc::clone(&p.listening),
        );
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { break };
                if !listening.load(Ordering::SeqCst) {
                    break;
                }
                accepted.fetch_add(1, Ordering::SeqCst);
                let s = UnixStream::connect(&target).unwrap();
                streams
                    .lock()
                    .unwrap()
                    .extend([c.try_clone().unwrap(), s.try_clone().unwrap()]);
                for (mut from, mut to) in [(c.try_clone().unwrap(), s.try_clone().unwrap()), (s, c)]
                {
                    let stalled = Arc::clone(&stalled);
                    std::thread::spawn(move || {
                        let mut b = vec![0u8; 65536];
                        loop {
                            let n = match from.read(&mut b) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            while stalled.load(Ordering::SeqCst) {
                                std::thread::sleep(Duration::from_millis(10));
                            }
                            if to.write_all(&b[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        p
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::Unix(self.path.clone())
    }

    /// Shuts every connection down (the listener stays).
    fn cut(&self) {
        for s in self.streams.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Cuts, and stops listening (connecting is refused).
    fn kill(&self) {
        self.listening.store(false, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
        self.cut();
    }
}

#[test]
fn a_server_gone_mid_read_fails_every_request_within_seconds() {
    let s = Running::start(Mode::ReadOnly);
    let proxy = Proxy::start(s.dir.path(), s.sock.clone());
    let d = RemoteDisk::open(&proxy.endpoint(), "d.vmdk", &opts()).unwrap();
    // Many large reads in flight, the connection killed under them.
    let (tx, rx) = mpsc::channel();
    for i in 0..40u64 {
        let tx = tx.clone();
        d.read_async(i * MIB, 8 << 20, Box::new(move |r| tx.send(r).unwrap()));
        if i == 4 {
            proxy.kill();
        }
    }
    drop(tx);
    let t0 = Instant::now();
    let mut lost = 0;
    for _ in 0..40 {
        let r = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("every read answered");
        if let Err(e) = r {
            assert_eq!(e.kind(), ErrorKind::ConnectionLost, "{e}");
            lost += 1;
        }
    }
    assert!(lost > 0, "some reads were cut");
    assert!(t0.elapsed() < Duration::from_secs(5));
    let e = d.read_at(&mut [0u8; 512], 0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionLost, "{e}");
    assert!(e.to_string().contains("reconnecting failed"), "{e}");
    d.close().unwrap();
}

#[test]
fn a_stalled_server_times_out_and_a_read_is_retried_once() {
    let s = Running::start(Mode::Persistent);
    let sub = s.dir.path().join("p");
    std::fs::create_dir(&sub).unwrap();
    let proxy = Proxy::start(&sub, s.sock.clone());
    let o = ClientOptions {
        connections: 1,
        request_timeout: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(2),
        ..opts()
    };
    let d = RemoteDisk::open(&proxy.endpoint(), "d.vmdk", &o).unwrap();
    let want = pattern(MIB + 512, 4096);
    let mut b = vec![0u8; 4096];
    d.read_at(&mut b, MIB + 512).unwrap();
    assert_eq!(b, want);
    assert_eq!(proxy.accepted.load(Ordering::SeqCst), 1);
    // The connection cut: the next read fails on it, reconnects once, succeeds.
    proxy.cut();
    std::thread::sleep(Duration::from_millis(50));
    d.read_at(&mut b, MIB + 512).unwrap();
    assert_eq!(b, want);
    assert_eq!(proxy.accepted.load(Ordering::SeqCst), 2, "one reconnection");
    // A write on a cut connection is not retried.
    proxy.cut();
    std::thread::sleep(Duration::from_millis(50));
    let e = d.write_at(&[1u8; 512], 0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionLost, "{e}");
    // A stalled server: the request times out (1 s), the read's one retry
    // reconnects - and stalls again: lost within a few seconds, never a hang.
    d.read_at(&mut b, 0).unwrap();
    proxy.stalled.store(true, Ordering::SeqCst);
    let t0 = Instant::now();
    let e = d.read_at(&mut b, MIB + 512).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionLost, "{e}");
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
    proxy.stalled.store(false, Ordering::SeqCst);
    drop(d);
}

/// Not a check: MiB/s of a 1 GiB disk (half data) read in 1 MiB pieces through
/// `RemoteDisk::read_at` (Unix socket, in-process server) and through the local
/// `Disk::read_at`. `cargo test --release -p vdisk-nbd --test client -- --ignored
/// --nocapture throughput`.
#[test]
#[ignore]
fn throughput_of_remote_and_local_reads() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big.vmdk");
    create(&p, &CreateOptions::new(DiskType::MonolithicSparse, 1 << 30)).unwrap();
    let w = OpenOptions::new().write(true).open(&p).unwrap();
    let chunk = pattern(0, 4 << 20);
    for i in (0..(1u64 << 30)).step_by(8 << 20) {
        w.write_at(&chunk, i).unwrap();
    }
    w.close().unwrap();
    let server = Server::new(Exports::new(
        vec![DiskExport {
            name: "big".into(),
            path: p.clone(),
        }],
        Vec::new(),
        Mode::ReadOnly,
    ));
    let sock = dir.path().join("s");
    let l = UnixListener::bind(&sock).unwrap();
    let s = server.clone();
    let t = std::thread::spawn(move || s.serve_unix(&l));
    let local = local(&p);
    let remote = RemoteDisk::open(&Endpoint::Unix(sock.clone()), "big", &opts()).unwrap();
    for (name, d) in [("local", &local as &dyn VirtualDisk), ("remote", &remote)] {
        let mut buf = vec![0u8; MIB as usize];
        for round in 0..2 {
            let t0 = Instant::now();
            for i in 0..1024u64 {
                d.read_at(&mut buf, i * MIB).unwrap();
            }
            let s = t0.elapsed().as_secs_f64();
            println!("{name} round {round}: {:.0} MiB/s", 1024.0 / s);
        }
    }
    drop(remote);
    server.stop();
    let _ = UnixStream::connect(&sock);
    let _ = t.join();
}
