//! The grain-table engine: one implementation of everything an extent does whose
//! data lives in grains found through a directory of grain tables - hosted sparse
//! and COWD files ([`crate::extent::sparse`]) and seSparse files
//! ([`crate::extent::sesparse`]).
//!
//! The engine owns the state lock, the bounded table cache, the map walk, the write
//! path (claims, zero marks, new grains) and the crash-ordered flush. A format
//! ([`GrainFormat`]) answers what only it knows: where a table lives, what an entry
//! means, where new grains and tables go, and how its directories and headers are
//! written back. See `ARCHITECTURE.md` ("Write path") for the protocol.

mod write;

use std::collections::HashSet;
use std::fmt::Debug;
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::cache::GtCache;
use crate::error::{Error, ErrorKind, Result};
use crate::extent::ExtentMapping;
use crate::limits::GT_CACHE_BYTES;
use crate::storage::Storage;

/// What a grain table entry says about one grain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrainState {
    /// Not stored here: ask the parent.
    Unallocated,
    /// Reads as zeros, hides the parent.
    Zero,
    /// Data at this byte offset in the file.
    Data(u64),
}

/// A grain table entry as stored: little-endian `u32` (hosted sparse, COWD) or `u64`
/// (seSparse). The default value is "unallocated" in every format.
pub trait TableEntry: Copy + Eq + Default + Debug + Send + Sync + 'static {
    /// Bytes per entry.
    const BYTES: usize;
    /// Decodes one entry from its `BYTES` little-endian bytes.
    fn from_le(bytes: &[u8]) -> Self;
    /// Appends the entry's little-endian bytes.
    fn put_le(self, out: &mut Vec<u8>);
}

impl TableEntry for u32 {
    const BYTES: usize = 4;
    fn from_le(b: &[u8]) -> u32 {
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
    fn put_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

impl TableEntry for u64 {
    const BYTES: usize = 8;
    fn from_le(b: &[u8]) -> u64 {
        u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
    }
    fn put_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

/// Decodes the first `count` entries of a table's bytes.
pub fn parse_entries<E: TableEntry>(bytes: &[u8], count: usize) -> Vec<E> {
    bytes
        .chunks_exact(E::BYTES)
        .take(count)
        .map(E::from_le)
        .collect()
}

/// The bytes of `entries`, zero-padded to at least `pad_to` bytes.
pub fn entries_bytes<E: TableEntry>(entries: &[E], pad_to: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(pad_to.max(entries.len() * E::BYTES));
    for &e in entries {
        e.put_le(&mut out);
    }
    out.resize(pad_to.max(out.len()), 0);
    out
}

/// The fixed shape of a grain-table extent.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    /// Bytes per grain.
    pub grain_bytes: u64,
    /// Bytes the extent holds.
    pub capacity_bytes: u64,
    /// Entries per grain table.
    pub entries_per_table: u64,
}

impl Geometry {
    /// Bytes of one grain table.
    fn table_bytes<E: TableEntry>(&self) -> u64 {
        self.entries_per_table * E::BYTES as u64
    }
}

/// Writes metadata in crash order: every write is followed, before anything that
/// depends on it, by [`MetaWriter::barrier`], which syncs what was written so far.
pub struct MetaWriter<'a> {
    storage: &'a dyn Storage,
    name: &'a str,
    unsynced: &'a mut bool,
}

impl MetaWriter<'_> {
    /// Writes `bytes` at byte `at` of the file; `what` names it in errors.
    pub fn write(&mut self, bytes: &[u8], at: u64, what: &str) -> Result<()> {
        self.storage
            .write_all_at(bytes, at)
            .map_err(|e| Error::io(format!("{}: cannot write {what}", self.name), e))?;
        *self.unsynced = true;
        Ok(())
    }

    /// Makes everything written so far durable (a no-op if nothing is pending).
    pub fn barrier(&mut self) -> Result<()> {
        if *self.unsynced {
            self.storage
                .sync()
                .map_err(|e| Error::io(format!("{}: sync failed", self.name), e))?;
            *self.unsynced = false;
        }
        Ok(())
    }
}

/// What a format knows about its own file. Every method runs under the engine's
/// lock with the format's metadata (`Meta`: directories, headers, allocation
/// cursors); none does data I/O.
pub trait GrainFormat: Debug + Send + Sync + Sized {
    /// How an entry is stored.
    type Entry: TableEntry;
    /// The format's mutable metadata, kept under the engine's lock.
    type Meta: Debug + Send;

    /// Byte offset in the file of grain table `index`, `None` if the directory
    /// has no table there (all its grains unallocated).
    fn table_offset(&self, meta: &Meta<Self>, index: u64) -> Option<u64>;

    /// Whether table `index` (at `at`, `len` bytes) is known to hold only
    /// unallocated entries without being read (a table in a hole of the file).
    fn table_known_empty(
        &self,
        _meta: &mut Meta<Self>,
        _storage: &dyn Storage,
        _at: u64,
        _len: u64,
    ) -> bool {
        false
    }

    /// Writes table `index` (its bytes) everywhere the format keeps it.
    fn write_table(
        &self,
        meta: &mut Meta<Self>,
        out: &mut MetaWriter<'_>,
        index: u64,
        bytes: &[u8],
    ) -> Result<()>;

    /// Gives directory entry `index` a new table: reserves its place and marks the
    /// directory for [`GrainFormat::flush_metadata`]. Returns the end of the file
    /// the new table (and any copy) reaches.
    fn allocate_table(&self, meta: &mut Meta<Self>, index: u64) -> Result<u64>;

    /// What `entry`, the entry of `grain`, says, checked (data inside the file
    /// of `file_len` bytes and clear of metadata).
    fn decode(
        &self,
        meta: &mut Meta<Self>,
        grain: u64,
        entry: Self::Entry,
        file_len: u64,
    ) -> Result<GrainState>;

    /// Whether `entry` reads as zeros (a cheap test for the map's table scans).
    fn is_zero_entry(&self, entry: Self::Entry) -> bool;

    /// The entry that marks a grain zeroed, `None` if the format has none. The
    /// format may change its header first (written and synced through `out`).
    fn zero_entry(
        &self,
        meta: &mut Meta<Self>,
        out: &mut MetaWriter<'_>,
    ) -> Result<Option<Self::Entry>>;

    /// Reserves room for `n` consecutive new grains; returns the byte offset of
    /// the first.
    fn reserve_grains(&self, meta: &mut Meta<Self>, n: u64) -> Result<u64>;

    /// The entry of a grain stored at byte `file_offset`.
    fn data_entry(&self, file_offset: u64) -> Result<Self::Entry>;

    /// Opens and checks a file of this format (headers, layout, directories) on
    /// `storage`; `name` is used in error messages.
    fn open(storage: Box<dyn Storage>, name: &str, writable: bool) -> Result<GrainEngine<Self>>;

    /// Writes back the metadata above the tables that changed (directories,
    /// headers), with a barrier before each step that depends on the last. The
    /// dirty tables are written and synced before this is called.
    fn flush_metadata(&self, meta: &mut Meta<Self>, out: &mut MetaWriter<'_>) -> Result<()>;
}

/// The format's metadata type (shorthand).
pub type Meta<F> = <F as GrainFormat>::Meta;

/// Everything the engine keeps under its lock.
#[derive(Debug)]
pub struct State<F: GrainFormat> {
    /// The format's metadata.
    pub meta: F::Meta,
    cache: GtCache<F::Entry>,
    /// Bytes known to be in the file (grows as grains and tables are written).
    file_len: u64,
    /// Something was written since the last sync.
    unsynced: bool,
    /// Grains being allocated by a writer right now (their data is in flight).
    inflight: HashSet<u64>,
}

/// An open grain-table extent of format `F`.
#[derive(Debug)]
pub struct GrainEngine<F: GrainFormat> {
    storage: Box<dyn Storage>,
    name: String,
    writable: bool,
    format: F,
    geo: Geometry,
    state: Mutex<State<F>>,
    /// Signalled when in-flight grain allocations complete.
    allocated: Condvar,
}

impl<F: GrainFormat> GrainEngine<F> {
    /// An engine over `storage` (`file_len` bytes long), the format and its
    /// metadata already read and checked.
    pub(crate) fn new(
        storage: Box<dyn Storage>,
        name: &str,
        writable: bool,
        format: F,
        meta: F::Meta,
        geo: Geometry,
        file_len: u64,
    ) -> GrainEngine<F> {
        let tables = (GT_CACHE_BYTES as u64 / geo.table_bytes::<F::Entry>().max(1)) as usize;
        GrainEngine {
            storage,
            name: name.to_string(),
            writable,
            format,
            geo,
            state: Mutex::new(State {
                meta,
                cache: GtCache::new(tables),
                file_len,
                unsynced: false,
                inflight: HashSet::new(),
            }),
            allocated: Condvar::new(),
        }
    }

    /// Opens an extent of format `F` on an already opened (and locked) file.
    pub fn open(storage: crate::storage::FileStorage, writable: bool) -> Result<GrainEngine<F>> {
        let name = storage.path().display().to_string();
        Self::open_storage(Box::new(storage), &name, writable)
    }

    /// Opens an extent of format `F` on any [`Storage`] (an in-memory file in tests
    /// and fuzzing); `name` is used in error messages, which name it too.
    pub fn open_storage(
        storage: Box<dyn Storage>,
        name: &str,
        writable: bool,
    ) -> Result<GrainEngine<F>> {
        F::open(storage, name, writable).map_err(|e| e.within(name))
    }

    /// The file, for what a format does beside the engine (descriptors, headers).
    pub(crate) fn storage(&self) -> &dyn Storage {
        &*self.storage
    }

    /// The name used in messages (the file's path).
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Whether the extent was opened for writing.
    pub(crate) fn writable(&self) -> bool {
        self.writable
    }

    /// Runs `f` on the format's metadata under the lock, with a writer for
    /// metadata writes (a format's own header updates).
    pub(crate) fn with_meta<T>(
        &self,
        f: impl FnOnce(&mut F::Meta, &mut MetaWriter<'_>) -> Result<T>,
    ) -> Result<T> {
        let mut st = self.lock()?;
        let State { meta, unsynced, .. } = &mut *st;
        let mut out = MetaWriter {
            storage: &*self.storage,
            name: &self.name,
            unsynced,
        };
        f(meta, &mut out)
    }

    fn lock(&self) -> Result<MutexGuard<'_, State<F>>> {
        self.state.lock().map_err(|_| {
            Error::new(
                ErrorKind::Fail,
                format!("{}: extent state poisoned by a panic", self.name),
            )
        })
    }

    /// The extent's capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.geo.capacity_bytes
    }

    /// Bytes per grain.
    pub fn grain_bytes(&self) -> u64 {
        self.geo.grain_bytes
    }

    /// Size of the extent file in bytes.
    pub fn file_len(&self) -> Result<u64> {
        Ok(self.lock()?.file_len)
    }

    /// The host file descriptor of the extent's file, if it is one.
    pub(crate) fn fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.storage.fd()
    }

    /// Reads file bytes at `file_offset` (as given by [`GrainEngine::map`]).
    pub fn read_data(&self, file_offset: u64, buf: &mut [u8]) -> Result<()> {
        self.storage
            .read_exact_at(buf, file_offset)
            .map_err(|e| Error::io(format!("{}: read failed", self.name), e))
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.geo.capacity_bytes => Ok(()),
            _ => Err(Error::new(
                ErrorKind::OutOfRange,
                format!(
                    "{}: {len} bytes at offset {offset} lie beyond the extent's {} bytes",
                    self.name, self.geo.capacity_bytes
                ),
            )),
        }
    }

    /// A metadata writer over the state's sync flag.
    fn writer<'a>(&'a self, unsynced: &'a mut bool) -> MetaWriter<'a> {
        MetaWriter {
            storage: &*self.storage,
            name: &self.name,
            unsynced,
        }
    }

    /// Writes table `index` through the format.
    fn write_table(&self, st: &mut State<F>, index: u64, entries: &[F::Entry]) -> Result<()> {
        let bytes = entries_bytes(entries, self.geo.table_bytes::<F::Entry>() as usize);
        let State { meta, unsynced, .. } = st;
        self.format
            .write_table(meta, &mut self.writer(unsynced), index, &bytes)
    }

    /// Evicts a table if the cache is full, writing it back first if it is dirty
    /// (the data its entries point at synced before).
    fn make_room(&self, st: &mut State<F>) -> Result<()> {
        if let Some((index, table)) = st.cache.evict_if_full() {
            if table.dirty {
                self.writer(&mut st.unsynced).barrier()?;
                self.write_table(st, index, &table.entries)?;
            }
        }
        Ok(())
    }

    /// Whether grain table `index` is known to be all unallocated without reading
    /// it: no directory entry, or what the format knows (a table in a file hole).
    fn table_is_empty(&self, st: &mut State<F>, index: u64) -> bool {
        let Some(at) = self.format.table_offset(&st.meta, index) else {
            return true;
        };
        if st.cache.contains(index) {
            return false;
        }
        let len = self.geo.table_bytes::<F::Entry>();
        self.format
            .table_known_empty(&mut st.meta, &*self.storage, at, len)
    }

    /// Loads grain table `index` into the cache if the directory has it; returns
    /// whether it does.
    fn ensure_table(&self, st: &mut State<F>, index: u64) -> Result<bool> {
        if st.cache.contains(index) {
            return Ok(true);
        }
        let Some(at) = self.format.table_offset(&st.meta, index) else {
            return Ok(false);
        };
        let mut buf = vec![0u8; self.geo.table_bytes::<F::Entry>() as usize];
        self.storage
            .read_exact_at(&mut buf, at)
            .map_err(|e| Error::io(format!("{}: cannot read grain table {index}", self.name), e))?;
        let entries = parse_entries(&buf, self.geo.entries_per_table as usize);
        self.make_room(st)?;
        st.cache.insert(index, entries, false);
        Ok(true)
    }

    /// Gives directory entry `index` a new, empty table (dirty in the cache).
    fn allocate_table(&self, st: &mut State<F>, index: u64) -> Result<()> {
        let end = self.format.allocate_table(&mut st.meta, index)?;
        st.file_len = st.file_len.max(end);
        self.make_room(st)?;
        st.cache.insert(
            index,
            vec![F::Entry::default(); self.geo.entries_per_table as usize],
            true,
        );
        Ok(())
    }

    /// The cached table `index`, loaded (or allocated) first.
    fn table_for_update(&self, st: &mut State<F>, index: u64) -> Result<()> {
        if !self.ensure_table(st, index)? {
            self.allocate_table(st, index)?;
        }
        Ok(())
    }

    /// Sets the entry of `grain` (its table loaded or allocated first).
    fn set_entry(&self, st: &mut State<F>, grain: u64, entry: F::Entry) -> Result<()> {
        let index = grain / self.geo.entries_per_table;
        self.table_for_update(st, index)?;
        let Some(t) = st.cache.get(index) else {
            return Err(Error::new(
                ErrorKind::Fail,
                "grain table vanished from the cache",
            ));
        };
        t.entries[(grain % self.geo.entries_per_table) as usize] = entry;
        t.dirty = true;
        Ok(())
    }

    /// Classifies grain `grain` (index within the extent).
    fn grain_state(&self, st: &mut State<F>, grain: u64) -> Result<GrainState> {
        let index = grain / self.geo.entries_per_table;
        if self.table_is_empty(st, index) || !self.ensure_table(st, index)? {
            return Ok(GrainState::Unallocated);
        }
        let entry = match st.cache.get(index) {
            Some(t) => t.entries[(grain % self.geo.entries_per_table) as usize],
            None => return Err(Error::new(ErrorKind::Fail, "grain table left the cache")),
        };
        let State { meta, file_len, .. } = st;
        self.format.decode(meta, grain, entry, *file_len)
    }

    /// Where the range starting at `offset` (bytes within the extent, below its
    /// capacity) lives, and for how many bytes (at most `len`, clipped to the
    /// capacity) that answer holds. Data is followed grain by grain (each entry
    /// checked; grains contiguous in the file coalesced); a run of unallocated or
    /// zeroed grains a table at a time: skipped whole where the table is known
    /// empty, else scanned as a slice of its entries (the entry that ends the run
    /// is checked too).
    pub fn map(&self, offset: u64, len: u64) -> Result<(ExtentMapping, u64)> {
        if offset >= self.geo.capacity_bytes {
            return Err(Error::new(
                ErrorKind::OutOfRange,
                format!(
                    "{}: offset {offset} is beyond the extent's {} bytes",
                    self.name, self.geo.capacity_bytes
                ),
            ));
        }
        let mut st = self.lock()?;
        let g = self.geo.grain_bytes;
        let per_table = self.geo.entries_per_table;
        let end = offset + len.min(self.geo.capacity_bytes - offset);
        let first_grain = offset / g;
        let first = self.grain_state(&mut st, first_grain)?;
        let end_grain = end.div_ceil(g);
        let mut grain = first_grain + 1;
        while grain < end_grain {
            if let GrainState::Data(a) = first {
                match self.grain_state(&mut st, grain)? {
                    GrainState::Data(b) if b == a + (grain - first_grain) * g => {
                        grain += 1;
                        continue;
                    }
                    _ => break,
                }
            }
            let index = grain / per_table;
            let table_end = ((index + 1) * per_table).min(end_grain);
            if self.table_is_empty(&mut st, index) || !self.ensure_table(&mut st, index)? {
                if first != GrainState::Unallocated {
                    break;
                }
                grain = table_end;
                continue;
            }
            let base = index * per_table;
            let Some(table) = st.cache.get(index) else {
                break;
            };
            let from = (grain - base) as usize;
            let to = (table_end - base) as usize;
            let differs = |&e: &F::Entry| match first {
                GrainState::Unallocated => e != F::Entry::default(),
                _ => !self.format.is_zero_entry(e),
            };
            match table.entries[from..to].iter().position(differs) {
                Some(d) => {
                    grain += d as u64;
                    // The entry that ends the run is checked now: a hostile one
                    // fails the map that reaches it.
                    self.grain_state(&mut st, grain)?;
                    break;
                }
                None => grain = table_end,
            }
        }
        let covered = (grain * g).min(end) - offset;
        let mapping = match first {
            GrainState::Unallocated => ExtentMapping::Unallocated,
            GrainState::Zero => ExtentMapping::Zero,
            GrainState::Data(o) => ExtentMapping::Data {
                file_offset: o + (offset - first_grain * g),
            },
        };
        Ok((mapping, covered))
    }

    /// Writes back dirty metadata in crash-consistent order and syncs: grain data,
    /// grain tables, then the format's directories and headers.
    pub fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut st = self.lock()?;
        let dirty = st.cache.dirty_indexes();
        if !dirty.is_empty() {
            self.writer(&mut st.unsynced).barrier()?;
            for index in dirty {
                let Some(entries) = st.cache.get(index).map(|t| {
                    t.dirty = false;
                    t.entries.clone()
                }) else {
                    continue;
                };
                self.write_table(&mut st, index, &entries)?;
            }
        }
        let State { meta, unsynced, .. } = &mut *st;
        let mut out = self.writer(unsynced);
        out.barrier()?;
        self.format.flush_metadata(meta, &mut out)?;
        out.barrier()
    }
}
