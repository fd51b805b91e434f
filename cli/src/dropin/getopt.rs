//! GNU `getopt_long` as QEMU's tools use it: short option clusters
//! (`-rU`), attached or separate values (`-fqcow2`, `-f qcow2`), long
//! options with `=` or a separate value, unique prefixes of long names,
//! arguments permuted so options may follow the file name, `--` ending
//! the options. Errors are worded as glibc words them, since scripts and
//! the iotests compare them.

/// Whether an option takes a value.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum HasArg {
    No,
    Required,
}

/// A long option: its name, whether it takes a value, and the key it is
/// reported under (its short letter when it has one).
pub struct LongOpt {
    pub name: &'static str,
    pub has_arg: HasArg,
    pub key: &'static str,
}

pub const fn long(name: &'static str, has_arg: HasArg, key: &'static str) -> LongOpt {
    LongOpt { name, has_arg, key }
}

/// The parsed command line: options in order, then the other words.
#[derive(Debug, Default)]
pub struct Parsed {
    pub opts: Vec<(String, Option<String>)>,
    pub args: Vec<String>,
}

impl Parsed {
    pub fn has(&self, key: &str) -> bool {
        self.opts.iter().any(|o| o.0 == key)
    }
    /// The last value given for `key` (later options override earlier ones).
    pub fn last(&self, key: &str) -> Option<&str> {
        self.opts.iter().rev().find(|o| o.0 == key).and_then(|o| o.1.as_deref())
    }
}

/// `shorts` is getopt's option string (`"c:rU"`: a `:` after a letter
/// marks a value). `args` excludes the program name.
pub fn parse(args: &[String], shorts: &str, longs: &[LongOpt]) -> Result<Parsed, String> {
    let mut p = Parsed::default();
    let mut i = 0;
    while i < args.len() {
        let w = &args[i];
        i += 1;
        if w == "--" {
            p.args.extend(args[i..].iter().cloned());
            break;
        }
        if let Some(body) = w.strip_prefix("--") {
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (body, None),
            };
            let opt = find_long(longs, name, w)?;
            let value = match (opt.has_arg, inline) {
                (HasArg::No, Some(_)) => return Err(format!("option '--{}' doesn't allow an argument", opt.name)),
                (HasArg::No, None) => None,
                (HasArg::Required, Some(v)) => Some(v),
                (HasArg::Required, None) => match args.get(i) {
                    Some(v) => {
                        i += 1;
                        Some(v.clone())
                    }
                    None => return Err(format!("option '--{}' requires an argument", opt.name)),
                },
            };
            p.opts.push((opt.key.to_string(), value));
            continue;
        }
        if w.len() < 2 || !w.starts_with('-') {
            p.args.push(w.clone());
            continue;
        }
        let chars: Vec<char> = w[1..].chars().collect();
        let mut j = 0;
        while j < chars.len() {
            let c = chars[j];
            let pos = shorts.find(c).filter(|_| c != ':').ok_or_else(|| format!("invalid option -- '{c}'"))?;
            if shorts[pos + c.len_utf8()..].starts_with(':') {
                let rest: String = chars[j + 1..].iter().collect();
                let value = if !rest.is_empty() {
                    rest
                } else {
                    match args.get(i) {
                        Some(v) => {
                            i += 1;
                            v.clone()
                        }
                        None => return Err(format!("option requires an argument -- '{c}'")),
                    }
                };
                p.opts.push((c.to_string(), Some(value)));
                break;
            }
            p.opts.push((c.to_string(), None));
            j += 1;
        }
    }
    Ok(p)
}

fn find_long<'a>(longs: &'a [LongOpt], name: &str, word: &str) -> Result<&'a LongOpt, String> {
    if let Some(o) = longs.iter().find(|o| o.name == name) {
        return Ok(o);
    }
    let cands: Vec<&LongOpt> = longs.iter().filter(|o| o.name.starts_with(name)).collect();
    match cands.as_slice() {
        [one] => Ok(one),
        [] => Err(format!("unrecognized option '{word}'")),
        many => {
            let names: Vec<String> = many.iter().map(|o| format!("'--{}'", o.name)).collect();
            Err(format!("option '{word}' is ambiguous; possibilities: {}", names.join(" ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONGS: &[LongOpt] = &[
        long("cache", HasArg::Required, "t"),
        long("cmd", HasArg::Required, "c"),
        long("read-only", HasArg::No, "r"),
        long("image-opts", HasArg::No, "image-opts"),
    ];

    fn run(words: &[&str]) -> Result<Parsed, String> {
        let v: Vec<String> = words.iter().map(|s| s.to_string()).collect();
        parse(&v, "c:rt:U", LONGS)
    }

    #[test]
    fn permutes_and_clusters() {
        let p = run(&["x.qcow2", "-rU", "-c", "read 0 1", "--cache=none", "-tunsafe"]).unwrap();
        assert_eq!(p.args, vec!["x.qcow2"]);
        assert!(p.has("r") && p.has("U"));
        assert_eq!(p.last("c"), Some("read 0 1"));
        assert_eq!(p.last("t"), Some("unsafe"));
    }

    #[test]
    fn prefixes_and_double_dash() {
        let p = run(&["--read", "--image", "--", "-r"]).unwrap();
        assert!(p.has("r") && p.has("image-opts"));
        assert_eq!(p.args, vec!["-r"]);
    }

    #[test]
    fn glibc_wording() {
        assert_eq!(run(&["-z"]).unwrap_err(), "invalid option -- 'z'");
        assert_eq!(run(&["--bogus"]).unwrap_err(), "unrecognized option '--bogus'");
        assert_eq!(run(&["-c"]).unwrap_err(), "option requires an argument -- 'c'");
        assert_eq!(run(&["--cache"]).unwrap_err(), "option '--cache' requires an argument");
        assert_eq!(run(&["--read-only=1"]).unwrap_err(), "option '--read-only' doesn't allow an argument");
        assert_eq!(run(&["--c", "x"]).unwrap_err(), "option '--c' is ambiguous; possibilities: '--cache' '--cmd'");
    }
}
