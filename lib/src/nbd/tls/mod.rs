//! NBD over TLS, shared by both ends: credentials from a QEMU-style
//! directory, access lists on the client's certificate, and a TLS stream
//! that can be read and written from different threads.
//!
//! - `authz`: [`Authz`], QEMU's `authz-simple` / `authz-list` verdicts;
//! - `dn`: the certificate subject as the identity string access lists
//!   match (QEMU's gnutls order);
//! - `creds`: [`TlsServer`] and [`TlsClient`], rustls configurations
//!   (ring provider) with QEMU's certificate checks;
//! - `stream`: [`TlsStream`], the session over a socket after STARTTLS.
//!
//! TLS with pre-shared keys (QEMU's `tls-creds-psk`) is not offered:
//! rustls implements PSK only for session resumption, not the external
//! keys (RFC 4279 / RFC 8446 section 2.2 with an out-of-band key) that
//! gnutls and QEMU use.

mod authz;
mod creds;
mod dn;
mod stream;

pub use authz::{glob_match, Authz, MatchFormat, Policy, Rule};
pub use creds::{TlsClient, TlsServer, CA_CERT, CLIENT_CERT, CLIENT_KEY, SERVER_CERT, SERVER_KEY};
pub use dn::subject_dn;
pub use stream::{complete_handshake, Socket, TlsStream};
