//! Breakpoints of a blkdebug layer (qemu-io's `break`, `wait_break`,
//! `resume`, `remove_break`): a request reaching a chosen event stops
//! there, in its own thread, until it is resumed by tag.
//!
//! As in QEMU: a breakpoint is for one event and stops one request (it is
//! gone once hit); a stopped request is known by the breakpoint's tag;
//! `resume` wakes the most recently stopped request of a tag,
//! `remove_break` drops a tag's breakpoints and wakes all its requests.
//! The layer's messages ("blkdebug: Suspended request 'A'") are kept
//! here, in the order they happened, for the caller to print where its
//! output says what happened: a request's thread must not write to a
//! terminal the command loop is writing to.

use super::blkdebug_rules::BlkdebugEvent;
use std::sync::{Condvar, Mutex, MutexGuard};

#[derive(Default)]
struct State {
    /// A blkdebug layer uses these breakpoints (otherwise setting one
    /// fails as QEMU fails it on a node without blkdebug).
    attached: bool,
    /// Breakpoints still to hit, most recent first.
    breaks: Vec<(BlkdebugEvent, String)>,
    /// Stopped requests, most recently stopped first: an id and its tag.
    stopped: Vec<(u64, String)>,
    /// Ids of stopped requests told to go on.
    released: Vec<u64>,
    next_id: u64,
    /// Messages not yet taken by [`BlkdebugBreaks::take_messages`].
    messages: Vec<String>,
}

/// The breakpoints of a blkdebug layer, shared between the layer and
/// whoever sets them (see the module docs).
#[derive(Default)]
pub struct BlkdebugBreaks {
    state: Mutex<State>,
    /// Signalled whenever a request stops or is released, and by
    /// [`BlkdebugBreaks::wake`].
    changed: Condvar,
}

impl std::fmt::Debug for BlkdebugBreaks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkdebugBreaks").finish_non_exhaustive()
    }
}

impl BlkdebugBreaks {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic elsewhere.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called by the layer that uses these breakpoints.
    pub(crate) fn attach(&self) {
        self.lock().attached = true;
    }

    /// Whether a blkdebug layer uses these breakpoints.
    pub fn attached(&self) -> bool {
        self.lock().attached
    }

    /// `break EVENT TAG`. Errors are errnos, as QEMU reports them: no
    /// blkdebug layer (ENOTSUP), an unknown event (ENOENT).
    pub fn set(&self, event: &str, tag: &str) -> Result<(), i32> {
        let mut st = self.lock();
        if !st.attached {
            return Err(libc::ENOTSUP);
        }
        let event: BlkdebugEvent = event.parse().map_err(|_| libc::ENOENT)?;
        st.breaks.insert(0, (event, tag.to_string()));
        Ok(())
    }

    /// `remove_break TAG`: drops the tag's breakpoints and releases its
    /// stopped requests. ENOENT when no breakpoint was left to drop (the
    /// stopped requests are released all the same, as in QEMU), ENOTSUP
    /// without a layer.
    pub fn remove(&self, tag: &str) -> Result<(), i32> {
        let mut st = self.lock();
        if !st.attached {
            return Err(libc::ENOTSUP);
        }
        let before = st.breaks.len();
        st.breaks.retain(|(_, t)| t != tag);
        let dropped = st.breaks.len() != before;
        let ids: Vec<u64> = st.stopped.iter().filter(|(_, t)| t == tag).map(|(id, _)| *id).collect();
        self.release(st, &ids);
        if dropped {
            Ok(())
        } else {
            Err(libc::ENOENT)
        }
    }

    /// `resume TAG`: releases the most recently stopped request of the
    /// tag and returns once it runs again (its "Resuming" message is then
    /// among the messages); ENOENT when none is stopped, ENOTSUP without
    /// a layer.
    pub fn resume(&self, tag: &str) -> Result<(), i32> {
        let st = self.lock();
        if !st.attached {
            return Err(libc::ENOTSUP);
        }
        let id = st.stopped.iter().find(|(_, t)| t == tag).map(|(id, _)| *id).ok_or(libc::ENOENT)?;
        self.release(st, &[id]);
        Ok(())
    }

    /// Drops every breakpoint and releases every stopped request (the
    /// image is closing: nobody is left to resume them).
    pub fn release_all(&self) {
        let mut st = self.lock();
        st.breaks.clear();
        let ids: Vec<u64> = st.stopped.iter().map(|(id, _)| *id).collect();
        self.release(st, &ids);
    }

    fn release(&self, mut st: MutexGuard<'_, State>, ids: &[u64]) {
        st.released.extend_from_slice(ids);
        self.changed.notify_all();
        // Wait for the released requests to leave, so that what they say
        // on waking comes before whatever the caller does next.
        while st.stopped.iter().any(|(id, _)| ids.contains(id)) {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Whether a request of `tag` is stopped.
    pub fn is_suspended(&self, tag: &str) -> bool {
        self.lock().stopped.iter().any(|(_, t)| t == tag)
    }

    /// Whether breakpoints are set or requests stopped: requests may then
    /// stop, and must run where the caller can go on without them.
    pub fn active(&self) -> bool {
        let st = self.lock();
        !st.breaks.is_empty() || !st.stopped.is_empty()
    }

    /// Whether any request is stopped.
    pub fn any_suspended(&self) -> bool {
        !self.lock().stopped.is_empty()
    }

    /// `wait_break TAG`: waits until a request of `tag` is stopped (true)
    /// or `give_up` says none ever will (false). Whatever changes
    /// `give_up`'s answer must call [`BlkdebugBreaks::wake`] after.
    pub fn wait_suspended(&self, tag: &str, give_up: &dyn Fn() -> bool) -> bool {
        let mut st = self.lock();
        loop {
            if st.stopped.iter().any(|(_, t)| t == tag) {
                return true;
            }
            if give_up() {
                return false;
            }
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Waits until `done` or any request is stopped; `done` as in
    /// [`BlkdebugBreaks::wait_suspended`].
    pub fn wait_done_or_suspended(&self, done: &dyn Fn() -> bool) {
        let mut st = self.lock();
        while st.stopped.is_empty() && !done() {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Wakes the waiters of [`BlkdebugBreaks::wait_suspended`] to ask
    /// their `give_up` again.
    pub fn wake(&self) {
        let _st = self.lock();
        self.changed.notify_all();
    }

    /// The messages since the last call, oldest first.
    pub fn take_messages(&self) -> Vec<String> {
        std::mem::take(&mut self.lock().messages)
    }

    /// The layer reached `event`: stops the calling request there while a
    /// breakpoint for it is set (once per breakpoint hit).
    pub(crate) fn hit(&self, event: BlkdebugEvent) {
        let mut st = self.lock();
        while let Some(pos) = st.breaks.iter().position(|(e, _)| *e == event) {
            let (_, tag) = st.breaks.remove(pos);
            let id = st.next_id;
            st.next_id += 1;
            st.stopped.insert(0, (id, tag.clone()));
            st.messages.push(format!("blkdebug: Suspended request '{tag}'"));
            self.changed.notify_all();
            while !st.released.contains(&id) {
                st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            st.released.retain(|&r| r != id);
            st.stopped.retain(|(s, _)| *s != id);
            st.messages.push(format!("blkdebug: Resuming request '{tag}'"));
            self.changed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_request_stops_at_its_breakpoint_until_resumed_by_tag() {
        let b = Arc::new(BlkdebugBreaks::default());
        assert_eq!(b.set("write_aio", "A"), Err(libc::ENOTSUP), "no layer yet");
        assert_eq!((b.resume("A"), b.remove("A")), (Err(libc::ENOTSUP), Err(libc::ENOTSUP)));
        b.attach();
        assert_eq!(b.set("no_such_event", "A"), Err(libc::ENOENT));
        b.set("write_aio", "A").unwrap();
        assert_eq!(b.resume("A"), Err(libc::ENOENT), "nothing stopped yet");
        let t = {
            let b = b.clone();
            std::thread::spawn(move || {
                b.hit(BlkdebugEvent::ReadAio);
                b.hit(BlkdebugEvent::WriteAio);
                b.hit(BlkdebugEvent::WriteAio);
            })
        };
        assert!(b.wait_suspended("A", &|| false));
        assert!(!b.is_suspended("B") && b.active());
        assert_eq!(b.take_messages(), ["blkdebug: Suspended request 'A'"]);
        b.resume("A").unwrap();
        assert_eq!(b.take_messages(), ["blkdebug: Resuming request 'A'"], "resume returns after the wake-up");
        t.join().unwrap();
        assert!(!b.active(), "a breakpoint stops one request");
        assert_eq!(b.remove("A"), Err(libc::ENOENT));
    }

    #[test]
    fn remove_break_drops_breakpoints_and_releases_stopped_requests() {
        let b = Arc::new(BlkdebugBreaks::default());
        b.attach();
        b.set("l2_load", "A").unwrap();
        b.set("l2_load", "A").unwrap();
        let t = {
            let b = b.clone();
            std::thread::spawn(move || b.hit(BlkdebugEvent::L2Load))
        };
        assert!(b.wait_suspended("A", &|| false));
        b.remove("A").unwrap();
        t.join().unwrap();
        b.set("l2_load", "B").unwrap();
        let t = {
            let b = b.clone();
            std::thread::spawn(move || b.hit(BlkdebugEvent::L2Load))
        };
        assert!(b.wait_suspended("B", &|| false));
        assert_eq!(b.remove("B"), Err(libc::ENOENT), "the breakpoint went when it was hit");
        t.join().unwrap();
        assert!(!b.active());
        assert!(!b.wait_suspended("A", &|| true), "gives up when told nothing will stop");
    }
}
