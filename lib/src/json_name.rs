//! QEMU's `json:{...}` image names, as far as oxcow opens them: a format
//! over a host file, possibly through a blkdebug node (error injection)
//! or, for metadata only, a quorum node.
//!
//! QEMU accepts a whole block-layer configuration there; oxcow takes the
//! trees that come down to one host file, because those are the ones a
//! name can stand for without oxcow building a block graph:
//!
//! ```text
//! { "driver": FORMAT, "file": NODE }       a format over NODE
//! NODE = { "driver": "file", "filename": PATH }
//!      | { "driver": "blkdebug", "image": NODE,
//!          "inject-error": [...], "set-state": [...],
//!          request limits (align, max-transfer, ...) }
//!      | { "driver": "quorum", "children": [NODE, ...], ... }
//! ```
//!
//! A top-level NODE stands alone too (the format is then probed). Any
//! other driver or key is refused with a one-line error rather than
//! silently dropped. A quorum node is taken only where nothing is read
//! or written (`qemu-img info`): its first child then stands for it.

use crate::image::Format;
use crate::storage::{parse_blkdebug_options, BlkdebugRules};
use crate::{Error, Result};
use serde_json::Value;
use std::path::PathBuf;

/// What a `json:` name opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonImage {
    /// The format driver at the top (`None`: probed).
    pub format: Option<Format>,
    /// The host file under every layer.
    pub file: PathBuf,
    /// The rules of a blkdebug node between the format and the file.
    pub blkdebug: Option<BlkdebugRules>,
    /// A quorum node stands between the format and the file: the image
    /// has no one directory (QEMU then cannot tell where relative
    /// backing names point), and it is opened for metadata only.
    pub quorum: bool,
}

/// The image a `json:{...}` name describes; `None` for other names.
pub fn parse(name: &str) -> Option<Result<JsonImage>> {
    let text = name.strip_prefix("json:")?;
    Some(parse_text(text))
}

fn parse_text(text: &str) -> Result<JsonImage> {
    let v: Value = serde_json::from_str(&standard_json(text))
        .map_err(|e| Error::invalid(format!("Could not parse the JSON options: {e}")))?;
    let Value::Object(top) = &v else {
        return Err(Error::invalid("Invalid JSON object given"));
    };
    let driver = string_key(top, "driver")?.ok_or_else(|| Error::invalid("Parameter 'driver' is missing"))?;
    let mut out = JsonImage { format: None, file: PathBuf::new(), blkdebug: None, quorum: false };
    match driver.parse::<Format>() {
        Ok(f) => {
            refuse_other_keys(top, &["driver", "file"], &driver)?;
            out.format = Some(f);
            let file = top.get("file").ok_or_else(|| Error::invalid("Parameter 'file' is missing"))?;
            out.file = node(file, &mut out.blkdebug, &mut out.quorum)?;
        }
        Err(_) => out.file = node(&v, &mut out.blkdebug, &mut out.quorum)?,
    }
    Ok(out)
}

/// blkdebug's request limits: they change how requests are split, never
/// what is read or written.
const BLKDEBUG_LIMITS: &[&str] =
    &["align", "max-transfer", "opt-write-zero", "max-write-zero", "opt-discard", "max-discard"];

/// The host file of a protocol-level node, collecting a blkdebug node's
/// rules and whether a quorum node was crossed.
fn node(v: &Value, rules: &mut Option<BlkdebugRules>, quorum: &mut bool) -> Result<PathBuf> {
    let Value::Object(m) = v else {
        return Err(Error::unsupported("a json: child given by node name is not supported by oxcow"));
    };
    let driver = string_key(m, "driver")?.ok_or_else(|| Error::invalid("Parameter 'driver' is missing"))?;
    match driver.as_str() {
        "file" => {
            refuse_other_keys(m, &["driver", "filename"], &driver)?;
            Ok(PathBuf::from(
                string_key(m, "filename")?.ok_or_else(|| Error::invalid("Parameter 'filename' is required"))?,
            ))
        }
        "blkdebug" => {
            // No `config`: a backing name is data from the image, and
            // would name a host file for oxcow to read and parse.
            let mut keys = vec!["driver", "image", "inject-error", "set-state"];
            keys.extend_from_slice(BLKDEBUG_LIMITS);
            refuse_other_keys(m, &keys, &driver)?;
            if rules.is_some() {
                return Err(Error::unsupported("blkdebug over blkdebug is not supported by oxcow"));
            }
            let mut found = BlkdebugRules::default();
            let mut pairs = Vec::new();
            for k in ["inject-error", "set-state"] {
                if let Some(list) = m.get(k) {
                    flatten(k, list, &mut pairs);
                }
            }
            let listed = parse_blkdebug_options(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .map_err(|e| Error::invalid(e.0))?;
            found.0.extend(listed);
            *rules = Some(found);
            let image = m.get("image").ok_or_else(|| Error::invalid("Parameter 'image' is missing"))?;
            node(image, rules, quorum)
        }
        "quorum" => {
            refuse_other_keys(
                m,
                &["driver", "children", "vote-threshold", "read-pattern", "rewrite-corrupted"],
                &driver,
            )?;
            let Some(Value::Array(children)) = m.get("children") else {
                return Err(Error::invalid("Parameter 'children' is missing"));
            };
            let first =
                children.first().ok_or_else(|| Error::invalid("Number of provided children must be 1 or more"))?;
            *quorum = true;
            // Every child must be one oxcow could open, though only the
            // first is read.
            for c in &children[1..] {
                node(c, &mut None, &mut false)?;
            }
            node(first, rules, quorum)
        }
        other => Err(Error::unsupported(format!("driver '{other}' inside a json: name is not supported by oxcow"))),
    }
}

fn string_key(m: &serde_json::Map<String, Value>, key: &str) -> Result<Option<String>> {
    match m.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(Error::invalid(format!("Invalid parameter type for '{key}', expected: string"))),
    }
}

fn refuse_other_keys(m: &serde_json::Map<String, Value>, known: &[&str], driver: &str) -> Result<()> {
    match m.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(Error::unsupported(format!(
            "option '{k}' of driver '{driver}' inside a json: name is not supported by oxcow"
        ))),
        None => Ok(()),
    }
}

/// Nested lists and objects as QEMU's dotted keys (`inject-error.0.event`),
/// booleans as `on`/`off`.
fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => m.iter().for_each(|(k, x)| flatten(&format!("{prefix}.{k}"), x, out)),
        Value::Array(a) => a.iter().enumerate().for_each(|(i, x)| flatten(&format!("{prefix}.{i}"), x, out)),
        Value::String(s) => out.push((prefix.to_string(), s.clone())),
        Value::Bool(b) => out.push((prefix.to_string(), if *b { "on" } else { "off" }.to_string())),
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

/// QEMU's JSON takes 'single-quoted' strings too (the iotests write their
/// `json:` names so); they become standard double-quoted ones.
pub fn standard_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                out.push('"');
                while let Some(c) = chars.next() {
                    out.push(c);
                    match c {
                        '\\' => out.extend(chars.next()),
                        '"' => break,
                        _ => {}
                    }
                }
            }
            '\'' => {
                out.push('"');
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => match chars.next() {
                            Some('\'') => out.push('\''),
                            Some(e) => {
                                out.push('\\');
                                out.push(e);
                            }
                            None => {}
                        },
                        '"' => out.push_str("\\\""),
                        '\'' => break,
                        c => out.push(c),
                    }
                }
                out.push('"');
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::BlkdebugAction;

    #[test]
    fn blkdebug_between_format_and_file_carries_its_rules() {
        let j = parse(
            "json:{'driver': 'qcow2', 'file': { 'driver': 'blkdebug', 'inject-error': [{ 'event': 'write_aio', \
             'errno': 28, 'once': true }], 'image': { 'driver': 'file', 'filename': '/x/b.qcow2' }}}",
        )
        .unwrap()
        .unwrap();
        assert_eq!(j.format, Some(Format::Qcow2));
        assert_eq!(j.file, PathBuf::from("/x/b.qcow2"));
        let rules = j.blkdebug.unwrap().0;
        assert_eq!(rules.len(), 1);
        assert!(matches!(rules[0].action, BlkdebugAction::InjectError { errno: 28, once: true, .. }));
        assert!(!j.quorum);
    }

    #[test]
    fn quorum_stands_for_its_first_child_and_unknown_drivers_are_refused() {
        let j = parse(
            r#"json:{"driver":"qcow2","file":{"driver":"quorum","vote-threshold":1,"children":[{"driver":"file","filename":"a"},{"driver":"file","filename":"b"}]}}"#,
        )
        .unwrap()
        .unwrap();
        assert!(j.quorum && j.file == std::path::Path::new("a"));
        assert!(parse("x.qcow2").is_none());
        assert!(parse(r#"json:{"driver":"qcow2","file":{"driver":"ssh","path":"/a"}}"#).unwrap().is_err());
        assert!(parse(r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"a","x":1}}"#).unwrap().is_err());
        assert!(parse("json:{").unwrap().is_err() && parse("json:[1]").unwrap().is_err());
        // A config file would be a host file named by image data.
        let config = r#"json:{"driver":"qcow2","file":{"driver":"blkdebug","config":"c","image":{"driver":"file","filename":"a"}}}"#;
        assert!(parse(config).unwrap().is_err());
        let plain = parse(r#"json:{"driver":"file","filename":"a"}"#).unwrap().unwrap();
        assert_eq!((plain.format, plain.file, plain.blkdebug), (None, PathBuf::from("a"), None));
    }
}
