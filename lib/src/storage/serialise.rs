//! Serialising requests: keeps a read-modify-write cycle from interleaving
//! with any other request on the same blocks.
//!
//! A write that is not aligned to the storage's block reads the blocks at
//! its edges, patches them and writes them back whole. If another write to
//! one of those blocks lands between the read and the write-back, the
//! write-back puts the old bytes back and that write is lost although it
//! was acknowledged. So:
//!
//! - a *serialising* request (a read-modify-write) waits for every
//!   overlapping request that arrived before it;
//! - every request waits for the overlapping serialising requests that
//!   arrived before it;
//! - requests that are not serialising never wait for each other.
//!
//! Waiting only for requests that arrived earlier keeps the wait-for graph
//! free of cycles (no deadlock) and serves conflicting requests in arrival
//! order (no starvation). When no serialising request is registered, a
//! plain request costs one short critical section to register and one to
//! leave; it never scans the list.

use std::sync::{Condvar, Mutex, MutexGuard};

/// Requests in flight (or waiting to be), by byte range.
#[derive(Debug, Default)]
pub(crate) struct RequestTracker {
    state: Mutex<Tracked>,
    done: Condvar,
}

#[derive(Debug, Default)]
struct Tracked {
    next_seq: u64,
    /// Registered requests; few (one per request in flight), so a vector
    /// scanned linearly beats any index.
    reqs: Vec<Req>,
    /// How many of `reqs` are serialising.
    serialising: usize,
    /// Threads blocked in [`RequestTracker::begin`].
    waiters: usize,
}

#[derive(Debug, Clone, Copy)]
struct Req {
    seq: u64,
    start: u64,
    end: u64,
    serialising: bool,
}

impl Tracked {
    /// Whether a request that arrived before `me` conflicts with it.
    fn blocked(&self, me: &Req) -> bool {
        self.reqs
            .iter()
            .any(|r| r.seq < me.seq && (r.serialising || me.serialising) && r.start < me.end && me.start < r.end)
    }
}

/// A registered request; leaving it (dropping) lets waiters go on.
#[must_use]
pub(crate) struct Ticket<'a> {
    tracker: &'a RequestTracker,
    seq: u64,
}

impl RequestTracker {
    fn lock(&self) -> MutexGuard<'_, Tracked> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a request on `[start, end)` and waits until no earlier
    /// conflicting request is left.
    pub(crate) fn begin(&self, start: u64, end: u64, serialising: bool) -> Ticket<'_> {
        let mut st = self.lock();
        let me = Req { seq: st.next_seq, start, end, serialising };
        st.next_seq += 1;
        // Everything registered so far arrived earlier than this request.
        let may_wait = serialising || st.serialising > 0;
        st.reqs.push(me);
        if serialising {
            st.serialising += 1;
        }
        if may_wait {
            while st.blocked(&me) {
                st.waiters += 1;
                st = self.done.wait(st).unwrap_or_else(|e| e.into_inner());
                st.waiters -= 1;
            }
        }
        Ticket { tracker: self, seq: me.seq }
    }

    #[cfg(test)]
    fn registered(&self) -> usize {
        self.lock().reqs.len()
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let mut st = self.tracker.lock();
        if let Some(i) = st.reqs.iter().position(|r| r.seq == self.seq) {
            let r = st.reqs.swap_remove(i);
            if r.serialising {
                st.serialising -= 1;
            }
        }
        if st.waiters > 0 {
            self.tracker.done.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Runs `begin(start, end, serialising)` on another thread while
    /// `held` is registered and tells whether it had to wait (it either
    /// finishes or shows up as a waiter: no clock involved). `held` is
    /// released once that is known, so a waiting attempt completes.
    fn waits(t: &RequestTracker, held: Ticket<'_>, start: u64, end: u64, serialising: bool) -> bool {
        let done = AtomicBool::new(false);
        let waited = std::thread::scope(|s| {
            s.spawn(|| {
                let _k = t.begin(start, end, serialising);
                done.store(true, Ordering::SeqCst);
            });
            let waited = loop {
                if done.load(Ordering::SeqCst) {
                    break false;
                }
                if t.lock().waiters > 0 {
                    break true;
                }
                std::thread::yield_now();
            };
            drop(held);
            waited
        });
        assert_eq!(t.registered(), 0);
        waited
    }

    #[test]
    fn plain_requests_never_wait_for_each_other() {
        let t = RequestTracker::default();
        assert!(!waits(&t, t.begin(0, 4096, false), 0, 4096, false));
    }

    #[test]
    fn serialising_request_waits_for_any_overlapping_earlier_one() {
        let t = RequestTracker::default();
        assert!(waits(&t, t.begin(0, 4096, false), 512, 1024, true));
        assert!(waits(&t, t.begin(0, 4096, true), 512, 1024, true));
        assert!(!waits(&t, t.begin(0, 4096, false), 4096, 8192, true));
    }

    #[test]
    fn plain_request_waits_for_an_overlapping_serialising_one() {
        let t = RequestTracker::default();
        assert!(waits(&t, t.begin(0, 4096, true), 0, 512, false));
        assert!(!waits(&t, t.begin(0, 4096, true), 4096, 8192, false));
    }
}
