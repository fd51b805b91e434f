//! `qemu-img rebase`: change an image's backing file, keeping the guest
//! content (safe mode) or only rewriting the name (unsafe mode).

use crate::device::{chain_status, read_backing, BlockDevice};
use crate::image::{self, Format, OpenOptions};
use crate::{Error, Result};
use std::path::Path;

/// How to rebase.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct RebaseOptions {
    /// Format of the image (probed when `None`).
    pub format: Option<Format>,
    /// `-b`: the new backing file name as it will be recorded (relative
    /// names are relative to the image's directory); `None` or empty makes
    /// the image standalone.
    pub backing: Option<String>,
    /// `-F`: the new backing file's format (required with a new backing
    /// file, as in qemu-img 10).
    pub backing_format: Option<String>,
    /// `-u`: only rewrite the header.
    pub unsafe_mode: bool,
    /// The image's password, as [`OpenOptions::key_secret`].
    pub key_secret: Option<crate::crypto::Secret>,
    /// The old backing chain's passwords, as [`OpenOptions::backing_keys`];
    /// the new backing file gets the first of them (or the image's), as a
    /// backing file would.
    pub backing_keys: Vec<Option<crate::crypto::Secret>>,
    /// `-c`: whole clusters copied into the image are written compressed
    /// (qcow2 only).
    pub compress: bool,
}

setters!(RebaseOptions { unsafe_mode: bool, compress: bool } opt { format: Format, backing: String, backing_format: String });

const CHUNK: u64 = 1 << 20;

/// Rebases the qcow2 image at `path`. In safe mode, every range the image
/// does not allocate itself is read through the old and the new backing
/// chains, and where they differ the old content is written into the
/// image, so what the guest reads does not change; then the header is
/// rewritten. `progress(done, total)` reports the scan.
pub fn rebase(path: &Path, opts: &RebaseOptions, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
    let new_name = opts.backing.clone().filter(|n| !n.is_empty());
    if let (Some(n), None) = (&new_name, &opts.backing_format) {
        return Err(Error::invalid(format!(
            "Could not change the backing file to '{n}': backing format must be specified"
        )));
    }
    let img = image::open(
        path,
        &OpenOptions {
            format: opts.format,
            write: true,
            no_backing: opts.unsafe_mode,
            key_secret: opts.key_secret.clone(),
            backing_keys: opts.backing_keys.clone(),
            ..Default::default()
        },
    )?;
    if opts.compress && img.qcow2().is_none() {
        return Err(Error::invalid("Compression not supported for this file format"));
    }
    // Refused before a byte changes where the format keeps no backing
    // file name (QEMU's words; it finds out only after the copy).
    let cs = match (img.qcow2(), img.layout()) {
        (Some(q), _) => q.cluster_size(),
        (None, Some(l)) if l.can_set_backing() => img.format_info().and_then(|i| i.cluster_size).unwrap_or(CHUNK),
        _ => {
            return Err(Error::io(
                format!("Could not change the backing file to '{}'", new_name.unwrap_or_default()),
                std::io::Error::from_raw_os_error(libc::ENOTSUP),
            ))
        }
    };
    if !opts.unsafe_mode {
        // QEMU writes the zeros past the old backing file's end as a zero
        // range when the new backing file is further down the old chain
        // (or there was none), and as data otherwise (iotest 024).
        let mut new_in_old_chain = false;
        let new = match &new_name {
            Some(n) => {
                let fmt = opts.backing_format.as_deref().map(str::parse::<Format>).transpose()?;
                let p = image::resolve_backing(path, n);
                new_in_old_chain = in_chain(img.backing().and_then(image::Image::backing), &p);
                let key = opts.backing_keys.first().cloned().flatten().or_else(|| opts.key_secret.clone());
                Some(image::open(&p, &OpenOptions { format: fmt, key_secret: key, ..Default::default() })?)
            }
            None => None,
        };
        let dev = img.device();
        let old = dev.backing();
        let new_dev = new.as_ref().map(|i| &**i.device());
        let size = dev.len();
        let mut a = vec![0u8; CHUNK as usize];
        let mut b = vec![0u8; CHUNK as usize];
        let mut pos = 0u64;
        progress(0, size);
        while pos < size {
            let st = dev.block_status(pos, size - pos)?;
            let n = st.length.min(size - pos);
            if !st.allocated {
                // Cluster-sized pieces, so only the clusters that differ
                // get allocated in the image.
                let mut at = pos;
                while at < pos + n {
                    // Where both chains are known to read zeros there is
                    // nothing to compare (large sparse disks stay fast).
                    let z = zero_run(old, at, pos + n - at)?.min(zero_run(new_dev, at, pos + n - at)?);
                    if z > 0 {
                        at += z;
                        continue;
                    }
                    let k = ((at / cs + 1) * cs).min(pos + n).min(at + CHUNK) - at;
                    let k = k as usize;
                    read_backing(old, &mut a[..k], at)?;
                    read_backing(new_dev, &mut b[..k], at)?;
                    if a[..k] != b[..k] {
                        let whole = at.is_multiple_of(cs) && (k as u64 == cs || at + k as u64 == size);
                        let packed = img.qcow2().filter(|_| opts.compress && whole);
                        // Zeros the old backing file holds are copied as
                        // data, as QEMU copies them (iotest 024); without
                        // an old backing file they are a zero range (252).
                        let past_old = old.is_none_or(|o| at >= o.len());
                        let as_zeros = old.is_none() || new_in_old_chain;
                        if past_old && as_zeros && a[..k].iter().all(|&x| x == 0) {
                            dev.write_zeroes(at, k as u64, false)?;
                        } else if let Some(q) = packed {
                            // The disk's last cluster may be partial: padded.
                            let mut c = a[..k].to_vec();
                            c.resize(cs as usize, 0);
                            q.write_compressed(at, &c)?;
                        } else {
                            dev.write_at(&a[..k], at)?;
                        }
                    }
                    at += k as u64;
                }
            }
            pos += n;
            progress(pos, size);
        }
        dev.flush()?;
    }
    let fmt = if new_name.is_some() { opts.backing_format.clone() } else { None };
    if let Some(q) = img.qcow2() {
        q.set_backing(new_name, fmt)?;
    } else if let Some(l) = img.layout() {
        l.set_backing(new_name.as_deref(), fmt.as_deref())?;
    }
    img.close()
}

/// How many bytes from `at` (at most `len`) a backing chain is known to
/// read as zeros without reading them: none there, past its end, or
/// unallocated or zero throughout the chain.
fn zero_run(dev: Option<&dyn BlockDevice>, at: u64, len: u64) -> Result<u64> {
    let Some(d) = dev else { return Ok(len) };
    if at >= d.len() {
        return Ok(len);
    }
    let st = chain_status(d, at, len.min(d.len() - at))?;
    Ok(if !st.allocated || st.zero { st.length.min(len) } else { 0 })
}

/// Whether the image at `p` is `b` or one of its backing files.
fn in_chain(mut b: Option<&image::Image>, p: &Path) -> bool {
    let Ok(want) = std::fs::canonicalize(p) else { return false };
    while let Some(i) = b {
        if std::fs::canonicalize(i.path()).is_ok_and(|h| h == want) {
            return true;
        }
        b = i.backing();
    }
    false
}
