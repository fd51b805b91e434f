//! nginx serving a directory over HTTP and HTTPS for the remote-driver
//! tests: started by the test as the user running it (no master process,
//! no privilege drop), on free ports of 127.0.0.1, with a certificate made
//! by the test's own CA, and an access log of every request's range.
//! Under CI a missing nginx fails the test; elsewhere it skips with a note.

use super::certs::Ca;
use super::process::wait_ready;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub struct Nginx {
    child: Child,
    pub http_port: u16,
    pub https_port: u16,
    /// The CA certificate that signed the server's (for `cafile=`).
    pub ca_file: PathBuf,
    log: PathBuf,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn nginx_binary() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"].iter().map(PathBuf::from).find(|p| p.exists())
}

impl Nginx {
    /// Serves `root` (readable by this user); `None` when nginx is not
    /// installed outside CI.
    pub fn start(work: &Path, root: &Path) -> Option<Nginx> {
        let Some(bin) = nginx_binary() else {
            assert!(std::env::var_os("CI").is_none(), "nginx is not installed (CI installs nginx-light)");
            eprintln!("note: nginx not installed; skipping");
            return None;
        };
        let creds = Ca::new("oxcow-test").dir(work, "nginx-tls", None);
        let (http_port, https_port) = (free_port(), free_port());
        let log = work.join("access.log");
        let w = work.display();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {w}/nginx.pid;\nerror_log {w}/error.log;\n\
             events {{ worker_connections 128; }}\n\
             http {{\n  log_format ranges '$request_method $uri $http_range $status $body_bytes_sent';\n  \
             access_log {log} ranges;\n  default_type application/octet-stream;\n  \
             client_body_temp_path {w}/t1; proxy_temp_path {w}/t2; fastcgi_temp_path {w}/t3;\n  \
             uwsgi_temp_path {w}/t4; scgi_temp_path {w}/t5;\n  keepalive_requests 100000;\n  \
             server {{ listen 127.0.0.1:{http_port}; root {root}; }}\n  \
             server {{ listen 127.0.0.1:{https_port} ssl; root {root};\n    \
             ssl_certificate {c}/server-cert.pem; ssl_certificate_key {c}/server-key.pem; }}\n}}\n",
            log = log.display(),
            root = root.display(),
            c = creds.display(),
        );
        let conf_path = work.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new(bin)
            .args(["-e", &format!("{w}/error.log"), "-p"])
            .arg(work)
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .spawn()
            .expect("start nginx");
        let mut n = Nginx { child, http_port, https_port, ca_file: creds.join("ca-cert.pem"), log };
        for port in [http_port, https_port] {
            wait_ready("nginx", Some(&mut n.child), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        }
        Some(n)
    }

    pub fn http(&self, file: &str) -> String {
        format!("http://127.0.0.1:{}/{file}", self.http_port)
    }

    pub fn https(&self, file: &str) -> String {
        format!("https://127.0.0.1:{}/{file}", self.https_port)
    }

    /// The access log's lines so far: `METHOD URI RANGE STATUS BYTES`.
    pub fn log(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log).unwrap_or_default().lines().map(str::to_string).collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
