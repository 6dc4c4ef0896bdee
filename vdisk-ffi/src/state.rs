//! Library state behind the opaque C handles.
//!
//! A handle given to C is never a pointer to our memory: it encodes an ID (never
//! reused) that is looked up in a registry. A NULL, made-up, closed or stale handle
//! is simply not found and the call fails with an error - no dereference, no
//! undefined behaviour.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};

use vdisk::{Disk, OpenOptions, VirtualDisk};
use vdisk_nbd::client::{ClientOptions, Endpoint, RemoteDisk};

use crate::async_pool::{IoPool, Job, Span};
use crate::errors::{
    VIX_E_DISK_INVALID_CONNECTION, VIX_E_FAIL, VIX_E_INVALID_ARG, VIX_E_NOT_SUPPORTED,
};
use crate::types::VixError;
use crate::FfiError;

/// A registry of live objects by ID.
pub struct Registry<T> {
    next: u64,
    items: BTreeMap<u64, Arc<T>>,
}

impl<T> Registry<T> {
    const fn new() -> Registry<T> {
        Registry {
            next: 1,
            items: BTreeMap::new(),
        }
    }
}

/// Locks a registry, surviving poisoning (a panic elsewhere is already reported).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Handle values are `id << 4`: non-NULL, aligned, never dereferenced.
fn encode(id: u64) -> usize {
    (id << 4) as usize
}

fn decode(p: usize) -> Option<u64> {
    (p != 0 && p & 0xf == 0).then_some((p >> 4) as u64)
}

/// A connection: local files, or an NBD server (`serverName` given).
#[derive(Default)]
pub struct Connection {
    /// `readOnly` of ConnectEx.
    pub read_only: bool,
    /// The server, for remote connections.
    pub remote: Option<RemoteServer>,
}

/// Where a remote connection's disks are, and how to reach them.
pub struct RemoteServer {
    /// The server's address.
    pub endpoint: Endpoint,
    /// How to connect (TLS or not, pinned thumbprint, read-only).
    pub options: ClientOptions,
    /// The transport mode chosen at ConnectEx: `"nbdssl"` or `"nbd"`.
    pub mode: &'static str,
    /// The server as the client named it (for messages).
    pub name: String,
}

/// An open disk.
pub struct DiskHandle {
    /// The path it was opened with.
    pub path: PathBuf,
    /// The connection it belongs to.
    pub connection: u64,
    /// The `VIXDISKLIB_FLAG_OPEN_*` flags it was opened with (read-only added when
    /// the connection is read-only).
    pub flags: u32,
    /// How it was opened (to reopen it after shrink, defragment, attach).
    pub options: OpenOptions,
    /// The disk; None while a whole-file operation has it closed, or after Attach
    /// made this handle invalid (and always for remote disks).
    pub disk: RwLock<Option<Disk>>,
    /// The remote disk of a handle opened through a remote connection.
    pub remote: Option<RemoteHandle>,
    /// The threads of its asynchronous requests (local disks).
    pool: IoPool,
    /// Asynchronous operations queued and not yet completed.
    pending: Mutex<u64>,
    drained: Condvar,
}

/// A disk opened over the network.
pub struct RemoteHandle {
    /// The export.
    pub disk: RemoteDisk,
    /// Its transport mode: `"nbdssl"` or `"nbd"`.
    pub mode: &'static str,
}

/// A raw pointer moved to the I/O thread (the client keeps the buffer valid until
/// the completion callback, as VDDK requires).
pub struct SendPtr(pub usize);

impl DiskHandle {
    /// A handle for `disk`, opened with VDDK open `flags`.
    pub fn new(
        path: PathBuf,
        connection: u64,
        flags: u32,
        options: OpenOptions,
        disk: Disk,
    ) -> DiskHandle {
        DiskHandle {
            path,
            connection,
            flags,
            options,
            disk: RwLock::new(Some(disk)),
            remote: None,
            pool: IoPool::default(),
            pending: Mutex::new(0),
            drained: Condvar::new(),
        }
    }

    /// A handle for a remote disk, opened with VDDK open `flags`.
    pub fn new_remote(
        path: PathBuf,
        connection: u64,
        flags: u32,
        remote: RemoteHandle,
    ) -> DiskHandle {
        DiskHandle {
            path,
            connection,
            flags,
            options: OpenOptions::new(),
            disk: RwLock::new(None),
            remote: Some(remote),
            pool: IoPool::default(),
            pending: Mutex::new(0),
            drained: Condvar::new(),
        }
    }

    /// Runs `f` with the disk, local or remote, for what both can do (I/O, maps,
    /// changed areas).
    pub fn with_virtual<R>(
        &self,
        f: impl FnOnce(&dyn VirtualDisk) -> Result<R, FfiError>,
    ) -> Result<R, FfiError> {
        if let Some(r) = &self.remote {
            return f(&r.disk);
        }
        self.with_disk(|d| f(d))
    }

    /// Runs `f` with the open disk.
    pub fn with_disk<R>(
        &self,
        f: impl FnOnce(&Disk) -> Result<R, FfiError>,
    ) -> Result<R, FfiError> {
        if let Some(r) = &self.remote {
            return Err(FfiError::new(
                VIX_E_NOT_SUPPORTED,
                format!(
                    "{} is a remote disk (transport {}): this operation needs the disk's \
                     files and works only on local disks",
                    self.path.display(),
                    r.mode
                ),
            ));
        }
        let guard = self.disk.read().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref() {
            Some(d) => f(d),
            None => Err(FfiError::new(
                VIX_E_INVALID_ARG,
                "the disk handle is no longer valid (closed or attached to a child)",
            )),
        }
    }

    /// Queues `job`, which touches `span`, on the handle's I/O threads.
    pub fn submit(&self, span: Span, job: Job) -> Result<(), FfiError> {
        *lock(&self.pending) += 1;
        if let Err(e) = self.pool.submit(span, job) {
            self.complete_one();
            return Err(FfiError::new(
                VIX_E_FAIL,
                format!("cannot start an I/O thread: {e}"),
            ));
        }
        Ok(())
    }

    /// Counts one operation queued elsewhere (a remote request in flight).
    pub fn begin_one(&self) {
        *lock(&self.pending) += 1;
    }

    /// Marks one queued operation complete.
    pub fn complete_one(&self) {
        let mut p = lock(&self.pending);
        *p = p.saturating_sub(1);
        if *p == 0 {
            self.drained.notify_all();
        }
    }

    /// Waits until every queued operation has completed (callbacks delivered).
    pub fn wait(&self) {
        let mut p = lock(&self.pending);
        while *p > 0 {
            p = self.drained.wait(p).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Waits for queued work and stops the I/O threads.
    pub fn stop_worker(&self) {
        self.wait();
        self.pool.stop();
    }
}

static CONNECTIONS: Mutex<Registry<Connection>> = Mutex::new(Registry::new());
static DISKS: Mutex<Registry<DiskHandle>> = Mutex::new(Registry::new());

/// Registers a connection; returns its C handle value.
pub fn add_connection(c: Connection) -> usize {
    let mut r = lock(&CONNECTIONS);
    let id = r.next;
    r.next += 1;
    r.items.insert(id, Arc::new(c));
    encode(id)
}

/// The connection behind a C handle.
pub fn connection(p: usize) -> Result<(u64, Arc<Connection>), FfiError> {
    let id = decode(p).ok_or_else(invalid_connection)?;
    let r = lock(&CONNECTIONS);
    r.items
        .get(&id)
        .map(|c| (id, c.clone()))
        .ok_or_else(invalid_connection)
}

fn invalid_connection() -> FfiError {
    FfiError::new(
        VIX_E_DISK_INVALID_CONNECTION,
        "invalid connection handle (NULL, never connected, or disconnected)",
    )
}

/// Removes a connection and closes the disks opened through it.
pub fn remove_connection(p: usize) -> Result<(), FfiError> {
    let (id, _) = connection(p)?;
    lock(&CONNECTIONS).items.remove(&id);
    let handles: Vec<Arc<DiskHandle>> = {
        let mut r = lock(&DISKS);
        let ids: Vec<u64> = r
            .items
            .iter()
            .filter(|(_, h)| h.connection == id)
            .map(|(&k, _)| k)
            .collect();
        ids.iter().filter_map(|k| r.items.remove(k)).collect()
    };
    for h in handles {
        close_handle(&h);
    }
    Ok(())
}

/// Registers an open disk; returns its C handle value.
pub fn add_disk(h: DiskHandle) -> usize {
    let mut r = lock(&DISKS);
    let id = r.next;
    r.next += 1;
    r.items.insert(id, Arc::new(h));
    encode(id)
}

/// The disk behind a C handle.
pub fn disk(p: usize) -> Result<Arc<DiskHandle>, FfiError> {
    let id = decode(p).ok_or_else(invalid_handle)?;
    lock(&DISKS)
        .items
        .get(&id)
        .cloned()
        .ok_or_else(invalid_handle)
}

fn invalid_handle() -> FfiError {
    FfiError::new(
        VIX_E_INVALID_ARG,
        "invalid disk handle (NULL, never opened, or closed)",
    )
}

/// Unregisters a disk handle and returns it.
pub fn remove_disk(p: usize) -> Result<Arc<DiskHandle>, FfiError> {
    let id = decode(p).ok_or_else(invalid_handle)?;
    lock(&DISKS).items.remove(&id).ok_or_else(invalid_handle)
}

/// Stops a handle's I/O thread and closes its disk cleanly.
pub fn close_handle(h: &DiskHandle) -> VixError {
    h.stop_worker();
    let disk = h.disk.write().unwrap_or_else(|p| p.into_inner()).take();
    let closed = match (disk, &h.remote) {
        (Some(d), _) => d.close(),
        // The connections end when the handle's last reference goes; waiting for
        // in-flight requests and flushing happened above and here.
        (None, Some(r)) if r.disk.is_writable() => r.disk.flush(),
        (None, _) => Ok(()),
    };
    match closed {
        Err(e) => {
            crate::log::warn(&format!("VixDiskLib: closing {}: {e}", h.path.display()));
            e.kind().vix_code()
        }
        Ok(()) => crate::errors::VIX_OK,
    }
}

/// Closes everything (`Exit`): no library thread survives.
pub fn close_all() {
    let handles: Vec<Arc<DiskHandle>> = std::mem::take(&mut lock(&DISKS).items)
        .into_values()
        .collect();
    for h in handles {
        close_handle(&h);
    }
    lock(&CONNECTIONS).items.clear();
}
