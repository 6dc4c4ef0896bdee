//! Telling zeros from data in a buffer: convert and shrink skip blocks of zeros,
//! and `Disk::write_at` does not store zeros where the disk reads zeros already.

/// Whether `block` is all zeros (vectorisable: no early exit inside 256-byte runs).
pub fn is_zero(block: &[u8]) -> bool {
    block
        .chunks(256)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}
