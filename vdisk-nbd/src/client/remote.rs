//! [`RemoteDisk`]: an NBD export as a [`VirtualDisk`].
//!
//! * **Connections**: one, or up to [`ClientOptions::connections`] when the server
//!   advertises `CAN_MULTI_CONN`; requests go round-robin to the live ones.
//! * **Reads and writes** are split at min(server maximum, 32 MiB) and pipelined
//!   (the connections bound what is in flight); reads are widened to the server's
//!   minimum block. A read that fails because its connection was lost is sent
//!   again, once, on a new connection; writes are never retried.
//! * **Flush** waits for the writes in flight, then sends `FLUSH` on one connection
//!   (multi-conn: it covers them all) or each.
//! * **Map**: `BLOCK_STATUS` over `base:allocation` in windows, short answers
//!   accepted, the next window starting where the answer ended (rounded down to the
//!   minimum block: an extent of 2^32-1 bytes from a server without extended
//!   headers).
//! * **Changed areas**: `*` from the map; `qemu:dirty-bitmap:NAME` as it is;
//!   anything else as `x-vdisk:changed:<ID>` - each on a connection of its own that
//!   selected that context (kept for later calls).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};

use vdisk::{Error, ErrorKind, MapRange, RangeKind, Result, VirtualDisk};

use super::connection::{Answer, Bounds, Completion, Conn};
use super::handshake::{self, Contexts, Target};
use super::tls::TlsClient;
use super::uri::{parse_uri, NbdUri};
use super::{ClientOptions, Endpoint, MAX_REQUEST_BYTES};
use crate::context::{BASE_ALLOCATION, CHANGED_PREFIX};
use crate::replies::{ReadSink, SinkAt};
use crate::wire::{cflag, cmd, tflag, STATE_HOLE, STATE_ZERO};

/// The prefix of qemu's dirty bitmap contexts.
pub const QEMU_DIRTY_BITMAP: &str = "qemu:dirty-bitmap:";

/// A read's completion.
pub type ReadDone = Box<dyn FnOnce(Result<Vec<u8>>) + Send>;
/// A write's completion.
pub type WriteDone = Box<dyn FnOnce(Result<()>) + Send>;

struct Inner {
    endpoint: Endpoint,
    export: String,
    opts: ClientOptions,
    tls: Option<TlsClient>,
    uri: String,
    size: u64,
    flags: u16,
    writable: bool,
    /// Minimum, preferred, maximum (as the server gave them, or the defaults).
    sizes: (u32, u32, u32),
    description: Option<String>,
    /// Whether `base:allocation` was selected.
    allocation: bool,
    conns: Mutex<Vec<Arc<Conn>>>,
    next: AtomicUsize,
    /// Connections that selected a changed-blocks context, by context.
    changed: Mutex<HashMap<String, Arc<Conn>>>,
    closed: AtomicBool,
}

/// An NBD export opened as a disk.
pub struct RemoteDisk {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RemoteDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteDisk")
            .field("uri", &self.inner.uri)
            .field("size", &self.inner.size)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn tls_client(opts: &ClientOptions) -> Result<Option<TlsClient>> {
    if opts.wants_tls() {
        Ok(Some(TlsClient::new(opts)?))
    } else {
        Ok(None)
    }
}

impl RemoteDisk {
    /// Connects to `export` at `endpoint` and negotiates (more connections follow
    /// when the server allows multi-conn).
    pub fn open(endpoint: &Endpoint, export: &str, opts: &ClientOptions) -> Result<RemoteDisk> {
        let mut opts = opts.clone();
        opts.connections = opts.connections.max(1);
        opts.max_in_flight = opts.max_in_flight.max(1);
        let tls = tls_client(&opts)?;
        let uri = NbdUri {
            endpoint: endpoint.clone(),
            export: export.to_string(),
            tls: tls.is_some(),
            tls_certificates: None,
        }
        .to_string();
        let target = Target {
            endpoint,
            opts: &opts,
            tls: tls.as_ref(),
        };
        let first = handshake::negotiate(&target, export, Contexts::Wanted(&[BASE_ALLOCATION]))?;
        let e = &first.info;
        let (min, pref, max) = e.block_sizes.unwrap_or((1, 4096, MAX_REQUEST_BYTES));
        let sizes = (min.max(1), pref.max(min).max(1), max.max(min).max(1));
        let flags = e.flags;
        let allocation = first.contexts.iter().any(|c| c.1 == BASE_ALLOCATION);
        let writable = !opts.read_only && flags & tflag::READ_ONLY == 0;
        let size = e.size;
        let description = e.description.clone();
        let bounds = bounds(&opts);
        let mut conns = vec![Conn::start(first, bounds)?];
        if flags & tflag::CAN_MULTI_CONN != 0 {
            while conns.len() < opts.connections {
                match handshake::negotiate(&target, export, Contexts::Wanted(&[BASE_ALLOCATION]))
                    .and_then(|n| Conn::start(n, bounds))
                {
                    Ok(c) => conns.push(c),
                    Err(e) => {
                        tracing::warn!("{uri}: connection {} not opened: {e}", conns.len() + 1);
                        break;
                    }
                }
            }
        }
        Ok(RemoteDisk {
            inner: Arc::new(Inner {
                endpoint: endpoint.clone(),
                export: export.to_string(),
                tls,
                uri,
                size,
                flags,
                writable,
                sizes,
                description,
                allocation,
                conns: Mutex::new(conns),
                next: AtomicUsize::new(0),
                changed: Mutex::new(HashMap::new()),
                closed: AtomicBool::new(false),
                opts,
            }),
        })
    }

    /// Opens the export an NBD URI names; `nbds` forces TLS.
    pub fn open_uri(uri: &str, opts: &ClientOptions) -> Result<RemoteDisk> {
        let u = parse_uri(uri)?;
        let mut o = opts.clone();
        if u.tls {
            o.tls = super::TlsPolicy::Require;
        }
        // The URI's certificate folder, for what the options leave open.
        if let Some(dir) = &u.tls_certificates {
            let ca = dir.join("ca-cert.pem");
            if o.ca_file.is_none() && ca.is_file() {
                o.ca_file = Some(ca);
            }
            let (cert, key) = (dir.join("client-cert.pem"), dir.join("client-key.pem"));
            if o.client_cert.is_none() && cert.is_file() && key.is_file() {
                o.client_cert = Some((cert, key));
            }
        }
        RemoteDisk::open(&u.endpoint, &u.export, &o)
    }

    /// The exports the server lists (`LIST`): (name, description).
    pub fn list_exports(
        endpoint: &Endpoint,
        opts: &ClientOptions,
    ) -> Result<Vec<(String, String)>> {
        let tls = tls_client(opts)?;
        handshake::list_exports(&Target {
            endpoint,
            opts,
            tls: tls.as_ref(),
        })
    }

    /// Checks that `endpoint` is an NBD server reachable with `opts` (TLS as they
    /// ask, the certificate checked), without opening an export.
    pub fn probe(endpoint: &Endpoint, opts: &ClientOptions) -> Result<()> {
        let tls = tls_client(opts)?;
        handshake::probe(&Target {
            endpoint,
            opts,
            tls: tls.as_ref(),
        })
    }

    /// Whether the connections run under TLS.
    pub fn uses_tls(&self) -> bool {
        self.inner.tls.is_some()
    }

    /// How to open this export again: the same server, export and options
    /// (another connection, e.g. from another library in the process).
    pub fn spec(&self) -> super::RemoteSpec {
        super::RemoteSpec {
            endpoint: self.inner.endpoint.clone(),
            export: self.inner.export.clone(),
            options: self.inner.opts.clone(),
        }
    }

    /// The export's name.
    pub fn export_name(&self) -> &str {
        &self.inner.export
    }

    /// The export's description, if the server gave one.
    pub fn description(&self) -> Option<&str> {
        self.inner.description.as_deref()
    }

    /// Minimum, preferred and maximum block sizes (1, 4096, 32 MiB when not given).
    pub fn block_sizes(&self) -> (u32, u32, u32) {
        self.inner.sizes
    }

    /// The transmission flags the server sent.
    pub fn transmission_flags(&self) -> u16 {
        self.inner.flags
    }

    /// Connections open for I/O.
    pub fn connections(&self) -> usize {
        lock(&self.inner.conns).len()
    }

    /// Reads `len` bytes at `offset`; `done` gets them (on a reader thread).
    pub fn read_async(&self, offset: u64, len: usize, done: ReadDone) {
        self.inner.read_async(offset, len, done);
    }

    /// Reads `len` bytes at `offset` straight into `sink` (its bytes `0..len`):
    /// the data goes from the socket into that memory, holes are zeroed there;
    /// `done` runs once every piece is in (on a reader thread). The sink is used
    /// only until then. Reads not aligned to the server's minimum block go
    /// through a buffer of the client's, copied into the sink.
    pub fn read_async_into(
        &self,
        offset: u64,
        len: usize,
        sink: Arc<dyn ReadSink>,
        done: WriteDone,
    ) {
        self.inner.read_async_into(offset, len, sink, done);
    }

    /// Writes `data` at `offset` (with FUA when asked and offered); `done` runs
    /// when the server has answered every piece.
    pub fn write_async(&self, offset: u64, data: Vec<u8>, fua: bool, done: WriteDone) {
        self.inner.write_async(offset, data, fua, done);
    }

    /// Waits for everything in flight, then ends each connection (`DISC`, and
    /// `close_notify` under TLS).
    pub fn close(self) -> Result<()> {
        self.inner.close()
    }
}

impl Drop for RemoteDisk {
    fn drop(&mut self) {
        let _ = self.inner.close();
    }
}

fn bounds(opts: &ClientOptions) -> Bounds {
    Bounds {
        max_in_flight: opts.max_in_flight.max(1),
        max_bytes: opts.max_in_flight_bytes.max(1),
        request_timeout: opts.request_timeout,
    }
}

/// Waits for `n` piece answers on `rx`; the first error wins.
fn gather<T>(
    rx: &mpsc::Receiver<(usize, Result<T>)>,
    n: usize,
    mut each: impl FnMut(usize, T),
) -> Result<()> {
    let mut first = None;
    for _ in 0..n {
        match rx.recv() {
            Ok((i, Ok(v))) => each(i, v),
            Ok((_, Err(e))) => {
                first.get_or_insert(e);
            }
            Err(_) => {
                first.get_or_insert(Error::new(
                    ErrorKind::ConnectionLost,
                    "a request's completion was lost",
                ));
                break;
            }
        }
    }
    first.map_or(Ok(()), Err)
}

impl Inner {
    fn target(&self) -> Target<'_> {
        Target {
            endpoint: &self.endpoint,
            opts: &self.opts,
            tls: self.tls.as_ref(),
        }
    }

    fn max_piece(&self) -> u64 {
        let max = self.sizes.2.min(MAX_REQUEST_BYTES);
        // Whole minimum blocks.
        u64::from(max / self.sizes.0 * self.sizes.0).max(u64::from(self.sizes.0))
    }

    fn check_range(&self, offset: u64, len: u64, what: &str) -> Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(Error::new(
                ErrorKind::OutOfRange,
                format!(
                    "{}: {what} of {len} bytes at {offset} past the end ({} bytes)",
                    self.uri, self.size
                ),
            ));
        }
        Ok(())
    }

    fn closed_error(&self) -> Error {
        Error::new(
            ErrorKind::InvalidArgument,
            format!("{}: the disk is closed", self.uri),
        )
    }

    /// A live connection, round-robin (a dead one if all are dead: requests to it
    /// fail at once).
    fn pick(&self) -> Result<Arc<Conn>> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(self.closed_error());
        }
        let conns = lock(&self.conns);
        let n = conns.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            let c = &conns[(start + i) % n];
            if !c.is_dead() {
                return Ok(Arc::clone(c));
            }
        }
        conns.first().cloned().ok_or_else(|| self.closed_error())
    }

    /// Replaces the dead connection `dead` by a new one (unless another thread
    /// did); false if that failed.
    fn replace(&self, dead: &Arc<Conn>) -> Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(self.closed_error());
        }
        let mut conns = lock(&self.conns);
        let Some(i) = conns.iter().position(|c| Arc::ptr_eq(c, dead)) else {
            return Ok(());
        };
        let n = handshake::negotiate(
            &self.target(),
            &self.export,
            Contexts::Wanted(&[BASE_ALLOCATION]),
        )?;
        if n.info.size != self.size {
            return Err(Error::new(
                ErrorKind::CapacityMismatch,
                format!(
                    "{}: the export is {} bytes after reconnecting, {} before",
                    self.uri, n.info.size, self.size
                ),
            ));
        }
        let c = Conn::start(n, bounds(&self.opts))?;
        let old = std::mem::replace(&mut conns[i], c);
        drop(conns);
        let _ = old.close();
        tracing::info!("{}: reconnected", self.uri);
        Ok(())
    }

    /// One read request of at most the maximum piece, aligned (its data into
    /// `sink` if given); retried once on a new connection if its connection is
    /// lost.
    fn read_piece(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        retried: bool,
        sink: Option<SinkAt>,
        done: ReadDone,
    ) {
        let conn = match self.pick() {
            Ok(c) => c,
            Err(e) => return done(Err(e)),
        };
        let inner = Arc::clone(self);
        let c = Arc::clone(&conn);
        let again = sink.clone();
        let completion: Completion = Box::new(move |r: Result<Answer>| match r {
            Err(e) if e.kind() == ErrorKind::ConnectionLost && !retried => {
                match inner.replace(&c) {
                    Ok(()) => inner.read_piece(offset, len, true, again, done),
                    Err(re) => done(Err(e.within(format!("(reconnecting failed: {re})")))),
                }
            }
            r => done(r.map(|a| a.data)),
        });
        match sink {
            Some(s) => conn.submit_read_into(offset, len, s, completion),
            None => conn.submit(cmd::READ, 0, offset, len, &[], completion),
        }
    }

    fn read_async_into(
        self: &Arc<Self>,
        offset: u64,
        len: usize,
        sink: Arc<dyn ReadSink>,
        done: WriteDone,
    ) {
        let len64 = len as u64;
        if let Err(e) = self.check_range(offset, len64, "read") {
            return done(Err(e));
        }
        if len == 0 {
            return done(Ok(()));
        }
        let min = u64::from(self.sizes.0);
        if !offset.is_multiple_of(min) || !len64.is_multiple_of(min) {
            // Widened to whole blocks in a buffer of ours, then copied.
            return self.read_async(
                offset,
                len,
                Box::new(move |r| {
                    done(r.and_then(|d| {
                        sink.with_slice(0, len, &mut |b| {
                            b.copy_from_slice(&d);
                            Ok(())
                        })
                        .map_err(|e| Error::new(ErrorKind::InvalidArgument, e.to_string()))
                    }))
                }),
            );
        }
        let piece = self.max_piece();
        let n = len64.div_ceil(piece) as usize;
        struct State {
            left: usize,
            error: Option<Error>,
            done: Option<WriteDone>,
        }
        let st = Arc::new(Mutex::new(State {
            left: n,
            error: None,
            done: Some(done),
        }));
        for i in 0..n {
            let at = i as u64 * piece;
            let st = Arc::clone(&st);
            let target = SinkAt {
                sink: Arc::clone(&sink),
                at: at as usize,
            };
            self.read_piece(
                offset + at,
                piece.min(len64 - at),
                false,
                Some(target),
                Box::new(move |r| {
                    let mut s = lock(&st);
                    if let Err(e) = r {
                        s.error.get_or_insert(e);
                    }
                    s.left -= 1;
                    if s.left == 0 {
                        let d = s.done.take();
                        let r = s.error.take().map_or(Ok(()), Err);
                        drop(s);
                        if let Some(d) = d {
                            d(r);
                        }
                    }
                }),
            );
        }
    }

    fn read_async(self: &Arc<Self>, offset: u64, len: usize, done: ReadDone) {
        let len64 = len as u64;
        if let Err(e) = self.check_range(offset, len64, "read") {
            return done(Err(e));
        }
        if len == 0 {
            return done(Ok(Vec::new()));
        }
        // Aligned to the minimum block.
        let min = u64::from(self.sizes.0);
        let start = offset / min * min;
        let end = (offset + len64).div_ceil(min) * min;
        let end = end.min(self.size.max(start));
        let piece = self.max_piece();
        if end - start <= piece {
            let skip = (offset - start) as usize;
            self.read_piece(
                start,
                end - start,
                false,
                None,
                Box::new(move |r| {
                    done(r.map(|mut d| {
                        if skip > 0 || d.len() != len {
                            d.drain(..skip);
                            d.truncate(len);
                        }
                        d
                    }))
                }),
            );
            return;
        }
        // Several pieces, put together as they come.
        struct Gather {
            buf: Vec<u8>,
            left: usize,
            error: Option<Error>,
            done: Option<ReadDone>,
        }
        let n = (end - start).div_ceil(piece) as usize;
        let g = Arc::new(Mutex::new(Gather {
            buf: vec![0u8; len],
            left: n,
            error: None,
            done: Some(done),
        }));
        for i in 0..n {
            let p_off = start + i as u64 * piece;
            let p_len = piece.min(end - p_off);
            let g = Arc::clone(&g);
            self.read_piece(
                p_off,
                p_len,
                false,
                None,
                Box::new(move |r| {
                    let mut g = lock(&g);
                    match r {
                        Ok(d) => {
                            // The overlap of [p_off, p_off+p_len) with the request.
                            let from = p_off.max(offset);
                            let to = (p_off + p_len).min(offset + len64);
                            if from < to {
                                let src = &d[(from - p_off) as usize..(to - p_off) as usize];
                                let at = (from - offset) as usize;
                                g.buf[at..at + src.len()].copy_from_slice(src);
                            }
                        }
                        Err(e) => {
                            g.error.get_or_insert(e);
                        }
                    }
                    g.left -= 1;
                    if g.left == 0 {
                        let d = g.done.take();
                        let r = match g.error.take() {
                            Some(e) => Err(e),
                            None => Ok(std::mem::take(&mut g.buf)),
                        };
                        drop(g);
                        if let Some(d) = d {
                            d(r);
                        }
                    }
                }),
            );
        }
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                format!(
                    "{}: {}",
                    self.uri,
                    if self.flags & tflag::READ_ONLY != 0 {
                        "the export is read-only"
                    } else {
                        "opened read-only"
                    }
                ),
            ));
        }
        self.check_range(offset, len, "write")
    }

    /// A write made whole blocks of the server's minimum size: the partial blocks
    /// at either end are read and patched (not atomic against another writer of
    /// the same blocks). Aligned writes come back as they are.
    fn align_write<'a>(
        self: &Arc<Self>,
        offset: u64,
        data: &'a [u8],
    ) -> Result<(u64, std::borrow::Cow<'a, [u8]>)> {
        let min = u64::from(self.sizes.0);
        let end = offset + data.len() as u64;
        if min <= 1 || (offset.is_multiple_of(min) && end.is_multiple_of(min)) {
            return Ok((offset, std::borrow::Cow::Borrowed(data)));
        }
        let start = offset / min * min;
        let stop = end.div_ceil(min) * min;
        let mut buf = vec![0u8; (stop - start) as usize];
        let read_block = |at: u64, into: &mut [u8]| -> Result<()> {
            let (tx, rx) = mpsc::channel();
            self.read_async(
                at,
                min as usize,
                Box::new(move |r| {
                    let _ = tx.send(r);
                }),
            );
            let d = rx.recv().map_err(|_| {
                Error::new(ErrorKind::ConnectionLost, "a request's completion was lost")
            })??;
            into.copy_from_slice(&d);
            Ok(())
        };
        let head = start < offset;
        if head {
            read_block(start, &mut buf[..min as usize])?;
        }
        // The last block, unless it is the first and already read.
        if stop > end && !(head && stop - min == start) {
            let at = (stop - min - start) as usize;
            read_block(stop - min, &mut buf[at..])?;
        }
        let at = (offset - start) as usize;
        buf[at..at + data.len()].copy_from_slice(data);
        Ok((start, std::borrow::Cow::Owned(buf)))
    }

    /// Sends the pieces of a write (each waits for room); `each(i, result)` runs
    /// once per piece. Returns the number of pieces.
    fn write_pieces(
        self: &Arc<Self>,
        offset: u64,
        data: &[u8],
        fua: bool,
        each: impl Fn(usize, Result<()>) + Send + Sync + 'static,
    ) -> usize {
        let piece = self.max_piece() as usize;
        let flags = if fua && self.flags & tflag::SEND_FUA != 0 {
            cflag::FUA
        } else {
            0
        };
        let each = Arc::new(each);
        let n = data.len().div_ceil(piece);
        for (i, chunk) in data.chunks(piece).enumerate() {
            let each = Arc::clone(&each);
            let c: Completion = Box::new(move |r: Result<Answer>| each(i, r.map(|_| ())));
            match self.pick() {
                Ok(conn) => conn.submit(
                    cmd::WRITE,
                    flags,
                    offset + (i * piece) as u64,
                    chunk.len() as u64,
                    chunk,
                    c,
                ),
                Err(e) => c(Err(e)),
            }
        }
        n
    }

    fn write_async(self: &Arc<Self>, offset: u64, data: Vec<u8>, fua: bool, done: WriteDone) {
        if let Err(e) = self.check_write(offset, data.len() as u64) {
            return done(Err(e));
        }
        if data.is_empty() {
            return done(Ok(()));
        }
        let (offset, data) = match self.align_write(offset, &data) {
            Ok((o, d)) => (o, d.into_owned()),
            Err(e) => return done(Err(e)),
        };
        struct State {
            left: usize,
            error: Option<Error>,
            done: Option<WriteDone>,
        }
        let n = data.len().div_ceil(self.max_piece() as usize);
        let st = Arc::new(Mutex::new(State {
            left: n,
            error: None,
            done: Some(done),
        }));
        self.write_pieces(offset, &data, fua, move |_, r| {
            let mut s = lock(&st);
            if let Err(e) = r {
                s.error.get_or_insert(e);
            }
            s.left -= 1;
            if s.left == 0 {
                let d = s.done.take();
                let r = s.error.take().map_or(Ok(()), Err);
                drop(s);
                if let Some(d) = d {
                    d(r);
                }
            }
        });
    }

    fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let conns: Vec<Arc<Conn>> = lock(&self.conns).drain(..).collect();
        let changed: Vec<Arc<Conn>> = lock(&self.changed).drain().map(|(_, c)| c).collect();
        let mut first = Ok(());
        for c in conns.iter().chain(changed.iter()) {
            if let Err(e) = c.close() {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }

    /// Walks context `ctx` (id `id` on `conn`) over `[offset, offset+len)` in
    /// windows: `f(offset, length, flags)` for each extent, in order, covering the
    /// range without gaps.
    fn walk_status(
        &self,
        conn: &Conn,
        id: u32,
        offset: u64,
        len: u64,
        f: &mut dyn FnMut(u64, u64, u64) -> Result<()>,
    ) -> Result<()> {
        let min = u64::from(self.sizes.0).max(1);
        let window_max = ((1u64 << 32) - min.max(512)) / min * min;
        let end = offset + len;
        // Everything before `done` is reported.
        let mut done = offset;
        let mut start = offset / min * min;
        while done < end {
            let window = window_max
                .min(self.size - start)
                .min(end.div_ceil(min) * min - start);
            let a = conn.call(cmd::BLOCK_STATUS, 0, start, window, &[])?;
            let extents = a
                .status
                .iter()
                .find(|s| s.0 == id)
                .map(|s| s.1.as_slice())
                .unwrap_or(&[]);
            let mut at = start;
            for e in extents {
                let e_end = at.saturating_add(e.len).min(start + window);
                if e_end <= at {
                    break;
                }
                let from = at.max(done);
                let to = e_end.min(end);
                if from < to {
                    f(from, to - from, e.flags)?;
                    done = to;
                }
                at = e_end;
            }
            // The next window starts where the answer ended, rounded down to the
            // minimum block.
            let next = at / min * min;
            if next <= start {
                // No progress (an answer shorter than a block): the block as data.
                let to = (start + min).min(end);
                if done < to {
                    f(done, to - done, 0)?;
                    done = to;
                }
                start += min;
            } else {
                start = next;
            }
        }
        Ok(())
    }

    /// A connection with changed-blocks context `ctx` selected (cached).
    fn changed_conn(&self, ctx: &str) -> Result<Arc<Conn>> {
        let mut cache = lock(&self.changed);
        if let Some(c) = cache.get(ctx).filter(|c| !c.is_dead()) {
            return Ok(Arc::clone(c));
        }
        let n = handshake::negotiate(&self.target(), &self.export, Contexts::Required(ctx))?;
        let c = Conn::start(n, bounds(&self.opts))?;
        if let Some(old) = cache.insert(ctx.to_string(), Arc::clone(&c)) {
            let _ = old.close();
        }
        Ok(c)
    }

    fn clip(&self, offset: u64, len: u64) -> (u64, u64) {
        let offset = offset.min(self.size);
        (offset, len.min(self.size - offset))
    }
}

impl VirtualDisk for RemoteDisk {
    fn capacity(&self) -> u64 {
        self.inner.size
    }

    fn is_writable(&self) -> bool {
        self.inner.writable
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let inner = &self.inner;
        inner.check_range(offset, buf.len() as u64, "read")?;
        if buf.is_empty() {
            return Ok(());
        }
        let piece = inner.max_piece() as usize;
        let n = buf.len().div_ceil(piece);
        let (tx, rx) = mpsc::channel();
        for i in 0..n {
            let len = piece.min(buf.len() - i * piece);
            let tx = tx.clone();
            inner.read_async(
                offset + (i * piece) as u64,
                len,
                Box::new(move |r| {
                    let _ = tx.send((i, r));
                }),
            );
        }
        drop(tx);
        gather(&rx, n, |i, d: Vec<u8>| {
            let at = i * piece;
            buf[at..at + d.len()].copy_from_slice(&d);
        })
    }

    fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        let inner = &self.inner;
        inner.check_write(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let (offset, data) = inner.align_write(offset, data)?;
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let n = inner.write_pieces(offset, &data, false, move |i, r| {
            let _ = lock(&tx).send((i, r));
        });
        gather(&rx, n, |_, ()| {})
    }

    fn write_zeroes(&self, offset: u64, len: u64, only_if_cheap: bool) -> Result<()> {
        let inner = &self.inner;
        inner.check_write(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let f = inner.flags;
        if f & tflag::SEND_WRITE_ZEROES == 0 {
            if only_if_cheap {
                return Err(Error::new(
                    ErrorKind::NotSupported,
                    format!("{}: the server has no WRITE_ZEROES", inner.uri),
                ));
            }
            let piece = (inner.max_piece()).min(len) as usize;
            let zeros = vec![0u8; piece];
            let mut at = 0;
            while at < len {
                let n = (len - at).min(piece as u64) as usize;
                self.write_at(&zeros[..n], offset + at)?;
                at += n as u64;
            }
            return Ok(());
        }
        // Partial blocks at the ends are written as zeros.
        let min = u64::from(inner.sizes.0);
        let (a, b) = (offset.div_ceil(min) * min, (offset + len) / min * min);
        if min > 1 && (a != offset || b != offset + len) {
            if only_if_cheap || a >= b {
                if only_if_cheap {
                    return Err(Error::new(
                        ErrorKind::NotSupported,
                        format!("{}: zeroing partial blocks is not cheap", inner.uri),
                    ));
                }
                return self.write_at(&vec![0u8; len as usize], offset);
            }
            if a > offset {
                self.write_at(&vec![0u8; (a - offset) as usize], offset)?;
            }
            if b < offset + len {
                self.write_at(&vec![0u8; (offset + len - b) as usize], b)?;
            }
            return self.write_zeroes(a, b - a, false);
        }
        let mut flags = 0;
        if only_if_cheap {
            if f & tflag::SEND_FAST_ZERO == 0 {
                return Err(Error::new(
                    ErrorKind::NotSupported,
                    format!("{}: the server has no FAST_ZERO", inner.uri),
                ));
            }
            flags |= cflag::FAST_ZERO;
        }
        // Effect lengths may exceed the maximum block; keep each within a u32.
        let piece = (1u64 << 30) / min * min;
        let n = len.div_ceil(piece) as usize;
        let (tx, rx) = mpsc::channel();
        for i in 0..n {
            let o = offset + i as u64 * piece;
            let l = piece.min(offset + len - o);
            let tx = tx.clone();
            let c: Completion = Box::new(move |r| {
                let _ = tx.send((i, r.map(|_| ())));
            });
            match inner.pick() {
                Ok(conn) => conn.submit(cmd::WRITE_ZEROES, flags, o, l, &[], c),
                Err(e) => c(Err(e)),
            }
        }
        drop(tx);
        gather(&rx, n, |_, ()| {})
    }

    fn flush(&self) -> Result<()> {
        let inner = &self.inner;
        let conns: Vec<Arc<Conn>> = lock(&inner.conns).clone();
        for c in &conns {
            c.wait_idle(true);
        }
        if !inner.writable || inner.flags & tflag::SEND_FLUSH == 0 {
            return Ok(());
        }
        if inner.flags & tflag::CAN_MULTI_CONN != 0 {
            inner.pick()?.call(cmd::FLUSH, 0, 0, 0, &[])?;
        } else {
            for c in &conns {
                c.call(cmd::FLUSH, 0, 0, 0, &[])?;
            }
        }
        Ok(())
    }

    fn grain_bytes(&self) -> u64 {
        u64::from(self.inner.sizes.1)
    }

    fn for_each_range(
        &self,
        offset: u64,
        len: u64,
        f: &mut dyn FnMut(MapRange) -> Result<()>,
    ) -> Result<()> {
        let inner = &self.inner;
        let (offset, len) = inner.clip(offset, len);
        if len == 0 {
            return Ok(());
        }
        if !inner.allocation {
            return f(MapRange {
                offset,
                length: len,
                kind: RangeKind::Data,
                depth: 0,
            });
        }
        let conn = inner.pick()?;
        let id = conn.info.context_id(BASE_ALLOCATION).ok_or_else(|| {
            Error::new(
                ErrorKind::NotSupported,
                format!("{}: base:allocation not selected", inner.uri),
            )
        })?;
        let mut cur: Option<MapRange> = None;
        inner.walk_status(&conn, id, offset, len, &mut |o, l, flags| {
            let flags = flags as u32;
            let kind = if flags & (STATE_HOLE | STATE_ZERO) == STATE_HOLE | STATE_ZERO {
                RangeKind::Unallocated
            } else if flags & STATE_ZERO != 0 {
                RangeKind::Zero
            } else {
                RangeKind::Data
            };
            match &mut cur {
                Some(c) if c.kind == kind && c.offset + c.length == o => c.length += l,
                _ => {
                    if let Some(c) = cur.take() {
                        f(c)?;
                    }
                    cur = Some(MapRange {
                        offset: o,
                        length: l,
                        kind,
                        depth: 0,
                    });
                }
            }
            Ok(())
        })?;
        if let Some(c) = cur {
            f(c)?;
        }
        Ok(())
    }

    fn change_id(&self) -> Result<String> {
        let inner = &self.inner;
        let names = handshake::list_contexts(&inner.target(), &inner.export, &[CHANGED_PREFIX])?;
        names
            .iter()
            .find_map(|n| n.strip_prefix(CHANGED_PREFIX))
            .filter(|id| !id.is_empty())
            .map(str::to_string)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::NotSupported,
                    format!(
                        "{}: the server lists no {CHANGED_PREFIX}<ID> context (no change \
                         tracking on this export)",
                        inner.uri
                    ),
                )
            })
    }

    fn for_each_changed_area(
        &self,
        since: &str,
        offset: u64,
        len: u64,
        f: &mut dyn FnMut(u64, u64) -> Result<()>,
    ) -> Result<()> {
        let inner = &self.inner;
        let (offset, len) = inner.clip(offset, len);
        let mut cur: Option<(u64, u64)> = None;
        let mut add = |o: u64, l: u64, f: &mut dyn FnMut(u64, u64) -> Result<()>| -> Result<()> {
            match &mut cur {
                Some((co, cl)) if *co + *cl == o => *cl += l,
                _ => {
                    if let Some((co, cl)) = cur.take() {
                        f(co, cl)?;
                    }
                    cur = Some((o, l));
                }
            }
            Ok(())
        };
        if since == "*" {
            self.for_each_range(offset, len, &mut |r| {
                if r.kind == RangeKind::Data {
                    add(r.offset, r.length, f)?;
                }
                Ok(())
            })?;
        } else {
            if len == 0 {
                return Ok(());
            }
            let ctx = if since.starts_with(QEMU_DIRTY_BITMAP) {
                since.to_string()
            } else {
                format!("{CHANGED_PREFIX}{since}")
            };
            let conn = inner.changed_conn(&ctx)?;
            let id = conn.info.context_id(&ctx).ok_or_else(|| {
                Error::new(ErrorKind::ChangeIdRefused, format!("{ctx} not selected"))
            })?;
            inner.walk_status(&conn, id, offset, len, &mut |o, l, flags| {
                if flags & 1 != 0 {
                    add(o, l, f)?;
                }
                Ok(())
            })?;
        }
        if let Some((o, l)) = cur {
            f(o, l)?;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        self.inner.uri.clone()
    }
}
