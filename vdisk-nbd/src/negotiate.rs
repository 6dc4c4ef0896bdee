//! The fixed newstyle negotiation, server side: the greeting, then options until
//! the client selects an export (`GO`, `EXPORT_NAME`) or leaves.
//!
//! Every option is answered as the specification asks: unknown options get
//! `ERR_UNSUP` and negotiation goes on; malformed data `ERR_INVALID`; data beyond
//! [`MAX_OPTION_BYTES`] is skipped and refused (`ERR_TOO_BIG`) - or, beyond
//! [`MAX_SKIPPED_OPTION_BYTES`], the connection is closed; a client that sends more
//! than [`MAX_OPTIONS`] options is cut off. Nothing a client sends here can make the
//! server allocate more than these bounds.

use std::io::{Read, Write};

use crate::context::{self, Context};
use crate::export::{ExportUse, Refusal};
use crate::limits::{
    MAX_OPTIONS, MAX_OPTION_BYTES, MAX_SELECTED_CONTEXTS, MAX_SKIPPED_OPTION_BYTES,
};
use crate::server::{ConnError, Shared, TlsMode};
use crate::transport::Transport;
use crate::wire::{self, info, opt, rep, tflag};

/// What the negotiation settled for the transmission phase.
#[derive(Debug)]
pub struct Session {
    /// The export.
    pub export: ExportUse,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// Extended headers were negotiated (implies structured replies).
    pub extended: bool,
    /// Selected metadata contexts, with their ids.
    pub contexts: Vec<(u32, Context)>,
    /// The transmission flags sent.
    pub flags: u16,
}

/// How a negotiation ended.
pub enum Outcome {
    /// Transmission starts on this transport.
    Transmit(Session, Transport),
    /// The client left (`ABORT`) or was refused an export by `EXPORT_NAME`.
    Done,
}

/// Per-connection negotiation state.
struct State {
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    tls: bool,
    /// Contexts selected by the last `SET_META_CONTEXT`, with the export they are for.
    contexts: Option<(String, Vec<Context>)>,
}

fn read_exact(t: &mut Transport, buf: &mut [u8]) -> Result<(), ConnError> {
    t.read_exact(buf).map_err(ConnError::Io)
}

fn send(t: &mut Transport, bytes: &[u8]) -> Result<(), ConnError> {
    t.write_all(bytes).map_err(ConnError::Io)
}

fn reply(t: &mut Transport, option: u32, kind: u32, payload: &[u8]) -> Result<(), ConnError> {
    send(t, &wire::option_reply(option, kind, payload))
}

fn error(t: &mut Transport, option: u32, kind: u32, message: &str) -> Result<(), ConnError> {
    reply(t, option, kind, wire::cut_string(message).as_bytes())
}

/// Skips `len` bytes of option data.
fn skip(t: &mut Transport, mut len: u64) -> Result<(), ConnError> {
    let mut buf = [0u8; 4096];
    while len > 0 {
        let n = len.min(buf.len() as u64) as usize;
        read_exact(t, &mut buf[..n])?;
        len -= n as u64;
    }
    Ok(())
}

/// Runs the negotiation on a new connection.
pub fn negotiate(mut t: Transport, shared: &Shared) -> Result<Outcome, ConnError> {
    send(
        &mut t,
        &wire::greeting(wire::FLAG_FIXED_NEWSTYLE | wire::FLAG_NO_ZEROES),
    )?;
    let mut cf = [0u8; 4];
    read_exact(&mut t, &mut cf)?;
    let client = u32::from_be_bytes(cf);
    let known = wire::CLIENT_FIXED_NEWSTYLE | wire::CLIENT_NO_ZEROES;
    if client & !known != 0 {
        return Err(ConnError::Protocol(format!(
            "unknown client flags {client:#x}"
        )));
    }
    let mut st = State {
        no_zeroes: client & wire::CLIENT_NO_ZEROES != 0,
        structured: false,
        extended: false,
        tls: false,
        contexts: None,
    };
    for _ in 0..MAX_OPTIONS {
        let mut hb = [0u8; 16];
        read_exact(&mut t, &mut hb)?;
        let h = wire::parse_option_header(&hb).map_err(|e| ConnError::Protocol(e.to_string()))?;
        if !wire::option_data_acceptable(h.len) {
            if u64::from(h.len) > MAX_SKIPPED_OPTION_BYTES || h.option == opt::EXPORT_NAME {
                return Err(ConnError::Protocol(format!(
                    "option {} with {} bytes of data",
                    h.option, h.len
                )));
            }
            skip(&mut t, u64::from(h.len))?;
            error(
                &mut t,
                h.option,
                rep::ERR_TOO_BIG,
                &format!("option data over {MAX_OPTION_BYTES} bytes"),
            )?;
            continue;
        }
        let mut data = vec![0u8; h.len as usize];
        read_exact(&mut t, &mut data)?;
        if shared.stopping() {
            error(
                &mut t,
                h.option,
                rep::ERR_SHUTDOWN,
                "the server is stopping",
            )?;
            continue;
        }
        if shared.tls_mode == TlsMode::Require
            && !st.tls
            && !matches!(h.option, opt::STARTTLS | opt::ABORT)
        {
            if h.option == opt::EXPORT_NAME {
                return Err(ConnError::Protocol(
                    "EXPORT_NAME before STARTTLS on a server that requires TLS".into(),
                ));
            }
            error(
                &mut t,
                h.option,
                rep::ERR_TLS_REQD,
                "this server requires TLS (STARTTLS)",
            )?;
            continue;
        }
        match h.option {
            opt::ABORT => {
                let _ = reply(&mut t, h.option, rep::ACK, &[]);
                return Ok(Outcome::Done);
            }
            opt::LIST => {
                if !data.is_empty() {
                    error(&mut t, h.option, rep::ERR_INVALID, "LIST takes no data")?;
                    continue;
                }
                for (name, desc) in shared.exports.list() {
                    reply(
                        &mut t,
                        h.option,
                        rep::SERVER,
                        &wire::server_reply_payload(&name, &desc),
                    )?;
                }
                reply(&mut t, h.option, rep::ACK, &[])?;
            }
            opt::STARTTLS => {
                if !data.is_empty() {
                    error(&mut t, h.option, rep::ERR_INVALID, "STARTTLS takes no data")?;
                } else if st.tls {
                    error(&mut t, h.option, rep::ERR_INVALID, "TLS is already on")?;
                } else if !shared.tls_offered() {
                    // Refused: what was negotiated before stays as it is.
                    error(
                        &mut t,
                        h.option,
                        rep::ERR_UNSUP,
                        "TLS is not configured on this server",
                    )?;
                } else {
                    match shared.start_tls(t, h.option)? {
                        Some(tls) => {
                            t = tls;
                            // Everything negotiated before is void under TLS.
                            st.tls = true;
                            st.structured = false;
                            st.extended = false;
                            st.contexts = None;
                        }
                        None => return Ok(Outcome::Done),
                    }
                }
            }
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    error(
                        &mut t,
                        h.option,
                        rep::ERR_INVALID,
                        "STRUCTURED_REPLY takes no data",
                    )?;
                } else if st.extended {
                    error(
                        &mut t,
                        h.option,
                        rep::ERR_EXT_HEADER_REQD,
                        "extended headers are on (they include structured replies)",
                    )?;
                } else {
                    st.structured = true;
                    reply(&mut t, h.option, rep::ACK, &[])?;
                }
            }
            opt::EXTENDED_HEADERS => {
                if !data.is_empty() {
                    error(
                        &mut t,
                        h.option,
                        rep::ERR_INVALID,
                        "EXTENDED_HEADERS takes no data",
                    )?;
                } else {
                    st.extended = true;
                    st.structured = true;
                    reply(&mut t, h.option, rep::ACK, &[])?;
                }
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                meta_context(&mut t, shared, &mut st, h.option, &data)?;
            }
            opt::INFO | opt::GO => {
                let req = match wire::parse_info_request(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        error(&mut t, h.option, rep::ERR_INVALID, &e.to_string())?;
                        continue;
                    }
                };
                let export = match shared.acquire(&req.name) {
                    Ok(e) => e,
                    Err(r) => {
                        refuse(&mut t, h.option, r)?;
                        continue;
                    }
                };
                let flags = transmission_flags(&export, st.structured);
                reply(
                    &mut t,
                    h.option,
                    rep::INFO,
                    &wire::info_export(export.size(), flags),
                )?;
                for &item in &req.items {
                    let payload = match item {
                        info::NAME => wire::info_string(info::NAME, &export.name),
                        info::DESCRIPTION => {
                            wire::info_string(info::DESCRIPTION, &export.description())
                        }
                        _ => continue,
                    };
                    reply(&mut t, h.option, rep::INFO, &payload)?;
                }
                let (min, pref, max) = export.block_sizes();
                reply(
                    &mut t,
                    h.option,
                    rep::INFO,
                    &wire::info_block_size(min, pref, max),
                )?;
                reply(&mut t, h.option, rep::ACK, &[])?;
                if h.option == opt::GO {
                    let contexts = match st.contexts.take() {
                        Some((name, c)) if name == req.name || name == export.name => c,
                        _ => Vec::new(),
                    };
                    let session = Session {
                        export,
                        structured: st.structured,
                        extended: st.extended,
                        contexts: contexts
                            .into_iter()
                            .enumerate()
                            .map(|(i, c)| (i as u32 + 1, c))
                            .collect(),
                        flags,
                    };
                    return Ok(Outcome::Transmit(session, t));
                }
            }
            opt::EXPORT_NAME => {
                if st.extended {
                    return Err(ConnError::Protocol(
                        "EXPORT_NAME after extended headers".into(),
                    ));
                }
                let name = String::from_utf8(data)
                    .map_err(|_| ConnError::Protocol("export name is not UTF-8".into()))?;
                let export = match shared.acquire(&name) {
                    Ok(e) => e,
                    // EXPORT_NAME cannot report an error: the connection is closed.
                    Err(r) => {
                        tracing::info!("EXPORT_NAME {name:?} refused: {r:?}");
                        return Ok(Outcome::Done);
                    }
                };
                let flags = transmission_flags(&export, st.structured);
                send(
                    &mut t,
                    &wire::export_name_reply(export.size(), flags, st.no_zeroes),
                )?;
                let session = Session {
                    export,
                    structured: st.structured,
                    extended: false,
                    contexts: Vec::new(),
                    flags,
                };
                return Ok(Outcome::Transmit(session, t));
            }
            other => {
                error(
                    &mut t,
                    other,
                    rep::ERR_UNSUP,
                    &format!("option {other} is not supported"),
                )?;
            }
        }
    }
    Err(ConnError::Protocol(format!(
        "more than {MAX_OPTIONS} options without selecting an export"
    )))
}

fn refuse(t: &mut Transport, option: u32, r: Refusal) -> Result<(), ConnError> {
    match r {
        Refusal::Unknown(m) => error(t, option, rep::ERR_UNKNOWN, &m),
        Refusal::Unavailable(m) => error(t, option, rep::ERR_POLICY, &m),
    }
}

fn meta_context(
    t: &mut Transport,
    shared: &Shared,
    st: &mut State,
    option: u32,
    data: &[u8],
) -> Result<(), ConnError> {
    let set = option == opt::SET_META_CONTEXT;
    if set {
        // A failed selection still replaces the earlier one.
        st.contexts = None;
    }
    if !st.structured {
        return error(
            t,
            option,
            rep::ERR_INVALID,
            "metadata contexts need structured replies (or extended headers) first",
        );
    }
    let req = match wire::parse_meta_request(data) {
        Ok(r) => r,
        Err(e) => return error(t, option, rep::ERR_INVALID, &e.to_string()),
    };
    let export = match shared.acquire(&req.export) {
        Ok(e) => e,
        Err(r) => return refuse(t, option, r),
    };
    if set {
        match context::select(&export, &req.queries) {
            Ok(selected) if selected.len() > MAX_SELECTED_CONTEXTS => {
                return error(
                    t,
                    option,
                    rep::ERR_TOO_BIG,
                    &format!(
                        "{} contexts selected (at most {MAX_SELECTED_CONTEXTS})",
                        selected.len()
                    ),
                );
            }
            Ok(selected) => {
                for (i, c) in selected.iter().enumerate() {
                    reply(
                        t,
                        option,
                        rep::META_CONTEXT,
                        &wire::meta_context_payload(i as u32 + 1, &c.name()),
                    )?;
                }
                st.contexts = Some((req.export, selected));
            }
            Err(m) => return error(t, option, rep::ERR_INVALID, &m),
        }
    } else {
        for name in context::list(&export, &req.queries) {
            reply(
                t,
                option,
                rep::META_CONTEXT,
                &wire::meta_context_payload(0, &name),
            )?;
        }
    }
    reply(t, option, rep::ACK, &[])
}

/// The transmission flags of `export` for a connection (`DF` only with structured
/// replies).
fn transmission_flags(export: &ExportUse, structured: bool) -> u16 {
    let mut f = tflag::HAS_FLAGS | tflag::SEND_FLUSH | tflag::SEND_CACHE | tflag::CAN_MULTI_CONN;
    if export.writable() {
        f |= tflag::SEND_FUA | tflag::SEND_TRIM | tflag::SEND_WRITE_ZEROES | tflag::SEND_FAST_ZERO;
    } else {
        f |= tflag::READ_ONLY;
    }
    if structured {
        f |= tflag::SEND_DF;
    }
    f
}
