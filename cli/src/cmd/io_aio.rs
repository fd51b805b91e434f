//! qemu-io's requests in flight: `aio_read`/`aio_write` that run on
//! while later commands go on, and blkdebug's `break`, `wait_break`,
//! `resume` and `remove_break` that stop and release them.
//!
//! An aio request runs to its end within its command, as before, unless
//! breakpoints are set or a request is stopped: then it runs in a thread
//! of its own, and its command returns once the request has ended or some
//! request is stopped (QEMU runs a request until it first waits, which is
//! where a breakpoint stops it). What such requests print waits for the
//! next point where QEMU's qemu-io would have printed it: `aio_flush`,
//! `flush`, `open`/`close`/`reopen`, quitting. The blkdebug layer's own
//! messages are printed by the commands they answer (`wait_break`,
//! `resume`, the aio command a request stopped in).

use super::io::{dump, getopt, length, num, pattern, report, usage, Stop};
use oxcow::storage::BlkdebugBreaks;
use oxcow::BlockDevice;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

#[derive(Default)]
struct State {
    running: usize,
    /// Ended requests' output and whether they succeeded, in the order
    /// they ended.
    ended: Vec<(Vec<u8>, bool)>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    idle: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The requests in flight on one open image, and its breakpoints.
#[derive(Clone, Default)]
pub(super) struct Aio {
    /// Handed to the blkdebug layer at open.
    pub breaks: Arc<BlkdebugBreaks>,
    shared: Arc<Shared>,
}

impl Aio {
    /// Whether aio requests must run in threads of their own now.
    pub fn threaded(&self) -> bool {
        self.breaks.active()
    }

    /// Prints the blkdebug layer's messages and the ended requests'
    /// output; false if one of them failed.
    fn print(&self, out: &mut dyn Write) -> bool {
        for m in self.breaks.take_messages() {
            let _ = writeln!(out, "{m}");
        }
        let ended = std::mem::take(&mut self.shared.lock().ended);
        let mut ok = true;
        for (text, good) in ended {
            let _ = out.write_all(&text);
            ok &= good;
        }
        ok
    }

    /// Waits for every request in flight, then prints what they said.
    /// With `release`, stopped requests are released first (the image is
    /// going away and nobody is left to resume them).
    pub fn drain(&self, out: &mut dyn Write, release: bool) -> bool {
        if release {
            self.breaks.release_all();
        }
        let mut st = self.shared.lock();
        while st.running > 0 {
            st = self.shared.idle.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        drop(st);
        self.print(out)
    }

    /// `break`, `wait_break`, `resume`, `remove_break`: output and
    /// wording as qemu-io's (failures on stdout; they fail the run).
    pub fn debug_command(&self, cmd: &str, args: &[&str], out: &mut dyn Write) -> bool {
        let r = match cmd {
            "break" => self.breaks.set(args[0], args[1]).map_err(|e| ("Could not set breakpoint".to_string(), e)),
            "remove_break" => {
                self.breaks.remove(args[0]).map_err(|e| (format!("Could not remove breakpoint {}", args[0]), e))
            }
            "resume" => self.breaks.resume(args[0]).map_err(|e| ("Could not resume request".to_string(), e)),
            _ => {
                // QEMU waits for good; a wait no request in flight can end
                // returns instead of hanging.
                let shared = self.shared.clone();
                self.breaks.wait_suspended(args[0], &|| shared.lock().running == 0);
                Ok(())
            }
        };
        // What released requests said comes first.
        let ok = self.print(out);
        match r {
            Ok(()) => ok,
            Err((what, e)) => {
                let e = crate::error::os_message(&std::io::Error::from_raw_os_error(e));
                let _ = writeln!(out, "{what}: {e}");
                false
            }
        }
    }

    /// `aio_read`/`aio_write` in a thread of their own (see the module
    /// docs); the arguments are checked here, in the command.
    pub fn start(
        &self,
        dev: Arc<dyn BlockDevice>,
        cmd: &str,
        args: &[&str],
        out: &mut dyn Write,
    ) -> Result<bool, Stop> {
        let write = cmd == "aio_write";
        let o = match getopt(args, if write { "P:zuqCfir" } else { "P:vqCir" }) {
            Ok(o) => o,
            Err(c) => {
                eprintln!("{cmd}: invalid option -- '{c}'");
                usage(out, cmd);
                return Err(Stop);
            }
        };
        if o.rest.len() < 2 {
            usage(out, cmd);
            return Err(Stop);
        }
        let off = num(out, o.rest[0])?;
        let mut len = 0u64;
        for w in &o.rest[1..] {
            len += length(out, w, "")?;
        }
        let zero = write && o.has('z');
        if zero && o.has('P') {
            let _ = writeln!(out, "-z and -P cannot be specified at the same time");
            return Err(Stop);
        }
        let pat = o.value('P').map(|p| pattern(out, p)).transpose()?;
        if off.checked_add(len).is_none_or(|end| end > dev.len()) {
            let e = std::io::Error::from_raw_os_error(libc::EIO);
            let _ = writeln!(out, "{cmd} failed: {}", crate::error::os_message(&e));
            return Err(Stop);
        }
        let n = usize::try_from(len).map_err(|_| Stop)?;
        let (quiet, verbose, fua, unmap) = (o.has('q'), o.has('v'), o.has('f'), o.has('u'));
        let cmd = cmd.to_string();
        let ended = Arc::new(AtomicBool::new(false));
        self.shared.lock().running += 1;
        let (shared, breaks, flag) = (self.shared.clone(), self.breaks.clone(), ended.clone());
        std::thread::spawn(move || {
            let mut text = Vec::new();
            let t = Instant::now();
            let r = if write {
                let r = if zero {
                    dev.write_zeroes(off, len, unmap)
                } else {
                    dev.write_at(&vec![pat.unwrap_or(0xcd); n], off)
                };
                r.and_then(|()| if fua { dev.flush() } else { Ok(()) }).map(|()| None)
            } else {
                let mut buf = vec![0u8; n];
                dev.read_at(&mut buf, off).map(|()| Some(buf))
            };
            let el = t.elapsed();
            let ok = match r {
                Err(e) => {
                    let _ = writeln!(text, "{cmd} failed: {}", crate::error::request_message(&e));
                    false
                }
                Ok(buf) => {
                    let mut ok = true;
                    if let (Some(buf), Some(p)) = (&buf, pat) {
                        if buf.iter().any(|&b| b != p) {
                            let _ = writeln!(text, "Pattern verification failed at offset {off}, {len} bytes");
                            ok = false;
                        }
                    }
                    if !quiet {
                        if let (Some(buf), true) = (&buf, verbose) {
                            dump(&mut text, buf, off);
                        }
                        report(&mut text, if write { "wrote" } else { "read" }, len, off, el);
                    }
                    ok
                }
            };
            {
                let mut st = shared.lock();
                st.ended.push((text, ok));
                st.running -= 1;
                flag.store(true, Ordering::SeqCst);
                shared.idle.notify_all();
            }
            breaks.wake();
        });
        self.breaks.wait_done_or_suspended(&|| ended.load(Ordering::SeqCst));
        Ok(self.print(out))
    }
}
