//! qemu's `--object` definitions: `TYPE,id=ID,key=value,...` (keyval
//! syntax: `,,` is a literal comma, dotted keys such as `rules.0.match`
//! build lists and structs) or the JSON form `{"qom-type": ..., ...}`,
//! checked with qemu-img's error wording.
//!
//! Each object type lives in its own file under `object/` and registers
//! one line in [`TYPES`]: a function that takes the properties it knows
//! from a [`Props`] and returns an [`Object`]. Adding a type is a local
//! change: a file, a variant and a line.

mod authz;
pub mod secret;
mod tls;

use crate::error::{CliError, CliResult};
use std::collections::BTreeMap;

pub use authz::AuthzObject;
pub use tls::TlsCreds;

/// A defined object.
#[derive(Debug, Clone)]
pub enum Object {
    /// `tls-creds-x509` or `tls-creds-psk`.
    TlsCreds(TlsCreds),
    /// `authz-simple`, `authz-list` or `authz-listfile`.
    Authz(AuthzObject),
    /// `secret`.
    Secret(secret::SecretObject),
}

impl Object {
    /// What qemu does once every property is set: load and check files.
    fn complete(&self) -> CliResult<()> {
        match self {
            Object::TlsCreds(c) => c.complete(),
            Object::Authz(_) | Object::Secret(_) => Ok(()),
        }
    }
}

/// Makes an object of one type from its properties.
type Builder = fn(&mut Props) -> CliResult<Object>;

/// The object types understood, by qom-type.
const TYPES: &[(&str, Builder)] = &[
    ("tls-creds-x509", tls::x509),
    ("tls-creds-psk", tls::psk),
    ("authz-simple", authz::simple),
    ("authz-list", authz::list),
    ("authz-listfile", authz::listfile),
    ("secret", secret::secret),
];

/// The properties of one object definition, taken one by one by the
/// type's builder; whatever is left over is an error.
#[derive(Debug, Default)]
pub struct Props {
    values: BTreeMap<String, String>,
}

impl Props {
    /// Takes an optional string property.
    pub fn take(&mut self, key: &str) -> Option<String> {
        self.values.remove(key)
    }

    /// Takes a required string property.
    pub fn require(&mut self, key: &str) -> CliResult<String> {
        self.take(key).ok_or_else(|| CliError::new(format!("Parameter '{key}' is missing")))
    }

    /// Takes an optional boolean property (`on`/`off`, `yes`/`no`, `true`/`false`).
    pub fn take_bool(&mut self, key: &str) -> CliResult<Option<bool>> {
        self.take(key).map(|v| crate::util::parse_bool(key, &v)).transpose()
    }

    /// Takes an optional enumeration property; `name` is how qemu calls it
    /// in errors (the last component of a dotted key).
    pub fn take_enum<T: Copy>(&mut self, key: &str, values: &[(&str, T)]) -> CliResult<Option<T>> {
        let Some(v) = self.take(key) else { return Ok(None) };
        let name = key.rsplit('.').next().unwrap_or(key);
        values
            .iter()
            .find(|(n, _)| *n == v)
            .map(|(_, t)| Some(*t))
            .ok_or_else(|| CliError::new(format!("Parameter '{name}' does not accept value '{v}'")))
    }

    /// Whether any property starts with `prefix` (for lists: `rules.3.`).
    pub fn has_prefix(&self, prefix: &str) -> bool {
        self.values.keys().any(|k| k.starts_with(prefix))
    }

    /// The properties of a keyval string (`implied` names a leading
    /// element without `=`) or of a JSON object: the syntaxes every qemu
    /// option taking structured values accepts (`--blockdev`, `--export`).
    pub fn from_arg(arg: &str, implied: Option<&str>) -> CliResult<Props> {
        let pairs = if arg.trim_start().starts_with('{') {
            let v: serde_json::Value =
                serde_json::from_str(arg).map_err(|e| CliError::new(format!("JSON parse error, {e}")))?;
            Props::from_json(&v)?
        } else {
            parse_keyval(arg, implied)?
        };
        Ok(Props::from_pairs(pairs))
    }

    /// The properties of a JSON object, flattened to dotted keys (QMP
    /// arguments).
    pub fn from_json(v: &serde_json::Value) -> CliResult<Vec<(String, String)>> {
        if !v.is_object() {
            return Err(CliError::new("Invalid parameter type, expected 'object'"));
        }
        let mut out = Vec::new();
        flatten_json("", v, &mut out);
        Ok(out)
    }

    /// Properties from key-value pairs; a later value for a key wins, as
    /// in keyval.
    pub fn from_pairs(pairs: Vec<(String, String)>) -> Props {
        Props { values: pairs.into_iter().collect() }
    }

    /// Fails on the first property nobody took.
    pub fn finish(self) -> CliResult<()> {
        match self.values.into_keys().next() {
            Some(k) => Err(CliError::new(format!("Parameter '{k}' is unexpected"))),
            None => Ok(()),
        }
    }
}

/// Splits a keyval string: `,,` is a comma; an element without `=` is
/// `implied`'s value when it comes first.
pub fn parse_keyval(s: &str, implied: Option<&str>) -> CliResult<Vec<(String, String)>> {
    let parts = oxcow::options::split_escaped(s);
    let mut out = Vec::new();
    for (i, p) in parts.into_iter().enumerate() {
        match p.split_once('=') {
            Some((k, v)) if !k.is_empty() => out.push((k.to_string(), v.to_string())),
            Some(_) => return Err(CliError::new("Invalid parameter ''")),
            None if i == 0 && implied.is_some() && !p.is_empty() => {
                out.push((implied.unwrap_or_default().to_string(), p));
            }
            None if p.is_empty() => return Err(CliError::new("Invalid parameter ''")),
            None => return Err(CliError::new(format!("Expected '=' after parameter '{p}'"))),
        }
    }
    Ok(out)
}

/// Flattens JSON into keyval's dotted keys (`{"rules": [{"match": "x"}]}`
/// becomes `rules.0.match=x`).
pub(crate) fn flatten_json(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
    let key = |k: &str| if prefix.is_empty() { k.to_string() } else { format!("{prefix}.{k}") };
    match v {
        serde_json::Value::Object(m) => m.iter().for_each(|(k, x)| flatten_json(&key(k), x, out)),
        serde_json::Value::Array(a) => {
            a.iter().enumerate().for_each(|(i, x)| flatten_json(&key(&i.to_string()), x, out))
        }
        serde_json::Value::String(s) => out.push((prefix.to_string(), s.clone())),
        serde_json::Value::Bool(b) => out.push((prefix.to_string(), if *b { "on" } else { "off" }.to_string())),
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

/// The objects given on a command line, by id.
#[derive(Debug, Default, Clone)]
pub struct Objects {
    by_id: BTreeMap<String, Object>,
}

impl Objects {
    /// Parses every `--object` argument, in order.
    pub fn parse(args: &[String]) -> CliResult<Objects> {
        let mut objects = Objects::default();
        for a in args {
            let (id, obj) = parse_one(a)?;
            if objects.by_id.contains_key(&id) {
                return Err(CliError::new(format!(
                    "attempt to add duplicate property '{id}' to object (type 'container')"
                )));
            }
            objects.by_id.insert(id, obj);
        }
        Ok(objects)
    }

    /// The object with this id.
    pub fn get(&self, id: &str) -> Option<&Object> {
        self.by_id.get(id)
    }
}

/// Parses one definition into its id and object.
pub fn parse_one(arg: &str) -> CliResult<(String, Object)> {
    let pairs = if arg.trim_start().starts_with('{') {
        let v: serde_json::Value =
            serde_json::from_str(arg).map_err(|e| CliError::new(format!("JSON parse error, {e}")))?;
        if !v.is_object() {
            return Err(CliError::new("--object value must be a JSON object"));
        }
        let mut out = Vec::new();
        flatten_json("", &v, &mut out);
        out
    } else {
        parse_keyval(arg, Some("qom-type"))?
    };
    let mut props = Props::default();
    for (k, v) in pairs {
        // keyval: a later value for the same key wins.
        props.values.insert(k, v);
    }
    let qom_type = props.require("qom-type")?;
    let build = TYPES
        .iter()
        .find(|(t, _)| *t == qom_type)
        .map(|(_, f)| *f)
        .ok_or_else(|| CliError::new(format!("Parameter 'qom-type' does not accept value '{qom_type}'")))?;
    let id = props.require("id")?;
    let obj = build(&mut props)?;
    props.finish()?;
    obj.complete()?;
    Ok((id, obj))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(arg: &str) -> String {
        parse_one(arg).unwrap_err().msg
    }

    #[test]
    fn keyval_escapes_and_implied_type() {
        let kv = parse_keyval("tls-creds-x509,id=t,dir=/a,,b,,,endpoint=server", Some("qom-type")).unwrap();
        assert_eq!(kv[0], ("qom-type".into(), "tls-creds-x509".into()));
        assert_eq!(kv[2], ("dir".into(), "/a,b,".into()));
        assert_eq!(kv[3], ("endpoint".into(), "server".into()));
        assert!(parse_keyval("a=1,b", None).is_err());
    }

    #[test]
    fn errors_read_as_qemu_img() {
        assert_eq!(err("foo,id=x"), "Parameter 'qom-type' does not accept value 'foo'");
        assert_eq!(err("id=x"), "Parameter 'qom-type' is missing");
        assert_eq!(err("tls-creds-x509,dir=/tmp"), "Parameter 'id' is missing");
        assert_eq!(err("tls-creds-x509,id=x"), "Missing 'dir' property value");
        assert_eq!(
            err("tls-creds-x509,id=x,dir=/tmp,endpoint=bad"),
            "Parameter 'endpoint' does not accept value 'bad'"
        );
        assert_eq!(
            err("tls-creds-x509,id=x,dir=/tmp,verify-peer=maybe"),
            "Parameter 'verify-peer' expects 'on' or 'off'"
        );
        assert_eq!(err("authz-simple,id=a"), "Parameter 'identity' is missing");
        assert_eq!(
            err("authz-list,id=a,rules.0.match=x,rules.0.policy=maybe"),
            "Parameter 'policy' does not accept value 'maybe'"
        );
        let dup = Objects::parse(&["authz-simple,id=a,identity=x".into(), "authz-simple,id=a,identity=y".into()]);
        assert_eq!(dup.unwrap_err().msg, "attempt to add duplicate property 'a' to object (type 'container')");
    }

    #[test]
    fn json_form_matches_keyval_form() {
        let (id, a) = parse_one(
            r#"{"qom-type":"authz-list","id":"l","policy":"deny","rules":[{"match":"CN=*","policy":"allow","format":"glob"}]}"#,
        )
        .unwrap();
        let (_, b) =
            parse_one("authz-list,id=l,policy=deny,rules.0.match=CN=*,rules.0.policy=allow,rules.0.format=glob")
                .unwrap();
        assert_eq!(id, "l");
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
    }
}
