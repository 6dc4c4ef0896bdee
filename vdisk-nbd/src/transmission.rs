//! The transmission phase of one connection: a few workers (the connection's own
//! thread is one) take turns at the socket - a worker takes the reading side, reads
//! one request (the data of a write included; headers come through a buffer, so a
//! burst of pipelined requests costs one system call), lets go, runs the request
//! against the export's disk and sends the reply with one write, in whatever order
//! requests finish, matched by cookie. No request is handed from thread to thread:
//! the worker that read it serves it. The bytes of requests in flight are bounded
//! ([`Limits::max_inflight_bytes`]: write data taken in, read data and block status
//! replies being made or sent): beyond it no worker reads, which is the
//! backpressure a client sees. A request the server cannot accept gets its error
//! reply; only a broken framing (bad magic, a payload beyond what can be held) ends
//! the connection, and never the server. So do a client silent for
//! [`Limits::idle_timeout`] with nothing in flight, one that takes no reply bytes
//! for [`Limits::reply_timeout`], and a request whose worker panicked (a bug: it is
//! answered `EIO` and reported as [`ConnError::Panicked`]).

use std::io::{BufReader, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use std::os::fd::BorrowedFd;

use vdisk::{DataSource, ErrorKind, RangeKind};

use crate::context::{self, Context};
use crate::limits::{
    Limits, KEPT_REPLY_BYTES, MAX_COMPACT_EXTENT, MAX_PAYLOAD, MAX_STATUS_EXTENTS,
    WORKERS_PER_CONNECTION,
};
use crate::negotiate::Session;
use crate::server::ConnError;
use crate::transport::FileSender;
use crate::wire::{self, cflag, chunk, cmd, errno, Request};

/// A request with its data, as a worker read it.
struct Job {
    req: Request,
    data: Vec<u8>,
    /// Bytes of the in-flight budget it holds.
    cost: u64,
}

/// A worker's reply buffer, reused from request to request: a read's data lands in
/// it once, right behind its reply header, and is sent from there - never
/// zero-filled or copied again. Bytes past `len` are left over from earlier replies
/// and are never sent: every byte of a reply is written before it goes out.
#[derive(Default)]
struct ReplyBuf {
    bytes: Vec<u8>,
    len: usize,
}

impl ReplyBuf {
    /// Starts a new reply.
    fn clear(&mut self) {
        self.len = 0;
    }

    /// Appends `b`.
    fn push(&mut self, b: &[u8]) {
        self.extend(b.len()).copy_from_slice(b);
    }

    /// Appends `n` bytes for the caller to fill (whatever they held before).
    fn extend(&mut self, n: usize) -> &mut [u8] {
        let end = self.len + n;
        if self.bytes.len() < end {
            if end > self.bytes.capacity() && end >= LARGE_BUFFER {
                self.bytes
                    .reserve_exact(end.max(LARGE_BUFFER_CAPACITY) - self.bytes.len());
            }
            self.bytes.resize(end, 0);
        }
        let start = std::mem::replace(&mut self.len, end);
        &mut self.bytes[start..end]
    }

    /// The reply so far.
    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// Gives the memory back if a large request grew it beyond what a worker keeps.
    fn shrink(&mut self) {
        if self.bytes.len() > KEPT_REPLY_BYTES {
            self.bytes = Vec::new();
        }
        self.len = 0;
    }
}

/// Host file bytes that go out within a reply, after the first `at` bytes of its
/// buffer.
struct FilePiece<'a> {
    at: usize,
    fd: BorrowedFd<'a>,
    offset: u64,
    length: u64,
}

/// The in-flight budget: bytes of requests not yet replied to.
struct Budget {
    state: Mutex<BudgetState>,
    freed: Condvar,
    max: u64,
    /// The server's count of bytes in flight, all connections together.
    total: Arc<AtomicU64>,
}

struct BudgetState {
    used: u64,
    /// Threads waiting for bytes to be given back (only they need waking).
    waiting: usize,
}

impl Budget {
    fn new(max: u64, total: Arc<AtomicU64>) -> Budget {
        Budget {
            state: Mutex::new(BudgetState {
                used: 0,
                waiting: 0,
            }),
            freed: Condvar::new(),
            max,
            total,
        }
    }

    /// Takes `n` bytes, waiting while others hold too much (one request alone
    /// always gets through).
    fn take(&self, n: u64) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        while st.used > 0 && st.used.saturating_add(n) > self.max {
            st.waiting += 1;
            st = match self.freed.wait(st) {
                Ok(g) => g,
                Err(_) => return,
            };
            st.waiting -= 1;
        }
        st.used = st.used.saturating_add(n);
        self.total.fetch_add(n, Ordering::SeqCst);
    }

    fn give(&self, n: u64) {
        if n == 0 {
            return;
        }
        self.total.fetch_sub(n, Ordering::SeqCst);
        let wake = match self.state.lock() {
            Ok(mut st) => {
                st.used = st.used.saturating_sub(n);
                st.waiting > 0
            }
            Err(_) => true,
        };
        if wake {
            self.freed.notify_all();
        }
    }
}

/// The reading side of a connection, taken by one worker at a time.
struct Input {
    reader: BufReader<Box<dyn Read + Send>>,
    /// The stream ended (the client disconnected, or it cannot be followed): no
    /// worker reads again.
    ended: bool,
}

/// What the workers share.
struct Conn {
    session: Session,
    input: Mutex<Input>,
    out: Mutex<Box<dyn Write + Send>>,
    /// Sends read data straight from the disk's files (plaintext connections);
    /// used while `out` is held, like every send.
    files: Option<FileSender>,
    budget: Budget,
    /// Requests read and not yet answered.
    in_flight: AtomicUsize,
    /// A reply could not be sent: the connection is finished.
    broken: AtomicBool,
    /// The message of the first worker panic.
    panicked: Mutex<Option<String>>,
    /// The socket's read timeout (for the message when it ends the connection).
    idle_timeout: std::time::Duration,
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

    /// Sends a reply whose buffer leaves room for file bytes: `bytes` with each
    /// piece of `files` sent from its file after the first `at` bytes of it.
    fn send_with_files(&self, bytes: &[u8], files: &[FilePiece<'_>]) {
        let Some(sender) = self.files.as_ref().filter(|_| !files.is_empty()) else {
            return self.send(bytes);
        };
        let sent = match self.out.lock() {
            Ok(_turn) => {
                let mut at = 0;
                files
                    .iter()
                    .try_for_each(|p| {
                        sender.send(&bytes[at..p.at], true)?;
                        at = p.at;
                        sender.send_file(p.fd, p.offset, p.length)
                    })
                    .and_then(|()| sender.send(&bytes[at..], false))
            }
            Err(_) => Err(std::io::ErrorKind::Other.into()),
        };
        if let Err(e) = sent {
            tracing::debug!("a reply with file data was cut short: {e}");
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

    /// Runs a request; a panic (a bug) answers it `EIO` and ends the connection.
    fn run_guarded(&self, job: Job, reply: &mut ReplyBuf) {
        let req = job.req;
        if !self.broken() {
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run(self, req, job.data, reply)
            }));
            if let Err(p) = ran {
                let msg = panic_message(p.as_ref());
                tracing::error!("request {req:?} panicked: {msg}");
                self.fail(&req, errno::EIO, &format!("internal error: {msg}"));
                self.note_panic(msg);
            }
        }
        reply.shrink();
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.budget.give(job.cost);
    }

    /// Records a panic: the connection is finished, and reports the first.
    fn note_panic(&self, msg: String) {
        if let Ok(mut first) = self.panicked.lock() {
            first.get_or_insert(msg);
        }
        self.broken.store(true, Ordering::SeqCst);
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

/// A zeroed buffer of `len` bytes (see [`LARGE_BUFFER_CAPACITY`]).
fn zeroed(len: usize) -> Vec<u8> {
    let mut b = if (LARGE_BUFFER..=LARGE_BUFFER_CAPACITY).contains(&len) {
        Vec::with_capacity(LARGE_BUFFER_CAPACITY)
    } else {
        Vec::with_capacity(len)
    };
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

/// Bytes of requests read from the socket at a time (a burst of pipelined headers
/// in one read; the large data of a write goes straight to its buffer).
const INPUT_BUFFER_BYTES: usize = 64 << 10;

/// Serves requests until the client disconnects, the connection breaks or idles
/// out, or the server stops reading it (then in-flight requests finish). The bytes
/// it holds in flight are also counted in `inflight`.
pub(crate) fn serve(
    session: Session,
    input: Box<dyn Read + Send>,
    output: Box<dyn Write + Send>,
    files: Option<FileSender>,
    limits: &Limits,
    inflight: Arc<AtomicU64>,
) -> Result<(), ConnError> {
    let conn = Conn {
        session,
        input: Mutex::new(Input {
            reader: BufReader::with_capacity(INPUT_BUFFER_BYTES, input),
            ended: false,
        }),
        out: Mutex::new(output),
        files,
        budget: Budget::new(limits.max_inflight_bytes, inflight),
        in_flight: AtomicUsize::new(0),
        broken: AtomicBool::new(false),
        panicked: Mutex::new(None),
        idle_timeout: limits.idle_timeout,
    };
    let result = std::thread::scope(|scope| {
        let mut others = Vec::with_capacity(WORKERS_PER_CONNECTION);
        for i in 1..WORKERS_PER_CONNECTION {
            let spawned = std::thread::Builder::new()
                .name(format!("nbd-worker-{i}"))
                .spawn_scoped(scope, || guarded_work(&conn));
            match spawned {
                Ok(w) => others.push(w),
                // Fewer workers serve as well, only slower.
                Err(e) => tracing::warn!("worker {i} not started: {e}"),
            }
        }
        let mut result = guarded_work(&conn);
        for w in others {
            let r = w.join().unwrap_or(Ok(()));
            if result.is_ok() {
                result = r;
            }
        }
        result
    });
    if let Some(msg) = conn.panicked.lock().ok().and_then(|mut p| p.take()) {
        return Err(ConnError::Panicked(msg));
    }
    result
}

/// [`work`]; a panic outside a request (a bug) ends the connection, not the
/// server: no further request is read, and it ends with its other workers.
fn guarded_work(conn: &Conn) -> Result<(), ConnError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(conn))).unwrap_or_else(|p| {
        let msg = panic_message(p.as_ref());
        tracing::error!("a worker panicked: {msg}");
        conn.note_panic(msg);
        if let Ok(mut input) = conn.input.lock() {
            input.ended = true;
        }
        Ok(())
    })
}

/// One worker: reads a request, serves it, until the stream ends. Returns why it
/// ended if that was an error (only the worker that met it reports it).
fn work(conn: &Conn) -> Result<(), ConnError> {
    let mut reply = ReplyBuf::default();
    loop {
        let job = {
            let Ok(mut input) = conn.input.lock() else {
                return Ok(());
            };
            if input.ended {
                return Ok(());
            }
            match next_request(conn, &mut input.reader) {
                Ok(Some(job)) => job,
                end => {
                    input.ended = true;
                    return end.map(|_| ());
                }
            }
        };
        conn.run_guarded(job, &mut reply);
    }
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
fn read_header(conn: &Conn, input: &mut dyn Read, buf: &mut [u8]) -> Result<bool, ConnError> {
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
                    format!("{what} for {:?}", conn.idle_timeout),
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

/// Reads the next request, taking its bytes from the in-flight budget (waiting
/// until they fit). None: the client disconnected.
fn next_request(conn: &Conn, input: &mut dyn Read) -> Result<Option<Job>, ConnError> {
    if conn.broken() {
        return Err(ConnError::Protocol(
            "a reply could not be sent (the client stopped reading)".into(),
        ));
    }
    let extended = conn.session.extended;
    let header_len = if extended {
        wire::EXT_REQUEST_BYTES
    } else {
        wire::REQUEST_BYTES
    };
    let mut hb = [0u8; wire::EXT_REQUEST_BYTES];
    if !read_header(conn, input, &mut hb[..header_len])? {
        return Ok(None);
    }
    let req = wire::parse_request(&hb[..header_len], extended)
        .map_err(|e| ConnError::Protocol(e.to_string()))?;
    if req.command == cmd::DISC {
        return Ok(None);
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
        cmd::BLOCK_STATUS => status_reply_bound(conn.session.contexts.len(), extended),
        _ => 0,
    };
    if req.command != cmd::WRITE {
        conn.budget.take(cost);
    }
    conn.in_flight.fetch_add(1, Ordering::SeqCst);
    Ok(Some(Job { req, data, cost }))
}

/// Runs one request and sends its reply.
fn run(conn: &Conn, req: Request, data: Vec<u8>, reply: &mut ReplyBuf) {
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
            read(conn, &req, reply);
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
/// simple reply with the data. The reply is built in `reply` (the data read straight
/// into it behind each header) and sent with one write.
fn read(conn: &Conn, req: &Request, reply: &mut ReplyBuf) {
    let disk = &conn.session.export.disk;
    reply.clear();
    if !conn.structured() {
        reply.push(&wire::simple_reply(0, req.cookie));
        match disk.read_at(reply.extend(req.len as usize), req.offset) {
            Ok(()) => conn.send(reply.as_slice()),
            Err(e) => conn.fail(req, errno_of(&e, false), &e.to_string()),
        }
        return;
    }
    if req.len == 0 {
        return conn.done(req);
    }
    let df = req.flags & cflag::DF != 0;
    // The header of the piece before the current one goes out once the next shows
    // whether it was the last: (offset, length, holds data), merged as found.
    let mut pending: Option<(u64, u64, bool)> = None;
    let mut files: Vec<FilePiece<'_>> = Vec::new();
    let put =
        |reply: &mut ReplyBuf, files: &mut Vec<_>, (o, l, data): (u64, u64, bool), last: bool| {
            let flags = if last { chunk::FLAG_DONE } else { 0 };
            if data {
                reply.push(&conn.header(req, flags, chunk::OFFSET_DATA, 8 + l));
                reply.push(&o.to_be_bytes());
                if conn.files.is_none() {
                    return disk.read_at(reply.extend(l as usize), o);
                }
                disk.for_each_source(o, l, |piece| match piece {
                    DataSource::File { fd, offset, length } => {
                        files.push(FilePiece {
                            at: reply.len,
                            fd,
                            offset,
                            length,
                        });
                        Ok(())
                    }
                    DataSource::Read { offset, length } => {
                        disk.read_at(reply.extend(length as usize), offset)
                    }
                })
            } else {
                reply.push(&conn.header(req, flags, chunk::OFFSET_HOLE, 12));
                reply.push(&o.to_be_bytes());
                reply.push(&(l as u32).to_be_bytes());
                Ok(())
            }
        };
    let end = req.offset + req.len;
    let mut at = req.offset;
    let walked = if df {
        pending = Some((req.offset, req.len, true));
        at = end;
        Ok(())
    } else {
        disk.for_each_range(req.offset, req.len, |r| {
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
            match &mut pending {
                Some(p) if p.2 == data => p.1 += r.length,
                Some(p) => {
                    let done = *p;
                    *p = (r.offset, r.length, data);
                    put(reply, &mut files, done, false)?;
                }
                None => pending = Some((r.offset, r.length, data)),
            }
            Ok(())
        })
    };
    let result = walked.and_then(|()| match pending {
        Some(p) if at == end => put(reply, &mut files, p, true),
        _ => Err(vdisk::Error::new(
            ErrorKind::InvalidDisk,
            format!("the allocation map ends at {at}, the read at {end}"),
        )),
    });
    match result {
        Ok(()) => conn.send_with_files(reply.as_slice(), &files),
        Err(e) => conn.fail(req, errno_of(&e, false), &e.to_string()),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reused_reply_buffer_holds_exactly_the_new_reply() {
        let mut r = ReplyBuf::default();
        r.push(b"header");
        r.extend(10).fill(0xaa);
        assert_eq!(r.as_slice().len(), 16);
        r.clear();
        r.push(b"hd");
        r.extend(3).copy_from_slice(b"xyz");
        assert_eq!(r.as_slice(), b"hdxyz");
        // A large reply's memory is given back; a small one's is kept.
        r.extend(KEPT_REPLY_BYTES);
        r.shrink();
        assert_eq!(r.bytes.len(), 0);
        r.push(b"small");
        r.shrink();
        assert_eq!(r.bytes.len(), 5);
        assert!(r.as_slice().is_empty());
    }

    #[test]
    fn the_budget_holds_a_taker_back_until_bytes_are_given() {
        const MAX: u64 = 64 << 20;
        let total = Arc::new(AtomicU64::new(0));
        let budget = Budget::new(MAX, Arc::clone(&total));
        budget.take(MAX - 10);
        // Over the limit, but alone in flight: never refused (a request larger than
        // the budget would otherwise wait forever).
        let lone = Budget::new(MAX, Arc::new(AtomicU64::new(0)));
        lone.take(MAX + 1);
        let taken = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                budget.take(100);
                taken.store(true, Ordering::SeqCst);
            });
            while budget.state.lock().unwrap().waiting == 0 {
                std::thread::yield_now();
            }
            assert!(!taken.load(Ordering::SeqCst));
            budget.give(MAX - 10);
        });
        assert!(taken.load(Ordering::SeqCst));
        let st = budget.state.lock().unwrap();
        assert_eq!((st.used, st.waiting), (100, 0));
        assert_eq!(total.load(Ordering::SeqCst), 100);
    }
}
