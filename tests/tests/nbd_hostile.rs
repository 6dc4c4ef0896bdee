//! Hostile clients against a real `vdisk-nbd` process, scripted byte by byte over
//! its Unix socket with the strict client of `vdisk_nbd::testing` (which checks
//! every reply against the protocol) and requests built by `vdisk_nbd::wire`.
//!
//! While they run, a well-behaved client reads another export in a loop (block
//! status, then every data range compared with the disk's content) and must keep
//! getting correct answers; `nbdinfo --map` must agree at the end. Each hostile
//! case checks that the server answers as the specification asks (shared/docs/nbd.md
//! §1.7: `EINVAL`, `ENOSPC`, `EPERM`, `EOVERFLOW`, `ENOTSUP` where they apply; option
//! errors; a hard disconnect only where the framing is lost). At the end the
//! server must still be running, its log must hold no panic, its peak memory
//! (`VmHWM`) must stay under [`MAX_RSS`], and SIGTERM must stop it cleanly.
//!
//! Cases: the handshake cut at every byte; bad client flags; bad option magic;
//! option lengths of 2^32-1 and just over each limit; malformed INFO, GO and
//! meta-context data; unknown exports (GO, INFO, EXPORT_NAME); STARTTLS without
//! TLS; meta contexts before structured replies; more contexts than allowed; more
//! options than allowed; then, for simple, structured and extended sessions: bad
//! request magic, every command past the end and at absurd lengths (a 4 GiB
//! read, a write announcing 2^32-1 bytes then gone), unknown commands and flags,
//! zero lengths, block status without contexts, DF without structured replies; a
//! client that stops reading replies while sending many large reads; and
//! `VDISK_NBD_HOSTILE_STRINGS` (default 10,000) seeded random request streams
//! after the handshake (`VDISK_NBD_HOSTILE_SEED`), each reply checked.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vdisk::{create, CreateOptions, DiskType, OpenOptions, RangeKind};
use vdisk_interop::{
    env_u64, peak_rss_bytes, require_tool_from, run, stdout_text, tempdir, NbdServer, SplitMix, MIB,
};
use vdisk_nbd::fuzzing::frame_requests;
use vdisk_nbd::limits::{MAX_OPTIONS, MAX_OPTION_BYTES, MAX_PAYLOAD, MAX_SKIPPED_OPTION_BYTES};
use vdisk_nbd::testing::{Client, ClientError, Handshake, Reply, ReplyReader};
use vdisk_nbd::wire::{self, cflag, cmd, errno, info, opt, rep, Request};

/// The most memory the server may have used at its peak.
const MAX_RSS: u64 = 256 * MIB;
/// Size of the exported disks.
const SIZE: u64 = 64 * MIB;
/// Data written to the disks: (offset, length).
const DATA: [(u64, u64); 3] = [(0, 4 * MIB), (20 * MIB + 512, 300_000), (SIZE - MIB, MIB)];

fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((offset + i) / 512 * 13 + (offset + i) % 241) as u8 | 1)
        .collect()
}

/// What the disks hold at `[offset, offset+len)`: [`pattern`] inside [`DATA`],
/// zeros elsewhere.
fn expected(offset: u64, len: u64) -> Vec<u8> {
    let mut out = vec![0u8; len as usize];
    for (o, l) in DATA {
        let (s, e) = (o.max(offset), (o + l).min(offset + len));
        if s < e {
            out[(s - offset) as usize..(e - offset) as usize]
                .copy_from_slice(&pattern(s, (e - s) as usize));
        }
    }
    out
}

fn make_disk(p: &Path) {
    create(p, &CreateOptions::new(DiskType::MonolithicSparse, SIZE)).unwrap();
    let d = OpenOptions::new().write(true).open(p).unwrap();
    for (o, l) in DATA {
        d.write_at(&pattern(o, l as usize), o).unwrap();
    }
    d.close().unwrap();
}

fn connect(sock: &Path) -> UnixStream {
    let s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

const FLAGS: u32 = wire::CLIENT_FIXED_NEWSTYLE | wire::CLIENT_NO_ZEROES;

fn handshake(sock: &Path) -> Handshake<UnixStream> {
    Handshake::start(connect(sock), FLAGS).unwrap()
}

/// How a session negotiates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Session {
    Simple,
    Structured,
    Extended,
}

const SESSIONS: [Session; 3] = [Session::Simple, Session::Structured, Session::Extended];

/// A session on export `name` with `contexts` selected (not for simple ones).
fn session(sock: &Path, s: Session, name: &str, contexts: &[&str]) -> Client<UnixStream> {
    let mut h = handshake(sock);
    match s {
        Session::Simple => {}
        Session::Structured => assert!(h.structured_replies().unwrap()),
        Session::Extended => assert!(h.extended_headers().unwrap()),
    }
    if s != Session::Simple && !contexts.is_empty() {
        let got = h.set_meta_context(name, contexts).unwrap();
        assert_eq!(got.len(), contexts.len());
    }
    let info = h.go(name, &[info::BLOCK_SIZE]).unwrap();
    assert_eq!(info.size, SIZE);
    h.into_client(info)
}

/// Asserts the server closes `s` without sending anything more.
fn assert_closed(s: &mut UnixStream, what: &str) {
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => assert!(
            rest.is_empty(),
            "{what}: {} more bytes before the close",
            rest.len()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{what}: the server did not close the connection: {e}"),
    }
}

fn option_bytes(option: u32, data: &[u8]) -> Vec<u8> {
    let mut b = wire::option_header(option, data.len() as u32).to_vec();
    b.extend_from_slice(data);
    b
}

/// The final reply type of `option` with `data`.
fn answer(h: &mut Handshake<UnixStream>, option: u32, data: &[u8]) -> u32 {
    let r = h
        .option(option, data)
        .unwrap_or_else(|e| panic!("option {option} with {} bytes: {e}", data.len()));
    r.last().unwrap().kind
}

fn error_of(r: Result<Reply, ClientError>, what: &str) -> u32 {
    r.unwrap_or_else(|e| panic!("{what}: {e}")).error
}

/// A request that must fail with `want`, then a read that must work (the
/// connection goes on).
#[allow(clippy::too_many_arguments)]
fn expect_error(
    c: &mut Client<UnixStream>,
    what: &str,
    command: u16,
    flags: u16,
    offset: u64,
    len: u64,
    payload: &[u8],
    want: u32,
) {
    let got = error_of(c.call(command, flags, offset, len, payload), what);
    assert_eq!(got, want, "{what}: error {got}, {want} expected");
    let data = c
        .read(0, 4096)
        .unwrap()
        .unwrap_or_else(|e| panic!("{what}: then a read: {e}"));
    assert!(data == pattern(0, 4096), "{what}: then a read: wrong data");
}

// ---------------------------------------------------------------------------------
// The well-behaved client.

/// Reads export `good` in a loop until `stop`: block status of the whole disk,
/// every data range compared with what the disk holds. Returns the rounds made.
fn well_behaved(sock: PathBuf, stop: Arc<AtomicBool>, rounds: Arc<AtomicU64>) {
    while !stop.load(Ordering::SeqCst) {
        let mut c = session(&sock, Session::Structured, "good", &["base:allocation"]);
        let r = c.call(cmd::BLOCK_STATUS, 0, 0, SIZE, &[]).unwrap();
        assert_eq!(r.error, 0, "good client: block status: {}", r.message);
        let mut at = 0u64;
        for e in &r.status[0].1 {
            let data = e.flags & u64::from(wire::STATE_HOLE) == 0;
            if data {
                let len = e.len.min(SIZE - at).min(4 * MIB);
                let got = c.read(at, len).unwrap().expect("good client: read");
                assert!(got == expected(at, len), "good client: wrong data at {at}");
            }
            at += e.len;
        }
        c.disconnect().unwrap();
        rounds.fetch_add(1, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------------
// Negotiation.

/// The handshake of a structured session, cut after every byte: the server must
/// answer exactly the options complete in the cut, then close.
fn handshake_cut_at_every_byte(sock: &Path) {
    let parts = [
        FLAGS.to_be_bytes().to_vec(),
        option_bytes(opt::STRUCTURED_REPLY, &[]),
        option_bytes(
            opt::SET_META_CONTEXT,
            &wire::meta_request("disk", &["base:allocation"]),
        ),
        option_bytes(opt::GO, &wire::info_request("disk", &[info::BLOCK_SIZE])),
    ];
    let full: Vec<u8> = parts.concat();
    // What the server sends for each whole prefix of options.
    let send = |bytes: &[u8]| -> Vec<u8> {
        let mut s = connect(sock);
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).unwrap();
        s.write_all(bytes).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out)
            .unwrap_or_else(|e| panic!("cut after {} bytes: {e}", bytes.len()));
        out
    };
    let mut bounds = vec![0usize];
    for p in &parts {
        bounds.push(bounds.last().unwrap() + p.len());
    }
    let outputs: Vec<Vec<u8>> = bounds.iter().map(|&b| send(&full[..b])).collect();
    assert!(outputs[3].len() > outputs[2].len() && outputs[2].len() > outputs[1].len());
    for k in 0..full.len() {
        let whole = bounds.iter().rposition(|&b| b <= k).unwrap();
        assert_eq!(
            send(&full[..k]),
            outputs[whole],
            "the handshake cut after {k} bytes"
        );
    }
}

fn bad_flags_magic_and_lengths(sock: &Path) {
    for flags in [0x4u32, 0x8000_0000, u32::MAX] {
        let mut s = connect(sock);
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).unwrap();
        s.write_all(&flags.to_be_bytes()).unwrap();
        assert_closed(&mut s, &format!("client flags {flags:#x}"));
    }
    // Bad option magic.
    let mut h = handshake(sock);
    h.stream.write_all(b"IHAVEOPX\0\0\0\x03\0\0\0\0").unwrap();
    assert_closed(&mut h.stream, "bad option magic");
    // Lengths the server will not read: closed at once.
    for (option, len) in [
        (opt::GO, u32::MAX),
        (opt::LIST, u32::MAX),
        (opt::INFO, MAX_SKIPPED_OPTION_BYTES as u32 + 1),
        (opt::EXPORT_NAME, MAX_OPTION_BYTES as u32 + 1),
    ] {
        let mut h = handshake(sock);
        h.stream
            .write_all(&wire::option_header(option, len))
            .unwrap();
        assert_closed(&mut h.stream, &format!("option {option} of {len} bytes"));
    }
    // Just over the data limit: skipped and refused, the negotiation goes on.
    let mut h = handshake(sock);
    let big = vec![0u8; MAX_OPTION_BYTES as usize + 1];
    assert_eq!(answer(&mut h, opt::INFO, &big), rep::ERR_TOO_BIG);
    assert_eq!(answer(&mut h, 0x7fff_0000, &big), rep::ERR_TOO_BIG);
    // At the limit: read, and malformed.
    let at_limit = vec![0u8; MAX_OPTION_BYTES as usize];
    assert_eq!(answer(&mut h, opt::GO, &at_limit), rep::ERR_INVALID);
    let info = h.go("disk", &[]).unwrap();
    let mut c = h.into_client(info);
    assert!(c.read(0, 512).unwrap().unwrap() == pattern(0, 512));
}

fn malformed_options(sock: &Path) {
    let name_len = |n: u32, rest: &[u8]| [n.to_be_bytes().as_slice(), rest].concat();
    let mut h = handshake(sock);
    let info_cases: Vec<Vec<u8>> = vec![
        vec![],
        vec![0, 0],
        name_len(10, b"disk"),
        name_len(4, b"disk"),
        name_len(4, b"disk\0\x02\0\x01"),
        name_len(4, b"disk\0\x01\0\x01\0"),
        name_len(u32::MAX, b"disk\0\0"),
        name_len(2, b"\xff\xfe\0\0"),
        [wire::info_request("disk", &[]), b"junk".to_vec()].concat(),
    ];
    for option in [opt::INFO, opt::GO] {
        for d in &info_cases {
            assert_eq!(
                answer(&mut h, option, d),
                rep::ERR_INVALID,
                "option {option} {d:?}"
            );
        }
    }
    assert!(h.structured_replies().unwrap());
    let q = |n: u32| n.to_be_bytes().to_vec();
    let meta_cases: Vec<Vec<u8>> = vec![
        vec![],
        name_len(4, b"disk"),
        [name_len(4, b"disk"), q(u32::MAX)].concat(),
        [name_len(4, b"disk"), q(1), q(100), b"base:".to_vec()].concat(),
        [wire::meta_request("disk", &["base:allocation"]), vec![0]].concat(),
        [name_len(4, b"disk"), q(1), q(u32::MAX)].concat(),
        [name_len(4, b"disk"), q(1), q(2), b"\xc3\x28".to_vec()].concat(),
    ];
    for option in [opt::LIST_META_CONTEXT, opt::SET_META_CONTEXT] {
        for d in &meta_cases {
            assert_eq!(
                answer(&mut h, option, d),
                rep::ERR_INVALID,
                "option {option} {d:?}"
            );
        }
    }
    // Unknown exports, unknown options, STARTTLS without TLS, data where none goes.
    assert_eq!(
        answer(&mut h, opt::GO, &wire::info_request("nope", &[])),
        rep::ERR_UNKNOWN
    );
    for name in ["[ds] disk.vmdk", "../disk.vmdk", ""] {
        let kind = answer(&mut h, opt::INFO, &wire::info_request(name, &[]));
        assert_eq!(kind, rep::ERR_UNKNOWN, "INFO {name:?}");
    }
    assert_eq!(answer(&mut h, 12345, b"x"), rep::ERR_UNSUP);
    assert_eq!(answer(&mut h, opt::STARTTLS, &[]), rep::ERR_UNSUP);
    assert_eq!(answer(&mut h, opt::STARTTLS, b"x"), rep::ERR_INVALID);
    assert_eq!(answer(&mut h, opt::LIST, b"x"), rep::ERR_INVALID);
    assert_eq!(
        answer(&mut h, opt::STRUCTURED_REPLY, b"x"),
        rep::ERR_INVALID
    );
    let info = h.go("disk", &[]).unwrap();
    let mut c = h.into_client(info);
    assert!(c.read(0, 512).unwrap().unwrap() == pattern(0, 512));
    // EXPORT_NAME of an unknown export: closed (it cannot be answered).
    let mut h = handshake(sock);
    assert!(matches!(
        h.export_name("nope"),
        Err(ClientError::Refused { kind: 0, .. })
    ));
}

fn contexts_and_option_counts(sock: &Path, change_ids: &[String]) {
    // Meta contexts before structured replies.
    let mut h = handshake(sock);
    let meta = wire::meta_request("disk", &["base:allocation"]);
    assert_eq!(
        answer(&mut h, opt::SET_META_CONTEXT, &meta),
        rep::ERR_INVALID
    );
    assert_eq!(
        answer(&mut h, opt::LIST_META_CONTEXT, &meta),
        rep::ERR_INVALID
    );
    assert!(h.structured_replies().unwrap());
    // More contexts than allowed, then as many as allowed.
    let names: Vec<String> = change_ids
        .iter()
        .map(|id| format!("x-vdisk:changed:{id}"))
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    assert!(refs.len() > vdisk_nbd::limits::MAX_SELECTED_CONTEXTS);
    let too_many = wire::meta_request("disk", &refs[..=vdisk_nbd::limits::MAX_SELECTED_CONTEXTS]);
    assert_eq!(
        answer(&mut h, opt::SET_META_CONTEXT, &too_many),
        rep::ERR_TOO_BIG
    );
    let most = &refs[..vdisk_nbd::limits::MAX_SELECTED_CONTEXTS];
    assert_eq!(h.set_meta_context("disk", most).unwrap().len(), most.len());
    let info = h.go("disk", &[]).unwrap();
    let mut c = h.into_client(info);
    let r = c.call(cmd::BLOCK_STATUS, 0, 0, SIZE, &[]).unwrap();
    assert_eq!(r.error, 0, "{}", r.message);
    assert_eq!(r.status.len(), most.len());
    // More options than allowed: every one answered, then the connection closed.
    let mut h = handshake(sock);
    let many: Vec<u8> = (0..=MAX_OPTIONS)
        .flat_map(|_| option_bytes(opt::STRUCTURED_REPLY, &[]))
        .collect();
    h.stream.write_all(&many).unwrap();
    for _ in 0..MAX_OPTIONS {
        let r = h.read_replies(opt::STRUCTURED_REPLY, &[]).unwrap();
        assert_eq!(r.last().unwrap().kind, rep::ACK);
    }
    assert_closed(&mut h.stream, "more options than allowed");
}

// ---------------------------------------------------------------------------------
// Transmission.

fn payload_flags(c: &Client<UnixStream>) -> u16 {
    if c.extended() {
        cflag::PAYLOAD_LEN
    } else {
        0
    }
}

fn requests_past_the_end_and_absurd(sock: &Path) {
    for s in SESSIONS {
        let contexts: &[&str] = if s == Session::Simple {
            &[]
        } else {
            &["base:allocation"]
        };
        let mut c = session(sock, s, "disk", contexts);
        let w = |n: usize| vec![0x5au8; n];
        let pl = payload_flags(&c);
        let what = |x: &str| format!("{s:?}: {x}");
        for (offset, len) in [(SIZE, 512u64), (SIZE - 512, 1024), (u64::MAX - 511, 1024)] {
            let at = format!("{len} bytes at {offset}");
            expect_error(
                &mut c,
                &what(&format!("READ of {at}")),
                cmd::READ,
                0,
                offset,
                len,
                &[],
                errno::EINVAL,
            );
            expect_error(
                &mut c,
                &what(&format!("WRITE of {at}")),
                cmd::WRITE,
                pl,
                offset,
                len,
                &w(len as usize),
                errno::ENOSPC,
            );
            expect_error(
                &mut c,
                &what(&format!("TRIM of {at}")),
                cmd::TRIM,
                0,
                offset,
                len,
                &[],
                errno::EINVAL,
            );
            expect_error(
                &mut c,
                &what(&format!("WRITE_ZEROES of {at}")),
                cmd::WRITE_ZEROES,
                0,
                offset,
                len,
                &[],
                errno::ENOSPC,
            );
            expect_error(
                &mut c,
                &what(&format!("CACHE of {at}")),
                cmd::CACHE,
                0,
                offset,
                len,
                &[],
                errno::EINVAL,
            );
            if s != Session::Simple {
                expect_error(
                    &mut c,
                    &what(&format!("BLOCK_STATUS of {at}")),
                    cmd::BLOCK_STATUS,
                    0,
                    offset,
                    len,
                    &[],
                    errno::EINVAL,
                );
            }
        }
        // Absurd lengths.
        let huge: &[u64] = if s == Session::Extended {
            &[u64::from(u32::MAX), 4 << 30, u64::MAX, MAX_PAYLOAD + 1]
        } else {
            &[u64::from(u32::MAX), MAX_PAYLOAD + 1]
        };
        for &len in huge {
            expect_error(
                &mut c,
                &what(&format!("READ of {len}")),
                cmd::READ,
                0,
                0,
                len,
                &[],
                errno::EOVERFLOW,
            );
            if len <= SIZE {
                // An effect length over the maximum payload is fine within the disk.
                continue;
            }
            expect_error(
                &mut c,
                &what(&format!("TRIM of {len}")),
                cmd::TRIM,
                0,
                0,
                len,
                &[],
                errno::EINVAL,
            );
            expect_error(
                &mut c,
                &what(&format!("WRITE_ZEROES of {len}")),
                cmd::WRITE_ZEROES,
                0,
                0,
                len,
                &[],
                errno::ENOSPC,
            );
            if s != Session::Simple {
                expect_error(
                    &mut c,
                    &what(&format!("BLOCK_STATUS of {len}")),
                    cmd::BLOCK_STATUS,
                    0,
                    0,
                    len,
                    &[],
                    errno::EINVAL,
                );
            }
        }
        // A large effect length within the disk is fine (beyond the maximum payload).
        let whole = if s == Session::Simple {
            cmd::CACHE
        } else {
            cmd::BLOCK_STATUS
        };
        assert_eq!(
            error_of(c.call(whole, 0, 0, SIZE, &[]), &what("the whole disk")),
            0
        );
        c.disconnect().unwrap();
    }
}

fn unknown_commands_flags_and_zero_lengths(sock: &Path) {
    for s in SESSIONS {
        let mut c = session(sock, s, "disk", &[]);
        let what = |x: &str| format!("{s:?}: {x}");
        for command in [8u16, 9, 200, u16::MAX] {
            expect_error(
                &mut c,
                &what(&format!("command {command}")),
                command,
                0,
                0,
                512,
                &[],
                errno::EINVAL,
            );
        }
        for (command, flags) in [
            (cmd::READ, 0x8000u16),
            (cmd::READ, cflag::REQ_ONE),
            (cmd::READ, cflag::NO_HOLE),
            (cmd::FLUSH, cflag::NO_HOLE),
            (cmd::TRIM, cflag::FAST_ZERO),
            (cmd::CACHE, cflag::DF),
        ] {
            expect_error(
                &mut c,
                &what(&format!("command {command} flags {flags:#x}")),
                command,
                flags,
                0,
                512,
                &[],
                errno::EINVAL,
            );
        }
        if s == Session::Simple {
            expect_error(
                &mut c,
                &what("DF without structured replies"),
                cmd::READ,
                cflag::DF,
                0,
                512,
                &[],
                errno::EINVAL,
            );
            expect_error(
                &mut c,
                &what("BLOCK_STATUS without structured replies"),
                cmd::BLOCK_STATUS,
                0,
                0,
                512,
                &[],
                errno::EINVAL,
            );
            // PAYLOAD_LEN belongs to extended headers; the data is still taken in.
            expect_error(
                &mut c,
                &what("WRITE with PAYLOAD_LEN"),
                cmd::WRITE,
                cflag::PAYLOAD_LEN,
                8 * MIB,
                512,
                &[1; 512],
                errno::EINVAL,
            );
        } else {
            expect_error(
                &mut c,
                &what("BLOCK_STATUS without contexts"),
                cmd::BLOCK_STATUS,
                0,
                0,
                512,
                &[],
                errno::EINVAL,
            );
            let r = c.call(cmd::READ, cflag::DF, 0, 65536, &[]).unwrap();
            assert!(
                r.error == 0 && r.data == pattern(0, 65536),
                "{s:?}: DF read"
            );
        }
        expect_error(
            &mut c,
            &what("FAST_ZERO over data"),
            cmd::WRITE_ZEROES,
            cflag::FAST_ZERO,
            20 * MIB,
            MIB,
            &[],
            errno::ENOTSUP,
        );
        // Zero lengths: answered, never a disconnect.
        let pl = payload_flags(&c);
        for (command, flags, want) in [
            (cmd::READ, 0, 0),
            (cmd::WRITE, pl, 0),
            (cmd::TRIM, 0, 0),
            (cmd::WRITE_ZEROES, 0, 0),
            (cmd::CACHE, 0, 0),
            (cmd::FLUSH, 0, 0),
        ] {
            let r = c.call(command, flags, 4096, 0, &[]).unwrap();
            assert_eq!(
                (r.error, r.data.len()),
                (want, 0),
                "{s:?}: zero-length {command}"
            );
        }
        c.disconnect().unwrap();
    }
}

fn framing_violations(sock: &Path) {
    for s in SESSIONS {
        // A bad magic after a good request: its reply, then the close.
        let mut c = session(sock, s, "disk", &[]);
        let req = c.send(cmd::READ, 0, 0, 4096, &[]).unwrap();
        c.stream.write_all(&[0xee; 32]).unwrap();
        let r = c.reply().unwrap();
        assert!(r.request.cookie == req.cookie && r.data == pattern(0, 4096));
        assert_closed(&mut c.stream, &format!("{s:?}: bad request magic"));
        // A write announcing 2^32-1 bytes (compact) or more than the maximum,
        // then gone.
        for len in [u64::from(u32::MAX), MAX_PAYLOAD + 1] {
            let mut c = session(sock, s, "disk", &[]);
            let r = Request {
                flags: payload_flags(&c),
                command: cmd::WRITE,
                cookie: 7,
                offset: 0,
                len,
            };
            c.stream
                .write_all(&wire::request(&r, c.extended()))
                .unwrap();
            // Some of the payload, which the server may refuse to take: it can have
            // closed the connection on the header already (EPIPE/ECONNRESET here).
            if let Err(e) = c.stream.write_all(&[1u8; 4096]) {
                assert!(
                    matches!(
                        e.kind(),
                        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                    ),
                    "{s:?}: a WRITE of {len} bytes: {e}"
                );
            }
            assert_closed(&mut c.stream, &format!("{s:?}: a WRITE of {len} bytes"));
        }
        // Extended: PAYLOAD_LEN on a command without data.
        if s == Session::Extended {
            let mut c = session(sock, s, "disk", &[]);
            let r = Request {
                flags: cflag::PAYLOAD_LEN,
                command: cmd::READ,
                cookie: 9,
                offset: 0,
                len: 512,
            };
            c.stream.write_all(&wire::request(&r, true)).unwrap();
            assert_closed(&mut c.stream, "READ with PAYLOAD_LEN");
        }
    }
}

/// A client that sends many large reads and never reads a reply: the server
/// stops reading it (bounded memory), then cuts it off at the reply timeout.
fn client_that_stops_reading(sock: &Path, pid: u32) -> u64 {
    let mut c = session(sock, Session::Simple, "disk", &[]);
    let start = Instant::now();
    let mut stream = c.stream.try_clone().unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let writer = std::thread::spawn(move || {
        let mut sent = 0u64;
        for i in 0..4096u64 {
            let r = Request {
                flags: 0,
                command: cmd::READ,
                cookie: i,
                offset: (i % 2) * MAX_PAYLOAD,
                len: MAX_PAYLOAD,
            };
            if stream.write_all(&wire::request(&r, false)).is_err() {
                break;
            }
            sent += 1;
        }
        sent
    });
    let sent = writer.join().unwrap();
    let peak = peak_rss_bytes(pid);
    // The server closed the connection: what it sent is read, then the end.
    let mut sink = vec![0u8; 1 << 20];
    loop {
        match c.stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    assert!(
        sent < 4096,
        "the server took all {sent} reads of 32 MiB from a client that reads nothing"
    );
    assert!(start.elapsed() < Duration::from_secs(25));
    peak
}

/// Seeded random request streams after the handshake, each on its own
/// connection: every request the server takes (its own framing rules) must be
/// answered by the rules.
fn random_streams(sock: &Path, count: u64, seed: u64) {
    let threads = 4u64;
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let sock = sock.to_path_buf();
            std::thread::spawn(move || {
                let mut rng = SplitMix(seed ^ t.wrapping_mul(0x1234_5678_9abc));
                for i in (t..count).step_by(threads as usize) {
                    one_random_stream(&sock, &mut rng, i, seed);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
}

fn random_request(rng: &mut SplitMix, ext: bool) -> Vec<u8> {
    let command = match rng.below(10) {
        0..=2 => cmd::READ,
        3 | 4 => cmd::WRITE,
        5 => cmd::TRIM,
        6 => cmd::WRITE_ZEROES,
        7 => cmd::BLOCK_STATUS,
        8 => [cmd::FLUSH, cmd::CACHE, cmd::DISC][rng.below(3) as usize],
        _ => rng.below(16) as u16,
    };
    let flags = if rng.below(3) == 0 {
        rng.next() as u16 & 0x3f
    } else {
        0
    };
    let offset = match rng.below(4) {
        0 => rng.below(SIZE / 512) * 512,
        1 => rng.below(SIZE),
        2 => SIZE - rng.below(8192),
        _ => rng.next(),
    };
    // Mostly small; now and then one of any size in the disk (slow to serve);
    // often absurd (beyond the disk or the maximum payload).
    let len = match rng.below(20) {
        0..=6 => rng.below(65536),
        7..=10 => rng.below(8) * 4096,
        11 => rng.below(SIZE),
        12..=15 => u64::from(rng.next() as u32),
        _ => 0,
    };
    let len = if ext { len } else { len & 0xffff_ffff };
    let mut b = wire::request(
        &Request {
            flags,
            command,
            cookie: 0,
            offset,
            len,
        },
        ext,
    );
    if command == cmd::WRITE && len <= 65536 {
        b.extend((0..len).map(|_| rng.next() as u8));
    }
    b
}

fn one_random_stream(sock: &Path, rng: &mut SplitMix, i: u64, seed: u64) {
    let s = SESSIONS[(i % 3) as usize];
    let contexts: &[&str] = if s == Session::Simple || rng.below(4) == 0 {
        &[]
    } else {
        &["base:allocation", "x-vdisk:allocation-depth"]
    };
    let mut c = session(sock, s, "disk", contexts);
    let ext = c.extended();
    let mut bytes = Vec::new();
    for _ in 0..1 + rng.below(6) {
        if rng.below(8) == 0 {
            let n = rng.below(64) as usize;
            bytes.extend((0..n).map(|_| rng.next() as u8));
        } else {
            bytes.extend(random_request(rng, ext));
        }
    }
    let taken = frame_requests(&mut bytes, ext);
    let mut replies = std::mem::take(&mut c.replies);
    for r in &taken {
        replies.expect(*r).unwrap();
    }
    c.stream.write_all(&bytes).unwrap_or(());
    let _ = c.stream.shutdown(std::net::Shutdown::Write);
    let ctx = format!("random stream {i} ({s:?}, VDISK_NBD_HOSTILE_SEED={seed:#x}): {bytes:02x?}");
    check_replies(&mut replies, &mut c.stream, &taken, &ctx);
}

fn check_replies(replies: &mut ReplyReader, stream: &mut UnixStream, taken: &[Request], ctx: &str) {
    let mut n = 0;
    loop {
        match replies.next(stream) {
            Ok(Some(r)) => {
                n += 1;
                check_semantics(&r, ctx);
            }
            Ok(None) => break,
            Err(e) => panic!("{ctx}: {e}"),
        }
    }
    assert_eq!(
        n,
        taken.len(),
        "{ctx}: {} requests unanswered",
        replies.in_flight()
    );
}

/// The error a request must get, where the rules leave no choice.
fn check_semantics(r: &Reply, ctx: &str) {
    let q = r.request;
    let past = q.offset.checked_add(q.len).is_none_or(|e| e > SIZE);
    match q.command {
        cmd::READ if q.len > MAX_PAYLOAD && q.flags & !cflag::FUA == 0 => {
            assert_eq!(r.error, errno::EOVERFLOW, "{ctx}: {q:?}")
        }
        cmd::WRITE | cmd::WRITE_ZEROES if past && q.flags == 0 => {
            assert_eq!(r.error, errno::ENOSPC, "{ctx}: {q:?}")
        }
        cmd::READ | cmd::TRIM if past && q.flags == 0 => {
            assert_eq!(r.error, errno::EINVAL, "{ctx}: {q:?}")
        }
        c if c > cmd::BLOCK_STATUS => assert_eq!(r.error, errno::EINVAL, "{ctx}: {q:?}"),
        _ => {}
    }
}

#[test]
fn hostile_clients_get_what_the_rules_say_and_the_server_stays_well() {
    require_tool_from("nbdinfo", "libnbd-bin");
    let dir = tempdir();
    let disk = dir.path().join("disk.vmdk");
    let good = dir.path().join("good.vmdk");
    make_disk(&disk);
    make_disk(&good);
    // Change tracking with more sessions than contexts may be selected.
    vdisk::cbt::enable(&disk).unwrap();
    let d = OpenOptions::new().write(true).open(&disk).unwrap();
    let change_ids: Vec<String> = (0..20).map(|_| d.change_id().unwrap()).collect();
    d.close().unwrap();
    let export = |name: &str, p: &Path| format!("{name}={}", p.display());
    let server = NbdServer::start(&[
        "-v".to_string(),
        "--reply-timeout".into(),
        "2".into(),
        "--export".into(),
        export("disk", &disk),
        "--export".into(),
        export("good", &good),
    ]);
    let sock = server.socket.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let good_client = {
        let (sock, stop, rounds) = (sock.clone(), Arc::clone(&stop), Arc::clone(&rounds));
        std::thread::spawn(move || well_behaved(sock, stop, rounds))
    };
    let t = Instant::now();
    let mut timings = Vec::new();
    let mut step = |what: &str, f: &dyn Fn()| {
        let s = Instant::now();
        f();
        timings.push(format!("{what} {:.1?}", s.elapsed()));
    };
    step("cut handshakes", &|| handshake_cut_at_every_byte(&sock));
    step("flags/magic/lengths", &|| {
        bad_flags_magic_and_lengths(&sock)
    });
    step("malformed options", &|| malformed_options(&sock));
    step("contexts and options", &|| {
        contexts_and_option_counts(&sock, &change_ids)
    });
    step("past the end", &|| requests_past_the_end_and_absurd(&sock));
    step("unknown and zero", &|| {
        unknown_commands_flags_and_zero_lengths(&sock)
    });
    step("framing", &|| framing_violations(&sock));
    let stuck_peak = client_that_stops_reading(&sock, server.pid());
    let count = env_u64("VDISK_NBD_HOSTILE_STRINGS").unwrap_or(10_000);
    let seed = env_u64("VDISK_NBD_HOSTILE_SEED").unwrap_or(0x0bad_c0de);
    step("random streams", &|| random_streams(&sock, count, seed));
    stop.store(true, Ordering::SeqCst);
    good_client.join().expect("the well-behaved client failed");
    let good_rounds = rounds.load(Ordering::SeqCst);
    // nbdinfo agrees with the disk.
    let map = stdout_text(&run("nbdinfo", &["--map", &server.uri("good")]));
    let data: Vec<(u64, u64)> = map
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && f[2] == "0").then(|| (f[0].parse().unwrap(), f[1].parse().unwrap()))
        })
        .collect();
    let d = OpenOptions::new().open(&good).unwrap();
    let want: Vec<(u64, u64)> = d
        .allocation_map(0, SIZE)
        .unwrap()
        .into_iter()
        .filter(|r| r.kind == RangeKind::Data)
        .map(|r| (r.offset, r.length))
        .collect();
    drop(d);
    assert_eq!(data, want, "nbdinfo --map of the good export");
    let peak = server.peak_rss_bytes();
    let log = server.log();
    assert!(!log.contains("panicked"), "the server panicked:\n{log}");
    eprintln!(
        "hostile clients: {:.1?} in all ({}); {good_rounds} rounds of the good client; \
         peak RSS {} MiB ({} MiB after the client that stops reading); {count} random streams",
        t.elapsed(),
        timings.join(", "),
        peak >> 20,
        stuck_peak >> 20
    );
    assert!(
        peak < MAX_RSS,
        "the server's peak RSS was {} MiB",
        peak >> 20
    );
    assert!(good_rounds > 0, "the well-behaved client made no round");
    let status = server.stop();
    assert!(status.success(), "vdisk-nbd exited with {status}");
}

#[test]
fn a_read_only_export_refuses_writes_with_eperm() {
    let dir = tempdir();
    let disk = dir.path().join("disk.vmdk");
    make_disk(&disk);
    let server = NbdServer::start(&[
        "-r".to_string(),
        format!("--export=disk={}", disk.display()),
    ]);
    for s in SESSIONS {
        let mut c = session(&server.socket, s, "disk", &[]);
        let pl = payload_flags(&c);
        assert_ne!(c.info.flags & wire::tflag::READ_ONLY, 0);
        for (command, flags, payload) in [
            (cmd::WRITE, pl, vec![1u8; 4096]),
            (cmd::TRIM, 0, vec![]),
            (cmd::WRITE_ZEROES, 0, vec![]),
        ] {
            let what = format!("{s:?}: command {command} on a read-only export");
            expect_error(
                &mut c,
                &what,
                command,
                flags,
                0,
                4096,
                &payload,
                errno::EPERM,
            );
        }
        assert_eq!(c.flush().unwrap(), 0);
        c.disconnect().unwrap();
    }
    assert!(!server.log().contains("panicked"));
}
