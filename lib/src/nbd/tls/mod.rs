//! NBD over TLS, shared by both ends: credentials from a QEMU-style
//! directory, access lists on the client's certificate, and a TLS stream
//! that can be read and written from different threads.
//!
//! - `authz`: [`Authz`], QEMU's `authz-simple` / `authz-list` verdicts;
//! - `dn`: the certificate subject as the identity string access lists
//!   match (QEMU's gnutls order);
//! - `creds`: [`TlsServer`] and [`TlsClient`], rustls configurations
//!   (ring provider) with QEMU's certificate checks;
//! - `psk`: QEMU's `keys.psk` and the OpenSSL contexts for pre-shared
//!   keys (`tls-creds-psk`), which rustls does not implement;
//! - `engine`: [`Engine`], a session of either library behind one
//!   buffer-driven interface;
//! - `stream`: [`TlsStream`], the session over a socket after STARTTLS.

mod authz;
mod creds;
mod dn;
mod engine;
mod psk;
mod stream;

pub use authz::{glob_match, Authz, MatchFormat, Policy, Rule};
pub use creds::{TlsClient, TlsServer, CA_CERT, CLIENT_CERT, CLIENT_KEY, SERVER_CERT, SERVER_KEY};
pub use dn::subject_dn;
pub use engine::Engine;
pub use psk::{PskKeys, DEFAULT_USERNAME, PSK_FILE};
pub use stream::{complete_handshake, Socket, TlsStream, TRUNCATED};
