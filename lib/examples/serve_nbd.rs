//! Exports an image over NBD, as `qemu-nbd` does, until the client that
//! connects has gone.
//!
//! ```text
//! cargo run -p oxcow --example serve_nbd -- IMAGE [HOST:PORT]
//! qemu-img info nbd://127.0.0.1:10809/disk      # from another shell
//! ```
//!
//! The image is opened read-write with its format probed; the export is
//! named "disk".

use oxcow::nbd::server::{ExportConfig, ServeOptions, Server};
use oxcow::OpenOptions;
use std::error::Error;
use std::net::TcpListener;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: serve_nbd IMAGE [HOST:PORT]")?;
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:10809".to_string());

    let image = oxcow::open(&path, &OpenOptions::read_write())?;
    let server = Server::new(image.device().clone(), ExportConfig::new("disk").description(path.clone()));
    let listener = TcpListener::bind(&addr)?;
    println!("serving {path} as nbd://{addr}/disk");

    // Nobody sets the flag here: serving ends when the last client leaves
    // (a long-running server would set it from a signal handler).
    let shutdown = Arc::new(AtomicBool::new(false));
    server.serve(listener, shutdown, &ServeOptions::default().max_connections(4))?;
    image.close()?;
    Ok(())
}
