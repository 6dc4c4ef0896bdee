//! The ESXi vmfsSparse (`COWD`, `-delta.vmdk`) header: 2048 bytes at sector 0.
//!
//! A COWD file has the same two-level structure as a hosted sparse extent - a grain
//! directory of sector numbers of grain tables, grain tables of sector numbers of
//! grains - with fixed parameters: 4096 entries per table, no redundant copies, no
//! zeroed-grain entries, tables and grains allocated at the end of the file. So the
//! hosted sparse extent serves it; this module only parses and writes the header and
//! describes its geometry as a [`SparseHeader`].

use crate::error::{Error, ErrorKind, Result};
use crate::extent::sparse::header::{SparseHeader, FLAG_VALID_NEWLINE};
use crate::limits::{MAX_GD_ENTRIES, MAX_GRAIN_SECTORS, SECTOR_SIZE};

/// `COWD` as a little-endian u32.
pub const COWD_MAGIC: u32 = 0x4457_4F43;
/// Header size in bytes (4 sectors).
pub const COWD_HEADER_SIZE: usize = 2048;
/// Entries per COWD grain table (fixed by the format).
pub const COWD_GTES_PER_GT: u32 = 4096;
/// Sector of the grain directory in files ESXi writes.
pub const COWD_GD_OFFSET: u32 = 4;
/// Largest capacity: the sector count is a u32.
pub const COWD_MAX_SECTORS: u64 = u32::MAX as u64;

/// The fields of a COWD header this library uses; everything else is kept as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CowdHeader {
    /// Format version (1).
    pub version: u32,
    /// Flags (3 in ESXi files; meaning undocumented).
    pub flags: u32,
    /// Capacity in sectors.
    pub num_sectors: u32,
    /// Sectors per grain.
    pub grain_size: u32,
    /// Sector of the grain directory.
    pub gd_offset: u32,
    /// Entries in the grain directory.
    pub num_gd_entries: u32,
    /// Next free sector.
    pub free_sector: u32,
    /// Set while a writer has the file open.
    pub unclean_shutdown: bool,
    /// The whole header as read (or built), so unknown fields survive a rewrite.
    raw: Vec<u8>,
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Whether `b` starts with the COWD magic.
pub fn has_cowd_magic(b: &[u8]) -> bool {
    b.len() >= 4 && u32_at(b, 0) == COWD_MAGIC
}

impl CowdHeader {
    /// Parses and validates a header; errors name the field at fault.
    pub fn parse(b: &[u8]) -> Result<CowdHeader> {
        if b.len() < COWD_HEADER_SIZE || !has_cowd_magic(b) {
            return Err(Error::new(
                ErrorKind::IncorrectFileType,
                "not a vmfsSparse extent (no COWD magic or a short header)",
            ));
        }
        let h = CowdHeader {
            version: u32_at(b, 4),
            flags: u32_at(b, 8),
            num_sectors: u32_at(b, 12),
            grain_size: u32_at(b, 16),
            gd_offset: u32_at(b, 20),
            num_gd_entries: u32_at(b, 24),
            free_sector: u32_at(b, 28),
            unclean_shutdown: u32_at(b, 1648) != 0,
            raw: b[..COWD_HEADER_SIZE].to_vec(),
        };
        if h.version != 1 {
            return Err(Error::new(
                ErrorKind::UnsupportedDiskVersion,
                format!("COWD header version {} is not 1", h.version),
            ));
        }
        let g = u64::from(h.grain_size);
        if g == 0 || !g.is_power_of_two() || g > MAX_GRAIN_SECTORS {
            return Err(Error::invalid(format!(
                "COWD grain size {g} sectors is not a power of two up to {MAX_GRAIN_SECTORS}"
            )));
        }
        let need = u64::from(h.num_sectors).div_ceil(u64::from(COWD_GTES_PER_GT) * g);
        if u64::from(h.num_gd_entries) < need || u64::from(h.num_gd_entries) > MAX_GD_ENTRIES {
            return Err(Error::invalid(format!(
                "COWD grain directory of {} entries does not fit a capacity of {} sectors ({need} needed, at most {MAX_GD_ENTRIES})",
                h.num_gd_entries, h.num_sectors
            )));
        }
        if h.gd_offset < 4 {
            return Err(Error::invalid(format!(
                "COWD grain directory at sector {} overlaps the header",
                h.gd_offset
            )));
        }
        Ok(h)
    }

    /// A header for a new, empty delta of `capacity` sectors (grain of one sector,
    /// as ESXi writes them).
    pub fn new(capacity: u64) -> Result<CowdHeader> {
        let num_sectors = u32::try_from(capacity).map_err(|_| {
            Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "a vmfsSparse disk holds at most {COWD_MAX_SECTORS} sectors (2 TiB), not {capacity}"
                ),
            )
        })?;
        let entries = capacity.div_ceil(u64::from(COWD_GTES_PER_GT));
        let gd_sectors = (entries * 4).div_ceil(SECTOR_SIZE);
        let mut h = CowdHeader {
            version: 1,
            flags: 3,
            num_sectors,
            grain_size: 1,
            gd_offset: COWD_GD_OFFSET,
            num_gd_entries: entries as u32,
            free_sector: COWD_GD_OFFSET + gd_sectors as u32,
            unclean_shutdown: false,
            raw: vec![0; COWD_HEADER_SIZE],
        };
        h.raw = h.to_bytes();
        Ok(h)
    }

    /// Serialises the header.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = self.raw.clone();
        b.resize(COWD_HEADER_SIZE, 0);
        let mut put = |off: usize, v: u32| b[off..off + 4].copy_from_slice(&v.to_le_bytes());
        put(0, COWD_MAGIC);
        put(4, self.version);
        put(8, self.flags);
        put(12, self.num_sectors);
        put(16, self.grain_size);
        put(20, self.gd_offset);
        put(24, self.num_gd_entries);
        put(28, self.free_sector);
        put(1648, u32::from(self.unclean_shutdown));
        b
    }

    /// Sectors the grain directory occupies.
    pub fn gd_sectors(&self) -> u64 {
        (u64::from(self.num_gd_entries) * 4).div_ceil(SECTOR_SIZE)
    }

    /// The geometry as a hosted sparse header (no redundant directory, no zeroed
    /// grains, no embedded descriptor), for the shared sparse extent code.
    pub fn geometry(&self) -> SparseHeader {
        SparseHeader {
            version: 1,
            flags: FLAG_VALID_NEWLINE,
            capacity: u64::from(self.num_sectors),
            grain_size: u64::from(self.grain_size),
            descriptor_offset: 0,
            descriptor_size: 0,
            num_gtes_per_gt: COWD_GTES_PER_GT,
            rgd_offset: 0,
            gd_offset: u64::from(self.gd_offset),
            overhead: u64::from(self.gd_offset) + self.gd_sectors(),
            unclean_shutdown: self.unclean_shutdown,
            compress_algorithm: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_header_round_trips_and_matches_esxi_layout() {
        let h = CowdHeader::new(204_800).unwrap();
        let b = h.to_bytes();
        assert_eq!(&b[0..4], b"COWD");
        let p = CowdHeader::parse(&b).unwrap();
        assert_eq!(p, h);
        assert_eq!(p.num_gd_entries, 50);
        assert_eq!(p.free_sector, 5);
        assert_eq!(p.geometry().num_gdes(), 50);
    }

    #[test]
    fn hostile_fields_are_rejected() {
        let mut b = CowdHeader::new(204_800).unwrap().to_bytes();
        b[16..20].copy_from_slice(&3u32.to_le_bytes());
        assert!(CowdHeader::parse(&b)
            .unwrap_err()
            .to_string()
            .contains("grain size"));
        let mut b = CowdHeader::new(204_800).unwrap().to_bytes();
        b[24..28].copy_from_slice(&1u32.to_le_bytes());
        assert!(CowdHeader::parse(&b)
            .unwrap_err()
            .to_string()
            .contains("directory"));
        let mut b = CowdHeader::new(204_800).unwrap().to_bytes();
        b[4..8].copy_from_slice(&7u32.to_le_bytes());
        assert_eq!(
            CowdHeader::parse(&b).unwrap_err().kind(),
            ErrorKind::UnsupportedDiskVersion
        );
        assert!(CowdHeader::new(1 << 33).is_err());
    }
}
