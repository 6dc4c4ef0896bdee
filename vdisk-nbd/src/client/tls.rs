//! The client side of `STARTTLS`: a rustls client configuration (ring provider,
//! TLS 1.2 and 1.3) that checks the server against a CA file (or the system bundle)
//! and its host name, or - with a thumbprint, as VDDK does - only against the pinned
//! SHA-1 or SHA-256 of its certificate; an optional client certificate. The
//! handshake and the split stream are the server's ([`crate::tls::TlsStream`]).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore,
    SignatureScheme,
};
use vdisk::{Error, ErrorKind, Result};

use super::{ClientOptions, SYSTEM_CA_BUNDLE};
use crate::tls::{read_pem, HandshakeError, TlsStream};
use crate::transport::{Socket, Transport};

/// A pinned certificate digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Thumbprint {
    /// The digest bytes: 20 (SHA-1) or 32 (SHA-256).
    pub digest: Vec<u8>,
}

impl Thumbprint {
    /// Parses `xx:xx:...` (20 or 32 pairs of hex digits, any case; the colons may
    /// be left out).
    pub fn parse(s: &str) -> Result<Thumbprint> {
        let hex: String = s.trim().chars().filter(|&c| c != ':').collect();
        let bad = || {
            Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "bad thumbprint {s:?}: 20 (SHA-1) or 32 (SHA-256) hex pairs separated by ':' \
                     expected"
                ),
            )
        };
        if !(hex.len() == 40 || hex.len() == 64) || !hex.is_ascii() {
            return Err(bad());
        }
        let digest = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
            .collect::<std::result::Result<Vec<u8>, _>>()
            .map_err(|_| bad())?;
        Ok(Thumbprint { digest })
    }

    /// The same digest of `der`.
    pub fn of(&self, der: &[u8]) -> Thumbprint {
        let alg = if self.digest.len() == 20 {
            &ring::digest::SHA1_FOR_LEGACY_USE_ONLY
        } else {
            &ring::digest::SHA256
        };
        Thumbprint {
            digest: ring::digest::digest(alg, der).as_ref().to_vec(),
        }
    }

    fn name(&self) -> &'static str {
        if self.digest.len() == 20 {
            "SHA-1"
        } else {
            "SHA-256"
        }
    }
}

impl std::fmt::Display for Thumbprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, b) in self.digest.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

/// Accepts exactly the server certificate whose digest is pinned (no CA, no host
/// name, no expiry check - what a thumbprint means in VDDK); the handshake
/// signatures are still verified with the certificate's key.
#[derive(Debug)]
struct PinnedVerifier {
    pin: Thumbprint,
    provider: Arc<CryptoProvider>,
    /// The mismatch, for the error message.
    mismatch: Arc<Mutex<Option<String>>>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let got = self.pin.of(end_entity);
        if got == self.pin {
            return Ok(ServerCertVerified::assertion());
        }
        let m = format!(
            "the server certificate's {} thumbprint is {got}, but {} was expected",
            self.pin.name(),
            self.pin
        );
        if let Ok(mut slot) = self.mismatch.lock() {
            *slot = Some(m);
        }
        Err(rustls::Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure,
        ))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client TLS configuration made from the options, ready for connections.
#[derive(Clone, Debug)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
    mismatch: Arc<Mutex<Option<String>>>,
}

fn setup_error(e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::InvalidArgument, format!("TLS setup: {e}"))
}

impl TlsClient {
    /// Reads the CA file (or the system bundle), the client certificate and key,
    /// or parses the thumbprint.
    pub fn new(opts: &ClientOptions) -> Result<TlsClient> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(setup_error)?;
        let mismatch = Arc::new(Mutex::new(None));
        let builder = match &opts.thumbprint {
            Some(t) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                    pin: Thumbprint::parse(t)?,
                    provider: Arc::clone(&provider),
                    mismatch: Arc::clone(&mismatch),
                })),
            None => {
                let ca = opts
                    .ca_file
                    .as_deref()
                    .unwrap_or(Path::new(SYSTEM_CA_BUNDLE));
                let mut roots = RootCertStore::empty();
                let certs = read_pem::<CertificateDer<'static>>(
                    ca,
                    "CA certificate",
                    "PEM certificate (BEGIN CERTIFICATE)",
                )
                .map_err(setup_error)?;
                // The system bundle may hold certificates webpki cannot parse.
                let (_added, _ignored) = roots.add_parsable_certificates(certs);
                if roots.is_empty() {
                    return Err(setup_error(format!(
                        "{} holds no usable CA certificate",
                        ca.display()
                    )));
                }
                let v = WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots),
                    Arc::clone(&provider),
                )
                .build()
                .map_err(setup_error)?;
                builder.with_webpki_verifier(v)
            }
        };
        let config = match &opts.client_cert {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = read_pem::<CertificateDer<'static>>(
                    cert,
                    "client certificate",
                    "PEM certificate (BEGIN CERTIFICATE)",
                )
                .map_err(setup_error)?;
                let key = read_pem::<PrivateKeyDer<'static>>(
                    key,
                    "client private key",
                    "PEM private key",
                )
                .map_err(setup_error)?
                .remove(0);
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(setup_error)?
            }
        };
        Ok(TlsClient {
            config: Arc::new(config),
            mismatch,
        })
    }

    /// Runs the handshake on `sock` (within `timeout`), checking the server as
    /// `host`.
    pub fn connect(&self, sock: Socket, host: &str, timeout: Duration) -> Result<Transport> {
        let name = ServerName::try_from(host.to_string()).map_err(|_| {
            Error::new(
                ErrorKind::InvalidArgument,
                format!("{host:?} is no host name for TLS"),
            )
        })?;
        let conn = ClientConnection::new(Arc::clone(&self.config), name)
            .map_err(|e| Error::new(ErrorKind::Handshake, format!("TLS: {e}")))?;
        match TlsStream::handshake(conn.into(), sock, timeout) {
            Ok(t) => Ok(Transport::Tls(t)),
            Err(HandshakeError::Tls(e)) => {
                let pinned = self.mismatch.lock().ok().and_then(|mut m| m.take());
                // Certificate refusals are VDDK's VIX_E_FAIL.
                let kind = if matches!(e, rustls::Error::InvalidCertificate(_)) {
                    ErrorKind::Fail
                } else {
                    ErrorKind::Handshake
                };
                Err(Error::new(
                    kind,
                    match pinned {
                        Some(m) => format!("TLS handshake refused: {m}"),
                        None => format!("TLS handshake failed: {e}"),
                    },
                ))
            }
            Err(HandshakeError::TimedOut) => Err(Error::new(
                ErrorKind::TimedOut,
                format!("the TLS handshake took longer than {timeout:?}"),
            )),
            Err(HandshakeError::Closed) => Err(Error::new(
                ErrorKind::Handshake,
                "the server closed the connection during the TLS handshake (does it accept \
                 this client certificate?)",
            )),
            Err(HandshakeError::Io(e)) => Err(Error::new(
                ErrorKind::Handshake,
                format!("the TLS handshake failed: {e}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thumbprints_parse_in_any_case() {
        let sha1 = "AB:cd:00:11:22:33:44:55:66:77:88:99:aa:bb:cc:dd:ee:ff:01:02";
        let t = Thumbprint::parse(sha1).unwrap();
        assert_eq!(t.digest.len(), 20);
        assert_eq!(t.to_string(), sha1.to_uppercase());
        let sha256 = ["0f"; 32].join(":");
        assert_eq!(Thumbprint::parse(&sha256).unwrap().digest.len(), 32);
        for bad in ["", "ab:cd", &["zz"; 20].join(":"), &["0f"; 21].join(":")] {
            assert_eq!(
                Thumbprint::parse(bad).unwrap_err().kind(),
                ErrorKind::InvalidArgument
            );
        }
        // Digests of the DER as given.
        let d = Thumbprint::parse(sha1).unwrap().of(b"abc");
        assert_eq!(
            d.to_string(),
            "A9:99:3E:36:47:06:81:6A:BA:3E:25:71:78:50:C2:6C:9C:D0:D8:9D"
        );
    }
}
