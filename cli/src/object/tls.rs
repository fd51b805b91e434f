//! `tls-creds-x509` and `tls-creds-psk`: a credential directory in QEMU's
//! layout and which end of the connection it is for.

use super::{Object, Props};
use crate::error::{message, CliError, CliResult};
use oxcow::nbd::client::{UrlPsk, UrlTls};
use oxcow::nbd::tls::{Authz, TlsClient, TlsServer, DEFAULT_USERNAME, PSK_FILE};
use std::path::PathBuf;

/// Which end of a connection credentials are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// Connecting out (the default, as in QEMU).
    Client,
    /// Accepting connections.
    Server,
}

/// The kind of credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredsKind {
    /// Certificates; `verify_peer` checks the other end's (default on).
    X509 { verify_peer: bool },
    /// Pre-shared keys in `keys.psk` (`username:hexkey` lines).
    Psk { username: Option<String> },
}

/// A `tls-creds-*` object.
#[derive(Debug, Clone)]
pub struct TlsCreds {
    pub dir: PathBuf,
    pub endpoint: Endpoint,
    pub kind: CredsKind,
}

fn common(p: &mut Props) -> CliResult<(PathBuf, Endpoint)> {
    let endpoint = p.take_enum("endpoint", &[("client", Endpoint::Client), ("server", Endpoint::Server)])?;
    if p.take("priority").is_some() {
        // rustls has no gnutls priority strings; its defaults (TLS 1.2 and
        // 1.3, modern suites only) apply.
        eprintln!("oxcow: note: the TLS 'priority' property is ignored (rustls defaults apply)");
    }
    // QEMU reads no other file from dh-params.pem's era: key exchange is
    // ephemeral elliptic curves here.
    let _ = p.take("sanity-check");
    let dir = p.take("dir").ok_or_else(|| CliError::new("Missing 'dir' property value"))?;
    Ok((PathBuf::from(dir), endpoint.unwrap_or(Endpoint::Client)))
}

pub fn x509(p: &mut Props) -> CliResult<Object> {
    let verify_peer = p.take_bool("verify-peer")?.unwrap_or(true);
    // Only for encrypted private keys, which are not supported.
    if p.take("passwordid").is_some() {
        return Err(CliError::new("tls-creds-x509: encrypted private keys (passwordid) are not supported"));
    }
    let (dir, endpoint) = common(p)?;
    Ok(Object::TlsCreds(TlsCreds { dir, endpoint, kind: CredsKind::X509 { verify_peer } }))
}

pub fn psk(p: &mut Props) -> CliResult<Object> {
    let username = p.take("username");
    // Accepted as QEMU accepts it (a property of all TLS credentials):
    // with pre-shared keys each end proves the key, so there is no
    // certificate to verify.
    p.take_bool("verify-peer")?;
    let (dir, endpoint) = common(p)?;
    Ok(Object::TlsCreds(TlsCreds { dir, endpoint, kind: CredsKind::Psk { username } }))
}

impl TlsCreds {
    /// Loads the files as QEMU does when the object is created, so a bad
    /// directory is reported before anything is opened.
    pub fn complete(&self) -> CliResult<()> {
        match (&self.kind, self.endpoint) {
            (CredsKind::X509 { verify_peer }, Endpoint::Server) => {
                TlsServer::from_x509_dir(&self.dir, *verify_peer, None).map(|_| ())
            }
            (CredsKind::X509 { verify_peer }, Endpoint::Client) => {
                TlsClient::from_x509_dir(&self.dir, *verify_peer).map(|_| ())
            }
            (CredsKind::Psk { .. }, Endpoint::Server) => TlsServer::from_psk_dir(&self.dir, None).map(|_| ()),
            (CredsKind::Psk { username }, Endpoint::Client) => {
                TlsClient::from_psk_file(&self.dir.join(PSK_FILE), username.as_deref().unwrap_or(DEFAULT_USERNAME))
                    .map(|_| ())
            }
        }
        .map_err(|e| CliError::new(message(&e)))
    }

    /// Server credentials, with an access list on client certificates
    /// (or, for PSK, on the client's username).
    pub fn server(&self, authz: Option<Authz>) -> CliResult<TlsServer> {
        if self.endpoint != Endpoint::Server {
            return Err(CliError::new("Expecting TLS credentials with a server endpoint"));
        }
        match &self.kind {
            CredsKind::X509 { verify_peer } => {
                TlsServer::from_x509_dir(&self.dir, *verify_peer, authz).map_err(|e| CliError::new(message(&e)))
            }
            CredsKind::Psk { .. } => TlsServer::from_psk_dir(&self.dir, authz).map_err(|e| CliError::new(message(&e))),
        }
    }

    /// Client credentials as the TLS part of an NBD location.
    pub fn client(&self, hostname: Option<String>) -> CliResult<UrlTls> {
        if self.endpoint != Endpoint::Client {
            return Err(CliError::new("Expecting TLS credentials with a client endpoint"));
        }
        match &self.kind {
            CredsKind::X509 { verify_peer } => {
                Ok(UrlTls { certificates: self.dir.clone(), verify_peer: *verify_peer, hostname, psk: None })
            }
            CredsKind::Psk { username } => Ok(UrlTls {
                certificates: self.dir.clone(),
                verify_peer: true,
                hostname,
                psk: Some(UrlPsk {
                    file: self.dir.join(PSK_FILE),
                    username: username.clone().unwrap_or_else(|| DEFAULT_USERNAME.into()),
                }),
            }),
        }
    }
}
