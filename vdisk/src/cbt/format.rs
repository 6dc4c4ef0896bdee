//! The change-tracking sidecar file, as pure functions over bytes.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "VDISKCBT"
//!      8     4  version (1)
//!     12     4  flags: bit 0 = open for writing (set while a writer tracks, cleared
//!               at its clean close; found set = changes may have been lost);
//!               bit 1 = history invalid (the note says why)
//!     16     8  block size in bytes (a power of two, 4 KiB or more)
//!     24     8  capacity of the disk in bytes when last closed
//!     32    16  epoch: random id of this tracking history (change IDs name it)
//!     48     8  sequence number of the current (or last) write session
//!     56     4  CID of the tracked link when last closed cleanly
//!     60     4  reserved (0)
//!     64     8  fingerprint of the tracked link's files (names, sizes, mtimes)
//!     72     4  CRC-32 of the block map
//!     76     2  length of the reset note (bytes, at most 1024)
//!     78     2  reserved (0)
//!     80  1024  reset note: why the epoch last began (UTF-8)
//!   1104  2988  zero
//!   4092     4  CRC-32 of bytes 0..4092
//!   4096   4*N  block map: for each block, the sequence number of the session that
//!               last wrote it (0 = not written since tracking began), u32 LE
//! ```
//!
//! All integers are little-endian.

use crate::error::{Error, ErrorKind, Result};
use crate::limits::{MAX_CAPACITY_SECTORS, MAX_CBT_BLOCKS, MIN_CBT_BLOCK, SECTOR_SIZE};

/// The file's first 8 bytes.
pub const MAGIC: &[u8; 8] = b"VDISKCBT";
/// The format version written.
pub const VERSION: u32 = 1;
/// Size of the header; the block map follows it.
pub const HEADER_BYTES: usize = 4096;
/// `flags` bit: a writer has the disk open.
pub const FLAG_OPEN: u32 = 1;
/// `flags` bit: the history cannot be trusted (the note says why); set on a history
/// passed on to a new child while it was already invalid.
pub const FLAG_INVALID: u32 = 2;
/// The longest reset note kept.
pub const MAX_NOTE: usize = 1024;

/// The header of a sidecar file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CbtHeader {
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Bytes per tracked block.
    pub block_size: u64,
    /// Disk capacity in bytes.
    pub capacity: u64,
    /// The tracking history's random id.
    pub epoch: [u8; 16],
    /// The current (or last) write session.
    pub seq: u64,
    /// CID of the tracked link when last closed cleanly.
    pub disk_cid: u32,
    /// Fingerprint of the link's files when last closed cleanly.
    pub fingerprint: u64,
    /// Why the epoch began.
    pub note: String,
}

/// The block size used for a disk of `capacity` bytes: [`MIN_CBT_BLOCK`], doubled
/// until the map has at most [`MAX_CBT_BLOCKS`] entries.
pub fn block_size_for(capacity: u64) -> u64 {
    let mut bs = MIN_CBT_BLOCK;
    while capacity.div_ceil(bs) > MAX_CBT_BLOCKS {
        bs *= 2;
    }
    bs
}

/// Number of blocks of a map.
pub fn block_count(capacity: u64, block_size: u64) -> u64 {
    capacity.div_ceil(block_size)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Encodes a header and map into the file's bytes.
pub fn encode(h: &CbtHeader, map: &[u32]) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_BYTES + map.len() * 4];
    let (head, body) = out.split_at_mut(HEADER_BYTES);
    for (chunk, v) in body.chunks_exact_mut(4).zip(map) {
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    let map_crc = crc32fast::hash(body);
    head[0..8].copy_from_slice(MAGIC);
    head[8..12].copy_from_slice(&VERSION.to_le_bytes());
    head[12..16].copy_from_slice(&h.flags.to_le_bytes());
    head[16..24].copy_from_slice(&h.block_size.to_le_bytes());
    head[24..32].copy_from_slice(&h.capacity.to_le_bytes());
    head[32..48].copy_from_slice(&h.epoch);
    head[48..56].copy_from_slice(&h.seq.to_le_bytes());
    head[56..60].copy_from_slice(&h.disk_cid.to_le_bytes());
    head[64..72].copy_from_slice(&h.fingerprint.to_le_bytes());
    head[72..76].copy_from_slice(&map_crc.to_le_bytes());
    let note = truncate_utf8(&h.note, MAX_NOTE).as_bytes();
    head[76..78].copy_from_slice(&(note.len() as u16).to_le_bytes());
    head[80..80 + note.len()].copy_from_slice(note);
    let crc = crc32fast::hash(&head[..HEADER_BYTES - 4]);
    head[HEADER_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
    out
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn bad(what: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidDisk, what.into())
}

/// Decodes the header (the first [`HEADER_BYTES`] of the file), checking its CRC and
/// bounds. `file_len` is the length of the whole file, which must hold the map.
pub fn decode_header(head: &[u8], file_len: u64) -> Result<CbtHeader> {
    if head.len() < HEADER_BYTES || &head[0..8] != MAGIC {
        return Err(bad("not a vdisk change-tracking file (bad magic)"));
    }
    let version = u32_at(head, 8);
    if version != VERSION {
        return Err(bad(format!(
            "change-tracking file version {version} is not supported (only {VERSION})"
        )));
    }
    let crc = u32_at(head, HEADER_BYTES - 4);
    if crc32fast::hash(&head[..HEADER_BYTES - 4]) != crc {
        return Err(bad("change-tracking file header checksum mismatch"));
    }
    let block_size = u64_at(head, 16);
    let capacity = u64_at(head, 24);
    if !block_size.is_power_of_two() || !(MIN_CBT_BLOCK..=1 << 40).contains(&block_size) {
        return Err(bad(format!("bad change-tracking block size {block_size}")));
    }
    if capacity > MAX_CAPACITY_SECTORS * SECTOR_SIZE {
        return Err(bad(format!("bad change-tracking capacity {capacity}")));
    }
    let blocks = block_count(capacity, block_size);
    if blocks > MAX_CBT_BLOCKS {
        return Err(bad(format!(
            "change-tracking map of {blocks} blocks is larger than the limit {MAX_CBT_BLOCKS}"
        )));
    }
    let want = HEADER_BYTES as u64 + blocks * 4;
    if file_len != want {
        return Err(bad(format!(
            "change-tracking file is {file_len} bytes, its header says {want}"
        )));
    }
    let note_len = usize::from(u16::from_le_bytes([head[76], head[77]]));
    if note_len > MAX_NOTE {
        return Err(bad("change-tracking reset note is too long"));
    }
    let mut epoch = [0u8; 16];
    epoch.copy_from_slice(&head[32..48]);
    Ok(CbtHeader {
        flags: u32_at(head, 12),
        block_size,
        capacity,
        epoch,
        seq: u64_at(head, 48),
        disk_cid: u32_at(head, 56),
        fingerprint: u64_at(head, 64),
        note: String::from_utf8_lossy(&head[80..80 + note_len]).into_owned(),
    })
}

/// Decodes the block map that follows a header, checking its CRC.
pub fn decode_map(head: &[u8], body: &[u8]) -> Result<Vec<u32>> {
    if crc32fast::hash(body) != u32_at(head, 72) {
        return Err(bad("change-tracking block map checksum mismatch"));
    }
    Ok(body
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect())
}

/// A change ID: `EPOCH/SEQ` with the epoch as 32 hex digits.
pub fn change_id(epoch: &[u8; 16], seq: u64) -> String {
    let hex: String = epoch.iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}/{seq}")
}

/// Parses a change ID made by [`change_id`].
pub fn parse_change_id(id: &str) -> Option<([u8; 16], u64)> {
    let (hex, seq) = id.trim().split_once('/')?;
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut epoch = [0u8; 16];
    for (i, e) in epoch.iter_mut().enumerate() {
        *e = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some((epoch, seq.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> CbtHeader {
        CbtHeader {
            flags: FLAG_OPEN,
            block_size: 4096,
            capacity: 10 * 4096 + 1,
            epoch: [7; 16],
            seq: 42,
            disk_cid: 0xdead_beef,
            fingerprint: 99,
            note: "tracking enabled".into(),
        }
    }

    #[test]
    fn files_round_trip_and_damage_is_caught() {
        let h = header();
        let map: Vec<u32> = (0..11).collect();
        let bytes = encode(&h, &map);
        assert_eq!(bytes.len(), HEADER_BYTES + 44);
        let got = decode_header(&bytes[..HEADER_BYTES], bytes.len() as u64).unwrap();
        assert_eq!(got, h);
        assert_eq!(
            decode_map(&bytes[..HEADER_BYTES], &bytes[HEADER_BYTES..]).unwrap(),
            map
        );
        let mut b = bytes.clone();
        b[100] ^= 1;
        assert!(decode_header(&b[..HEADER_BYTES], b.len() as u64).is_err());
        let mut b = bytes.clone();
        b[HEADER_BYTES + 5] ^= 1;
        assert!(decode_map(&b[..HEADER_BYTES], &b[HEADER_BYTES..]).is_err());
        assert!(decode_header(&bytes[..HEADER_BYTES], bytes.len() as u64 - 4).is_err());
        assert!(decode_header(&[0u8; HEADER_BYTES], HEADER_BYTES as u64).is_err());
    }

    #[test]
    fn block_sizes_keep_the_map_bounded() {
        assert_eq!(block_size_for(2 << 30), MIN_CBT_BLOCK);
        assert_eq!(block_size_for(64 << 30), 4 * MIN_CBT_BLOCK);
        let huge = MAX_CAPACITY_SECTORS * SECTOR_SIZE;
        let bs = block_size_for(huge);
        assert!(block_count(huge, bs) <= MAX_CBT_BLOCKS);
        assert!(block_count(huge, bs / 2) > MAX_CBT_BLOCKS);
    }

    #[test]
    fn change_ids_round_trip_and_junk_is_refused() {
        let id = change_id(&[0xab; 16], 7);
        assert_eq!(id, format!("{}/7", "ab".repeat(16)));
        assert_eq!(parse_change_id(&id), Some(([0xab; 16], 7)));
        for junk in ["", "*", "abc/1", &format!("{}/x", "ab".repeat(16))] {
            assert_eq!(parse_change_id(junk), None, "{junk}");
        }
    }
}
