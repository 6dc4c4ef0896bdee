//! The two headers of a seSparse file: the constant header (sector 0: geometry and
//! the places of every region) and the volatile header (next free table, journal
//! state), parsed and checked as pure functions over their bytes.

use super::*;

pub(crate) fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

pub(crate) fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// The constant header (sector 0).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ConstHeader {
    pub(crate) capacity: u64,
    pub(crate) volatile_offset: u64,
    pub(crate) volatile_size: u64,
    pub(crate) journal_header_offset: u64,
    pub(crate) journal_header_size: u64,
    pub(crate) journal_offset: u64,
    pub(crate) journal_size: u64,
    pub(crate) gd_offset: u64,
    pub(crate) gd_size: u64,
    pub(crate) gt_offset: u64,
    pub(crate) gt_size: u64,
    pub(crate) bitmap_offset: u64,
    pub(crate) bitmap_size: u64,
    pub(crate) backmap_offset: u64,
    pub(crate) backmap_size: u64,
    pub(crate) grains_offset: u64,
    pub(crate) grains_size: u64,
}

/// Byte offset of the first region field (`volatile_header_offset`).
const REGIONS_AT: usize = 80;
/// End of the fields; the rest of the sector is padding.
const FIELDS_END: usize = 208;

impl ConstHeader {
    /// Parses and validates the fields themselves (not the layout).
    pub(crate) fn parse(b: &[u8; HEADER_BYTES]) -> Result<ConstHeader> {
        let magic = u64_at(b, 0);
        if magic != SESPARSE_MAGIC {
            return Err(Error::invalid(format!(
                "not a seSparse extent: constant header magic is {magic:#018x}, not {SESPARSE_MAGIC:#x}"
            )));
        }
        let version = u64_at(b, 8);
        if version != SESPARSE_VERSION {
            return Err(Error::new(
                ErrorKind::UnsupportedDiskVersion,
                format!(
                    "seSparse version {}.{} ({version:#018x}) is not 2.1",
                    version >> 32,
                    version & 0xFFFF_FFFF
                ),
            ));
        }
        let grain = u64_at(b, 24);
        if grain != SESPARSE_GRAIN_SECTORS {
            return Err(Error::invalid(format!(
                "seSparse grain size {grain} sectors is not {SESPARSE_GRAIN_SECTORS}"
            )));
        }
        let gt = u64_at(b, 32);
        if gt != SESPARSE_GT_SECTORS {
            return Err(Error::invalid(format!(
                "seSparse grain table size {gt} sectors is not {SESPARSE_GT_SECTORS}"
            )));
        }
        let flags = u64_at(b, 40);
        if flags != 0 {
            return Err(Error::new(
                ErrorKind::UnsupportedDiskVersion,
                format!("seSparse header has unknown flags {flags:#x}"),
            ));
        }
        for (i, off) in [48usize, 56, 64, 72].into_iter().enumerate() {
            let v = u64_at(b, off);
            if v != 0 {
                return Err(Error::invalid(format!(
                    "seSparse header reserved field {} is {v:#x}, not 0",
                    i + 1
                )));
            }
        }
        if b[FIELDS_END..].iter().any(|&x| x != 0) {
            return Err(Error::invalid(
                "seSparse constant header padding (bytes 208..512) is not zero",
            ));
        }
        let capacity = u64_at(b, 16);
        if capacity > MAX_SESPARSE_CAPACITY_SECTORS {
            return Err(Error::invalid(format!(
                "seSparse capacity {capacity} sectors exceeds the limit of {MAX_SESPARSE_CAPACITY_SECTORS}"
            )));
        }
        let f = |i: usize| u64_at(b, REGIONS_AT + 8 * i);
        Ok(ConstHeader {
            capacity,
            volatile_offset: f(0),
            volatile_size: f(1),
            journal_header_offset: f(2),
            journal_header_size: f(3),
            journal_offset: f(4),
            journal_size: f(5),
            gd_offset: f(6),
            gd_size: f(7),
            gt_offset: f(8),
            gt_size: f(9),
            bitmap_offset: f(10),
            bitmap_size: f(11),
            backmap_offset: f(12),
            backmap_size: f(13),
            grains_offset: f(14),
            grains_size: f(15),
        })
    }

    pub(crate) fn to_bytes(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        put_u64(&mut b, 0, SESPARSE_MAGIC);
        put_u64(&mut b, 8, SESPARSE_VERSION);
        put_u64(&mut b, 16, self.capacity);
        put_u64(&mut b, 24, SESPARSE_GRAIN_SECTORS);
        put_u64(&mut b, 32, SESPARSE_GT_SECTORS);
        for (i, (_, offset, size)) in self.regions().into_iter().skip(1).enumerate() {
            put_u64(&mut b, REGIONS_AT + 16 * i, offset);
            put_u64(&mut b, REGIONS_AT + 16 * i + 8, size);
        }
        b
    }

    /// Every region as `(name, first sector, sectors)`, the header first.
    pub(crate) fn regions(&self) -> [(&'static str, u64, u64); 9] {
        [
            ("the constant header", 0, 1),
            (
                "the volatile header",
                self.volatile_offset,
                self.volatile_size,
            ),
            (
                "the journal header",
                self.journal_header_offset,
                self.journal_header_size,
            ),
            ("the journal", self.journal_offset, self.journal_size),
            ("the grain directory", self.gd_offset, self.gd_size),
            ("the grain table area", self.gt_offset, self.gt_size),
            ("the free bitmap", self.bitmap_offset, self.bitmap_size),
            ("the backmap", self.backmap_offset, self.backmap_size),
            ("the grain area", self.grains_offset, self.grains_size),
        ]
    }

    /// Directory entries the capacity needs.
    pub(crate) fn needed_gdes(&self) -> u64 {
        self.capacity.div_ceil(SECTORS_PER_GT)
    }

    /// Grain tables the table area holds.
    pub(crate) fn gt_slots(&self) -> u64 {
        self.gt_size / SESPARSE_GT_SECTORS
    }

    /// Grains the grain area holds.
    pub(crate) fn grain_slots(&self) -> u64 {
        self.grains_size / SESPARSE_GRAIN_SECTORS
    }

    /// Checks the layout: every region addressable in bytes, the volatile header and
    /// directory large enough, no two regions overlapping.
    pub(crate) fn validate_layout(&self) -> Result<()> {
        let regions = self.regions();
        for &(what, offset, size) in &regions {
            let addressable = offset
                .checked_add(size)
                .and_then(|e| e.checked_mul(SECTOR_SIZE))
                .is_some();
            if !addressable {
                return Err(Error::invalid(format!(
                    "{what} (sector {offset}, {size} sectors) lies beyond any addressable offset"
                )));
            }
        }
        if self.volatile_size == 0 {
            return Err(Error::invalid(
                "the volatile header has a size of 0 sectors",
            ));
        }
        let needed = self.needed_gdes();
        let have = self.gd_size.saturating_mul(GDES_PER_SECTOR);
        if have < needed {
            return Err(Error::invalid(format!(
                "the grain directory holds {have} entries but a capacity of {} sectors needs {needed}",
                self.capacity
            )));
        }
        for (i, &(a, a_off, a_size)) in regions.iter().enumerate() {
            if a_size == 0 {
                continue;
            }
            for &(b, b_off, b_size) in &regions[i + 1..] {
                if b_size == 0 {
                    continue;
                }
                // Ends cannot overflow: checked above.
                if a_off < b_off + b_size && b_off < a_off + a_size {
                    return Err(Error::invalid(format!(
                        "{b} (sectors {b_off}..{}) overlaps {a} (sectors {a_off}..{})",
                        b_off + b_size,
                        a_off + a_size
                    )));
                }
            }
        }
        Ok(())
    }

    /// Whether no other region ends after the grain area.
    pub(crate) fn grains_last(&self) -> bool {
        let end = self.grains_offset + self.grains_size;
        self.regions()
            .iter()
            .all(|&(_, o, s)| s == 0 || o + s <= end)
    }

    /// Byte offset of grain table `index` (below [`ConstHeader::gt_slots`]).
    pub(crate) fn gt_byte_offset(&self, index: u32) -> u64 {
        (self.gt_offset + u64::from(index) * SESPARSE_GT_SECTORS) * SECTOR_SIZE
    }

    /// Byte offset of grain slot `slot` (below [`ConstHeader::grain_slots`]).
    pub(crate) fn slot_byte_offset(&self, slot: u64) -> u64 {
        (self.grains_offset + slot * SESPARSE_GRAIN_SECTORS) * SECTOR_SIZE
    }
}

/// Volatile header fields (the raw sector is kept so it is rewritten as read).
#[derive(Clone, Debug)]
pub(crate) struct VolatileHeader {
    raw: [u8; HEADER_BYTES],
    pub(crate) free_gt_number: u64,
}

impl VolatileHeader {
    pub(crate) fn parse(b: &[u8; HEADER_BYTES]) -> Result<VolatileHeader> {
        let magic = u64_at(b, 0);
        if magic != SESPARSE_VOLATILE_MAGIC {
            return Err(Error::invalid(format!(
                "seSparse volatile header magic is {magic:#018x}, not {SESPARSE_VOLATILE_MAGIC:#x}"
            )));
        }
        if u64_at(b, 24) != 0 {
            return Err(Error::new(
                ErrorKind::NeedsRepair,
                "seSparse journal must be replayed (replay_journal is set); journal replay is not supported",
            ));
        }
        if b[32..].iter().any(|&x| x != 0) {
            return Err(Error::invalid(
                "seSparse volatile header padding (bytes 32..512) is not zero",
            ));
        }
        Ok(VolatileHeader {
            raw: *b,
            free_gt_number: u64_at(b, 8),
        })
    }

    pub(crate) fn new() -> VolatileHeader {
        let mut raw = [0u8; HEADER_BYTES];
        put_u64(&mut raw, 0, SESPARSE_VOLATILE_MAGIC);
        VolatileHeader {
            raw,
            free_gt_number: 0,
        }
    }

    pub(crate) fn to_bytes(&self) -> [u8; HEADER_BYTES] {
        let mut b = self.raw;
        put_u64(&mut b, 8, self.free_gt_number);
        b
    }
}
