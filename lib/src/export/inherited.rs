//! Listening sockets a parent process hands over by descriptor number
//! (qemu-storage-daemon's `addr.type=fd,addr.str=N` and `--chardev
//! socket,fd=N`, as libvirt uses them): the parent binds and listens, then
//! execs the daemon with the descriptor left open.

use std::io;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;

/// An inherited listening socket, by address family.
#[derive(Debug)]
pub enum InheritedListener {
    /// A Unix-domain socket.
    Unix(UnixListener),
    /// An IPv4 or IPv6 socket.
    Tcp(TcpListener),
}

/// The socket the process inherited as descriptor `fd`, made to listen
/// (as QEMU does). A duplicate is returned: the inherited number stays
/// open. `ENOTSOCK` or `EBADF` when `fd` is not an open socket,
/// `EAFNOSUPPORT` for other families.
pub fn inherited_listener(fd: i32) -> io::Result<InheritedListener> {
    let (owned, domain) = crate::storage::sys::inherited_listener(fd)?;
    match domain {
        libc::AF_UNIX => Ok(InheritedListener::Unix(UnixListener::from(owned))),
        libc::AF_INET | libc::AF_INET6 => Ok(InheritedListener::Tcp(TcpListener::from(owned))),
        _ => Err(io::Error::from_raw_os_error(libc::EAFNOSUPPORT)),
    }
}
