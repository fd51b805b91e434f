//! `oxcow bitmap`: change an image's persistent dirty bitmaps (like
//! `qemu-img bitmap`). Operations run in the order given, so the options
//! are parsed here rather than by clap, which does not keep that order.

use crate::error::{message, CliError, CliResult};
use crate::util::{open_image, parse_format, parse_num};
use oxcow::OpenOptions;

#[derive(clap::Args)]
#[command(disable_help_flag = true)]
pub struct Args {
    /// ( --merge SOURCE | --add | --remove | --clear | --enable | --disable )...
    /// [-f FMT] [-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY] FILENAME BITMAP
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

#[derive(Debug, PartialEq)]
enum Op {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(String),
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::Add => "add",
            Op::Remove => "remove",
            Op::Clear => "clear",
            Op::Enable => "enable",
            Op::Disable => "disable",
            Op::Merge(_) => "merge",
        }
    }
}

#[derive(Debug, Default)]
struct Parsed {
    ops: Vec<Op>,
    format: Option<String>,
    source_file: Option<String>,
    source_format: Option<String>,
    granularity: Option<u64>,
    positional: Vec<String>,
    /// `--object` and `--image-opts` (an encrypted image's secret).
    objects: crate::image_opts::ObjectArgs,
}

const USAGE: &str = "Usage: oxcow bitmap ( --merge SOURCE | --add | --remove | --clear | --enable | --disable )...\n\
    \x20      [--object OBJ] [--image-opts | -f FMT] [-b SOURCE_FILE [-F SOURCE_FMT]] [-g SIZE] FILENAME BITMAP";

fn parse(args: &[String]) -> CliResult<Option<Parsed>> {
    let mut p = Parsed::default();
    let mut it = args.iter();
    let value = |it: &mut std::slice::Iter<'_, String>, opt: &str| {
        it.next().cloned().ok_or_else(|| CliError::new(format!("option '{opt}' requires an argument")))
    };
    while let Some(a) = it.next() {
        // `--opt=value` and `-gVALUE` forms, as getopt accepts them.
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ if a.len() > 2 && a.starts_with('-') && !a.starts_with("--") => (a[..2].to_string(), Some(a[2..].into())),
            _ => (a.clone(), None),
        };
        let mut val = |opt: &str| match &inline {
            Some(v) => Ok(v.clone()),
            None => value(&mut it, opt),
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--add" => p.ops.push(Op::Add),
            "--remove" => p.ops.push(Op::Remove),
            "--clear" => p.ops.push(Op::Clear),
            "--enable" => p.ops.push(Op::Enable),
            "--disable" => p.ops.push(Op::Disable),
            "--merge" => p.ops.push(Op::Merge(val("--merge")?)),
            "-f" | "--format" => p.format = Some(val("-f")?),
            "--object" => p.objects.objects.push(val("--object")?),
            "--image-opts" => p.objects.image_opts = true,
            "-b" | "--source-file" => p.source_file = Some(val("-b")?),
            "-F" | "--source-format" => p.source_format = Some(val("-F")?),
            "-g" | "--granularity" => {
                let v = val("-g")?;
                let g = parse_num(&v).ok_or_else(|| CliError::new(format!("Invalid granularity specified: '{v}'.")))?;
                p.granularity = (g != 0).then_some(g);
            }
            f if f.starts_with('-') && f.len() > 1 => {
                return Err(CliError::new(format!(
                    "bitmap: unrecognized option '{a}'\nTry 'oxcow bitmap --help' for more info"
                )))
            }
            _ => p.positional.push(a.clone()),
        }
    }
    if p.ops.is_empty() {
        return Err(CliError::new("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge"));
    }
    if p.granularity.is_some() && !p.ops.contains(&Op::Add) {
        return Err(CliError::new("granularity only supported with --add"));
    }
    if p.source_format.is_some() && p.source_file.is_none() {
        return Err(CliError::new("-F only supported with -b"));
    }
    if p.source_file.is_some() && !p.ops.iter().any(|o| matches!(o, Op::Merge(_))) {
        return Err(CliError::new("Merge bitmap source file only supported with --merge"));
    }
    if p.positional.len() != 2 {
        return Err(CliError::new("Expecting filename and bitmap name"));
    }
    Ok(Some(p))
}

pub fn run(a: Args) -> CliResult<i32> {
    let Some(p) = parse(&a.args)? else {
        println!("{USAGE}");
        return Ok(0);
    };
    let (mut file, name) = (p.positional[0].clone(), &p.positional[1]);
    let mut format = p.format.clone();
    p.objects.apply(&mut file, &mut format)?;
    let file = &file;
    let format = parse_format(format.as_deref())?;
    // Bitmaps belong to one layer: as qemu-img, neither image's backing
    // chain is opened (a missing or busy backing file is no obstacle).
    let img = open_image(file, &OpenOptions::default().format(format).write(true).no_backing(true))?;
    let q = img.qcow2().ok_or_else(|| {
        CliError::new(format!(
            "Operation {} on bitmap {name} failed: Can't store persistent bitmaps to '{file}': Operation not supported",
            p.ops[0].name()
        ))
    })?;
    // The source image of --merge -b is opened once, read-only.
    let source = match &p.source_file {
        Some(src) => {
            let fmt = parse_format(p.source_format.as_deref())?;
            Some(open_image(src, &OpenOptions::read_only().format(fmt).no_backing(true))?)
        }
        None => None,
    };
    for op in &p.ops {
        let r = match op {
            Op::Add => q.bitmap_add(name, p.granularity, true),
            Op::Remove => q.bitmap_remove(name),
            Op::Clear => q.bitmap_clear(name),
            Op::Enable => q.bitmap_set_enabled(name, true),
            Op::Disable => q.bitmap_set_enabled(name, false),
            Op::Merge(src) => {
                let from = match &source {
                    Some(s) => {
                        s.qcow2().ok_or_else(|| oxcow::Error::invalid(format!("Dirty bitmap '{src}' not found")))
                    }
                    None => Ok(q),
                };
                from.and_then(|s| s.bitmap_data(src)).and_then(|bits| q.bitmap_merge(name, &bits))
            }
        };
        r.map_err(|e| CliError::new(format!("Operation {} on bitmap {name} failed: {}", op.name(), message(&e))))?;
    }
    img.close()?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn operations_keep_their_order_and_last_granularity_wins() {
        let p = parse(&args("--remove --merge a -g 64k --add f.qcow2 b -g 128k")).unwrap().unwrap();
        assert_eq!(p.ops, vec![Op::Remove, Op::Merge("a".into()), Op::Add]);
        assert_eq!(p.granularity, Some(128 << 10));
        assert_eq!(p.positional, args("f.qcow2 b"));
    }

    #[test]
    fn qemu_img_usage_errors() {
        let err = |s: &str| parse(&args(s)).err().map(|e| e.msg).unwrap_or_default();
        assert_eq!(err("f b"), "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge");
        assert_eq!(err("--add f"), "Expecting filename and bitmap name");
        assert_eq!(err("-g 64k --remove f b"), "granularity only supported with --add");
        assert_eq!(err("-F qcow2 --add f b"), "-F only supported with -b");
        assert_eq!(err("-b x --add f b"), "Merge bitmap source file only supported with --merge");
        assert_eq!(err("-g abc --add f b"), "Invalid granularity specified: 'abc'.");
    }
}
