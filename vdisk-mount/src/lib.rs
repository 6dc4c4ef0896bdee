//! Disk mount library: what is on a disk, and mounting it with FUSE.
//!
//! [`read_partitions`] finds the partition table of a disk (GPT, with its protective
//! MBR, header and entry-array CRCs checked and the backup header used when the
//! primary is damaged; else MBR, with the chain of extended boot records followed and
//! logical partitions numbered 5, 6, ... as Linux does; else none) and
//! [`detect_filesystem`] recognises the file system (or swap area, or LVM physical
//! volume) inside a byte range by its signature.
//!
//! Everything works over the [`BlockSource`] trait, implemented for [`vdisk::Disk`],
//! for byte buffers and for plain files, and is written for hostile input: every
//! structure read from the disk is bounded by the limits in [`limits`], loops in EBR
//! chains are detected, and damage the table survives is reported as a
//! [`PartWarning`] in [`PartitionTable::warnings`]; damage it does not survive is a
//! [`PartError`]. Sectors are 512 bytes.
//!
//! [`mount`] serves an open disk with FUSE as a directory holding `flat` (the whole
//! disk) and `p1`, `p2`, ... (its partitions), non-persistent by default (writes go
//! to a throwaway redo log; the disk files never change), persistent or read-only on
//! request; [`mountinfo`] finds the mounts made that way. [`mount_volume`] mounts the
//! file system of one partition on a folder (FUSE, then a loop device and mount(8),
//! as root), as vmware-mount does.
//!
//! ```
//! use vdisk_mount::{read_partitions, Scheme};
//! let blank = vec![0u8; 1 << 20];
//! let table = read_partitions(&blank).unwrap();
//! assert_eq!(table.scheme, Scheme::None);
//! assert!(table.partitions.is_empty());
//! ```

mod error;
mod filesystem;
mod fuse;
pub mod fuzzing;
mod gpt;
mod mbr;
mod mount;
pub mod mountinfo;
mod prefetch;
mod source;
pub mod volume;

pub use error::{GptHeaderError, PartError, PartWarning};
pub use filesystem::{detect_filesystem, Filesystem, FsKind};
pub use fuse::{MountedFile, MAX_REQUEST};
pub use mount::{
    fusermount3, mount, mount_opened, Mode, MountError, MountOptions, Mounted, OpenedDisk,
};
pub use source::{BlockSource, DiskSource};
pub use volume::{mount_volume, mount_volume_opened, MountedVolume, VolumeOptions};

/// The bounds every parser keeps to, whatever the disk says.
pub mod limits {
    /// The sector size partition tables are read with.
    pub const SECTOR_SIZE: u64 = 512;
    /// At most this many logical partitions are read from an EBR chain.
    pub const MAX_LOGICAL_PARTITIONS: usize = 128;
    /// At most this many extended boot records are visited (empty ones included).
    pub const MAX_EBRS: usize = 256;
    /// The largest GPT partition-entry array read, in bytes.
    pub const MAX_GPT_ENTRY_ARRAY: u64 = 1 << 20;
    /// The largest GPT partition entry, in bytes.
    pub const MAX_GPT_ENTRY_SIZE: u32 = 4096;
    /// The smallest GPT partition entry, in bytes (UEFI: 128 * 2^n).
    pub const MIN_GPT_ENTRY_SIZE: u32 = 128;
    /// The smallest GPT header (UEFI 2.x: 92 bytes).
    pub const MIN_GPT_HEADER_SIZE: u32 = 92;
}

use limits::SECTOR_SIZE;
use source::read_vec;

/// The kind of partition table found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Scheme {
    /// No partition table (a blank disk, or a file system on the whole disk).
    #[default]
    None,
    /// An MBR (DOS) table, with extended partitions followed.
    Mbr,
    /// A GUID partition table.
    Gpt,
}

/// What a partition table entry says about its partition.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PartitionKind {
    /// An MBR entry (primary, extended container, or logical).
    Mbr {
        /// The system ID (0x83 Linux, 0x07 NTFS/exFAT, 0x0C FAT32 LBA, 0x05 extended, ...).
        type_byte: u8,
        /// The boot indicator is 0x80.
        bootable: bool,
    },
    /// A GPT entry.
    Gpt {
        /// Partition type GUID in canonical upper-case text.
        type_guid: String,
        /// Unique partition GUID in canonical upper-case text.
        unique_guid: String,
        /// The partition name (UTF-16LE in the entry).
        name: String,
    },
}

/// One partition.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Partition {
    /// Its number as Linux gives it: MBR primaries 1-4 by slot, logicals 5, 6, ...
    /// in chain order; GPT entry index + 1.
    pub number: u32,
    /// Start, in bytes from the start of the disk.
    pub start: u64,
    /// Length in bytes (as the table says, even if it runs past the end of the disk).
    pub length: u64,
    /// What the table says about it.
    pub kind: PartitionKind,
    /// The file system found in it by [`detect_filesystem`].
    pub filesystem: Option<Filesystem>,
}

impl Partition {
    /// An MBR extended partition (0x05, 0x0F, 0x85): a container of logical
    /// partitions, with nothing of its own to mount.
    pub fn is_extended(&self) -> bool {
        matches!(self.kind, PartitionKind::Mbr { type_byte, .. } if mbr::is_extended(type_byte))
    }

    /// The end of the partition (exclusive), in bytes.
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.length)
    }
}

/// The partitions of a disk.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PartitionTable {
    /// The kind of table.
    pub scheme: Scheme,
    /// The disk identifier: the MBR disk signature as `0x%08x`, the GPT disk GUID.
    pub id: Option<String>,
    /// The partitions, in table order (MBR: primaries, then logicals; GPT: entries).
    pub partitions: Vec<Partition>,
    /// Damage found and worked around.
    pub warnings: Vec<PartWarning>,
    /// With [`Scheme::None`], the file system found on the whole disk, if any.
    pub filesystem: Option<Filesystem>,
}

/// Reads the partition table of `src` (GPT, else MBR, else none) and detects the file
/// system of each partition.
///
/// Damage the table survives (a bad primary GPT header with a good backup, a looping
/// or over-long EBR chain, partitions past the end of the disk or overlapping) is
/// reported in [`PartitionTable::warnings`]; a protective MBR with no usable GPT header
/// is [`PartError::Gpt`], and a failing read of the first sector an error of the source.
pub fn read_partitions(src: &dyn BlockSource) -> Result<PartitionTable, PartError> {
    let size = src.size();
    let mut table = PartitionTable::default();
    if size < SECTOR_SIZE {
        return Ok(table);
    }
    let sector0 = read_vec(src, 0, SECTOR_SIZE as usize)?;
    match mbr::parse_sector(&sector0) {
        None => {}
        Some(entries) if entries.iter().any(|e| e.type_byte == mbr::PROTECTIVE) => {
            gpt::read(src, &mut table)?;
        }
        Some(entries) => {
            mbr::read(src, &sector0, &entries, &mut table);
            // A volume boot sector (NTFS, FAT) has the 0x55AA signature too.
            if table.partitions.is_empty() && table.warnings.is_empty() {
                table = PartitionTable::default();
            }
        }
    }
    if table.scheme == Scheme::None {
        table.filesystem = detect_filesystem(src, 0, size);
        return Ok(table);
    }
    check_layout(&mut table, size);
    for p in table.partitions.iter_mut().filter(|p| !p.is_extended()) {
        p.filesystem = detect_filesystem(src, p.start, p.length);
    }
    Ok(table)
}

/// Warns about partitions past the end of the disk and about overlapping data
/// partitions (extended containers hold their logicals and are left out).
fn check_layout(table: &mut PartitionTable, size: u64) {
    for p in &table.partitions {
        if p.end() > size || p.start.checked_add(p.length).is_none() {
            table.warnings.push(PartWarning::PastEnd {
                number: p.number,
                end: p.end(),
                size,
            });
        }
    }
    let mut data: Vec<&Partition> = table
        .partitions
        .iter()
        .filter(|p| !p.is_extended() && p.length > 0)
        .collect();
    data.sort_by_key(|p| (p.start, p.number));
    let mut reach: Option<&Partition> = None;
    for p in data {
        match reach {
            Some(r) if p.start < r.end() => {
                table.warnings.push(PartWarning::Overlap {
                    first: r.number,
                    second: p.number,
                });
                if p.end() > r.end() {
                    reach = Some(p);
                }
            }
            _ => reach = Some(p),
        }
    }
}
