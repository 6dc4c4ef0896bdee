//! The limits that keep a server alive, with short values set through
//! [`Server::set_limits`]: the in-flight bytes of a connection, the number of
//! connections (all exports, and per export), the handshake, idle and reply
//! timeouts, and a malformed handshake ending only its own connection. Each test
//! runs an in-process server on a Unix socket and talks to it with the strict
//! client of `vdisk_nbd::testing`.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vdisk::{create, CreateOptions, DiskType, OpenOptions};
use vdisk_nbd::limits::Limits;
use vdisk_nbd::testing::{Client, ClientError, Handshake};
use vdisk_nbd::wire::{self, cmd, opt, rep};
use vdisk_nbd::{DiskExport, Exports, Mode, Server};

const MIB: u64 = 1 << 20;
const DISK: u64 = 64 * MIB;

fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((offset + i) / 512 * 7 + (offset + i) % 251) as u8 | 1)
        .collect()
}

/// A server on a Unix socket, exporting `disk` and `other` (64 MiB, the first
/// 8 MiB written with [`pattern`]).
struct Running {
    server: Server,
    sock: PathBuf,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

fn make_disk(p: &Path) {
    create(p, &CreateOptions::new(DiskType::MonolithicSparse, DISK)).unwrap();
    let d = OpenOptions::new().write(true).open(p).unwrap();
    d.write_at(&pattern(0, 8 << 20), 0).unwrap();
    d.close().unwrap();
}

impl Running {
    fn start(limits: Limits) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let mut disks = Vec::new();
        for name in ["disk", "other"] {
            let p = dir.path().join(format!("{name}.vmdk"));
            make_disk(&p);
            disks.push(DiskExport {
                name: name.into(),
                path: p,
            });
        }
        let server = Server::new(Exports::new(disks, Vec::new(), Mode::NonPersistent));
        server.set_limits(limits);
        let sock = dir.path().join("nbd.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let s = server.clone();
        let thread = std::thread::spawn(move || s.serve_unix(&listener));
        Running {
            server,
            sock,
            thread: Some(thread),
            _dir: dir,
        }
    }

    fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(&self.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    fn handshake(&self) -> Handshake<UnixStream> {
        Handshake::start(
            self.connect(),
            wire::CLIENT_FIXED_NEWSTYLE | wire::CLIENT_NO_ZEROES,
        )
        .unwrap()
    }

    /// A client in transmission on `name`, structured replies.
    fn go(&self, name: &str) -> Client<UnixStream> {
        let mut h = self.handshake();
        assert!(h.structured_replies().unwrap());
        let info = h.go(name, &[]).unwrap();
        assert_eq!(info.size, DISK);
        h.into_client(info)
    }

    /// Waits until `f` holds (at most 5 s).
    fn wait_for(&self, what: &str, f: impl Fn(&Server) -> bool) {
        let t = Instant::now();
        while !f(&self.server) {
            assert!(t.elapsed() < Duration::from_secs(5), "{what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.server.stop();
        let _ = UnixStream::connect(&self.sock);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads a little and checks it.
fn read_ok(c: &mut Client<UnixStream>, offset: u64) {
    let data = c.read(offset, 65536).unwrap().unwrap();
    assert_eq!(data, pattern(offset, 65536));
}

/// True if the server closed the stream (nothing more comes).
fn closed(s: &mut UnixStream) -> bool {
    use std::io::Read;
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn in_flight_bytes_stay_within_the_limit_and_nothing_is_lost() {
    let limit = 4 * MIB;
    let r = Running::start(Limits {
        max_inflight_bytes: limit,
        ..Limits::default()
    });
    let mut clients = [r.go("disk"), r.go("disk")];
    // 48 reads of 1 MiB each, none of whose replies is read for now.
    let mut sent = Vec::new();
    for c in clients.iter_mut() {
        for i in 0..48u64 {
            sent.push(c.send(cmd::READ, 0, (i % 8) * MIB, MIB, &[]).unwrap());
        }
    }
    let mut peak = 0;
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(600) {
        peak = peak.max(r.server.inflight_bytes());
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(
        peak <= 2 * limit,
        "two connections held {peak} bytes in flight (limit {limit} each)"
    );
    assert!(
        peak >= limit,
        "backpressure started early: at most {peak} bytes in flight"
    );
    for c in clients.iter_mut() {
        for _ in 0..48 {
            let reply = c.reply().unwrap();
            assert_eq!(reply.error, 0);
            assert_eq!(reply.data, pattern(reply.request.offset, MIB as usize));
        }
    }
    r.wait_for("in-flight bytes back to 0", |s| s.inflight_bytes() == 0);
}

#[test]
fn a_connection_over_the_limit_is_closed_before_the_greeting_and_the_others_go_on() {
    let r = Running::start(Limits {
        max_connections: 3,
        ..Limits::default()
    });
    let mut first = r.go("disk");
    let second = r.handshake();
    let _third = r.connect();
    r.wait_for("three connections", |s| s.connections() == 3);
    let mut fourth = r.connect();
    assert!(closed(&mut fourth), "a fourth connection got a greeting");
    read_ok(&mut first, 0);
    // The one in negotiation finishes it.
    let mut second = {
        let mut h = second;
        let info = h.go("other", &[]).unwrap();
        h.into_client(info)
    };
    read_ok(&mut second, MIB);
    drop(first);
    r.wait_for("a connection ended", |s| s.connections() == 2);
    let mut again = r.go("disk");
    read_ok(&mut again, 2 * MIB);
}

#[test]
fn a_connection_over_the_export_limit_is_refused_that_export_only() {
    let r = Running::start(Limits {
        max_connections_per_export: 2,
        ..Limits::default()
    });
    let mut a = r.go("disk");
    let mut b = r.go("disk");
    let mut h = r.handshake();
    match h.go("disk", &[]) {
        Err(ClientError::Refused { kind, message }) => {
            assert_eq!(kind, rep::ERR_POLICY, "{message}");
            assert!(message.contains("connections"), "{message}");
        }
        other => panic!("a third connection to disk: {other:?}"),
    }
    // The same connection may still choose another export.
    let info = h.go("other", &[]).unwrap();
    let mut c = h.into_client(info);
    read_ok(&mut c, 0);
    // EXPORT_NAME cannot be refused with a message: the connection is closed.
    let mut old = r.handshake();
    assert!(matches!(
        old.export_name("disk"),
        Err(ClientError::Refused { kind: 0, .. })
    ));
    read_ok(&mut a, 0);
    read_ok(&mut b, 0);
    drop(a);
    let t = Instant::now();
    loop {
        let mut h = r.handshake();
        match h.go("disk", &[]) {
            Ok(info) => {
                let mut d = h.into_client(info);
                read_ok(&mut d, 3 * MIB);
                break;
            }
            Err(ClientError::Refused { .. }) if t.elapsed() < Duration::from_secs(5) => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("disk still refused after a client left: {e}"),
        }
    }
}

#[test]
fn a_negotiation_is_cut_off_at_the_handshake_timeout_even_when_it_trickles() {
    let timeout = Duration::from_millis(400);
    let r = Running::start(Limits {
        handshake_timeout: timeout,
        ..Limits::default()
    });
    let mut done = r.go("disk");
    let start = Instant::now();
    let mut silent = r.handshake();
    // One byte of an option every 100 ms: each read succeeds, the whole does not.
    let mut trickle = r.handshake();
    let trickler = std::thread::spawn(move || {
        use std::io::Write;
        let opt = wire::option_header(opt::LIST, 0);
        let t = Instant::now();
        for b in opt.iter().cycle() {
            if trickle.stream.write_all(&[*b]).is_err() || t.elapsed() > Duration::from_secs(5) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        (t.elapsed(), trickle)
    });
    assert!(closed(&mut silent.stream));
    let silent_after = start.elapsed();
    let (trickled, mut trickle) = trickler.join().unwrap();
    assert!(closed(&mut trickle.stream));
    for (what, t) in [("silent", silent_after), ("trickling", trickled)] {
        assert!(
            t >= timeout && t < timeout * 4,
            "a {what} negotiation was closed after {t:?} (timeout {timeout:?})"
        );
    }
    // The connection in transmission is not concerned.
    read_ok(&mut done, 0);
    r.wait_for("the two closed", |s| s.connections() == 1);
}

#[test]
fn an_idle_connection_is_closed_an_active_one_is_not() {
    let idle = Duration::from_millis(400);
    let r = Running::start(Limits {
        idle_timeout: idle,
        ..Limits::default()
    });
    let mut quiet = r.go("disk");
    let mut busy = r.go("disk");
    let start = Instant::now();
    while start.elapsed() < idle * 3 {
        read_ok(&mut busy, 0);
        std::thread::sleep(idle / 4);
    }
    assert!(matches!(quiet.read(0, 512), Err(e) if e.is_closed()));
    read_ok(&mut busy, MIB);
}

#[test]
fn a_client_that_stops_reading_is_cut_off_at_the_reply_timeout() {
    let r = Running::start(Limits {
        reply_timeout: Duration::from_millis(500),
        max_inflight_bytes: 8 * MIB,
        ..Limits::default()
    });
    let mut stuck = r.go("disk");
    let mut fine = r.go("other");
    for i in 0..64u64 {
        stuck.send(cmd::READ, 0, (i % 8) * MIB, MIB, &[]).unwrap();
    }
    r.wait_for("the stuck connection ended", |s| s.connections() == 1);
    r.wait_for("its bytes released", |s| s.inflight_bytes() == 0);
    read_ok(&mut fine, 0);
}

#[test]
fn a_malformed_handshake_ends_only_its_connection() {
    use std::io::Write;
    let r = Running::start(Limits::default());
    let mut good = r.go("disk");
    // Bad client flags.
    let mut bad_flags = r.connect();
    let mut greeting = [0u8; 18];
    std::io::Read::read_exact(&mut bad_flags, &mut greeting).unwrap();
    bad_flags.write_all(&0x8000_0000u32.to_be_bytes()).unwrap();
    assert!(closed(&mut bad_flags));
    // Bad option magic.
    let mut h = r.handshake();
    h.stream.write_all(&[0x55; 16]).unwrap();
    assert!(closed(&mut h.stream));
    // An option announcing 4 GiB of data.
    let mut h = r.handshake();
    h.stream
        .write_all(&wire::option_header(opt::GO, u32::MAX))
        .unwrap();
    assert!(closed(&mut h.stream));
    read_ok(&mut good, 0);
    let mut after = r.go("disk");
    read_ok(&mut after, 0);
    r.wait_for("only the two good ones left", |s| s.connections() == 2);
}
