//! GUID partition tables: a header at LBA 1 and a backup at the last LBA, each
//! protected by a CRC32 and pointing at a CRC32-protected partition-entry array.

use crate::limits::{
    MAX_GPT_ENTRY_ARRAY, MAX_GPT_ENTRY_SIZE, MIN_GPT_ENTRY_SIZE, MIN_GPT_HEADER_SIZE, SECTOR_SIZE,
};
use crate::source::read_vec;
use crate::{
    BlockSource, GptHeaderError, PartError, PartWarning, Partition, PartitionKind, PartitionTable,
    Scheme,
};

/// The header signature.
const SIGNATURE: &[u8; 8] = b"EFI PART";
/// Bytes of UTF-16LE name in an entry.
const NAME_BYTES: usize = 72;

/// A header that passed every check, with its entry array.
#[derive(Debug)]
struct Header {
    disk_guid: [u8; 16],
    entry_size: usize,
    entries: Vec<u8>,
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// A GUID in its canonical text form (the first three fields are little-endian on disk).
pub(crate) fn guid_text(g: &[u8]) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
        u32_at(g, 0),
        u16::from_le_bytes([g[4], g[5]]),
        u16::from_le_bytes([g[6], g[7]]),
        g[8],
        g[9],
        g[10],
        g[11],
        g[12],
        g[13],
        g[14],
        g[15]
    )
}

/// Reads and checks the header at `lba` and its entry array.
fn read_header(src: &dyn BlockSource, lba: u64, last_lba: u64) -> Result<Header, GptHeaderError> {
    let sector = read_vec(src, lba * SECTOR_SIZE, SECTOR_SIZE as usize).map_err(|e| {
        GptHeaderError::Unreadable {
            lba,
            reason: e.to_string(),
        }
    })?;
    if &sector[..8] != SIGNATURE {
        return Err(GptHeaderError::NoSignature { lba });
    }
    let header_size = u32_at(&sector, 12);
    if !(MIN_GPT_HEADER_SIZE..=SECTOR_SIZE as u32).contains(&header_size) {
        return Err(GptHeaderError::HeaderSize(header_size));
    }
    let stored = u32_at(&sector, 16);
    let mut copy = sector[..header_size as usize].to_vec();
    copy[16..20].fill(0);
    let computed = crc32fast::hash(&copy);
    if stored != computed {
        return Err(GptHeaderError::HeaderCrc { stored, computed });
    }
    let my_lba = u64_at(&sector, 24);
    if my_lba != lba {
        return Err(GptHeaderError::WrongLba {
            expected: lba,
            found: my_lba,
        });
    }
    let (first, last) = (u64_at(&sector, 40), u64_at(&sector, 48));
    if first > last || last > last_lba {
        return Err(GptHeaderError::UsableRange { first, last });
    }
    let entries_lba = u64_at(&sector, 72);
    let count = u32_at(&sector, 80);
    let entry_size = u32_at(&sector, 84);
    if !(MIN_GPT_ENTRY_SIZE..=MAX_GPT_ENTRY_SIZE).contains(&entry_size)
        || !entry_size.is_multiple_of(8)
    {
        return Err(GptHeaderError::EntrySize(entry_size));
    }
    let bytes = u64::from(count) * u64::from(entry_size);
    if bytes > MAX_GPT_ENTRY_ARRAY {
        return Err(GptHeaderError::EntryArrayTooLarge {
            count,
            entry_size,
            max: MAX_GPT_ENTRY_ARRAY,
        });
    }
    let out_of_range = GptHeaderError::EntryArrayOutOfRange {
        lba: entries_lba,
        bytes,
    };
    let offset = entries_lba
        .checked_mul(SECTOR_SIZE)
        .ok_or(out_of_range.clone())?;
    // `bytes` is at most MAX_GPT_ENTRY_ARRAY, so it fits in usize.
    let entries = read_vec(src, offset, bytes as usize).map_err(|_| out_of_range)?;
    let stored = u32_at(&sector, 88);
    let computed = crc32fast::hash(&entries);
    if stored != computed {
        return Err(GptHeaderError::EntriesCrc { stored, computed });
    }
    Ok(Header {
        disk_guid: sector[56..72].try_into().expect("16 bytes"),
        entry_size: entry_size as usize,
        entries,
    })
}

/// Fills `table` from the GPT of `src`: the primary header if it is good, else the
/// backup (with a warning).
pub(crate) fn read(src: &dyn BlockSource, table: &mut PartitionTable) -> Result<(), PartError> {
    let last_lba = src.size() / SECTOR_SIZE - 1;
    let primary = read_header(src, 1, last_lba);
    let backup = read_header(src, last_lba, last_lba);
    let header = match (primary, backup) {
        (Ok(p), Ok(_)) => p,
        (Ok(p), Err(b)) => {
            table.warnings.push(PartWarning::GptBackupInvalid(b));
            p
        }
        (Err(p), Ok(b)) => {
            table.warnings.push(PartWarning::GptPrimaryInvalid(p));
            b
        }
        (Err(primary), Err(backup)) => return Err(PartError::Gpt { primary, backup }),
    };
    table.scheme = Scheme::Gpt;
    table.id = Some(guid_text(&header.disk_guid));
    for (number, e) in (1u32..).zip(header.entries.chunks_exact(header.entry_size)) {
        if e[..16].iter().all(|&b| b == 0) {
            continue;
        }
        let (first, last) = (u64_at(e, 32), u64_at(e, 40));
        if first > last {
            table.warnings.push(PartWarning::GptEntryInverted {
                number,
                first,
                last,
            });
            continue;
        }
        let units: Vec<u16> = e[56..56 + NAME_BYTES]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        table.partitions.push(Partition {
            number,
            start: first.saturating_mul(SECTOR_SIZE),
            length: (last - first).saturating_add(1).saturating_mul(SECTOR_SIZE),
            kind: PartitionKind::Gpt {
                type_guid: guid_text(&e[..16]),
                unique_guid: guid_text(&e[16..32]),
                name: String::from_utf16_lossy(&units),
            },
            filesystem: None,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_text_is_mixed_endian() {
        // The Linux filesystem data GUID as it is stored.
        let raw = [
            0xAF, 0x3D, 0xC6, 0x0F, 0x83, 0x84, 0x72, 0x47, 0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47,
            0x7D, 0xE4,
        ];
        assert_eq!(guid_text(&raw), "0FC63DAF-8483-4772-8E79-3D69D8477DE4");
    }
}
