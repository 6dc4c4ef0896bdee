//! The engine's write path. Data goes in place into allocated grains. Whole grains
//! of zeros where a grain has no data are marked zeroed (when the format has such
//! an entry). Other grains are *claimed* under the state lock (marked in flight,
//! room reserved through the format), written with no lock held (a partial grain
//! completed from the chain below, or with zeros for a zeroed grain), then pointed
//! at by their table entries. A writer touching an in-flight grain waits.

use std::sync::MutexGuard;

use super::{GrainEngine, GrainFormat, GrainState, State};
use crate::error::{Error, ErrorKind, Result};
use crate::extent::{BelowFn, ExtentMapping};

/// Grains claimed by one writer: room reserved, not yet in a grain table.
struct Claim {
    first: u64,
    n: u64,
    /// Byte offset in the file of the first grain.
    file_offset: u64,
    /// The grains were unallocated (a partial grain is completed from the chain
    /// below), not zeroed (completed with zeros).
    from_below: bool,
}

/// Releases a claim (also when the write failed) and wakes waiting writers.
struct ClaimGuard<'a, F: GrainFormat> {
    engine: &'a GrainEngine<F>,
    first: u64,
    n: u64,
}

impl<F: GrainFormat> Drop for ClaimGuard<'_, F> {
    fn drop(&mut self) {
        let mut st = match self.engine.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        for g in self.first..self.first + self.n {
            st.inflight.remove(&g);
        }
        drop(st);
        self.engine.allocated.notify_all();
    }
}

/// How many whole grains of zeros `data` (written at byte `off` of the extent) starts
/// with: grains a format can mark zeroed instead of allocating. The check stops at
/// the first non-zero byte, so data costs next to nothing.
fn leading_zero_grains(off: u64, data: &[u8], grain: u64) -> u64 {
    if !off.is_multiple_of(grain) {
        return 0;
    }
    data.chunks_exact(grain as usize)
        .take_while(|g| crate::zeros::is_zero(g))
        .count() as u64
}

impl<F: GrainFormat> GrainEngine<F> {
    /// Writes `data` at `offset` (bytes within the extent). Grains without data
    /// are allocated where the format says; a partly written new grain is
    /// completed with what `below` reads (the chain under this link, or zeros).
    pub fn write(&self, offset: u64, data: &[u8], below: BelowFn<'_>) -> Result<()> {
        if !self.writable {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                format!("{} is open read-only", self.name),
            ));
        }
        self.check_range(offset, data.len() as u64)?;
        let g = self.geo.grain_bytes;
        let mut pos = 0usize;
        while pos < data.len() {
            let off = offset + pos as u64;
            let rest = &data[pos..];
            let (mapping, run) = self.map(off, rest.len() as u64)?;
            let run = run as usize;
            if let ExtentMapping::Data { file_offset } = mapping {
                self.storage
                    .write_all_at(&rest[..run], file_offset)
                    .map_err(|e| Error::io(format!("{}: write failed", self.name), e))?;
                self.lock()?.unsynced = true;
                pos += run;
                continue;
            }
            let zeros = leading_zero_grains(off, &rest[..run], g);
            let marked = match mapping {
                _ if zeros == 0 => 0,
                ExtentMapping::Zero => zeros,
                _ => self.mark_zeroed(off / g, zeros)?,
            };
            if marked > 0 {
                pos += (marked * g) as usize;
                continue;
            }
            let Some(claim) = self.claim(off, run as u64)? else {
                continue; // allocated by another writer meanwhile
            };
            let _guard = ClaimGuard {
                engine: self,
                first: claim.first,
                n: claim.n,
            };
            let (used, end) = self.write_new_grains(&claim, off, rest, below)?;
            self.commit_grains(&claim, end)?;
            pos += used;
        }
        Ok(())
    }

    /// Waits (releasing the lock) until no writer is allocating grain `grain`.
    fn wait_for_grain<'a>(
        &'a self,
        mut st: MutexGuard<'a, State<F>>,
        grain: u64,
    ) -> Result<MutexGuard<'a, State<F>>> {
        while st.inflight.contains(&grain) {
            st = self
                .allocated
                .wait(st)
                .map_err(|_| Error::new(ErrorKind::Fail, "extent state poisoned"))?;
        }
        Ok(st)
    }

    /// Marks up to `n` grains from `first` zeroed where they have no data, writing
    /// no grain: zeros over a parent's data cost a table entry. Returns how many
    /// were marked from `first`: 0 if the format has no zeroed entry here or the
    /// first grain has data by now.
    fn mark_zeroed(&self, first: u64, n: u64) -> Result<u64> {
        let st = self.lock()?;
        let mut st = self.wait_for_grain(st, first)?;
        let zero = {
            let State { meta, unsynced, .. } = &mut *st;
            match self.format.zero_entry(meta, &mut self.writer(unsynced))? {
                Some(z) => z,
                None => return Ok(0),
            }
        };
        let mut done = 0;
        while done < n {
            let grain = first + done;
            if (done > 0 && st.inflight.contains(&grain))
                || matches!(self.grain_state(&mut st, grain)?, GrainState::Data(_))
            {
                break;
            }
            self.set_entry(&mut st, grain, zero)?;
            done += 1;
        }
        Ok(done)
    }

    /// Claims the grains without data at the start of `[off, off+len)` (all in the
    /// same state) for this writer and reserves room for them. Waits while another
    /// writer is allocating the first grain; returns `None` if that grain has data
    /// by now. No lock is held once this returns: data is written outside any lock.
    fn claim(&self, off: u64, len: u64) -> Result<Option<Claim>> {
        let g = self.geo.grain_bytes;
        let first = off / g;
        let st = self.lock()?;
        let mut st = self.wait_for_grain(st, first)?;
        let state = self.grain_state(&mut st, first)?;
        if let GrainState::Data(_) = state {
            return Ok(None);
        }
        let mut n = 1;
        if off.is_multiple_of(g) {
            let max_n = len / g;
            while n < max_n
                && !st.inflight.contains(&(first + n))
                && self.grain_state(&mut st, first + n)? == state
            {
                n += 1;
            }
        }
        let file_offset = self.format.reserve_grains(&mut st.meta, n)?;
        for i in 0..n {
            st.inflight.insert(first + i);
        }
        Ok(Some(Claim {
            first,
            n,
            file_offset,
            from_below: state == GrainState::Unallocated,
        }))
    }

    /// Writes the claimed grains for the data `rest` that starts at byte `off` of
    /// the extent: whole grains straight from `rest`, or one partial grain
    /// completed with what `below` reads or zeros. Returns how many bytes of `rest`
    /// were written and the end of the written file range.
    fn write_new_grains(
        &self,
        claim: &Claim,
        off: u64,
        rest: &[u8],
        below: BelowFn<'_>,
    ) -> Result<(usize, u64)> {
        let grain = self.geo.grain_bytes;
        let in_grain = off % grain;
        let write = |buf: &[u8]| {
            self.storage
                .write_all_at(buf, claim.file_offset)
                .map_err(|e| Error::io(format!("{}: write failed", self.name), e))
        };
        if claim.n > 1 || (in_grain == 0 && rest.len() as u64 >= grain) {
            let bytes = (claim.n * grain) as usize;
            write(&rest[..bytes])?;
            return Ok((bytes, claim.file_offset + bytes as u64));
        }
        let grain_start = claim.first * grain;
        let valid = grain.min(self.geo.capacity_bytes - grain_start) as usize;
        let mut buf = vec![0u8; grain as usize];
        if claim.from_below {
            below(grain_start, &mut buf[..valid])?;
        }
        let take = (grain - in_grain).min(rest.len() as u64) as usize;
        buf[in_grain as usize..in_grain as usize + take].copy_from_slice(&rest[..take]);
        write(&buf)?;
        Ok((take, claim.file_offset + grain))
    }

    /// Points the table entries of a claim's grains at their new data, allocating
    /// grain tables where the directory has none.
    fn commit_grains(&self, claim: &Claim, file_end: u64) -> Result<()> {
        let mut st = self.lock()?;
        st.unsynced = true;
        st.file_len = st.file_len.max(file_end);
        let g = self.geo.grain_bytes;
        for i in 0..claim.n {
            let entry = self.format.data_entry(claim.file_offset + i * g)?;
            self.set_entry(&mut st, claim.first + i, entry)?;
        }
        Ok(())
    }
}
