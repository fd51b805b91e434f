//! `qemu-nbd -L`: list the exports of another NBD server, in qemu-nbd's
//! words and refusals.

use super::getopt::Parsed;
use super::prog;
use crate::object::{Object, Objects};
use oxcow::nbd::client::{list_exports, render_listing, NbdAddr};
use oxcow::nbd::tls::TlsClient;
use std::time::Duration;

fn fail(msg: &str) -> u8 {
    eprintln!("{}: {msg}", prog());
    1
}

/// The client credentials `--tls-creds` names, if any.
fn tls(p: &Parsed) -> Result<Option<TlsClient>, String> {
    let Some(id) = p.last("tls-creds") else {
        if p.has("tls-hostname") {
            return Err("--tls-hostname is not permitted without --tls-creds".into());
        }
        return Ok(None);
    };
    let objects: Vec<String> = p.opts.iter().filter(|o| o.0 == "object").filter_map(|o| o.1.clone()).collect();
    let objects = Objects::parse(&objects).map_err(|e| e.to_string())?;
    let Some(Object::TlsCreds(creds)) = objects.get(id) else {
        return Err(format!("Failed to get TLS creds: No TLS credentials with id '{id}'"));
    };
    let t = creds.client(p.last("tls-hostname").map(str::to_string)).map_err(|e| e.to_string())?;
    let client = match &t.psk {
        Some(k) => TlsClient::from_psk_file(&k.file, &k.username),
        None => TlsClient::from_x509_dir(&t.certificates, t.verify_peer),
    }
    .map_err(|e| crate::error::message(&e))?;
    // Over a Unix socket QEMU has no name to check the certificate
    // against: the empty name says so (refused after the handshake).
    let hostname = match t.hostname {
        None if p.has("k") => Some(String::new()),
        h => h,
    };
    Ok(Some(client.with_hostname(hostname)))
}

pub fn run(p: &Parsed) -> u8 {
    if !p.args.is_empty() {
        return fail("List mode is incompatible with a file name");
    }
    let per_device = ["x", "D", "o", "c", "d", "f", "l", "B", "A", "aio", "discard", "cache", "n"];
    if per_device.iter().any(|k| p.has(k)) {
        return fail("List mode is incompatible with per-device settings");
    }
    if p.has("fork") {
        return fail("List mode is incompatible with forking");
    }
    let addr = match p.last("k") {
        Some(path) => NbdAddr::Unix(path.into()),
        None => {
            let port = match p.last("p").unwrap_or("10809").parse::<u16>() {
                Ok(n) => n,
                Err(_) => return fail(&format!("Invalid port '{}'", p.last("p").unwrap_or(""))),
            };
            NbdAddr::Tcp { host: p.last("b").unwrap_or("localhost").to_string(), port }
        }
    };
    let tls = match tls(p) {
        Ok(t) => t,
        Err(msg) => return fail(&msg),
    };
    match list_exports(&addr, tls.as_ref(), Duration::from_secs(30)) {
        Ok(exports) => {
            print!("{}", render_listing(&exports));
            0
        }
        // qemu-nbd prints a refusal without its hints.
        Err(e) => match oxcow::nbd::client::negotiation_message(&e) {
            Some(m) => fail(m.lines().next().unwrap_or_default()),
            None => fail(&format!("Failed to connect to '{addr}': {}", crate::error::os_message(&e))),
        },
    }
}
