//! The threads that serve one disk handle's asynchronous requests (`ReadAsync`,
//! `WriteAsync` on local disks): up to [`ASYNC_THREADS`] of them, started as the
//! requests in flight need them, so that several requests of one handle run at
//! once (one thread made nbdkit over this library 0.8x of `nbdkit file`).
//!
//! Order: a request never starts while an earlier one it conflicts with - an
//! overlapping range where either writes - is queued or running, so overlapping
//! writes land in the order they were submitted and a read sees the writes
//! submitted before it; requests that do not conflict run in any order, and their
//! callbacks may come in any order (as with VDDK's network transports).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// Most threads serving one handle.
pub(crate) const ASYNC_THREADS: usize = 4;

/// A request's work (the I/O and its completion callback).
pub type Job = Box<dyn FnOnce() + Send>;

/// What a request touches: bytes `[start, end)`, and whether it writes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// It writes (else it reads).
    pub write: bool,
}

impl Span {
    /// Whether the two must not run at once (and keep their order).
    fn conflicts(&self, other: &Span) -> bool {
        (self.write || other.write) && self.start < other.end && other.start < self.end
    }
}

#[derive(Default)]
struct State {
    queued: VecDeque<(Span, Job)>,
    running: Vec<Span>,
    /// Threads waiting for work.
    idle: usize,
    closed: bool,
}

impl State {
    /// The first queued request that conflicts with nothing running or queued
    /// before it.
    fn take_runnable(&mut self) -> Option<(Span, Job)> {
        let i = (0..self.queued.len()).find(|&i| {
            let span = &self.queued[i].0;
            !self.running.iter().any(|r| r.conflicts(span))
                && !self.queued.iter().take(i).any(|(q, _)| q.conflicts(span))
        })?;
        let taken = self.queued.remove(i)?;
        self.running.push(taken.0);
        Some(taken)
    }
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A handle's pool of I/O threads.
#[derive(Default)]
pub struct IoPool {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl IoPool {
    /// Queues `job`, which touches `span`; starts a thread if none is free and
    /// fewer than [`ASYNC_THREADS`] run. Fails only if no thread can serve it.
    pub fn submit(&self, span: Span, job: Job) -> std::io::Result<()> {
        let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        let need_thread = {
            let mut st = lock(&self.shared.state);
            st.closed = false;
            st.queued.push_back((span, job));
            st.idle == 0 && threads.len() < ASYNC_THREADS
        };
        if need_thread {
            let shared = Arc::clone(&self.shared);
            match std::thread::Builder::new()
                .name("vixdisklib-io".into())
                .spawn(move || serve(&shared))
            {
                Ok(t) => threads.push(t),
                Err(e) if threads.is_empty() => {
                    // Nobody to run it: take it back.
                    let mut st = lock(&self.shared.state);
                    st.queued.pop_back();
                    return Err(e);
                }
                // The running threads serve it, later.
                Err(_) => {}
            }
        }
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Lets the threads finish what is queued, then stops them.
    pub fn stop(&self) {
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        lock(&self.shared.state).closed = true;
        self.shared.changed.notify_all();
        for t in threads {
            let _ = t.join();
        }
    }
}

/// One thread: runs requests as they become runnable until the pool closes and
/// nothing is left.
fn serve(shared: &Shared) {
    let mut st = lock(&shared.state);
    loop {
        if let Some((span, job)) = st.take_runnable() {
            drop(st);
            job();
            st = lock(&shared.state);
            if let Some(i) = st.running.iter().position(|r| *r == span) {
                st.running.swap_remove(i);
            }
            // A request held back by this one may run now.
            shared.changed.notify_all();
            continue;
        }
        if st.closed && st.queued.is_empty() {
            return;
        }
        st.idle += 1;
        st = shared.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        st.idle -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    fn span(start: u64, end: u64, write: bool) -> Span {
        Span { start, end, write }
    }

    #[test]
    fn reads_run_at_once_and_every_job_runs_once() {
        let pool = IoPool::default();
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let ran = Arc::new(AtomicUsize::new(0));
        for i in 0..16 {
            let (running, most, ran) = (running.clone(), most.clone(), ran.clone());
            pool.submit(
                span(i, i + 1, false),
                Box::new(move || {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(20));
                    running.fetch_sub(1, Ordering::SeqCst);
                    ran.fetch_add(1, Ordering::SeqCst);
                }),
            )
            .unwrap();
        }
        pool.stop();
        assert_eq!(ran.load(Ordering::SeqCst), 16);
        assert!(
            most.load(Ordering::SeqCst) > 1,
            "requests never ran at once"
        );
        assert!(most.load(Ordering::SeqCst) <= ASYNC_THREADS);
    }

    #[test]
    fn conflicting_requests_keep_their_order() {
        let pool = IoPool::default();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (unrelated_ran, wait_for_it) = std::sync::mpsc::channel::<()>();
        // A write that finishes only once the unrelated read has run (so that one
        // must not wait for it), a read inside it, a write over that read.
        let first_log = log.clone();
        pool.submit(
            span(0, 100, true),
            Box::new(move || {
                let seen = wait_for_it.recv_timeout(Duration::from_secs(20)).is_ok();
                first_log.lock().unwrap().push(if seen { 1 } else { 0 });
            }),
        )
        .unwrap();
        for (s, id) in [(span(50, 60, false), 2), (span(55, 58, true), 3)] {
            let log = log.clone();
            pool.submit(s, Box::new(move || log.lock().unwrap().push(id)))
                .unwrap();
        }
        let l4 = log.clone();
        pool.submit(
            span(500, 600, false),
            Box::new(move || {
                l4.lock().unwrap().push(4);
                let _ = unrelated_ran.send(());
            }),
        )
        .unwrap();
        pool.stop();
        let order = log.lock().unwrap().clone();
        assert_eq!(order, vec![4, 1, 2, 3], "0: the unrelated read waited");
    }

    #[test]
    fn a_pool_serves_again_after_stop() {
        let pool = IoPool::default();
        let ran = Arc::new(AtomicUsize::new(0));
        for _ in 0..2 {
            let r = ran.clone();
            pool.submit(
                span(0, 1, true),
                Box::new(move || {
                    r.fetch_add(1, Ordering::SeqCst);
                }),
            )
            .unwrap();
            pool.stop();
        }
        assert_eq!(ran.load(Ordering::SeqCst), 2);
    }
}
