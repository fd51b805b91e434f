//! qemu-io's `reopen -o`: the qcow2 runtime options a reopen may change,
//! how QEMU merges the new ones into those in effect, and their checks,
//! in QEMU's order and words. Everything is checked before the image is
//! let go, so a refused reopen leaves it open as it was.

use crate::error::{CliError, CliResult};
use oxcow::qcow2::CacheOptions;

/// On/off options (their effect is QEMU's own bookkeeping: oxcow always
/// checks for overlaps and decides discards itself).
const BOOL_KEYS: &[&str] = &[
    "lazy-refcounts",
    "pass-discard-request",
    "pass-discard-snapshot",
    "pass-discard-other",
    "overlap-check.main-header",
    "overlap-check.active-l1",
    "overlap-check.active-l2",
    "overlap-check.refcount-table",
    "overlap-check.refcount-block",
    "overlap-check.snapshot-table",
    "overlap-check.inactive-l1",
    "overlap-check.inactive-l2",
    "overlap-check.bitmap-directory",
];
const CACHE_KEYS: &[&str] =
    &["cache-size", "l2-cache-size", "refcount-cache-size", "l2-cache-entry-size", "cache-clean-interval"];
const OVERLAP_KEYS: &[&str] = &["overlap-check", "overlap-check.template"];
const OVERLAP_MODES: &[&str] = &["none", "constant", "cached", "all"];

/// Whether `key` is a qcow2 runtime option a reopen may change.
pub fn is_runtime(key: &str) -> bool {
    BOOL_KEYS.contains(&key) || CACHE_KEYS.contains(&key) || OVERLAP_KEYS.contains(&key)
}

/// Whether `key` is one of qcow2's on/off or overlap-check options (the
/// runtime options that are not cache sizes).
pub fn is_flag(key: &str) -> bool {
    BOOL_KEYS.contains(&key) || OVERLAP_KEYS.contains(&key)
}

/// Checks one on/off or overlap-check option's value, in QEMU's words.
pub fn check_flag(key: &str, value: &str) -> CliResult<()> {
    if BOOL_KEYS.contains(&key) {
        crate::util::parse_bool(key, value)?;
    } else if !OVERLAP_MODES.contains(&value) {
        return Err(CliError::new(format!(
            "Unsupported value '{value}' for qcow2 option 'overlap-check'. Allowed are any of the following: {}",
            OVERLAP_MODES.join(", ")
        )));
    }
    Ok(())
}

/// The `lazy-refcounts` setting the options in effect ask for, refused
/// as QEMU refuses it on a version 2 image.
pub fn lazy_refcounts(opts: &[(String, String)], version: u32) -> CliResult<Option<bool>> {
    let Some(v) = get(opts, "lazy-refcounts") else { return Ok(None) };
    let on = crate::util::parse_bool("lazy-refcounts", v)?;
    if on && version < 3 {
        return Err(CliError::new("Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level"));
    }
    Ok(Some(on))
}

fn has(opts: &[(String, String)], key: &str) -> bool {
    opts.iter().any(|(k, _)| k == key)
}

fn get<'a>(opts: &'a [(String, String)], key: &str) -> Option<&'a str> {
    opts.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// The options in effect after a reopen with `new`, the ones in effect
/// being `old`: new values win; a new overlap template drops every old
/// overlap option; a new total cache size drops the old partial sizes,
/// and an old total drops out when all three sizes would be set.
pub fn join(old: &[(String, String)], new: &[(String, String)]) -> Vec<(String, String)> {
    let new_template = has(new, "overlap-check") || has(new, "overlap-check.template");
    let new_total = has(new, "cache-size");
    let mut out: Vec<(String, String)> = old
        .iter()
        .filter(|(k, _)| !has(new, k))
        .filter(|(k, _)| !(new_template && k.starts_with("overlap-check")))
        .filter(|(k, _)| !(new_total && (k == "l2-cache-size" || k == "refcount-cache-size")))
        .cloned()
        .collect();
    out.extend(new.iter().cloned());
    let all = ["cache-size", "l2-cache-size", "refcount-cache-size"].iter().all(|k| has(&out, k));
    if all && !new_total {
        out.retain(|(k, _)| k != "cache-size");
    }
    out
}

/// Checks the options in effect against the image, in QEMU's order (the
/// values' types, the cache sizes, the overlap template) and words, and
/// returns the cache options they set.
pub fn check(
    opts: &[(String, String)],
    disk_size: u64,
    cluster_size: u64,
    extended_l2: bool,
) -> CliResult<CacheOptions> {
    let mut cache = CacheOptions::default();
    for (k, v) in opts {
        if BOOL_KEYS.contains(&k.as_str()) {
            crate::util::parse_bool(k, v)?;
        } else if CACHE_KEYS.contains(&k.as_str()) {
            cache.set(k, v).map_err(|e| CliError::new(crate::error::message(&e)))?;
        }
    }
    cache.check(disk_size, cluster_size, extended_l2).map_err(|e| CliError::new(crate::error::message(&e)))?;
    let (mode, template) = (get(opts, "overlap-check"), get(opts, "overlap-check.template"));
    if let (Some(m), Some(t)) = (mode, template) {
        if m != t {
            return Err(CliError::new(format!(
                "Conflicting values for qcow2 options 'overlap-check' ('{m}') and 'overlap-check.template' ('{t}')"
            )));
        }
    }
    if let Some(m) = mode.or(template) {
        if !OVERLAP_MODES.contains(&m) {
            return Err(CliError::new(format!(
                "Unsupported value '{m}' for qcow2 option 'overlap-check'. Allowed are any of the following: {}",
                OVERLAP_MODES.join(", ")
            )));
        }
    }
    Ok(cache)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn join_follows_qemus_qcow2_merge_rules() {
        let old = kv(&[("cache-size", "1M"), ("l2-cache-size", "512k")]);
        // All three sizes after the merge: the old total goes.
        let j = join(&old, &kv(&[("refcount-cache-size", "128k")]));
        assert!(!has(&j, "cache-size") && has(&j, "l2-cache-size") && has(&j, "refcount-cache-size"));
        // A new total drops the old partial sizes.
        let j = join(&kv(&[("l2-cache-size", "512k"), ("refcount-cache-size", "128k")]), &kv(&[("cache-size", "2M")]));
        assert_eq!(j, kv(&[("cache-size", "2M")]));
        // A new template drops every old overlap option.
        let j = join(
            &kv(&[("overlap-check.active-l1", "off"), ("lazy-refcounts", "on")]),
            &kv(&[("overlap-check", "none")]),
        );
        assert_eq!(j, kv(&[("lazy-refcounts", "on"), ("overlap-check", "none")]));
    }

    #[test]
    fn check_words_as_qemus_iotest_137() {
        let msg = |pairs: &[(&str, &str)]| check(&kv(pairs), 64 << 20, 65536, false).err().map(|e| e.to_string());
        assert_eq!(
            msg(&[("lazy-refcounts", "42")]).as_deref(),
            Some("Parameter 'lazy-refcounts' expects 'on' or 'off'")
        );
        assert_eq!(
            msg(&[("overlap-check", "constant"), ("overlap-check.template", "all")]).as_deref(),
            Some("Conflicting values for qcow2 options 'overlap-check' ('constant') and 'overlap-check.template' ('all')")
        );
        assert_eq!(
            msg(&[("overlap-check.template", "blubb")]).as_deref(),
            Some("Unsupported value 'blubb' for qcow2 option 'overlap-check'. Allowed are any of the following: none, constant, cached, all")
        );
        assert_eq!(msg(&[("cache-clean-interval", "-1")]).as_deref(), Some("Cache clean interval too big"));
        assert_eq!(msg(&[("overlap-check", "all"), ("l2-cache-entry-size", "4k")]), None);
    }
}
