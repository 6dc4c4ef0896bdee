//! A strict, blocking NBD client for tests and for the fuzzing oracle. It speaks the
//! protocol by hand over any byte stream (so a test can also send what no client
//! should) and checks every message the server sends against the rules of the
//! specification (`shared/docs/nbd.md` §1) and the requests in flight: a message
//! that breaks one is a [`ClientError::Violation`]. Not a production client: no
//! TLS, no reconnection, no retries.
//!
//! * [`Handshake`]: the negotiation - greeting, options (each option's replies read
//!   up to its final one and checked), `GO` or `EXPORT_NAME`; it can also only
//!   *observe* a negotiation whose bytes another thread writes.
//! * [`ReplyReader`]: the transmission replies - simple, structured or extended -
//!   matched to the requests in flight by cookie and assembled (read data, block
//!   status extents, errors).
//! * [`Client`]: the two together, with requests built by [`crate::wire::request`].

use std::collections::HashMap;
use std::io::{self, Read, Write};

use crate::limits::{MAX_SELECTED_CONTEXTS, MAX_STRING_BYTES};
use crate::replies::{read_or_end, violation, wire_violation, Pending, ReplyChecker};
pub use crate::replies::{ClientError, Reply};
use crate::wire::{
    self, cflag, cmd, info, opt, rep, Request, CLIENT_NO_ZEROES, FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
};

/// Largest option reply data accepted.
const MAX_OPTION_REPLY: u32 = 1 << 20;
/// The options a server may know.
const KNOWN_OPTIONS: [u32; 10] = [
    opt::EXPORT_NAME,
    opt::ABORT,
    opt::LIST,
    opt::STARTTLS,
    opt::INFO,
    opt::GO,
    opt::STRUCTURED_REPLY,
    opt::LIST_META_CONTEXT,
    opt::SET_META_CONTEXT,
    opt::EXTENDED_HEADERS,
];

/// One option reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptionReply {
    /// The option it answers.
    pub option: u32,
    /// The reply type ([`rep`]).
    pub kind: u32,
    /// Its data.
    pub data: Vec<u8>,
}

impl OptionReply {
    /// Whether it is an error reply.
    pub fn is_error(&self) -> bool {
        self.kind & (1 << 31) != 0
    }

    /// Its data as text (an error's message).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// What `GO` (its `INFO` replies) or `EXPORT_NAME` told about the export.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Minimum, preferred and maximum block sizes, if sent.
    pub block_sizes: Option<(u32, u32, u32)>,
    /// The name, if sent.
    pub name: Option<String>,
    /// The description, if sent.
    pub description: Option<String>,
}

/// The negotiation as the client sees it.
#[derive(Debug)]
pub struct Handshake<S> {
    /// The stream.
    pub stream: S,
    /// The server's handshake flags.
    pub server_flags: u16,
    /// The client flags sent.
    pub client_flags: u32,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// Extended headers were negotiated.
    pub extended: bool,
    /// The contexts the last `SET_META_CONTEXT` selected: (id, name).
    pub contexts: Vec<(u32, String)>,
    /// The export they were selected for (`GO` to another gets none).
    pub selected_for: Option<String>,
}

impl<S: Read + Write> Handshake<S> {
    /// Reads the greeting and sends `client_flags`.
    pub fn start(stream: S, client_flags: u32) -> Result<Handshake<S>, ClientError> {
        let mut h = Handshake::observe(stream, client_flags)?;
        h.stream.write_all(&client_flags.to_be_bytes())?;
        Ok(h)
    }

    /// Sends an option (header and data) without reading its replies.
    pub fn send_option(&mut self, option: u32, data: &[u8]) -> Result<(), ClientError> {
        let mut b = wire::option_header(option, data.len() as u32).to_vec();
        b.extend_from_slice(data);
        self.stream.write_all(&b)?;
        Ok(())
    }

    /// Sends an option and reads its replies up to the final one.
    pub fn option(&mut self, option: u32, data: &[u8]) -> Result<Vec<OptionReply>, ClientError> {
        self.send_option(option, data)?;
        self.read_replies(option, data)
    }

    /// `STRUCTURED_REPLY` (true if accepted).
    pub fn structured_replies(&mut self) -> Result<bool, ClientError> {
        let r = self.option(opt::STRUCTURED_REPLY, &[])?;
        Ok(r.last().is_some_and(|r| r.kind == rep::ACK))
    }

    /// `EXTENDED_HEADERS` (true if accepted).
    pub fn extended_headers(&mut self) -> Result<bool, ClientError> {
        let r = self.option(opt::EXTENDED_HEADERS, &[])?;
        Ok(r.last().is_some_and(|r| r.kind == rep::ACK))
    }

    /// `SET_META_CONTEXT` for `export`: the contexts selected (refusals are errors).
    pub fn set_meta_context(
        &mut self,
        export: &str,
        queries: &[&str],
    ) -> Result<Vec<(u32, String)>, ClientError> {
        let r = self.option(opt::SET_META_CONTEXT, &wire::meta_request(export, queries))?;
        refusal(&r)?;
        Ok(self.contexts.clone())
    }

    /// `GO` for `name` asking for `items`; an error reply is [`ClientError::Refused`].
    pub fn go(&mut self, name: &str, items: &[u16]) -> Result<ExportInfo, ClientError> {
        self.info_or_go(opt::GO, name, items)
    }

    /// `INFO` for `name`.
    pub fn info(&mut self, name: &str, items: &[u16]) -> Result<ExportInfo, ClientError> {
        self.info_or_go(opt::INFO, name, items)
    }

    fn info_or_go(
        &mut self,
        option: u32,
        name: &str,
        items: &[u16],
    ) -> Result<ExportInfo, ClientError> {
        let replies = self.option(option, &wire::info_request(name, items))?;
        refusal(&replies)?;
        export_info(&replies)
    }

    /// `EXPORT_NAME`: the export's size and flags, or `Refused` (kind 0) when the
    /// server closes the connection.
    pub fn export_name(&mut self, name: &str) -> Result<ExportInfo, ClientError> {
        self.send_option(opt::EXPORT_NAME, name.as_bytes())?;
        self.read_export_name_reply()
    }

    /// The transmission phase, after a `GO` or `EXPORT_NAME` that succeeded.
    pub fn into_client(self, info: ExportInfo) -> Client<S> {
        let replies = ReplyReader::new(
            self.structured,
            self.extended,
            self.contexts.iter().map(|c| c.0).collect(),
        );
        Client {
            stream: self.stream,
            info,
            replies,
            next_cookie: 1,
        }
    }
}

impl<S: Read> Handshake<S> {
    /// Reads the greeting only: for a stream whose client bytes another thread
    /// writes (the fuzzing oracle).
    pub fn observe(mut stream: S, client_flags: u32) -> Result<Handshake<S>, ClientError> {
        let mut g = [0u8; 18];
        stream.read_exact(&mut g)?;
        let server_flags = wire::parse_greeting(&g).map_err(wire_violation)?;
        if server_flags & !(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) != 0 {
            return violation(format!("unknown handshake flags {server_flags:#x}"));
        }
        Ok(Handshake {
            stream,
            server_flags,
            client_flags,
            structured: false,
            extended: false,
            contexts: Vec::new(),
            selected_for: None,
        })
    }

    /// Reads the answer to an `EXPORT_NAME` someone sent.
    pub fn read_export_name_reply(&mut self) -> Result<ExportInfo, ClientError> {
        let mut b = [0u8; 10];
        match read_or_end(&mut self.stream, &mut b) {
            Ok(true) => {}
            Ok(false) => {
                return Err(ClientError::Refused {
                    kind: 0,
                    message: "the server closed the connection".into(),
                })
            }
            Err(e) => return Err(e.into()),
        }
        let no_zeroes =
            self.server_flags & FLAG_NO_ZEROES != 0 && self.client_flags & CLIENT_NO_ZEROES != 0;
        if !no_zeroes {
            let mut z = [0u8; 124];
            self.stream.read_exact(&mut z)?;
            if z.iter().any(|&b| b != 0) {
                return violation("the 124 bytes after the EXPORT_NAME answer are not zeros");
            }
        }
        Ok(ExportInfo {
            size: u64::from_be_bytes(b[0..8].try_into().unwrap_or_default()),
            flags: u16::from_be_bytes([b[8], b[9]]),
            ..ExportInfo::default()
        })
    }

    /// Reads and checks the replies to `option` (sent with `data`) up to the final
    /// one, and follows what they negotiate.
    pub fn read_replies(
        &mut self,
        option: u32,
        data: &[u8],
    ) -> Result<Vec<OptionReply>, ClientError> {
        if option == opt::SET_META_CONTEXT {
            // Replaced even when the option fails.
            self.contexts.clear();
            self.selected_for = None;
        }
        let mut replies: Vec<OptionReply> = Vec::new();
        loop {
            let mut hb = [0u8; 20];
            self.stream.read_exact(&mut hb)?;
            let h = wire::parse_option_reply_header(&hb).map_err(wire_violation)?;
            if h.option != option {
                return violation(format!(
                    "a reply to option {} where option {option} was asked",
                    h.option
                ));
            }
            if h.len > MAX_OPTION_REPLY {
                return violation(format!("an option reply of {} bytes", h.len));
            }
            let mut d = vec![0u8; h.len as usize];
            self.stream.read_exact(&mut d)?;
            let r = OptionReply {
                option,
                kind: h.kind,
                data: d,
            };
            self.check_reply(&r, data, &replies)?;
            let last = r.kind == rep::ACK || r.is_error();
            replies.push(r);
            if last {
                break;
            }
        }
        self.follow(option, data, &replies);
        Ok(replies)
    }

    /// One reply against the rules for `option`.
    fn check_reply(
        &self,
        r: &OptionReply,
        data: &[u8],
        earlier: &[OptionReply],
    ) -> Result<(), ClientError> {
        let option = r.option;
        let o = format!("option {option}");
        if r.is_error() {
            let code = r.kind & !(1 << 31);
            if !(1..=10).contains(&code) {
                return violation(format!("{o}: unknown error reply {:#x}", r.kind));
            }
            if r.data.len() as u64 > MAX_STRING_BYTES || std::str::from_utf8(&r.data).is_err() {
                return violation(format!("{o}: an error message that is no string"));
            }
            return Ok(());
        }
        // Successes the rules forbid.
        if !KNOWN_OPTIONS.contains(&option) || option == opt::EXPORT_NAME {
            return violation(format!(
                "{o} is unknown here and was not refused with ERR_UNSUP"
            ));
        }
        // (ABORT with data is still an ABORT: acknowledged.)
        let no_data = matches!(
            option,
            opt::LIST | opt::STARTTLS | opt::STRUCTURED_REPLY | opt::EXTENDED_HEADERS
        );
        if no_data && !data.is_empty() {
            return violation(format!("{o} with data was not refused"));
        }
        let meta = matches!(option, opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT);
        if meta && !self.structured {
            return violation(format!("{o} before structured replies was not refused"));
        }
        if option == opt::STRUCTURED_REPLY && self.extended {
            return violation("STRUCTURED_REPLY after extended headers was not refused");
        }
        match r.kind {
            rep::ACK => {
                if !r.data.is_empty() {
                    return violation(format!("{o}: an ACK with data"));
                }
                if matches!(option, opt::INFO | opt::GO) {
                    let exports = earlier
                        .iter()
                        .filter(|e| e.kind == rep::INFO && e.data.starts_with(&[0, 0]))
                        .count();
                    if exports != 1 {
                        return violation(format!(
                            "{o}: ACK after {exports} INFO_EXPORT replies (exactly one is due)"
                        ));
                    }
                }
            }
            rep::SERVER => {
                if option != opt::LIST {
                    return violation(format!("{o}: a SERVER reply"));
                }
                let n = r
                    .data
                    .get(..4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                match n {
                    Some(n)
                        if u64::from(n) <= MAX_STRING_BYTES && n as usize <= r.data.len() - 4 =>
                    {
                        if std::str::from_utf8(&r.data[4..]).is_err() {
                            return violation("a SERVER reply that is not UTF-8");
                        }
                    }
                    _ => return violation("a malformed SERVER reply"),
                }
            }
            rep::INFO => {
                if !matches!(option, opt::INFO | opt::GO) {
                    return violation(format!("{o}: an INFO reply"));
                }
                check_info(&r.data)?;
            }
            rep::META_CONTEXT => {
                if !meta {
                    return violation(format!("{o}: a META_CONTEXT reply"));
                }
                if r.data.len() < 5 || std::str::from_utf8(&r.data[4..]).is_err() {
                    return violation("a malformed META_CONTEXT reply");
                }
                let id = u32::from_be_bytes([r.data[0], r.data[1], r.data[2], r.data[3]]);
                if option == opt::LIST_META_CONTEXT && id != 0 {
                    return violation(format!("LIST_META_CONTEXT gave context id {id}"));
                }
                if option == opt::SET_META_CONTEXT {
                    let ids = || {
                        earlier
                            .iter()
                            .filter(|e| e.kind == rep::META_CONTEXT)
                            .map(|e| {
                                u32::from_be_bytes([e.data[0], e.data[1], e.data[2], e.data[3]])
                            })
                    };
                    // Unique, any value: qemu-nbd gives base:allocation id 0.
                    if ids().any(|i| i == id) {
                        return violation(format!("SET_META_CONTEXT gave context id {id} twice"));
                    }
                    if ids().count() >= MAX_SELECTED_CONTEXTS {
                        return violation("more contexts selected than the server allows");
                    }
                }
            }
            other => return violation(format!("{o}: unknown reply type {other:#x}")),
        }
        Ok(())
    }

    /// What a finished option changed.
    fn follow(&mut self, option: u32, data: &[u8], replies: &[OptionReply]) {
        let acked = replies.last().is_some_and(|r| r.kind == rep::ACK);
        match option {
            opt::STRUCTURED_REPLY if acked => self.structured = true,
            opt::EXTENDED_HEADERS if acked => {
                self.extended = true;
                self.structured = true;
            }
            opt::SET_META_CONTEXT if acked => {
                self.selected_for = wire::parse_meta_request(data).ok().map(|r| r.export);
                self.contexts = replies
                    .iter()
                    .filter(|r| r.kind == rep::META_CONTEXT)
                    .map(|r| {
                        (
                            u32::from_be_bytes([r.data[0], r.data[1], r.data[2], r.data[3]]),
                            String::from_utf8_lossy(&r.data[4..]).into_owned(),
                        )
                    })
                    .collect();
            }
            _ => {}
        }
    }
}

/// An `INFO` reply's payload against its type's layout.
fn check_info(d: &[u8]) -> Result<(), ClientError> {
    if d.len() < 2 {
        return violation("an INFO reply without a type");
    }
    let kind = u16::from_be_bytes([d[0], d[1]]);
    let u32_at = |at: usize| u32::from_be_bytes([d[at], d[at + 1], d[at + 2], d[at + 3]]);
    match kind {
        info::EXPORT if d.len() != 12 => violation("an INFO_EXPORT reply not of 12 bytes"),
        info::BLOCK_SIZE if d.len() != 14 => violation("an INFO_BLOCK_SIZE reply not of 14 bytes"),
        info::BLOCK_SIZE => {
            let (min, pref, max) = (u32_at(2), u32_at(6), u32_at(10));
            let ok = min.is_power_of_two()
                && min <= 65536
                && pref.is_power_of_two()
                && pref >= min.max(512)
                && (max >= pref || max == u32::MAX);
            if ok {
                Ok(())
            } else {
                violation(format!("block sizes {min}/{pref}/{max} break the rules"))
            }
        }
        info::NAME | info::DESCRIPTION => {
            if (d.len() - 2) as u64 > MAX_STRING_BYTES || std::str::from_utf8(&d[2..]).is_err() {
                violation("an INFO name or description that is no string")
            } else {
                Ok(())
            }
        }
        _ => Ok(()),
    }
}

/// The export information in the replies to `INFO`/`GO`.
fn export_info(replies: &[OptionReply]) -> Result<ExportInfo, ClientError> {
    let mut out = ExportInfo::default();
    for r in replies.iter().filter(|r| r.kind == rep::INFO) {
        let d = &r.data;
        let text = || String::from_utf8_lossy(&d[2..]).into_owned();
        let u32_at = |at: usize| u32::from_be_bytes([d[at], d[at + 1], d[at + 2], d[at + 3]]);
        match u16::from_be_bytes([d[0], d[1]]) {
            info::EXPORT => {
                out.size = u64::from_be_bytes(d[2..10].try_into().unwrap_or_default());
                out.flags = u16::from_be_bytes([d[10], d[11]]);
            }
            info::NAME => out.name = Some(text()),
            info::DESCRIPTION => out.description = Some(text()),
            info::BLOCK_SIZE => out.block_sizes = Some((u32_at(2), u32_at(6), u32_at(10))),
            _ => {}
        }
    }
    Ok(out)
}

/// The final reply, as an error if it is one.
fn refusal(replies: &[OptionReply]) -> Result<(), ClientError> {
    match replies.last() {
        Some(r) if r.is_error() => Err(ClientError::Refused {
            kind: r.kind,
            message: r.text(),
        }),
        _ => Ok(()),
    }
}

/// Reads the replies of the transmission phase and checks them against the
/// requests in flight (the checking is [`ReplyChecker`]'s; this keeps the table).
#[derive(Default)]
pub struct ReplyReader {
    checker: ReplyChecker,
    pending: HashMap<u64, Pending<()>>,
}

impl std::fmt::Debug for ReplyReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyReader")
            .field("structured", &self.checker.structured)
            .field("extended", &self.checker.extended)
            .field("in_flight", &self.pending.len())
            .finish()
    }
}

impl ReplyReader {
    /// A reader for a connection with these negotiated settings and selected
    /// context ids.
    pub fn new(structured: bool, extended: bool, contexts: Vec<u32>) -> ReplyReader {
        ReplyReader {
            checker: ReplyChecker::new(structured, extended, contexts),
            pending: HashMap::new(),
        }
    }

    /// A request was sent: its reply is expected. A cookie already in flight is
    /// refused (the replies could not be told apart).
    pub fn expect(&mut self, req: Request) -> Result<(), String> {
        if self.pending.contains_key(&req.cookie) {
            return Err(format!("cookie {} is already in flight", req.cookie));
        }
        self.pending.insert(req.cookie, Pending::new(req, ()));
        Ok(())
    }

    /// Requests without their complete reply.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// The cookies still in flight.
    pub fn pending_cookies(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.pending.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Reads messages until one request's reply is complete; None when the stream
    /// ends between messages.
    pub fn next(&mut self, r: &mut dyn Read) -> Result<Option<Reply>, ClientError> {
        self.checker.next(r, &mut self.pending)
    }
}

/// A connection in transmission.
#[derive(Debug)]
pub struct Client<S> {
    /// The stream.
    pub stream: S,
    /// What the negotiation said about the export.
    pub info: ExportInfo,
    /// The replies' reader and the requests in flight.
    pub replies: ReplyReader,
    next_cookie: u64,
}

impl<S: Read + Write> Client<S> {
    /// Whether extended headers are on.
    pub fn extended(&self) -> bool {
        self.replies.checker.extended
    }

    /// Sends a request (and a `WRITE`'s data) with a fresh cookie; returns it.
    pub fn send(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) -> Result<Request, ClientError> {
        let req = Request {
            flags,
            command,
            cookie: self.next_cookie,
            offset,
            len,
        };
        self.next_cookie += 1;
        self.send_request(req, payload)?;
        Ok(req)
    }

    /// Sends `req` as it is (its cookie must not be in flight).
    pub fn send_request(&mut self, req: Request, payload: &[u8]) -> Result<(), ClientError> {
        let mut b = wire::request(&req, self.extended());
        b.extend_from_slice(payload);
        if req.command != cmd::DISC {
            self.replies.expect(req).map_err(ClientError::Violation)?;
        }
        self.stream.write_all(&b)?;
        Ok(())
    }

    /// The next complete reply (an end of the stream is an `UnexpectedEof` error).
    pub fn reply(&mut self) -> Result<Reply, ClientError> {
        match self.replies.next(&mut self.stream)? {
            Some(r) => Ok(r),
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "the server closed the connection with {} requests in flight",
                    self.replies.in_flight()
                ),
            )
            .into()),
        }
    }

    /// Sends one request and waits for its reply (nothing else may be in flight).
    pub fn call(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) -> Result<Reply, ClientError> {
        let req = self.send(command, flags, offset, len, payload)?;
        let r = self.reply()?;
        if r.request.cookie != req.cookie {
            return violation("a reply for another request");
        }
        Ok(r)
    }

    /// Reads `len` bytes at `offset`: the data, or the error value.
    pub fn read(&mut self, offset: u64, len: u64) -> Result<Result<Vec<u8>, u32>, ClientError> {
        let r = self.call(cmd::READ, 0, offset, len, &[])?;
        Ok(if r.error == 0 {
            Ok(r.data)
        } else {
            Err(r.error)
        })
    }

    /// Writes `data` at `offset` with `flags`: 0 or the error value.
    pub fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> Result<u32, ClientError> {
        let flags = if self.extended() {
            flags | cflag::PAYLOAD_LEN
        } else {
            flags
        };
        Ok(self
            .call(cmd::WRITE, flags, offset, data.len() as u64, data)?
            .error)
    }

    /// `FLUSH`: 0 or the error value.
    pub fn flush(&mut self) -> Result<u32, ClientError> {
        Ok(self.call(cmd::FLUSH, 0, 0, 0, &[])?.error)
    }

    /// `DISC`, then waits for the server to close the connection (replies still in
    /// flight are read and dropped).
    pub fn disconnect(mut self) -> Result<(), ClientError> {
        let req = Request {
            flags: 0,
            command: cmd::DISC,
            cookie: 0,
            offset: 0,
            len: 0,
        };
        self.send_request(req, &[])?;
        while self.replies.next(&mut self.stream)?.is_some() {}
        Ok(())
    }
}
