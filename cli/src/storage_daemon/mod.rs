//! `oxcow storage-daemon`: qemu-storage-daemon's command line and role.
//! Block nodes (`--blockdev`) are served by exports (`--export` of type
//! `nbd`, on the listener `--nbd-server` starts, `fuse` or
//! `vhost-user-blk`) and managed at run time over a QMP monitor
//! (`--monitor` on a `--chardev` socket).
//!
//! Options are applied by kind in dependency order (objects, nodes,
//! chardevs, the NBD server, exports, monitors) rather than in command-line
//! order: every command line QEMU accepts defines things before using
//! them, so the result is the same. An error names the option and value
//! it came from, as qemu-storage-daemon's do.
//!
//! Files, one concern each: `blockdev` (node graph), `chardev` (monitor
//! sockets), `export` (export definitions and clients), `nbd` (listener
//! and accept loop), `daemon` (shared state and operations), `qmp` (the
//! monitor protocol).

mod blockdev;
mod chardev;
mod daemon;
mod export;
mod inherited;
mod nbd;
mod qmp;

use crate::error::{os_message, CliError, CliResult};
use crate::object::{Objects, Props};
use daemon::Daemon;
use std::io::{BufRead, BufReader, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Environment variable telling a daemonized child to report readiness.
const READY_ENV: &str = "OXCOW_STORAGE_DAEMON_REPORT_READY";

#[derive(clap::Args)]
pub struct Args {
    /// Define a block node (driver=file,node-name=N,filename=F or
    /// driver=qcow2|raw|...,node-name=M,file=N).
    #[arg(long = "blockdev", value_name = "[driver=]DRIVER,node-name=NAME,...")]
    blockdev: Vec<String>,
    /// Export a node (type=nbd,id=ID,node-name=NAME[,name=N][,writable=on];
    /// type=fuse,...,mountpoint=FILE; type=vhost-user-blk,...,
    /// addr.type=unix,addr.path=SOCKET[,num-queues=N][,logical-block-size=N]).
    #[arg(long = "export", value_name = "[type=]nbd|fuse|vhost-user-blk,id=ID,node-name=NAME,...")]
    export: Vec<String>,
    /// Start the NBD server (addr.type=unix,addr.path=P or
    /// addr.type=inet,addr.host=H,addr.port=N; tls-creds, tls-authz,
    /// max-connections).
    #[arg(long = "nbd-server", value_name = "addr.type=...,...")]
    nbd_server: Vec<String>,
    /// Define an object (TYPE,id=ID,...), e.g. TLS credentials.
    #[arg(long = "object", value_name = "TYPE,id=ID,...")]
    objects: Vec<String>,
    /// Define a character device (socket,id=ID,path=P,server=on,wait=off).
    #[arg(long = "chardev", value_name = "socket,id=ID,...")]
    chardev: Vec<String>,
    /// Run a QMP monitor on a chardev ([chardev=]ID[,pretty=on]).
    #[arg(long = "monitor", value_name = "[chardev=]ID,...")]
    monitor: Vec<String>,
    /// Write the daemon's process id to this file once it serves.
    #[arg(long = "pidfile", value_name = "FILE")]
    pidfile: Option<String>,
    /// Return once everything is set up, leaving the daemon running.
    #[arg(long = "daemonize")]
    daemonize: bool,
}

/// Wraps an error with the option that caused it.
fn at<'a>(opt: &str, arg: &'a str) -> impl Fn(CliError) -> CliError + 'a {
    let opt = opt.to_string();
    move |e| CliError::new(format!("--{opt} {arg}: {}", e.msg)).with_code(e.code)
}

pub fn run(a: Args) -> CliResult<i32> {
    if a.daemonize {
        return daemonize();
    }
    let objects = Objects::parse(&a.objects)?;
    let mut nodes = blockdev::Nodes::default();
    for b in &a.blockdev {
        nodes.add(b).map_err(at("blockdev", b))?;
    }
    let mut chardevs = chardev::Chardevs::default();
    for c in &a.chardev {
        if let Err(e) = chardevs.add(c) {
            chardevs.cleanup();
            return Err(at("chardev", c)(e));
        }
    }
    let daemon = Arc::new(Daemon::new(objects, nodes));
    let setup = setup(&a, &daemon, &mut chardevs);
    if let Err(e) = setup {
        chardevs.cleanup();
        let _ = daemon.shut_down();
        return Err(e);
    }
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT, signal_hook::consts::SIGHUP] {
        signal_hook::flag::register(sig, daemon.quit.clone())
            .map_err(|e| CliError::new(format!("installing signal handler: {}", os_message(&e))))?;
    }
    if let Some(p) = &a.pidfile {
        if let Err(e) = std::fs::write(p, format!("{}\n", std::process::id())) {
            let _ = daemon.shut_down();
            return Err(CliError::new(format!("Cannot write pid file '{p}': {}", os_message(&e))));
        }
    }
    report_ready();
    while !daemon.quit.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let result = daemon.shut_down();
    chardevs.cleanup();
    if let Some(p) = &a.pidfile {
        let _ = std::fs::remove_file(p);
    }
    match result {
        Ok(_) => Ok(0),
        // Daemonized, stderr led to a parent that is gone: like
        // qemu-storage-daemon, say nothing, fail by the exit status.
        Err(_) if std::env::var_os(READY_ENV).is_some() => Ok(1),
        Err(e) => Err(e),
    }
}

/// Starts the NBD server, the exports and the monitors.
fn setup(a: &Args, daemon: &Arc<Daemon>, chardevs: &mut chardev::Chardevs) -> CliResult<()> {
    match a.nbd_server.as_slice() {
        [] => {}
        [n] => daemon.start_nbd(Props::from_arg(n, None).map_err(at("nbd-server", n))?).map_err(at("nbd-server", n))?,
        [_, n, ..] => return Err(at("nbd-server", n)(CliError::new("NBD server already running"))),
    }
    for e in &a.export {
        let p = Props::from_arg(e, Some("type")).map_err(at("export", e))?;
        daemon.add_export(p).map_err(at("export", e))?;
    }
    for m in &a.monitor {
        qmp::start(m, |id| chardevs.take(id), Arc::clone(daemon)).map_err(at("monitor", m))?;
    }
    Ok(())
}

/// In a daemonized child: tell the parent everything is set up.
fn report_ready() {
    if std::env::var_os(READY_ENV).is_some() {
        let mut out = std::io::stdout();
        let _ = writeln!(out, "ready");
        let _ = out.flush();
    }
}

/// Runs the same command line without `--daemonize` as a child in its
/// own process group, waits until it serves (or fails), and returns.
fn daemonize() -> CliResult<i32> {
    use std::os::unix::process::CommandExt;
    let exe =
        std::env::current_exe().map_err(|e| CliError::new(format!("finding own executable: {}", os_message(&e))))?;
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--daemonize").collect();
    let mut cmd = std::process::Command::new(exe);
    // Under the drop-in name the child answers as qemu-storage-daemon too
    // (its messages carry that prefix); argv[0] decides, as for us.
    if crate::dropin::active() {
        cmd.arg0(crate::dropin::argv0());
    }
    let mut child = cmd
        .args(&args)
        .env(READY_ENV, "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        // Relayed until the child is ready, so whoever started us sees
        // startup errors and no stream of ours outlives this process.
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| CliError::new(format!("starting the daemon: {}", os_message(&e))))?;
    let stdout = child.stdout.take().ok_or_else(|| CliError::new("starting the daemon: no pipe"))?;
    let relay =
        child.stderr.take().map(|mut err| std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::stderr())));
    let mut line = String::new();
    let _ = BufReader::new(stdout).read_line(&mut line);
    if line.trim() == "ready" {
        return Ok(0);
    }
    let status = child.wait().map_err(|e| CliError::new(format!("waiting for the daemon: {}", os_message(&e))))?;
    if let Some(r) = relay {
        let _ = r.join();
    }
    Ok(status.code().unwrap_or(1).max(1))
}
