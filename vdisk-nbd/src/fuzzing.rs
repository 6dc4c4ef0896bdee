//! The bodies of the NBD fuzz targets (`fuzz/fuzz_targets/nbd_*.rs`), here so that
//! `tests/fuzz_replay.rs` replays the corpus and the regression inputs through
//! exactly the code the fuzzer ran.
//!
//! Each input is one whole connection to a real [`Server`]: negotiation, the
//! transmission reader, its workers and the disk, over a Unix socket pair (kernel
//! memory; the server's side is an ordinary [`Transport`]). The disks are a
//! fixture made once per process in the temporary folder: `disk`, a two-link chain
//! of 64 MiB + 64 KiB (data in both links, change tracking on the top), `big`, one
//! sparse link of 5 GiB (past the 4 GiB of a compact extent; no tracking, whose map
//! is costly to load at that size), and their folder as the datastore `ds`. The
//! first byte of an input is the setup: bit 0 read-only (else non-persistent:
//! writes go to a redo log that the end of the input throws away, so inputs do not
//! influence each other).
//!
//! * [`handshake`]: the rest is sent as it is, from the client flags on.
//! * [`requests`]: the harness negotiates as bits 1-2 of the setup byte say -
//!   `EXPORT_NAME`; `GO` with simple replies; structured replies; extended headers
//!   (the last two with every context the export has selected) - for `disk`, or
//!   `big` with bit 3, and the rest is the request stream, with the cookies
//!   renumbered so that replies can be told apart.
//!
//! The oracle is [`crate::testing`]'s client: every byte the server sends is read
//! and checked against the protocol's rules and against the client stream (each
//! option's replies; in [`requests`] every request the server took must get
//! exactly one complete, well-formed reply with a defined error value). The server
//! must close the connection only where the client stream gives it the right to.
//! A rule broken, a server thread that panicked or a worker panic caught by the
//! server ([`ConnError::Panicked`]) panics here - a finding like a crash. The
//! server's output is read up to [`MAX_OUTPUT`] bytes per input; beyond, the
//! harness hangs up (large reads of a 4 GiB disk must not make an input slow).

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::export::{Datastore, DiskExport, Exports, Mode};
use crate::limits::{MAX_OPTIONS, MAX_OPTION_BYTES, MAX_PAYLOAD, MAX_SKIPPED_OPTION_BYTES};
use crate::server::{ConnError, Server};
use crate::testing::{ClientError, Handshake};
use crate::transport::Transport;
use crate::wire::{self, cflag, cmd, info, opt, Request};

/// Bytes of server output read per input.
pub const MAX_OUTPUT: u64 = 16 << 20;
/// The size of the export `disk`.
pub const DISK_BYTES: u64 = (64 << 20) + (64 << 10);
/// The size of the export `big`.
pub const BIG_BYTES: u64 = 5 << 30;
/// The contexts the harness selects in [`requests`] (`big` has no changed blocks).
pub const CONTEXTS: [&str; 3] = [
    "base:allocation",
    "x-vdisk:allocation-depth",
    "x-vdisk:changed:*",
];

/// What an input did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Options answered.
    pub options: usize,
    /// Whether transmission started.
    pub transmission: bool,
    /// Requests answered.
    pub replies: usize,
    /// How the server ended the connection: `ok`, or its [`ConnError`].
    pub end: String,
}

/// The fixture: the folder, the chain's top, the big disk.
struct Fixture {
    dir: PathBuf,
    top: PathBuf,
    big: PathBuf,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        make_fixture().unwrap_or_else(|e| panic!("the fuzzing fixture cannot be made: {e}"))
    })
}

/// Makes the fixture in `TMPDIR/vdisk-nbd-fuzz-PID`, removing those of processes
/// that are gone.
fn make_fixture() -> vdisk::Result<Fixture> {
    let tmp = std::env::temp_dir();
    if let Ok(entries) = std::fs::read_dir(&tmp) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("vdisk-nbd-fuzz-") {
                if !Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
    let dir = tmp.join(format!("vdisk-nbd-fuzz-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| vdisk::Error::io(dir.display().to_string(), e))?;
    let base = dir.join("base.vmdk");
    let top = dir.join("top.vmdk");
    let big = dir.join("big.vmdk");
    let sparse = |p: &Path, size: u64| {
        vdisk::create(
            p,
            &vdisk::CreateOptions::new(vdisk::DiskType::MonolithicSparse, size),
        )
    };
    let fill = |seed: u8, n: usize| -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) | 1)
            .collect()
    };
    sparse(&base, DISK_BYTES)?;
    let d = vdisk::OpenOptions::new().write(true).open(&base)?;
    d.write_at(&fill(1, 128 << 10), 0)?;
    d.write_at(&fill(2, 5000), (1 << 20) + 512)?;
    d.write_at(&fill(3, 64 << 10), DISK_BYTES - (64 << 10))?;
    d.close()?;
    vdisk::ops::child::create_child(&base, &top, vdisk::DiskType::MonolithicSparse)?;
    vdisk::cbt::enable(&top)?;
    let d = vdisk::OpenOptions::new().write(true).open(&top)?;
    d.write_at(&fill(4, 70_000), 64 << 10)?;
    d.write_zeroes(1 << 20, 64 << 10, false)?;
    d.close()?;
    sparse(&big, BIG_BYTES)?;
    let d = vdisk::OpenOptions::new().write(true).open(&big)?;
    d.write_at(&fill(5, 4096), 0)?;
    d.write_at(&fill(6, 70_000), (4 << 30) + 512)?;
    d.close()?;
    Ok(Fixture { dir, top, big })
}

/// A server over the fixture, as `setup` says.
fn server(setup: u8) -> Server {
    let f = fixture();
    let mode = if setup & 1 != 0 {
        Mode::ReadOnly
    } else {
        Mode::NonPersistent
    };
    let datastores = Datastore::new("ds", &f.dir).into_iter().collect();
    let disks = vec![
        DiskExport {
            name: "disk".into(),
            path: f.top.clone(),
        },
        DiskExport {
            name: "big".into(),
            path: f.big.clone(),
        },
    ];
    Server::new(Exports::new(disks, datastores, mode))
}

/// The server's connection on a thread of its own, over `sock`.
struct Serving {
    server: Server,
    thread: std::thread::JoinHandle<Result<(), ConnError>>,
}

impl Serving {
    fn start(server: Server, sock: UnixStream) -> Serving {
        let s = server.clone();
        let thread = std::thread::Builder::new()
            .name("nbd-fuzz-conn".into())
            .spawn(move || s.serve_connection(Transport::from(sock)))
            .unwrap_or_else(|e| panic!("no thread for the connection: {e}"));
        Serving { server, thread }
    }

    /// Waits for the connection to end, stops the server; panics on a server panic.
    fn finish(self) -> String {
        let r = match self.thread.join() {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        };
        self.server.stop();
        match r {
            Ok(()) => "ok".into(),
            Err(ConnError::Panicked(m)) => panic!("a request's worker panicked: {m}"),
            Err(e) => e.to_string(),
        }
    }
}

/// Writes `bytes` to `sock` on a thread, then ends the sending side.
fn send_all(sock: &UnixStream, bytes: Vec<u8>) -> std::thread::JoinHandle<()> {
    let mut w = sock
        .try_clone()
        .unwrap_or_else(|e| panic!("socket clone: {e}"));
    std::thread::spawn(move || {
        // The server may stop reading (a protocol violation): the rest is dropped.
        let _ = w.write_all(&bytes);
        let _ = w.shutdown(Shutdown::Write);
    })
}

/// A reader that counts what it read.
struct Counted<R> {
    inner: R,
    bytes: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
}

impl<R: Write> Write for Counted<R> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Reads the rest of the server's output (up to [`MAX_OUTPUT`] in all, then hangs
/// up).
fn drain(r: &mut Counted<UnixStream>) {
    let mut buf = vec![0u8; 64 << 10];
    while r.bytes < MAX_OUTPUT {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
    let _ = r.inner.shutdown(Shutdown::Both);
}

/// A client option as the raw stream holds it.
struct ClientOption {
    option: u32,
    len: u32,
    /// The data, if the stream holds all of it.
    data: Option<Vec<u8>>,
}

/// The options of a raw client stream (after the client flags); the second value
/// is true when the stream ends inside an option header or breaks its magic.
fn client_options(mut rest: &[u8]) -> (Vec<ClientOption>, bool) {
    let mut out = Vec::new();
    while !rest.is_empty() {
        let Some(h) = rest.get(..16).and_then(|h| <&[u8; 16]>::try_from(h).ok()) else {
            return (out, true);
        };
        let Ok(h) = wire::parse_option_header(h) else {
            return (out, true);
        };
        rest = &rest[16..];
        let data = rest.get(..h.len as usize).map(<[u8]>::to_vec);
        rest = rest.get(h.len as usize..).unwrap_or(&[]);
        out.push(ClientOption {
            option: h.option,
            len: h.len,
            data,
        });
    }
    (out, false)
}

/// Asserts the server sends nothing more and closes.
fn expect_close(r: &mut Counted<UnixStream>, why: &str) {
    let mut b = [0u8; 1];
    match r.read(&mut b) {
        Ok(0) | Err(_) => {}
        Ok(_) => panic!("the server sent more after {why}"),
    }
}

/// Raw client bytes from the client flags on (the first byte: the setup), sent
/// option by option as a client does (each after the final reply to the one
/// before); once transmission starts, the rest is the request stream.
pub fn handshake(data: &[u8]) -> Summary {
    let Some((&setup, stream)) = data.split_first() else {
        return Summary::default();
    };
    let (client, server_side) = UnixStream::pair().unwrap_or_else(|e| panic!("socketpair: {e}"));
    let serving = Serving::start(server(setup), server_side);
    let mut summary = Summary::default();
    let reader = Counted {
        inner: client
            .try_clone()
            .unwrap_or_else(|e| panic!("socket clone: {e}")),
        bytes: 0,
    };
    let client_flags = stream
        .get(..4)
        .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    let mut hs = match Handshake::observe(reader, client_flags) {
        Ok(h) => h,
        Err(e) => panic!("no greeting: {e}"),
    };
    let mut w = client
        .try_clone()
        .unwrap_or_else(|e| panic!("socket clone: {e}"));
    match negotiate(&mut hs, &mut w, stream, &mut summary) {
        Some(rest) => transmission(hs, &client, rest, &mut summary),
        None => {
            let _ = w.shutdown(Shutdown::Write);
            drain(&mut hs.stream);
        }
    }
    drop(client);
    summary.end = serving.finish();
    summary
}

/// Sends the raw negotiation `stream` option by option and checks the replies;
/// the rest of the stream when transmission starts, None when the server (rightly)
/// closed the connection or the stream ended.
fn negotiate<'a>(
    hs: &mut Handshake<Counted<UnixStream>>,
    w: &mut UnixStream,
    stream: &'a [u8],
    summary: &mut Summary,
) -> Option<Transmission<'a>> {
    let mut send = |bytes: &[u8]| {
        // The server may close first (then the rest is not needed).
        let _ = w.write_all(bytes);
    };
    let known = wire::CLIENT_FIXED_NEWSTYLE | wire::CLIENT_NO_ZEROES;
    send(&stream[..stream.len().min(4)]);
    if stream.len() < 4 || hs.client_flags & !known != 0 {
        let _ = w.shutdown(Shutdown::Write);
        expect_close(&mut hs.stream, "bad or missing client flags");
        return None;
    }
    let (options, broken) = client_options(&stream[4..]);
    let mut at = 4usize;
    for (k, o) in options.iter().enumerate() {
        let what = format!("option {k} ({} with {} bytes)", o.option, o.len);
        let end = (at + 16 + o.len as usize).min(stream.len());
        send(&stream[at..end]);
        at = end;
        let too_big = u64::from(o.len) > MAX_SKIPPED_OPTION_BYTES
            || (o.option == opt::EXPORT_NAME && u64::from(o.len) > MAX_OPTION_BYTES);
        if k as u64 >= u64::from(MAX_OPTIONS) || too_big || o.data.is_none() {
            let _ = w.shutdown(Shutdown::Write);
            expect_close(&mut hs.stream, &what);
            return None;
        }
        let data = o.data.as_deref().unwrap_or_default();
        let skipped = !wire::option_data_acceptable(o.len);
        if o.option == opt::EXPORT_NAME {
            let refused_anyway = hs.extended || std::str::from_utf8(data).is_err();
            return match hs.read_export_name_reply() {
                Ok(_) if refused_anyway => {
                    panic!("{what}: accepted after extended headers or not UTF-8")
                }
                Ok(_) => Some(Transmission {
                    rest: &stream[at..],
                    structured: hs.structured,
                    extended: false,
                    contexts: Vec::new(),
                }),
                Err(ClientError::Refused { .. }) => None,
                Err(e) => panic!("{what}: {e}"),
            };
        }
        match hs.read_replies(o.option, if skipped { &[] } else { data }) {
            Ok(r) => {
                summary.options += 1;
                let last = r.last().map_or(0, |r| r.kind);
                if skipped && last != wire::rep::ERR_TOO_BIG {
                    panic!("{what}: data over the limit not refused with ERR_TOO_BIG");
                }
                if o.option == opt::ABORT {
                    expect_close(&mut hs.stream, "ABORT");
                    return None;
                }
                if o.option == opt::GO && last == wire::rep::ACK {
                    // The contexts of the last selection, if it named this export.
                    let go = wire::parse_info_request(data).ok();
                    let selected_for = hs.selected_for.clone();
                    let contexts = match (go, selected_for) {
                        (Some(g), Some(e)) if g.name == e => {
                            hs.contexts.iter().map(|c| c.0).collect()
                        }
                        _ => Vec::new(),
                    };
                    return Some(Transmission {
                        rest: &stream[at..],
                        structured: hs.structured,
                        extended: hs.extended,
                        contexts,
                    });
                }
            }
            Err(e) if o.option == opt::ABORT && e.is_closed() => return None,
            Err(e) => panic!("{what}: {e}"),
        }
    }
    send(&stream[at..]);
    let _ = w.shutdown(Shutdown::Write);
    if broken {
        expect_close(&mut hs.stream, "a broken or cut option header");
    } else {
        expect_close(&mut hs.stream, "the end of the client's stream");
    }
    None
}

/// What transmission starts with.
struct Transmission<'a> {
    rest: &'a [u8],
    structured: bool,
    extended: bool,
    contexts: Vec<u32>,
}

/// Sends the request stream (cookies renumbered) and checks that every request
/// the server takes gets exactly one well-formed reply.
fn transmission(
    hs: Handshake<Counted<UnixStream>>,
    client: &UnixStream,
    t: Transmission<'_>,
    summary: &mut Summary,
) {
    summary.transmission = true;
    let mut replies = crate::testing::ReplyReader::new(t.structured, t.extended, t.contexts);
    let mut bytes = t.rest.to_vec();
    let taken = frame_requests(&mut bytes, t.extended);
    for r in &taken {
        replies
            .expect(*r)
            .unwrap_or_else(|e| panic!("the harness: {e}"));
    }
    let writer = send_all(client, bytes);
    let mut r = hs.stream;
    let mut cut = false;
    loop {
        if r.bytes >= MAX_OUTPUT {
            cut = true;
            let _ = r.inner.shutdown(Shutdown::Both);
            break;
        }
        match replies.next(&mut r) {
            Ok(Some(_)) => summary.replies += 1,
            Ok(None) => break,
            Err(e) if e.is_closed() && r.bytes >= MAX_OUTPUT => {
                cut = true;
                break;
            }
            Err(e) => {
                let _ = r.inner.shutdown(Shutdown::Both);
                let _ = writer.join();
                panic!(
                    "{e} (after {} replies; {} requests were taken)",
                    summary.replies,
                    taken.len()
                );
            }
        }
    }
    let _ = writer.join();
    if !cut && replies.in_flight() > 0 {
        panic!(
            "{} requests taken were not answered (cookies {:?})",
            replies.in_flight(),
            replies.pending_cookies(),
        );
    }
}

/// The request stream `bytes` as the server will frame it: the cookies renumbered
/// 1, 2, ... (in place) and the requests it will take (up to a framing error, a
/// `DISC` or the end of the stream). Each of them must be answered.
pub fn frame_requests(bytes: &mut [u8], extended: bool) -> Vec<Request> {
    let hl = if extended {
        wire::EXT_REQUEST_BYTES
    } else {
        wire::REQUEST_BYTES
    };
    let mut taken = Vec::new();
    let mut at = 0usize;
    let mut cookie = 1u64;
    while let Some(h) = bytes.get_mut(at..at + hl) {
        h[8..16].copy_from_slice(&cookie.to_be_bytes());
        cookie += 1;
        let Ok(req) = wire::parse_request(h, extended) else {
            break;
        };
        at += hl;
        if req.command == cmd::DISC {
            break;
        }
        if req.command == cmd::WRITE {
            if req.len > MAX_PAYLOAD || bytes.len() - at < req.len as usize {
                break;
            }
            at += req.len as usize;
        } else if extended && req.flags & cflag::PAYLOAD_LEN != 0 {
            break;
        }
        taken.push(req);
    }
    taken
}

/// A negotiation made by the harness (bits 1-2 of the first byte), then the rest as
/// the request stream.
pub fn requests(data: &[u8]) -> Summary {
    let Some((&setup, stream)) = data.split_first() else {
        return Summary::default();
    };
    let (client, server_side) = UnixStream::pair().unwrap_or_else(|e| panic!("socketpair: {e}"));
    let serving = Serving::start(server(setup), server_side);
    let flags = wire::CLIENT_FIXED_NEWSTYLE | wire::CLIENT_NO_ZEROES;
    let mut hs = Handshake::start(
        Counted {
            inner: client
                .try_clone()
                .unwrap_or_else(|e| panic!("socket clone: {e}")),
            bytes: 0,
        },
        flags,
    )
    .unwrap_or_else(|e| panic!("greeting: {e}"));
    let (name, contexts) = if setup & 8 != 0 {
        ("big", &CONTEXTS[..2])
    } else {
        ("disk", &CONTEXTS[..])
    };
    let negotiated = (|| -> Result<_, ClientError> {
        let items = [info::NAME, info::DESCRIPTION, info::BLOCK_SIZE];
        match (setup >> 1) & 3 {
            0 => return hs.export_name(name),
            1 => {}
            2 => {
                hs.structured_replies()?;
                hs.set_meta_context(name, contexts)?;
            }
            _ => {
                hs.extended_headers()?;
                hs.set_meta_context(name, contexts)?;
            }
        }
        hs.go(name, &items)
    })();
    negotiated.unwrap_or_else(|e| panic!("the harness's negotiation failed: {e}"));
    let mut summary = Summary::default();
    let t = Transmission {
        rest: stream,
        structured: hs.structured,
        extended: hs.extended,
        contexts: hs.contexts.iter().map(|c| c.0).collect(),
    };
    transmission(hs, &client, t, &mut summary);
    drop(client);
    summary.end = serving.finish();
    summary
}
