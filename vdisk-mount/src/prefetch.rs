//! Read-ahead for sequential readers of a mount.
//!
//! With direct I/O a sequential reader (`dd`, `cp`, a backup agent) has one request
//! in flight: while the kernel copies a reply to it and it asks for the next piece,
//! nothing reads the disk files. The prefetcher fills that gap. When a request
//! starts where the previous one ended, a worker thread reads the next range of the
//! same size at once; if the next request asks for it, it is answered from there.
//!
//! Writes make prefetched data stale: every write bumps a generation before it
//! starts, and data read under an older generation is thrown away. Memory is
//! bounded: one range in flight or ready, and two spare buffers, each at most
//! [`MAX_PREFETCH`] bytes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// The largest range read ahead.
pub const MAX_PREFETCH: usize = 1 << 20;
/// Requests smaller than this are not read ahead (they are not a bulk reader's).
pub const MIN_PREFETCH: usize = 64 << 10;

/// Reads `buf.len()` bytes at an offset of the disk.
pub(crate) type ReadFn = dyn Fn(&mut [u8], u64) -> vdisk::Result<()> + Send + Sync;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Job {
    offset: u64,
    len: usize,
    generation: u64,
}

impl Job {
    fn covers(&self, offset: u64, len: usize) -> bool {
        offset >= self.offset
            && offset
                .checked_add(len as u64)
                .is_some_and(|end| end <= self.offset + self.len as u64)
    }
}

#[derive(Default)]
struct State {
    /// Asked for, not started.
    pending: Option<Job>,
    /// Being read by the worker.
    running: Option<Job>,
    /// Read: the job, its data, and whether the read succeeded.
    ready: Option<(Job, Vec<u8>, bool)>,
    /// Buffers to reuse.
    spare: Vec<Vec<u8>>,
    /// Where the last request ended (sequential detection).
    last_end: Option<u64>,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    generation: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The read-ahead of one mount.
pub(crate) struct Prefetcher {
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
}

/// Data answered from the prefetcher; give it back with [`Prefetcher::recycle`].
pub(crate) struct Hit {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl Hit {
    /// The requested bytes.
    pub(crate) fn data(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}

impl Prefetcher {
    /// Starts the worker, which reads with `read`. `None` if no thread can be started
    /// (reads then simply are not read ahead).
    pub(crate) fn start(read: Arc<ReadFn>) -> Option<Prefetcher> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            generation: AtomicU64::new(0),
        });
        let s = Arc::clone(&shared);
        let worker = std::thread::Builder::new()
            .name("vdisk-prefetch".into())
            .spawn(move || work(&s, &*read))
            .ok()?;
        Some(Prefetcher {
            shared,
            worker: Some(worker),
        })
    }

    /// Call before every change of the disk's content: prefetched data is stale.
    pub(crate) fn invalidate(&self) {
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// A read of `len` bytes at `offset` is starting. Returns the data if it was
    /// read ahead (waiting for a read ahead in progress), and, when the reader is
    /// sequential, has the range after this one read ahead.
    pub(crate) fn request(&self, offset: u64, len: usize) -> Option<Hit> {
        let generation = self.shared.generation.load(Ordering::SeqCst);
        let mut st = self.shared.lock();
        let mut hit = None;
        loop {
            if let Some((job, _, ok)) = &st.ready {
                if job.covers(offset, len) && job.generation == generation && *ok {
                    let (job, buf, _) = st.ready.take().expect("checked above");
                    hit = Some(Hit {
                        buf,
                        start: (offset - job.offset) as usize,
                        len,
                    });
                    break;
                }
            }
            let waiting = [st.pending, st.running]
                .iter()
                .flatten()
                .any(|j| j.covers(offset, len) && j.generation == generation);
            if !waiting || st.shutdown {
                break;
            }
            st = self.shared.wake.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        let end = offset + len as u64;
        let sequential = st.last_end == Some(offset);
        st.last_end = Some(end);
        // Whatever is ready and was not asked for is dropped.
        if let Some((_, buf, _)) = st.ready.take() {
            st.spare.push(buf);
        }
        if sequential && len >= MIN_PREFETCH {
            st.pending = Some(Job {
                offset: end,
                len: len.min(MAX_PREFETCH),
                generation,
            });
            self.shared.wake.notify_all();
        } else {
            st.pending = None;
        }
        hit
    }

    /// Gives a hit's buffer back for reuse.
    pub(crate) fn recycle(&self, hit: Hit) {
        let mut st = self.shared.lock();
        if st.spare.len() < 2 {
            st.spare.push(hit.buf);
        }
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.wake.notify_all();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

fn work(shared: &Shared, read: &ReadFn) {
    let mut st = shared.lock();
    loop {
        if st.shutdown {
            return;
        }
        let Some(job) = st.pending.take() else {
            st = shared.wake.wait(st).unwrap_or_else(|e| e.into_inner());
            continue;
        };
        st.running = Some(job);
        let mut buf = st.spare.pop().unwrap_or_default();
        drop(st);
        buf.resize(job.len, 0);
        // A failed read is not reported here: the request reads again and reports.
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            read(&mut buf, job.offset).is_ok()
        }))
        .unwrap_or(false);
        st = shared.lock();
        st.running = None;
        if let Some((_, old, _)) = st.ready.replace((job, buf, ok)) {
            st.spare.push(old);
        }
        shared.wake.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn fill(buf: &mut [u8], offset: u64) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = ((offset + i as u64) % 251) as u8;
        }
    }

    fn prefetcher(reads: Arc<AtomicUsize>) -> Prefetcher {
        Prefetcher::start(Arc::new(move |buf: &mut [u8], off: u64| {
            reads.fetch_add(1, Ordering::SeqCst);
            fill(buf, off);
            Ok(())
        }))
        .unwrap()
    }

    #[test]
    fn sequential_reads_are_answered_ahead() {
        let reads = Arc::new(AtomicUsize::new(0));
        let p = prefetcher(Arc::clone(&reads));
        let len = 128 << 10;
        // The second request shows the reader is sequential: from the third on, every
        // request is answered ahead.
        assert!(p.request(0, len).is_none());
        assert!(p.request(len as u64, len).is_none());
        let mut hits = 0;
        for i in 2..20u64 {
            let off = i * len as u64;
            match p.request(off, len) {
                Some(h) => {
                    let mut want = vec![0u8; len];
                    fill(&mut want, off);
                    assert!(h.data() == want.as_slice(), "wrong data at {off}");
                    hits += 1;
                    p.recycle(h);
                }
                None => panic!("sequential request at {off} missed"),
            }
        }
        assert_eq!(hits, 18);
        // One read ahead per request from the second on (the last may still run).
        let n = reads.load(Ordering::SeqCst);
        assert!((18..=19).contains(&n), "{n} reads ahead");
    }

    #[test]
    fn writes_and_jumps_are_not_answered_from_stale_data() {
        let reads = Arc::new(AtomicUsize::new(0));
        let p = prefetcher(Arc::clone(&reads));
        let len = 128 << 10;
        assert!(p.request(0, len).is_none());
        assert!(p.request(len as u64, len).is_none());
        assert!(p.request(2 * len as u64, len).is_some());
        // A write after the read ahead was asked for: the next range is not used.
        p.invalidate();
        assert!(p.request(3 * len as u64, len).is_none());
        // A jump: not sequential, nothing read ahead, nothing answered.
        assert!(p.request(100 * len as u64, len).is_none());
        assert!(p.request(7 * len as u64, len).is_none());
        // Small requests are not read ahead.
        assert!(p.request(0, 4096).is_none());
        assert!(p.request(4096, 4096).is_none());
    }
}
