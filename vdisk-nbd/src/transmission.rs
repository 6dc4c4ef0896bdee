//! The transmission phase of one connection: a few workers (the connection's own
//! thread is one) take turns at the socket - a worker takes the reading side, reads
//! one request (the data of a write included; headers come through a buffer, so a
//! burst of pipelined requests costs one system call), lets go, runs the request
//! against the export's disk and sends the reply with one write, in whatever order
//! requests finish, matched by cookie. No request is handed from thread to thread:
//! the worker that read it serves it. The bytes of requests in flight are bounded
//! ([`MAX_INFLIGHT_BYTES`]): beyond it no worker reads, which is the backpressure a
//! client sees. A request the server cannot accept gets its error reply; only a
//! broken framing (bad magic, a payload beyond what can be held) ends the
//! connection, and never the server.

use std::io::{BufReader, Read, Write};
use std::sync::{Condvar, Mutex};

use vdisk::{ErrorKind, RangeKind};

use crate::context::{self, Context};
use crate::limits::{
    KEPT_REPLY_BYTES, MAX_COMPACT_EXTENT, MAX_INFLIGHT_BYTES, MAX_PAYLOAD, MAX_STATUS_EXTENTS,
    WORKERS_PER_CONNECTION,
};
use crate::negotiate::Session;
use crate::server::ConnError;
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

/// The in-flight budget: bytes of requests not yet replied to.
struct Budget {
    state: Mutex<BudgetState>,
    freed: Condvar,
}

struct BudgetState {
    used: u64,
    /// Threads waiting for bytes to be given back (only they need waking).
    waiting: usize,
}

impl Budget {
    fn new() -> Budget {
        Budget {
            state: Mutex::new(BudgetState {
                used: 0,
                waiting: 0,
            }),
            freed: Condvar::new(),
        }
    }

    fn take(&self, n: u64) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        while st.used > 0 && st.used + n > MAX_INFLIGHT_BYTES {
            st.waiting += 1;
            st = match self.freed.wait(st) {
                Ok(g) => g,
                Err(_) => return,
            };
            st.waiting -= 1;
        }
        st.used += n;
    }

    fn give(&self, n: u64) {
        if n == 0 {
            return;
        }
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
    budget: Budget,
    /// A reply could not be sent: the connection is finished.
    broken: std::sync::atomic::AtomicBool,
}

impl Conn {
    fn send(&self, bytes: &[u8]) {
        let ok = match self.out.lock() {
            Ok(mut w) => w.write_all(bytes).and_then(|()| w.flush()).is_ok(),
            Err(_) => false,
        };
        if !ok {
            self.broken.store(true, std::sync::atomic::Ordering::SeqCst);
        }
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

/// Serves requests until the client disconnects, the connection breaks, or
/// `stop` says the server is stopping (then in-flight requests finish).
pub fn serve(
    session: Session,
    input: Box<dyn Read + Send>,
    output: Box<dyn Write + Send>,
) -> Result<(), ConnError> {
    let conn = Conn {
        session,
        input: Mutex::new(Input {
            reader: BufReader::with_capacity(INPUT_BUFFER_BYTES, input),
            ended: false,
        }),
        out: Mutex::new(output),
        budget: Budget::new(),
        broken: std::sync::atomic::AtomicBool::new(false),
    };
    std::thread::scope(|scope| {
        let others: Vec<_> = (1..WORKERS_PER_CONNECTION)
            .map(|_| scope.spawn(|| guarded_work(&conn)))
            .collect();
        let mut result = guarded_work(&conn);
        for w in others {
            let r = w.join().unwrap_or(Ok(()));
            if result.is_ok() {
                result = r;
            }
        }
        result
    })
}

/// [`work`]; if it panics (a bug), the server goes on and the connection is marked
/// broken: no further request is read, and it ends with its other workers.
fn guarded_work(conn: &Conn) -> Result<(), ConnError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(conn))).unwrap_or_else(|_| {
        conn.broken.store(true, std::sync::atomic::Ordering::SeqCst);
        Err(ConnError::Io(std::io::Error::other(
            "a worker panicked while serving a request",
        )))
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
        if !conn.broken.load(std::sync::atomic::Ordering::SeqCst) {
            run(conn, job.req, job.data, &mut reply);
            reply.shrink();
        }
        conn.budget.give(job.cost);
    }
}

/// Reads the next request, taking its bytes from the in-flight budget (waiting
/// until they fit). None: the client disconnected.
fn next_request(conn: &Conn, input: &mut dyn Read) -> Result<Option<Job>, ConnError> {
    if conn.broken.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(ConnError::Protocol("a reply could not be sent".into()));
    }
    let extended = conn.session.extended;
    let header_len = if extended {
        wire::EXT_REQUEST_BYTES
    } else {
        wire::REQUEST_BYTES
    };
    let mut hb = [0u8; wire::EXT_REQUEST_BYTES];
    match input.read_exact(&mut hb[..header_len]) {
        Ok(()) => {}
        // The client went away between requests: a normal end.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(ConnError::Io(e)),
    }
    let req = wire::parse_request(&hb[..header_len], extended)
        .map_err(|e| ConnError::Protocol(e.to_string()))?;
    if req.command == cmd::DISC {
        return Ok(None);
    }
    if req.command == cmd::WRITE {
        // The length of a WRITE is its payload's, with or without PAYLOAD_LEN
        // (qemu leaves the flag out under extended headers).
        if req.len > MAX_PAYLOAD {
            // Its data cannot be taken in, so the stream cannot be followed.
            return Err(ConnError::Protocol(format!(
                "a WRITE of {} bytes (the maximum is {MAX_PAYLOAD})",
                req.len
            )));
        }
        conn.budget.take(req.len);
        let mut data = vec![0u8; req.len as usize];
        if let Err(e) = input.read_exact(&mut data) {
            conn.budget.give(req.len);
            return Err(ConnError::Io(e));
        }
        return Ok(Some(Job {
            req,
            data,
            cost: req.len,
        }));
    }
    if extended && req.flags & cflag::PAYLOAD_LEN != 0 {
        // No other command carries data here (BLOCK_STATUS_PAYLOAD is not
        // offered): the stream cannot be followed.
        return Err(ConnError::Protocol(format!(
            "command {} with PAYLOAD_LEN",
            req.command
        )));
    }
    let cost = if req.command == cmd::READ {
        req.len.min(MAX_PAYLOAD)
    } else {
        0
    };
    conn.budget.take(cost);
    Ok(Some(Job {
        req,
        data: Vec::new(),
        cost,
    }))
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
            if !in_range {
                return range_error("a read");
            }
            if req.len > MAX_PAYLOAD {
                return conn.fail(
                    &req,
                    errno::EINVAL,
                    &format!("a read of {} bytes (the maximum is {MAX_PAYLOAD})", req.len),
                );
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
    let put = |reply: &mut ReplyBuf, (o, l, data): (u64, u64, bool), last: bool| {
        let flags = if last { chunk::FLAG_DONE } else { 0 };
        if data {
            reply.push(&conn.header(req, flags, chunk::OFFSET_DATA, 8 + l));
            reply.push(&o.to_be_bytes());
            disk.read_at(reply.extend(l as usize), o)
        } else {
            reply.push(&conn.header(req, flags, chunk::OFFSET_HOLE, 12));
            reply.push(&o.to_be_bytes());
            reply.push(&(l as u32).to_be_bytes());
            Ok(())
        }
    };
    let walked = if df {
        pending = Some((req.offset, req.len, true));
        Ok(())
    } else {
        disk.for_each_range(req.offset, req.len, |r| {
            let data = r.kind == RangeKind::Data;
            match &mut pending {
                Some(p) if p.2 == data => p.1 += r.length,
                Some(p) => {
                    let done = *p;
                    *p = (r.offset, r.length, data);
                    put(reply, done, false)?;
                }
                None => pending = Some((r.offset, r.length, data)),
            }
            Ok(())
        })
    };
    let result = walked.and_then(|()| match pending {
        Some(p) => put(reply, p, true),
        None => Ok(()),
    });
    match result {
        Ok(()) => conn.send(reply.as_slice()),
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
        let budget = Budget::new();
        budget.take(MAX_INFLIGHT_BYTES - 10);
        // Over the limit, but alone in flight: never refused (a request larger than
        // the budget would otherwise wait forever).
        let lone = Budget::new();
        lone.take(MAX_INFLIGHT_BYTES + 1);
        let taken = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                budget.take(100);
                taken.store(true, std::sync::atomic::Ordering::SeqCst);
            });
            while budget.state.lock().unwrap().waiting == 0 {
                std::thread::yield_now();
            }
            assert!(!taken.load(std::sync::atomic::Ordering::SeqCst));
            budget.give(MAX_INFLIGHT_BYTES - 10);
        });
        assert!(taken.load(std::sync::atomic::Ordering::SeqCst));
        let st = budget.state.lock().unwrap();
        assert_eq!((st.used, st.waiting), (100, 0));
    }
}
