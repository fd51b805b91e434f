//! The rules of a blkdebug layer (QEMU's error-injection driver): which
//! events exist, and the two ways rules are written down, a config file
//! of `[inject-error]` / `[set-state]` sections and a driver's option
//! tree (`inject-error.0.event=l2_load,...`).
//!
//! The event names are QEMU's (`BlkdebugEvent`), so configurations
//! written for QEMU's iotests load unchanged; an engine emits only those
//! of them whose code paths it has (see [`super::Storage::debug_event`]).

use std::collections::BTreeMap;
use std::fmt;

macro_rules! events {
    ($($v:ident = $n:literal,)*) => {
        /// A point in an image engine's work that a blkdebug rule can
        /// trigger on, named as in QEMU.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum BlkdebugEvent { $(#[doc = $n] $v,)* }

        impl BlkdebugEvent {
            /// Every event, in QEMU's order.
            pub const ALL: &'static [BlkdebugEvent] = &[$(BlkdebugEvent::$v,)*];
            /// QEMU's name of the event.
            pub fn name(self) -> &'static str {
                match self { $(BlkdebugEvent::$v => $n,)* }
            }
        }
    };
}

events! {
    L1Update = "l1_update",
    L1GrowAllocTable = "l1_grow_alloc_table",
    L1GrowWriteTable = "l1_grow_write_table",
    L1GrowActivateTable = "l1_grow_activate_table",
    L2Load = "l2_load",
    L2Update = "l2_update",
    L2UpdateCompressed = "l2_update_compressed",
    L2AllocCowRead = "l2_alloc_cow_read",
    L2AllocWrite = "l2_alloc_write",
    ReadAio = "read_aio",
    ReadBackingAio = "read_backing_aio",
    ReadCompressed = "read_compressed",
    WriteAio = "write_aio",
    WriteCompressed = "write_compressed",
    VmstateLoad = "vmstate_load",
    VmstateSave = "vmstate_save",
    CowRead = "cow_read",
    CowWrite = "cow_write",
    ReftableLoad = "reftable_load",
    ReftableGrow = "reftable_grow",
    ReftableUpdate = "reftable_update",
    RefblockLoad = "refblock_load",
    RefblockUpdate = "refblock_update",
    RefblockUpdatePart = "refblock_update_part",
    RefblockAlloc = "refblock_alloc",
    RefblockAllocHookup = "refblock_alloc_hookup",
    RefblockAllocWrite = "refblock_alloc_write",
    RefblockAllocWriteBlocks = "refblock_alloc_write_blocks",
    RefblockAllocWriteTable = "refblock_alloc_write_table",
    RefblockAllocSwitchTable = "refblock_alloc_switch_table",
    ClusterAlloc = "cluster_alloc",
    ClusterAllocBytes = "cluster_alloc_bytes",
    ClusterFree = "cluster_free",
    FlushToOs = "flush_to_os",
    FlushToDisk = "flush_to_disk",
    PwritevRmwHead = "pwritev_rmw_head",
    PwritevRmwAfterHead = "pwritev_rmw_after_head",
    PwritevRmwTail = "pwritev_rmw_tail",
    PwritevRmwAfterTail = "pwritev_rmw_after_tail",
    Pwritev = "pwritev",
    PwritevZero = "pwritev_zero",
    PwritevDone = "pwritev_done",
    EmptyImagePrepare = "empty_image_prepare",
    L1ShrinkWriteTable = "l1_shrink_write_table",
    L1ShrinkFreeL2Clusters = "l1_shrink_free_l2_clusters",
    CorWrite = "cor_write",
    ClusterAllocSpace = "cluster_alloc_space",
    None = "none",
}

impl std::str::FromStr for BlkdebugEvent {
    type Err = RuleError;
    fn from_str(s: &str) -> Result<Self, RuleError> {
        BlkdebugEvent::ALL
            .iter()
            .copied()
            .find(|e| e.name() == s)
            .ok_or_else(|| RuleError(format!("Invalid event name \"{s}\"")))
    }
}

/// The kinds of request an injected error can hit (QEMU's `iotype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoType {
    /// Reads.
    Read,
    /// Writes.
    Write,
    /// Writes of zeros.
    WriteZeroes,
    /// Discards (hole punches).
    Discard,
    /// Flushes.
    Flush,
    /// Allocation queries (QEMU's block-status).
    BlockStatus,
}

impl IoType {
    fn bit(self) -> u8 {
        1 << self as u8
    }
    fn parse(s: &str) -> Result<IoType, RuleError> {
        Ok(match s {
            "read" => IoType::Read,
            "write" => IoType::Write,
            "write-zeroes" => IoType::WriteZeroes,
            "discard" => IoType::Discard,
            "flush" => IoType::Flush,
            "block-status" => IoType::BlockStatus,
            _ => return Err(RuleError(format!("Invalid parameter '{s}'"))),
        })
    }
}

/// A rule that does not parse, worded as QEMU words it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError(pub String);

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RuleError {}

/// What a rule does when its event fires in its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Arms an error for the next request (of the kinds in `iotypes`,
    /// touching `offset` when given).
    InjectError {
        /// The errno returned.
        errno: i32,
        /// The byte the request must cover (QEMU's `sector` × 512).
        offset: Option<u64>,
        /// Disarmed after failing one request.
        once: bool,
        /// A bit per [`IoType`].
        iotypes: u8,
    },
    /// Moves the layer into another state.
    SetState {
        /// The state entered.
        new_state: i64,
    },
}

/// One rule: an event, the state it applies in (0: any) and the action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The event that triggers the rule.
    pub event: BlkdebugEvent,
    /// The state the layer must be in (0: any).
    pub state: i64,
    /// What happens.
    pub action: Action,
}

impl Rule {
    /// Whether an armed error of this rule hits a request of `kind` over
    /// `offset..offset+len`.
    pub(crate) fn hits(&self, kind: IoType, offset: u64, len: u64) -> bool {
        match &self.action {
            Action::InjectError { offset: at, iotypes, .. } => {
                iotypes & kind.bit() != 0 && at.is_none_or(|at| len > 0 && at >= offset && at - offset < len)
            }
            Action::SetState { .. } => false,
        }
    }
}

/// The requests an error hits when the rule names no `iotype`: all but
/// allocation queries, as in QEMU.
const DEFAULT_IOTYPES: u8 = (1 << IoType::Read as u8)
    | (1 << IoType::Write as u8)
    | (1 << IoType::WriteZeroes as u8)
    | (1 << IoType::Discard as u8)
    | (1 << IoType::Flush as u8);

fn parse_bool(key: &str, v: &str) -> Result<bool, RuleError> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(RuleError(format!("Parameter '{key}' expects 'on' or 'off'"))),
    }
}

fn parse_int(key: &str, v: &str) -> Result<i64, RuleError> {
    v.parse::<i64>().map_err(|_| RuleError(format!("Parameter '{key}' expects a number")))
}

/// Builds a rule of section `kind` (`inject-error` or `set-state`) from
/// its keys.
fn rule(kind: &str, keys: &BTreeMap<String, String>) -> Result<Rule, RuleError> {
    let get = |k: &str| keys.get(k).map(String::as_str);
    let event = get("event").ok_or_else(|| RuleError("Missing event name for rule".into()))?.parse()?;
    let state = get("state").map(|v| parse_int("state", v)).transpose()?.unwrap_or(0);
    let allowed: &[&str] = match kind {
        "inject-error" => &["event", "state", "iotype", "errno", "sector", "once", "immediately"],
        _ => &["event", "state", "new_state"],
    };
    if let Some(k) = keys.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(RuleError(format!("Invalid parameter '{k}'")));
    }
    let action = match kind {
        "inject-error" => {
            let errno = get("errno").map(|v| parse_int("errno", v)).transpose()?.unwrap_or(libc::EIO as i64);
            let sector = get("sector").map(|v| parse_int("sector", v)).transpose()?.unwrap_or(-1);
            // `immediately` changes when QEMU completes the failed request
            // (at once or after yielding), not what fails: checked only.
            if let Some(v) = get("immediately") {
                parse_bool("immediately", v)?;
            }
            Action::InjectError {
                errno: i32::try_from(errno).map_err(|_| RuleError("Parameter 'errno' is out of range".into()))?,
                offset: u64::try_from(sector).ok().and_then(|s| s.checked_mul(512)),
                once: get("once").map(|v| parse_bool("once", v)).transpose()?.unwrap_or(false),
                iotypes: match get("iotype") {
                    Some(t) => IoType::parse(t)?.bit(),
                    None => DEFAULT_IOTYPES,
                },
            }
        }
        "set-state" => Action::SetState {
            new_state: parse_int(
                "new_state",
                get("new_state").ok_or_else(|| RuleError("Parameter 'new_state' is missing".into()))?,
            )?,
        },
        other => return Err(RuleError(format!("Invalid rule type '{other}'"))),
    };
    Ok(Rule { event, state, action })
}

/// Parses a blkdebug config file: `[inject-error]` and `[set-state]`
/// sections of `key = "value"` lines (`#` comments, blank lines).
/// Sections of other names are ignored, as QEMU's parser skips groups it
/// was not asked for.
pub fn parse_config(text: &str) -> Result<Vec<Rule>, RuleError> {
    let mut rules = Vec::new();
    let mut section: Option<(String, BTreeMap<String, String>)> = None;
    let finish = |s: Option<(String, BTreeMap<String, String>)>, rules: &mut Vec<Rule>| {
        match s {
            Some((kind, keys)) if kind == "inject-error" || kind == "set-state" => rules.push(rule(&kind, &keys)?),
            _ => {}
        }
        Ok::<(), RuleError>(())
    };
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            finish(section.take(), &mut rules)?;
            section = Some((name.trim().to_string(), BTreeMap::new()));
            continue;
        }
        let bad = || RuleError(format!("blkdebug config line {}: parse error", n + 1));
        let (k, v) = line.split_once('=').ok_or_else(bad)?;
        let v = v.trim();
        let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
        match &mut section {
            Some((_, keys)) => {
                keys.insert(k.trim().to_string(), v.to_string());
            }
            None => return Err(bad()),
        }
    }
    finish(section, &mut rules)?;
    Ok(rules)
}

/// Rules from a driver's option tree: `inject-error.N.KEY` and
/// `set-state.N.KEY` pairs (QEMU's flattened lists), in list order,
/// injections first. Other keys are left to the caller.
pub fn parse_options<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Vec<Rule>, RuleError> {
    let mut lists: BTreeMap<(u8, u64), BTreeMap<String, String>> = BTreeMap::new();
    for (k, v) in pairs {
        let (kind, rest) = match k.split_once('.') {
            Some(("inject-error", rest)) => (0, rest),
            Some(("set-state", rest)) => (1, rest),
            _ => continue,
        };
        let (idx, key) = rest.split_once('.').ok_or_else(|| RuleError(format!("Invalid parameter '{k}'")))?;
        let idx = idx.parse::<u64>().map_err(|_| RuleError(format!("Invalid parameter '{k}'")))?;
        lists.entry((kind, idx)).or_default().insert(key.to_string(), v.to_string());
    }
    lists
        .into_iter()
        .map(|((kind, _), keys)| rule(if kind == 0 { "inject-error" } else { "set-state" }, &keys))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_sections_and_option_lists_give_the_same_rules() {
        let conf = "# comment\n[inject-error]\nevent = \"l2_load\"\nerrno = \"28\"\nonce =\"on\"\n\n[set-state]\nevent = \"write_aio\"\nnew_state = \"2\"\n";
        let a = parse_config(conf).unwrap();
        let b = parse_options([
            ("set-state.0.event", "write_aio"),
            ("set-state.0.new_state", "2"),
            ("inject-error.0.event", "l2_load"),
            ("inject-error.0.errno", "28"),
            ("inject-error.0.once", "on"),
        ])
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(
            a[0],
            Rule {
                event: BlkdebugEvent::L2Load,
                state: 0,
                action: Action::InjectError { errno: 28, offset: None, once: true, iotypes: DEFAULT_IOTYPES }
            }
        );
    }

    #[test]
    fn bad_rules_are_refused_with_qemus_words() {
        assert_eq!(parse_config("[inject-error]\nevent = \"nope\"\n").unwrap_err().0, "Invalid event name \"nope\"");
        assert!(parse_config("event = \"l2_load\"\n").is_err());
        assert!(parse_config("[inject-error]\nerrno = \"5\"\n").is_err());
        assert!(parse_options([("inject-error.0.event", "l2_load"), ("inject-error.0.bogus", "1")]).is_err());
    }

    #[test]
    fn a_sector_narrows_what_an_error_hits() {
        let r = &parse_options([("inject-error.0.event", "none"), ("inject-error.0.sector", "2")]).unwrap()[0];
        assert!(r.hits(IoType::Read, 1024, 512) && r.hits(IoType::Read, 0, 2048));
        assert!(!r.hits(IoType::Read, 0, 1024) && !r.hits(IoType::Read, 1536, 512));
        assert!(!r.hits(IoType::BlockStatus, 1024, 512));
    }
}
