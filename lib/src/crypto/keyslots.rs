//! Adding and erasing key slots of an existing LUKS1 volume (what
//! `qemu-img amend -o encrypt.state=...` does), with qemu-img's refusals.
//!
//! Order on disk: a new slot's key material is written and flushed into
//! its (unused) area before the header names it; an erased slot leaves
//! the header first, and only then is its key material overwritten. A
//! crash in between leaves either the old or the new set of slots.

use super::create::{iterations_for, make_slot};
use super::luks::{LuksHeader, HEADER_LEN};
use super::{Secret, SECTOR};
use crate::storage::Storage;
use crate::{Error, Result};

/// One key management operation.
#[derive(Debug, Clone)]
pub enum KeyslotChange {
    /// `state=active`: store the master key under `new_secret`, in
    /// `keyslot` or the first free one, with `iter_time_ms` of PBKDF2.
    Add {
        /// The new password.
        new_secret: Secret,
        /// `keyslot`.
        keyslot: Option<u32>,
        /// `iter-time` (default 2000).
        iter_time_ms: Option<u64>,
        /// `--force`: `keyslot` may be an active one, overwritten.
        force: bool,
    },
    /// `state=inactive`: erase `keyslot`, or every slot `old_secret`
    /// opens; refusing to erase the last active slot unless `force`.
    Erase {
        /// `keyslot`.
        keyslot: Option<u32>,
        /// `old-secret`.
        old_secret: Option<Secret>,
        /// `--force`.
        force: bool,
    },
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |e| Error::io(what, e)
}

fn check_index(i: u32) -> Result<usize> {
    if i as usize >= super::luks::SLOTS {
        return Err(Error::invalid(format!("Invalid keyslot {i} specified, must be between 0 and 7")));
    }
    Ok(i as usize)
}

/// Applies `change` to the volume whose header is at byte `base` of
/// `file` and spans `len` bytes; `current` is the password the image was
/// opened with (needed to add a slot).
pub fn amend_keyslots(
    file: &dyn Storage,
    base: u64,
    len: u64,
    current: Option<&Secret>,
    change: &KeyslotChange,
) -> Result<()> {
    let mut b = vec![0u8; HEADER_LEN];
    file.read_at(&mut b, base).map_err(io("reading the LUKS header"))?;
    let mut h = LuksHeader::parse(&b)?;
    let read = |buf: &mut [u8], off: u64| -> Result<()> {
        if off + buf.len() as u64 > len {
            return Err(Error::corrupt("LUKS key material past the encryption header"));
        }
        file.read_at(buf, base + off).map_err(io("reading LUKS key material"))
    };
    match change {
        KeyslotChange::Add { new_secret, keyslot, iter_time_ms, force } => {
            let current = current.ok_or_else(|| Error::invalid("Parameter 'key-secret' is required for cipher"))?;
            let master = h.unlock_key(current, &read)?;
            let i = match keyslot {
                Some(k) => {
                    let i = check_index(*k)?;
                    if h.slots[i].active && !force {
                        return Err(Error::invalid(format!(
                            "Refusing to overwrite active keyslot {i} - please erase it first"
                        )));
                    }
                    i
                }
                None => h
                    .slots
                    .iter()
                    .position(|s| !s.active)
                    .ok_or_else(|| Error::invalid("Can't add a keyslot - all keyslots are in use"))?,
            };
            let iters = iterations_for(h.hash, h.key_bytes as usize, iter_time_ms.unwrap_or(2000));
            let key_offset = h.slots[i].key_offset;
            let (slot, material) = make_slot(&h, &master, new_secret, iters, key_offset)?;
            let at = u64::from(key_offset) * SECTOR;
            if at + material.len() as u64 > len {
                return Err(Error::corrupt("LUKS key slot past the encryption header"));
            }
            file.write_at(&material, base + at).map_err(io("writing LUKS key material"))?;
            file.flush().map_err(io("flushing LUKS key material"))?;
            h.slots[i] = slot;
            file.write_at(&h.encode()?, base).map_err(io("writing the LUKS header"))?;
            file.flush().map_err(io("flushing the LUKS header"))
        }
        KeyslotChange::Erase { keyslot, old_secret, force } => {
            let active: Vec<usize> = (0..h.slots.len()).filter(|&i| h.slots[i].active).collect();
            let doomed: Vec<usize> = match (keyslot, old_secret) {
                (Some(k), _) => {
                    let i = check_index(*k)?;
                    if !h.slots[i].active && !force {
                        return Err(Error::invalid(format!("Given keyslot {i} is already erased (inactive) ")));
                    }
                    if active.len() == 1 && !force {
                        return Err(Error::invalid(format!(
                            "Attempt to erase the only active keyslot {i} which will erase all the data in the image irreversibly - refusing operation"
                        )));
                    }
                    vec![i]
                }
                (None, Some(old)) => {
                    let mut m = Vec::new();
                    for &i in &active {
                        if h.try_slot(i, old, &read)?.is_some() {
                            m.push(i);
                        }
                    }
                    if m.is_empty() {
                        return Err(Error::invalid("No keyslots match given (old) password for erase operation"));
                    }
                    if m.len() == active.len() && !force {
                        return Err(Error::invalid(
                            "All the active keyslots match the (old) password that was given and erasing them will erase all the data in the image irreversibly - refusing operation",
                        ));
                    }
                    m
                }
                (None, None) => {
                    return Err(Error::invalid(
                        "To erase keyslot(s), either explicit keyslot index or the password currently contained in them must be given",
                    ))
                }
            };
            let areas: Vec<(u64, u64)> = doomed
                .iter()
                .map(|&i| {
                    let s = &h.slots[i];
                    let n = (u64::from(h.key_bytes) * u64::from(s.stripes)).div_ceil(SECTOR) * SECTOR;
                    (u64::from(s.key_offset) * SECTOR, n)
                })
                .collect();
            for &i in &doomed {
                let s = &mut h.slots[i];
                s.active = false;
                s.iterations = 0;
                s.salt = [0u8; 32];
            }
            file.write_at(&h.encode()?, base).map_err(io("writing the LUKS header"))?;
            file.flush().map_err(io("flushing the LUKS header"))?;
            // The stripes still hold the master key under the old password:
            // overwrite them with noise.
            for (at, n) in areas {
                if at + n > len {
                    return Err(Error::corrupt("LUKS key slot past the encryption header"));
                }
                let mut noise = vec![0u8; n as usize];
                getrandom::getrandom(&mut noise).map_err(|e| Error::invalid(format!("no random numbers: {e}")))?;
                file.write_at(&noise, base + at).map_err(io("erasing LUKS key material"))?;
            }
            file.flush().map_err(io("flushing erased LUKS key material"))
        }
    }
}
