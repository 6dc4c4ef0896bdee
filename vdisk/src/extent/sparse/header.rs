//! The hosted sparse extent header (`KDMV`, 512 bytes at sector 0): a pure parser
//! with every field validated against the named limits, and the writer.
//!
//! The header is packed (several u64 fields are unaligned), so fields are read one by
//! one at their byte offsets rather than by casting a struct.

use crate::error::{Error, ErrorKind, Result};
use crate::limits::{
    MAX_CAPACITY_SECTORS, MAX_DESCRIPTOR_BYTES, MAX_GD_ENTRIES, MAX_GRAIN_SECTORS, MAX_GTES_PER_GT,
    MAX_SPARSE_FILE_SECTORS, SECTOR_SIZE,
};

/// `KDMV` as a little-endian u32.
pub const SPARSE_MAGIC: u32 = 0x564D_444B;
/// `gdOffset` value meaning "the grain directory is in the footer" (streamOptimized).
pub const GD_AT_END: u64 = u64::MAX;
/// Header size in bytes.
pub const HEADER_SIZE: usize = 512;

/// Flag bit 0: the end-of-line detection bytes are valid.
pub const FLAG_VALID_NEWLINE: u32 = 1 << 0;
/// Flag bit 1: a redundant grain directory and tables exist at `rgdOffset`.
pub const FLAG_REDUNDANT_GD: u32 = 1 << 1;
/// Flag bit 2: grain table entry 1 means "zeroed grain" (header version 2).
pub const FLAG_ZEROED_GTE: u32 = 1 << 2;
/// Flag bit 16: grains are compressed.
pub const FLAG_COMPRESSED: u32 = 1 << 16;
/// Flag bit 17: grains and metadata carry markers (streamOptimized).
pub const FLAG_MARKERS: u32 = 1 << 17;
/// Incompatible flags (bits 16-31) this library understands.
const KNOWN_INCOMPATIBLE: u32 = FLAG_COMPRESSED | FLAG_MARKERS;

/// The parsed, validated header of a hosted sparse extent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SparseHeader {
    /// Header version: 1, 2 (zeroed-grain entries) or 3 (streamOptimized).
    pub version: u32,
    /// Flag bits (`FLAG_*`).
    pub flags: u32,
    /// Extent capacity in sectors.
    pub capacity: u64,
    /// Sectors per grain (a power of two).
    pub grain_size: u64,
    /// Sector of the embedded descriptor, 0 if none.
    pub descriptor_offset: u64,
    /// Sectors reserved for the embedded descriptor.
    pub descriptor_size: u64,
    /// Entries per grain table.
    pub num_gtes_per_gt: u32,
    /// Sector of the redundant grain directory (valid with [`FLAG_REDUNDANT_GD`]).
    pub rgd_offset: u64,
    /// Sector of the grain directory, or [`GD_AT_END`].
    pub gd_offset: u64,
    /// Sectors of metadata before the first grain.
    pub overhead: u64,
    /// Set while a writer has the extent open.
    pub unclean_shutdown: bool,
    /// 0 = none, 1 = deflate.
    pub compress_algorithm: u16,
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// Whether `b` starts with the KDMV magic.
pub fn has_sparse_magic(b: &[u8]) -> bool {
    b.len() >= 4 && u32_at(b, 0) == SPARSE_MAGIC
}

impl SparseHeader {
    /// Parses and validates a header. Errors name the field at fault.
    pub fn parse(b: &[u8; HEADER_SIZE]) -> Result<SparseHeader> {
        if !has_sparse_magic(b) {
            return Err(Error::new(
                ErrorKind::IncorrectFileType,
                "not a hosted sparse extent (no KDMV magic)",
            ));
        }
        let h = SparseHeader {
            version: u32_at(b, 4),
            flags: u32_at(b, 8),
            capacity: u64_at(b, 12),
            grain_size: u64_at(b, 20),
            descriptor_offset: u64_at(b, 28),
            descriptor_size: u64_at(b, 36),
            num_gtes_per_gt: u32_at(b, 44),
            rgd_offset: u64_at(b, 48),
            gd_offset: u64_at(b, 56),
            overhead: u64_at(b, 64),
            unclean_shutdown: b[72] != 0,
            compress_algorithm: u16::from_le_bytes([b[77], b[78]]),
        };
        if !(1..=3).contains(&h.version) {
            return Err(Error::new(
                ErrorKind::UnsupportedDiskVersion,
                format!("sparse header version {} is not 1, 2 or 3", h.version),
            ));
        }
        let unknown = h.flags & 0xffff_0000 & !KNOWN_INCOMPATIBLE;
        if unknown != 0 {
            return Err(Error::new(
                ErrorKind::UnsupportedDiskVersion,
                format!("sparse header has unknown incompatible flags {unknown:#x}"),
            ));
        }
        if h.flags & FLAG_MARKERS != 0 && h.flags & FLAG_COMPRESSED == 0 {
            return Err(Error::invalid(
                "sparse header has the marker flag without the compression flag",
            ));
        }
        if h.flags & FLAG_VALID_NEWLINE != 0 && b[73..77] != [0x0a, 0x20, 0x0d, 0x0a] {
            return Err(Error::invalid(
                "sparse header end-of-line check bytes are damaged (file was transferred in text mode?)",
            ));
        }
        if h.grain_size == 0 || !h.grain_size.is_power_of_two() {
            return Err(Error::invalid(format!(
                "grain size {} sectors is not a power of two",
                h.grain_size
            )));
        }
        if h.grain_size > MAX_GRAIN_SECTORS {
            return Err(Error::invalid(format!(
                "grain size {} sectors exceeds the limit of {MAX_GRAIN_SECTORS}",
                h.grain_size
            )));
        }
        if h.num_gtes_per_gt == 0 || h.num_gtes_per_gt > MAX_GTES_PER_GT {
            return Err(Error::invalid(format!(
                "{} entries per grain table is outside 1..={MAX_GTES_PER_GT}",
                h.num_gtes_per_gt
            )));
        }
        if h.capacity > MAX_CAPACITY_SECTORS {
            return Err(Error::invalid(format!(
                "capacity {} sectors exceeds the limit of {MAX_CAPACITY_SECTORS}",
                h.capacity
            )));
        }
        if h.num_gdes() > MAX_GD_ENTRIES {
            return Err(Error::invalid(format!(
                "grain directory of {} entries exceeds the limit of {MAX_GD_ENTRIES}",
                h.num_gdes()
            )));
        }
        if h.descriptor_offset != 0 {
            let max = (MAX_DESCRIPTOR_BYTES as u64) / SECTOR_SIZE;
            if h.descriptor_size == 0 || h.descriptor_size > max {
                return Err(Error::invalid(format!(
                    "embedded descriptor size {} sectors is outside 1..={max}",
                    h.descriptor_size
                )));
            }
        }
        // New grains go at the end of the file, never below `overhead`: an overhead a
        // sparse file cannot reach is damage (and would overflow sector arithmetic).
        if h.overhead > MAX_SPARSE_FILE_SECTORS {
            return Err(Error::invalid(format!(
                "overhead {} sectors exceeds the limit of {MAX_SPARSE_FILE_SECTORS} (a sparse extent file holds at most 2 TiB)",
                h.overhead
            )));
        }
        if h.gd_offset == GD_AT_END && h.flags & FLAG_COMPRESSED == 0 {
            return Err(Error::invalid(
                "grain directory offset is GD_AT_END (a streamOptimized footer) but the grains are not compressed",
            ));
        }
        match h.compress_algorithm {
            0 => {}
            1 if h.flags & FLAG_COMPRESSED != 0 => {}
            a => {
                return Err(Error::new(
                    ErrorKind::UnsupportedDiskVersion,
                    format!("unknown compression algorithm {a}"),
                ))
            }
        }
        Ok(h)
    }

    /// Serialises the header (EOL check bytes always written).
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(&SPARSE_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..20].copy_from_slice(&self.capacity.to_le_bytes());
        b[20..28].copy_from_slice(&self.grain_size.to_le_bytes());
        b[28..36].copy_from_slice(&self.descriptor_offset.to_le_bytes());
        b[36..44].copy_from_slice(&self.descriptor_size.to_le_bytes());
        b[44..48].copy_from_slice(&self.num_gtes_per_gt.to_le_bytes());
        b[48..56].copy_from_slice(&self.rgd_offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.gd_offset.to_le_bytes());
        b[64..72].copy_from_slice(&self.overhead.to_le_bytes());
        b[72] = u8::from(self.unclean_shutdown);
        b[73..77].copy_from_slice(&[0x0a, 0x20, 0x0d, 0x0a]);
        b[77..79].copy_from_slice(&self.compress_algorithm.to_le_bytes());
        b
    }

    /// Bytes per grain.
    pub fn grain_bytes(&self) -> u64 {
        self.grain_size * SECTOR_SIZE
    }

    /// Sectors covered by one grain table.
    pub fn gt_coverage(&self) -> u64 {
        u64::from(self.num_gtes_per_gt) * self.grain_size
    }

    /// Number of grain directory entries (validated capacity, so no overflow).
    pub fn num_gdes(&self) -> u64 {
        self.capacity.div_ceil(self.gt_coverage())
    }

    /// Sectors one grain table occupies on disk.
    pub fn gt_sectors(&self) -> u64 {
        (u64::from(self.num_gtes_per_gt) * 4).div_ceil(SECTOR_SIZE)
    }

    /// Sectors the grain directory occupies on disk.
    pub fn gd_sectors(&self) -> u64 {
        (self.num_gdes() * 4).div_ceil(SECTOR_SIZE)
    }

    /// Whether a redundant directory is kept.
    pub fn has_redundant_gd(&self) -> bool {
        self.flags & FLAG_REDUNDANT_GD != 0
    }

    /// Whether grains are compressed (streamOptimized).
    pub fn is_compressed(&self) -> bool {
        self.flags & FLAG_COMPRESSED != 0
    }

    /// Whether a grain table entry of 1 means "zeroed grain".
    pub fn zeroed_gte_enabled(&self) -> bool {
        self.flags & FLAG_ZEROED_GTE != 0
    }
}

/// Layout of a freshly created hosted sparse extent (the layout VMware and qemu
/// write: header, optional descriptor, redundant GD and tables, GD and tables, then
/// grains from a grain-aligned `overhead`; every grain table preallocated).
pub fn new_sparse_header(
    capacity: u64,
    grain_size: u64,
    descriptor_sectors: u64,
) -> Result<SparseHeader> {
    let h = SparseHeader {
        version: 1,
        flags: FLAG_VALID_NEWLINE | FLAG_REDUNDANT_GD,
        capacity,
        grain_size,
        descriptor_offset: if descriptor_sectors > 0 { 1 } else { 0 },
        descriptor_size: descriptor_sectors,
        num_gtes_per_gt: 512,
        rgd_offset: 0,
        gd_offset: 0,
        overhead: 0,
        unclean_shutdown: false,
        compress_algorithm: 0,
    };
    h.fresh_layout()
}

impl SparseHeader {
    /// This header with the layout of a freshly written extent: descriptor area
    /// (if any) after the header, then the redundant directory and its tables (if
    /// the flag is set), then the directory and its tables, all tables preallocated,
    /// grains from a grain-aligned `overhead`. Validated through the parser's rules.
    pub fn fresh_layout(mut self) -> Result<SparseHeader> {
        let mut probe = self.clone();
        probe.gd_offset = 1;
        probe.rgd_offset = 1;
        SparseHeader::parse(&probe.to_bytes())?;
        let tables = self.num_gdes() * self.gt_sectors();
        let mut at = 1;
        if self.descriptor_offset != 0 {
            self.descriptor_offset = 1;
            at += self.descriptor_size;
        }
        if self.has_redundant_gd() {
            self.rgd_offset = at;
            at += self.gd_sectors() + tables;
        } else {
            self.rgd_offset = 0;
        }
        self.gd_offset = at;
        let end = at + self.gd_sectors() + tables;
        self.overhead = end.div_ceil(self.grain_size) * self.grain_size;
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu_100m() -> SparseHeader {
        new_sparse_header(204_800, 128, 20).unwrap()
    }

    #[test]
    fn new_layout_matches_qemu_and_vmware() {
        // qemu 100 MiB monolithicSparse: rgd 21, gd 38, overhead 128.
        let h = qemu_100m();
        assert_eq!((h.rgd_offset, h.gd_offset, h.overhead), (21, 38, 128));
        // VMware split extent of 10 MiB without descriptor: rgd 1, gd 6.
        let h = new_sparse_header(20_480, 128, 0).unwrap();
        assert_eq!((h.rgd_offset, h.gd_offset, h.overhead), (1, 6, 128));
    }

    #[test]
    fn header_round_trips() {
        let h = qemu_100m();
        assert_eq!(SparseHeader::parse(&h.to_bytes()).unwrap(), h);
    }

    fn poke(f: impl FnOnce(&mut [u8; 512])) -> Error {
        let mut b = qemu_100m().to_bytes();
        f(&mut b);
        SparseHeader::parse(&b).unwrap_err()
    }

    #[test]
    fn hostile_fields_are_rejected_with_specific_errors() {
        let e = poke(|b| b[20..28].copy_from_slice(&u64::MAX.to_le_bytes()));
        assert!(e.to_string().contains("grain size"), "{e}");
        let e = poke(|b| b[20..28].copy_from_slice(&0u64.to_le_bytes()));
        assert!(e.to_string().contains("power of two"), "{e}");
        let e = poke(|b| b[20..28].copy_from_slice(&100u64.to_le_bytes()));
        assert!(e.to_string().contains("power of two"), "{e}");
        let e = poke(|b| b[44..48].copy_from_slice(&u32::MAX.to_le_bytes()));
        assert!(e.to_string().contains("entries per grain table"), "{e}");
        let e = poke(|b| b[12..20].copy_from_slice(&u64::MAX.to_le_bytes()));
        assert!(e.to_string().contains("capacity"), "{e}");
        let e = poke(|b| b[4..8].copy_from_slice(&9u32.to_le_bytes()));
        assert_eq!(e.kind(), ErrorKind::UnsupportedDiskVersion);
        let e = poke(|b| b[75] = 0x0a);
        assert!(e.to_string().contains("end-of-line"), "{e}");
        let e = poke(|b| b[0] = b'X');
        assert_eq!(e.kind(), ErrorKind::IncorrectFileType);
        // capacity 0xffffffff with one entry per table: directory too large.
        let e = poke(|b| {
            b[12..20].copy_from_slice(&0xffff_ffffu64.to_le_bytes());
            b[44..48].copy_from_slice(&1u32.to_le_bytes());
        });
        assert!(e.to_string().contains("grain directory"), "{e}");
    }
}
