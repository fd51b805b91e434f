//! `oxcow dd`: qemu-img dd, a block-by-block copy of an image's guest
//! view into a new image, with dd's `key=value` operands (`if=`, `of=`,
//! `bs=`, `count=`, `skip=`).
//!
//! What QEMU 10 does, kept on purpose because scripts see it: every block
//! is written, zeros included (the target ends fully allocated); `count`
//! bounds the *end* of the copy at `count * bs` from the start of the
//! input, so `skip` shortens the output instead of moving the window; a
//! `skip` past that end leaves an empty target and a message, exit 0.

use crate::error::{message, CliError, CliResult};
use crate::util::{open_image, parse_format, parse_num};
use oxcow::{Format, OpenOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Input format (probed when omitted).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Output format (default raw).
    #[arg(short = 'O', long = "output-format", default_value = "raw")]
    out_format: String,
    /// Open the input even if another process has it open for writing.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[command(flatten)]
    objects: crate::image_opts::ObjectArgs,
    /// `if=INPUT`, `of=OUTPUT`, `bs=SIZE` (default 512), `count=BLOCKS`,
    /// `skip=BLOCKS`.
    operands: Vec<String>,
}

/// The operands, once parsed.
#[derive(Debug, PartialEq)]
struct Operands {
    input: Option<String>,
    output: Option<String>,
    bs: u64,
    count: Option<u64>,
    skip: Option<u64>,
}

/// qemu-img keeps a block in an int.
const MAX_BS: u64 = i32::MAX as u64;

fn parse_operands(ops: &[String]) -> CliResult<Operands> {
    let mut o = Operands { input: None, output: None, bs: 512, count: None, skip: None };
    for op in ops {
        let Some((key, value)) = op.split_once('=') else {
            return Err(CliError::new(format!("unrecognized operand {op}")));
        };
        match key {
            "if" => o.input = Some(value.to_string()),
            "of" => o.output = Some(value.to_string()),
            "bs" => o.bs = block_size(value)?,
            "count" => o.count = Some(blocks("count", value)?),
            "skip" => o.skip = Some(blocks("skip", value)?),
            _ => return Err(CliError::new(format!("unrecognized operand {key}"))),
        }
    }
    Ok(o)
}

fn block_size(v: &str) -> CliResult<u64> {
    let range = || CliError::new(format!("Invalid bs specified. Must be between 1 and {MAX_BS}."));
    if v.trim_start().starts_with('-') {
        return Err(range());
    }
    let n = parse_num(v).ok_or_else(|| CliError::new(format!("Invalid bs specified: '{v}'.")))?;
    if n == 0 || n > MAX_BS {
        return Err(range());
    }
    Ok(n)
}

/// A block count as C's strtoll reads it with base 0 (`010` is eight,
/// `0x10` sixteen), in 0..=i64::MAX.
fn blocks(what: &str, v: &str) -> CliResult<u64> {
    let bad = || CliError::new(format!("Invalid {what} specified: '{v}'."));
    let t = v.trim_start();
    let (neg, t) = match t.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let n = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u64::from_str_radix(h, 16)
    } else if t.len() > 1 && t.starts_with('0') {
        u64::from_str_radix(&t[1..], 8)
    } else {
        t.parse::<u64>()
    };
    let n = n.map_err(|_| bad())?;
    if neg && n > 0 || n > i64::MAX as u64 {
        return Err(CliError::new(format!("Invalid {what} specified. Must be between 0 and {}.", i64::MAX)));
    }
    Ok(n)
}

pub fn run(mut a: Args) -> CliResult<i32> {
    let o = parse_operands(&a.operands)?;
    let (Some(mut input), Some(output)) = (o.input, o.output) else {
        return Err(CliError::new("Must specify both input and output files"));
    };
    a.objects.apply(&mut input, &mut a.format)?;
    let fmt =
        parse_format(a.format.as_deref()).map_err(|e| CliError::new(format!("Could not open '{input}': {}", e.msg)))?;
    let src = open_image(&input, &OpenOptions::default().format(fmt).force_share(a.force_share))?;
    let out_fmt = a.out_format.parse::<Format>().map_err(|_| CliError::new("Unknown file format"))?;
    let sdev = src.device();
    let bs = o.bs;
    let mut end = sdev.len();
    if let Some(c) = o.count.and_then(|c| c.checked_mul(bs)) {
        end = end.min(c);
    }
    let start = o.skip.map_or(Some(0), |s| s.checked_mul(bs));
    let out_size = start.and_then(|s| end.checked_sub(s)).unwrap_or(0);
    crate::cmd::create::create_target(&output, out_fmt, Vec::new(), None, None, out_size, Vec::new()).map_err(|e| {
        let cause = e.msg.strip_prefix(&format!("{output}: ")).unwrap_or(&e.msg).to_string();
        CliError::new(format!("{output}: error while creating output image: {cause}"))
    })?;
    let Some(start) = start.filter(|&s| s <= end) else {
        eprintln!("{}: {input}: cannot skip to specified offset", crate::dropin::prog());
        return Ok(0);
    };
    let dst = open_image(&output, &OpenOptions::default().format(Some(out_fmt)).write(true))?;
    let ddev = dst.device();
    let mut buf = vec![0u8; bs.min(end - start) as usize];
    let mut pos = start;
    while pos < end {
        let n = bs.min(end - pos) as usize;
        let b = &mut buf[..n];
        sdev.read_at(b, pos)
            .map_err(|e| CliError::new(format!("error while reading from input image file: {}", message(&e))))?;
        ddev.write_at(b, pos - start)
            .map_err(|e| CliError::new(format!("error while writing to output image file: {}", message(&e))))?;
        pos += n as u64;
    }
    dst.close().map_err(|e| CliError::new(format!("error while writing to output image file: {}", message(&e))))?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(v: &[&str]) -> CliResult<Operands> {
        parse_operands(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn operands_in_qemu_img_dd_words() {
        let o = ops(&["if=a", "of=b", "bs=1.5k", "count=010", "skip=0x10"]).unwrap();
        assert_eq!((o.bs, o.count, o.skip), (1536, Some(8), Some(16)));
        let err = |v: &[&str]| ops(v).err().map(|e| e.msg).unwrap_or_default();
        assert_eq!(err(&["bs"]), "unrecognized operand bs");
        assert_eq!(err(&["=x"]), "unrecognized operand ");
        assert_eq!(err(&["osize=1"]), "unrecognized operand osize");
        assert_eq!(err(&["bs=x"]), "Invalid bs specified: 'x'.");
        assert_eq!(err(&["bs=0"]), "Invalid bs specified. Must be between 1 and 2147483647.");
        assert_eq!(err(&["bs=-1"]), "Invalid bs specified. Must be between 1 and 2147483647.");
        assert_eq!(err(&["bs=2147483648"]), "Invalid bs specified. Must be between 1 and 2147483647.");
        assert_eq!(err(&["count=1k"]), "Invalid count specified: '1k'.");
        assert_eq!(err(&["skip=-1"]), "Invalid skip specified. Must be between 0 and 9223372036854775807.");
    }
}
