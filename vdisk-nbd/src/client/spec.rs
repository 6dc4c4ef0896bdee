//! [`RemoteSpec`]: everything needed to open an export again - where, which, and
//! how (TLS, pinned certificate, CA, client certificate, read-only, limits) - and
//! its text form, for a program part that gets an open remote disk from another
//! one it shares no Rust types with (libvixMntapi asks libvixDiskLib, a separate
//! shared object, how one of its disk handles reached its server).
//!
//! The text is one `key=value` per line; values are percent-encoded (`%`, control
//! characters and bytes above 0x7e as `%XX`), so paths of any bytes fit. The first
//! line is `uri=` with the NBD URI of the export (`nbds` when TLS is used), then
//! `socket=` (a Unix socket's path, byte for byte) and the options; unknown keys
//! are ignored, missing ones keep [`ClientOptions::default`].

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::time::Duration;

use vdisk::{Error, ErrorKind, Result};

use super::uri::{parse_uri, NbdUri};
use super::{ClientOptions, Endpoint, RemoteDisk, TlsPolicy};

/// How to reach one export: a [`RemoteDisk`] opened again with [`RemoteSpec::open`]
/// connects to the same server, the same export, with the same options.
#[derive(Clone, Debug)]
pub struct RemoteSpec {
    /// Where the server listens.
    pub endpoint: Endpoint,
    /// The export's name.
    pub export: String,
    /// How to connect.
    pub options: ClientOptions,
}

fn bad(why: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::InvalidArgument,
        format!("bad remote disk description: {why}"),
    )
}

/// `%XX` for `%`, control characters, and bytes outside printable ASCII.
fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn unescape(s: &str) -> Result<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let v = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| bad(format!("{s:?}: a % not followed by two hex digits")))?;
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn text(v: &str) -> Result<String> {
    String::from_utf8(unescape(v)?).map_err(|_| bad(format!("{v:?} is not UTF-8")))
}

fn path(v: &str) -> Result<PathBuf> {
    Ok(PathBuf::from(OsString::from_vec(unescape(v)?)))
}

fn number<T: std::str::FromStr>(key: &str, v: &str) -> Result<T> {
    v.parse()
        .map_err(|_| bad(format!("{key}={v:?} is not a number")))
}

impl RemoteSpec {
    /// The NBD URI of the export (`nbds` or `nbds+unix` when TLS is used): what
    /// messages and mount tables name it by. Options beyond TLS are not in it.
    pub fn uri(&self) -> String {
        NbdUri {
            endpoint: self.endpoint.clone(),
            export: self.export.clone(),
            tls: self.options.wants_tls(),
            tls_certificates: None,
        }
        .to_string()
    }

    /// The text form (see the module documentation).
    pub fn to_text(&self) -> String {
        let o = &self.options;
        let mut lines = vec![format!("uri={}", escape(self.uri().as_bytes()))];
        let mut add = |k: &str, v: &[u8]| lines.push(format!("{k}={}", escape(v)));
        if let Endpoint::Unix(p) = &self.endpoint {
            // Exactly (the URI holds the path as UTF-8 text).
            add("socket", p.as_os_str().as_bytes());
        }
        if let Some(t) = &o.thumbprint {
            add("thumbprint", t.as_bytes());
        }
        if let Some(p) = &o.ca_file {
            add("ca_file", p.as_os_str().as_bytes());
        }
        if let Some((cert, key)) = &o.client_cert {
            add("client_cert", cert.as_os_str().as_bytes());
            add("client_key", key.as_os_str().as_bytes());
        }
        if let Some(h) = &o.tls_hostname {
            add("tls_hostname", h.as_bytes());
        }
        add("read_only", if o.read_only { b"1" } else { b"0" });
        add("connections", o.connections.to_string().as_bytes());
        add("max_in_flight", o.max_in_flight.to_string().as_bytes());
        add(
            "max_in_flight_bytes",
            o.max_in_flight_bytes.to_string().as_bytes(),
        );
        add(
            "connect_timeout_ms",
            o.connect_timeout.as_millis().to_string().as_bytes(),
        );
        add(
            "request_timeout_ms",
            o.request_timeout.as_millis().to_string().as_bytes(),
        );
        let mut out = lines.join("\n");
        out.push('\n');
        out
    }

    /// Parses [`RemoteSpec::to_text`]'s form.
    pub fn from_text(s: &str) -> Result<RemoteSpec> {
        let mut uri = None;
        let mut o = ClientOptions::default();
        let mut cert = None;
        let mut key = None;
        let mut socket = None;
        for line in s.lines().filter(|l| !l.trim().is_empty()) {
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| bad(format!("{line:?} is not key=value")))?;
            match k {
                "uri" => uri = Some(text(v)?),
                "socket" => socket = Some(path(v)?),
                "thumbprint" => o.thumbprint = Some(text(v)?),
                "ca_file" => o.ca_file = Some(path(v)?),
                "client_cert" => cert = Some(path(v)?),
                "client_key" => key = Some(path(v)?),
                "tls_hostname" => o.tls_hostname = Some(text(v)?),
                "read_only" => o.read_only = v == "1",
                "connections" => o.connections = number(k, v)?,
                "max_in_flight" => o.max_in_flight = number(k, v)?,
                "max_in_flight_bytes" => o.max_in_flight_bytes = number(k, v)?,
                "connect_timeout_ms" => o.connect_timeout = Duration::from_millis(number(k, v)?),
                "request_timeout_ms" => o.request_timeout = Duration::from_millis(number(k, v)?),
                _ => {}
            }
        }
        o.client_cert = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => return Err(bad("a client certificate without its key, or a key alone")),
        };
        let uri = parse_uri(&uri.ok_or_else(|| bad("no uri= line"))?)?;
        if uri.tls {
            o.tls = TlsPolicy::Require;
        }
        let endpoint = match (uri.endpoint, socket) {
            (Endpoint::Unix(_), Some(p)) => Endpoint::Unix(p),
            (e, _) => e,
        };
        Ok(RemoteSpec {
            endpoint,
            export: uri.export,
            options: o,
        })
    }

    /// Opens the export.
    pub fn open(&self) -> Result<RemoteDisk> {
        RemoteDisk::open(&self.endpoint, &self.export, &self.options)
    }

    /// The same export, opened read-only or not.
    pub fn read_only(&self, read_only: bool) -> RemoteSpec {
        let mut s = self.clone();
        s.options.read_only = read_only;
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_round_trip_through_text() {
        let s = RemoteSpec {
            endpoint: Endpoint::Unix(PathBuf::from(OsString::from_vec(
                b"/tmp/a b/\xffsock%".to_vec(),
            ))),
            export: "[datastore1] vm/vm.vmdk".into(),
            options: ClientOptions {
                tls: TlsPolicy::Require,
                thumbprint: Some("AA:BB".into()),
                ca_file: Some("/etc/ca\nx.pem".into()),
                client_cert: Some(("/c.pem".into(), "/k.pem".into())),
                tls_hostname: Some("server".into()),
                read_only: true,
                connections: 2,
                max_in_flight: 7,
                max_in_flight_bytes: 12345,
                connect_timeout: Duration::from_millis(1500),
                request_timeout: Duration::from_secs(9),
            },
        };
        let t = s.to_text();
        assert!(t.starts_with("uri=nbds+unix:///"), "{t}");
        assert!(t.contains("ca_file=/etc/ca%0Ax.pem\n"), "{t}");
        let back = RemoteSpec::from_text(&t).unwrap();
        assert_eq!(back.endpoint, s.endpoint);
        assert_eq!(back.export, s.export);
        assert_eq!(format!("{:?}", back.options), format!("{:?}", s.options));
        assert_eq!(back.uri(), s.uri());

        let plain = RemoteSpec {
            endpoint: Endpoint::Tcp {
                host: "::1".into(),
                port: 10810,
            },
            export: "e".into(),
            options: ClientOptions::default(),
        };
        assert_eq!(plain.uri(), "nbd://[::1]:10810/e");
        let back = RemoteSpec::from_text(&plain.to_text()).unwrap();
        assert_eq!(back.endpoint, plain.endpoint);
        assert_eq!(back.options.tls, TlsPolicy::Off);
        assert!(!back.read_only(false).options.read_only);
        assert!(back.read_only(true).options.read_only);
    }

    #[test]
    fn bad_specs_are_refused() {
        for t in [
            "",
            "thumbprint=x\n",
            "uri=nbd://h/e\nclient_cert=/c\n",
            "uri=nbd://h/e\nconnections=many\n",
            "uri=nbd://h/e\nca_file=%zz\n",
            "uri=nbd://h/e\njunk\n",
            "uri=http://h/e\n",
        ] {
            assert!(RemoteSpec::from_text(t).is_err(), "{t:?}");
        }
        let s = RemoteSpec::from_text("uri=nbd://h/e\nfuture_key=1\n").unwrap();
        assert_eq!(s.export, "e");
    }
}
