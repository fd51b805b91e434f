//! `oxcow snapshot`: list, create, apply and delete internal snapshots
//! (like `qemu-img snapshot`).

use crate::error::{CliError, CliResult};
use crate::util::{open_image, parse_format};
use oxcow::format::SnapshotEntry;
use oxcow::OpenOptions;

#[derive(clap::Args)]
pub struct Args {
    /// Image format.
    #[arg(short = 'f')]
    format: Option<String>,
    /// List the snapshots (the default).
    #[arg(short = 'l')]
    list: bool,
    /// Create a snapshot with this name.
    #[arg(short = 'c', value_name = "SNAPSHOT")]
    create: Option<String>,
    /// Revert the disk to this snapshot (ID or name).
    #[arg(short = 'a', value_name = "SNAPSHOT")]
    apply: Option<String>,
    /// Delete this snapshot (ID or name).
    #[arg(short = 'd', value_name = "SNAPSHOT")]
    delete: Option<String>,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Open read-only without conflicting with a writer (listing only).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[command(flatten)]
    objects: crate::image_opts::ObjectArgs,
    /// Image file.
    file: String,
}

/// One line of `qemu-img snapshot -l`, column for column.
pub fn list_line(sn: &SnapshotEntry) -> String {
    let secs = sn.vm_clock_nsec / 1_000_000_000;
    let clock =
        format!("{:04}:{:02}:{:02}.{:03}", secs / 3600, secs / 60 % 60, secs % 60, sn.vm_clock_nsec / 1_000_000 % 1000);
    let icount = match sn.icount {
        Some(i) if i != u64::MAX => i.to_string(),
        _ => String::new(),
    };
    format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        sn.shown_id(),
        sn.shown_name(),
        crate::util::human(sn.vm_state_size),
        crate::util::local_date(i64::from(sn.date_sec)),
        clock,
        icount
    )
}

/// A failure as QEMU's block layer reports it: its errno's words only.
fn io_words(e: &oxcow::Error) -> String {
    crate::error::os_message(&std::io::Error::from_raw_os_error(e.errno()))
}

/// The header line of the list.
pub const LIST_HEADER: &str = "ID      TAG               VM_SIZE                DATE        VM_CLOCK     ICOUNT";

pub fn run(mut a: Args) -> CliResult<i32> {
    a.objects.apply(&mut a.file, &mut a.format)?;
    let actions = usize::from(a.list) + [&a.create, &a.apply, &a.delete].iter().filter(|x| x.is_some()).count();
    if actions > 1 {
        return Err(CliError::new("Cannot mix '-l', '-a', '-c', '-d'\nTry 'oxcow snapshot --help' for more info"));
    }
    let format = parse_format(a.format.as_deref())?;
    let write = a.create.is_some() || a.apply.is_some() || a.delete.is_some();
    if write && a.force_share {
        return Err(CliError::new("force-share/-U is only allowed with -l"));
    }
    let img = open_image(&a.file, &OpenOptions::default().format(format).write(write).no_backing(!write))?;
    let Some(q) = img.qcow2() else {
        if write {
            return Err(CliError::new(format!(
                "Could not {} snapshot '{}': Operation not supported",
                if a.create.is_some() {
                    "create"
                } else if a.apply.is_some() {
                    "apply"
                } else {
                    "delete"
                },
                a.create.or(a.apply).or(a.delete).unwrap_or_default()
            )));
        }
        return Ok(0);
    };
    let clean = |e: oxcow::Error| match e {
        oxcow::Error::Unsupported(_) => "Operation not supported".to_string(),
        other => crate::error::message(&other),
    };
    if let Some(name) = &a.create {
        q.snapshot_create(name).map_err(|e| {
            // qemu-img learns only the errno of a failed snapshot creation.
            let why = if crate::dropin::active() {
                crate::error::os_message(&std::io::Error::from_raw_os_error(e.errno()))
            } else {
                clean(e)
            };
            CliError::new(format!("Could not create snapshot '{name}': {why}"))
        })?;
    } else if let Some(name) = &a.apply {
        if !q.snapshot_list().iter().any(|s| &s.id == name || &s.name == name) {
            return Err(CliError::new(format!(
                "Could not apply snapshot '{name}': Failed to load snapshot: No such file or directory"
            )));
        }
        q.snapshot_apply(name).map_err(|e| match &e {
            // qemu-img reports a snapshot L1 table it refuses to load, then
            // the load's errno.
            oxcow::Error::InvalidField { field, reason, .. }
                if crate::dropin::active() && field.starts_with("snapshot l1_") =>
            {
                let errno = if *field == "snapshot l1_size" { libc::EFBIG } else { libc::EINVAL };
                eprintln!("{}: {reason}", crate::dropin::prog());
                let why = crate::error::os_message(&std::io::Error::from_raw_os_error(errno));
                CliError::new(format!("Could not apply snapshot '{name}': Failed to load snapshot: {why}"))
            }
            _ => CliError::new(format!("Could not apply snapshot '{name}': {}", clean(e))),
        })?;
    } else if let Some(name) = &a.delete {
        // qemu-img deletes by name only (apply takes an ID too).
        let Some(id) = q.snapshot_list().into_iter().find(|s| &s.name == name).map(|s| s.id) else {
            return Err(CliError::new(format!("Could not delete snapshot '{name}': snapshot not found")));
        };
        let mut warn = |w: oxcow::qcow2::SnapshotWarning| match w {
            oxcow::qcow2::SnapshotWarning::OldTableNotFreed(e) if crate::dropin::active() => {
                // QEMU's qcow2 driver prints this bare, without the tool's name.
                eprintln!("qcow2_free_clusters failed: {}", io_words(&e));
            }
            oxcow::qcow2::SnapshotWarning::OldTableNotFreed(e) => eprintln!(
                "{}: warning: the old snapshot table was not freed ({}); its clusters leak \
                 ('check -r leaks' reclaims them)",
                crate::dropin::prog(),
                crate::error::message(&e)
            ),
            _ => {}
        };
        q.snapshot_delete_with_warnings(&id, &mut warn).map_err(|e| {
            let why = match &e {
                oxcow::Error::Io { context, .. }
                    if crate::dropin::active() && context == oxcow::qcow2::SNAPSHOT_FREE_CONTEXT =>
                {
                    format!("Failed to free the cluster and L1 table: {}", io_words(&e))
                }
                _ => clean(e),
            };
            CliError::new(format!("Could not delete snapshot '{name}': {why}"))
        })?;
    } else {
        let list = q.snapshot_list();
        if !list.is_empty() {
            println!("Snapshot list:");
            println!("{LIST_HEADER}");
            for sn in &list {
                println!("{}", list_line(sn));
            }
        }
    }
    let _ = a.quiet;
    img.close()?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        let utc = jiff::tz::TimeZone::UTC;
        assert_eq!(crate::util::date_in(0, &utc), "1970-01-01 00:00:00");
        assert_eq!(crate::util::date_in(1_795_704_456, &utc), "2026-11-26 14:47:36");
        assert_eq!(crate::util::date_in(951_782_400, &utc), "2000-02-29 00:00:00");
        // A POSIX rule: no time zone database needed.
        let eastern = jiff::tz::TimeZone::posix("EST5EDT,M3.2.0,M11.1.0").unwrap();
        assert_eq!(crate::util::date_in(1_795_704_456, &eastern), "2026-11-26 09:47:36");
    }

    #[test]
    fn line_matches_qemu_layout() {
        let sn = SnapshotEntry {
            l1_table_offset: 0,
            l1_size: 0,
            id: "1".into(),
            name: "s1".into(),
            date_sec: 1_795_704_456,
            date_nsec: 0,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: None,
            icount: Some(0),
            extra_unknown: vec![],
            extra_data_size: 24,
        };
        let date = crate::util::local_date(1_795_704_456);
        assert_eq!(list_line(&sn), format!("1       s1                    0 B {date}  0000:00:00.000          0"));
    }
}
