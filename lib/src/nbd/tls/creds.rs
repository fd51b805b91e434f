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
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
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
            let inner = WebPkiClientVerifier::builder_with_provider(roots, provider())
                .build()
                .map_err(|e| Error::invalid(format!("TLS configuration: {e}")))?;
            builder.with_client_cert_verifier(Arc::new(AuthzClientVerifier { inner, authz }))
        } else {
            if authz.is_some() {
                return Err(Error::invalid(
                    "an access list (--tls-authz) needs client certificates: set verify-peer=on",
                ));
            }
            builder.with_no_client_auth()
        };
        let config = builder.with_single_cert(certs, key).map_err(tls_config_error)?;
        Ok(TlsServer { config: Config::X509(Arc::new(config)) })
    }

    /// Loads `keys.psk` from `dir` (QEMU's `tls-creds-psk`): a client gets
    /// in with a username the file lists and the same key, and, with
    /// `authz`, only if the access list lets that username in.
    pub fn from_psk_dir(dir: &Path, authz: Option<Authz>) -> Result<TlsServer> {
        let keys = PskKeys::load(&dir.join(PSK_FILE))?;
        Ok(TlsServer { config: Config::Psk(server_context(keys, authz)?) })
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
        let verifier: Arc<dyn ServerCertVerifier> = if verify_peer {
            let inner = WebPkiServerVerifier::builder_with_provider(load_roots(dir)?, provider())
                .build()
                .map_err(|e| Error::invalid(format!("TLS configuration: {e}")))?;
            Arc::new(ServerVerifier { inner: Some(inner), provider: provider() })
        } else {
            Arc::new(ServerVerifier { inner: None, provider: provider() })
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(tls_config_error)?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let (cert, key) = (dir.join(CLIENT_CERT), dir.join(CLIENT_KEY));
        let config = if cert.exists() || key.exists() {
            builder.with_client_auth_cert(load_certs(&cert)?, load_key(&key)?).map_err(tls_config_error)?
        } else {
            builder.with_no_client_auth()
        };
        Ok(TlsClient { config: Config::X509(Arc::new(config)), hostname: None })
    }

    /// Presents `username` with its key from the `keys.psk` file at
    /// `path` (QEMU's client `tls-creds-psk`); the server is trusted for
    /// knowing the same key, so no host name is checked.
    pub fn from_psk_file(path: &Path, username: &str) -> Result<TlsClient> {
        let keys = PskKeys::load(path)?;
        Ok(TlsClient { config: Config::Psk(client_context(&keys, username, path)?), hostname: None })
    }

    /// The name the server's certificate must carry (QEMU's
    /// `tls-hostname`); by default the host connected to, and none for
    /// Unix sockets (the chain is still checked).
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
        let name = self.hostname.as_deref().or(host).unwrap_or(UNCHECKED_NAME).to_string();
        let server_name = ServerName::try_from(name.clone()).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("invalid TLS host name '{name}'"))
        })?;
        rustls::ClientConnection::new(Arc::clone(config), server_name)
            .map(|c| Engine::Rustls(Box::new(rustls::Connection::Client(c))))
            .map_err(|e| std::io::Error::other(format!("TLS: {e}")))
    }
}

/// The server name given to rustls when there is none to check (Unix
/// sockets without `tls-hostname`, as QEMU does): a reserved name no
/// certificate should carry, which [`ServerVerifier`] exempts from the
/// name check.
const UNCHECKED_NAME: &str = "unchecked.oxcow.invalid";

/// The server-certificate check: the chain against the CA and the name
/// (unless there is none to check), or nothing at all with verify-peer off.
#[derive(Debug)]
struct ServerVerifier {
    inner: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let Some(inner) = &self.inner else {
            return Ok(ServerCertVerified::assertion());
        };
        match inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            // The chain was checked before the name.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if server_name.to_str() == UNCHECKED_NAME => Ok(ServerCertVerified::assertion()),
            other => other,
        }
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

/// The client-certificate check: the chain against the CA, then the
/// subject against the access list, so a refused client fails the
/// handshake itself, before it can send a single NBD option.
#[derive(Debug)]
struct AuthzClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    authz: Option<Authz>,
}

impl ClientCertVerifier for AuthzClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        if let Some(authz) = &self.authz {
            let dn = subject_dn(end_entity).ok_or(rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
            if !authz.is_allowed(&dn) {
                return Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure));
            }
        }
        Ok(verified)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
