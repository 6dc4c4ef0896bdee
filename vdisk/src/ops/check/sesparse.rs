//! Checking and repairing seSparse extents (ESXi space-efficient sparse deltas).
//!
//! The headers are checked by the same parser the reader uses (a header it refuses
//! cannot be repaired here: the journal is never replayed, the region layout is
//! not guessed). Then every grain directory entry must be 0 or a reference to a
//! table inside the grain table area and the file, no table used twice; and every
//! entry of every table must be of a known type, an allocated one naming a grain
//! slot inside the grain area whose data lies inside the file, no slot used twice.
//! Repair clears what is wrong (that data is lost and reported so): tables are
//! rewritten in place, then the directory; a crash in between leaves a file a second
//! repair finishes. Memory: the directory (at most 4 Mi entries) and one table; the
//! slots in use are a bitmap of at most [`crate::limits::CHECK_BITMAP_BITS`] bits, a larger grain
//! area is swept in windows.

use std::path::Path;

use super::grains::Bits;
use super::report::{CheckReport, Finding};
use super::CheckOptions;
use crate::error::{Error, Result};
use crate::extent::sesparse::{
    classify_gte, ConstHeader, GteKind, VolatileHeader, GDE_HIGH_MASK, GDE_TABLE, GRAIN_BYTES,
    GTES_PER_GT, GT_BYTES, HEADER_BYTES,
};
use crate::limits::SECTOR_SIZE;
use crate::storage::{FileStorage, Storage};

const LOST: &str = "clear the entries (their data is lost and reads as zeros)";

/// Checks (and with `opts.repair` repairs) the seSparse file `p`; returns whether
/// anything was written.
pub(super) fn check_sesparse(
    p: &Path,
    storage: &FileStorage,
    opts: &CheckOptions,
    report: &mut CheckReport,
) -> Result<bool> {
    let io = |what: &'static str| {
        let name = p.display().to_string();
        move |e: std::io::Error| Error::io(format!("{name}: {what}"), e)
    };
    let file_len = storage.len().map_err(io("cannot read the file size"))?;
    let fatal = |report: &mut CheckReport, what: String| {
        report.push(Finding::fatal(p, what));
        Ok(false)
    };
    if file_len < HEADER_BYTES as u64 {
        return fatal(
            report,
            format!("the file is {file_len} bytes, too short for a seSparse header"),
        );
    }
    let mut hb = [0u8; HEADER_BYTES];
    storage
        .read_exact_at(&mut hb, 0)
        .map_err(io("cannot read the header"))?;
    let h = match ConstHeader::parse(&hb).and_then(|h| h.validate_layout().map(|()| h)) {
        Ok(h) => h,
        Err(e) => return fatal(report, format!("the seSparse header is invalid: {e}")),
    };
    let vh_at = h.volatile_offset * SECTOR_SIZE;
    if vh_at + HEADER_BYTES as u64 > file_len {
        return fatal(
            report,
            format!(
                "the volatile header (sector {}) lies past the end of the file",
                h.volatile_offset
            ),
        );
    }
    let mut vb = [0u8; HEADER_BYTES];
    storage
        .read_exact_at(&mut vb, vh_at)
        .map_err(io("cannot read the volatile header"))?;
    if let Err(e) = VolatileHeader::parse(&vb) {
        return fatal(
            report,
            format!("the seSparse volatile header cannot be used: {e}"),
        );
    }
    let needed = h.needed_gdes();
    let gd_at = h.gd_offset * SECTOR_SIZE;
    if gd_at + needed * 8 > file_len {
        return fatal(
            report,
            format!(
                "the grain directory (sector {}, {needed} entries) lies past the end of the file",
                h.gd_offset
            ),
        );
    }
    let mut raw = vec![0u8; (needed * 8) as usize];
    storage
        .read_exact_at(&mut raw, gd_at)
        .map_err(io("cannot read the grain directory"))?;
    let mut gd: Vec<u64> = raw
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect();
    drop(raw);

    // Directory entries.
    let gt_slots = h.gt_slots();
    let mut bad = 0u64;
    let mut example = None;
    for (i, e) in gd.iter_mut().enumerate() {
        if *e == 0 {
            continue;
        }
        let index = *e & 0xFFFF_FFFF;
        let ok = *e & GDE_HIGH_MASK == GDE_TABLE
            && index < gt_slots
            && h.gt_byte_offset(index as u32) + GT_BYTES <= file_len;
        if !ok {
            example.get_or_insert((i, *e));
            bad += 1;
            *e = 0;
        }
    }
    let mut gd_changed = bad > 0;
    if let Some((i, e)) = example {
        report.push(Finding::fixable(
            p,
            format!(
                "{bad} grain directory entries are not references to tables inside the grain table area and the file (entry {i}: {e:#018x})"
            ),
            "clear them (the grains those tables mapped are lost)",
        ));
    }
    let mut places: Vec<(u64, usize)> = gd
        .iter()
        .enumerate()
        .filter(|(_, &e)| e != 0)
        .map(|(i, &e)| (e & 0xFFFF_FFFF, i))
        .collect();
    places.sort_unstable();
    let mut shared = 0u64;
    let mut example = None;
    for w in 1..places.len() {
        if places[w].0 == places[w - 1].0 {
            let (t, i) = places[w];
            gd[i] = 0;
            shared += 1;
            example.get_or_insert((i, t));
        }
    }
    drop(places);
    if let Some((i, t)) = example {
        gd_changed = true;
        report.push(Finding::fixable(
            p,
            format!(
                "{shared} grain directory entries name a grain table another entry uses too (entry {i}: table {t})"
            ),
            "clear them (the grains those tables mapped are lost)",
        ));
    }

    // Table entries; slots in use one window at a time.
    let grain_slots = h.grain_slots();
    let cap_bytes = h.capacity * SECTOR_SIZE;
    let slots_in_file = file_len
        .saturating_sub(h.grains_offset * SECTOR_SIZE)
        .div_ceil(GRAIN_BYTES)
        .min(grain_slots);
    let window = opts.bitmap_bits.max(64);
    let mut wrote = false;
    let mut w = 0u64;
    let mut first_pass = true;
    loop {
        let end = (w + window).min(slots_in_file.max(1));
        let mut used = Bits::new(end - w);
        for (i, &e) in gd.iter().enumerate() {
            if e == 0 {
                continue;
            }
            let t = (e & 0xFFFF_FFFF) as u32;
            let at = h.gt_byte_offset(t);
            let mut buf = vec![0u8; GT_BYTES as usize];
            storage
                .read_exact_at(&mut buf, at)
                .map_err(io("cannot read a grain table"))?;
            let mut table: Vec<u64> = buf
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect();
            let (mut bad, mut dup) = (0u64, 0u64);
            let mut why = None;
            for (j, entry) in table.iter_mut().enumerate() {
                let grain = i as u64 * GTES_PER_GT + j as u64;
                if grain * GRAIN_BYTES >= cap_bytes {
                    continue;
                }
                let kind = classify_gte(*entry, grain_slots).and_then(|k| match k {
                    GteKind::Slot(s) => {
                        let need = GRAIN_BYTES.min(cap_bytes - grain * GRAIN_BYTES);
                        if h.slot_byte_offset(s) + need > file_len {
                            Err(format!(
                                "names grain slot {s}, whose data lies past the end of the file"
                            ))
                        } else {
                            Ok(k)
                        }
                    }
                    k => Ok(k),
                });
                match kind {
                    Err(reason) => {
                        why.get_or_insert((j, reason));
                        bad += 1;
                        *entry = 0;
                    }
                    Ok(GteKind::Slot(s)) if s >= w && s < end => {
                        if used.get(s - w) {
                            dup += 1;
                            *entry = 0;
                        } else {
                            used.set(s - w);
                        }
                    }
                    Ok(_) => {}
                }
            }
            if first_pass {
                if let Some((j, reason)) = why {
                    report.push(Finding::fixable(
                        p,
                        format!("grain table {t}: {bad} entries are invalid (entry {j} {reason})"),
                        LOST,
                    ));
                }
            }
            if dup > 0 {
                report.push(Finding::fixable(
                    p,
                    format!(
                        "grain table {t}: {dup} entries name grain slots another entry uses too"
                    ),
                    LOST,
                ));
            }
            let changed = dup > 0 || (first_pass && bad > 0);
            if opts.repair && changed {
                let bytes: Vec<u8> = table.iter().flat_map(|v| v.to_le_bytes()).collect();
                storage
                    .write_all_at(&bytes, at)
                    .map_err(io("cannot write a grain table"))?;
                wrote = true;
            }
        }
        first_pass = false;
        w = end;
        if w >= slots_in_file {
            break;
        }
    }
    if !opts.repair {
        return Ok(false);
    }
    if wrote {
        storage.sync().map_err(io("sync failed"))?;
    }
    if gd_changed {
        let bytes: Vec<u8> = gd.iter().flat_map(|v| v.to_le_bytes()).collect();
        storage
            .write_all_at(&bytes, gd_at)
            .and_then(|()| storage.sync())
            .map_err(io("cannot write the grain directory"))?;
        wrote = true;
    }
    Ok(wrote)
}
