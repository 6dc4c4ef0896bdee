//! Metadata contexts: what `BLOCK_STATUS` can report about an export.
//!
//! * `base:allocation` (the NBD standard): flags `HOLE|ZERO` (3) where no link of the
//!   chain holds data and where a link says the range reads as zeros, 0 where there
//!   is data - what `qemu-img map` shows.
//! * `x-vdisk:allocation-depth`: which link holds each range, as qemu's
//!   `qemu:allocation-depth` counts: 0 nothing, 1 the top link served (the redo log
//!   of a non-persistent export), 2 the link below, ...
//! * `x-vdisk:changed:<change ID>`: flag 1 (qemu's "dirty" bit, so qemu's dirty
//!   bitmap tools read it) on the areas written since that change ID, from the disk's
//!   change tracking - an incremental backup over NBD. `*` means all allocated data.
//!   Listing `x-vdisk:changed:` gives the disk's current change ID; selecting an ID
//!   the tracking cannot answer for fails the `SET_META_CONTEXT` with the reason.

use vdisk::{RangeKind, Result};

use crate::export::OpenExport;
use crate::wire::{Extent, STATE_HOLE, STATE_ZERO};

/// The allocation context.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// The allocation-depth context.
pub const ALLOCATION_DEPTH: &str = "x-vdisk:allocation-depth";
/// Prefix of the changed-blocks contexts.
pub const CHANGED_PREFIX: &str = "x-vdisk:changed:";

/// A context a connection can select.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Context {
    /// `base:allocation`.
    Allocation,
    /// `x-vdisk:allocation-depth`.
    Depth,
    /// `x-vdisk:changed:<ID>`.
    Changed(String),
}

impl Context {
    /// The context's name on the wire.
    pub fn name(&self) -> String {
        match self {
            Context::Allocation => BASE_ALLOCATION.to_string(),
            Context::Depth => ALLOCATION_DEPTH.to_string(),
            Context::Changed(id) => format!("{CHANGED_PREFIX}{id}"),
        }
    }
}

/// The contexts a `LIST_META_CONTEXT` query names (no queries: all of them).
pub fn list(export: &OpenExport, queries: &[String]) -> Vec<String> {
    let current = current_change_id(export);
    let all = || {
        let mut v = vec![BASE_ALLOCATION.to_string(), ALLOCATION_DEPTH.to_string()];
        if let Some(id) = &current {
            v.push(format!("{CHANGED_PREFIX}{id}"));
        }
        v
    };
    if queries.is_empty() {
        return all();
    }
    let mut out: Vec<String> = Vec::new();
    for q in queries {
        let found: Vec<String> = match q.as_str() {
            "base:" | BASE_ALLOCATION => vec![BASE_ALLOCATION.into()],
            "x-vdisk:" => all().into_iter().skip(1).collect(),
            ALLOCATION_DEPTH => vec![ALLOCATION_DEPTH.into()],
            CHANGED_PREFIX => current
                .iter()
                .map(|id| format!("{CHANGED_PREFIX}{id}"))
                .collect(),
            q => match q.strip_prefix(CHANGED_PREFIX) {
                Some(id) if check_change_id(export, id).is_ok() => vec![q.to_string()],
                _ => Vec::new(),
            },
        };
        for f in found {
            if !out.contains(&f) {
                out.push(f);
            }
        }
    }
    out
}

/// The contexts a `SET_META_CONTEXT` query selects: an exact name each (wildcards
/// and unknown names select nothing); a change ID the tracking cannot answer for is
/// an error.
pub fn select(
    export: &OpenExport,
    queries: &[String],
) -> std::result::Result<Vec<Context>, String> {
    let mut out: Vec<Context> = Vec::new();
    for q in queries {
        let c = match q.as_str() {
            BASE_ALLOCATION => Context::Allocation,
            ALLOCATION_DEPTH => Context::Depth,
            q => match q.strip_prefix(CHANGED_PREFIX) {
                Some("") | None => continue,
                Some(id) => {
                    check_change_id(export, id).map_err(|e| format!("{q}: {e}"))?;
                    Context::Changed(id.to_string())
                }
            },
        };
        if !out.contains(&c) {
            out.push(c);
        }
    }
    Ok(out)
}

/// The disk's current change ID, if its changes are tracked and trusted. Taken
/// with [`vdisk::Disk::change_id`], which on a disk open for writing starts a new
/// session: writes made after the ID was listed are changes since it (the
/// tracker's status alone would name the running session, whose later writes a
/// backup based on that ID would miss).
fn current_change_id(export: &OpenExport) -> Option<String> {
    export.disk.tracker()?;
    export.disk.change_id().ok()
}

/// Whether the tracking can say what changed since `id`.
fn check_change_id(export: &OpenExport, id: &str) -> Result<()> {
    export.disk.for_each_changed_area(id, 0, 0, |_, _| Ok(()))
}

/// The extents of context `c` over `[offset, offset+len)`: at most `max` of them,
/// each at most `max_len` bytes (and a multiple of 512 when cut); fewer extents
/// than the range needs is a valid, shorter answer.
pub fn extents(
    export: &OpenExport,
    c: &Context,
    offset: u64,
    len: u64,
    max: usize,
    max_len: u64,
) -> Result<Vec<Extent>> {
    let mut out: Vec<Extent> = Vec::new();
    let push = |out: &mut Vec<Extent>, mut n: u64, flags: u64| -> bool {
        if let Some(last) = out.last_mut() {
            if last.flags == flags {
                let room = max_len - last.len;
                let take = if room >= n { n } else { room / 512 * 512 };
                last.len += take;
                n -= take;
            }
        }
        while n > 0 {
            if out.len() >= max {
                return false;
            }
            let take = if n <= max_len { n } else { max_len };
            out.push(Extent { len: take, flags });
            n -= take;
        }
        true
    };
    // Stopping a walk early: an error the walk passes back, told apart by kind.
    let full = || vdisk::Error::new(vdisk::ErrorKind::BufferTooSmall, "enough extents");
    let walked = match c {
        Context::Allocation | Context::Depth => {
            let depth = matches!(c, Context::Depth);
            export.disk.for_each_range(offset, len, |r| {
                let flags = match (depth, r.kind) {
                    (false, RangeKind::Data) => 0,
                    (false, _) => u64::from(STATE_HOLE | STATE_ZERO),
                    (true, RangeKind::Unallocated) => 0,
                    (true, _) => r.depth as u64 + 1,
                };
                if push(&mut out, r.length, flags) {
                    Ok(())
                } else {
                    Err(full())
                }
            })
        }
        Context::Changed(id) => {
            let mut at = offset;
            let r = export.disk.for_each_changed_area(id, offset, len, |o, l| {
                if o > at && !push(&mut out, o - at, 0) {
                    return Err(full());
                }
                at = o + l;
                if push(&mut out, l, 1) {
                    Ok(())
                } else {
                    Err(full())
                }
            });
            if r.is_ok() && at < offset + len {
                push(&mut out, offset + len - at, 0);
            }
            r
        }
    };
    match walked {
        Err(e) if e.kind() == vdisk::ErrorKind::BufferTooSmall && !out.is_empty() => Ok(out),
        Err(e) => Err(e),
        Ok(()) => Ok(out),
    }
}
