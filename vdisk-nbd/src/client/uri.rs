//! NBD URIs as libnbd and qemu read them (NetworkBlockDevice/nbd `doc/uri.md`):
//! `nbd://host[:port]/export`, `nbds://...` (TLS), `nbd+unix:///export?socket=PATH`,
//! `nbds+unix:///export?socket=PATH`; IPv6 hosts in brackets, the export and the
//! socket path percent-decoded, port 10809 by default. `tls-certificates=DIR`
//! names a folder laid out as libnbd and qemu expect (`ca-cert.pem`,
//! `client-cert.pem`, `client-key.pem`); a user name (`user@`) and other query
//! parameters are accepted and ignored.

use std::fmt;
use std::path::PathBuf;

use vdisk::{Error, ErrorKind, Result};

use super::{Endpoint, DEFAULT_PORT};

/// A parsed NBD URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    /// Where the server listens.
    pub endpoint: Endpoint,
    /// The export name (decoded; empty: the default export).
    pub export: String,
    /// Whether the scheme asks for TLS (`nbds`).
    pub tls: bool,
    /// `tls-certificates=DIR`: the folder of the CA and client certificates.
    pub tls_certificates: Option<PathBuf>,
}

fn bad(uri: &str, why: impl fmt::Display) -> Error {
    Error::new(
        ErrorKind::InvalidArgument,
        format!("bad NBD URI {uri:?}: {why}"),
    )
}

/// Decodes `%XX` escapes (the result must be UTF-8).
fn percent_decode(s: &str, uri: &str) -> Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| bad(uri, "a % not followed by two hex digits"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad(uri, "a decoded part is not UTF-8"))
}

/// Percent-encodes what a URI path or query value cannot hold as it is.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/:@!$'()*+,;=".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Parses an NBD URI.
pub fn parse_uri(s: &str) -> Result<NbdUri> {
    let (scheme, rest) = s
        .split_once("://")
        .ok_or_else(|| bad(s, "no scheme (nbd://, nbds://, nbd+unix://, nbds+unix://)"))?;
    let (tls, unix) = match scheme.to_ascii_lowercase().as_str() {
        "nbd" => (false, false),
        "nbds" => (true, false),
        "nbd+unix" => (false, true),
        "nbds+unix" => (true, true),
        other => return Err(bad(s, format!("unknown scheme {other:?}"))),
    };
    // Fragment, then query.
    let rest = rest.split_once('#').map_or(rest, |(r, _)| r);
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    // The export: the path without its first '/'.
    let export = percent_decode(path.strip_prefix('/').unwrap_or(path), s)?;
    let mut socket = None;
    let mut tls_certificates = None;
    for pair in query.into_iter().flat_map(|q| q.split('&')) {
        if let Some(v) = pair.strip_prefix("socket=") {
            socket = Some(percent_decode(v, s)?);
        } else if let Some(v) = pair.strip_prefix("tls-certificates=") {
            tls_certificates = Some(PathBuf::from(percent_decode(v, s)?));
        }
    }
    // A user name is NBD's PSK identity; not used (X.509 only).
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let endpoint = if unix {
        if !host_port.is_empty() {
            return Err(bad(
                s,
                "a Unix socket URI names no host (nbd+unix:///export?socket=PATH)",
            ));
        }
        match socket {
            Some(p) if !p.is_empty() => Endpoint::Unix(PathBuf::from(p)),
            _ => return Err(bad(s, "no socket=PATH")),
        }
    } else {
        let (host, port) = if let Some(r) = host_port.strip_prefix('[') {
            let (h, after) = r
                .split_once(']')
                .ok_or_else(|| bad(s, "an IPv6 address without its ']'"))?;
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| bad(s, "junk after the IPv6 address"))?,
                ),
            };
            (h, port)
        } else {
            match host_port.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (host_port, None),
            }
        };
        if host.is_empty() {
            return Err(bad(s, "no host"));
        }
        let port = match port {
            None | Some("") => DEFAULT_PORT,
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| bad(s, format!("bad port {p:?}")))?,
        };
        Endpoint::Tcp {
            host: percent_decode(host, s)?,
            port,
        }
    };
    Ok(NbdUri {
        endpoint,
        export,
        tls,
        tls_certificates,
    })
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = if self.tls { "s" } else { "" };
        let export = percent_encode(&self.export);
        match &self.endpoint {
            Endpoint::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd{s}://[{host}]:{port}/{export}")
            }
            Endpoint::Tcp { host, port } => write!(f, "nbd{s}://{host}:{port}/{export}"),
            Endpoint::Unix(p) => write!(
                f,
                "nbd{s}+unix:///{export}?socket={}",
                percent_encode(&p.display().to_string())
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16) -> Endpoint {
        Endpoint::Tcp {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn tcp_uris() {
        let u = parse_uri("nbd://example.com/disk").unwrap();
        assert_eq!(u.endpoint, tcp("example.com", 10809));
        assert_eq!(u.export, "disk");
        assert!(!u.tls);
        let u = parse_uri("nbds://127.0.0.1:10810/%5Bdatastore1%5D%20vm/vm.vmdk").unwrap();
        assert_eq!(u.endpoint, tcp("127.0.0.1", 10810));
        assert_eq!(u.export, "[datastore1] vm/vm.vmdk");
        assert!(u.tls);
        let u = parse_uri("nbd://[::1]:4000/e?tls-certificates=/x").unwrap();
        assert_eq!(u.endpoint, tcp("::1", 4000));
        assert_eq!(u.export, "e");
        let u = parse_uri("nbd://[fe80::1]").unwrap();
        assert_eq!(u.endpoint, tcp("fe80::1", 10809));
        assert_eq!(u.export, "");
        let u = parse_uri("nbd://alice@h:1/").unwrap();
        assert_eq!(u.endpoint, tcp("h", 1));
        assert_eq!(u.export, "");
        let u = parse_uri("nbd://h//abs").unwrap();
        assert_eq!(u.export, "/abs");
    }

    #[test]
    fn unix_uris() {
        let u = parse_uri("nbd+unix:///d.vmdk?socket=/tmp/a%20b.sock").unwrap();
        assert_eq!(u.endpoint, Endpoint::Unix("/tmp/a b.sock".into()));
        assert_eq!(u.export, "d.vmdk");
        let u = parse_uri("nbds+unix://?socket=/s&x=1").unwrap();
        assert!(u.tls);
        assert_eq!(u.export, "");
        assert_eq!(u.endpoint, Endpoint::Unix("/s".into()));
    }

    #[test]
    fn bad_uris_are_invalid_arguments() {
        for s in [
            "disk",
            "http://h/e",
            "nbd://",
            "nbd://h:99999/e",
            "nbd://h:x/e",
            "nbd://[::1/e",
            "nbd+unix:///e",
            "nbd+unix://h/e?socket=/s",
            "nbd://h/%zz",
            "nbd://h/%ff",
        ] {
            let e = parse_uri(s).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{s}");
        }
    }

    #[test]
    fn uris_round_trip_through_display() {
        for s in [
            "nbd://h:10809/%5Bds%5D%20vm/vm.vmdk",
            "nbds://[::1]:1/e",
            "nbd+unix:///d?socket=/tmp/x%20y",
        ] {
            let u = parse_uri(s).unwrap();
            assert_eq!(u.to_string(), s);
            assert_eq!(parse_uri(&u.to_string()).unwrap(), u);
        }
    }
}
