//! One connection in transmission.
//!
//! Threads that submit requests take a cookie, put the request in the table of
//! requests in flight, and send it (header and data in one write, under the writer
//! lock). One reader thread per connection reads the replies through
//! [`ReplyChecker`] - which takes each request out of the shared table while its
//! chunk is read, read data going straight into the request's buffer - and runs the
//! request's completion. Requests and bytes in flight are bounded: a submitter
//! waits for room (a reader thread never waits: a completion may submit).
//!
//! **Failure.** Whatever ends the connection - the server closing or resetting it,
//! a protocol violation, a failed send, or a request unanswered for the request
//! timeout - marks it dead, shuts the socket down and fails every request in the
//! table with [`ErrorKind::ConnectionLost`]; a request submitted afterwards fails at
//! once. Every completion runs exactly once: a completion dropped without running
//! (which no path should do) still reports the loss.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vdisk::{Error, ErrorKind, Result};

use super::errno_error;
use super::handshake::Negotiated;
use crate::replies::{ClientError, Pending, PendingTable, Reply, ReplyChecker, SinkAt};
use crate::testing::ExportInfo;
use crate::tls::TlsWriter;
use crate::transport::{Socket, Transport};
use crate::wire::{self, cflag, cmd, Extent, Request};

/// How long a closing connection waits for the server to end it after `DISC`.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

thread_local! {
    /// Set on reader threads: their completions may submit, and must not wait.
    static IN_READER: Cell<bool> = const { Cell::new(false) };
}

/// What a request's completion gets: read data or block status extents.
#[derive(Debug, Default)]
pub struct Answer {
    /// A read's data.
    pub data: Vec<u8>,
    /// Block status: (context id, extents).
    pub status: Vec<(u32, Vec<Extent>)>,
}

/// A request's completion.
pub type Completion = Box<dyn FnOnce(Result<Answer>) + Send>;

/// What the table keeps with a request.
pub struct Op {
    done: Option<Completion>,
    cost: u64,
    writes: bool,
}

impl Op {
    fn finish(mut self, r: Result<Answer>) {
        if let Some(d) = self.done.take() {
            d(r);
        }
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        if let Some(d) = self.done.take() {
            d(Err(Error::new(
                ErrorKind::ConnectionLost,
                "the request was dropped with its connection",
            )));
        }
    }
}

/// The negotiated facts of a connection.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// What `GO`/`EXPORT_NAME` said.
    pub export: ExportInfo,
    /// Structured replies (or extended headers).
    pub structured: bool,
    /// Extended headers.
    pub extended: bool,
    /// Selected contexts: (id, name).
    pub contexts: Vec<(u32, String)>,
    /// Under TLS.
    pub tls: bool,
}

impl ConnInfo {
    /// The id of context `name`, if selected.
    pub fn context_id(&self, name: &str) -> Option<u32> {
        self.contexts.iter().find(|c| c.1 == name).map(|c| c.0)
    }
}

/// Per-connection bounds.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// Requests in flight.
    pub max_in_flight: usize,
    /// Bytes in flight.
    pub max_bytes: u64,
    /// A request unanswered this long fails the connection.
    pub request_timeout: Duration,
}

#[derive(Default)]
struct State {
    next_cookie: u64,
    in_flight: usize,
    bytes: u64,
    writes: usize,
    /// Cookie -> when sent (cookies grow, so the first is the oldest).
    sent: BTreeMap<u64, Instant>,
    dead: Option<String>,
    closing: Option<Instant>,
}

enum Writer {
    Plain(Socket),
    Tls(TlsWriter),
}

impl Writer {
    fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        match self {
            Writer::Plain(s) => s.write_all(b),
            Writer::Tls(t) => t.write_all(b),
        }
    }
}

/// A connection in transmission.
pub struct Conn {
    /// What was negotiated.
    pub info: ConnInfo,
    bounds: Bounds,
    writer: Mutex<Option<Writer>>,
    table: Mutex<HashMap<u64, Pending<Op>>>,
    state: Mutex<State>,
    cond: Condvar,
    /// A handle to the socket: shutdowns and timeouts.
    ctl: Socket,
    reader: Mutex<Option<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in a completion never holds these locks; keep going regardless.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The table behind its mutex, locked only for each take and put.
struct Shared<'a>(&'a Mutex<HashMap<u64, Pending<Op>>>);

impl PendingTable<Op> for Shared<'_> {
    fn take(&mut self, cookie: u64) -> Option<Pending<Op>> {
        lock(self.0).remove(&cookie)
    }

    fn put(&mut self, p: Pending<Op>) {
        lock(self.0).insert(p.req.cookie, p);
    }
}

/// The reading side, which waits in short ticks so that it can notice a request
/// unanswered for too long, or a close taking too long, without losing its place
/// in a message.
struct Watch<'a> {
    inner: Box<dyn Read + Send>,
    conn: &'a Conn,
}

impl Read for Watch<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.inner.read(buf) {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    let st = lock(&self.conn.state);
                    if let Some(why) = &st.dead {
                        return Err(io::Error::other(why.clone()));
                    }
                    if st.closing.is_some_and(|t| t.elapsed() > CLOSE_WAIT) {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the server did not end the connection after DISC",
                        ));
                    }
                    let limit = self.conn.bounds.request_timeout;
                    if let Some((cookie, t)) = st.sent.first_key_value() {
                        if t.elapsed() > limit {
                            return Err(io::Error::new(
                                io::ErrorKind::TimedOut,
                                format!("request {cookie} unanswered for {limit:?}"),
                            ));
                        }
                    }
                }
                r => return r,
            }
        }
    }
}

impl Conn {
    /// Starts transmission on a negotiated connection: its reader thread runs
    /// until the connection ends.
    pub fn start(n: Negotiated, bounds: Bounds) -> Result<Arc<Conn>> {
        let io_err =
            |e: io::Error| Error::new(ErrorKind::ConnectionLost, format!("NBD socket: {e}"));
        let tick = (bounds.request_timeout / 4)
            .clamp(Duration::from_millis(10), Duration::from_millis(500));
        let (reader, writer, ctl): (Box<dyn Read + Send>, Writer, Socket) = match n.transport {
            Transport::Plain(s) => {
                let ctl = s.try_clone().map_err(io_err)?;
                (
                    Box::new(s.try_clone().map_err(io_err)?),
                    Writer::Plain(s),
                    ctl,
                )
            }
            Transport::Tls(t) => {
                let ctl = t.socket().try_clone().map_err(io_err)?;
                let (r, w) = t.split();
                (Box::new(r), Writer::Tls(w), ctl)
            }
        };
        ctl.set_read_timeout(Some(tick)).map_err(io_err)?;
        ctl.set_write_timeout(Some(bounds.request_timeout))
            .map_err(io_err)?;
        let conn = Arc::new(Conn {
            info: ConnInfo {
                export: n.info,
                structured: n.structured,
                extended: n.extended,
                contexts: n.contexts,
                tls: n.tls,
            },
            bounds,
            writer: Mutex::new(Some(writer)),
            table: Mutex::new(HashMap::new()),
            state: Mutex::new(State {
                next_cookie: 1,
                ..State::default()
            }),
            cond: Condvar::new(),
            ctl,
            reader: Mutex::new(None),
        });
        let c = Arc::clone(&conn);
        let handle = std::thread::Builder::new()
            .name("nbd-client-reader".into())
            .spawn(move || c.read_replies(reader))
            .map_err(|e| Error::new(ErrorKind::OutOfMemory, format!("a reader thread: {e}")))?;
        *lock(&conn.reader) = Some(handle);
        Ok(conn)
    }

    fn read_replies(self: Arc<Conn>, reader: Box<dyn Read + Send>) {
        IN_READER.with(|r| r.set(true));
        let checker = ReplyChecker::new(
            self.info.structured,
            self.info.extended,
            self.info.contexts.iter().map(|c| c.0).collect(),
        );
        let mut watch = Watch {
            inner: reader,
            conn: &self,
        };
        loop {
            match checker.next(&mut watch, &mut Shared(&self.table)) {
                Ok(Some(reply)) => self.complete(reply),
                Ok(None) => {
                    let closing = lock(&self.state).closing.is_some();
                    self.fail(if closing {
                        "the connection was closed".to_string()
                    } else {
                        "the server closed the connection".to_string()
                    });
                    break;
                }
                Err(e) => {
                    let m = match &e {
                        ClientError::Io(io) if io.kind() == io::ErrorKind::TimedOut => {
                            io.to_string()
                        }
                        e if e.is_closed() => format!("the connection was closed or reset ({e})"),
                        e => e.to_string(),
                    };
                    self.fail(m);
                    break;
                }
            }
        }
    }

    /// Whether the connection is dead.
    pub fn is_dead(&self) -> bool {
        lock(&self.state).dead.is_some()
    }

    /// Ends the connection: every request in flight fails with `why`.
    pub fn fail(&self, why: String) {
        {
            let mut st = lock(&self.state);
            if st.dead.is_none() {
                st.dead = Some(why);
            }
            st.in_flight = 0;
            st.bytes = 0;
            st.writes = 0;
            st.sent.clear();
        }
        self.cond.notify_all();
        let _ = self.ctl.shutdown(Shutdown::Both);
        let why = lock(&self.state).dead.clone().unwrap_or_default();
        let drained: Vec<Pending<Op>> = lock(&self.table).drain().map(|(_, p)| p).collect();
        for p in drained {
            let what = describe(&p.req);
            p.tag.finish(Err(Error::new(
                ErrorKind::ConnectionLost,
                format!("{what}: connection to the NBD server lost: {why}"),
            )));
        }
    }

    fn complete(&self, reply: Reply<Op>) {
        let Reply {
            request,
            error,
            message,
            data,
            status,
            tag,
        } = reply;
        {
            let mut st = lock(&self.state);
            if st.sent.remove(&request.cookie).is_some() {
                st.in_flight -= 1;
                st.bytes -= tag.cost;
                if tag.writes {
                    st.writes -= 1;
                }
            }
        }
        self.cond.notify_all();
        let r = if error != 0 {
            Err(errno_error(
                error,
                tag.writes,
                &describe(&request),
                &message,
            ))
        } else {
            Ok(Answer { data, status })
        };
        tag.finish(r);
    }

    /// Sends a request; `done` runs once with its answer (on the reader thread, or
    /// on this one if the connection is dead). `cost`: bytes it holds in flight.
    /// Waits while the connection is full (not on a reader thread).
    pub fn submit(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u64,
        payload: &[u8],
        done: Completion,
    ) {
        self.submit_with(command, flags, offset, len, payload, None, done);
    }

    /// Sends a read whose data goes straight into `sink` (the answer's `data` is
    /// empty), as [`Conn::submit`] does otherwise.
    pub fn submit_read_into(&self, offset: u64, len: u64, sink: SinkAt, done: Completion) {
        self.submit_with(cmd::READ, 0, offset, len, &[], Some(sink), done);
    }

    #[allow(clippy::too_many_arguments)]
    fn submit_with(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u64,
        payload: &[u8],
        sink: Option<SinkAt>,
        done: Completion,
    ) {
        let writes = matches!(command, cmd::WRITE | cmd::WRITE_ZEROES | cmd::TRIM);
        let cost = if matches!(command, cmd::READ | cmd::WRITE) {
            len
        } else {
            0
        };
        let op = Op {
            done: Some(done),
            cost,
            writes,
        };
        let in_reader = IN_READER.with(|r| r.get());
        let mut st = lock(&self.state);
        loop {
            if let Some(why) = &st.dead {
                let why = why.clone();
                drop(st);
                let what = describe(&Request {
                    flags,
                    command,
                    cookie: 0,
                    offset,
                    len,
                });
                op.finish(Err(Error::new(
                    ErrorKind::ConnectionLost,
                    format!("{what}: connection to the NBD server lost: {why}"),
                )));
                return;
            }
            if st.closing.is_some() {
                drop(st);
                op.finish(Err(Error::new(
                    ErrorKind::InvalidArgument,
                    "the NBD connection is being closed",
                )));
                return;
            }
            let room = st.in_flight < self.bounds.max_in_flight
                && (st.in_flight == 0 || st.bytes + cost <= self.bounds.max_bytes);
            if room || in_reader {
                break;
            }
            st = self.cond.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        let cookie = st.next_cookie;
        st.next_cookie += 1;
        st.in_flight += 1;
        st.bytes += cost;
        if writes {
            st.writes += 1;
        }
        st.sent.insert(cookie, Instant::now());
        let req = Request {
            flags: if command == cmd::WRITE && self.info.extended {
                flags | cflag::PAYLOAD_LEN
            } else {
                flags
            },
            command,
            cookie,
            offset,
            len,
        };
        // In the table before the state lock goes: a failure drains it after
        // marking the connection dead under that lock.
        let pending = Pending::new(req, op);
        let pending = match sink {
            Some(s) => pending.with_sink(s),
            None => pending,
        };
        lock(&self.table).insert(cookie, pending);
        drop(st);
        let mut b = wire::request(&req, self.info.extended);
        b.extend_from_slice(payload);
        let sent = match lock(&self.writer).as_mut() {
            Some(w) => w.write_all(&b),
            None => Err(io::Error::other("the connection is closed")),
        };
        if let Err(e) = sent {
            self.fail(format!("sending {} failed: {e}", describe(&req)));
        }
    }

    /// Sends a request and waits for its answer.
    pub fn call(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) -> Result<Answer> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.submit(
            command,
            flags,
            offset,
            len,
            payload,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.recv().unwrap_or_else(|_| {
            Err(Error::new(
                ErrorKind::ConnectionLost,
                "the request's completion was lost",
            ))
        })
    }

    /// Waits until no request (with `writes_only`: no write) is in flight, or the
    /// connection is dead.
    pub fn wait_idle(&self, writes_only: bool) {
        let mut st = lock(&self.state);
        while st.dead.is_none()
            && if writes_only {
                st.writes > 0
            } else {
                st.in_flight > 0
            }
        {
            st = self.cond.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Waits for the requests in flight, sends `DISC` (and, under TLS,
    /// `close_notify`), and waits for the reader thread to see the end (at most a
    /// few seconds).
    pub fn close(&self) -> Result<()> {
        self.wait_idle(false);
        let earlier = {
            let mut st = lock(&self.state);
            st.closing = Some(Instant::now());
            st.dead.clone()
        };
        if earlier.is_none() {
            let req = Request {
                flags: 0,
                command: cmd::DISC,
                cookie: 0,
                offset: 0,
                len: 0,
            };
            let b = wire::request(&req, self.info.extended);
            if let Some(mut w) = lock(&self.writer).take() {
                let _ = w.write_all(&b);
                if let Writer::Tls(t) = &mut w {
                    let _ = t.send_close_notify();
                }
                let _ = self.ctl.shutdown(Shutdown::Write);
            }
        } else {
            lock(&self.writer).take();
        }
        let handle = lock(&self.reader).take();
        if let Some(h) = handle {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
        let _ = self.ctl.shutdown(Shutdown::Both);
        // A connection lost earlier has already failed its requests.
        Ok(())
    }
}

/// A request for messages: `READ 4096+512`.
fn describe(r: &Request) -> String {
    let name = match r.command {
        cmd::READ => "READ",
        cmd::WRITE => "WRITE",
        cmd::FLUSH => "FLUSH",
        cmd::TRIM => "TRIM",
        cmd::CACHE => "CACHE",
        cmd::WRITE_ZEROES => "WRITE_ZEROES",
        cmd::BLOCK_STATUS => "BLOCK_STATUS",
        _ => "request",
    };
    format!("NBD {name} {}+{}", r.offset, r.len)
}
