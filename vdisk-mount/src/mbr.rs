//! MBR (DOS) partition tables: four primary entries in sector 0, and extended
//! partitions holding a chain of extended boot records (EBRs), each with one logical
//! partition and a link to the next EBR.

use std::collections::HashSet;

use crate::limits::{MAX_EBRS, MAX_LOGICAL_PARTITIONS, SECTOR_SIZE};
use crate::source::read_vec;
use crate::{BlockSource, PartWarning, Partition, PartitionKind, PartitionTable, Scheme};

/// Offset of the first of the four entries in an MBR or EBR.
const TABLE_OFFSET: usize = 446;
/// Size of one entry.
const ENTRY_SIZE: usize = 16;
/// Offset of the 0x55, 0xAA boot signature.
const SIGNATURE_OFFSET: usize = 510;
/// Offset of the 32-bit disk signature.
const DISK_SIGNATURE_OFFSET: usize = 440;
/// The type of a GPT protective MBR entry.
pub(crate) const PROTECTIVE: u8 = 0xEE;

/// One 16-byte MBR entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) boot: u8,
    pub(crate) type_byte: u8,
    pub(crate) start_lba: u32,
    pub(crate) sectors: u32,
}

impl Entry {
    fn is_used(&self) -> bool {
        self.type_byte != 0 && self.sectors != 0
    }
}

/// Extended (container) partition types: DOS (0x05), Windows LBA (0x0F), Linux (0x85).
pub(crate) fn is_extended(type_byte: u8) -> bool {
    matches!(type_byte, 0x05 | 0x0F | 0x85)
}

fn has_signature(sector: &[u8]) -> bool {
    sector.len() >= 512 && sector[SIGNATURE_OFFSET] == 0x55 && sector[SIGNATURE_OFFSET + 1] == 0xAA
}

fn entries(sector: &[u8]) -> [Entry; 4] {
    std::array::from_fn(|i| {
        let e = &sector[TABLE_OFFSET + i * ENTRY_SIZE..TABLE_OFFSET + (i + 1) * ENTRY_SIZE];
        Entry {
            boot: e[0],
            type_byte: e[4],
            start_lba: u32::from_le_bytes([e[8], e[9], e[10], e[11]]),
            sectors: u32::from_le_bytes([e[12], e[13], e[14], e[15]]),
        }
    })
}

/// The four entries of sector 0 if it is an MBR: the boot signature is there and every
/// boot indicator is 0x00 or 0x80 (a FAT or NTFS boot sector has code there instead).
pub(crate) fn parse_sector(sector: &[u8]) -> Option<[Entry; 4]> {
    if !has_signature(sector) {
        return None;
    }
    let entries = entries(sector);
    entries
        .iter()
        .all(|e| e.boot == 0 || e.boot == 0x80)
        .then_some(entries)
}

fn partition(number: u32, start: u64, e: &Entry) -> Partition {
    Partition {
        number,
        start,
        length: u64::from(e.sectors) * SECTOR_SIZE,
        kind: PartitionKind::Mbr {
            type_byte: e.type_byte,
            bootable: e.boot == 0x80,
        },
        filesystem: None,
    }
}

/// Fills `table` from an MBR: the primaries, then the logical partitions of every
/// extended partition.
pub(crate) fn read(
    src: &dyn BlockSource,
    sector0: &[u8],
    primaries: &[Entry; 4],
    table: &mut PartitionTable,
) {
    table.scheme = Scheme::Mbr;
    let sig = &sector0[DISK_SIGNATURE_OFFSET..DISK_SIGNATURE_OFFSET + 4];
    table.id = Some(format!(
        "0x{:08x}",
        u32::from_le_bytes([sig[0], sig[1], sig[2], sig[3]])
    ));
    for (slot, e) in (1u32..).zip(primaries.iter()) {
        if e.is_used() {
            table
                .partitions
                .push(partition(slot, u64::from(e.start_lba) * SECTOR_SIZE, e));
        }
    }
    let mut chain = Chain {
        next_number: 5,
        visited: HashSet::new(),
        stopped: false,
    };
    for e in primaries
        .iter()
        .filter(|e| e.is_used() && is_extended(e.type_byte))
    {
        chain.follow(src, u64::from(e.start_lba) * SECTOR_SIZE, table);
    }
}

/// The state shared by the EBR chains of a disk.
struct Chain {
    next_number: u32,
    visited: HashSet<u64>,
    stopped: bool,
}

impl Chain {
    /// Follows the EBR chain of the extended partition starting at byte `base`.
    fn follow(&mut self, src: &dyn BlockSource, base: u64, table: &mut PartitionTable) {
        let mut ebr = base;
        while !self.stopped {
            if self.visited.len() >= MAX_EBRS {
                table
                    .warnings
                    .push(PartWarning::TooManyEbrs { max: MAX_EBRS });
                self.stopped = true;
                return;
            }
            if !self.visited.insert(ebr) {
                table.warnings.push(PartWarning::EbrLoop { offset: ebr });
                return;
            }
            let sector = match read_vec(src, ebr, SECTOR_SIZE as usize) {
                Ok(s) if has_signature(&s) => s,
                _ => {
                    table.warnings.push(PartWarning::BadEbr { offset: ebr });
                    return;
                }
            };
            let entries = entries(&sector);
            // Data entries: relative to this EBR.
            for e in entries
                .iter()
                .filter(|e| e.is_used() && !is_extended(e.type_byte))
            {
                if self.next_number as usize - 5 >= MAX_LOGICAL_PARTITIONS {
                    table.warnings.push(PartWarning::TooManyLogical {
                        max: MAX_LOGICAL_PARTITIONS,
                    });
                    self.stopped = true;
                    return;
                }
                let start = ebr + u64::from(e.start_lba) * SECTOR_SIZE;
                table.partitions.push(partition(self.next_number, start, e));
                self.next_number += 1;
            }
            // The link: relative to the extended partition.
            match entries
                .iter()
                .find(|e| e.is_used() && is_extended(e.type_byte))
            {
                Some(link) => ebr = base + u64::from(link.start_lba) * SECTOR_SIZE,
                None => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(sector: &mut [u8], slot: usize, boot: u8, ty: u8, start: u32, sectors: u32) {
        let e = &mut sector[TABLE_OFFSET + slot * 16..TABLE_OFFSET + slot * 16 + 16];
        e[0] = boot;
        e[4] = ty;
        e[8..12].copy_from_slice(&start.to_le_bytes());
        e[12..16].copy_from_slice(&sectors.to_le_bytes());
    }

    fn sign(sector: &mut [u8]) {
        sector[510] = 0x55;
        sector[511] = 0xAA;
    }

    #[test]
    fn boot_sectors_with_code_are_not_mbrs() {
        let mut s = vec![0u8; 512];
        assert!(parse_sector(&s).is_none());
        sign(&mut s);
        assert!(parse_sector(&s).is_some());
        s[TABLE_OFFSET + 16] = 0x12;
        assert!(parse_sector(&s).is_none());
    }

    #[test]
    fn chain_of_logicals_numbered_from_5() {
        let mut disk = vec![0u8; 64 * 512];
        put(&mut disk[..512], 0, 0x80, 0x83, 1, 3);
        put(&mut disk[..512], 2, 0, 0x0F, 8, 40);
        sign(&mut disk[..512]);
        // EBRs at 8, 16 and 24 (relative 0, 8, 16).
        for (i, ebr) in [8usize, 16, 24].into_iter().enumerate() {
            let s = &mut disk[ebr * 512..ebr * 512 + 512];
            put(s, 0, 0, 0x83, 2, 4);
            if i < 2 {
                put(s, 1, 0, 0x05, 8 * (i as u32 + 1), 8);
            }
            sign(s);
        }
        let table = crate::read_partitions(&disk).unwrap();
        assert_eq!(table.scheme, Scheme::Mbr);
        assert!(table.warnings.is_empty(), "{:?}", table.warnings);
        let got: Vec<_> = table
            .partitions
            .iter()
            .map(|p| (p.number, p.start / 512, p.length / 512))
            .collect();
        assert_eq!(
            got,
            [(1, 1, 3), (3, 8, 40), (5, 10, 4), (6, 18, 4), (7, 26, 4)]
        );
        assert!(table.partitions[1].is_extended());
        assert!(matches!(
            table.partitions[0].kind,
            PartitionKind::Mbr {
                bootable: true,
                type_byte: 0x83
            }
        ));
    }

    #[test]
    fn self_loop_and_cap() {
        let mut disk = vec![0u8; 16 * 512];
        put(&mut disk[..512], 0, 0, 0x05, 1, 15);
        sign(&mut disk[..512]);
        // The EBR links to itself.
        put(&mut disk[512..1024], 0, 0, 0x83, 1, 1);
        put(&mut disk[512..1024], 1, 0, 0x05, 0, 15);
        sign(&mut disk[512..1024]);
        let table = crate::read_partitions(&disk).unwrap();
        assert_eq!(table.partitions.len(), 2);
        assert_eq!(table.warnings, [PartWarning::EbrLoop { offset: 512 }]);

        // An EBR with four data entries, each linking on: the cap stops it.
        let mut disk = vec![0u8; 300 * 512];
        put(&mut disk[..512], 0, 0, 0x05, 1, 299);
        sign(&mut disk[..512]);
        for ebr in 1..299usize {
            let s = &mut disk[ebr * 512..ebr * 512 + 512];
            put(s, 0, 0, 0x83, 0, 1);
            put(s, 1, 0, 0x05, ebr as u32, 1);
            sign(s);
        }
        let table = crate::read_partitions(&disk).unwrap();
        assert_eq!(table.partitions.len(), 1 + MAX_LOGICAL_PARTITIONS);
        assert!(table.warnings.contains(&PartWarning::TooManyLogical {
            max: MAX_LOGICAL_PARTITIONS
        }));
    }
}
