//! QEMU's textual syntax for options: option lists (`-o key=value,...`)
//! and sizes (`4k`, `1.5G`).

pub use crate::size::{human_size, parse_size};

/// Splits an option string at its commas; `,,` stands for a comma inside
/// a part. Empty parts are kept (callers decide what they mean).
pub fn split_escaped(s: &str) -> Vec<String> {
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    let mut parts = Vec::new();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    parts
}

/// Splits `a=1,b=2` into pairs; `,,` stands for a comma inside a value and a
/// bare `key` means `key=on`.
pub fn split_options(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let parts = split_escaped(s);
    for p in parts.into_iter().filter(|p| !p.is_empty()) {
        match p.split_once('=') {
            Some((k, v)) => out.push((k.to_string(), v.to_string())),
            None => out.push((p, "on".to_string())),
        }
    }
    out
}
