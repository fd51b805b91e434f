//! A blkdebug layer: QEMU's error-injection driver as a storage over a
//! file, for tests of what an engine does when its I/O fails at a
//! chosen point.
//!
//! The engine above announces points of its work as events
//! ([`Storage::debug_event`]); a rule for an event either moves the layer
//! to another state or arms an error, which then fails the next request
//! of its kinds (the one touching its sector, when it names one), once or
//! until another event re-arms the rules. As in QEMU: the layer starts in
//! state 1; an event's rules all see the state it started in; an event
//! that arms an error first disarms the errors armed before; the first
//! armed error that matches a request wins.
//!
//! Names: `blkdebug:CONFIG:FILE` (CONFIG may be empty) is FILE under the
//! rules of the config file CONFIG ([`parse_name`]).

use super::blkdebug_break::BlkdebugBreaks;
use super::blkdebug_rules::{parse_config, Action, BlkdebugEvent, IoType, Rule, RuleError};
use super::Storage;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// The rules a blkdebug layer starts with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlkdebugRules(pub Vec<Rule>);

impl BlkdebugRules {
    /// The rules of a config file.
    pub fn from_config_file(path: &str) -> Result<BlkdebugRules, RuleError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            let msg = e.to_string();
            let msg = msg.split(" (os error ").next().unwrap_or_default();
            RuleError(format!("Could not read blkdebug config file: {msg}"))
        })?;
        Ok(BlkdebugRules(parse_config(&text)?))
    }
}

/// Splits `blkdebug:CONFIG:FILE` into its rules and FILE; `None` for
/// other names.
pub fn parse_name(name: &str) -> Option<Result<(BlkdebugRules, &str), RuleError>> {
    let rest = name.strip_prefix("blkdebug:")?;
    let Some((config, file)) = rest.split_once(':') else {
        return Some(Err(RuleError("blkdebug requires both config file and image path".into())));
    };
    if config.is_empty() {
        return Some(Ok((BlkdebugRules::default(), file)));
    }
    Some(BlkdebugRules::from_config_file(config).map(|r| (r, file)))
}

struct State {
    /// The state set-state rules move between (QEMU starts at 1).
    state: i64,
    /// The rules still in force (a `once` error leaves after firing).
    rules: Vec<Option<Rule>>,
    /// Indexes into `rules` of the armed errors, most recently armed first.
    armed: Vec<usize>,
}

/// A storage failing requests as its rules say (see the module docs).
pub struct BlkdebugStorage {
    inner: Arc<dyn Storage>,
    state: Mutex<State>,
    /// A write was attempted since the last good flush. As in QEMU, a
    /// flush with nothing to flush reaches neither the rules nor the disk,
    /// so an armed error does not fail closing a clean image.
    unflushed: AtomicBool,
    /// Where requests stop at breakpoints (qemu-io's `break`), if anyone
    /// can set them.
    breaks: Option<Arc<BlkdebugBreaks>>,
}

impl std::fmt::Debug for BlkdebugStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkdebugStorage").finish_non_exhaustive()
    }
}

impl BlkdebugStorage {
    /// `inner` under `rules`. Errors of rules for the event `none`, which
    /// nothing emits, are armed from the start.
    pub fn new(inner: Arc<dyn Storage>, rules: BlkdebugRules) -> Self {
        let armed = rules
            .0
            .iter()
            .enumerate()
            .filter(|(_, r)| r.event == BlkdebugEvent::None && matches!(r.action, Action::InjectError { .. }))
            .map(|(i, _)| i)
            .collect();
        let rules = rules.0.into_iter().map(Some).collect();
        BlkdebugStorage {
            inner,
            state: Mutex::new(State { state: 1, rules, armed }),
            unflushed: AtomicBool::new(false),
            breaks: None,
        }
    }

    /// Requests stop at the breakpoints of `breaks`.
    #[must_use]
    pub fn with_breaks(mut self, breaks: Option<Arc<BlkdebugBreaks>>) -> Self {
        if let Some(b) = &breaks {
            b.attach();
        }
        self.breaks = breaks;
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere leaves the rules as consistent as before it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fails a request of `kind` over `offset..offset+len` if an armed
    /// error hits it.
    fn check(&self, kind: IoType, offset: u64, len: u64) -> io::Result<()> {
        let mut st = self.lock();
        let st = &mut *st;
        let found = st.armed.iter().position(|&i| st.rules[i].as_ref().is_some_and(|r| r.hits(kind, offset, len)));
        let Some(pos) = found else { return Ok(()) };
        let idx = st.armed[pos];
        let Some(Rule { action: Action::InjectError { errno, once, .. }, .. }) = st.rules[idx].clone() else {
            return Ok(());
        };
        if once {
            st.armed.remove(pos);
            st.rules[idx] = None;
        }
        Err(io::Error::from_raw_os_error(errno))
    }

    fn event(&self, event: BlkdebugEvent) {
        let mut guard = self.lock();
        let st = &mut *guard;
        let current = st.state;
        let mut new_state = current;
        let mut rearmed = false;
        for (i, r) in st.rules.iter().enumerate() {
            let Some(r) = r else { continue };
            if r.event != event || (r.state != 0 && r.state != current) {
                continue;
            }
            match r.action {
                Action::InjectError { .. } => {
                    if !rearmed {
                        st.armed.clear();
                        rearmed = true;
                    }
                    st.armed.insert(0, i);
                }
                Action::SetState { new_state: n } => new_state = n,
            }
        }
        st.state = new_state;
        // A request stops at a breakpoint without holding the rules.
        drop(guard);
        if let Some(b) = &self.breaks {
            b.hit(event);
        }
    }
}

impl Storage for BlkdebugStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(IoType::Read, offset, buf.len() as u64)?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.unflushed.store(true, Ordering::SeqCst);
        self.event(BlkdebugEvent::Pwritev);
        self.check(IoType::Write, offset, buf.len() as u64)?;
        self.inner.write_at(buf, offset)?;
        self.event(BlkdebugEvent::PwritevDone);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.event(BlkdebugEvent::FlushToOs);
        if !self.unflushed.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        self.event(BlkdebugEvent::FlushToDisk);
        let r = self.check(IoType::Flush, 0, 0).and_then(|()| self.inner.flush());
        if r.is_err() {
            self.unflushed.store(true, Ordering::SeqCst);
        }
        r
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.unflushed.store(true, Ordering::SeqCst);
        self.inner.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.unflushed.store(true, Ordering::SeqCst);
        self.check(IoType::Discard, offset, len)?;
        self.inner.punch_hole(offset, len)
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.unflushed.store(true, Ordering::SeqCst);
        self.inner.allocate(offset, len)
    }
    fn allocated_size(&self) -> io::Result<u64> {
        self.inner.allocated_size()
    }
    fn extent_at(&self, offset: u64) -> Option<(bool, u64)> {
        self.inner.extent_at(offset)
    }
    fn debug_event(&self, event: BlkdebugEvent) {
        self.event(event);
    }
}

#[cfg(test)]
mod tests {
    use super::super::blkdebug_rules::parse_options;
    use super::super::MemoryStorage;
    use super::*;

    fn layer(opts: &[(&str, &str)]) -> BlkdebugStorage {
        let rules = parse_options(opts.iter().copied()).unwrap();
        BlkdebugStorage::new(Arc::new(MemoryStorage::default()), BlkdebugRules(rules))
    }

    fn eno(r: io::Result<()>) -> Option<i32> {
        r.err().and_then(|e| e.raw_os_error())
    }

    #[test]
    fn an_event_arms_an_error_for_the_next_request_once_or_for_good() {
        let once = layer(&[("inject-error.0.event", "l2_load"), ("inject-error.0.once", "on")]);
        assert!(once.write_at(&[1], 0).is_ok());
        once.debug_event(BlkdebugEvent::L2Load);
        assert_eq!(eno(once.read_at(&mut [0], 0)), Some(libc::EIO));
        assert!(once.read_at(&mut [0], 0).is_ok());
        once.debug_event(BlkdebugEvent::L2Load);
        assert!(once.read_at(&mut [0], 0).is_ok(), "a once rule is gone after firing");
        let forever = layer(&[("inject-error.0.event", "l2_load"), ("inject-error.0.errno", "28")]);
        forever.debug_event(BlkdebugEvent::L2Load);
        assert_eq!(eno(forever.write_at(&[1], 0)), Some(libc::ENOSPC));
        assert_eq!(eno(forever.flush()), Some(libc::ENOSPC));
        assert_eq!(eno(forever.flush()), Some(libc::ENOSPC), "still unflushed");
    }

    #[test]
    fn a_flush_with_nothing_to_flush_escapes_armed_errors() {
        let st = layer(&[("inject-error.0.event", "read_aio")]);
        st.debug_event(BlkdebugEvent::ReadAio);
        assert_eq!(eno(st.read_at(&mut [0], 0)), Some(libc::EIO));
        assert!(st.flush().is_ok());
    }

    #[test]
    fn set_state_gates_errors_of_another_state() {
        // QEMU's iotest 066 pattern: the first write moves to state 2,
        // and only a second write request fails.
        let st = layer(&[
            ("set-state.0.event", "write_aio"),
            ("set-state.0.new_state", "2"),
            ("inject-error.0.event", "write_aio"),
            ("inject-error.0.state", "2"),
        ]);
        st.debug_event(BlkdebugEvent::WriteAio);
        assert!(st.write_at(&[1], 0).is_ok());
        st.debug_event(BlkdebugEvent::WriteAio);
        assert_eq!(eno(st.write_at(&[1], 0)), Some(libc::EIO));
    }

    #[test]
    fn none_rules_are_armed_from_the_start_and_keep_to_their_sector() {
        let st = layer(&[
            ("inject-error.0.event", "none"),
            ("inject-error.0.iotype", "read"),
            ("inject-error.0.sector", "8"),
        ]);
        assert!(st.read_at(&mut [0; 512], 0).is_ok());
        assert!(st.write_at(&[0; 512], 4096).is_ok());
        assert_eq!(eno(st.read_at(&mut [0; 512], 4096)), Some(libc::EIO));
    }
}
