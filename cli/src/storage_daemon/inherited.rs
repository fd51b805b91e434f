//! `addr.type=fd,addr.str=N` and `--chardev socket,fd=N`: a listening
//! socket the parent process passed in, in qemu-storage-daemon's words
//! when the number is not one.

use crate::error::{CliError, CliResult};
use oxcow::export::inherited::{inherited_listener, InheritedListener};

/// The socket inherited as descriptor `text` (a number; QEMU's monitor
/// fd names do not exist before the monitor does).
pub fn listener(text: &str) -> CliResult<InheritedListener> {
    let fd = text.parse::<i32>().ok().filter(|n| *n >= 0);
    let fd = fd.ok_or_else(|| CliError::new(format!("Unable to parse FD number {text}")))?;
    inherited_listener(fd).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOTSOCK) | Some(libc::EBADF) => CliError::new(format!("File descriptor '{text}' is not a socket")),
        _ => CliError::new(format!("File descriptor '{text}': {}", crate::error::os_message(&e))),
    })
}
