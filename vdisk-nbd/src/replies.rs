//! The client side of the transmission phase in one place: reading the server's
//! replies - simple, structured or extended - matching them to the requests in
//! flight by cookie, checking every chunk against the rules of the specification
//! (`shared/docs/nbd.md` §1.4-1.7) and assembling each request's answer (read data,
//! block status extents, errors).
//!
//! Shared by the strict test client ([`crate::testing`], also the fuzzing oracle) and
//! the production client ([`crate::client`]): [`ReplyChecker::next`] works on any
//! table of requests in flight ([`PendingTable`]) - a plain map for the test client,
//! a map behind a mutex that submitting threads fill while the connection's reader
//! thread empties it for the production client. A request being answered is taken
//! out of the table while its chunk is read, and always put back if reading or
//! checking fails, so that whoever fails the connection finds every request.
//!
//! Lengths are checked before anything is allocated; a read's data chunks go
//! straight into the request's own buffer (no copy through a chunk buffer) - or,
//! for a read submitted with a [`ReadSink`], straight into the submitter's memory
//! (holes zeroed there), so that a C caller's buffer is filled from the socket.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read};
use std::sync::Arc;

use crate::limits::MAX_PAYLOAD;
use crate::wire::{self, cflag, chunk, cmd, errno, Extent, ReplyHeader, Request};

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The stream failed or ended (`UnexpectedEof`: the server closed it).
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The server broke a rule of the protocol.
    #[error("the server broke the protocol: {0}")]
    Violation(String),
    /// The server refused an option with an error reply (or closed the connection
    /// after `EXPORT_NAME`, kind 0).
    #[error("refused with reply type {kind:#x}: {message}")]
    Refused {
        /// The error reply type ([`wire::rep`]).
        kind: u32,
        /// Its message.
        message: String,
    },
}

impl ClientError {
    /// Whether the server closed the connection (or reset it).
    pub fn is_closed(&self) -> bool {
        matches!(self, ClientError::Io(e) if matches!(
            e.kind(),
            io::ErrorKind::UnexpectedEof
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionAborted
        ))
    }
}

pub(crate) fn violation<T>(m: impl Into<String>) -> Result<T, ClientError> {
    Err(ClientError::Violation(m.into()))
}

pub(crate) fn wire_violation(e: wire::WireError) -> ClientError {
    ClientError::Violation(e.to_string())
}

/// Largest chunk payload accepted: a full read's data and its offset.
const MAX_CHUNK: u64 = MAX_PAYLOAD + 8;
/// The error values a server may send.
const ERRORS: [u32; 8] = [
    errno::EPERM,
    errno::EIO,
    errno::ENOMEM,
    errno::EINVAL,
    errno::ENOSPC,
    errno::EOVERFLOW,
    errno::ENOTSUP,
    errno::ESHUTDOWN,
];

/// Reads exactly `buf`, or returns false if the stream ended before its first byte
/// (a reset there is an end too: a peer that closes with bytes of ours unread
/// resets the connection, after its last message).
pub(crate) fn read_or_end(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Err(e) if got == 0 && e.kind() == io::ErrorKind::ConnectionReset => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// A request's complete reply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reply<T = ()> {
    /// The request.
    pub request: Request,
    /// The error (0: success).
    pub error: u32,
    /// The error's message (structured replies).
    pub message: String,
    /// A read's data (holes filled with zeros).
    pub data: Vec<u8>,
    /// Block status: each context's extents, in the order received.
    pub status: Vec<(u32, Vec<Extent>)>,
    /// What the sender attached to the request.
    pub tag: T,
}

/// Memory that a read's data goes straight into, lent by whoever submitted the read
/// until the read's completion runs (the buffer of a C caller of `ReadAsync`, say).
/// [`ReadSink::with_slice`] is called only while the read is in flight - never
/// after its completion ran - from the thread reading its reply, for ranges inside
/// the read; reads in flight at once lend disjoint ranges.
pub trait ReadSink: Send + Sync {
    /// Calls `f` with the `len` bytes at `at` (from the sink's start); an error if
    /// the sink does not hold them.
    fn with_slice(
        &self,
        at: usize,
        len: usize,
        f: &mut dyn FnMut(&mut [u8]) -> io::Result<()>,
    ) -> io::Result<()>;
}

/// A sink and where in it a read's first byte goes.
#[derive(Clone)]
pub struct SinkAt {
    /// The memory.
    pub sink: Arc<dyn ReadSink>,
    /// The offset in it of the read's first byte.
    pub at: usize,
}

/// A request whose reply is not complete yet, with what its sender attached (`tag`:
/// nothing for the test client, the completion for the production client).
pub struct Pending<T> {
    /// The request.
    pub req: Request,
    /// The sender's attachment.
    pub tag: T,
    error: Option<(u32, String)>,
    data: Vec<u8>,
    /// Where a read's data goes instead of `data`.
    sink: Option<SinkAt>,
    /// Ranges of a read answered so far: start -> end.
    covered: BTreeMap<u64, u64>,
    covered_bytes: u64,
    status: Vec<(u32, Vec<Extent>)>,
}

impl<T> Pending<T> {
    /// A request just sent.
    pub fn new(req: Request, tag: T) -> Pending<T> {
        Pending {
            req,
            tag,
            error: None,
            data: Vec::new(),
            sink: None,
            covered: BTreeMap::new(),
            covered_bytes: 0,
            status: Vec::new(),
        }
    }

    /// A read whose data goes into `sink` (the reply's `data` stays empty); holes
    /// are zeroed there.
    pub fn with_sink(mut self, sink: SinkAt) -> Pending<T> {
        self.sink = Some(sink);
        self
    }
}

/// Where the requests in flight wait for their replies, by cookie.
pub trait PendingTable<T> {
    /// Takes the request with `cookie` out (None: not in flight).
    fn take(&mut self, cookie: u64) -> Option<Pending<T>>;
    /// Puts a request (back) in.
    fn put(&mut self, p: Pending<T>);
}

impl<T> PendingTable<T> for HashMap<u64, Pending<T>> {
    fn take(&mut self, cookie: u64) -> Option<Pending<T>> {
        self.remove(&cookie)
    }

    fn put(&mut self, p: Pending<T>) {
        self.insert(p.req.cookie, p);
    }
}

/// What was negotiated that decides how replies look: reads replies and checks
/// them against the requests in a [`PendingTable`].
#[derive(Clone, Debug, Default)]
pub struct ReplyChecker {
    /// Structured replies (or extended headers) are on.
    pub structured: bool,
    /// Extended headers are on.
    pub extended: bool,
    /// The selected context ids.
    pub contexts: Vec<u32>,
}

impl ReplyChecker {
    /// A checker for a connection with these negotiated settings and selected
    /// context ids.
    pub fn new(structured: bool, extended: bool, contexts: Vec<u32>) -> ReplyChecker {
        ReplyChecker {
            structured: structured || extended,
            extended,
            contexts,
        }
    }

    /// Reads messages until one request's reply is complete; None when the stream
    /// ends between messages. On an error every request taken is back in `table`.
    pub fn next<T>(
        &self,
        r: &mut dyn Read,
        table: &mut dyn PendingTable<T>,
    ) -> Result<Option<Reply<T>>, ClientError> {
        loop {
            let mut magic = [0u8; 4];
            if !read_or_end(r, &mut magic)? {
                return Ok(None);
            }
            let n = wire::reply_header_len(&magic).map_err(wire_violation)?;
            let mut hb = [0u8; wire::EXT_CHUNK_BYTES];
            hb[..4].copy_from_slice(&magic);
            r.read_exact(&mut hb[4..n])?;
            let (flags, kind, cookie, len, extended) =
                match wire::parse_reply_header(&hb[..n]).map_err(wire_violation)? {
                    ReplyHeader::Simple { error, cookie } => {
                        let mut p = take(table, cookie)?;
                        return match self.simple(r, &mut p, error) {
                            Ok(()) => Ok(Some(reply_of(p))),
                            Err(e) => {
                                table.put(p);
                                Err(e)
                            }
                        };
                    }
                    ReplyHeader::Chunk {
                        flags,
                        kind,
                        cookie,
                        len,
                        extended,
                        ..
                    } => (flags, kind, cookie, len, extended),
                };
            self.check_chunk_header(flags, len, extended)?;
            let mut p = take(table, cookie)?;
            let done = flags & chunk::FLAG_DONE != 0;
            let checked = self.chunk(r, &mut p, kind, len, done).and_then(|()| {
                if done {
                    self.complete(&p)
                } else {
                    Ok(())
                }
            });
            match checked {
                Err(e) => {
                    table.put(p);
                    return Err(e);
                }
                Ok(()) if done => return Ok(Some(reply_of(p))),
                Ok(()) => table.put(p),
            }
        }
    }

    fn simple<T>(
        &self,
        r: &mut dyn Read,
        p: &mut Pending<T>,
        error: u32,
    ) -> Result<(), ClientError> {
        if self.extended {
            return violation("a simple reply under extended headers");
        }
        let req = p.req;
        if self.structured && req.command == cmd::READ {
            return violation("a simple reply to a READ under structured replies");
        }
        if error != 0 {
            check_errno(error)?;
            p.error = Some((error, String::new()));
            return Ok(());
        }
        if req.command == cmd::READ {
            if req.len > MAX_PAYLOAD {
                return violation(format!("a read of {} bytes succeeded", req.len));
            }
            if let Some(s) = &p.sink {
                s.sink
                    .with_slice(s.at, req.len as usize, &mut |b| r.read_exact(b))?;
            } else {
                p.data = vec![0u8; req.len as usize];
                r.read_exact(&mut p.data)?;
            }
            p.covered_bytes = req.len;
        }
        Ok(())
    }

    fn check_chunk_header(&self, flags: u16, len: u64, extended: bool) -> Result<(), ClientError> {
        if !self.structured {
            return violation("a structured chunk without structured replies");
        }
        if extended != self.extended {
            return violation(if extended {
                "an extended chunk without extended headers"
            } else {
                "a compact chunk under extended headers"
            });
        }
        if flags & !chunk::FLAG_DONE != 0 {
            return violation(format!("chunk flags {flags:#x}"));
        }
        if len > MAX_CHUNK {
            return violation(format!("a chunk of {len} bytes"));
        }
        Ok(())
    }

    /// One chunk of `len` payload bytes for `p`, read and checked.
    fn chunk<T>(
        &self,
        r: &mut dyn Read,
        p: &mut Pending<T>,
        kind: u16,
        len: u64,
        done: bool,
    ) -> Result<(), ClientError> {
        let req = p.req;
        let end = req.offset.saturating_add(req.len);
        let c = format!(
            "{kind:#x} chunk for command {} (cookie {})",
            req.command, req.cookie
        );
        if kind == chunk::OFFSET_DATA || kind == chunk::OFFSET_HOLE {
            if req.command != cmd::READ {
                return violation(format!("{c}: read data for another command"));
            }
            let mut head = [0u8; 12];
            let n = if kind == chunk::OFFSET_DATA {
                if len < 9 {
                    return violation(format!("{c}: empty data chunk"));
                }
                r.read_exact(&mut head[..8])?;
                len - 8
            } else {
                if len != 12 {
                    return violation(format!("{c}: a hole chunk of {len} bytes"));
                }
                r.read_exact(&mut head)?;
                u64::from(u32_of(&head[8..12]))
            };
            let o = u64_of(&head[0..8]);
            if n == 0 || o < req.offset || o.checked_add(n).is_none_or(|e| e > end) {
                return violation(format!(
                    "{c}: {n} bytes at {o} outside the request {}+{}",
                    req.offset, req.len
                ));
            }
            let before = p.covered.range(..o + n).next_back();
            if before.is_some_and(|(_, &e)| e > o) {
                return violation(format!("{c}: {n} bytes at {o} overlap an earlier chunk"));
            }
            let at = (o - req.offset) as usize;
            if let Some(s) = &p.sink {
                // Into the submitter's memory; holes zeroed there.
                s.sink.with_slice(s.at + at, n as usize, &mut |b| {
                    if kind == chunk::OFFSET_DATA {
                        r.read_exact(b)
                    } else {
                        b.fill(0);
                        Ok(())
                    }
                })?;
            } else {
                if p.data.is_empty() {
                    // req.len is ours (a read we sent), at most MAX_PAYLOAD.
                    p.data = vec![0u8; req.len as usize];
                }
                if kind == chunk::OFFSET_DATA {
                    r.read_exact(&mut p.data[at..at + n as usize])?;
                }
            }
            p.covered.insert(o, o + n);
            p.covered_bytes += n;
            return Ok(());
        }
        let mut payload = vec![0u8; len as usize];
        r.read_exact(&mut payload)?;
        match kind {
            chunk::NONE => {
                if len != 0 || !done {
                    return violation(format!("{c}: a NONE chunk needs DONE and no payload"));
                }
            }
            chunk::BLOCK_STATUS | chunk::BLOCK_STATUS_EXT => {
                if req.command != cmd::BLOCK_STATUS {
                    return violation(format!("{c}: block status for another command"));
                }
                if (kind == chunk::BLOCK_STATUS_EXT) != self.extended {
                    return violation(format!("{c}: the wrong block status chunk type"));
                }
                let (id, extents) = wire::parse_block_status_payload(&payload, self.extended)
                    .map_err(wire_violation)?;
                if !self.contexts.contains(&id) || p.status.iter().any(|s| s.0 == id) {
                    return violation(format!("{c}: context {id} not selected or given twice"));
                }
                if extents.is_empty() || extents.iter().any(|e| e.len == 0) {
                    return violation(format!("{c}: no extents, or an empty one"));
                }
                let all_but_last = extents[..extents.len() - 1]
                    .iter()
                    .fold(0u64, |s, e| s.saturating_add(e.len));
                if all_but_last >= req.len {
                    return violation(format!("{c}: extents go on past the request"));
                }
                if req.flags & cflag::REQ_ONE != 0
                    && (extents.len() != 1 || extents[0].len > req.len)
                {
                    return violation(format!("{c}: REQ_ONE answered with more than the request"));
                }
                p.status.push((id, extents));
            }
            chunk::ERROR | chunk::ERROR_OFFSET => {
                let (body, at) = if kind == chunk::ERROR_OFFSET {
                    if payload.len() < 14 {
                        return violation(format!("{c}: a short ERROR_OFFSET chunk"));
                    }
                    let split = payload.len() - 8;
                    (&payload[..split], Some(u64_of(&payload[split..])))
                } else {
                    (&payload[..], None)
                };
                let (e, msg) = wire::parse_error_payload(body).map_err(wire_violation)?;
                check_errno(e)?;
                if at.is_some_and(|o| o < req.offset || o >= end) {
                    return violation(format!("{c}: an error offset outside the request"));
                }
                if p.error.is_some() {
                    return violation(format!("{c}: a second error chunk"));
                }
                p.error = Some((e, msg));
            }
            _ => return violation(format!("{c}: unknown chunk type")),
        }
        Ok(())
    }

    /// Whether the reply of `p`, now done, answers the whole request.
    fn complete<T>(&self, p: &Pending<T>) -> Result<(), ClientError> {
        if p.error.is_some() {
            return Ok(());
        }
        let req = p.req;
        match req.command {
            cmd::READ if p.covered_bytes != req.len => violation(format!(
                "a read of {} bytes answered with {} bytes",
                req.len, p.covered_bytes
            )),
            cmd::BLOCK_STATUS if p.status.len() != self.contexts.len() => violation(format!(
                "block status answered for {} of {} contexts",
                p.status.len(),
                self.contexts.len()
            )),
            _ => Ok(()),
        }
    }
}

fn take<T>(table: &mut dyn PendingTable<T>, cookie: u64) -> Result<Pending<T>, ClientError> {
    match table.take(cookie) {
        Some(p) => Ok(p),
        None => violation(format!(
            "a reply for cookie {cookie}, which is not in flight"
        )),
    }
}

/// The reply of a request whose answer is complete (and checked).
fn reply_of<T>(p: Pending<T>) -> Reply<T> {
    let mut reply = Reply {
        request: p.req,
        error: 0,
        message: String::new(),
        data: Vec::new(),
        status: Vec::new(),
        tag: p.tag,
    };
    if let Some((e, m)) = p.error {
        reply.error = e;
        reply.message = m;
        return reply;
    }
    match p.req.command {
        cmd::READ => reply.data = p.data,
        cmd::BLOCK_STATUS => reply.status = p.status,
        _ => {}
    }
    reply
}

fn u64_of(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn u32_of(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn check_errno(e: u32) -> Result<(), ClientError> {
    if ERRORS.contains(&e) {
        Ok(())
    } else {
        violation(format!("error value {e} is not one the protocol defines"))
    }
}
