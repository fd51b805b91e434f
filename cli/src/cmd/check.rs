//! `oxcow check`: qemu-img check's report, JSON and exit codes
//! (0 clean, 1 check errors, 2 corruptions, 3 leaks only, 63 no checks for
//! this format).

use crate::util::{open_image, parse_format, qemu_json, CliError, CliResult};
use oxcow::image::{Format, OpenOptions};
use oxcow::qcow2::{CheckReport, Repair};
use serde_json::{json, Map, Value};

#[derive(clap::Args)]
pub struct Args {
    /// Image format (probed when omitted).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Repair mode: leaks or all.
    #[arg(short = 'r')]
    repair: Option<String>,
    /// Output format: human or json.
    #[arg(long = "output", default_value = "human")]
    output: String,
    /// Quiet: only the exit status (and findings on stderr).
    #[arg(short = 'q')]
    quiet: bool,
    /// Force sharing (accepted for compatibility).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Image file.
    file: String,
}

pub fn run(a: Args) -> CliResult<i32> {
    let _ = a.force_share;
    let json_out = match a.output.as_str() {
        "json" => true,
        "human" => false,
        o => return Err(CliError::new(format!("--output expects 'human' or 'json' not '{o}'"))),
    };
    let repair = match a.repair.as_deref() {
        None => Repair::None,
        Some("leaks") => Repair::Leaks,
        Some("all") => Repair::All,
        Some(o) => return Err(CliError::new(format!("Invalid -r option: '{o}'"))),
    };
    let format = parse_format(a.format.as_deref())?;
    let write = repair != Repair::None;
    let opts = OpenOptions { format, write, repair: write, ..Default::default() };
    let img = open_image(&a.file, &opts)?;
    if img.format() != Format::Qcow2 {
        return Err(CliError::new("This image format does not support checks").with_code(63));
    }
    let q = img.qcow2().ok_or_else(|| CliError::new("This image format does not support checks").with_code(63))?;
    let r = q
        .check(repair)
        .map_err(|e| CliError::new(format!("Check failed: {}", crate::util::clean_message(&e.to_string()))))?;
    for m in &r.messages {
        eprintln!("{m}");
    }
    img.close()?;
    if !a.quiet {
        if json_out {
            println!("{}", qemu_json(&report_json(&r, &a.file)));
        } else {
            print!("{}", report_human(&r));
        }
    }
    Ok(if r.check_errors > 0 {
        1
    } else if r.corruptions > 0 {
        2
    } else if r.leaks > 0 {
        3
    } else {
        0
    })
}

fn report_json(r: &CheckReport, file: &str) -> Value {
    let mut m = Map::new();
    let opt = |m: &mut Map<String, Value>, k: &str, v: u64| {
        if v != 0 {
            m.insert(k.into(), json!(v));
        }
    };
    opt(&mut m, "image-end-offset", r.image_end_offset);
    opt(&mut m, "compressed-clusters", r.compressed_clusters);
    opt(&mut m, "total-clusters", r.total_clusters);
    opt(&mut m, "corruptions", r.corruptions);
    m.insert("check-errors".into(), json!(r.check_errors));
    opt(&mut m, "leaks", r.leaks);
    opt(&mut m, "corruptions-fixed", r.corruptions_fixed);
    opt(&mut m, "leaks-fixed", r.leaks_fixed);
    opt(&mut m, "allocated-clusters", r.allocated_clusters);
    m.insert("filename".into(), json!(file));
    m.insert("format".into(), json!("qcow2"));
    opt(&mut m, "fragmented-clusters", r.fragmented_clusters);
    Value::Object(m)
}

fn report_human(r: &CheckReport) -> String {
    let mut s = String::new();
    if r.leaks_fixed > 0 || r.corruptions_fixed > 0 {
        s += &format!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
            r.leaks_fixed, r.corruptions_fixed
        );
    }
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        s += "No errors were found on the image.\n";
    } else {
        if r.corruptions > 0 {
            s += &format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            );
        }
        if r.leaks > 0 {
            s += &format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            );
        }
        if r.check_errors > 0 {
            s += &format!("\n{} internal errors have occurred during the check.\n", r.check_errors);
        }
    }
    if r.total_clusters > 0 && r.allocated_clusters > 0 {
        let pct = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 * 100.0 / b as f64 };
        s += &format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            pct(r.allocated_clusters, r.total_clusters),
            pct(r.fragmented_clusters, r.allocated_clusters),
            pct(r.compressed_clusters, r.allocated_clusters)
        );
    }
    if r.image_end_offset > 0 {
        s += &format!("Image end offset: {}\n", r.image_end_offset);
    }
    s
}
