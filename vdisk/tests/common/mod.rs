//! Helpers shared by the library's integration tests (`mod common;`): a seedable
//! random source, range merging and a byte comparison that names the first
//! difference.
#![allow(dead_code)] // each test file uses a different part

/// splitmix64: small, seedable, good enough for test inputs.
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `p` percent.
    pub fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.fill(&mut v);
        v
    }
}

/// Sorts `[start, end)` ranges and merges those that overlap or touch.
pub fn merge_ranges(mut r: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    r.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in r {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
}

/// Asserts `got == want` (a read of `got.len()` bytes at disk byte `offset`),
/// naming the first differing disk byte.
pub fn assert_same(got: &[u8], want: &[u8], offset: u64, ctx: &str) {
    assert_eq!(got.len(), want.len(), "{ctx}: lengths differ");
    if got != want {
        let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
        panic!(
            "{ctx}: content differs at disk byte {} (read of {} bytes at {offset}): got {:#04x}, expected {:#04x}",
            offset + i as u64,
            got.len(),
            got[i],
            want[i]
        );
    }
}

/// A new monolithicSparse disk of `capacity` bytes named `name` in `dir`, open for
/// writing; and its path.
pub fn new_sparse(
    dir: &std::path::Path,
    name: &str,
    capacity: u64,
) -> (std::path::PathBuf, vdisk::Disk) {
    let p = dir.join(name);
    vdisk::create(
        &p,
        &vdisk::CreateOptions::new(vdisk::DiskType::MonolithicSparse, capacity),
    )
    .unwrap();
    let d = vdisk::OpenOptions::new().write(true).open(&p).unwrap();
    (p, d)
}
