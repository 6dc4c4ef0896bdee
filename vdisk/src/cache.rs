//! The grain-table cache: a bounded map from grain-directory index to the table's
//! entries, least-recently-used eviction, and dirty tracking so that tables are
//! written back in crash-consistent order by their owner.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// The hash of a directory index: one multiplication (Fibonacci hashing). The map
/// walk asks the cache about every table of a disk it passes (262,144 for an
/// empty 8 TB disk); SipHash was a quarter of that walk's time.
#[derive(Default)]
struct IndexHasher(u64);

impl Hasher for IndexHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0 ^ i).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// One cached grain table (entries `u32` for hosted sparse and COWD, `u64` for
/// seSparse).
#[derive(Debug)]
pub struct CachedTable<E = u32> {
    /// The table's entries (sector numbers, or special values of the format).
    pub entries: Vec<E>,
    /// Whether the entries differ from what is on disk.
    pub dirty: bool,
    last_used: u64,
}

/// A bounded LRU cache of grain tables.
#[derive(Debug)]
pub struct GtCache<E = u32> {
    capacity: usize,
    tables: HashMap<u64, CachedTable<E>, BuildHasherDefault<IndexHasher>>,
    tick: u64,
}

impl<E> GtCache<E> {
    /// A cache holding at most `capacity` tables (at least one).
    pub fn new(capacity: usize) -> GtCache<E> {
        GtCache {
            capacity: capacity.max(1),
            tables: HashMap::default(),
            tick: 0,
        }
    }

    fn touch(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// The table at directory index `index`, if cached (marks it recently used).
    pub fn get(&mut self, index: u64) -> Option<&mut CachedTable<E>> {
        let t = self.touch();
        let table = self.tables.get_mut(&index)?;
        table.last_used = t;
        Some(table)
    }

    /// Whether the table is cached.
    pub fn contains(&self, index: u64) -> bool {
        !self.tables.is_empty() && self.tables.contains_key(&index)
    }

    /// Removes and returns the least recently used table if the cache is full, so
    /// that the caller can write it back (if dirty) before inserting another.
    pub fn evict_if_full(&mut self) -> Option<(u64, CachedTable<E>)> {
        if self.tables.len() < self.capacity {
            return None;
        }
        let (&victim, _) = self.tables.iter().min_by_key(|(_, t)| t.last_used)?;
        self.tables.remove(&victim).map(|t| (victim, t))
    }

    /// Inserts a table; call [`GtCache::evict_if_full`] first.
    pub fn insert(&mut self, index: u64, entries: Vec<E>, dirty: bool) -> &mut CachedTable<E> {
        let last_used = self.touch();
        self.tables.insert(
            index,
            CachedTable {
                entries,
                dirty,
                last_used,
            },
        );
        self.tables
            .get_mut(&index)
            .unwrap_or_else(|| unreachable!("table just inserted"))
    }

    /// Indexes of the dirty tables, ascending.
    pub fn dirty_indexes(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .tables
            .iter()
            .filter(|(_, t)| t.dirty)
            .map(|(&i, _)| i)
            .collect();
        v.sort_unstable();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used() {
        let mut c: GtCache = GtCache::new(2);
        c.insert(1, vec![1], false);
        c.insert(2, vec![2], true);
        c.get(1);
        let (idx, t) = c.evict_if_full().unwrap();
        assert_eq!(idx, 2);
        assert!(t.dirty);
        assert!(c.evict_if_full().is_none());
        assert!(c.contains(1));
    }

    #[test]
    fn dirty_indexes_are_sorted() {
        let mut c: GtCache = GtCache::new(8);
        c.insert(5, vec![], true);
        c.insert(1, vec![], true);
        c.insert(3, vec![], false);
        assert_eq!(c.dirty_indexes(), vec![1, 5]);
    }
}
