//! `--blockdev` (and nothing else): the graph of named block nodes.
//!
//! A `file` node names a host file; a format node (`qcow2`, `raw`, any
//! format oxcow reads) sits on a file node and is opened as an image when
//! it is defined, so a broken image fails at startup as with QEMU. A file
//! node exported directly is opened as a raw image the first time it is
//! exported. Backing files come from the image header (oxcow opens the
//! chain itself); `backing=null` opens the image without one.

use crate::error::{message, CliError, CliResult};
use crate::object::Props;
use oxcow::qcow2::CacheOptions;
use oxcow::{BlockDevice, CacheMode, Format, Image, OpenOptions};
use std::collections::BTreeMap;
use std::sync::Arc;

/// How a node's files are opened (the `--blockdev` options QEMU shares
/// between drivers).
#[derive(Debug, Clone, Copy)]
struct Access {
    read_only: bool,
    cache: CacheMode,
    locking: bool,
    force_share: bool,
    /// A qcow2 node's cache options (`l2-cache-size`, ...).
    qcow2_cache: CacheOptions,
    /// A qcow2 node's `lazy-refcounts`.
    lazy_refcounts: Option<bool>,
}

impl Access {
    fn take(p: &mut Props) -> CliResult<Access> {
        let read_only = p.take_bool("read-only")?.unwrap_or(false);
        // Accepted as QEMU does: a node is read-write unless asked
        // otherwise, so falling back to read-only never happens here.
        p.take_bool("auto-read-only")?;
        let direct = p.take_bool("cache.direct")?.unwrap_or(false);
        let no_flush = p.take_bool("cache.no-flush")?.unwrap_or(false);
        let cache = match (direct, no_flush) {
            (false, false) => CacheMode::Writeback,
            (true, false) => CacheMode::None,
            (false, true) => CacheMode::Unsafe,
            // O_DIRECT wins; flushes are honoured, which is only safer.
            (true, true) => CacheMode::None,
        };
        let locking = match p.take("locking").as_deref() {
            None | Some("auto") | Some("on") => true,
            Some("off") => false,
            Some(v) => return Err(CliError::new(format!("Parameter 'locking' does not accept value '{v}'"))),
        };
        let force_share = p.take_bool("force-share")?.unwrap_or(false);
        if force_share && !read_only {
            return Err(CliError::new("force-share=on can only be used with read-only images"));
        }
        // The Linux AIO engine is QEMU's concern; threads do the I/O here.
        p.take_enum("aio", &[("threads", ()), ("native", ()), ("io_uring", ())])?;
        Ok(Access {
            read_only,
            cache,
            locking,
            force_share,
            qcow2_cache: CacheOptions::default(),
            lazy_refcounts: None,
        })
    }
}

/// The qcow2 driver's run-time options of a node. `--blockdev` takes
/// them as QAPI integers (no size suffixes, unlike `--image-opts`):
/// decimal, `0x` hexadecimal or `0` octal, within an i64.
fn qcow2_options(p: &mut Props) -> CliResult<(CacheOptions, Option<bool>)> {
    let mut cache = CacheOptions::default();
    for key in ["cache-size", "l2-cache-size", "refcount-cache-size", "l2-cache-entry-size", "cache-clean-interval"] {
        let Some(v) = p.take(key) else { continue };
        let n = qapi_int(&v).ok_or_else(|| CliError::new(format!("Parameter '{key}' expects integer")))?;
        // The sizes are unsigned once QEMU's qcow2 driver reads them; the
        // interval wraps into a number too big (what `set` does).
        if n < 0 && key != "cache-clean-interval" {
            return Err(CliError::new(format!("Value '{v}' is out of range for parameter '{key}'")));
        }
        cache.set(key, &n.to_string()).map_err(|e| CliError::new(message(&e)))?;
    }
    let lazy = p.take_bool("lazy-refcounts")?;
    Ok((cache, lazy))
}

/// A QAPI integer as QEMU's keyval parser reads one.
fn qapi_int(v: &str) -> Option<i64> {
    let (negative, digits) = match v.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, v.strip_prefix('+').unwrap_or(v)),
    };
    let (radix, digits) = if let Some(h) = digits.strip_prefix("0x").or_else(|| digits.strip_prefix("0X")) {
        (16, h)
    } else if digits.len() > 1 && digits.starts_with('0') {
        (8, &digits[1..])
    } else {
        (10, digits)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let magnitude = i128::from_str_radix(digits, radix).ok()?;
    i64::try_from(if negative { -magnitude } else { magnitude }).ok()
}

/// Discard and zero-detection settings of a node, applied by its exports.
#[derive(Debug, Clone, Copy, Default)]
pub struct NodeIoOptions {
    /// `discard=unmap`: discards deallocate.
    pub unmap: bool,
    /// `detect-zeroes=on|unmap`.
    pub detect_zeroes: oxcow::nbd::server::DetectZeroes,
}

enum Kind {
    /// A host file, opened the first time it is exported.
    File { filename: String, access: Access, image: Option<Image> },
    /// An image opened over a file node.
    Format { image: Image },
}

struct Node {
    kind: Kind,
    io: NodeIoOptions,
    /// Format nodes that sit on this node (a file used by an image is not
    /// exported on its own: both would write the same file).
    users: usize,
}

/// Every node defined, by node name.
#[derive(Default)]
pub struct Nodes {
    by_name: BTreeMap<String, Node>,
}

impl Nodes {
    /// Defines the node one `--blockdev` argument describes.
    pub fn add(&mut self, arg: &str) -> CliResult<()> {
        let mut p = Props::from_arg(arg, None)?;
        let driver = p.require("driver")?;
        let name =
            p.take("node-name").ok_or_else(|| CliError::new("'node-name' must be specified for the root node"))?;
        if self.by_name.contains_key(&name) {
            return Err(CliError::new(format!("Duplicate nodes with node-name='{name}'")));
        }
        let unmap = p.take_enum("discard", &[("ignore", false), ("off", false), ("unmap", true), ("on", true)])?;
        let detect_zeroes = match p.take("detect-zeroes") {
            None => Default::default(),
            Some(v) => v
                .parse()
                .map_err(|_| CliError::new(format!("Parameter 'detect-zeroes' does not accept value '{v}'")))?,
        };
        let io = NodeIoOptions { unmap: unmap.unwrap_or(false), detect_zeroes };
        let kind = if driver == "file" {
            let filename = p.require("filename")?;
            let access = Access::take(&mut p)?;
            p.finish()?;
            // QEMU opens the file here; a missing one fails at startup.
            std::fs::metadata(&filename)
                .map_err(|e| CliError::new(format!("Could not open '{filename}': {}", crate::error::os_message(&e))))?;
            Kind::File { filename, access, image: None }
        } else {
            let format = driver
                .parse::<Format>()
                .map_err(|_| CliError::new(format!("Parameter 'driver' does not accept value '{driver}'")))?;
            self.format_node(format, &mut p)?
        };
        self.by_name.insert(name, Node { kind, io, users: 0 });
        Ok(())
    }

    fn format_node(&mut self, format: Format, p: &mut Props) -> CliResult<Kind> {
        let mut access = Access::take(p)?;
        if format == Format::Qcow2 {
            (access.qcow2_cache, access.lazy_refcounts) = qcow2_options(p)?;
        }
        let no_backing = match p.take("backing") {
            None => false,
            Some(v) if v == "null" || v.is_empty() => true,
            Some(v) => {
                return Err(CliError::new(format!(
                    "backing='{v}': only the image's own backing file (or backing=null) is supported"
                )))
            }
        };
        let file = match p.take("file") {
            Some(f) => f,
            None if p.has_prefix("file.") => {
                // An inline file node: only its driver and file name.
                let driver = p.require("file.driver")?;
                if driver != "file" {
                    return Err(CliError::new(format!("Parameter 'driver' does not accept value '{driver}'")));
                }
                let filename = p.require("file.filename")?;
                std::mem::take(p).finish()?;
                return open(&filename, format, access, no_backing).map(|image| Kind::Format { image });
            }
            None => return Err(CliError::new("Parameter 'file' is missing")),
        };
        std::mem::take(p).finish()?;
        let node = self
            .by_name
            .get_mut(&file)
            .ok_or_else(|| CliError::new(format!("Cannot find device='{file}' nor node-name='{file}'")))?;
        let filename = match &node.kind {
            Kind::File { filename, image: None, .. } => filename.clone(),
            Kind::File { .. } => return Err(CliError::new(format!("Node '{file}' is exported and in use"))),
            Kind::Format { .. } => {
                return Err(CliError::new(format!("Node '{file}' is not a file node (formats do not stack here)")))
            }
        };
        let image = open(&filename, format, access, no_backing)?;
        node.users += 1;
        Ok(Kind::Format { image })
    }

    /// The device behind `name` and its settings, opening a file node as
    /// raw the first time.
    pub fn device(&mut self, name: &str) -> CliResult<(Arc<dyn BlockDevice>, NodeIoOptions)> {
        let node = self
            .by_name
            .get_mut(name)
            .ok_or_else(|| CliError::new(format!("Cannot find device='' nor node-name='{name}'")))?;
        if node.users > 0 {
            return Err(CliError::new(format!("Node '{name}' is the file of an image; export the image node")));
        }
        let io = node.io;
        match &mut node.kind {
            Kind::Format { image } => Ok((image.device().clone(), io)),
            Kind::File { image: Some(image), .. } => Ok((image.device().clone(), io)),
            Kind::File { filename, access, image } => {
                let opened = open(filename, Format::Raw, *access, false)?;
                let dev = opened.device().clone();
                *image = Some(opened);
                Ok((dev, io))
            }
        }
    }

    /// Flushes and closes every open image; the first error is returned
    /// after all were tried.
    pub fn close_all(&mut self) -> CliResult<()> {
        let mut first = None;
        for (_, node) in std::mem::take(&mut self.by_name) {
            let image = match node.kind {
                Kind::Format { image } | Kind::File { image: Some(image), .. } => image,
                Kind::File { image: None, .. } => continue,
            };
            if let Err(e) = image.close() {
                first.get_or_insert(CliError::from(e));
            }
        }
        first.map_or(Ok(()), Err)
    }
}

fn open(filename: &str, format: Format, a: Access, no_backing: bool) -> CliResult<Image> {
    let opts = OpenOptions::default()
        .format(format)
        .write(!a.read_only)
        .cache(a.cache)
        .locking(a.locking)
        .force_share(a.force_share)
        .no_backing(no_backing)
        .qcow2_cache(a.qcow2_cache)
        .qcow2_lazy_refcounts(a.lazy_refcounts);
    let opts = crate::util::with_network_permission(&opts);
    oxcow::open(filename, &opts).map_err(|e| match e {
        // The node's own options do not fit the image (cache sizes, lazy
        // refcounts on a v2 image): QEMU says so without naming the file.
        oxcow::Error::InvalidArgument(m) => CliError::new(m),
        e => CliError::new(format!("Could not open '{filename}': {}", message(&e))),
    })
}
