//! `authz-simple`, `authz-list` and `authz-listfile`: who may connect, by
//! the identity TLS established (a certificate's distinguished name).

use super::{Object, Props};
use crate::error::{os_message, CliError, CliResult};
use oxcow::nbd::tls::{Authz, MatchFormat, Policy, Rule};

/// An access list object.
#[derive(Debug, Clone)]
pub struct AuthzObject(pub Authz);

const POLICIES: &[(&str, Policy)] = &[("allow", Policy::Allow), ("deny", Policy::Deny)];
const FORMATS: &[(&str, MatchFormat)] = &[("exact", MatchFormat::Exact), ("glob", MatchFormat::Glob)];

pub fn simple(p: &mut Props) -> CliResult<Object> {
    Ok(Object::Authz(AuthzObject(Authz::simple(p.require("identity")?))))
}

/// Rules as qemu takes them on the command line: `rules.N.match`,
/// `rules.N.policy`, `rules.N.format`, N counting from 0 without gaps.
pub fn list(p: &mut Props) -> CliResult<Object> {
    let default = p.take_enum("policy", POLICIES)?.unwrap_or(Policy::Deny);
    let mut rules = Vec::new();
    for i in 0.. {
        let prefix = format!("rules.{i}.");
        if !p.has_prefix(&prefix) {
            break;
        }
        let pattern = p.require(&format!("{prefix}match"))?;
        let policy = p
            .take_enum(&format!("{prefix}policy"), POLICIES)?
            .ok_or_else(|| CliError::new(format!("Parameter '{prefix}policy' is missing")))?;
        let format = p.take_enum(&format!("{prefix}format"), FORMATS)?.unwrap_or(MatchFormat::Exact);
        rules.push(Rule { pattern, policy, format });
    }
    Ok(Object::Authz(AuthzObject(Authz { rules, default })))
}

/// The list from a JSON file (`{"policy": ..., "rules": [...]}`), read
/// once: `refresh` (reloading on change) is accepted and not honoured.
pub fn listfile(p: &mut Props) -> CliResult<Object> {
    let path = p.require("filename")?;
    let _ = p.take_bool("refresh")?;
    let text = std::fs::read_to_string(&path)
        .map_err(|e| CliError::new(format!("Unable to read '{path}': {}", os_message(&e))))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| CliError::new(format!("Unable to parse '{path}': {e}")))?;
    let mut pairs = Vec::new();
    super::flatten_json("", &v, &mut pairs);
    let mut props = Props::default();
    props.values.extend(pairs);
    let obj = list(&mut props)?;
    props.finish()?;
    Ok(obj)
}
