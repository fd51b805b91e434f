//! `oxcow map`: qemu-img map's extent list, JSON or human.

use crate::error::{CliError, CliResult};
use crate::util::{open_image, parse_format};
use oxcow::qcow2::Qcow2;
use oxcow::{chain_status, resolve_backing, Image, OpenOptions};
use std::io::Write;

#[derive(clap::Args)]
pub struct Args {
    /// Image format (probed when omitted).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Output format: human or json.
    #[arg(long = "output", default_value = "human")]
    output: String,
    /// Open even if another process has the image open for writing.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Where to start (bytes, or with a k/M/G suffix).
    #[arg(short = 's', long = "start-offset")]
    start_offset: Option<String>,
    /// How much to map at most.
    #[arg(short = 'l', long = "max-length")]
    max_length: Option<String>,
    #[command(flatten)]
    objects: crate::image_opts::ObjectArgs,
    /// Image file.
    file: String,
}

/// One merged extent, as qemu-img map prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub length: u64,
    pub depth: u32,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub compressed: bool,
    pub offset: Option<u64>,
    /// Index into the layer list: which file holds the data.
    pub layer: usize,
}

impl Extent {
    fn extends(&self, n: &Extent) -> bool {
        self.start + self.length == n.start
            && self.depth == n.depth
            && self.present == n.present
            && self.zero == n.zero
            && self.data == n.data
            && self.compressed == n.compressed
            && self.layer == n.layer
            && match (self.offset, n.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.length == b,
                _ => false,
            }
    }
}

/// A layer of the chain: the file its data lives in and that file's name.
pub struct Layer<'a> {
    pub name: String,
    /// The image, when it looks metadata-preallocated and its data lives
    /// in its own file: holes there refine the zero flag, as QEMU's file
    /// layer does.
    pub preallocated: Option<&'a Qcow2>,
}

pub fn layers(img: &Image) -> Vec<Layer<'_>> {
    let mut out = Vec::new();
    let mut cur = Some(img);
    while let Some(i) = cur {
        let ext_data = i.qcow2().and_then(|q| q.extensions().data_file);
        let extents = i.format_info().map(|f| f.extent_files.as_slice()).unwrap_or_default();
        let name = match (&ext_data, extents) {
            (Some(df), _) => resolve_backing(i.path(), df).display().to_string(),
            // A VMDK descriptor's data is in its extent file.
            (None, [only]) => only.display().to_string(),
            (None, _) => i.path().display().to_string(),
        };
        // QEMU only asks the file about holes under qcow2 data when it
        // believes the image was preallocated; raw layers report holes
        // themselves. A failure to tell is not worth failing the map for.
        let preallocated = match i.qcow2() {
            Some(q) if ext_data.is_none() && q.metadata_preallocated().unwrap_or(false) => Some(&**q),
            _ => None,
        };
        out.push(Layer { name, preallocated });
        cur = i.backing();
    }
    out
}

/// Walks the whole device through its chain, calling `f` with each merged
/// extent in order.
pub fn walk(
    img: &Image,
    start: u64,
    max_len: u64,
    mut f: impl FnMut(&Extent, &[Layer]) -> CliResult<()>,
) -> CliResult<()> {
    let dev = img.device();
    let ls = layers(img);
    let len = dev.len().min(start.saturating_add(max_len));
    let mut pos = start;
    let mut cur: Option<Extent> = None;
    while pos < len {
        let st = chain_status(dev, pos, len - pos)?;
        let mut e = Extent {
            start: pos,
            length: st.length.max(1).min(len - pos),
            depth: st.depth,
            present: st.allocated,
            zero: st.zero,
            data: st.data,
            compressed: st.compressed,
            offset: if st.compressed { None } else { st.host_offset },
            layer: (st.depth as usize).min(ls.len().saturating_sub(1)),
        };
        refine_with_file(&mut e, &ls);
        pos += e.length;
        match &mut cur {
            Some(c) if c.extends(&e) => c.length += e.length,
            _ => {
                if let Some(c) = cur.take() {
                    f(&c, &ls)?;
                }
                cur = Some(e);
            }
        }
    }
    if let Some(c) = cur {
        f(&c, &ls)?;
    }
    Ok(())
}

/// QEMU asks the file under a data extent whether it is a hole there, and
/// reports holes as zero (e.g. the untouched part of a cluster written by
/// copy-on-write from nothing).
fn refine_with_file(e: &mut Extent, ls: &[Layer]) {
    let (Some(host), true, false) = (e.offset, e.data, e.zero) else { return };
    let Some(q) = ls.get(e.layer).and_then(|l| l.preallocated) else { return };
    let h = q.host_extent(host, e.length);
    e.length = h.length;
    e.zero |= h.hole;
}

pub fn run(mut a: Args) -> CliResult<i32> {
    a.objects.apply(&mut a.file, &mut a.format)?;
    let json_out = match a.output.as_str() {
        "json" => true,
        "human" => false,
        o => return Err(CliError::new(format!("--output expects 'human' or 'json' not '{o}'"))),
    };
    let format = parse_format(a.format.as_deref())?;
    let img = open_image(&a.file, &OpenOptions::default().format(format).force_share(a.force_share))?;
    let num = |v: &Option<String>, what: &str| -> CliResult<Option<u64>> {
        v.as_deref()
            .map(|s| crate::util::parse_num(s).ok_or_else(|| CliError::new(format!("Invalid {what} specified"))))
            .transpose()
    };
    let start = num(&a.start_offset, "start offset")?.unwrap_or(0);
    let max_len = num(&a.max_length, "max length")?.unwrap_or(u64::MAX);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut first = true;
    let w = |r: std::io::Result<()>| {
        r.map_err(|e| CliError::new(format!("writing output: {}", crate::error::os_message(&e))))
    };
    if json_out {
        walk(&img, start, max_len, |e, _| {
            w(write!(out, "{}", if first { "[" } else { ",\n" }))?;
            first = false;
            w(write!(
                out,
                "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
                e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
            ))?;
            if let Some(o) = e.offset {
                w(write!(out, ", \"offset\": {o}"))?;
            }
            w(write!(out, "}}"))
        })?;
        if first {
            // Nothing to map (start at or past the end): qemu-img still
            // prints one empty extent.
            w(write!(
                out,
                "[{{ \"start\": {start}, \"length\": 0, \"depth\": 0, \"present\": false, \"zero\": false, \"data\": false, \"compressed\": false}}"
            ))?;
        }
        w(writeln!(out, "]"))?;
    } else {
        w(writeln!(out, "{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to"))?;
        walk(&img, start, max_len, |e, ls| {
            if !e.data || e.zero {
                return Ok(());
            }
            let Some(off) = e.offset else {
                return Err(CliError::new("File contains external, encrypted or compressed clusters."));
            };
            w(writeln!(out, "{:<16}{:<16}{:<16}{}", hex(e.start), hex(e.length), hex(off), ls[e.layer].name))
        })?;
    }
    w(out.flush())?;
    Ok(0)
}

/// C's `%#x`: no prefix for zero.
fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}
