//! `secret` objects: `secret,id=ID,data=...` or `file=PATH`, with
//! `format=raw|base64`, as qemu's tools take them; images name them in
//! their options (`encrypt.key-secret=ID`). The bytes are wiped on drop
//! and never printed.

use super::{Object, Props};
use crate::error::{CliError, CliResult};
use base64::Engine;
use oxcow::crypto::Secret;
use std::sync::Mutex;

/// A defined secret.
#[derive(Debug, Clone)]
pub struct SecretObject(pub Secret);

/// Builds a `secret` from its properties.
pub fn secret(p: &mut Props) -> CliResult<Object> {
    let data = p.take("data");
    let file = p.take("file");
    let format = p.take_enum("format", &[("raw", false), ("base64", true)])?.unwrap_or(false);
    if p.take("keyid").is_some() || p.take("iv").is_some() {
        return Err(CliError::new("secret: keyid/iv (secrets encrypted with another secret) are not supported"));
    }
    let raw = match (data, file) {
        (Some(d), None) => d.into_bytes(),
        (None, Some(f)) => std::fs::read(&f).map_err(|e| CliError::new(format!("Unable to read {f}: {e}")))?,
        (Some(_), Some(_)) => return Err(CliError::new("'data' and 'file' are mutually exclusive")),
        (None, None) => return Err(CliError::new("Either 'data' or 'file' must be provided")),
    };
    let raw = Secret::new(raw);
    let bytes = if format {
        let text: Vec<u8> = raw.expose().iter().copied().filter(|c| !c.is_ascii_whitespace()).collect();
        let text = Secret::new(text);
        base64::engine::general_purpose::STANDARD
            .decode(text.expose())
            .map_err(|_| CliError::new("Invalid base64 data"))?
    } else {
        raw.expose().to_vec()
    };
    Ok(Object::Secret(SecretObject(Secret::new(bytes))))
}

/// The keys images were given (`--image-opts ...,encrypt.key-secret=ID`),
/// by the name they are opened by and the depth in its backing chain
/// (0 for the image, 1 for `backing.encrypt.key-secret`, ...).
static KEYS: Mutex<Vec<(String, usize, Secret)>> = Mutex::new(Vec::new());

/// Remembers the key of the image opened as `name`.
pub fn register(name: &str, key: Secret) {
    register_at(name, 0, key);
}

/// Remembers the key of the backing file `depth` levels under `name`.
pub fn register_at(name: &str, depth: usize, key: Secret) {
    KEYS.lock().unwrap_or_else(|p| p.into_inner()).push((name.to_string(), depth, key));
}

/// Backing formats given beside the keys (`backing.driver` in an option
/// string), by the name the image is opened by.
static BACKING_DRIVERS: Mutex<Vec<(String, oxcow::Format)>> = Mutex::new(Vec::new());

/// Remembers the backing format an option string gave for `name`.
pub fn register_backing_driver(name: &str, format: oxcow::Format) {
    BACKING_DRIVERS.lock().unwrap_or_else(|p| p.into_inner()).push((name.to_string(), format));
}

/// `opts` with the keys (and backing format) registered for `name` and
/// its backing chain.
pub fn with_key(name: &str, mut opts: oxcow::OpenOptions) -> oxcow::OpenOptions {
    let drivers = BACKING_DRIVERS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, f)) = drivers.iter().rev().find(|(n, _)| n == name) {
        opts.backing_driver = Some(*f);
    }
    drop(drivers);
    let keys = KEYS.lock().unwrap_or_else(|p| p.into_inner());
    // Later registrations win: iterate oldest first and overwrite.
    for (_, depth, k) in keys.iter().filter(|(n, _, _)| n == name) {
        if *depth == 0 {
            opts.key_secret = Some(k.clone());
        } else {
            if opts.backing_keys.len() < *depth {
                opts.backing_keys.resize(*depth, None);
            }
            opts.backing_keys[depth - 1] = Some(k.clone());
        }
    }
    opts
}
