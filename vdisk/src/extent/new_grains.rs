//! Writing grains just claimed by a growable extent (hosted sparse, COWD, seSparse):
//! the part of the write path the formats share. The format claims the grains and
//! reserves file space under its lock; the data is written here outside any lock;
//! the format then points its grain table entries at it.

use crate::error::{Error, Result};
use crate::extent::BelowFn;
use crate::storage::Storage;

/// Grains claimed for one write: `n` consecutive grains from grain `first`, stored
/// consecutively from byte `file_offset` of the extent file.
pub(crate) struct NewGrains {
    /// First grain (index within the extent).
    pub first: u64,
    /// How many.
    pub n: u64,
    /// Where the first one goes in the file.
    pub file_offset: u64,
    /// The grains were unallocated (a partial grain is completed from the chain
    /// below), not zero (completed with zeros).
    pub from_below: bool,
}

/// Writes the claimed grains for the data `rest` that starts at byte `off` of the
/// extent (`grain` bytes per grain, `capacity` bytes in the extent): whole grains
/// straight from `rest`, or one partial grain completed with what `below` reads or
/// zeros. Returns how many bytes of `rest` were written and the end of the written
/// file range.
#[allow(clippy::too_many_arguments)] // the two write paths differ in exactly these
pub(crate) fn write_new_grains(
    storage: &dyn Storage,
    name: &str,
    grain: u64,
    capacity: u64,
    claim: &NewGrains,
    off: u64,
    rest: &[u8],
    below: BelowFn<'_>,
) -> Result<(usize, u64)> {
    let in_grain = off % grain;
    let write = |buf: &[u8]| {
        storage
            .write_all_at(buf, claim.file_offset)
            .map_err(|e| Error::io(format!("{name}: write failed"), e))
    };
    if claim.n > 1 || (in_grain == 0 && rest.len() as u64 >= grain) {
        // Whole grains, written straight from the caller's buffer.
        let bytes = (claim.n * grain) as usize;
        write(&rest[..bytes])?;
        return Ok((bytes, claim.file_offset + bytes as u64));
    }
    // A partial grain: build it from below (or zeros), overlay the new data.
    let grain_start = claim.first * grain;
    let valid = grain.min(capacity - grain_start) as usize;
    let mut buf = vec![0u8; grain as usize];
    if claim.from_below {
        below(grain_start, &mut buf[..valid])?;
    }
    let take = (grain - in_grain).min(rest.len() as u64) as usize;
    buf[in_grain as usize..in_grain as usize + take].copy_from_slice(&rest[..take]);
    write(&buf)?;
    Ok((take, claim.file_offset + grain))
}

/// How many whole grains of zeros `data` (written at byte `off` of the extent) starts
/// with: grains a format can mark zeroed instead of allocating. The check stops at
/// the first non-zero byte, so data costs next to nothing.
pub(crate) fn leading_zero_grains(off: u64, data: &[u8], grain: u64) -> u64 {
    if !off.is_multiple_of(grain) {
        return 0;
    }
    data.chunks_exact(grain as usize)
        .take_while(|g| crate::zeros::is_zero(g))
        .count() as u64
}
