//! The vhost-user-blk export (qemu-storage-daemon's `--export
//! type=vhost-user-blk`): a VM's virtio-blk queues are served by this
//! process straight from the guest's shared memory, over a Unix socket
//! the VMM (QEMU's `vhost-user-blk-pci`, cloud-hypervisor, ...) connects
//! to. Built on the rust-vmm crates (vhost's protocol, vhost-user-backend's
//! loop, virtio-queue's rings).
//!
//! One front end at a time. Each connection gets a new back end (so a
//! front end that comes back, QEMU's `reconnect`, negotiates from
//! scratch) with one worker thread per queue, each carrying its requests
//! out synchronously on the device. When the front end goes away the
//! device is flushed and the socket accepts the next one.
//!
//! A daemon restarted under a running VM loses no request, without the
//! inflight-tracking protocol (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`,
//! not offered: vhost-user-backend refuses its messages). QEMU's front
//! end, finding the old back end gone (`GET_VRING_BASE` fails), restarts
//! each queue at the used ring's index in guest memory, so the new back
//! end pops again every request not yet marked used. That is exactly the
//! set in flight because each queue's requests complete in the order they
//! were popped (one worker, synchronous): a back end that completes out
//! of order must track inflight descriptors instead. A request carried
//! out twice (done, killed before its used entry) is a write of the same
//! data again. The one thing the front end does not redo is the
//! interrupt: see `BlkBackend::handle_event`.
//!
//! Files: `config` (features and configuration space), `request` (one
//! request's parsing and execution), `backend` (the vhost-user back end
//! and the queue loop).

mod backend;
mod config;
mod request;

use crate::nbd::server::DetectZeroes;
use crate::{BlockDevice, Error, Result};
use backend::BlkBackend;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// How the device is presented to the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct VhostUserBlkOptions {
    /// Writes, discards and write-zeroes allowed (else the device is
    /// read-only, `VIRTIO_BLK_F_RO`).
    pub writable: bool,
    /// Request queues (one worker thread each), 1 to 64.
    pub num_queues: u16,
    /// The block size the driver sees (a power of two, 512 to 32768).
    pub logical_block_size: u32,
    /// Discards deallocate (the node's `discard=unmap`); otherwise they
    /// succeed and change nothing, and write-zeroes keep the range
    /// allocated.
    pub discard: bool,
    /// Writes of all-zero data become write-zeroes (the node's
    /// `detect-zeroes`); with `Unmap` and [`discard`](Self::discard)
    /// they may deallocate.
    pub detect_zeroes: DetectZeroes,
}

impl Default for VhostUserBlkOptions {
    fn default() -> Self {
        VhostUserBlkOptions {
            writable: false,
            num_queues: 1,
            logical_block_size: 512,
            discard: false,
            detect_zeroes: DetectZeroes::Off,
        }
    }
}

setters!(VhostUserBlkOptions {
    writable: bool,
    num_queues: u16,
    logical_block_size: u32,
    discard: bool,
    detect_zeroes: DetectZeroes,
});

/// How often the accept loop looks at its stop flag.
const POLL_MS: i32 = 50;

/// A listening vhost-user-blk export; [`stop`](Self::stop) it to end.
pub struct VhostUserBlkExport {
    stop: Arc<AtomicBool>,
    /// The connected front end's socket, to cut it off.
    conn: Arc<Mutex<Option<ShutdownHandle>>>,
    thread: Option<JoinHandle<()>>,
    /// The socket file bound (none for an inherited socket).
    path: Option<PathBuf>,
}

impl std::fmt::Debug for VhostUserBlkExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserBlkExport").field("path", &self.path).finish_non_exhaustive()
    }
}

impl VhostUserBlkExport {
    /// Listens on the Unix socket `path` (replacing a stale socket file)
    /// and serves `device` to each front end that connects.
    pub fn start(device: Arc<dyn BlockDevice>, path: &Path, opts: VhostUserBlkOptions) -> Result<VhostUserBlkExport> {
        check(&*device, opts)?;
        let listener = Listener::new(path, true)
            .map_err(|e| Error::io(format!("listening on {}", path.display()), std::io::Error::other(e)))?;
        Self::serve(device, listener, Some(path.to_path_buf()), opts)
    }

    /// Serves `device` on a socket that already listens (one a parent
    /// process passed in); it is closed, not unlinked, at the end.
    pub fn start_on(
        device: Arc<dyn BlockDevice>,
        listener: std::os::unix::net::UnixListener,
        opts: VhostUserBlkOptions,
    ) -> Result<VhostUserBlkExport> {
        check(&*device, opts)?;
        Self::serve(device, Listener::from(listener), None, opts)
    }

    fn serve(
        device: Arc<dyn BlockDevice>,
        listener: Listener,
        path: Option<PathBuf>,
        opts: VhostUserBlkOptions,
    ) -> Result<VhostUserBlkExport> {
        let context = || "listening for vhost-user front ends".to_string();
        listener.set_nonblocking(true).map_err(|e| Error::io(context(), std::io::Error::other(e)))?;
        let epoll = Epoll::new().map_err(|e| Error::io(context(), e))?;
        epoll
            .ctl(ControlOperation::Add, listener.as_raw_fd(), EpollEvent::new(EventSet::IN, 0))
            .map_err(|e| Error::io(context(), e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let conn = Arc::new(Mutex::new(None));
        let (stop2, conn2) = (Arc::clone(&stop), Arc::clone(&conn));
        let thread = std::thread::Builder::new()
            .name("vhost-user-blk".into())
            .spawn(move || accept_loop(listener, epoll, device, opts, &stop2, &conn2))
            .map_err(|e| Error::io("starting the vhost-user-blk export", e))?;
        Ok(VhostUserBlkExport { stop, conn, thread: Some(thread), path })
    }

    /// A front end is connected.
    pub fn connected(&self) -> bool {
        lock(&self.conn).is_some()
    }

    /// Disconnects the front end, if any, waits for the requests in
    /// flight and the worker threads, and removes the socket.
    pub fn stop(mut self) {
        self.end();
    }

    fn end(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(c) = lock(&self.conn).as_ref() {
            c.shutdown();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for VhostUserBlkExport {
    fn drop(&mut self) {
        self.end();
    }
}

/// Refuses options the device cannot be served with.
fn check(device: &dyn BlockDevice, opts: VhostUserBlkOptions) -> Result<()> {
    let lbs = opts.logical_block_size;
    if !lbs.is_power_of_two() || !(512..=32768).contains(&lbs) {
        return Err(Error::invalid(format!(
            "logical-block-size must be a power of 2 between 512 and 32768, not {lbs}"
        )));
    }
    if !(1..=64).contains(&opts.num_queues) {
        return Err(Error::invalid(format!("num-queues must be between 1 and 64, not {}", opts.num_queues)));
    }
    if opts.writable && device.is_read_only() {
        return Err(Error::invalid("cannot export a read-only device as writable"));
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn accept_loop(
    mut listener: Listener,
    epoll: Epoll,
    device: Arc<dyn BlockDevice>,
    opts: VhostUserBlkOptions,
    stop: &AtomicBool,
    conn: &Mutex<Option<ShutdownHandle>>,
) {
    let mut events = [EpollEvent::default(); 1];
    while !stop.load(Ordering::Acquire) {
        match epoll.wait(POLL_MS, &mut events) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => {
                std::thread::sleep(std::time::Duration::from_millis(POLL_MS as u64));
                continue;
            }
        }
        let backend = Arc::new(BlkBackend::new(Arc::clone(&device), opts));
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        // Failures are the connection's own: the next front end is served.
        let Ok(mut daemon) = VhostUserDaemon::new("vhost-user-blk".into(), backend, mem) else { continue };
        if daemon.start(&mut listener).is_err() {
            continue;
        }
        *lock(conn) = daemon.shutdown_handle();
        // Checked after publishing the handle: a stop that came between
        // did not see it and is carried out here.
        if stop.load(Ordering::Acquire) {
            daemon.request_shutdown();
        }
        let _ = daemon.wait();
        *lock(conn) = None;
        // Dropping the daemon stops and joins the worker threads.
        drop(daemon);
        // What the guest wrote without flushing is on its way to the disk
        // before the next front end comes, as a stopped device's would be.
        let _ = device.flush();
    }
}

#[cfg(test)]
mod tests;
