//! Errors (the table cannot be read) and warnings (it can, but something is off).

use thiserror::Error;

/// Why a partition table could not be read.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum PartError {
    /// The source failed to read a range.
    #[error("cannot read {len} bytes at offset {offset}: {source}")]
    Read {
        /// Byte offset of the read.
        offset: u64,
        /// Length of the read.
        len: usize,
        /// What the source reported.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// A read would go past the end of the source.
    #[error("read of {len} bytes at offset {offset} is past the end of the disk ({size} bytes)")]
    OutOfRange {
        /// Byte offset of the read.
        offset: u64,
        /// Length of the read.
        len: usize,
        /// Size of the source.
        size: u64,
    },
    /// The protective MBR announces a GPT but neither GPT header is usable.
    #[error("no usable GPT header: primary: {primary}; backup: {backup}")]
    Gpt {
        /// What is wrong with the primary header (LBA 1).
        primary: GptHeaderError,
        /// What is wrong with the backup header (last LBA).
        backup: GptHeaderError,
    },
}

/// What is wrong with one GPT header or its partition-entry array.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum GptHeaderError {
    /// The sector cannot be read (past the end of the disk, or an I/O error).
    #[error("header at LBA {lba} cannot be read: {reason}")]
    Unreadable {
        /// LBA of the header.
        lba: u64,
        /// The read error, as text.
        reason: String,
    },
    /// No `EFI PART` signature.
    #[error("no \"EFI PART\" signature at LBA {lba}")]
    NoSignature {
        /// LBA of the header.
        lba: u64,
    },
    /// The header size is below 92 bytes or above a sector.
    #[error("header size {0} is out of range")]
    HeaderSize(u32),
    /// The header CRC32 does not match.
    #[error("header CRC32 {stored:#010x} does not match the computed {computed:#010x}")]
    HeaderCrc {
        /// CRC in the header.
        stored: u32,
        /// CRC computed over the header.
        computed: u32,
    },
    /// The header does not name the LBA it was read from.
    #[error("header read at LBA {expected} says it is at LBA {found}")]
    WrongLba {
        /// Where the header was read.
        expected: u64,
        /// Where it says it is.
        found: u64,
    },
    /// The first usable LBA is after the last.
    #[error("usable range {first}..={last} is empty or past the end of the disk")]
    UsableRange {
        /// First usable LBA.
        first: u64,
        /// Last usable LBA.
        last: u64,
    },
    /// The partition-entry size is not a multiple of 8 in 128..=4096.
    #[error("partition entry size {0} is invalid")]
    EntrySize(u32),
    /// The partition-entry array is larger than [`crate::limits::MAX_GPT_ENTRY_ARRAY`].
    #[error("partition entry array of {count} entries of {entry_size} bytes exceeds {max} bytes")]
    EntryArrayTooLarge {
        /// Number of entries claimed.
        count: u32,
        /// Size of one entry.
        entry_size: u32,
        /// The limit.
        max: u64,
    },
    /// The partition-entry array lies (partly) past the end of the disk.
    #[error("partition entry array at LBA {lba} ({bytes} bytes) is past the end of the disk")]
    EntryArrayOutOfRange {
        /// LBA of the array.
        lba: u64,
        /// Its size in bytes.
        bytes: u64,
    },
    /// The partition-entry array CRC32 does not match.
    #[error(
        "partition entry array CRC32 {stored:#010x} does not match the computed {computed:#010x}"
    )]
    EntriesCrc {
        /// CRC in the header.
        stored: u32,
        /// CRC computed over the array.
        computed: u32,
    },
}

/// Damage that did not stop the table from being read.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum PartWarning {
    /// The primary GPT header is bad; the partitions come from the backup.
    #[error("primary GPT header is invalid ({0}); using the backup header")]
    GptPrimaryInvalid(GptHeaderError),
    /// The primary GPT header is good but the backup is not.
    #[error("backup GPT header is invalid ({0})")]
    GptBackupInvalid(GptHeaderError),
    /// A GPT entry ends before it starts; it is skipped.
    #[error("GPT entry {number} has first LBA {first} after last LBA {last}; skipped")]
    GptEntryInverted {
        /// Partition number (entry index + 1).
        number: u32,
        /// First LBA.
        first: u64,
        /// Last LBA.
        last: u64,
    },
    /// An EBR chain comes back to an EBR already read; the chain stops there.
    #[error("EBR chain loops back to the EBR at byte {offset}; chain truncated")]
    EbrLoop {
        /// Byte offset of the revisited EBR.
        offset: u64,
    },
    /// An EBR cannot be read or has no 0x55AA signature; the chain stops there.
    #[error("EBR at byte {offset} is unreadable or has no boot signature; chain truncated")]
    BadEbr {
        /// Byte offset of the EBR.
        offset: u64,
    },
    /// More logical partitions than [`crate::limits::MAX_LOGICAL_PARTITIONS`].
    #[error("more than {max} logical partitions; the rest are ignored")]
    TooManyLogical {
        /// The limit.
        max: usize,
    },
    /// More EBRs than [`crate::limits::MAX_EBRS`].
    #[error("EBR chain longer than {max} records; the rest is ignored")]
    TooManyEbrs {
        /// The limit.
        max: usize,
    },
    /// A partition ends past the end of the disk.
    #[error("partition {number} ends at byte {end}, past the end of the disk ({size} bytes)")]
    PastEnd {
        /// Partition number.
        number: u32,
        /// Its end (exclusive), in bytes.
        end: u64,
        /// The disk size.
        size: u64,
    },
    /// Two partitions overlap.
    #[error("partitions {first} and {second} overlap")]
    Overlap {
        /// The partition that starts first.
        first: u32,
        /// The partition that starts inside it.
        second: u32,
    },
}
