//! A real distributed S3 store for the S3 tests: a three-node Garage
//! cluster on 127.0.0.1 with replication factor 3 (every object on every
//! node; reads and writes need two of three), started by the test in its
//! own directory on free ports, and stopped when dropped.
//!
//! Garage is found as `$OXCOW_GARAGE`, then `garage` on `PATH`, then in
//! cargo's bin directory (`.ci/run` installs it there with `cargo install`
//! when missing). Without it the tests skip with a note, except under CI
//! where its absence is a failure.
//!
//! Shared by the library's and the CLI's test binaries.

use super::process::capture;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The access key every cluster imports (Garage's format: `GK` and 24 hex
/// digits, a 64-digit secret).
pub const KEY_ID: &str = "GK0123456789abcdef01234567";
pub const SECRET: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
/// The bucket every cluster starts with.
pub const BUCKET: &str = "images";
pub const REGION: &str = "garage";

struct Node {
    child: Option<Child>,
    config: PathBuf,
    s3_port: u16,
}

pub struct Garage {
    bin: PathBuf,
    nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

/// The Garage binary, if installed.
pub fn binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("OXCOW_GARAGE") {
        return Some(PathBuf::from(p));
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("garage")).collect::<Vec<_>>())
        .unwrap_or_default();
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")));
    on_path.into_iter().chain(cargo_home.map(|c| c.join("bin/garage"))).find(|p| p.is_file())
}

/// Cluster starts in one test process take turns: ports are picked free
/// and then handed to Garage, so two starts at once could pick the same
/// port (a node of one cluster then answers another cluster's `node
/// connect` and the handshake fails).
static STARTING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `n` distinct free ports, all held open until every one is chosen.
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    held.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

impl Garage {
    /// Starts the cluster and waits until it takes S3 requests; `None`
    /// when Garage is not installed outside CI. A start that fails (a port
    /// taken by another process between its choice and Garage's bind) is
    /// retried on new ports.
    pub fn start() -> Option<Garage> {
        let Some(bin) = binary() else {
            assert!(
                std::env::var_os("CI").is_none(),
                "garage is not installed (.ci/run installs it with cargo install)"
            );
            eprintln!("note: garage not installed (cargo install --locked garage); skipping");
            return None;
        };
        let _turn = STARTING.lock().unwrap_or_else(|e| e.into_inner());
        let mut failures = Vec::new();
        for _ in 0..3 {
            match Garage::try_start(&bin) {
                Ok(g) => return Some(g),
                Err(e) => {
                    eprintln!("note: garage cluster did not start, retrying on new ports: {e}");
                    failures.push(e);
                }
            }
        }
        panic!("garage cluster did not start in 3 tries: {failures:?}");
    }

    fn try_start(bin: &Path) -> Result<Garage, String> {
        let dir = tempfile::tempdir().unwrap();
        let rpc_secret = "5d2e0c11f8e3a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6";
        let ports = free_ports(9);
        let mut nodes = Vec::new();
        for i in 0..3 {
            let home = dir.path().join(format!("node{i}"));
            std::fs::create_dir_all(&home).unwrap();
            let (rpc, s3, admin) = (ports[3 * i], ports[3 * i + 1], ports[3 * i + 2]);
            let config = home.join("garage.toml");
            std::fs::write(
                &config,
                format!(
                    "metadata_dir = \"{h}/meta\"\ndata_dir = \"{h}/data\"\ndb_engine = \"lmdb\"\n\
                     replication_factor = 3\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                     rpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{rpc_secret}\"\n\
                     [s3_api]\ns3_region = \"{REGION}\"\napi_bind_addr = \"127.0.0.1:{s3}\"\n\
                     root_domain = \".s3.garage.localhost\"\n\
                     [admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\n",
                    h = home.display()
                ),
            )
            .unwrap();
            let log = std::fs::File::create(home.join("log")).unwrap();
            let child = Command::new(bin)
                .arg("-c")
                .arg(&config)
                .arg("server")
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("start garage");
            nodes.push(Node { child: Some(child), config, s3_port: s3 });
        }
        let mut g = Garage { bin: bin.to_path_buf(), nodes, _dir: dir };
        let started = Instant::now();
        for i in 0..3 {
            let port = g.nodes[i].s3_port;
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                if let Some(Ok(Some(status))) = g.nodes[i].child.as_mut().map(|c| c.try_wait()) {
                    let log = std::fs::read_to_string(g.nodes[i].config.with_file_name("log")).unwrap_or_default();
                    return Err(format!("garage node {i} exited ({status}): {log}"));
                }
                assert!(started.elapsed() < Duration::from_secs(60), "garage node {i} not ready after 60 s");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let limit = Duration::from_secs(30);
        let mut ids = Vec::new();
        for i in 0..3 {
            ids.push(g.try_cli(i, &["node", "id", "-q"], limit)?.trim().to_string());
        }
        for id in &ids[1..] {
            g.try_cli(0, &["node", "connect", id], limit)?;
        }
        for (i, id) in ids.iter().enumerate() {
            let short = &id[..16];
            g.cli(0, &["layout", "assign", "-z", &format!("dc{i}"), "-c", "1G", short]);
        }
        g.cli(0, &["layout", "apply", "--version", "1"]);
        g.cli(0, &["key", "import", "--yes", "-n", "tests", KEY_ID, SECRET]);
        g.cli(0, &["bucket", "create", BUCKET]);
        g.cli(0, &["bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", "tests"]);
        g.wait_writable();
        Ok(g)
    }

    /// Runs the Garage CLI against node `i`, retrying while the new layout
    /// spreads (a hang guard bounds it); returns stdout.
    fn cli(&self, i: usize, args: &[&str]) -> String {
        self.try_cli(i, args, Duration::from_secs(120)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// As `cli`, giving up with the last error after `limit`.
    fn try_cli(&self, i: usize, args: &[&str], limit: Duration) -> Result<String, String> {
        let start = Instant::now();
        loop {
            let (code, out, err) = capture(Command::new(&self.bin).arg("-c").arg(&self.nodes[i].config).args(args));
            if code == 0 {
                return Ok(out);
            }
            if start.elapsed() >= limit {
                return Err(format!("garage {args:?}: {out}{err}"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until every node accepts a write and reads it back: the
    /// layout has reached all three.
    fn wait_writable(&self) {
        let start = Instant::now();
        for i in 0..3 {
            let o = self.options_at(i);
            let name = format!("s3://{BUCKET}/.ready{i}");
            while oxcow::remote::s3::upload(&name, &o.s3, &o.http, &mut &b"ready"[..], 5 << 20).is_err()
                || oxcow::remote::open_with(&name, &o).is_err()
            {
                assert!(start.elapsed() < Duration::from_secs(120), "garage node {i} never took writes");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    /// The S3 endpoint of node `i`.
    pub fn endpoint_at(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[i].s3_port)
    }

    /// The S3 endpoint the tests talk to (node 0).
    #[allow(dead_code)] // The CLI's tests use it; the library's take options.
    pub fn endpoint(&self) -> String {
        self.endpoint_at(0)
    }

    /// Driver options for node `i` with the test key.
    pub fn options_at(&self, i: usize) -> oxcow::remote::RemoteOptions {
        oxcow::remote::RemoteOptions {
            http: oxcow::remote::HttpOptions { retries: 2, ..oxcow::remote::HttpOptions::default() },
            s3: oxcow::remote::S3Options {
                endpoint: Some(self.endpoint_at(i)),
                region: Some(REGION.into()),
                access_key_id: Some(KEY_ID.into()),
                secret_access_key: Some(SECRET.into()),
                ..oxcow::remote::S3Options::default()
            },
        }
    }

    /// The environment the CLI reads the store's address and the test
    /// key from.
    #[allow(dead_code)] // The CLI's tests use it; the library's take options.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_REGION", REGION.into()),
            ("AWS_ACCESS_KEY_ID", KEY_ID.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET.into()),
        ]
    }

    /// Kills node `i` (SIGKILL, its own pid only) and waits for it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}
