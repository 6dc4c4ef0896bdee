//! Faults of the `nbd`/`nbdssl` transports through the C API, against the real
//! `vdisk-nbd` program:
//!
//! * the server killed (SIGKILL) under reads: a synchronous `VixDiskLib_Read` and
//!   every pending `VixDiskLib_ReadAsync` callback complete with
//!   `VIX_E_HOST_TCP_CONN_LOST` within seconds, `Wait` returns, later reads fail
//!   at once, Close and Disconnect work;
//! * a wrong thumbprint: ConnectEx refuses the server (TLS handshake, before any
//!   export is opened), also when plaintext `nbd` is listed; the right one works;
//! * a TCP port that is not NBD (a web server): a clear error at ConnectEx - the
//!   handshake error when it answers at once, a timeout when it waits for a request.

use std::ffi::{c_void, CString};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vdisk::{create, CreateOptions, DiskType, ErrorKind, OpenOptions};
use vdisk_interop::{path_str, pattern, tempdir, NbdServer, TlsPki};
use vixDiskLib::api_io::{
    VixDiskLib_Close, VixDiskLib_Open, VixDiskLib_Read, VixDiskLib_ReadAsync, VixDiskLib_Wait,
};
use vixDiskLib::api_lib::{
    VixDiskLib_ConnectEx, VixDiskLib_Disconnect, VixDiskLib_GetTransportMode,
};
use vixDiskLib::errors::{VIX_ASYNC, VIX_E_FAIL, VIX_OK};
use vixDiskLib::types::{
    VixDiskLibConnectParams, VixDiskLibConnection, VixDiskLibHandle, VixError,
    VIXDISKLIB_FLAG_OPEN_READ_ONLY,
};

const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;
/// VIX_E_HOST_TCP_CONN_LOST.
const CONN_LOST: VixError = 14011;

/// Only one test at a time uses the library's global state.
static SERIAL: Mutex<()> = Mutex::new(());

/// ConnectEx's parameters that these tests vary.
#[derive(Default)]
struct Params<'a> {
    server: &'a str,
    port: u32,
    thumbprint: Option<&'a str>,
    modes: Option<&'a str>,
}

fn connect(p: &Params<'_>) -> Result<VixDiskLibConnection, VixError> {
    let server = CString::new(p.server).unwrap();
    let thumb = p.thumbprint.map(|t| CString::new(t).unwrap());
    let modes = p.modes.map(|m| CString::new(m).unwrap());
    // SAFETY: all-zero is a valid (empty) parameter struct.
    let mut params: VixDiskLibConnectParams = unsafe { std::mem::zeroed() };
    params.serverName = server.as_ptr() as *mut _;
    params.port = p.port;
    if let Some(t) = &thumb {
        params.thumbPrint = t.as_ptr() as *mut _;
    }
    let mut conn: VixDiskLibConnection = ptr::null_mut();
    // SAFETY: a valid parameter struct whose strings outlive the call, a valid out
    // pointer.
    let code = unsafe {
        VixDiskLib_ConnectEx(
            &params,
            1,
            ptr::null(),
            modes.as_ref().map_or(ptr::null(), |m| m.as_ptr()),
            &mut conn,
        )
    };
    if code == VIX_OK {
        Ok(conn)
    } else {
        Err(code)
    }
}

fn open(conn: VixDiskLibConnection, name: &str) -> VixDiskLibHandle {
    let p = CString::new(name).unwrap();
    let mut h: VixDiskLibHandle = ptr::null_mut();
    // SAFETY: a NUL-terminated path and a valid out pointer.
    let code = unsafe { VixDiskLib_Open(conn, p.as_ptr(), VIXDISKLIB_FLAG_OPEN_READ_ONLY, &mut h) };
    assert_eq!(code, VIX_OK, "Open {name}");
    h
}

fn read(h: VixDiskLibHandle, offset: u64, buf: &mut [u8]) -> VixError {
    // SAFETY: `buf` holds the sectors asked for.
    unsafe {
        VixDiskLib_Read(
            h,
            offset / SECTOR,
            buf.len() as u64 / SECTOR,
            buf.as_mut_ptr(),
        )
    }
}

/// A disk of `size` bytes, all data (`pattern` bytes), for `vdisk-nbd` to serve.
fn data_disk(dir: &Path, size: u64) -> std::path::PathBuf {
    let p = dir.join("d.vmdk");
    create(&p, &CreateOptions::new(DiskType::MonolithicSparse, size)).unwrap();
    let d = OpenOptions::new().write(true).open(&p).unwrap();
    let data = pattern(3, 8 * MIB as usize);
    for at in (0..size).step_by(data.len()) {
        d.write_at(&data, at).unwrap();
    }
    d.close().unwrap();
    p
}

/// Async reads in flight: a buffer per slot, each busy until its callback.
struct Pool {
    state: Mutex<PoolState>,
    cond: Condvar,
    calls: AtomicU64,
}

struct PoolState {
    busy: Vec<bool>,
    codes: Vec<VixError>,
}

struct Slot {
    pool: Arc<Pool>,
    index: usize,
}

extern "C" fn on_done(data: *mut c_void, result: VixError) {
    // SAFETY: `data` is a Slot that lives until Wait returned.
    let s = unsafe { &*(data as *const Slot) };
    s.pool.calls.fetch_add(1, Ordering::SeqCst);
    let mut st = s.pool.state.lock().unwrap();
    assert!(
        st.busy[s.index],
        "a callback ran twice for slot {}",
        s.index
    );
    st.busy[s.index] = false;
    st.codes.push(result);
    s.pool.cond.notify_all();
}

/// A raw pointer the sync reader thread takes along (the handle stays open until
/// that thread is joined).
struct SendHandle(VixDiskLibHandle);
// SAFETY: disk handles may be used from any thread (the library locks its state).
unsafe impl Send for SendHandle {}

#[test]
fn server_killed_mid_read_fails_sync_and_async_reads_within_seconds() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempdir();
    let size = 128 * MIB;
    let disk = data_disk(dir.path(), size);
    let server = NbdServer::start(&["-r", path_str(&disk)]);
    let conn = connect(&Params {
        server: &format!("unix:{}", server.socket.display()),
        modes: Some("nbd"),
        ..Params::default()
    })
    .expect("ConnectEx");
    let h = open(conn, "d.vmdk");
    // The reads work before the kill.
    let mut first = vec![0u8; MIB as usize];
    assert_eq!(read(h, 0, &mut first), VIX_OK);
    assert!(first == pattern(3, MIB as usize));

    // A thread of synchronous 4 MiB reads, round the disk until one fails.
    let sync_h = SendHandle(h);
    let (sync_tx, sync_rx) = mpsc::channel();
    let sync = std::thread::spawn(move || {
        let h = sync_h;
        let mut buf = vec![0u8; 4 * MIB as usize];
        let mut at = 0;
        let mut reads = 0u64;
        let t0 = Instant::now();
        loop {
            let code = read(h.0, at, &mut buf);
            if code != VIX_OK {
                let _ = sync_tx.send((code, reads, Instant::now()));
                return;
            }
            reads += 1;
            at = (at + buf.len() as u64) % size;
            if t0.elapsed() > Duration::from_secs(60) {
                let _ = sync_tx.send((VIX_OK, reads, Instant::now()));
                return;
            }
        }
    });

    // The server killed 300 ms in.
    let killed = Arc::new(Mutex::new(None::<Instant>));
    let k = Arc::clone(&killed);
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        *k.lock().unwrap() = Some(Instant::now());
        server.kill()
    });

    // Asynchronous 1 MiB reads, 16 in flight, resubmitted as they complete until
    // one fails (or cannot be queued).
    const SLOTS: usize = 16;
    let pool = Arc::new(Pool {
        state: Mutex::new(PoolState {
            busy: vec![false; SLOTS],
            codes: Vec::new(),
        }),
        cond: Condvar::new(),
        calls: AtomicU64::new(0),
    });
    let slots: Vec<Box<Slot>> = (0..SLOTS)
        .map(|index| {
            Box::new(Slot {
                pool: Arc::clone(&pool),
                index,
            })
        })
        .collect();
    let mut bufs = vec![0u8; SLOTS * MIB as usize];
    let base = bufs.as_mut_ptr();
    let mut queued = 0u64;
    let mut refused = None;
    let mut at = 0u64;
    let t0 = Instant::now();
    loop {
        let slot = {
            let mut st = pool.state.lock().unwrap();
            loop {
                if st.codes.iter().any(|&c| c != VIX_OK) {
                    break None;
                }
                if let Some(i) = st.busy.iter().position(|b| !b) {
                    st.busy[i] = true;
                    break Some(i);
                }
                st = pool.cond.wait(st).unwrap();
            }
        };
        let Some(slot) = slot else { break };
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "async reads never failed"
        );
        let data = &*slots[slot] as *const Slot as *mut c_void;
        // SAFETY: the slot's MiB of `bufs` is not touched until its callback; the
        // Slot outlives Wait.
        let code = unsafe {
            VixDiskLib_ReadAsync(
                h,
                at / SECTOR,
                MIB / SECTOR,
                base.add(slot * MIB as usize),
                Some(on_done),
                data,
            )
        };
        at = (at + MIB) % size;
        if code != VIX_ASYNC {
            // Not queued: no callback will come.
            pool.state.lock().unwrap().busy[slot] = false;
            refused = Some(code);
            break;
        }
        queued += 1;
    }
    // Wait returns (on a thread of its own, so that a hang fails the test).
    let wait_h = SendHandle(h);
    let (wait_tx, wait_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let h = wait_h;
        let _ = wait_tx.send(VixDiskLib_Wait(h.0));
    });
    let waited = wait_rx
        .recv_timeout(Duration::from_secs(15))
        .expect("VixDiskLib_Wait hung after the server was killed");
    let async_done = Instant::now();
    let (sync_code, sync_reads, sync_done) = sync_rx
        .recv_timeout(Duration::from_secs(15))
        .expect("a synchronous Read hung after the server was killed");
    sync.join().unwrap();
    let status = killer.join().unwrap();
    let killed = killed.lock().unwrap().expect("the server was killed");
    println!(
        "killed ({status}): {queued} ReadAsync queued, {} callbacks, sync reads before \
         the failure {sync_reads}; async failed {:?} and sync {:?} after the kill",
        pool.calls.load(Ordering::SeqCst),
        async_done.saturating_duration_since(killed),
        sync_done.saturating_duration_since(killed)
    );

    // Every queued read called back exactly once (on_done asserts "once").
    assert_eq!(waited, VIX_OK, "Wait");
    assert_eq!(pool.calls.load(Ordering::SeqCst), queued);
    let st = pool.state.lock().unwrap();
    assert!(st.busy.iter().all(|b| !b), "a slot without its callback");
    let failed: Vec<VixError> = st.codes.iter().copied().filter(|&c| c != VIX_OK).collect();
    drop(st);
    assert!(
        !failed.is_empty() || refused.is_some(),
        "no read failed after the kill"
    );
    for code in failed.iter().chain(refused.iter()) {
        assert_eq!(*code, CONN_LOST, "a failed ReadAsync's VixError");
    }
    assert_eq!(sync_code, CONN_LOST, "the synchronous Read's VixError");
    // Within seconds of the kill.
    for (what, t) in [("ReadAsync", async_done), ("Read", sync_done)] {
        let after = t.saturating_duration_since(killed);
        assert!(
            after < Duration::from_secs(5),
            "{what} failed {after:?} after the kill"
        );
    }
    // Later reads fail at once, with the same error; nothing hangs at the end.
    let t = Instant::now();
    let mut buf = vec![0u8; 4096];
    assert_eq!(read(h, 0, &mut buf), CONN_LOST);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(VixDiskLib_Close(h), VIX_OK, "Close");
    assert_eq!(VixDiskLib_Disconnect(conn), VIX_OK, "Disconnect");
    drop(bufs);
}

/// The SHA-1 fingerprint of a PEM certificate, `AA:BB:...` (openssl's).
fn sha1_fingerprint(cert: &Path) -> String {
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha1", "-in"])
        .arg(cert)
        .output()
        .expect("run openssl");
    assert!(out.status.success(), "openssl x509 -fingerprint");
    let text = String::from_utf8_lossy(&out.stdout);
    let fp = text.trim().rsplit('=').next().unwrap().to_string();
    assert_eq!(fp.len(), 59, "a SHA-1 fingerprint: {text}");
    fp
}

#[test]
fn a_wrong_thumbprint_is_refused_at_connectex() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempdir();
    let pki = TlsPki::new(dir.path());
    let size = 8 * MIB;
    let disk = data_disk(dir.path(), size);
    // TLS offered but not required (--tls=on): a client that fell back to
    // plaintext would get in, so a refusal is the thumbprint's doing.
    let mut args = pki.server_args(false);
    args.extend(["--tls=on".to_string(), "-r".into(), path_str(&disk).into()]);
    let server = NbdServer::start(&args);
    let sock = format!("unix:{}", server.socket.display());
    let right = sha1_fingerprint(&pki.file("server-cert.pem"));
    // Another real certificate's: the CA's.
    let wrong = sha1_fingerprint(&pki.file("ca-cert.pem"));
    assert_ne!(right, wrong);
    for modes in [None, Some("nbdssl"), Some("nbdssl:nbd"), Some("nbd:nbdssl")] {
        let t = Instant::now();
        let code = connect(&Params {
            server: &sock,
            thumbprint: Some(&wrong),
            modes,
            ..Params::default()
        })
        .expect_err("ConnectEx with a wrong thumbprint");
        assert_eq!(code, VIX_E_FAIL, "modes {modes:?}");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }
    // The wrong thumbprint in lower case: as wrong.
    let code = connect(&Params {
        server: &sock,
        thumbprint: Some(&wrong.to_lowercase()),
        ..Params::default()
    })
    .expect_err("ConnectEx with a wrong thumbprint");
    assert_eq!(code, VIX_E_FAIL);
    // (The refusal is the TLS handshake's, which comes before any option: no
    // export was named, so no handle - and no data - can exist.)

    // The right thumbprint: nbdssl, and the bytes.
    let conn = connect(&Params {
        server: &sock,
        thumbprint: Some(&right),
        modes: Some("nbdssl:nbd"),
        ..Params::default()
    })
    .expect("ConnectEx with the server's thumbprint");
    let h = open(conn, "d.vmdk");
    let mode = VixDiskLib_GetTransportMode(h);
    // SAFETY: a static NUL-terminated string from the library.
    let mode = unsafe { std::ffi::CStr::from_ptr(mode) }.to_string_lossy();
    assert_eq!(mode, "nbdssl");
    let mut buf = vec![0u8; MIB as usize];
    assert_eq!(read(h, MIB, &mut buf), VIX_OK);
    assert!(buf == pattern(3, 2 * MIB as usize)[MIB as usize..]);
    assert_eq!(VixDiskLib_Close(h), VIX_OK);
    assert_eq!(VixDiskLib_Disconnect(conn), VIX_OK);
}

/// A TCP port on 127.0.0.1 that speaks HTTP: with `eager`, it answers every
/// connection at once (as some servers greet); else it waits for a request, as
/// web servers do, and answers 400 to what comes. Runs until the test ends.
fn http_server(eager: bool) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                const ANSWER: &[u8] =
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
                if !eager {
                    let mut req = [0u8; 1024];
                    if !matches!(s.read(&mut req), Ok(n) if n > 0) {
                        return;
                    }
                }
                let _ = s.write_all(ANSWER);
            });
        }
    });
    port
}

#[test]
fn a_port_that_is_not_nbd_fails_connectex_clearly() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // An HTTP answer where the NBD greeting should be: the handshake error.
    let port = http_server(true);
    for (server, port) in [
        ("127.0.0.1".to_string(), u32::from(port)),
        (format!("nbd://127.0.0.1:{port}"), 0),
    ] {
        let t = Instant::now();
        let code = connect(&Params {
            server: &server,
            port,
            modes: Some("nbd"),
            ..Params::default()
        })
        .expect_err("ConnectEx to a web server");
        assert_eq!(
            code,
            ErrorKind::Handshake.vix_code(),
            "{server} port {port}"
        );
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }
    // Over nbdssl too (the greeting comes before STARTTLS).
    let code = connect(&Params {
        server: "127.0.0.1",
        port: u32::from(port),
        ..Params::default()
    })
    .expect_err("ConnectEx to a web server");
    assert_eq!(code, ErrorKind::Handshake.vix_code());
    // A web server that waits for a request: no greeting ever comes, and
    // ConnectEx gives up after the connect timeout (10 s) with a timeout.
    let port = http_server(false);
    let t = Instant::now();
    let code = connect(&Params {
        server: "127.0.0.1",
        port: u32::from(port),
        modes: Some("nbd"),
        ..Params::default()
    })
    .expect_err("ConnectEx to a silent web server");
    let took = t.elapsed();
    println!("a silent web server: VixError {code} after {took:?}");
    assert_eq!(code, ErrorKind::TimedOut.vix_code());
    assert!(took < Duration::from_secs(15), "{took:?}");
    // Nothing listening: refused.
    let free = TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = free.local_addr().unwrap().port();
    drop(free);
    let code = connect(&Params {
        server: "127.0.0.1",
        port: u32::from(closed),
        modes: Some("nbd"),
        ..Params::default()
    })
    .expect_err("ConnectEx to a closed port");
    assert_eq!(code, ErrorKind::ConnectionRefused.vix_code());
}
