//! Connecting and negotiating, through the strict [`Handshake`] of
//! [`crate::testing`] (every option reply is checked there): the socket (with the
//! connect timeout), the greeting (a peer that is not NBD is named by what it
//! sent), `STARTTLS` per policy, extended headers (else structured replies),
//! `SET_META_CONTEXT`, and `GO` asking for block sizes - `EXPORT_NAME` only when
//! `GO` is unknown, never after extended headers. Refusals become the
//! [`vdisk::ErrorKind`]s VDDK distinguishes (shared/docs/nbd.md §5).

use std::io::{self, Read};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vdisk::{Error, ErrorKind, Result};

use super::tls::TlsClient;
use super::{ClientOptions, Endpoint};
use crate::replies::ClientError;
use crate::testing::{ExportInfo, Handshake};
use crate::transport::{Socket, Transport};
use crate::wire::{self, info, opt, rep, CLIENT_FIXED_NEWSTYLE, CLIENT_NO_ZEROES};

/// What a negotiation that reached transmission gives.
pub struct Negotiated {
    /// The connection (plain or under TLS).
    pub transport: Transport,
    /// Size, flags, block sizes, name, description.
    pub info: ExportInfo,
    /// Structured replies (or extended headers).
    pub structured: bool,
    /// Extended headers.
    pub extended: bool,
    /// The selected contexts: (id, name).
    pub contexts: Vec<(u32, String)>,
    /// Under TLS.
    pub tls: bool,
}

/// Where to connect and how.
#[derive(Clone, Copy)]
pub struct Target<'a> {
    /// The server.
    pub endpoint: &'a Endpoint,
    /// The options.
    pub opts: &'a ClientOptions,
    /// The TLS configuration, when TLS is wanted.
    pub tls: Option<&'a TlsClient>,
}

impl Target<'_> {
    fn server(&self) -> String {
        match self.endpoint {
            Endpoint::Tcp { host, port } if host.contains(':') => format!("[{host}]:{port}"),
            Endpoint::Tcp { host, port } => format!("{host}:{port}"),
            Endpoint::Unix(p) => p.display().to_string(),
        }
    }
}

fn err(kind: ErrorKind, t: &Target<'_>, m: impl std::fmt::Display) -> Error {
    Error::new(kind, format!("NBD server {}: {m}", t.server()))
}

/// Connects the socket within the connect timeout.
fn open_socket(t: &Target<'_>, deadline: Instant) -> Result<Socket> {
    let connect_error = |e: io::Error| {
        let kind = match e.kind() {
            io::ErrorKind::ConnectionRefused => ErrorKind::ConnectionRefused,
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => ErrorKind::TimedOut,
            io::ErrorKind::NotFound
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::AddrNotAvailable => ErrorKind::HostNotFound,
            _ => ErrorKind::ConnectionLost,
        };
        err(kind, t, format!("cannot connect: {e}"))
    };
    match t.endpoint {
        Endpoint::Unix(p) => UnixStream::connect(p)
            .map(Socket::Unix)
            .map_err(connect_error),
        Endpoint::Tcp { host, port } => {
            let addrs: Vec<_> = (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(|e| {
                    err(
                        ErrorKind::HostNotFound,
                        t,
                        format!("cannot resolve {host:?}: {e}"),
                    )
                })?
                .collect();
            let mut last = None;
            for a in addrs {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match TcpStream::connect_timeout(&a, left) {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        return Ok(Socket::Tcp(s));
                    }
                    Err(e) => last = Some(e),
                }
            }
            Err(match last {
                Some(e) => connect_error(e),
                None => err(
                    ErrorKind::HostNotFound,
                    t,
                    format!("{host:?} has no address"),
                ),
            })
        }
    }
}

/// Bytes as text for a message: printable ASCII as is, the rest escaped.
fn show(b: &[u8]) -> String {
    b.iter()
        .flat_map(|&c| std::ascii::escape_default(c))
        .map(char::from)
        .collect()
}

/// A negotiation error in the kinds VDDK tells apart.
fn negotiation_error(t: &Target<'_>, what: &str, e: ClientError) -> Error {
    match e {
        ClientError::Io(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            err(
                ErrorKind::TimedOut,
                t,
                format!(
                    "{what}: no answer within the connect timeout ({:?})",
                    t.opts.connect_timeout
                ),
            )
        }
        e @ ClientError::Io(_) if e.is_closed() => err(
            ErrorKind::Handshake,
            t,
            format!("{what}: the server closed the connection"),
        ),
        ClientError::Io(e) => err(ErrorKind::Handshake, t, format!("{what}: {e}")),
        ClientError::Violation(m) => err(
            ErrorKind::Handshake,
            t,
            format!("{what}: the server broke the protocol: {m}"),
        ),
        ClientError::Refused { kind, message } => refusal_error(t, what, kind, &message),
    }
}

fn refusal_error(t: &Target<'_>, what: &str, kind: u32, message: &str) -> Error {
    let (k, why) = match kind {
        rep::ERR_UNKNOWN => (ErrorKind::FileNotFound, "no such export"),
        rep::ERR_POLICY => (ErrorKind::AccessDenied, "refused by the server's policy"),
        rep::ERR_TLS_REQD => (
            ErrorKind::AccessDenied,
            "the server requires TLS (an nbds:// URI; libvixDiskLib's nbdssl transport)",
        ),
        rep::ERR_SHUTDOWN => (ErrorKind::ConnectionLost, "the server is shutting down"),
        rep::ERR_BLOCK_SIZE_REQD => (ErrorKind::Handshake, "the server requires block sizes"),
        rep::ERR_TOO_BIG => (ErrorKind::InvalidArgument, "the request is too big"),
        rep::ERR_PLATFORM => (ErrorKind::NotSupported, "not possible on the server"),
        rep::ERR_UNSUP => (ErrorKind::NotSupported, "unknown to the server"),
        0 => (
            ErrorKind::FileNotFound,
            "the server closed the connection (no such export?)",
        ),
        _ => (ErrorKind::Handshake, "refused"),
    };
    if message.is_empty() {
        err(k, t, format!("{what}: {why}"))
    } else {
        err(k, t, format!("{what}: {why}: {message}"))
    }
}

/// Connects, reads the greeting, starts TLS if wanted: a negotiation ready for
/// options. The socket's timeouts are the connect timeout's remainder.
pub fn start(t: &Target<'_>) -> Result<Handshake<Transport>> {
    let deadline = Instant::now() + t.opts.connect_timeout;
    let mut sock = open_socket(t, deadline)?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    let timeouts = |s: &Socket, d: Duration| {
        s.set_read_timeout(Some(d))
            .and_then(|()| s.set_write_timeout(Some(d)))
            .map_err(|e| err(ErrorKind::ConnectionLost, t, e))
    };
    timeouts(&sock, left)?;
    // The greeting, read as it comes so that a stranger is named by what it sent.
    let mut g = [0u8; 18];
    let mut got = 0;
    while got < g.len() {
        match sock.read(&mut g[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(err(
                    ErrorKind::TimedOut,
                    t,
                    format!(
                        "no NBD greeting within {:?} (got {got} bytes: \"{}\")",
                        t.opts.connect_timeout,
                        show(&g[..got])
                    ),
                ))
            }
            Err(e) => {
                return Err(err(
                    ErrorKind::Handshake,
                    t,
                    format!("reading the greeting: {e}"),
                ))
            }
        }
        if got >= 8 && u64::from_be_bytes(g[..8].try_into().unwrap_or_default()) != wire::NBD_MAGIC
        {
            break;
        }
    }
    let not_nbd = |why: &str| {
        err(
            ErrorKind::Handshake,
            t,
            format!("not an NBD server ({why}); it sent \"{}\"", show(&g[..got])),
        )
    };
    let magic_ok = |g: &[u8]| {
        g.len() < 8 || u64::from_be_bytes(g[..8].try_into().unwrap_or_default()) == wire::NBD_MAGIC
    };
    if !magic_ok(&g[..got]) {
        // Read what else it says (an HTTP error line, say), briefly.
        let mut more = [0u8; 64];
        let _ = sock.set_read_timeout(Some(Duration::from_millis(100)));
        let n = sock.read(&mut more).unwrap_or(0);
        let mut all = g[..got].to_vec();
        all.extend_from_slice(&more[..n]);
        return Err(err(
            ErrorKind::Handshake,
            t,
            format!(
                "not an NBD server (no NBD greeting); it sent \"{}\"",
                show(&all)
            ),
        ));
    }
    if got < g.len() {
        return Err(if got == 0 {
            err(
                ErrorKind::Handshake,
                t,
                "the server closed the connection before its greeting",
            )
        } else {
            not_nbd("the greeting ended early")
        });
    }
    let server_flags = match wire::parse_greeting(&g) {
        Ok(f) => f,
        Err(e) => return Err(not_nbd(&e.to_string())),
    };
    if server_flags & wire::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(err(
            ErrorKind::Handshake,
            t,
            "the server does not speak fixed newstyle negotiation",
        ));
    }
    let client_flags = CLIENT_FIXED_NEWSTYLE
        | if server_flags & wire::FLAG_NO_ZEROES != 0 {
            CLIENT_NO_ZEROES
        } else {
            0
        };
    let mut h = Handshake {
        stream: Transport::Plain(sock),
        server_flags,
        client_flags,
        structured: false,
        extended: false,
        contexts: Vec::new(),
        selected_for: None,
    };
    use std::io::Write;
    h.stream
        .write_all(&client_flags.to_be_bytes())
        .map_err(|e| negotiation_error(t, "sending the client flags", e.into()))?;
    let Some(tls) = t.tls else {
        return Ok(h);
    };
    let r = h
        .option(opt::STARTTLS, &[])
        .map_err(|e| negotiation_error(t, "STARTTLS", e))?;
    let last = r.last().map(|r| (r.kind, r.text()));
    match last {
        Some((rep::ACK, _)) => {}
        Some((kind, message)) => {
            return Err(err(
                ErrorKind::AccessDenied,
                t,
                format!(
                    "the server refused STARTTLS (reply {kind:#x}{}{message}); TLS was required, \
                     so no plaintext fallback",
                    if message.is_empty() { "" } else { ": " }
                ),
            ))
        }
        None => return Err(err(ErrorKind::Handshake, t, "no answer to STARTTLS")),
    }
    let Transport::Plain(sock) = h.stream else {
        return Err(err(ErrorKind::Handshake, t, "TLS is already on"));
    };
    let host = match (&t.opts.tls_hostname, t.endpoint) {
        (Some(h), _) => h.clone(),
        (None, Endpoint::Tcp { host, .. }) => host.clone(),
        (None, Endpoint::Unix(_)) => "localhost".to_string(),
    };
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    let stream = tls
        .connect(sock, &host, left)
        .map_err(|e| e.within(format!("NBD server {}", t.server())))?;
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

/// Extended headers if the server has them, else structured replies (refusals
/// tolerated).
fn replies_options(t: &Target<'_>, h: &mut Handshake<Transport>) -> Result<()> {
    if !h
        .extended_headers()
        .map_err(|e| negotiation_error(t, "EXTENDED_HEADERS", e))?
    {
        h.structured_replies()
            .map_err(|e| negotiation_error(t, "STRUCTURED_REPLY", e))?;
    }
    Ok(())
}

/// How a context selection is to be taken.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Contexts<'a> {
    /// Ask for these; whatever the server selects will do.
    Wanted(&'a [&'a str]),
    /// This one is needed: a refusal or an answer without it is
    /// [`ErrorKind::ChangeIdRefused`].
    Required(&'a str),
}

/// A whole negotiation up to transmission on `export`.
pub fn negotiate(t: &Target<'_>, export: &str, contexts: Contexts<'_>) -> Result<Negotiated> {
    let mut h = start(t)?;
    replies_options(t, &mut h)?;
    let queries: Vec<&str> = match contexts {
        Contexts::Wanted(q) => q.to_vec(),
        Contexts::Required(c) => vec![c],
    };
    if h.structured && !queries.is_empty() {
        let r = h
            .option(opt::SET_META_CONTEXT, &wire::meta_request(export, &queries))
            .map_err(|e| negotiation_error(t, "SET_META_CONTEXT", e))?;
        if let Contexts::Required(c) = contexts {
            let refused = r.last().filter(|r| r.is_error()).map(|r| r.text());
            if refused.is_some() || !h.contexts.iter().any(|(_, n)| n == c) {
                abort(h);
                return Err(err(
                    ErrorKind::ChangeIdRefused,
                    t,
                    format!(
                        "the server does not answer for {c:?}{}",
                        refused.map(|m| format!(": {m}")).unwrap_or_default()
                    ),
                ));
            }
        }
    } else if let Contexts::Required(c) = contexts {
        return Err(err(
            ErrorKind::NotSupported,
            t,
            format!("{c:?} needs structured replies, which the server does not offer"),
        ));
    }
    let items = [info::BLOCK_SIZE, info::NAME, info::DESCRIPTION];
    let info = match h.go(export, &items) {
        Ok(i) => i,
        Err(ClientError::Refused { kind, .. }) if kind == rep::ERR_UNSUP && !h.extended => h
            .export_name(export)
            .map_err(|e| negotiation_error(t, &format!("EXPORT_NAME {export:?}"), e))?,
        Err(e) => return Err(negotiation_error(t, &format!("export {export:?}"), e)),
    };
    Ok(Negotiated {
        tls: matches!(h.stream, Transport::Tls(_)),
        transport: h.stream,
        info,
        structured: h.structured,
        extended: h.extended,
        contexts: h.contexts,
    })
}

/// Ends a negotiation without an export (`ABORT`; its answer is not waited for).
fn abort(mut h: Handshake<Transport>) {
    let _ = h.send_option(opt::ABORT, &[]);
}

/// The exports the server lists: (name, description).
pub fn list_exports(t: &Target<'_>) -> Result<Vec<(String, String)>> {
    let mut h = start(t)?;
    let r = h
        .option(opt::LIST, &[])
        .map_err(|e| negotiation_error(t, "LIST", e))?;
    if let Some(e) = r.last().filter(|r| r.is_error()) {
        return Err(refusal_error(t, "LIST", e.kind, &e.text()));
    }
    let mut out = Vec::new();
    for s in r.iter().filter(|r| r.kind == rep::SERVER) {
        // Checked by the handshake: a length within the data, UTF-8.
        let n = u32::from_be_bytes([s.data[0], s.data[1], s.data[2], s.data[3]]) as usize;
        let name = String::from_utf8_lossy(&s.data[4..4 + n]).into_owned();
        let description = String::from_utf8_lossy(&s.data[4 + n..]).into_owned();
        out.push((name, description));
    }
    abort(h);
    Ok(out)
}

/// Checks that the server speaks NBD as the options ask (TLS or not) without
/// choosing an export: the greeting, STARTTLS when wanted, and a `LIST` - whose
/// refusal for TLS (`ERR_TLS_REQD`) is an error, any other refusal not (a server
/// may keep its exports to itself).
pub fn probe(t: &Target<'_>) -> Result<()> {
    let mut h = start(t)?;
    let r = h
        .option(opt::LIST, &[])
        .map_err(|e| negotiation_error(t, "LIST", e))?;
    if let Some(e) = r
        .last()
        .filter(|r| r.is_error() && r.kind == rep::ERR_TLS_REQD)
    {
        return Err(refusal_error(t, "LIST", e.kind, &e.text()));
    }
    abort(h);
    Ok(())
}

/// The contexts `LIST_META_CONTEXT` gives for `queries` on `export`.
pub fn list_contexts(t: &Target<'_>, export: &str, queries: &[&str]) -> Result<Vec<String>> {
    let mut h = start(t)?;
    replies_options(t, &mut h)?;
    if !h.structured {
        abort(h);
        return Ok(Vec::new());
    }
    let r = h
        .option(opt::LIST_META_CONTEXT, &wire::meta_request(export, queries))
        .map_err(|e| negotiation_error(t, "LIST_META_CONTEXT", e))?;
    if let Some(e) = r.last().filter(|r| r.is_error()) {
        let e = if e.kind == rep::ERR_UNSUP {
            Ok(Vec::new())
        } else {
            Err(refusal_error(t, "LIST_META_CONTEXT", e.kind, &e.text()))
        };
        abort(h);
        return e;
    }
    let names = r
        .iter()
        .filter(|r| r.kind == rep::META_CONTEXT)
        .map(|r| String::from_utf8_lossy(&r.data[4..]).into_owned())
        .collect();
    abort(h);
    Ok(names)
}
