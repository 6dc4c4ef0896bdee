//! The NBD wire format (fixed newstyle negotiation, transmission with simple,
//! structured and extended replies): constants, and pure functions that parse what a
//! peer sends and encode what we send. No I/O here; every length read from the wire
//! is checked against [`crate::limits`] before anything is allocated, so the server
//! and the client (and the fuzz target) share one place that decides what a message
//! means.
//!
//! All integers are big-endian. References: NetworkBlockDevice/nbd `doc/proto.md`
//! and its `extension-ext-header` branch (summarised in `docs/nbd.md`).

use crate::limits::{MAX_CONTEXT_QUERIES, MAX_OPTION_BYTES, MAX_STRING_BYTES};

/// `NBDMAGIC`, the first 8 bytes of the server's greeting.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle greeting's second word, and the magic of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic of an option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a compact request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of an extended request.
pub const EXT_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended reply chunk.
pub const EXT_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: no 124 zero bytes after the `EXPORT_NAME` answer.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Options (client to server).
pub mod opt {
    /// Select an export and start transmission (old clients; no error reporting).
    pub const EXPORT_NAME: u32 = 1;
    /// End the negotiation.
    pub const ABORT: u32 = 2;
    /// List the exports.
    pub const LIST: u32 = 3;
    /// Upgrade to TLS.
    pub const STARTTLS: u32 = 5;
    /// Ask about an export.
    pub const INFO: u32 = 6;
    /// Select an export and start transmission.
    pub const GO: u32 = 7;
    /// Use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// Use extended (64-bit) headers.
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types; errors have bit 31 set.
pub mod rep {
    /// Done (or, for some options, accepted).
    pub const ACK: u32 = 1;
    /// One export of a `LIST`.
    pub const SERVER: u32 = 2;
    /// One information item of `INFO`/`GO`.
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    /// The option is not known.
    pub const ERR_UNSUP: u32 = 1 | 1 << 31;
    /// Refused by policy.
    pub const ERR_POLICY: u32 = 2 | 1 << 31;
    /// Malformed or not allowed now.
    pub const ERR_INVALID: u32 = 3 | 1 << 31;
    /// Not possible on this platform.
    pub const ERR_PLATFORM: u32 = 4 | 1 << 31;
    /// TLS must be negotiated first.
    pub const ERR_TLS_REQD: u32 = 5 | 1 << 31;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = 6 | 1 << 31;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = 7 | 1 << 31;
    /// The client must ask for block sizes.
    pub const ERR_BLOCK_SIZE_REQD: u32 = 8 | 1 << 31;
    /// The request is too big.
    pub const ERR_TOO_BIG: u32 = 9 | 1 << 31;
    /// Extended headers were negotiated: this option is not valid with them.
    pub const ERR_EXT_HEADER_REQD: u32 = 10 | 1 << 31;
}

/// Information item types (`INFO`/`GO`).
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// The export's canonical name.
    pub const NAME: u16 = 1;
    /// A description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags (per export, computed at `GO`).
pub mod tflag {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// Writes fail.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `FLUSH` is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `FUA` is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// `TRIM` is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `WRITE_ZEROES` is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `DF` on reads is supported (structured replies only).
    pub const SEND_DF: u16 = 1 << 7;
    /// Several connections see each other's flushed writes.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `CACHE` is supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `FAST_ZERO` is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Commands.
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write.
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Trim (discard).
    pub const TRIM: u16 = 4;
    /// Prefetch hint.
    pub const CACHE: u16 = 5;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Block status.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cflag {
    /// Force unit access: reply only once durable.
    pub const FUA: u16 = 1 << 0;
    /// `WRITE_ZEROES`: do not punch holes.
    pub const NO_HOLE: u16 = 1 << 1;
    /// `READ`: one content chunk.
    pub const DF: u16 = 1 << 2;
    /// `BLOCK_STATUS`: one extent per context.
    pub const REQ_ONE: u16 = 1 << 3;
    /// `WRITE_ZEROES`: fail at once unless faster than writing.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// Extended headers: the length field is the payload's.
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Structured reply chunk types.
pub mod chunk {
    /// Nothing (a final, empty chunk).
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// Zeros at an offset.
    pub const OFFSET_HOLE: u16 = 2;
    /// Block status, 32-bit extents.
    pub const BLOCK_STATUS: u16 = 5;
    /// Block status, 64-bit extents (extended headers).
    pub const BLOCK_STATUS_EXT: u16 = 6;
    /// An error.
    pub const ERROR: u16 = 0x8001;
    /// An error at an offset.
    pub const ERROR_OFFSET: u16 = 0x8002;
    /// Chunk flag: the last chunk of the reply.
    pub const FLAG_DONE: u16 = 1;
}

/// Error values of replies.
pub mod errno {
    /// Operation not permitted (write to a read-only export).
    pub const EPERM: u32 = 1;
    /// I/O error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid request.
    pub const EINVAL: u32 = 22;
    /// No space (write past the end).
    pub const ENOSPC: u32 = 28;
    /// Value too large (`DF` read, oversized request).
    pub const EOVERFLOW: u32 = 75;
    /// Not supported (`FAST_ZERO` that would not be fast).
    pub const ENOTSUP: u32 = 95;
    /// The server is shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// `base:allocation` flag: not allocated.
pub const STATE_HOLE: u32 = 1;
/// `base:allocation` flag: reads as zeros.
pub const STATE_ZERO: u32 = 2;

/// Why a message from the peer is not acceptable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A magic number is wrong: the peer does not speak this protocol (or lost sync).
    #[error("bad magic {found:#x} where {expected:#x} was expected")]
    BadMagic {
        /// What the peer sent.
        found: u64,
        /// What the protocol requires.
        expected: u64,
    },
    /// A length field is beyond what is accepted.
    #[error("{what} of {len} bytes exceeds the limit of {max}")]
    TooBig {
        /// Which field.
        what: &'static str,
        /// Its value.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The data does not have the shape the option requires.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// A string is not valid UTF-8.
    #[error("{0} is not UTF-8")]
    NotUtf8(&'static str),
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// The server's greeting: magic, `IHAVEOPT`, handshake flags.
pub fn greeting(flags: u16) -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&flags.to_be_bytes());
    b
}

/// An option header: which option, and how many data bytes follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option number.
    pub option: u32,
    /// Bytes of data that follow.
    pub len: u32,
}

/// Parses the 16 bytes that start an option. The length is returned as sent: the
/// caller decides whether to read or skip the data ([`MAX_OPTION_BYTES`]).
pub fn parse_option_header(b: &[u8; 16]) -> Result<OptionHeader, WireError> {
    let magic = u64_at(b, 0);
    if magic != IHAVEOPT {
        return Err(WireError::BadMagic {
            found: magic,
            expected: IHAVEOPT,
        });
    }
    Ok(OptionHeader {
        option: u32_at(b, 8),
        len: u32_at(b, 12),
    })
}

/// An option reply: the 20-byte header and its payload.
pub fn option_reply(option: u32, reply: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + payload.len());
    b.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b
}

/// Reads a length-prefixed (u32) string at `*at`, advancing it.
fn take_string(data: &[u8], at: &mut usize, what: &'static str) -> Result<String, WireError> {
    let len = data
        .get(*at..*at + 4)
        .map(|b| u32_at(b, 0))
        .ok_or(WireError::Malformed(what))?;
    if u64::from(len) > MAX_STRING_BYTES {
        return Err(WireError::TooBig {
            what,
            len: u64::from(len),
            max: MAX_STRING_BYTES,
        });
    }
    let start = *at + 4;
    let bytes = data
        .get(start..start + len as usize)
        .ok_or(WireError::Malformed(what))?;
    *at = start + len as usize;
    String::from_utf8(bytes.to_vec()).map_err(|_| WireError::NotUtf8(what))
}

/// What `INFO` and `GO` ask for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoRequest {
    /// The export name (empty: the default export).
    pub name: String,
    /// The information items asked for.
    pub items: Vec<u16>,
}

/// Parses the data of `INFO`/`GO`: u32 name length, name, u16 count, count u16s -
/// exactly, nothing left over.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, WireError> {
    let mut at = 0;
    let name = take_string(data, &mut at, "export name")?;
    let n = data
        .get(at..at + 2)
        .map(|b| u16_at(b, 0))
        .ok_or(WireError::Malformed("information request count"))?;
    at += 2;
    let rest = &data[at..];
    if rest.len() != usize::from(n) * 2 {
        return Err(WireError::Malformed("information request list"));
    }
    Ok(InfoRequest {
        name,
        items: rest.chunks_exact(2).map(|c| u16_at(c, 0)).collect(),
    })
}

/// Encodes an `INFO` request (for clients and tests).
pub fn info_request(name: &str, items: &[u16]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&(items.len() as u16).to_be_bytes());
    for i in items {
        b.extend_from_slice(&i.to_be_bytes());
    }
    b
}

/// What `LIST_META_CONTEXT` and `SET_META_CONTEXT` ask for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaRequest {
    /// The export the contexts are for.
    pub export: String,
    /// The queries (context names or `namespace:` prefixes).
    pub queries: Vec<String>,
}

/// Parses the data of the two meta-context options: u32 export name length, name,
/// u32 query count, then each query as a length-prefixed string - exactly.
pub fn parse_meta_request(data: &[u8]) -> Result<MetaRequest, WireError> {
    let mut at = 0;
    let export = take_string(data, &mut at, "export name")?;
    let n = data
        .get(at..at + 4)
        .map(|b| u32_at(b, 0))
        .ok_or(WireError::Malformed("query count"))?;
    at += 4;
    if u64::from(n) > MAX_CONTEXT_QUERIES {
        return Err(WireError::TooBig {
            what: "query count",
            len: u64::from(n),
            max: MAX_CONTEXT_QUERIES,
        });
    }
    let mut queries = Vec::with_capacity(n as usize);
    for _ in 0..n {
        queries.push(take_string(data, &mut at, "context query")?);
    }
    if at != data.len() {
        return Err(WireError::Malformed(
            "meta context request (bytes left over)",
        ));
    }
    Ok(MetaRequest { export, queries })
}

/// Encodes a meta-context request (for clients and tests).
pub fn meta_request(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(export.len() as u32).to_be_bytes());
    b.extend_from_slice(export.as_bytes());
    b.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        b.extend_from_slice(&(q.len() as u32).to_be_bytes());
        b.extend_from_slice(q.as_bytes());
    }
    b
}

/// Payload of a `SERVER` reply (one export of a `LIST`).
pub fn server_reply_payload(name: &str, description: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len() + description.len());
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(description.as_bytes());
    b
}

/// Payload of an `INFO` reply of type `EXPORT`.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&info::EXPORT.to_be_bytes());
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b
}

/// Payload of an `INFO` reply carrying a string (`NAME`, `DESCRIPTION`).
pub fn info_string(kind: u16, text: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + text.len());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(text.as_bytes());
    b
}

/// Payload of an `INFO` reply of type `BLOCK_SIZE`.
pub fn info_block_size(minimum: u32, preferred: u32, maximum: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(14);
    b.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    b.extend_from_slice(&minimum.to_be_bytes());
    b.extend_from_slice(&preferred.to_be_bytes());
    b.extend_from_slice(&maximum.to_be_bytes());
    b
}

/// Payload of a `META_CONTEXT` reply.
pub fn meta_context_payload(id: u32, name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// The answer to `EXPORT_NAME`: size, flags, and 124 zero bytes unless both sides
/// agreed to leave them out.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(134);
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        b.extend_from_slice(&[0u8; 124]);
    }
    b
}

/// A request of the transmission phase.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// The command.
    pub command: u16,
    /// Opaque value echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Length: of the data (`READ`, `WRITE`) or of the effect.
    pub len: u64,
}

/// Bytes of a compact request header.
pub const REQUEST_BYTES: usize = 28;
/// Bytes of an extended request header.
pub const EXT_REQUEST_BYTES: usize = 32;

/// Parses a request header: 28 bytes (compact) or, with extended headers, 32. The
/// caller reads [`REQUEST_BYTES`] or [`EXT_REQUEST_BYTES`] as negotiated.
pub fn parse_request(b: &[u8], extended: bool) -> Result<Request, WireError> {
    let (magic, want) = if extended {
        (EXT_REQUEST_MAGIC, EXT_REQUEST_BYTES)
    } else {
        (REQUEST_MAGIC, REQUEST_BYTES)
    };
    if b.len() != want {
        return Err(WireError::Malformed("request header"));
    }
    let found = u32_at(b, 0);
    if found != magic {
        return Err(WireError::BadMagic {
            found: u64::from(found),
            expected: u64::from(magic),
        });
    }
    Ok(Request {
        flags: u16_at(b, 4),
        command: u16_at(b, 6),
        cookie: u64_at(b, 8),
        offset: u64_at(b, 16),
        len: if extended {
            u64_at(b, 24)
        } else {
            u64::from(u32_at(b, 24))
        },
    })
}

/// Encodes a request header (for clients and tests).
pub fn request(r: &Request, extended: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(EXT_REQUEST_BYTES);
    let magic = if extended {
        EXT_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    b.extend_from_slice(&magic.to_be_bytes());
    b.extend_from_slice(&r.flags.to_be_bytes());
    b.extend_from_slice(&r.command.to_be_bytes());
    b.extend_from_slice(&r.cookie.to_be_bytes());
    b.extend_from_slice(&r.offset.to_be_bytes());
    if extended {
        b.extend_from_slice(&r.len.to_be_bytes());
    } else {
        b.extend_from_slice(&(r.len as u32).to_be_bytes());
    }
    b
}

/// A simple reply header (data of a successful `READ` follows it).
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured (or, with `extended`, extended) reply chunk header for a payload of
/// `len` bytes of type `kind`; `offset` is the request's offset (extended only).
pub fn chunk_header(
    extended: bool,
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    len: u64,
) -> Vec<u8> {
    let mut b = Vec::with_capacity(32);
    if extended {
        b.extend_from_slice(&EXT_REPLY_MAGIC.to_be_bytes());
    } else {
        b.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    }
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    if extended {
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
    } else {
        b.extend_from_slice(&(len as u32).to_be_bytes());
    }
    b
}

/// `text` cut to at most [`MAX_STRING_BYTES`] bytes, at a character boundary (what
/// the protocol allows in a string).
pub fn cut_string(text: &str) -> &str {
    let mut end = text.len().min(MAX_STRING_BYTES as usize);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Payload of an error chunk: the error, and a message (cut to fit the limit).
pub fn error_payload(error: u32, message: &str) -> Vec<u8> {
    let msg = cut_string(message).as_bytes();
    let mut b = Vec::with_capacity(6 + msg.len());
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    b.extend_from_slice(msg);
    b
}

/// One extent of a block status reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Bytes.
    pub len: u64,
    /// Context flags.
    pub flags: u64,
}

/// Payload of a block status chunk for context `id`: compact (u32 length and flags;
/// lengths must fit, which the caller ensures) or extended (u32 count, then u64s).
pub fn block_status_payload(id: u32, extents: &[Extent], extended: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + extents.len() * 16);
    b.extend_from_slice(&id.to_be_bytes());
    if extended {
        b.extend_from_slice(&(extents.len() as u32).to_be_bytes());
        for e in extents {
            b.extend_from_slice(&e.len.to_be_bytes());
            b.extend_from_slice(&e.flags.to_be_bytes());
        }
    } else {
        for e in extents {
            b.extend_from_slice(&(e.len as u32).to_be_bytes());
            b.extend_from_slice(&(e.flags as u32).to_be_bytes());
        }
    }
    b
}

// ---------------------------------------------------------------------------------
// What a client reads (the test client and the fuzzing oracle).

/// Parses the server's greeting: its handshake flags.
pub fn parse_greeting(b: &[u8; 18]) -> Result<u16, WireError> {
    for (at, expected) in [(0, NBD_MAGIC), (8, IHAVEOPT)] {
        let found = u64_at(b, at);
        if found != expected {
            return Err(WireError::BadMagic { found, expected });
        }
    }
    Ok(u16_at(b, 16))
}

/// An option header as the client sends it (for clients and tests).
pub fn option_header(option: u32, len: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..16].copy_from_slice(&len.to_be_bytes());
    b
}

/// The header of an option reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option it answers.
    pub option: u32,
    /// The reply type ([`rep`]).
    pub kind: u32,
    /// Bytes of data that follow.
    pub len: u32,
}

/// Parses the 20 bytes that start an option reply.
pub fn parse_option_reply_header(b: &[u8; 20]) -> Result<OptionReplyHeader, WireError> {
    let magic = u64_at(b, 0);
    if magic != OPTION_REPLY_MAGIC {
        return Err(WireError::BadMagic {
            found: magic,
            expected: OPTION_REPLY_MAGIC,
        });
    }
    Ok(OptionReplyHeader {
        option: u32_at(b, 8),
        kind: u32_at(b, 12),
        len: u32_at(b, 16),
    })
}

/// Bytes of a simple reply header.
pub const SIMPLE_REPLY_BYTES: usize = 16;
/// Bytes of a structured reply chunk header.
pub const CHUNK_BYTES: usize = 20;
/// Bytes of an extended reply chunk header.
pub const EXT_CHUNK_BYTES: usize = 32;

/// A reply header of the transmission phase, as a client reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply (the data of a successful `READ` follows).
    Simple {
        /// The error (0: success).
        error: u32,
        /// The request's cookie.
        cookie: u64,
    },
    /// A structured or extended reply chunk.
    Chunk {
        /// Chunk flags ([`chunk::FLAG_DONE`]).
        flags: u16,
        /// The chunk type.
        kind: u16,
        /// The request's cookie.
        cookie: u64,
        /// Extended chunks: the offset field.
        offset: u64,
        /// Bytes of payload that follow.
        len: u64,
        /// Whether it was an extended chunk.
        extended: bool,
    },
}

/// The length of the reply header that starts with `magic`.
pub fn reply_header_len(magic: &[u8; 4]) -> Result<usize, WireError> {
    match u32_at(magic, 0) {
        SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REPLY_BYTES),
        STRUCTURED_REPLY_MAGIC => Ok(CHUNK_BYTES),
        EXT_REPLY_MAGIC => Ok(EXT_CHUNK_BYTES),
        found => Err(WireError::BadMagic {
            found: u64::from(found),
            expected: u64::from(SIMPLE_REPLY_MAGIC),
        }),
    }
}

/// Parses a whole reply header (of the length [`reply_header_len`] gave).
pub fn parse_reply_header(b: &[u8]) -> Result<ReplyHeader, WireError> {
    let magic: [u8; 4] = b
        .get(..4)
        .and_then(|m| m.try_into().ok())
        .ok_or(WireError::Malformed("reply header"))?;
    let want = reply_header_len(&magic)?;
    if b.len() != want {
        return Err(WireError::Malformed("reply header"));
    }
    Ok(match want {
        SIMPLE_REPLY_BYTES => ReplyHeader::Simple {
            error: u32_at(b, 4),
            cookie: u64_at(b, 8),
        },
        CHUNK_BYTES => ReplyHeader::Chunk {
            flags: u16_at(b, 4),
            kind: u16_at(b, 6),
            cookie: u64_at(b, 8),
            offset: 0,
            len: u64::from(u32_at(b, 16)),
            extended: false,
        },
        _ => ReplyHeader::Chunk {
            flags: u16_at(b, 4),
            kind: u16_at(b, 6),
            cookie: u64_at(b, 8),
            offset: u64_at(b, 16),
            len: u64_at(b, 24),
            extended: true,
        },
    })
}

/// Parses the payload of an error chunk: the error and its message (exactly).
pub fn parse_error_payload(p: &[u8]) -> Result<(u32, String), WireError> {
    if p.len() < 6 {
        return Err(WireError::Malformed("error chunk"));
    }
    let n = usize::from(u16_at(p, 4));
    let msg = p
        .get(6..6 + n)
        .ok_or(WireError::Malformed("error message"))?;
    if p.len() != 6 + n {
        return Err(WireError::Malformed("error chunk (bytes left over)"));
    }
    let msg = String::from_utf8(msg.to_vec()).map_err(|_| WireError::NotUtf8("error message"))?;
    Ok((u32_at(p, 0), msg))
}

/// Parses a block status chunk's payload: the context id and its extents.
pub fn parse_block_status_payload(
    p: &[u8],
    extended: bool,
) -> Result<(u32, Vec<Extent>), WireError> {
    let (head, each) = if extended { (8, 16) } else { (4, 8) };
    if p.len() < head || !(p.len() - head).is_multiple_of(each) {
        return Err(WireError::Malformed("block status chunk"));
    }
    let n = (p.len() - head) / each;
    if extended && u32_at(p, 4) as usize != n {
        return Err(WireError::Malformed("block status chunk (extent count)"));
    }
    let extents = p[head..]
        .chunks_exact(each)
        .map(|c| {
            if extended {
                Extent {
                    len: u64_at(c, 0),
                    flags: u64_at(c, 8),
                }
            } else {
                Extent {
                    len: u64::from(u32_at(c, 0)),
                    flags: u64::from(u32_at(c, 4)),
                }
            }
        })
        .collect();
    Ok((u32_at(p, 0), extents))
}

/// How an option's data length is to be handled: read it, or skip it and refuse.
pub fn option_data_acceptable(len: u32) -> bool {
    u64::from(len) <= MAX_OPTION_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_requests_round_trip_and_must_be_exact() {
        let b = info_request("[ds] vm/vm.vmdk", &[info::NAME, info::BLOCK_SIZE]);
        let r = parse_info_request(&b).unwrap();
        assert_eq!(r.name, "[ds] vm/vm.vmdk");
        assert_eq!(r.items, vec![info::NAME, info::BLOCK_SIZE]);
        let mut extra = b.clone();
        extra.push(0);
        assert!(parse_info_request(&extra).is_err());
        assert!(parse_info_request(&b[..b.len() - 1]).is_err());
        // A name length beyond the data.
        let mut bad = b.clone();
        bad[0..4].copy_from_slice(&1000u32.to_be_bytes());
        assert!(parse_info_request(&bad).is_err());
        let mut huge = b;
        huge[0..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            parse_info_request(&huge),
            Err(WireError::TooBig { .. })
        ));
    }

    #[test]
    fn meta_requests_round_trip_and_must_be_exact() {
        let b = meta_request("disk", &["base:allocation", "x-vdisk:changed:ab/3"]);
        let r = parse_meta_request(&b).unwrap();
        assert_eq!(r.export, "disk");
        assert_eq!(r.queries, vec!["base:allocation", "x-vdisk:changed:ab/3"]);
        assert!(parse_meta_request(&b[..b.len() - 2]).is_err());
        let mut extra = b.clone();
        extra.extend_from_slice(b"junk");
        assert!(parse_meta_request(&extra).is_err());
        let mut many = meta_request("d", &[]);
        let at = many.len() - 4;
        many[at..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            parse_meta_request(&many),
            Err(WireError::TooBig { .. })
        ));
    }

    #[test]
    fn requests_round_trip_in_both_header_sizes() {
        let r = Request {
            flags: cflag::FUA,
            command: cmd::WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            len: 65536,
        };
        for ext in [false, true] {
            let b = request(&r, ext);
            assert_eq!(parse_request(&b, ext).unwrap(), r);
            assert!(parse_request(&b, !ext).is_err());
        }
        let mut bad = request(&r, false);
        bad[0] ^= 1;
        assert!(matches!(
            parse_request(&bad, false),
            Err(WireError::BadMagic { .. })
        ));
    }

    #[test]
    fn option_headers_need_the_magic() {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&opt::GO.to_be_bytes());
        b[12..16].copy_from_slice(&7u32.to_be_bytes());
        assert_eq!(
            parse_option_header(&b).unwrap(),
            OptionHeader {
                option: opt::GO,
                len: 7
            }
        );
        b[0] = 0;
        assert!(parse_option_header(&b).is_err());
    }

    #[test]
    fn error_messages_are_cut_at_a_character() {
        let long = "é".repeat(5000);
        let p = error_payload(errno::EIO, &long);
        let n = u16::from_be_bytes([p[4], p[5]]) as usize;
        assert!(n <= MAX_STRING_BYTES as usize);
        assert!(std::str::from_utf8(&p[6..6 + n]).is_ok());
    }
}
