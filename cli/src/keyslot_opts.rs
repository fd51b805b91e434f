//! `amend`'s key slot options (`encrypt.state`, `encrypt.new-secret`,
//! `encrypt.old-secret`, `encrypt.keyslot`, `encrypt.iter-time`; bare
//! for raw LUKS) turned into a [`KeyslotChange`], with qemu-img's
//! messages.

use crate::error::{CliError, CliResult};
use crate::object::{Object, Objects};
use oxcow::crypto::{KeyslotChange, Secret};

const KEYS: &[&str] = &["state", "new-secret", "old-secret", "keyslot", "iter-time"];

/// The key slot options given, by bare name.
#[derive(Debug, Default)]
pub struct KeyslotOpts {
    given: Vec<(&'static str, String)>,
    prefix: &'static str,
}

/// Separates the key slot options from the others (returned as
/// `key=value` strings for the format's own amend).
pub fn split(options: &[String], prefixed: bool) -> CliResult<(Option<KeyslotOpts>, Vec<String>)> {
    let mut k = KeyslotOpts { prefix: if prefixed { "encrypt." } else { "" }, ..Default::default() };
    let mut rest = Vec::new();
    for (key, v) in crate::util::parse_options(options)? {
        let bare = if prefixed { key.strip_prefix("encrypt.") } else { Some(key.as_str()) };
        match bare.and_then(|b| KEYS.iter().find(|k| **k == b)) {
            Some(name) => k.given.push((name, v)),
            None => rest.push(format!("{key}={}", v.replace(',', ",,"))),
        }
    }
    Ok(((!k.given.is_empty()).then_some(k), rest))
}

impl KeyslotOpts {
    fn get(&self, k: &str) -> Option<&str> {
        self.given.iter().rev().find(|(g, _)| *g == k).map(|(_, v)| v.as_str())
    }

    fn secret(objects: &Objects, id: &str) -> CliResult<Secret> {
        match objects.get(id) {
            Some(Object::Secret(s)) => Ok(s.0.clone()),
            _ => Err(CliError::new(format!("No secret with id '{id}'"))),
        }
    }

    /// The change asked for.
    pub fn change(&self, objects: &Objects, force: bool) -> CliResult<KeyslotChange> {
        let keyslot = match self.get("keyslot") {
            Some(v) => Some(
                v.parse::<u32>()
                    .map_err(|_| CliError::new(format!("Parameter '{}keyslot' expects a number", self.prefix)))?,
            ),
            None => None,
        };
        let iter_time_ms = match self.get("iter-time") {
            Some(v) => Some(
                v.parse::<u64>()
                    .map_err(|_| CliError::new(format!("Parameter '{}iter-time' expects a number", self.prefix)))?,
            ),
            None => None,
        };
        let new_secret = self.get("new-secret");
        match self.get("state") {
            Some("active") => {
                let id = new_secret.ok_or_else(|| CliError::new("'new-secret' is required to activate a keyslot"))?;
                Ok(KeyslotChange::Add { new_secret: Self::secret(objects, id)?, keyslot, iter_time_ms, force })
            }
            Some("inactive") => {
                if new_secret.is_some() {
                    return Err(CliError::new("'new-secret' must not be given when erasing keyslots"));
                }
                let old_secret = self.get("old-secret").map(|id| Self::secret(objects, id)).transpose()?;
                Ok(KeyslotChange::Erase { keyslot, old_secret, force })
            }
            Some(other) => Err(CliError::new(format!("Parameter 'state' does not accept value '{other}'"))),
            None => Err(CliError::new("Parameter 'state' is missing")),
        }
    }
}
