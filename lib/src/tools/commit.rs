//! `qemu-img commit`: write an overlay's changes into its backing image.

use crate::device::chain_status;
use crate::image::{self, OpenOptions};
use crate::storage::{FileStorage, LockMode, OpenFlags};
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// How to commit.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct CommitOptions {
    /// Format of the top image (probed when `None`).
    pub format: Option<image::Format>,
    /// `-b`: commit down to this image of the backing chain (default: the
    /// immediate backing file). Implies `keep_overlay`, as in qemu-img:
    /// the images in between become invalid, the top stays valid. A
    /// relative name is relative to the top's directory, as in qemu-img.
    pub base: Option<PathBuf>,
    /// `-d`: leave the overlay's clusters in place instead of emptying it.
    pub keep_overlay: bool,
    /// The top's password, as [`OpenOptions::key_secret`].
    pub key_secret: Option<crate::crypto::Secret>,
    /// The backing chain's passwords, as [`OpenOptions::backing_keys`]:
    /// the base is opened again with its own (or, like any backing file,
    /// the top's).
    pub backing_keys: Vec<Option<crate::crypto::Secret>>,
}

setters!(CommitOptions { keep_overlay: bool } opt { format: image::Format, base: PathBuf });

/// Copies at most this much per read/write.
const CHUNK: u64 = 1 << 20;

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// Commits the image at `top` into its backing image (or `opts.base`):
/// every range allocated above the base is written into the base, which
/// is grown first if smaller; then the top is emptied (all clusters
/// unallocated, so it reads as the base) unless `keep_overlay` or a base
/// was given. `progress(done, total)` is called as bytes are processed.
pub fn commit(top: &Path, opts: &CommitOptions, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
    let empty_top = !opts.keep_overlay && opts.base.is_none();
    // The chain is opened without locks: the base is opened again, for
    // writing, and a reader's lock on it would refuse that. The locks
    // qemu-img commit holds are taken separately below instead.
    let unlocked = OpenOptions {
        format: opts.format,
        write: empty_top,
        locking: false,
        key_secret: opts.key_secret.clone(),
        backing_keys: opts.backing_keys.clone(),
        ..Default::default()
    };
    let img = image::open(top, &unlocked)?;
    // The top's own file (a `blkdebug:` or `json:` name stands for one).
    let top_name = top;
    let top = img.path().to_path_buf();
    let top = top.as_path();
    if img.backing().is_none() {
        return Err(Error::invalid("Image does not have a backing file"));
    }
    // Depth of the base in the chain (1 = the immediate backing file),
    // and the layers above it.
    let mut between: Vec<PathBuf> = Vec::new();
    // A relative base name is taken relative to the top's directory, as
    // QEMU takes it (the chain's own names are relative to their images).
    let base_path = opts.base.as_deref().map(|b| image::resolve_backing(top, &b.to_string_lossy()));
    // The name the layer above the base records for it: a `json:` name
    // (blkdebug rules, say) opens the base again as it was opened.
    let mut base_name = img.backing_name().map(str::to_string);
    let (depth, base_layer) = {
        let mut layer = img.backing();
        let mut depth = 1u32;
        loop {
            let Some(l) = layer else {
                let name = opts.base.as_deref().map(|p| p.display().to_string()).unwrap_or_default();
                return Err(Error::invalid(format!(
                    "Did not find '{name}' in the backing chain of '{}'",
                    top.display()
                )));
            };
            match &base_path {
                Some(b) if !same_file(b, l.path()) => {
                    between.push(l.path().to_path_buf());
                    base_name = l.backing_name().map(str::to_string);
                    layer = l.backing();
                    depth += 1;
                }
                _ => break (depth, l),
            }
        }
    };
    // Locks as qemu-img commit holds them: the top (a writer when it is
    // emptied) and the base as writers, the layers in between as readers.
    let lock = |p: &Path, write: bool, mode: LockMode| {
        FileStorage::open_locked(p, OpenFlags { write, ..OpenFlags::default() }, mode)
    };
    let _top_lock = lock(top, empty_top, LockMode::for_open(empty_top, false))?;
    let _between_locks = between.iter().map(|p| lock(p, false, LockMode::reader())).collect::<Result<Vec<_>>>()?;
    let d = depth as usize;
    let base_key = opts.backing_keys.get(d - 1).cloned().flatten().or_else(|| opts.key_secret.clone());
    let base_open = match base_name.filter(|n| n.starts_with("json:")) {
        Some(n) => PathBuf::from(n),
        None => base_layer.path().to_path_buf(),
    };
    let base = image::open(
        &base_open,
        &OpenOptions {
            format: Some(base_layer.format()),
            write: true,
            key_secret: base_key,
            backing_keys: opts.backing_keys.get(d..).unwrap_or_default().to_vec(),
            ..Default::default()
        },
    )?;
    let dev = img.device();
    let size = dev.len();
    if base.device().len() < size {
        match base.qcow2() {
            Some(q) => q.grow(size)?,
            None => base.device().resize(size)?,
        }
    }
    copy_down(dev, &base, depth, size, progress).map_err(|e| {
        // QEMU runs the copy as a block job and reports only its errno.
        Error::io("Block job failed", std::io::Error::from_raw_os_error(e.errno()))
    })?;
    base.close()?;
    if empty_top {
        if let Some(q) = img.qcow2() {
            let closed = q.empty_for_commit().map_err(|e| {
                Error::io(
                    format!("Failed to empty {}", top_name.display()),
                    std::io::Error::from_raw_os_error(e.errno()),
                )
            })?;
            if closed {
                // Reset as a whole and closed (`qcow2/commit_empty.rs`).
                return Ok(());
            }
        }
    }
    img.close()
}

/// Writes into `base` every range of `dev` (the top) allocated above the
/// base (`depth` layers down), then flushes the base.
fn copy_down(
    dev: &std::sync::Arc<dyn crate::BlockDevice>,
    base: &image::Image,
    depth: u32,
    size: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let mut pos = 0u64;
    let mut buf = vec![0u8; CHUNK as usize];
    progress(0, size);
    while pos < size {
        let st = chain_status(dev, pos, (size - pos).min(1 << 30))?;
        let n = st.length.min(size - pos);
        if st.allocated && st.depth < depth {
            if st.zero {
                base.device().write_zeroes(pos, n, true)?;
            } else {
                // The top's view of these bytes comes from the layers above
                // the base, never from the (separately opened) base.
                let mut at = pos;
                while at < pos + n {
                    let k = CHUNK.min(pos + n - at) as usize;
                    dev.read_at(&mut buf[..k], at)?;
                    base.device().write_at(&buf[..k], at)?;
                    at += k as u64;
                }
            }
        }
        pos += n;
        progress(pos, size);
    }
    // The base holds everything before the top lets go of it.
    base.device().flush()
}
