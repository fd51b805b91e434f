//! `--chardev`: the character devices a monitor can talk over. Only
//! listening sockets (`socket,id=ID,path=P,server=on`,
//! `host=H,port=N,server=on`, or `fd=N,server=on` for a socket the parent
//! passed in) are supported: what a QMP monitor of a storage daemon is
//! given in practice.

use crate::error::{os_message, CliError, CliResult};
use crate::object::Props;
use oxcow::export::inherited::InheritedListener;
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};

/// A listening chardev socket.
pub enum ChardevListener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// One client of a chardev.
pub trait Stream: Read + Write + Send {
    /// A second handle (the reader and the writer of a monitor).
    fn clone_box(&self) -> io::Result<Box<dyn Stream>>;
}

impl Stream for UnixStream {
    fn clone_box(&self) -> io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
}

impl Stream for TcpStream {
    fn clone_box(&self) -> io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
}

impl ChardevListener {
    /// Accepts one client, waiting for it.
    pub fn accept(&self) -> io::Result<Box<dyn Stream>> {
        Ok(match self {
            ChardevListener::Unix(l) => Box::new(l.accept()?.0),
            ChardevListener::Tcp(l) => {
                let s = l.accept()?.0;
                s.set_nodelay(true)?;
                Box::new(s)
            }
        })
    }
}

/// The chardevs defined, by id, until a monitor takes one.
#[derive(Default)]
pub struct Chardevs {
    by_id: BTreeMap<String, ChardevListener>,
    /// Every Unix socket bound, removed at exit even once taken.
    paths: Vec<String>,
}

impl Chardevs {
    /// Defines the chardev of one `--chardev` argument (its socket listens
    /// from now on).
    pub fn add(&mut self, arg: &str) -> CliResult<()> {
        let mut p = Props::from_arg(arg, Some("backend"))?;
        let backend = p.require("backend")?;
        let id = p.require("id")?;
        if backend != "socket" {
            return Err(CliError::new(format!("chardev '{id}': only 'socket' chardevs are supported")));
        }
        if self.by_id.contains_key(&id) {
            return Err(CliError::new(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            )));
        }
        if !p.take_bool("server")?.unwrap_or(false) {
            return Err(CliError::new(format!("chardev '{id}': only listening sockets (server=on) are supported")));
        }
        // The monitor serves clients as they come; startup never waits
        // for the first (the behaviour of wait=off, which daemons use).
        p.take_bool("wait")?;
        let listener = match (p.take("path"), p.take("host"), p.take("port")) {
            (None, None, None) if p.has_prefix("fd") => {
                let fd = p.require("fd")?;
                // The monitor's accept waits, whatever the parent set.
                let blocking = |e: io::Error| CliError::new(format!("chardev '{id}': {}", os_message(&e)));
                match super::inherited::listener(&fd)? {
                    InheritedListener::Unix(l) => {
                        l.set_nonblocking(false).map_err(blocking)?;
                        ChardevListener::Unix(l)
                    }
                    InheritedListener::Tcp(l) => {
                        l.set_nonblocking(false).map_err(blocking)?;
                        ChardevListener::Tcp(l)
                    }
                }
            }
            (Some(path), None, None) => {
                let _ = std::fs::remove_file(&path);
                let listener = UnixListener::bind(&path)
                    .map_err(|e| CliError::new(format!("Failed to bind socket to {path}: {}", os_message(&e))))?;
                self.paths.push(path);
                ChardevListener::Unix(listener)
            }
            (None, host, Some(port)) => {
                let addr = format!("{}:{port}", host.as_deref().unwrap_or("0.0.0.0"));
                let l = TcpListener::bind(&addr)
                    .map_err(|e| CliError::new(format!("Failed to bind socket to {addr}: {}", os_message(&e))))?;
                ChardevListener::Tcp(l)
            }
            _ => return Err(CliError::new(format!("chardev '{id}': give one of path=, host= and port=, or fd="))),
        };
        p.finish()?;
        self.by_id.insert(id, listener);
        Ok(())
    }

    /// Hands the chardev `id` over to its one user.
    pub fn take(&mut self, id: &str) -> CliResult<ChardevListener> {
        self.by_id.remove(id).ok_or_else(|| CliError::new(format!("chardev \"{id}\" not found")))
    }

    /// Removes the socket files bound.
    pub fn cleanup(&self) {
        for p in &self.paths {
            let _ = std::fs::remove_file(p);
        }
    }
}
