//! Images in remote object stores: `http://`, `https://` and `s3://`
//! names, read-only.
//!
//! [`open`] turns such a name into a [`Storage`] that the image layers use
//! as they use a host file, so every format, copy-on-read, `stream` and
//! `convert` work over it unchanged. Options that do not fit in a name
//! (readahead, timeouts, credentials given as secrets) are set per name
//! with [`configure`] before the image is opened; a name without settings
//! gets the defaults, and S3 names the usual AWS environment and profile.
//! The only write is [`s3::upload`], a whole object at once.

pub mod http;
pub mod s3;

pub use http::{stats_for, total_stats, HttpOptions, HttpStorage, RemoteStats};
pub use s3::S3Options;

use crate::storage::Storage;
use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, OnceLock};

/// Per-name settings of the remote drivers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteOptions {
    /// HTTP(S) client settings (both drivers).
    pub http: HttpOptions,
    /// S3 settings (`s3://` names).
    pub s3: S3Options,
}

/// Whether `name` is an `http://`, `https://` or `s3://` name.
pub fn is_remote(name: &str) -> bool {
    is_http(name) || name.starts_with("s3://")
}

/// Whether `name` is an `http://` or `https://` name.
pub fn is_http(name: &str) -> bool {
    let lower = name.get(..8).unwrap_or(name).to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

fn registry() -> &'static Mutex<HashMap<String, RemoteOptions>> {
    static R: OnceLock<Mutex<HashMap<String, RemoteOptions>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// Sets the options `name` is opened with from now on in this process
/// (the CLI's `--image-opts driver=https,url=NAME,...`).
pub fn configure(name: &str, opts: RemoteOptions) {
    registry().lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string(), opts);
}

/// The options `name` is opened with.
pub fn options_for(name: &str) -> RemoteOptions {
    registry().lock().unwrap_or_else(|p| p.into_inner()).get(name).cloned().unwrap_or_default()
}

/// Opens a remote name read-only with its [`configure`]d options.
pub fn open(name: &str) -> io::Result<Arc<HttpStorage>> {
    let opts = options_for(name);
    open_with(name, &opts)
}

/// Opens a remote name read-only with `opts`.
pub fn open_with(name: &str, opts: &RemoteOptions) -> io::Result<Arc<HttpStorage>> {
    if name.starts_with("s3://") {
        return Ok(Arc::new(s3::open(name, &opts.s3, opts.http.clone())?));
    }
    Ok(Arc::new(HttpStorage::open(name, opts.http.clone())?))
}

/// The storage for `name` as the image layers take it.
pub(crate) fn open_storage(name: &str) -> io::Result<Arc<dyn Storage>> {
    Ok(open(name)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_names_are_recognised() {
        assert!(is_remote("https://h/x") && is_remote("HTTP://h/x") && is_remote("s3://b/k"));
        assert!(!is_remote("nbd://h/x") && !is_remote("dir/https:x") && !is_remote("s3:/b"));
    }
}
