//! `vdisk-nbd` over TLS against real peers - libnbd's `nbdinfo` and `nbdcopy`,
//! qemu's `qemu-img` and `qemu-io` (which send a client certificate) - with
//! certificates made by openssl at test time, and a hand-written NBD client (plain,
//! or TLS through rustls) for what the peers do not show: the refusals a
//! TLS-required server sends, a `ClientHello` sent right behind `STARTTLS`, options
//! voided by `STARTTLS`, a key update mid-transmission, the server's
//! `close_notify`, broken handshakes ending only their connection, and the
//! startup errors for bad certificate files.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use vdisk::{create, CreateOptions, DiskType, OpenOptions};
use vdisk_interop::{
    free_port, path_str, qemu_raw, require_tool_from, run, run_unchecked, stderr_text, stdout_text,
    tempdir, vdisk_nbd_bin, NbdServer, TlsPki,
};

const MIB: u64 = 1 << 20;

// The protocol's numbers, written out again here (not taken from vdisk-nbd).
const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_META_CONTEXT: u32 = 4;
const ERR_UNSUP: u32 = 1 | 1 << 31;
const ERR_INVALID: u32 = 3 | 1 << 31;
const ERR_TLS_REQD: u32 = 5 | 1 << 31;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) | 1)
        .collect()
}

/// A 64 MiB monolithicSparse disk `d.vmdk` with data in a few places.
fn disk(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("d.vmdk");
    create(
        &p,
        &CreateOptions::new(DiskType::MonolithicSparse, 64 * MIB),
    )
    .unwrap();
    let d = OpenOptions::new().write(true).open(&p).unwrap();
    for (off, len, seed) in [
        (0, 70_000, 1u8),
        (MIB + 512, 3 * MIB as usize, 2),
        (60 * MIB, 4096, 3),
    ] {
        d.write_at(&pattern(seed, len), off).unwrap();
    }
    d.close().unwrap();
    p
}

fn tools() {
    require_tool_from("nbdinfo", "libnbd-bin");
    require_tool_from("nbdcopy", "libnbd-bin");
    require_tool_from("qemu-img", "qemu-utils");
}

fn tls_uri(server: &NbdServer, export: &str, certs: &Path) -> String {
    format!(
        "nbds+unix:///{export}?socket={}&tls-certificates={}",
        server.socket.display(),
        certs.display()
    )
}

/// qemu's `--object` for client credentials in `certs`.
fn qemu_creds(certs: &Path) -> String {
    format!(
        "tls-creds-x509,id=t,endpoint=client,dir={}",
        certs.display()
    )
}

// ---- a hand-written NBD client ----

/// Reads the greeting and answers with FIXED_NEWSTYLE | NO_ZEROES.
fn greet(s: &mut impl ReadWrite) {
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(u64::from_be_bytes(g[..8].try_into().unwrap()), NBDMAGIC);
    assert_eq!(u64::from_be_bytes(g[8..16].try_into().unwrap()), IHAVEOPT);
    s.write_all(&3u32.to_be_bytes()).unwrap();
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn option_bytes(option: u32, data: &[u8]) -> Vec<u8> {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

fn send_option(s: &mut impl ReadWrite, option: u32, data: &[u8]) {
    s.write_all(&option_bytes(option, data)).unwrap();
    s.flush().unwrap();
}

/// One option reply: (type, data), checked to answer `option`.
fn reply(s: &mut impl ReadWrite, option: u32) -> (u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(
        u64::from_be_bytes(h[..8].try_into().unwrap()),
        OPTION_REPLY_MAGIC
    );
    assert_eq!(u32::from_be_bytes(h[8..12].try_into().unwrap()), option);
    let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let mut data = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
    s.read_exact(&mut data).unwrap();
    (kind, data)
}

/// Sends `option` and returns the type of its single reply.
fn ask(s: &mut impl ReadWrite, option: u32, data: &[u8]) -> u32 {
    send_option(s, option, data);
    reply(s, option).0
}

/// Sends `option` and returns the types of its replies up to the ACK or error.
fn ask_all(s: &mut impl ReadWrite, option: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
    send_option(s, option, data);
    let mut all = Vec::new();
    loop {
        let r = reply(s, option);
        let last = r.0 == REP_ACK || r.0 & 1 << 31 != 0;
        all.push(r);
        if last {
            return all;
        }
    }
}

/// Data of INFO/GO for `export`, no info items.
fn go_data(export: &str) -> Vec<u8> {
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

fn set_meta_data(export: &str, query: &str) -> Vec<u8> {
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&(query.len() as u32).to_be_bytes());
    d.extend_from_slice(query.as_bytes());
    d
}

/// A READ with structured replies: the bytes, from its data and hole chunks.
fn structured_read(s: &mut impl ReadWrite, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut req = 0x2560_9513u32.to_be_bytes().to_vec();
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes()); // READ
    req.extend_from_slice(&cookie.to_be_bytes());
    req.extend_from_slice(&offset.to_be_bytes());
    req.extend_from_slice(&len.to_be_bytes());
    s.write_all(&req).unwrap();
    s.flush().unwrap();
    let mut out = vec![0xeeu8; len as usize];
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), 0x668e_33ef);
        let flags = u16::from_be_bytes([h[4], h[5]]);
        let kind = u16::from_be_bytes([h[6], h[7]]);
        assert_eq!(u64::from_be_bytes(h[8..16].try_into().unwrap()), cookie);
        let mut p = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
        s.read_exact(&mut p).unwrap();
        let at = |p: &[u8]| (u64::from_be_bytes(p[..8].try_into().unwrap()) - offset) as usize;
        match kind {
            0 => {}
            1 => {
                let a = at(&p);
                out[a..a + p.len() - 8].copy_from_slice(&p[8..]);
            }
            2 => {
                let a = at(&p);
                let n = u32::from_be_bytes(p[8..12].try_into().unwrap()) as usize;
                out[a..a + n].fill(0);
            }
            k => panic!("chunk type {k:#x}: {}", String::from_utf8_lossy(&p)),
        }
        if flags & 1 != 0 {
            return out;
        }
    }
}

fn send_disc(s: &mut impl ReadWrite) {
    let mut req = 0x2560_9513u32.to_be_bytes().to_vec();
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&2u16.to_be_bytes()); // DISC
    req.extend_from_slice(&[0u8; 20]);
    s.write_all(&req).unwrap();
    s.flush().unwrap();
}

fn connect(server: &NbdServer) -> UnixStream {
    let s = UnixStream::connect(&server.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// A rustls client configuration trusting `certs/ca-cert.pem`, presenting
/// `certs/client-cert.pem` if there is one.
fn client_config(certs: &Path) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(certs.join("ca-cert.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let cert = certs.join("client-cert.pem");
    Arc::new(if cert.exists() {
        let chain = CertificateDer::pem_file_iter(&cert)
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
        let key = PrivateKeyDer::from_pem_file(certs.join("client-key.pem")).unwrap();
        b.with_client_auth_cert(chain, key).unwrap()
    } else {
        b.with_no_client_auth()
    })
}

type Tls = StreamOwned<ClientConnection, UnixStream>;

/// `STARTTLS` with the `ClientHello` sent right behind it, before the ACK is read.
fn start_tls(mut s: UnixStream, certs: &Path) -> Tls {
    let mut conn = ClientConnection::new(
        client_config(certs),
        ServerName::try_from("localhost").unwrap(),
    )
    .unwrap();
    let mut bytes = option_bytes(OPT_STARTTLS, &[]);
    conn.write_tls(&mut bytes).unwrap();
    s.write_all(&bytes).unwrap();
    assert_eq!(reply(&mut s, OPT_STARTTLS), (REP_ACK, Vec::new()));
    StreamOwned::new(conn, s)
}

/// A plain client gets `ERR_TLS_REQD` for everything but `STARTTLS` and `ABORT` on a
/// server that requires TLS (the default with a certificate), and is cut off at an
/// early `EXPORT_NAME`; `nbdinfo` without TLS fails. A handshake of garbage, one
/// abandoned half-way, and a forged record after `GO` end only their own
/// connection: TLS clients are served afterwards.
#[test]
fn a_tls_required_server_refuses_plaintext_and_survives_broken_handshakes() {
    tools();
    let dir = tempdir();
    let pki = TlsPki::new(dir.path());
    let disk = disk(dir.path());
    let mut args = pki.server_args(false);
    args.extend(["-r".to_string(), path_str(&disk).to_string()]);
    let server = NbdServer::start(&args);

    let plain = run_unchecked("nbdinfo", &[&server.uri("d.vmdk")]);
    assert!(!plain.status.success(), "nbdinfo without TLS succeeded");

    let mut s = connect(&server);
    greet(&mut s);
    assert_eq!(ask(&mut s, OPT_LIST, &[]), ERR_TLS_REQD);
    assert_eq!(ask(&mut s, OPT_INFO, &go_data("d.vmdk")), ERR_TLS_REQD);
    assert_eq!(ask(&mut s, OPT_GO, &go_data("d.vmdk")), ERR_TLS_REQD);
    assert_eq!(ask(&mut s, OPT_STRUCTURED_REPLY, &[]), ERR_TLS_REQD);
    assert_eq!(ask(&mut s, 4242, &[]), ERR_TLS_REQD);
    assert_eq!(ask(&mut s, OPT_STARTTLS, b"data"), ERR_INVALID);
    assert_eq!(ask(&mut s, OPT_ABORT, &[]), REP_ACK);

    let mut s = connect(&server);
    greet(&mut s);
    send_option(&mut s, OPT_EXPORT_NAME, b"d.vmdk");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "EXPORT_NAME before STARTTLS was answered");

    // Garbage instead of a ClientHello: an alert, then the end.
    let mut s = connect(&server);
    greet(&mut s);
    assert_eq!(ask(&mut s, OPT_STARTTLS, &[]), REP_ACK);
    s.write_all(&[0x55; 300]).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .expect("the server closes a connection whose handshake failed");
    assert!(
        rest.len() < 64,
        "{} bytes after a failed handshake",
        rest.len()
    );
    // A client that leaves half-way through the handshake.
    let mut s = connect(&server);
    greet(&mut s);
    let mut conn = ClientConnection::new(
        client_config(&pki.dir),
        ServerName::try_from("localhost").unwrap(),
    )
    .unwrap();
    let mut bytes = option_bytes(OPT_STARTTLS, &[]);
    conn.write_tls(&mut bytes).unwrap();
    s.write_all(&bytes).unwrap();
    let mut some = [0u8; 100];
    s.read_exact(&mut some).unwrap();
    drop(s);

    // A broken record in the middle of transmission ends that connection.
    let mut s = start_tls(
        {
            let mut p = connect(&server);
            greet(&mut p);
            p
        },
        &pki.dir,
    );
    let go = ask_all(&mut s, OPT_GO, &go_data("d.vmdk"));
    assert_eq!(go.last().unwrap().0, REP_ACK);
    s.sock.write_all(&[23, 3, 3, 0, 40]).unwrap();
    s.sock.write_all(&[0x55; 40]).unwrap();
    let mut rest = Vec::new();
    let end = s.read_to_end(&mut rest);
    assert!(
        end.is_err() && rest.is_empty(),
        "a forged record was accepted: {end:?}"
    );

    let tls = run("nbdinfo", &[&tls_uri(&server, "d.vmdk", &pki.dir)]);
    assert!(
        stdout_text(&tls).contains("with TLS"),
        "{}",
        stdout_text(&tls)
    );
    assert!(stdout_text(&tls).contains("67108864"));
    let status = server.stop();
    assert!(status.success(), "vdisk-nbd exit status {status}");
}

/// libnbd and qemu read over TLS - Unix socket and TCP, the server requiring client
/// certificates (`--tls-ca`), which libnbd and qemu send from the certificate folder
/// - exactly what qemu-img reads from the file. A client whose certificate comes
///   from another CA, or that has none, is refused, by libnbd and by qemu.
#[test]
fn libnbd_and_qemu_read_over_tls_with_client_certificates() {
    tools();
    let dir = tempdir();
    let pki = TlsPki::new(dir.path());
    let disk = disk(dir.path());
    let want = qemu_raw(&disk);
    let reference = dir.path().join("ref.raw");
    std::fs::write(&reference, &want).unwrap();
    let mut args = pki.server_args(true);
    args.extend(["-r".to_string(), path_str(&disk).to_string()]);
    let port = free_port();
    for tcp in [false, true] {
        let server = if tcp {
            NbdServer::start_tcp(port, &args)
        } else {
            NbdServer::start(&args)
        };
        let (uri, qemu_opts) = if tcp {
            (
                format!(
                    "nbds://127.0.0.1:{port}/d.vmdk?tls-certificates={}",
                    pki.dir.display()
                ),
                format!("driver=nbd,host=127.0.0.1,port={port},export=d.vmdk,tls-creds=t"),
            )
        } else {
            (
                tls_uri(&server, "d.vmdk", &pki.dir),
                format!(
                    "driver=nbd,server.type=unix,server.path={},export=d.vmdk,tls-creds=t,tls-hostname=localhost",
                    server.socket.display()
                ),
            )
        };
        let info = stdout_text(&run("nbdinfo", &[&uri]));
        assert!(info.contains("with TLS"), "{info}");
        assert!(info.contains("export-size: 67108864"), "{info}");
        let copy = dir.path().join("copy.raw");
        run("nbdcopy", &["-C", "4", &uri, path_str(&copy)]);
        assert!(
            std::fs::read(&copy).unwrap() == want,
            "nbdcopy over TLS (tcp={tcp})"
        );
        std::fs::remove_file(&copy).unwrap();
        let creds = qemu_creds(&pki.dir);
        let info = run(
            "qemu-img",
            &["info", "--object", &creds, "--image-opts", &qemu_opts],
        );
        assert!(
            stdout_text(&info).contains("67108864 bytes"),
            "{}",
            stdout_text(&info)
        );
        let cmp = run(
            "qemu-img",
            &[
                "compare",
                "--object",
                &creds,
                "--image-opts",
                &format!("driver=raw,file.filename={}", path_str(&reference)),
                &qemu_opts,
            ],
        );
        assert!(
            stdout_text(&cmp).contains("Images are identical"),
            "tcp={tcp}"
        );

        // Refused: a client certificate from another CA, and none at all.
        for certs in [&pki.rogue_client_dir, &pki.anonymous_dir] {
            let wrong = uri.replace(path_str(&pki.dir), path_str(certs));
            let out = run_unchecked("nbdinfo", &[&wrong]);
            assert!(
                !out.status.success(),
                "nbdinfo with {} was let in",
                certs.display()
            );
            let out = run_unchecked(
                "qemu-img",
                &[
                    "info",
                    "--object",
                    &qemu_creds(certs),
                    "--image-opts",
                    &qemu_opts,
                ],
            );
            assert!(
                !out.status.success(),
                "qemu-img with {} was let in",
                certs.display()
            );
        }
        // The server goes on serving.
        run("nbdinfo", &["--size", &uri]);
        let log = server.log();
        let status = server.stop();
        assert!(status.success(), "vdisk-nbd exit status {status}: {log}");
    }
}

/// With `--tls=on` plaintext and TLS clients both get in; with `--tls=off`
/// `STARTTLS` is refused (`ERR_UNSUP`) even though a certificate was given.
#[test]
fn tls_on_serves_plaintext_and_tls_clients_and_tls_off_refuses_starttls() {
    tools();
    let dir = tempdir();
    let pki = TlsPki::new(dir.path());
    let disk = disk(dir.path());
    let want = qemu_raw(&disk);
    let mut args = pki.server_args(false);
    args.extend(["--tls=on", "-r", path_str(&disk)].map(String::from));
    let server = NbdServer::start(&args);
    for (uri, how) in [
        (server.uri("d.vmdk"), "without TLS"),
        (tls_uri(&server, "d.vmdk", &pki.dir), "with TLS"),
    ] {
        let info = stdout_text(&run("nbdinfo", &[&uri]));
        assert!(info.contains(how), "{info}");
        let copy = dir.path().join("copy.raw");
        run("nbdcopy", &[&uri, path_str(&copy)]);
        assert!(std::fs::read(&copy).unwrap() == want, "nbdcopy {how}");
        std::fs::remove_file(&copy).unwrap();
    }
    drop(server);

    let mut args = pki.server_args(false);
    args.extend(["--tls=off", "-r", path_str(&disk)].map(String::from));
    let server = NbdServer::start(&args);
    let mut s = connect(&server);
    greet(&mut s);
    assert_eq!(ask(&mut s, OPT_STARTTLS, &[]), ERR_UNSUP);
    let list = ask_all(&mut s, OPT_LIST, &[]);
    assert_eq!(list.first().map(|r| r.0), Some(REP_SERVER));
    assert_eq!(list.last().map(|r| r.0), Some(REP_ACK));
    let tls = run_unchecked("nbdinfo", &[&tls_uri(&server, "d.vmdk", &pki.dir)]);
    assert!(!tls.status.success(), "TLS with --tls=off");
    run("nbdinfo", &[&server.uri("d.vmdk")]);
}

/// The hand-written TLS client on a `--tls=on` server: a `ClientHello` sent right
/// behind `STARTTLS` is not lost; structured replies and contexts negotiated before
/// `STARTTLS` are void after it; `STARTTLS` under TLS is refused; reads answer
/// before and after a key update the client starts (whose answer the server must
/// send on its own); `DISC` ends with the server's `close_notify`; and a server
/// stopping (SIGTERM) sends `close_notify` to an idle TLS client and exits cleanly.
#[test]
fn the_tls_stream_handles_pipelined_hellos_key_updates_and_close_notify() {
    let dir = tempdir();
    let pki = TlsPki::new(dir.path());
    let disk = disk(dir.path());
    let want = qemu_raw(&disk);
    let mut args = pki.server_args(true);
    args.extend(["--tls=on", "-r", path_str(&disk)].map(String::from));
    let server = NbdServer::start(&args);

    let mut plain = connect(&server);
    greet(&mut plain);
    assert_eq!(ask(&mut plain, OPT_STRUCTURED_REPLY, &[]), REP_ACK);
    let mut s = start_tls(plain, &pki.dir);
    // Structured replies were voided by STARTTLS: contexts need them again.
    let meta = set_meta_data("d.vmdk", "base:allocation");
    assert_eq!(ask(&mut s, OPT_SET_META_CONTEXT, &meta), ERR_INVALID);
    assert_eq!(ask(&mut s, OPT_STARTTLS, &[]), ERR_INVALID);
    assert_eq!(ask(&mut s, OPT_STRUCTURED_REPLY, &[]), REP_ACK);
    let replies = ask_all(&mut s, OPT_SET_META_CONTEXT, &meta);
    assert_eq!(replies.len(), 2, "{replies:?}");
    assert_eq!(replies[0].0, REP_META_CONTEXT);
    assert!(replies[0].1.ends_with(b"base:allocation"));
    let go = ask_all(&mut s, OPT_GO, &go_data("d.vmdk"));
    assert_eq!(go.last().unwrap().0, REP_ACK, "{go:?}");

    let a = structured_read(&mut s, 1, MIB, 2 << 20);
    assert!(
        a == want[MIB as usize..3 * MIB as usize],
        "read before the key update"
    );
    s.conn.refresh_traffic_keys().unwrap();
    let b = structured_read(&mut s, 2, 59 * MIB, 2 << 20);
    assert!(
        b == want[59 * MIB as usize..61 * MIB as usize],
        "read after the key update"
    );
    let c = structured_read(&mut s, 3, 0, 100_000);
    assert!(c == want[..100_000], "a second read after the key update");
    send_disc(&mut s);
    let mut rest = Vec::new();
    let end = s.read_to_end(&mut rest);
    assert!(
        end.is_ok() && rest.is_empty(),
        "no close_notify after DISC: {end:?}, {} bytes",
        rest.len()
    );

    // An idle TLS client when the server stops.
    let mut s = start_tls(
        {
            let mut p = connect(&server);
            greet(&mut p);
            p
        },
        &pki.dir,
    );
    let go = ask_all(&mut s, OPT_GO, &go_data("d.vmdk"));
    assert_eq!(go.last().unwrap().0, REP_ACK);
    let log = server.log();
    let status = server.stop();
    assert!(status.success(), "vdisk-nbd exit status {status}: {log}");
    let mut rest = Vec::new();
    let end = s.read_to_end(&mut rest);
    assert!(
        end.is_ok() && rest.is_empty(),
        "no close_notify at the server's stop: {end:?}"
    );
}

/// Writes through TLS (qemu-io over TCP with its client certificate, nbdcopy over
/// the Unix socket) into a persistent export read back over TLS and are in the
/// disk after the server stopped.
#[test]
fn writes_through_tls_read_back() {
    tools();
    require_tool_from("qemu-io", "qemu-utils");
    let dir = tempdir();
    let pki = TlsPki::new(dir.path());
    let disk = disk(dir.path());
    let model = dir.path().join("model.raw");
    std::fs::write(&model, qemu_raw(&disk)).unwrap();
    let cmds = [
        "write -P 0x55 100 70000",
        "write -P 0x66 -f 3M 64k",
        "write -z 1M 100000",
        "flush",
    ];
    let mut io_args = vec!["-f".to_string(), "raw".to_string()];
    for c in cmds {
        io_args.extend(["-c".to_string(), c.to_string()]);
    }
    let mut on_model = io_args.clone();
    on_model.push(path_str(&model).into());
    run("qemu-io", &on_model);
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

    let port = free_port();
    let mut args = pki.server_args(true);
    args.extend(["--persistent", path_str(&disk)].map(String::from));
    let server = NbdServer::start_tcp(port, &args);
    let mut on_nbd = vec![
        "--object".to_string(),
        qemu_creds(&pki.dir),
        "--image-opts".to_string(),
    ];
    on_nbd.extend(io_args[2..].iter().cloned());
    on_nbd.push(format!(
        "driver=nbd,host=127.0.0.1,port={port},export=d.vmdk,tls-creds=t"
    ));
    run("qemu-io", &on_nbd);
    let uri = format!(
        "nbds://127.0.0.1:{port}/d.vmdk?tls-certificates={}",
        pki.dir.display()
    );
    // The 4 MiB at 20M through nbdcopy: a 24 MiB source whose first 20 MiB are the
    // model's (already written), then the pattern.
    let source = dir.path().join("source.raw");
    let mut bytes = std::fs::read(&model).unwrap();
    bytes.truncate(24 * MIB as usize);
    std::fs::write(&source, &bytes).unwrap();
    run("nbdcopy", &["--flush", "-C", "4", path_str(&source), &uri]);
    let got = dir.path().join("got.raw");
    run("nbdcopy", &["-C", "4", &uri, path_str(&got)]);
    assert!(
        std::fs::read(&got).unwrap() == std::fs::read(&model).unwrap(),
        "what was written through TLS does not read back"
    );
    let status = server.stop();
    assert!(status.success());
    assert!(
        qemu_raw(&disk) == std::fs::read(&model).unwrap(),
        "the writes did not reach the disk"
    );
}

/// Bad TLS files fail at startup with a message naming the file and the problem.
#[test]
fn bad_certificate_files_fail_at_startup_with_clear_errors() {
    let dir = tempdir();
    let pki = TlsPki::new(dir.path());
    let disk = disk(dir.path());
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let missing = dir.path().join("missing.pem");
    let cert = pki.file("server-cert.pem");
    let key = pki.file("server-key.pem");
    let p = |p: &Path| path_str(p).to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--tls-cert".into(),
                p(&missing),
                "--tls-key".into(),
                p(&key),
            ],
            "cannot read the certificate file",
        ),
        (
            vec![
                "--tls-cert".into(),
                p(&cert),
                "--tls-key".into(),
                p(&missing),
            ],
            "cannot read the private key file",
        ),
        (
            vec![
                "--tls-cert".into(),
                p(&garbage),
                "--tls-key".into(),
                p(&key),
            ],
            "holds no PEM certificate",
        ),
        (
            vec!["--tls-cert".into(), p(&cert), "--tls-key".into(), p(&cert)],
            "holds no PEM private key",
        ),
        (
            vec![
                "--tls-cert".into(),
                p(&cert),
                "--tls-key".into(),
                p(&pki.file("client-key.pem")),
            ],
            "does not belong to the certificate",
        ),
        (
            vec![
                "--tls-cert".into(),
                p(&cert),
                "--tls-key".into(),
                p(&key),
                "--tls-ca".into(),
                p(&garbage),
            ],
            "holds no PEM certificate",
        ),
        (vec!["--tls=on".into()], "--tls=on needs a certificate"),
        (
            vec!["--tls=require".into()],
            "--tls=require needs a certificate",
        ),
        (vec!["--tls-key".into(), p(&key)], "--tls-cert"),
    ];
    for (args, message) in cases {
        let mut all = vec!["--socket".to_string(), p(&dir.path().join("s.sock"))];
        all.extend(args.iter().cloned());
        all.push(p(&disk));
        let out = run_unchecked(vdisk_nbd_bin(), &all);
        assert!(!out.status.success(), "{args:?} started");
        let err = stderr_text(&out);
        assert!(err.contains(message), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(!dir.path().join("s.sock").exists(), "{args:?}: listened");
    }
}
