//! The qcow2 cache options of `--image-opts` (`l2-cache-size`,
//! `l2-cache-entry-size`, `refcount-cache-size`, `cache-size`,
//! `cache-clean-interval`): taken out of the option string when it is
//! resolved, and put into the open options of the image it names.
//!
//! Also oxcow's own `x-ignore-journal=on`: open the image without its
//! recovery journal, so a dirty image is repaired by the full scan (and a
//! writable open drops the journal's autoclear bit). QEMU knows no such
//! option; the `x-` says it is oxcow's, as QEMU marks its experimental ones.
//!
//! The option string is resolved into a name long before the image is
//! opened (by code that only passes names on), so the options wait here
//! keyed by that name, as the image's key secrets do.

use crate::error::{CliError, CliResult};
use oxcow::qcow2::CacheOptions;
use std::collections::BTreeMap;
use std::sync::Mutex;

static GIVEN: Mutex<Vec<(String, CacheOptions)>> = Mutex::new(Vec::new());

/// External data files given by `data-file.filename` (qcow2), by image.
static DATA_FILES: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

/// Images opened with `x-ignore-journal=on`.
static IGNORE_JOURNAL: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The option that opens an image without its recovery journal.
pub const IGNORE_JOURNAL_KEY: &str = "x-ignore-journal";

/// Takes the cache options of a `driver=qcow2` option string out of
/// `props` and remembers them for the image `name`. Values that do not
/// parse are refused here, in the words of the open that QEMU refuses
/// them at (naming the option string `spec`); sizes that do not fit
/// together are refused at the open.
pub fn take(format: &str, name: &str, props: &mut BTreeMap<String, String>, spec: &str) -> CliResult<()> {
    // The external data file, for a qcow2 image named or probed (only
    // qcow2 has one): a plain file by name.
    if matches!(format, "qcow2" | "") && props.get("data-file.driver").is_none_or(|d| d == "file") {
        if let Some(f) = props.remove("data-file.filename") {
            props.remove("data-file.driver");
            DATA_FILES.lock().unwrap_or_else(|p| p.into_inner()).push((name.to_string(), f));
        }
    }
    if format != "qcow2" {
        return Ok(());
    }
    if let Some(v) = props.remove(IGNORE_JOURNAL_KEY) {
        if crate::util::parse_bool(IGNORE_JOURNAL_KEY, &v)? {
            remember_ignore_journal(name);
        }
    }
    let mut opts = CacheOptions::default();
    let keys: Vec<String> = props.keys().cloned().collect();
    for k in keys {
        let Some(v) = props.get(&k) else { continue };
        let taken = opts
            .set(&k, v)
            .map_err(|e| CliError::new(format!("Could not open '{spec}': {}", crate::error::message(&e))))?;
        if taken {
            props.remove(&k);
        }
    }
    remember(name, opts);
    Ok(())
}

/// Remembers cache options given for the image `name`.
pub fn remember(name: &str, opts: CacheOptions) {
    if opts.is_set() {
        GIVEN.lock().unwrap_or_else(|p| p.into_inner()).push((name.to_string(), opts));
    }
}

/// Remembers that the image `name` opens without its recovery journal.
pub fn remember_ignore_journal(name: &str) {
    IGNORE_JOURNAL.lock().unwrap_or_else(|p| p.into_inner()).push(name.to_string());
}

/// `opts` with the cache options given for the image `name`, if any
/// (the last given wins).
pub fn with_cache(name: &str, mut opts: oxcow::OpenOptions) -> oxcow::OpenOptions {
    let given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, c)) = given.iter().rev().find(|(n, _)| n == name) {
        opts.qcow2_cache = *c;
    }
    if IGNORE_JOURNAL.lock().unwrap_or_else(|p| p.into_inner()).iter().any(|n| n == name) {
        opts.ignore_journal = true;
    }
    if let Some(f) = data_file(name) {
        opts.data_file = Some(f.into());
    }
    opts
}

/// The external data file `data-file.filename` gave for the image `name`.
pub fn data_file(name: &str) -> Option<String> {
    let given = DATA_FILES.lock().unwrap_or_else(|p| p.into_inner());
    given.iter().rev().find(|(n, _)| n == name).map(|(_, f)| f.clone())
}
