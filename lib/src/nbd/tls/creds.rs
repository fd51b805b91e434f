//! Credentials from a QEMU-style directory (`ca-cert.pem`,
//! `server-cert.pem`, `server-key.pem`, `client-cert.pem`,
//! `client-key.pem`) turned into rustls configurations for either end,
//! with the certificate checks QEMU makes: the peer's chain against the
//! CA, the server's name against the host connected to, and the
//! client's distinguished name against an access list.

use super::authz::Authz;
use super::dn::subject_dn;
use super::engine::{Engine, MemIo};
use super::psk::{client_context, server_context, PskKeys, PSK_FILE};
use crate::{Error, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::path::Path;
use std::sync::Arc;

/// File names inside a credential directory, as QEMU lays it out.
pub const CA_CERT: &str = "ca-cert.pem";
/// The server's certificate chain.
pub const SERVER_CERT: &str = "server-cert.pem";
/// The server's private key.
pub const SERVER_KEY: &str = "server-key.pem";
/// The client's certificate chain (optional on the client side).
pub const CLIENT_CERT: &str = "client-cert.pem";
/// The client's private key.
pub const CLIENT_KEY: &str = "client-key.pem";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn cred_error(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::invalid(format!("Unable to access credentials {}: {why}", path.display()))
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let iter = CertificateDer::pem_file_iter(path).map_err(|e| cred_error(path, pem_message(&e)))?;
    let certs = iter.collect::<std::result::Result<Vec<_>, _>>().map_err(|e| cred_error(path, pem_message(&e)))?;
    if certs.is_empty() {
        return Err(cred_error(path, "no certificate in the file"));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| cred_error(path, pem_message(&e)))
}

fn pem_message(e: &rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(io) => {
            // strerror's text, without Rust's " (os error N)".
            let s = io.to_string();
            s.split(" (os error ").next().unwrap_or_default().to_string()
        }
        rustls::pki_types::pem::Error::NoItemsFound => "no PEM item of the expected kind".into(),
        other => format!("{other:?}"),
    }
}

fn load_roots(dir: &Path) -> Result<Arc<RootCertStore>> {
    let path = dir.join(CA_CERT);
    let mut roots = RootCertStore::empty();
    for c in load_certs(&path)? {
        roots.add(c).map_err(|e| cred_error(&path, e))?;
    }
    Ok(Arc::new(roots))
}

fn tls_config_error(e: rustls::Error) -> Error {
    Error::invalid(format!("TLS configuration: {e}"))
}

/// What a server needs to speak TLS: its rustls configuration
/// (certificates) or OpenSSL context (pre-shared keys).
#[derive(Clone)]
pub struct TlsServer {
    config: Config<rustls::ServerConfig>,
    /// Clients must present a certificate (checked once the handshake is
    /// over, as QEMU does, see [`TlsServer::check_client`]).
    verify_peer: bool,
    /// The access list on the client certificate's subject.
    authz: Option<Authz>,
}

#[derive(Clone)]
enum Config<R> {
    X509(Arc<R>),
    Psk(openssl::ssl::SslContext),
}

fn openssl_session(ctx: &openssl::ssl::SslContext, server: bool) -> std::io::Result<Engine> {
    let mut ssl = openssl::ssl::Ssl::new(ctx).map_err(|e| std::io::Error::other(format!("TLS: {e}")))?;
    if server {
        ssl.set_accept_state();
    } else {
        ssl.set_connect_state();
    }
    let stream =
        openssl::ssl::SslStream::new(ssl, MemIo::default()).map_err(|e| std::io::Error::other(format!("TLS: {e}")))?;
    Ok(Engine::Openssl(Box::new(stream)))
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsServer").finish_non_exhaustive()
    }
}

impl TlsServer {
    /// Loads `ca-cert.pem` (required even when clients present no
    /// certificate, as QEMU requires it), `server-cert.pem` and
    /// `server-key.pem` from `dir`; with `verify_peer`, clients must
    /// present a certificate the CA signed.
    /// With `authz`, a client is let in only if its certificate's subject
    /// (see [`subject_dn`]) passes it, which needs `verify_peer`.
    pub fn from_x509_dir(dir: &Path, verify_peer: bool, authz: Option<Authz>) -> Result<TlsServer> {
        let roots = load_roots(dir)?;
        let certs = load_certs(&dir.join(SERVER_CERT))?;
        let key = load_key(&dir.join(SERVER_KEY))?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(tls_config_error)?;
        let builder = if verify_peer {
            // A client without a certificate completes the handshake and is
            // refused right after it, before any option is read (QEMU's
            // order, and its words); one that presents a certificate has
            // its chain checked in the handshake.
            let inner = WebPkiClientVerifier::builder_with_provider(roots, provider())
                .allow_unauthenticated()
                .build()
                .map_err(|e| Error::invalid(format!("TLS configuration: {e}")))?;
            builder.with_client_cert_verifier(inner)
        } else {
            if authz.is_some() {
                return Err(Error::invalid(
                    "an access list (--tls-authz) needs client certificates: set verify-peer=on",
                ));
            }
            builder.with_no_client_auth()
        };
        let mut config = builder.with_single_cert(certs, key).map_err(tls_config_error)?;
        // No session tickets after the handshake, as QEMU's server sends
        // none: a client that refuses our certificate and hangs up must
        // not find unread tickets, which would turn its close into a reset.
        config.send_tls13_tickets = 0;
        Ok(TlsServer { config: Config::X509(Arc::new(config)), verify_peer, authz })
    }

    /// Loads `keys.psk` from `dir` (QEMU's `tls-creds-psk`): a client gets
    /// in with a username the file lists and the same key, and, with
    /// `authz`, only if the access list lets that username in.
    pub fn from_psk_dir(dir: &Path, authz: Option<Authz>) -> Result<TlsServer> {
        let keys = PskKeys::load(&dir.join(PSK_FILE))?;
        Ok(TlsServer { config: Config::Psk(server_context(keys, authz)?), verify_peer: false, authz: None })
    }

    /// The checks QEMU makes once the handshake is over, before reading
    /// any option: with verify-peer, a client certificate must have been
    /// presented (its chain was checked in the handshake), and its
    /// subject must pass the access list. The error words are QEMU's.
    pub fn check_client(&self, peer: Option<&[CertificateDer<'static>]>) -> std::io::Result<()> {
        if !self.verify_peer {
            return Ok(());
        }
        let refused = |m: String| std::io::Error::new(std::io::ErrorKind::PermissionDenied, m);
        let Some(cert) = peer.and_then(|c| c.first()) else {
            return Err(refused("Verify failed: No certificate was found.".into()));
        };
        if let Some(authz) = &self.authz {
            let dn = subject_dn(cert).ok_or_else(|| refused("Verify failed: The certificate is not valid.".into()))?;
            if !authz.is_allowed(&dn) {
                return Err(refused(format!("TLS x509 authz check for {dn} is denied")));
            }
        }
        Ok(())
    }

    /// A fresh server session.
    pub(crate) fn session(&self) -> std::io::Result<Engine> {
        match &self.config {
            Config::X509(c) => rustls::ServerConnection::new(Arc::clone(c))
                .map(|c| Engine::Rustls(Box::new(rustls::Connection::Server(c))))
                .map_err(|e| std::io::Error::other(format!("TLS: {e}"))),
            Config::Psk(ctx) => openssl_session(ctx, true),
        }
    }
}

/// What a client needs to speak TLS: its configuration and the name the
/// server's certificate must carry.
#[derive(Clone)]
pub struct TlsClient {
    config: Config<rustls::ClientConfig>,
    hostname: Option<String>,
    /// The server-certificate check made once the handshake is over
    /// (none with verify-peer off, nor for pre-shared keys).
    verifier: Option<Arc<WebPkiServerVerifier>>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient").field("hostname", &self.hostname).finish_non_exhaustive()
    }
}

impl TlsClient {
    /// Loads `ca-cert.pem` and, if present, `client-cert.pem` and
    /// `client-key.pem` from `dir`. With `verify_peer` off, any server
    /// certificate is accepted (the link is encrypted, not authenticated).
    pub fn from_x509_dir(dir: &Path, verify_peer: bool) -> Result<TlsClient> {
        let verifier = if verify_peer {
            let inner = WebPkiServerVerifier::builder_with_provider(load_roots(dir)?, provider())
                .build()
                .map_err(|e| Error::invalid(format!("TLS configuration: {e}")))?;
            Some(inner)
        } else {
            None
        };
        // The handshake checks the server's signatures only; its chain
        // and name are checked by `check_server` once it is over, before
        // a byte of NBD goes through the session (QEMU's order, so each
        // end reports a refusal as QEMU's does).
        let handshake_verifier = Arc::new(ServerVerifier { provider: provider() });
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(tls_config_error)?
            .dangerous()
            .with_custom_certificate_verifier(handshake_verifier);
        let (cert, key) = (dir.join(CLIENT_CERT), dir.join(CLIENT_KEY));
        let config = if cert.exists() || key.exists() {
            let resolver = HintedClientCert::new(load_certs(&cert)?, load_key(&key)?)?;
            builder.with_client_cert_resolver(Arc::new(resolver))
        } else {
            builder.with_no_client_auth()
        };
        Ok(TlsClient { config: Config::X509(Arc::new(config)), hostname: None, verifier })
    }

    /// Presents `username` with its key from the `keys.psk` file at
    /// `path` (QEMU's client `tls-creds-psk`); the server is trusted for
    /// knowing the same key, so no host name is checked.
    pub fn from_psk_file(path: &Path, username: &str) -> Result<TlsClient> {
        let keys = PskKeys::load(path)?;
        Ok(TlsClient { config: Config::Psk(client_context(&keys, username, path)?), hostname: None, verifier: None })
    }

    /// The name the server's certificate must carry (QEMU's
    /// `tls-hostname`); by default the host connected to, and none for
    /// Unix sockets (the chain is still checked, as libnbd does). The
    /// empty name is QEMU's rule for a Unix socket without one: the
    /// certificate is refused ("No hostname for certificate validation").
    pub fn with_hostname(mut self, hostname: Option<String>) -> TlsClient {
        self.hostname = hostname;
        self
    }

    /// The name set by [`TlsClient::with_hostname`].
    pub fn hostname(&self) -> Option<&str> {
        self.hostname.as_deref()
    }

    /// A fresh client session for a server reached as `host` (`None` for a
    /// Unix socket); [`TlsClient::with_hostname`] overrides it.
    pub(crate) fn session(&self, host: Option<&str>) -> std::io::Result<Engine> {
        let config = match &self.config {
            Config::X509(c) => c,
            Config::Psk(ctx) => return openssl_session(ctx, false),
        };
        let name = self.hostname.as_deref().filter(|h| !h.is_empty()).or(host).unwrap_or(UNCHECKED_NAME).to_string();
        let server_name = ServerName::try_from(name.clone()).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("invalid TLS host name '{name}'"))
        })?;
        rustls::ClientConnection::new(Arc::clone(config), server_name)
            .map(|c| Engine::Rustls(Box::new(rustls::Connection::Client(c))))
            .map_err(|e| std::io::Error::other(format!("TLS: {e}")))
    }
}

impl TlsClient {
    /// The server-certificate check, once the handshake with a server
    /// reached as `host` is over (see [`TlsClient::session`]): the chain
    /// against the CA, then the name. Errors carry GnuTLS's words, as QEMU
    /// passes them on.
    pub fn check_server(&self, peer: Option<&[CertificateDer<'static>]>, host: Option<&str>) -> std::io::Result<()> {
        let Some(verifier) = &self.verifier else {
            return Ok(());
        };
        let refused = |m: String| std::io::Error::new(std::io::ErrorKind::PermissionDenied, m);
        let Some((end_entity, intermediates)) = peer.and_then(|c| c.split_first()) else {
            return Err(refused("No certificate was found.".into()));
        };
        let name = match self.hostname.as_deref().or(host) {
            // QEMU's refusal (see `with_hostname`).
            Some("") => return Err(refused("No hostname for certificate validation".into())),
            Some(n) => n,
            None => UNCHECKED_NAME,
        };
        let server_name = ServerName::try_from(name.to_string())
            .map_err(|_| refused(format!("Certificate does not match the hostname {name}")))?;
        match verifier.verify_server_cert(end_entity, intermediates, &server_name, &[], UnixTime::now()) {
            Ok(_) => Ok(()),
            // No name to check: the chain was checked before the name.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if name == UNCHECKED_NAME => Ok(()),
            Err(rustls::Error::InvalidCertificate(e)) => Err(refused(match e {
                CertificateError::UnknownIssuer => "The certificate hasn't got a known issuer".into(),
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                    format!("Certificate does not match the hostname {name}")
                }
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    "The certificate has expired".into()
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    "The certificate is not yet activated".into()
                }
                CertificateError::Revoked => "The certificate has been revoked".into(),
                other => format!("The certificate is not trusted: {other:?}"),
            })),
            Err(e) => Err(refused(format!("The certificate is not trusted: {e}"))),
        }
    }
}

/// The client certificate, offered as GnuTLS offers it: only when the
/// server names no acceptable CA or names the one that issued it (a
/// client of another CA then presents none, and the server says so).
#[derive(Debug)]
struct HintedClientCert {
    key: Arc<rustls::sign::CertifiedKey>,
    /// The DER of the certificate's issuer name, as CA hints carry it.
    issuer: Option<Vec<u8>>,
}

impl HintedClientCert {
    fn new(certs: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<HintedClientCert> {
        let issuer = certs.first().and_then(|c| {
            x509_parser::parse_x509_certificate(c.as_ref()).ok().map(|(_, x)| x.issuer().as_raw().to_vec())
        });
        let signer = provider().key_provider.load_private_key(key).map_err(tls_config_error)?;
        Ok(HintedClientCert { key: Arc::new(rustls::sign::CertifiedKey::new(certs, signer)), issuer })
    }
}

impl rustls::client::ResolvesClientCert for HintedClientCert {
    fn resolve(&self, hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<rustls::sign::CertifiedKey>> {
        match &self.issuer {
            Some(issuer) if !hints.is_empty() && !hints.contains(&issuer.as_slice()) => None,
            _ => Some(Arc::clone(&self.key)),
        }
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// The server name given to rustls when there is none to check (Unix
/// sockets without `tls-hostname`, libnbd's way): a reserved name no
/// certificate should carry, which [`TlsClient::check_server`] exempts
/// from the name check.
const UNCHECKED_NAME: &str = "unchecked.oxcow.invalid";

/// The handshake's view of the server certificate: its signatures are
/// checked (the server proves it holds the key); the chain and the name
/// are [`TlsClient::check_server`]'s, right after the handshake.
#[derive(Debug)]
struct ServerVerifier {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
