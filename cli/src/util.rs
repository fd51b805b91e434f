//! Helpers shared by the subcommands: image opening, option lists,
//! and the number and JSON formatting qemu's tools use.

use crate::error::{message, CliError, CliResult};
use oxcow::{Format, Image, OpenOptions};
use serde_json::Value;

pub fn parse_format(name: Option<&str>) -> CliResult<Option<Format>> {
    match name {
        None => Ok(None),
        Some(n) => n.parse::<Format>().map(Some).map_err(|_| CliError::new(format!("Unknown driver '{n}'"))),
    }
}

/// The plain file name behind QEMU's `file:` protocol prefix; a relative
/// name that would itself read as a protocol (`image:top.qcow2`) gets
/// `./`, as QEMU names it then. None for names without the prefix.
pub fn file_protocol_name(name: &str) -> Option<String> {
    let rest = name.strip_prefix("file:")?;
    let like_protocol = rest.split('/').next().is_some_and(|first| first.contains(':'));
    Some(if like_protocol { format!("./{rest}") } else { rest.to_string() })
}

/// Opens an image, wrapping errors the way qemu-img does ("Could not open
/// 'X': ...").
pub fn open_image(path: &str, opts: &OpenOptions) -> CliResult<Image> {
    let plain = file_protocol_name(path);
    // An image given by an option string is named by that string.
    let given = crate::image_opts::given_name(path);
    let shown = given.as_deref().unwrap_or(path);
    let path = plain.as_deref().unwrap_or(path);
    let opts = crate::object::secret::with_key(path, with_network_permission(opts));
    let opts = crate::qcow2_cache_opts::with_cache(path, opts);
    let img = oxcow::open(path, &opts).map_err(|e| {
        // qemu-img repeats the name even when the cause already has it.
        CliError::new(format!("Could not open '{shown}': {}", message(&e)))
    })?;
    report_dirty_repair(path, &img);
    warn_if_probed_raw(path, &img, opts.write);
    Ok(img)
}

/// qemu's warning, in its words, where qemu says it: an image whose
/// format was probed as raw, opened for writing.
pub fn warn_if_probed_raw(path: &str, img: &Image, write: bool) {
    if img.format_probed() && img.format() == Format::Raw && write {
        eprintln!(
            "WARNING: Image format was not specified for '{path}' and probing guessed raw.\n         \
             Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         \
             Specify the 'raw' format explicitly to remove the restrictions."
        );
    }
}

/// Backing files named by network addresses inside an image are followed
/// only when the user says so: `OXCOW_ALLOW_NETWORK_BACKING=1`.
pub fn with_network_permission(opts: &OpenOptions) -> OpenOptions {
    let opts = opts.clone();
    if network_backing_allowed() {
        return opts.allow_network_backing(true);
    }
    opts
}

/// Whether the user allowed network backing files
/// (`OXCOW_ALLOW_NETWORK_BACKING=1`).
pub fn network_backing_allowed() -> bool {
    std::env::var("OXCOW_ALLOW_NETWORK_BACKING").is_ok_and(|v| v == "1")
}

/// Says on stderr that opening the image repaired it (dirty bit set by an
/// unclean close with lazy refcounts), as the user should know.
pub fn report_dirty_repair(path: &str, img: &Image) {
    // QEMU's tools print the repair's own lines (its check's), nothing
    // more.
    if crate::dropin::active() {
        if let Some(rep) = img.qcow2().and_then(|q| q.repaired_on_open()) {
            rep.messages.iter().for_each(|m| eprintln!("{m}"));
        }
        return;
    }
    if let Some(rep) = img.qcow2().and_then(|q| q.repaired_on_open()) {
        eprintln!(
            "{}: '{path}' was not closed cleanly (dirty bit set): refcounts repaired ({} leaked clusters and {} corruptions fixed)",
            crate::dropin::prog(),
            rep.leaks_fixed, rep.corruptions_fixed
        );
    }
}

/// Parses qemu-style sizes: plain bytes, `k/M/G/T/P/E` suffixes, `0x` hex.
pub fn parse_num(s: &str) -> Option<u64> {
    let t = s.trim();
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).ok();
    }
    if t.ends_with(['b', 'B']) && t.len() > 1 && t[..t.len() - 1].chars().all(|c| c.is_ascii_digit()) {
        return t[..t.len() - 1].parse().ok();
    }
    oxcow::options::parse_size(t).ok()
}

/// qemu's `-o key=value,key=value` lists (repeated `-o` merge; `,,` is an
/// escaped comma).
pub fn parse_options(list: &[String]) -> CliResult<Vec<(String, String)>> {
    Ok(list.iter().flat_map(|arg| oxcow::options::split_options(arg)).collect())
}

pub fn parse_bool(key: &str, v: &str) -> CliResult<bool> {
    match v {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(CliError::new(format!("Parameter '{key}' expects 'on' or 'off'"))),
    }
}

/// A Unix time as `YYYY-MM-DD HH:MM:SS` in the local time zone: the zone
/// `TZ` names (a zone name or a POSIX rule), else /etc/localtime, as
/// localtime(3) finds it for qemu-img (snapshot lists, `info`).
pub fn local_date(secs: i64) -> String {
    date_in(secs, &jiff::tz::TimeZone::system())
}

/// A Unix time as `YYYY-MM-DD HH:MM:SS` in `tz`; the number itself when
/// it is out of the calendar's range.
pub fn date_in(secs: i64, tz: &jiff::tz::TimeZone) -> String {
    match jiff::Timestamp::from_second(secs) {
        Ok(ts) => ts.to_zoned(tz.clone()).strftime("%Y-%m-%d %H:%M:%S").to_string(),
        Err(_) => secs.to_string(),
    }
}

/// qemu-img's human size: three significant digits (`64 MiB`, `7.81 MiB`).
pub fn human(n: u64) -> String {
    oxcow::options::human_size(n)
}

/// qemu-io's size strings: `32 bytes`, `4 KiB`, `7.812 MiB`.
pub fn io_size(n: f64) -> String {
    const UNITS: [(&str, f64); 6] = [
        ("EiB", 1152921504606846976.0),
        ("PiB", 1125899906842624.0),
        ("TiB", 1099511627776.0),
        ("GiB", 1073741824.0),
        ("MiB", 1048576.0),
        ("KiB", 1024.0),
    ];
    for (u, m) in UNITS {
        if n >= m {
            let s = format!("{:.3}", n / m);
            let s = s.strip_suffix(".000").unwrap_or(&s).to_string();
            return format!("{s} {u}");
        }
    }
    let s = format!("{n:.3}");
    let s = s.strip_suffix(".000").unwrap_or(&s).to_string();
    format!("{s} bytes")
}

/// Prints JSON the way qemu's pretty printer lays it out: four-space
/// indent, and empty containers still broken over two lines.
pub fn qemu_json(v: &Value) -> String {
    let mut out = String::new();
    write_json(&mut out, v, 0);
    out
}

fn write_json(out: &mut String, v: &Value, indent: usize) {
    let pad = |n: usize| " ".repeat(n * 4);
    match v {
        Value::Array(a) => {
            out.push_str("[\n");
            for (i, x) in a.iter().enumerate() {
                out.push_str(&pad(indent + 1));
                write_json(out, x, indent + 1);
                if i + 1 < a.len() {
                    out.push(',');
                }
                out.push('\n');
            }
            out.push_str(&pad(indent));
            out.push(']');
        }
        Value::Object(o) => {
            out.push_str("{\n");
            let n = o.len();
            for (i, (k, x)) in o.iter().enumerate() {
                out.push_str(&pad(indent + 1));
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                write_json(out, x, indent + 1);
                if i + 1 < n {
                    out.push(',');
                }
                out.push('\n');
            }
            out.push_str(&pad(indent));
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_lists() {
        let o = parse_options(&["a=1,b=x,,y".into(), "c".into()]).unwrap();
        assert_eq!(o, vec![("a".into(), "1".into()), ("b".into(), "x,y".into()), ("c".into(), "on".into())]);
    }

    #[test]
    fn qemu_io_sizes() {
        assert_eq!(io_size(0.0), "0 bytes");
        assert_eq!(io_size(32.0), "32 bytes");
        assert_eq!(io_size(4096.0), "4 KiB");
        assert_eq!(io_size(8192000.0), "7.812 MiB");
        assert_eq!(io_size(3000.0), "2.930 KiB");
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_num("4k"), Some(4096));
        assert_eq!(parse_num("0x10"), Some(16));
        assert_eq!(parse_num("512b"), Some(512));
        assert_eq!(parse_num("abc"), None);
    }

    #[test]
    fn json_layout_like_qemu() {
        let v = serde_json::json!({"a": [], "b": {"c": 1}, "d": [true]});
        assert_eq!(
            qemu_json(&v),
            "{\n    \"a\": [\n    ],\n    \"b\": {\n        \"c\": 1\n    },\n    \"d\": [\n        true\n    ]\n}"
        );
    }
}
