//! qemu-img's `-o` option lists on `create`, `convert` and `amend`: the
//! refusal of malformed lists (`Invalid option list: ...`) and `-o help`
//! (or `-o ?`), which prints the options a format takes in QEMU 10's
//! words and layout instead of doing anything. Scripts and management
//! stacks read these lists to learn what a format offers, so the names,
//! types and texts are QEMU's, whether or not oxcow acts on every one.

use crate::error::{CliError, CliResult};

/// Name, value type, description.
type Opt = (&'static str, &'static str, &'static str);

/// Refuses an `-o` argument as qemu-img does: empty, starting with a
/// comma, or ending with a comma that is not doubled (escaped).
pub fn check_lists(lists: &[String]) -> CliResult<()> {
    for l in lists {
        let trailing = l.len() - l.trim_end_matches(',').len();
        if l.is_empty() || l.starts_with(',') || trailing % 2 == 1 {
            return Err(CliError::new(format!("Invalid option list: {l}")));
        }
    }
    Ok(())
}

/// Whether one of the lists asks for help: a bare `help` or `?` item.
pub fn wants_help(lists: &[String]) -> bool {
    lists.iter().any(|l| oxcow::options::split_escaped(l).iter().any(|i| i == "help" || i == "?"))
}

/// `create -o help` / `convert -o help` for FORMAT. With a target file
/// name the file protocol's options join the format's, as QEMU merges
/// them; without one QEMU says the protocol may add more.
pub fn create_help(format: &str, target: Option<&str>) -> CliResult<String> {
    let own = match format {
        "file" => FILE,
        "raw" => RAW,
        "qcow2" => QCOW2,
        "qed" => QED,
        "vdi" => VDI,
        "vpc" => VPC,
        "vmdk" => VMDK,
        "vhdx" => VHDX,
        "luks" => LUKS,
        f if KNOWN_READ_ONLY.contains(&f) => {
            return Err(CliError::new(format!("Format driver '{f}' does not support image creation")))
        }
        f => return Err(CliError::new(format!("Unknown file format '{f}'"))),
    };
    let Some(target) = target else {
        let mut s = format!("Supported {format} options:\n");
        s += &lines(own.iter());
        s += "\nThe protocol level may support further options.\nSpecify the target filename to include those options.\n";
        return Ok(s);
    };
    // Network targets (nbd://, ...) have no creation options of their own.
    let protocol: &[Opt] = if target.contains("://") || target.starts_with("nbd:") { &[] } else { FILE };
    let mut all: Vec<&Opt> = own.iter().collect();
    all.extend(protocol.iter().filter(|p| !own.iter().any(|o| o.0 == p.0)));
    all.sort_by_key(|o| o.0);
    Ok(format!("Supported options:\n{}", lines(all.into_iter())))
}

/// `amend -o help` for FORMAT.
pub fn amend_help(format: &str) -> CliResult<String> {
    let list = match format {
        "qcow2" => AMEND_QCOW2,
        "luks" => AMEND_LUKS,
        f if f == "file" || KNOWN_READ_ONLY.contains(&f) || CREATE_ONLY.contains(&f) => {
            return Err(CliError::new(format!("Format driver '{f}' does not support option amendment")))
        }
        f => return Err(CliError::new(format!("Unknown file format '{f}'"))),
    };
    Ok(format!("Amend options for '{format}':\n{}", lines(list.iter())))
}

fn lines<'a>(opts: impl Iterator<Item = &'a Opt>) -> String {
    opts.map(|(n, t, d)| format!("  {:<22} - {d}\n", format!("{n}=<{t}>"))).collect()
}

/// Drivers QEMU has that create no images (their `-o help` is refused).
const KNOWN_READ_ONLY: &[&str] = &["bochs", "cloop", "dmg", "blkdebug", "null-co", "null-aio", "nbd", "throttle"];
/// Formats that create images but amend nothing.
const CREATE_ONLY: &[&str] = &["raw", "qed", "vdi", "vpc", "vmdk", "vhdx", "qcow", "parallels"];

const FILE: &[Opt] = &[
    ("extent_size_hint", "size", "Extent size hint for the image file, 0 to disable"),
    ("nocow", "bool (on/off)", "Turn off copy-on-write (valid only on btrfs)"),
    ("preallocation", "str", "Preallocation mode (allowed values: off, falloc, full)"),
    ("size", "size", "Virtual disk size"),
];
const RAW: &[Opt] = &[("size", "size", "Virtual disk size")];
const QCOW2: &[Opt] = &[
    ("backing_file", "str", "File name of a base image"),
    ("backing_fmt", "str", "Image format of the base image"),
    ("cluster_size", "size", "qcow2 cluster size"),
    ("compat", "str", "Compatibility level (v2 [0.10] or v3 [1.1])"),
    ("compression_type", "str", "Compression method used for image cluster compression"),
    ("data_file", "str", "File name of an external data file"),
    ("data_file_raw", "bool (on/off)", "The external data file must stay valid as a raw image"),
    ("encrypt.cipher-alg", "str", "Name of encryption cipher algorithm"),
    ("encrypt.cipher-mode", "str", "Name of encryption cipher mode"),
    ("encrypt.format", "str", "Encrypt the image, format choices: 'aes', 'luks'"),
    ("encrypt.hash-alg", "str", "Name of encryption hash algorithm"),
    ("encrypt.iter-time", "num", "Time to spend in PBKDF in milliseconds"),
    ("encrypt.ivgen-alg", "str", "Name of IV generator algorithm"),
    ("encrypt.ivgen-hash-alg", "str", "Name of IV generator hash algorithm"),
    ("encrypt.key-secret", "str", "ID of secret providing qcow AES key or LUKS passphrase"),
    ("encryption", "bool (on/off)", "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)"),
    ("extended_l2", "bool (on/off)", "Extended L2 tables"),
    ("lazy_refcounts", "bool (on/off)", "Postpone refcount updates"),
    ("preallocation", "str", "Preallocation mode (allowed values: off, metadata, falloc, full)"),
    ("refcount_bits", "num", "Width of a reference count entry in bits"),
    ("size", "size", "Virtual disk size"),
];
const QED: &[Opt] = &[
    ("backing_file", "str", "File name of a base image"),
    ("backing_fmt", "str", "Image format of the base image"),
    ("cluster_size", "size", "Cluster size (in bytes)"),
    ("size", "size", "Virtual disk size"),
    ("table_size", "size", "L1/L2 table size (in clusters)"),
];
const VDI: &[Opt] =
    &[("size", "size", "Virtual disk size"), ("static", "bool (on/off)", "VDI static (pre-allocated) image")];
const VPC: &[Opt] = &[
    ("force_size", "bool (on/off)", "Force disk size calculation to use the actual size specified, rather than using the nearest CHS-based calculation"),
    ("size", "size", "Virtual disk size"),
    ("subformat", "str", "Type of virtual hard disk format. Supported formats are {dynamic (default) | fixed} "),
];
const VMDK: &[Opt] = &[
    ("adapter_type", "str", "Virtual adapter type, can be one of ide (default), lsilogic, buslogic or legacyESX"),
    ("backing_file", "str", "File name of a base image"),
    ("backing_fmt", "str", "Must be 'vmdk' if present"),
    ("compat6", "bool (on/off)", "VMDK version 6 image"),
    ("hwversion", "str", "VMDK hardware version"),
    ("size", "size", "Virtual disk size"),
    ("subformat", "str", "VMDK flat extent format, can be one of {monolithicSparse (default) | monolithicFlat | twoGbMaxExtentSparse | twoGbMaxExtentFlat | streamOptimized} "),
    ("toolsversion", "str", "VMware guest tools version"),
    ("zeroed_grain", "bool (on/off)", "Enable efficient zero writes using the zeroed-grain GTE feature"),
];
const VHDX: &[Opt] = &[
    ("block_size", "size", "Block Size; min 1MB, max 256MB. 0 means auto-calculate based on image size."),
    ("block_state_zero", "bool (on/off)", "Force use of payload blocks of type 'ZERO'. Non-standard, but default.  Do not set to 'off' when using 'qemu-img convert' with subformat=dynamic."),
    ("log_size", "size", "Log size; min 1MB."),
    ("size", "size", "Virtual disk size; max of 64TB."),
    ("subformat", "str", "VHDX format type, can be either 'dynamic' or 'fixed'. Default is 'dynamic'."),
];
const LUKS: &[Opt] = &[
    ("cipher-alg", "str", "Name of encryption cipher algorithm"),
    ("cipher-mode", "str", "Name of encryption cipher mode"),
    ("detached-header", "bool (on/off)", "Create a detached LUKS header"),
    ("hash-alg", "str", "Name of encryption hash algorithm"),
    ("iter-time", "num", "Time to spend in PBKDF in milliseconds"),
    ("ivgen-alg", "str", "Name of IV generator algorithm"),
    ("ivgen-hash-alg", "str", "Name of IV generator hash algorithm"),
    ("key-secret", "str", "ID of the secret that provides the keyslot passphrase"),
    ("size", "size", "Virtual disk size"),
];
const AMEND_QCOW2: &[Opt] = &[
    ("backing_file", "str", "File name of a base image"),
    ("backing_fmt", "str", "Image format of the base image"),
    ("compat", "str", "Compatibility level (v2 [0.10] or v3 [1.1])"),
    ("data_file", "str", "File name of an external data file"),
    ("data_file_raw", "bool (on/off)", "The external data file must stay valid as a raw image"),
    ("encrypt.iter-time", "num", "Time to spend in PBKDF in milliseconds"),
    ("encrypt.keyslot", "num", "Select a single keyslot to modify explicitly"),
    ("encrypt.new-secret", "str", "New secret to set in the matching keyslots. Empty string to erase"),
    ("encrypt.old-secret", "str", "Select all keyslots that match this password"),
    ("encrypt.state", "str", "Select new state of affected keyslots (active/inactive)"),
    ("lazy_refcounts", "bool (on/off)", "Postpone refcount updates"),
    ("refcount_bits", "num", "Width of a reference count entry in bits"),
    ("size", "size", "Virtual disk size"),
];
const AMEND_LUKS: &[Opt] = &[
    ("iter-time", "num", "Time to spend in PBKDF in milliseconds"),
    ("keyslot", "num", "Select a single keyslot to modify explicitly"),
    ("new-secret", "str", "New secret to set in the matching keyslots. Empty string to erase"),
    ("old-secret", "str", "Select all keyslots that match this password"),
    ("state", "str", "Select new state of affected keyslots (active/inactive)"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_lists_are_refused_as_qemu_img_does() {
        let bad = |s: &str| check_lists(&[s.to_string()]).is_err();
        assert!(bad("a=b,") && bad(",a=b") && bad(",,") && bad("") && bad("a=b,,,"));
        assert!(!bad("a=b,,") && !bad("a=b,c=d"));
    }

    #[test]
    fn help_is_a_bare_item() {
        let h = |s: &str| wants_help(&[s.to_string()]);
        assert!(h("help") && h("?") && h("cluster_size=4k,help") && h("?,x=1"));
        assert!(!h("help=on") && !h("backing_file=x,,help"));
    }

    #[test]
    fn target_name_merges_the_file_options_in_order() {
        let s = create_help("raw", Some("x.img")).unwrap();
        assert_eq!(
            s.lines().nth(1),
            Some("  extent_size_hint=<size> - Extent size hint for the image file, 0 to disable")
        );
        assert_eq!(s.lines().count(), 5);
        let q = create_help("qcow2", Some("x")).unwrap();
        assert!(
            q.contains("preallocation=<str>    - Preallocation mode (allowed values: off, metadata, falloc, full)\n")
        );
    }
}
