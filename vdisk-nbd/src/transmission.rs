//! The transmission phase of one connection: a reader thread takes requests off the
//! socket (the data of writes included) and hands them to a few workers, which run
//! them against the export's disk and send the replies - in whatever order they
//! finish, matched by cookie. The bytes of requests in flight are bounded
//! ([`Limits::max_inflight_bytes`]: write data taken in, read data and block status
//! replies being made or sent): beyond it the reader stops reading, which is the
//! backpressure a client sees. A request the server cannot accept gets its error
//! reply; only a broken framing (bad magic, a payload beyond what can be held)
//! ends the connection, and never the server. So do a client silent for
//! [`Limits::idle_timeout`] with nothing in flight, one that takes no reply bytes
//! for [`Limits::reply_timeout`], and a request whose worker panicked (a bug: it is
//! answered `EIO` and reported as [`ConnError::Panicked`]).

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};

use vdisk::{ErrorKind, RangeKind};

use crate::context::{self, Context};
use crate::limits::{
    Limits, MAX_COMPACT_EXTENT, MAX_PAYLOAD, MAX_STATUS_EXTENTS, QUEUED_REQUESTS,
    WORKERS_PER_CONNECTION,
};
use crate::negotiate::Session;
use crate::server::ConnError;
use crate::wire::{self, cflag, chunk, cmd, errno, Request};

/// A request with its data, as the reader hands it on.
struct Job {
    req: Request,
    data: Vec<u8>,
    /// Bytes of the in-flight budget it holds.
    cost: u64,
}

/// The in-flight budget: bytes of requests not yet replied to.
struct Budget {
    used: Mutex<u64>,
    freed: Condvar,
    max: u64,
    /// The server's count of bytes in flight, all connections together.
    total: Arc<AtomicU64>,
}

impl Budget {
    /// Takes `n` bytes, waiting while others hold too much (one request alone
    /// always gets through).
    fn take(&self, n: u64) {
        let Ok(mut used) = self.used.lock() else {
            return;
        };
        while *used > 0 && used.saturating_add(n) > self.max {
            used = match self.freed.wait(used) {
                Ok(g) => g,
                Err(_) => return,
            };
        }
        *used = used.saturating_add(n);
        self.total.fetch_add(n, Ordering::SeqCst);
    }

    fn give(&self, n: u64) {
        if let Ok(mut used) = self.used.lock() {
            *used = used.saturating_sub(n);
        }
        self.total.fetch_sub(n, Ordering::SeqCst);
        self.freed.notify_all();
    }
}

/// What the workers share.
struct Conn {
    session: Session,
    out: Mutex<Box<dyn Write + Send>>,
    budget: Budget,
    /// Requests taken and not yet answered.
    in_flight: AtomicUsize,
    /// A reply could not be sent: the connection is finished.
    broken: AtomicBool,
    /// The message of the first worker panic.
    panicked: Mutex<Option<String>>,
}

impl Conn {
    fn send(&self, bytes: &[u8]) {
        let ok = match self.out.lock() {
            Ok(mut w) => w.write_all(bytes).and_then(|()| w.flush()).is_ok(),
            Err(_) => false,
        };
        if !ok {
            self.broken.store(true, Ordering::SeqCst);
        }
    }

    fn broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }

    fn structured(&self) -> bool {
        self.session.structured
    }

    /// An error reply to `req`.
    fn fail(&self, req: &Request, error: u32, message: &str) {
        tracing::info!(
            "request {} ({} bytes at {}) failed with error {error}: {message}",
            req.command,
            req.len,
            req.offset
        );
        if self.structured() {
            let payload = wire::error_payload(error, message);
            let mut b = self.header(req, chunk::FLAG_DONE, chunk::ERROR, payload.len() as u64);
            b.extend_from_slice(&payload);
            self.send(&b);
        } else {
            self.send(&wire::simple_reply(error, req.cookie));
        }
    }

    /// Success without data.
    fn done(&self, req: &Request) {
        if self.structured() {
            self.send(&self.header(req, chunk::FLAG_DONE, chunk::NONE, 0));
        } else {
            self.send(&wire::simple_reply(0, req.cookie));
        }
    }

    fn header(&self, req: &Request, flags: u16, kind: u16, len: u64) -> Vec<u8> {
        wire::chunk_header(
            self.session.extended,
            flags,
            kind,
            req.cookie,
            req.offset,
            len,
        )
    }

    /// Runs a job; a panic (a bug) answers the request `EIO` and ends the
    /// connection.
    fn work(&self, job: Job) {
        let req = job.req;
        if !self.broken() {
            let ran =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(self, req, job.data)));
            if let Err(p) = ran {
                let msg = panic_message(p.as_ref());
                tracing::error!("request {req:?} panicked: {msg}");
                self.fail(&req, errno::EIO, &format!("internal error: {msg}"));
                if let Ok(mut first) = self.panicked.lock() {
                    first.get_or_insert(msg);
                }
                self.broken.store(true, Ordering::SeqCst);
            }
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.budget.give(job.cost);
    }
}

/// Capacity given to large buffers (request and reply data): above the C
/// allocator's largest mmap threshold (glibc: 32 MiB), so each is mapped on its own
/// and unmapped when freed, its untouched capacity never resident. Smaller, they
/// come from per-thread arenas that keep freed memory: a few connections' worth of
/// 16 MiB reads raised the server's resident memory to twice its bytes in flight.
const LARGE_BUFFER_CAPACITY: usize = (MAX_PAYLOAD as usize) + (64 << 10);
/// Buffers from this size on are given [`LARGE_BUFFER_CAPACITY`].
const LARGE_BUFFER: usize = 1 << 20;

/// An empty buffer for `len` bytes (see [`LARGE_BUFFER_CAPACITY`]).
fn buffer(len: usize) -> Vec<u8> {
    if (LARGE_BUFFER..=LARGE_BUFFER_CAPACITY).contains(&len) {
        Vec::with_capacity(LARGE_BUFFER_CAPACITY)
    } else {
        Vec::with_capacity(len)
    }
}

/// A zeroed buffer of `len` bytes (see [`LARGE_BUFFER_CAPACITY`]).
fn zeroed(len: usize) -> Vec<u8> {
    let mut b = buffer(len);
    b.resize(len, 0);
    b
}

/// The text of a panic's payload.
pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic".to_string())
}

/// The NBD error for a library error of a request that reads (`write` false) or
/// writes.
fn errno_of(e: &vdisk::Error, write: bool) -> u32 {
    match e.kind() {
        ErrorKind::ReadOnly | ErrorKind::AccessDenied => errno::EPERM,
        ErrorKind::OutOfRange if write => errno::ENOSPC,
        ErrorKind::DiskFull | ErrorKind::FileTooBig => errno::ENOSPC,
        ErrorKind::OutOfRange | ErrorKind::InvalidArgument => errno::EINVAL,
        ErrorKind::NotSupported => errno::ENOTSUP,
        ErrorKind::OutOfMemory => errno::ENOMEM,
        _ => errno::EIO,
    }
}

/// Serves requests until the client disconnects, the connection breaks or idles
/// out, or the server stops reading it (then in-flight requests finish). The bytes
/// it holds in flight are also counted in `inflight`.
pub fn serve(
    session: Session,
    mut input: Box<dyn Read + Send>,
    output: Box<dyn Write + Send>,
    limits: &Limits,
    inflight: Arc<AtomicU64>,
) -> Result<(), ConnError> {
    let conn = Arc::new(Conn {
        session,
        out: Mutex::new(output),
        budget: Budget {
            used: Mutex::new(0),
            freed: Condvar::new(),
            max: limits.max_inflight_bytes,
            total: inflight,
        },
        in_flight: AtomicUsize::new(0),
        broken: AtomicBool::new(false),
        panicked: Mutex::new(None),
    });
    let (tx, rx) = mpsc::sync_channel::<Job>(QUEUED_REQUESTS);
    let rx = Arc::new(Mutex::new(rx));
    let mut workers = Vec::with_capacity(WORKERS_PER_CONNECTION);
    for i in 0..WORKERS_PER_CONNECTION {
        let conn = Arc::clone(&conn);
        let rx = Arc::clone(&rx);
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-worker-{i}"))
            .spawn(move || loop {
                let job = match rx.lock() {
                    Ok(r) => r.recv(),
                    Err(_) => return,
                };
                let Ok(job) = job else { return };
                conn.work(job);
            });
        match spawned {
            Ok(w) => workers.push(w),
            // Fewer workers serve as well, only slower.
            Err(e) if !workers.is_empty() => tracing::warn!("worker {i} not started: {e}"),
            Err(e) => return Err(ConnError::Io(e)),
        }
    }
    let result = read_requests(&conn, &mut *input, &tx, limits);
    drop(tx);
    for w in workers {
        let _ = w.join();
    }
    if let Some(msg) = conn.panicked.lock().ok().and_then(|mut p| p.take()) {
        return Err(ConnError::Panicked(msg));
    }
    result
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Reads a request header into `buf`: false when the client went away between
/// requests (a normal end). The socket's read timeout is the idle timeout: at a
/// message boundary with requests in flight the reader waits on; with none, or in
/// the middle of a header, the connection ends.
fn read_header(
    conn: &Conn,
    input: &mut dyn Read,
    buf: &mut [u8],
    limits: &Limits,
) -> Result<bool, ConnError> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => {
                return Err(ConnError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the client went away {got} bytes into a request header"),
                )))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) && got == 0 && conn.in_flight.load(Ordering::SeqCst) > 0 => {}
            Err(e) if is_timeout(&e) => {
                let what = if got == 0 {
                    "idle".to_string()
                } else {
                    format!("silent {got} bytes into a request header")
                };
                return Err(ConnError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("{what} for {:?}", limits.idle_timeout),
                )));
            }
            Err(e) => return Err(ConnError::Io(e)),
        }
    }
    Ok(true)
}

/// Most bytes a block status reply can take: a chunk of at most
/// [`MAX_STATUS_EXTENTS`] extents per selected context.
fn status_reply_bound(contexts: usize, extended: bool) -> u64 {
    let per_extent = if extended { 16 } else { 8 };
    (contexts as u64).saturating_mul(
        (wire::EXT_REQUEST_BYTES as u64 + 8).saturating_add(per_extent * MAX_STATUS_EXTENTS as u64),
    )
}

/// The reader loop.
fn read_requests(
    conn: &Conn,
    input: &mut dyn Read,
    tx: &mpsc::SyncSender<Job>,
    limits: &Limits,
) -> Result<(), ConnError> {
    let extended = conn.session.extended;
    let header_len = if extended {
        wire::EXT_REQUEST_BYTES
    } else {
        wire::REQUEST_BYTES
    };
    let status_cost = status_reply_bound(conn.session.contexts.len(), extended);
    let mut hb = [0u8; wire::EXT_REQUEST_BYTES];
    loop {
        if conn.broken() {
            return Err(ConnError::Protocol(
                "a reply could not be sent (the client stopped reading)".into(),
            ));
        }
        if !read_header(conn, input, &mut hb[..header_len], limits)? {
            return Ok(());
        }
        let req = wire::parse_request(&hb[..header_len], extended)
            .map_err(|e| ConnError::Protocol(e.to_string()))?;
        if req.command == cmd::DISC {
            return Ok(());
        }
        let mut data = Vec::new();
        let cost = match req.command {
            cmd::WRITE => {
                // The length of a WRITE is its payload's, with or without
                // PAYLOAD_LEN (qemu leaves the flag out under extended headers).
                if req.len > MAX_PAYLOAD {
                    // Its data cannot be taken in, so the stream cannot be followed.
                    return Err(ConnError::Protocol(format!(
                        "a WRITE of {} bytes (the maximum is {MAX_PAYLOAD})",
                        req.len
                    )));
                }
                conn.budget.take(req.len);
                data = zeroed(req.len as usize);
                if let Err(e) = input.read_exact(&mut data) {
                    conn.budget.give(req.len);
                    return Err(ConnError::Io(e));
                }
                req.len
            }
            _ if extended && req.flags & cflag::PAYLOAD_LEN != 0 => {
                // No other command carries data here (BLOCK_STATUS_PAYLOAD is not
                // offered): the stream cannot be followed.
                return Err(ConnError::Protocol(format!(
                    "command {} with PAYLOAD_LEN",
                    req.command
                )));
            }
            cmd::READ => req.len.min(MAX_PAYLOAD),
            cmd::BLOCK_STATUS => status_cost,
            _ => 0,
        };
        if req.command != cmd::WRITE {
            conn.budget.take(cost);
        }
        conn.in_flight.fetch_add(1, Ordering::SeqCst);
        if let Err(mpsc::SendError(job)) = tx.send(Job { req, data, cost }) {
            conn.in_flight.fetch_sub(1, Ordering::SeqCst);
            conn.budget.give(job.cost);
            return Ok(());
        }
    }
}

/// Runs one request and sends its reply.
fn run(conn: &Conn, req: Request, data: Vec<u8>) {
    tracing::debug!("{req:?}");
    let export = &conn.session.export;
    let size = export.size();
    let writes = matches!(req.command, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
    let known = cflag::FUA
        | match req.command {
            cmd::READ if conn.structured() => cflag::DF,
            cmd::WRITE if conn.session.extended => cflag::PAYLOAD_LEN,
            cmd::WRITE_ZEROES => cflag::NO_HOLE | cflag::FAST_ZERO,
            cmd::BLOCK_STATUS => cflag::REQ_ONE,
            _ => 0,
        };
    if req.flags & !known != 0 {
        return conn.fail(
            &req,
            errno::EINVAL,
            &format!("unknown flags {:#x}", req.flags),
        );
    }
    let in_range = req.offset.checked_add(req.len).is_some_and(|e| e <= size);
    if writes && !export.writable() {
        return conn.fail(&req, errno::EPERM, "the export is read-only");
    }
    let range_error = |what: &str| {
        let e = if writes && req.command != cmd::TRIM {
            errno::ENOSPC
        } else {
            errno::EINVAL
        };
        conn.fail(
            &req,
            e,
            &format!(
                "{what} of {} bytes at {} goes past the end of the export ({size} bytes)",
                req.len, req.offset
            ),
        )
    };
    let disk = &export.disk;
    let fua = |conn: &Conn| -> bool {
        if req.flags & cflag::FUA != 0 {
            if let Err(e) = disk.flush() {
                conn.fail(&req, errno_of(&e, true), &e.to_string());
                return false;
            }
        }
        true
    };
    match req.command {
        cmd::READ => {
            // The length first: an absurd one is that, wherever it points.
            if req.len > MAX_PAYLOAD {
                return conn.fail(
                    &req,
                    errno::EOVERFLOW,
                    &format!("a read of {} bytes (the maximum is {MAX_PAYLOAD})", req.len),
                );
            }
            if !in_range {
                return range_error("a read");
            }
            read(conn, &req);
        }
        cmd::WRITE => {
            if !in_range {
                return range_error("a write");
            }
            match disk.write_at(&data, req.offset) {
                Ok(()) => {
                    if fua(conn) {
                        conn.done(&req);
                    }
                }
                Err(e) => conn.fail(&req, errno_of(&e, true), &e.to_string()),
            }
        }
        cmd::FLUSH => match disk.flush() {
            Ok(()) => conn.done(&req),
            Err(e) => conn.fail(&req, errno_of(&e, true), &e.to_string()),
        },
        cmd::TRIM | cmd::WRITE_ZEROES => {
            if !in_range {
                return range_error("zeroing");
            }
            // A trimmed range reads as zeros afterwards too (a hint the disk honours
            // exactly, without allocating).
            let fast = req.command == cmd::WRITE_ZEROES && req.flags & cflag::FAST_ZERO != 0;
            match disk.write_zeroes(req.offset, req.len, fast) {
                Ok(()) => {
                    if fua(conn) {
                        conn.done(&req);
                    }
                }
                Err(e) => conn.fail(&req, errno_of(&e, true), &e.to_string()),
            }
        }
        cmd::CACHE => {
            if !in_range {
                return range_error("a cache request");
            }
            conn.done(&req);
        }
        cmd::BLOCK_STATUS => block_status(conn, &req, in_range),
        other => conn.fail(&req, errno::EINVAL, &format!("unknown command {other}")),
    }
}

/// A read: with structured replies, data chunks for the ranges holding data and
/// hole chunks for those that read as zeros (one data chunk with `DF`); else a
/// simple reply with the data. The reply is built in one buffer, the data read
/// into its place (`req.len` is at most [`MAX_PAYLOAD`], checked by the caller).
fn read(conn: &Conn, req: &Request) {
    let disk = &conn.session.export.disk;
    let len = req.len as usize;
    if !conn.structured() {
        let mut b = zeroed(16 + len);
        b[..16].copy_from_slice(&wire::simple_reply(0, req.cookie));
        match disk.read_at(&mut b[16..], req.offset) {
            Ok(()) => conn.send(&b),
            Err(e) => conn.fail(req, errno_of(&e, false), &e.to_string()),
        }
        return;
    }
    if req.len == 0 {
        return conn.done(req);
    }
    // The pieces: (offset, length, holds data), one after the other from the
    // request's offset.
    let mut pieces: Vec<(u64, u64, bool)> = Vec::new();
    let end = req.offset + req.len;
    if req.flags & cflag::DF != 0 {
        pieces.push((req.offset, req.len, true));
    } else {
        let mut at = req.offset;
        let walked = disk.for_each_range(req.offset, req.len, |r| {
            if r.offset != at || r.length == 0 || r.length > end - at {
                return Err(vdisk::Error::new(
                    ErrorKind::InvalidDisk,
                    format!(
                        "the allocation map gave {} bytes at {} where {at}..{end} was asked",
                        r.length, r.offset
                    ),
                ));
            }
            at += r.length;
            let data = r.kind == RangeKind::Data;
            match pieces.last_mut() {
                Some(p) if p.2 == data => p.1 += r.length,
                _ => pieces.push((r.offset, r.length, data)),
            }
            Ok(())
        });
        if let Err(e) = walked {
            return conn.fail(req, errno_of(&e, false), &e.to_string());
        }
        if at != end {
            return conn.fail(
                req,
                errno::EIO,
                &format!("the allocation map ends at {at}, the read at {end}"),
            );
        }
    }
    let data_bytes: u64 = pieces.iter().filter(|p| p.2).map(|p| p.1).sum();
    let mut b = buffer(data_bytes as usize + 48 * pieces.len());
    let last = pieces.len() - 1;
    for (i, &(o, l, data)) in pieces.iter().enumerate() {
        let flags = if i == last { chunk::FLAG_DONE } else { 0 };
        if data {
            b.extend_from_slice(&conn.header(req, flags, chunk::OFFSET_DATA, 8 + l));
            b.extend_from_slice(&o.to_be_bytes());
            let at = b.len();
            b.resize(at + l as usize, 0);
            if let Err(e) = disk.read_at(&mut b[at..], o) {
                return conn.fail(req, errno_of(&e, false), &e.to_string());
            }
        } else {
            b.extend_from_slice(&conn.header(req, flags, chunk::OFFSET_HOLE, 12));
            b.extend_from_slice(&o.to_be_bytes());
            b.extend_from_slice(&(l as u32).to_be_bytes());
        }
    }
    conn.send(&b);
}

/// Block status: one chunk per selected context.
fn block_status(conn: &Conn, req: &Request, in_range: bool) {
    let contexts: &[(u32, Context)] = &conn.session.contexts;
    if contexts.is_empty() {
        return conn.fail(req, errno::EINVAL, "no metadata context was selected");
    }
    if req.len == 0 || !in_range {
        return conn.fail(
            req,
            errno::EINVAL,
            &format!(
                "block status of {} bytes at {} is outside the export",
                req.len, req.offset
            ),
        );
    }
    let extended = conn.session.extended;
    let (max, max_len) = if req.flags & cflag::REQ_ONE != 0 {
        (
            1,
            if extended {
                u64::MAX
            } else {
                MAX_COMPACT_EXTENT
            },
        )
    } else if extended {
        (MAX_STATUS_EXTENTS, u64::MAX)
    } else {
        (MAX_STATUS_EXTENTS, MAX_COMPACT_EXTENT)
    };
    let kind = if extended {
        chunk::BLOCK_STATUS_EXT
    } else {
        chunk::BLOCK_STATUS
    };
    let mut b = Vec::new();
    for (i, (id, c)) in contexts.iter().enumerate() {
        let extents =
            match context::extents(&conn.session.export, c, req.offset, req.len, max, max_len) {
                Ok(e) => e,
                Err(e) => return conn.fail(req, errno_of(&e, false), &e.to_string()),
            };
        let payload = wire::block_status_payload(*id, &extents, extended);
        let flags = if i + 1 == contexts.len() {
            chunk::FLAG_DONE
        } else {
            0
        };
        b.extend_from_slice(&conn.header(req, flags, kind, payload.len() as u64));
        b.extend_from_slice(&payload);
    }
    conn.send(&b);
}
