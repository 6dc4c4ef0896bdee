//! The body of the `partitions` fuzz target (`fuzz/fuzz_targets/partitions.rs`),
//! here so that the test replaying its corpus (`tests/fuzz_replay.rs`) runs exactly
//! the code the fuzzer ran.
//!
//! A disk is given as a sparse image, so that a small input can describe a large
//! disk with tables at both ends and file systems in between:
//!
//! ```text
//! flags: u8          bit 0: recompute the GPT CRCs (header and entry array) of both
//!                    headers before reading, so mutations get past the checksums
//! size: u64 LE       the disk's size in bytes (any value)
//! chunks, to the end of the input:
//!   offset: u64 LE, length: u16 LE, length bytes   (later chunks win)
//! ```
//!
//! Bytes no chunk covers read as zeros.

use crate::limits::{MAX_GPT_ENTRY_ARRAY, SECTOR_SIZE};
use crate::source::check_range;
use crate::{detect_filesystem, read_partitions, BlockSource, PartError, PartitionTable};

/// Input flag: recompute the GPT checksums.
pub const FIX_GPT_CRCS: u8 = 1;

/// A disk of `size` bytes holding `chunks` (offset, bytes), zeros elsewhere.
#[derive(Debug, Default)]
pub struct SparseImage {
    /// The disk's size in bytes.
    pub size: u64,
    /// (offset, bytes) in input order; later chunks win where they overlap.
    pub chunks: Vec<(u64, Vec<u8>)>,
}

impl SparseImage {
    /// Decodes an input (see the module documentation); returns the flags too. A
    /// truncated last chunk keeps the bytes there are.
    pub fn decode(data: &[u8]) -> (u8, SparseImage) {
        let flags = data.first().copied().unwrap_or(0);
        let mut img = SparseImage::default();
        let Some(size) = data.get(1..9) else {
            return (flags, img);
        };
        img.size = u64::from_le_bytes(size.try_into().expect("8 bytes"));
        let mut rest = &data[9..];
        while rest.len() >= 10 {
            let offset = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
            let len = usize::from(u16::from_le_bytes([rest[8], rest[9]]));
            let body = &rest[10..];
            let len = len.min(body.len());
            img.chunks.push((offset, body[..len].to_vec()));
            rest = &body[len..];
        }
        (flags, img)
    }

    /// Encodes an image (chunks longer than 65535 bytes are split).
    pub fn encode(&self, flags: u8) -> Vec<u8> {
        let mut out = vec![flags];
        out.extend_from_slice(&self.size.to_le_bytes());
        for (offset, bytes) in &self.chunks {
            for (i, piece) in bytes.chunks(usize::from(u16::MAX)).enumerate() {
                out.extend_from_slice(&(offset + (i * usize::from(u16::MAX)) as u64).to_le_bytes());
                out.extend_from_slice(&(piece.len() as u16).to_le_bytes());
                out.extend_from_slice(piece);
            }
        }
        out
    }

    /// The non-zero sectors of `image` inside the given byte ranges, as chunks.
    pub fn from_raw(image: &[u8], keep: &[(u64, u64)]) -> SparseImage {
        let mut img = SparseImage {
            size: image.len() as u64,
            chunks: Vec::new(),
        };
        let sector = SECTOR_SIZE as usize;
        for (lba, s) in image.chunks(sector).enumerate() {
            let at = (lba * sector) as u64;
            if s.iter().all(|&b| b == 0) || !keep.iter().any(|&(a, b)| a <= at && at < b) {
                continue;
            }
            match img.chunks.last_mut() {
                Some((o, bytes)) if *o + bytes.len() as u64 == at => bytes.extend_from_slice(s),
                _ => img.chunks.push((at, s.to_vec())),
            }
        }
        img
    }

    /// Replaces `len` bytes at `offset` (as one more chunk).
    fn put(&mut self, offset: u64, bytes: Vec<u8>) {
        self.chunks.push((offset, bytes));
    }

    /// Recomputes the CRCs of the GPT headers at LBA 1 and at the last LBA, when they
    /// have the signature and their fields make an entry array that can be read.
    fn fix_gpt_crcs(&mut self) {
        let Some(last_lba) = (self.size / SECTOR_SIZE).checked_sub(1) else {
            return;
        };
        for lba in [1, last_lba] {
            let mut h = vec![0u8; SECTOR_SIZE as usize];
            if BlockSource::read_at(self, &mut h, lba * SECTOR_SIZE).is_err()
                || &h[..8] != b"EFI PART"
            {
                continue;
            }
            let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
            let entries_lba = u64::from_le_bytes(h[72..80].try_into().expect("8 bytes"));
            let bytes = u64::from(u32_at(&h, 80)) * u64::from(u32_at(&h, 84));
            if bytes <= MAX_GPT_ENTRY_ARRAY {
                let mut entries = vec![0u8; bytes as usize];
                let read = entries_lba
                    .checked_mul(SECTOR_SIZE)
                    .is_some_and(|at| BlockSource::read_at(self, &mut entries, at).is_ok());
                if read {
                    h[88..92].copy_from_slice(&crc32fast::hash(&entries).to_le_bytes());
                }
            }
            let size = (u32_at(&h, 12) as usize).clamp(92, SECTOR_SIZE as usize);
            h[16..20].fill(0);
            let crc = crc32fast::hash(&h[..size]);
            h[16..20].copy_from_slice(&crc.to_le_bytes());
            self.put(lba * SECTOR_SIZE, h);
        }
    }
}

impl BlockSource for SparseImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), PartError> {
        check_range(offset, buf.len(), self.size)?;
        buf.fill(0);
        let end = offset + buf.len() as u64;
        for (at, bytes) in &self.chunks {
            let (a, b) = (*at, at.saturating_add(bytes.len() as u64));
            if b <= offset || end <= a {
                continue;
            }
            let from = a.max(offset);
            let to = b.min(end);
            let src = &bytes[(from - a) as usize..(to - a) as usize];
            buf[(from - offset) as usize..(to - offset) as usize].copy_from_slice(src);
        }
        Ok(())
    }
}

/// Reads the partition table of the disk the input describes (and so detects the
/// file system of every partition), then detects a file system on the whole disk.
pub fn partitions(data: &[u8]) -> Result<PartitionTable, PartError> {
    let (flags, mut img) = SparseImage::decode(data);
    if flags & FIX_GPT_CRCS != 0 {
        img.fix_gpt_crcs();
    }
    let table = read_partitions(&img)?;
    for p in &table.partitions {
        assert!(
            p.filesystem.is_none() || !p.is_extended(),
            "an extended partition got a file system"
        );
    }
    let _ = detect_filesystem(&img, 0, img.size);
    Ok(table)
}
