//! `oxcow check`: consistency check and repair, with qemu-img's output,
//! JSON keys and exit codes (0 clean, 1 check failed, 2 corruptions,
//! 3 leaks only, 63 format without checks).

use crate::error::{CliError, CliResult};
use crate::util::{open_image, parse_format, qemu_json};
use oxcow::qcow2::{CheckReport, Repair};
use oxcow::{Format, OpenOptions};
use serde_json::{Map, Value};

#[derive(clap::Args)]
pub struct Args {
    /// Image format.
    #[arg(short = 'f')]
    format: Option<String>,
    /// Repair mode (leaks or all).
    #[arg(short = 'r')]
    repair: Option<String>,
    /// Output format (human or json).
    #[arg(long = "output", default_value = "human")]
    output: String,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Open without taking locks that conflict with a writer (read-only checks).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[command(flatten)]
    objects: crate::image_opts::ObjectArgs,
    /// Image file.
    file: String,
}

pub fn run(mut a: Args) -> CliResult<i32> {
    a.objects.apply(&mut a.file, &mut a.format)?;
    let repair = match a.repair.as_deref() {
        None => Repair::None,
        Some(r) => r.parse::<Repair>().map_err(|e| CliError::new(e.to_string()))?,
    };
    let json = match a.output.as_str() {
        "human" => false,
        "json" => true,
        other => return Err(CliError::new(format!("--output must be used with human or json as argument. ({other})"))),
    };
    if a.force_share && repair != Repair::None {
        return Err(CliError::new("--force-share/-U is not allowed with -r"));
    }
    let format = parse_format(a.format.as_deref())?;
    let write = repair != Repair::None;
    let opts = OpenOptions::default()
        .format(format)
        .write(write)
        .repair(write)
        .checking(true)
        .no_backing(true)
        .force_share(a.force_share);
    let img = open_image(&a.file, &opts)?;
    if img.format() != Format::Qcow2 {
        // The other formats: repaired where their QEMU driver repairs
        // (a QED image left dirty was already repaired when opened for
        // writing, as QEMU does), then checked.
        let mut fixed = (0, 0);
        if write {
            fixed = match img.repair_format() {
                Some(Ok(f)) => f,
                Some(Err(oxcow::Error::Unsupported(_))) | None => {
                    return Err(CliError::new("This image format does not support checks").with_code(63))
                }
                Some(Err(e)) => {
                    eprintln!("oxcow: Check failed: {}", crate::error::message(&e));
                    return Ok(1);
                }
            };
        }
        let mut report = match img.check_format() {
            Some(Ok(r)) => r,
            Some(Err(oxcow::Error::Unsupported(_))) | None => {
                return Err(CliError::new("This image format does not support checks").with_code(63))
            }
            Some(Err(e)) => {
                eprintln!("oxcow: Check failed: {}", crate::error::message(&e));
                return Ok(1);
            }
        };
        (report.leaks_fixed, report.corruptions_fixed) = fixed;
        if fixed != (0, 0) {
            report.found_before_repair = Some(fixed);
        }
        img.close()?;
        return Ok(print_report(&report, &a, img.format().name(), json));
    }
    let q = img.qcow2().ok_or_else(|| CliError::new("This image format does not support checks").with_code(63))?;
    if repair != Repair::All {
        if let Some(lines) = q.snapshot_table_refusal() {
            // qemu-img reads the table only to repair it.
            let prog = crate::dropin::prog();
            eprintln!("{prog}: {lines}");
            eprintln!(
                "{prog}: Check failed: {}",
                crate::error::os_message(&std::io::Error::from_raw_os_error(libc::EFBIG))
            );
            return Ok(1);
        }
    }
    let report = match q.check(repair) {
        // A dirty image was repaired when opened (its lines are printed
        // already): that repair is the one qemu-img's check reports.
        Ok(r) => match q.repaired_on_open().filter(|rep| rep.found_before_repair.is_some()) {
            Some(rep) => CheckReport {
                leaks_fixed: rep.leaks_fixed,
                corruptions_fixed: rep.corruptions_fixed,
                found_before_repair: rep.found_before_repair,
                ..r
            },
            None => r,
        },
        Err(e) => {
            eprintln!("{}: Check failed: {}", crate::dropin::prog(), crate::error::message(&e));
            return Ok(1);
        }
    };
    if write && report.corruptions == 0 && q.is_corrupt() {
        q.clear_corrupt()?;
    }
    img.close()?;
    Ok(print_report(&report, &a, "qcow2", json))
}

/// Prints a report as qemu-img does and gives its exit status.
fn print_report(report: &CheckReport, a: &Args, format: &str, json: bool) -> i32 {
    for m in &report.messages {
        // QEMU's VHDX driver reports through error_report, which names the
        // tool; the other drivers print bare lines.
        if format == "vhdx" {
            eprintln!("{}: {m}", crate::dropin::prog());
        } else {
            eprintln!("{m}");
        }
    }
    if json {
        println!("{}", qemu_json(&to_json(report, &a.file, format)));
    } else if !a.quiet {
        print!("{}", human(report));
    }
    if report.check_errors > 0 {
        1
    } else if report.corruptions > 0 {
        2
    } else if report.leaks > 0 {
        3
    } else {
        0
    }
}

fn to_json(r: &CheckReport, file: &str, format: &str) -> Value {
    let mut m = Map::new();
    let mut put = |k: &str, v: u64, always: bool| {
        if always || v != 0 {
            m.insert(k.to_string(), Value::from(v));
        }
    };
    // qemu-img prints its keys in this (hash table) order: QDict's
    // buckets, by its key hash modulo 512.
    put("image-end-offset", r.image_end_offset, false);
    put("compressed-clusters", r.compressed_clusters, false);
    put("total-clusters", r.total_clusters, false);
    put("corruptions", r.corruptions, false);
    put("corruptions-fixed", r.corruptions_fixed, false);
    put("check-errors", r.check_errors, true);
    put("leaks", r.leaks, false);
    put("leaks-fixed", r.leaks_fixed, false);
    put("allocated-clusters", r.allocated_clusters, false);
    m.insert("filename".into(), Value::from(file));
    m.insert("format".into(), Value::from(format));
    if r.fragmented_clusters != 0 {
        m.insert("fragmented-clusters".into(), Value::from(r.fragmented_clusters));
    }
    Value::Object(m)
}

fn human(r: &CheckReport) -> String {
    let mut out = String::new();
    // qemu-img's block names what was repaired (what was found and
    // left is in the findings below it), and only when something was.
    if r.found_before_repair.is_some() && (r.leaks_fixed != 0 || r.corruptions_fixed != 0) {
        let (leaks, corruptions) = (r.leaks_fixed, r.corruptions_fixed);
        out += &format!(
            "The following inconsistencies were found and repaired:\n\n    {leaks} leaked clusters\n    {corruptions} corruptions\n\nDouble checking the fixed image now...\n"
        );
    }
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        out += "No errors were found on the image.\n";
    } else {
        if r.corruptions > 0 {
            out += &format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            );
        }
        if r.leaks > 0 {
            out += &format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            );
        }
        if r.check_errors > 0 {
            out += &format!("\n{} internal errors have occurred during the check.\n", r.check_errors);
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let a = r.allocated_clusters as f64;
        out += &format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            a * 100.0 / r.total_clusters as f64,
            r.fragmented_clusters as f64 * 100.0 / a,
            r.compressed_clusters as f64 * 100.0 / a
        );
    }
    if r.image_end_offset != 0 {
        out += &format!("Image end offset: {}\n", r.image_end_offset);
    }
    out
}
