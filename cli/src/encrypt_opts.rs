//! The encryption options of `create` and `convert -o`: qcow2's
//! `encrypt.*` (and the legacy `encryption=on`) and raw LUKS's bare
//! `key-secret`, `cipher-alg`, ... turned into the library's
//! [`LuksParams`] and the password the named `secret` object holds.

use crate::error::{CliError, CliResult};
use crate::object::{Object, Objects};
use oxcow::crypto::{CipherAlg, CipherMode, Hash, IvGen, LuksParams, Secret};

/// The option names, in the order qemu-img lists them on its
/// "Formatting" line.
const KEYS: &[&str] =
    &["format", "key-secret", "cipher-alg", "cipher-mode", "ivgen-alg", "ivgen-hash-alg", "hash-alg", "iter-time"];

/// Cipher algorithms qemu-img names but this machine's QEMU (nettle)
/// does not build for LUKS: refused with its message.
const OTHER_CIPHERS: &[&str] = &["3des", "des", "sm4"];

/// What the user gave, by bare name (`cipher-alg`), in the order given.
#[derive(Debug, Default)]
pub struct EncryptOpts {
    /// `encryption=on` (qcow2's legacy spelling of `encrypt.format=aes`).
    pub encryption: Option<String>,
    given: Vec<(&'static str, String)>,
    /// Options are `encrypt.`-prefixed (qcow2) or bare (raw LUKS).
    prefixed: bool,
}

/// How the image is to be encrypted.
#[derive(Debug)]
pub enum Encryption {
    /// LUKS with these parameters and password.
    Luks(LuksParams, Secret),
    /// qcow2's legacy AES (crypt_method 1), with the password that
    /// opens it.
    Aes(Secret),
}

impl EncryptOpts {
    /// For qcow2 (`encrypt.` keys) or raw LUKS (bare keys).
    pub fn new(prefixed: bool) -> EncryptOpts {
        EncryptOpts { prefixed, ..Default::default() }
    }

    /// Takes `key=value` if it is an encryption option; false otherwise.
    pub fn take(&mut self, key: &str, value: &str) -> bool {
        if self.prefixed && key == "encryption" {
            self.encryption = Some(value.to_string());
            return true;
        }
        let bare = if self.prefixed {
            match key.strip_prefix("encrypt.") {
                Some(b) => b,
                None => return false,
            }
        } else {
            key
        };
        let Some(k) = KEYS.iter().find(|k| **k == bare && (self.prefixed || **k != "format")) else {
            return false;
        };
        self.given.retain(|(g, _)| g != k);
        self.given.push((k, value.to_string()));
        true
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.given.iter().find(|(g, _)| *g == k).map(|(_, v)| v.as_str())
    }

    fn name(&self, k: &str) -> String {
        if self.prefixed {
            format!("encrypt.{k}")
        } else {
            k.to_string()
        }
    }

    /// The checks qemu-img makes before its "Formatting" line (numbers).
    pub fn precheck(&self) -> CliResult<u64> {
        match self.get("iter-time") {
            None => Ok(LuksParams::default().iter_time_ms),
            Some(v) => v
                .parse()
                .ok()
                .filter(|&n: &u64| n <= i64::MAX as u64)
                .ok_or_else(|| CliError::new(format!("Parameter '{}' expects a number", self.name("iter-time")))),
        }
    }

    /// The "Formatting" line's words for these options, in qemu-img's order.
    pub fn formatting(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Some(e) = &self.encryption {
            out.push(("encryption".to_string(), e.clone()));
        }
        for k in KEYS {
            if let Some(v) = self.get(k) {
                out.push((self.name(k), v.to_string()));
            }
        }
        out
    }

    /// The encryption asked for (none for a plain qcow2), with qemu-img's
    /// messages for bad values, a missing secret or a missing format.
    pub fn resolve(&self, objects: &Objects) -> CliResult<Option<Encryption>> {
        let legacy = match &self.encryption {
            Some(v) => crate::util::parse_bool("encryption", v)?,
            None => false,
        };
        let format = match (self.prefixed, self.get("format"), legacy) {
            (false, _, _) => "luks",
            (true, Some(f), _) => f,
            (true, None, true) => "aes",
            (true, None, false) if self.given.is_empty() => return Ok(None),
            (true, None, false) => return Err(CliError::new("Parameter 'encrypt.format' is missing")),
        };
        match format {
            "luks" => {}
            "aes" => return self.aes(objects).map(Some),
            other => return Err(CliError::new(format!("Parameter 'format' does not accept value '{other}'"))),
        }
        let bad = |k: &str, v: &str| CliError::new(format!("Parameter '{k}' does not accept value '{v}'"));
        let mut p = LuksParams::default();
        if let Some(v) = self.get("cipher-alg") {
            p.alg = match CipherAlg::from_name(v) {
                Ok(a) => a,
                Err(_) if OTHER_CIPHERS.contains(&v) => {
                    return Err(CliError::new(format!("Algorithm '{v}' not supported")))
                }
                Err(_) => return Err(bad("cipher-alg", v)),
            };
        }
        if let Some(v) = self.get("cipher-mode") {
            p.mode = match CipherMode::from_name(v) {
                Ok(m) => m,
                Err(_) => return Err(bad("cipher-mode", v)),
            };
        }
        let hash = |k: &str| -> CliResult<Option<Hash>> {
            match self.get(k) {
                None => Ok(None),
                Some(v) => match Hash::from_name(v) {
                    Ok(h) => Ok(Some(h)),
                    Err(_) => Err(bad(k, v)),
                },
            }
        };
        if let Some(h) = hash("hash-alg")? {
            p.hash = h;
        }
        let ivgen_hash = hash("ivgen-hash-alg")?;
        p.ivgen = match self.get("ivgen-alg") {
            None | Some("plain64") => IvGen::Plain64,
            Some("plain") => IvGen::Plain,
            Some("essiv") => IvGen::Essiv(ivgen_hash.unwrap_or(Hash::Sha256)),
            Some(v) => return Err(bad("ivgen-alg", v)),
        };
        p.ivgen_hash = ivgen_hash;
        p.iter_time_ms = self.precheck()?;
        let key = self.key(objects)?;
        p.validate().map_err(|e| CliError::new(crate::error::message(&e)))?;
        Ok(Some(Encryption::Luks(p, key)))
    }

    /// Legacy AES takes a password and nothing else, as qemu-img.
    fn aes(&self, objects: &Objects) -> CliResult<Encryption> {
        if let Some((k, _)) = self.given.iter().find(|(k, _)| *k != "format" && *k != "key-secret") {
            return Err(CliError::new(format!("Parameter '{}' is unexpected", self.name(k))));
        }
        Ok(Encryption::Aes(self.key(objects)?))
    }

    /// The password the `key-secret` option names.
    fn key(&self, objects: &Objects) -> CliResult<Secret> {
        let Some(id) = self.get("key-secret") else {
            return Err(CliError::new(format!("Parameter '{}' is required for cipher", self.name("key-secret"))));
        };
        match objects.get(id) {
            Some(Object::Secret(s)) => Ok(s.0.clone()),
            _ => Err(CliError::new(format!("No secret with id '{id}'"))),
        }
    }
}
