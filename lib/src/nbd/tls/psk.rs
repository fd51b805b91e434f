//! Pre-shared keys as QEMU's `tls-creds-psk` keeps them: `keys.psk` in
//! the credential directory, one `username:hexkey` line per user, and the
//! OpenSSL contexts that use them (rustls has no external PSK).
//!
//! Suites: TLS 1.3 with the key as an external PSK (SHA-256 suites, the
//! hash OpenSSL binds such keys to; with an ephemeral key exchange when
//! the peer offers one, as gnutls does), and for TLS 1.2 peers the
//! RFC 4279/5489 suites gnutls's "+ECDHE-PSK:+DHE-PSK:+PSK" (QEMU's
//! priority) can meet, ephemeral exchanges first.

use super::authz::Authz;
use crate::{Error, Result};
use openssl::ssl::{SslContext, SslContextBuilder, SslMethod, SslOptions, SslVersion};
use std::path::Path;

/// The key file's name inside a credential directory.
pub const PSK_FILE: &str = "keys.psk";

/// The user a client presents when none is given (QEMU's default).
pub const DEFAULT_USERNAME: &str = "qemu";

const TLS12_SUITES: &str = "ECDHE-PSK-CHACHA20-POLY1305:DHE-PSK-AES256-GCM-SHA384:DHE-PSK-AES128-GCM-SHA256:\
DHE-PSK-CHACHA20-POLY1305:ECDHE-PSK-AES256-CBC-SHA384:ECDHE-PSK-AES128-CBC-SHA256:PSK-AES256-GCM-SHA384:\
PSK-AES128-GCM-SHA256:PSK-CHACHA20-POLY1305";
const TLS13_SUITES: &str = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256";

/// The users and keys of a `keys.psk` file.
#[derive(Clone)]
pub struct PskKeys {
    keys: Vec<(String, Vec<u8>)>,
}

impl std::fmt::Debug for PskKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys themselves.
        f.debug_struct("PskKeys").field("users", &self.keys.len()).finish()
    }
}

fn psk_error(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::invalid(format!("Unable to access credentials {}: {why}", path.display()))
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if s.is_empty() || !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect()
}

impl PskKeys {
    /// Reads `path`: `username:hexkey` lines; blank lines are skipped.
    pub fn load(path: &Path) -> Result<PskKeys> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            let s = e.to_string();
            psk_error(path, s.split(" (os error ").next().unwrap_or_default())
        })?;
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() {
                continue;
            }
            let bad = || psk_error(path, format!("line {}: expected username:hexkey", i + 1));
            let (user, hex) = line.split_once(':').ok_or_else(bad)?;
            let key = hex_decode(hex.trim()).ok_or_else(bad)?;
            if user.is_empty() {
                return Err(bad());
            }
            keys.push((user.to_string(), key));
        }
        Ok(PskKeys { keys })
    }

    /// The key of `user`, if the file has one.
    pub fn key(&self, user: &str) -> Option<&[u8]> {
        self.keys.iter().find(|(u, _)| u == user).map(|(_, k)| k.as_slice())
    }
}

fn builder(method: SslMethod) -> Result<SslContextBuilder> {
    let err = |e: openssl::error::ErrorStack| Error::invalid(format!("TLS configuration: {e}"));
    let mut b = SslContextBuilder::new(method).map_err(err)?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2)).map_err(err)?;
    b.set_cipher_list(TLS12_SUITES).map_err(err)?;
    b.set_ciphersuites(TLS13_SUITES).map_err(err)?;
    // Renegotiation is refused as rustls refuses it on the x509 path.
    b.set_options(SslOptions::NO_RENEGOTIATION | SslOptions::NO_TICKET);
    Ok(b)
}

/// A server context: a client gets in if its username is in `keys`, it
/// proves the same key, and `authz` (matched on the username, as QEMU
/// does for PSK) lets it.
pub(crate) fn server_context(keys: PskKeys, authz: Option<Authz>) -> Result<SslContext> {
    let mut b = builder(SslMethod::tls_server())?;
    b.set_num_tickets(0).map_err(|e| Error::invalid(format!("TLS configuration: {e}")))?;
    b.set_psk_server_callback(move |ssl, identity, out| {
        let refuse = |ssl: &mut openssl::ssl::SslRef| {
            if let Some(i) = refused_index() {
                ssl.set_ex_data(i, true);
            }
            // Zero: an unknown identity, so the handshake fails.
            Ok(0)
        };
        let Some(user) = identity.and_then(|i| std::str::from_utf8(i).ok()) else { return refuse(ssl) };
        if authz.as_ref().is_some_and(|a| !a.is_allowed(user)) {
            return refuse(ssl);
        }
        match keys.key(user) {
            Some(k) if k.len() <= out.len() => {
                out[..k.len()].copy_from_slice(k);
                Ok(k.len())
            }
            _ => refuse(ssl),
        }
    });
    Ok(b.build())
}

/// Where a server session notes that it refused the client's identity:
/// the handshake then ends without an alert, as GnuTLS's does under QEMU,
/// and the server reports it in GnuTLS's words.
pub(crate) fn refused_index() -> Option<openssl::ex_data::Index<openssl::ssl::Ssl, bool>> {
    static INDEX: std::sync::OnceLock<Option<openssl::ex_data::Index<openssl::ssl::Ssl, bool>>> =
        std::sync::OnceLock::new();
    *INDEX.get_or_init(|| openssl::ssl::Ssl::new_ex_index().ok())
}

/// Whether `ssl`'s PSK callback refused the client's identity.
pub(crate) fn identity_refused(ssl: &openssl::ssl::SslRef) -> bool {
    refused_index().and_then(|i| ssl.ex_data(i).copied()).unwrap_or(false)
}

/// A client context presenting `user` with its key from `keys`.
pub(crate) fn client_context(keys: &PskKeys, user: &str, path: &Path) -> Result<SslContext> {
    let key = keys.key(user).ok_or_else(|| psk_error(path, format!("Username {user} not found")))?.to_vec();
    let mut identity = user.as_bytes().to_vec();
    identity.push(0);
    let mut b = builder(SslMethod::tls_client())?;
    b.set_psk_client_callback(move |_ssl, _hint, id_out, key_out| {
        if identity.len() > id_out.len() || key.len() > key_out.len() {
            return Ok(0);
        }
        id_out[..identity.len()].copy_from_slice(&identity);
        key_out[..key.len()].copy_from_slice(&key);
        Ok(key.len())
    });
    Ok(b.build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_file_lines_are_username_colon_hex() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(PSK_FILE);
        std::fs::write(&p, "qemu:00ff10\n\nalice:ABcd\r\n").unwrap();
        let k = PskKeys::load(&p).unwrap();
        assert_eq!(k.key("qemu"), Some(&[0, 255, 16][..]));
        assert_eq!(k.key("alice"), Some(&[0xab, 0xcd][..]));
        assert_eq!(k.key("bob"), None);
        for bad in ["qemu", "qemu:0", "qemu:zz", ":00"] {
            std::fs::write(&p, bad).unwrap();
            assert!(PskKeys::load(&p).is_err(), "{bad}");
        }
    }
}
