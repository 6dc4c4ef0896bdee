//! Which volumes a disk has, from its partition table.
//!
//! Every partition that can hold data is a volume: each MBR primary or logical
//! partition (not the extended containers, which hold only the logical ones) and each
//! GPT entry, with a length. A disk without a partition table is one volume when a
//! file system covers it. Whether a volume can be mounted is a separate question
//! ([`VolumeSpec::check_mountable`]): swap areas, LVM physical volumes and
//! partitions without a recognised file system are listed but not mounted, as VDDK
//! lists swap partitions and refuses to mount them.

use vdisk_mount::{FsKind, PartitionTable, Scheme};

use crate::types::{VixVolumeType, VIXMNTAPI_BASIC_PARTITION, VIXMNTAPI_GPT_PARTITION};

/// One volume of a disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct VolumeSpec {
    /// The partition number (Linux numbering); None for a file system on the whole
    /// disk.
    pub partition: Option<u32>,
    /// `VIXMNTAPI_BASIC_PARTITION` (MBR, or the whole disk) or
    /// `VIXMNTAPI_GPT_PARTITION`.
    pub volume_type: VixVolumeType,
    /// What is in it, if recognised.
    pub content: Option<FsKind>,
}

impl VolumeSpec {
    /// The name of its mount folder and in messages: `p1`, `p5`, ... or `disk`.
    pub fn name(&self) -> String {
        match self.partition {
            Some(n) => format!("p{n}"),
            None => "disk".to_string(),
        }
    }

    /// Ok when it holds a file system to mount; otherwise why not.
    pub fn check_mountable(&self) -> Result<(), String> {
        let what = match self.partition {
            Some(n) => format!("partition {n}"),
            None => "the disk".to_string(),
        };
        match self.content {
            Some(kind) if kind.is_mountable() => Ok(()),
            Some(FsKind::Swap) => Err(format!("{what} is a swap area, which cannot be mounted")),
            Some(kind) if kind == FsKind::Lvm2Pv => Err(format!(
                "{what} is an LVM physical volume ({}); LVM volumes are not supported",
                kind.mount_type()
            )),
            Some(kind) => Err(format!("{what} holds {kind}, which cannot be mounted")),
            None => Err(format!(
                "{what} holds no recognised file system, so it cannot be mounted"
            )),
        }
    }
}

/// The volumes of a disk with partition table `table`, in table order.
pub(crate) fn volumes(table: &PartitionTable) -> Vec<VolumeSpec> {
    match table.scheme {
        Scheme::None => table
            .filesystem
            .as_ref()
            .map(|fs| VolumeSpec {
                partition: None,
                volume_type: VIXMNTAPI_BASIC_PARTITION,
                content: Some(fs.kind),
            })
            .into_iter()
            .collect(),
        Scheme::Mbr | Scheme::Gpt => {
            let volume_type = if table.scheme == Scheme::Gpt {
                VIXMNTAPI_GPT_PARTITION
            } else {
                VIXMNTAPI_BASIC_PARTITION
            };
            table
                .partitions
                .iter()
                .filter(|p| !p.is_extended() && p.length > 0)
                .map(|p| VolumeSpec {
                    partition: Some(p.number),
                    volume_type,
                    content: p.filesystem.as_ref().map(|fs| fs.kind),
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk image in memory with an MBR: `entries` are (type byte, start sector,
    /// sectors); an ext4 superblock magic is put into the partitions of type 0x83
    /// and a swap signature into those of type 0x82.
    fn mbr_disk(entries: &[(u8, u32, u32)]) -> Vec<u8> {
        let mut d = vec![0u8; 8 << 20];
        for (i, &(ty, start, len)) in entries.iter().enumerate() {
            let e = 446 + 16 * i;
            d[e + 4] = ty;
            d[e + 8..e + 12].copy_from_slice(&start.to_le_bytes());
            d[e + 12..e + 16].copy_from_slice(&len.to_le_bytes());
            let base = start as usize * 512;
            match ty {
                0x83 => {
                    // ext4: magic, a journal, and the extents incompat feature.
                    let sb = base + 1024;
                    d[sb + 56..sb + 58].copy_from_slice(&0xEF53u16.to_le_bytes());
                    d[sb + 92..sb + 96].copy_from_slice(&4u32.to_le_bytes());
                    d[sb + 96..sb + 100].copy_from_slice(&0x40u32.to_le_bytes());
                    d[sb + 24..sb + 28].copy_from_slice(&2u32.to_le_bytes());
                    d[sb + 4..sb + 8].copy_from_slice(&(len / 8).to_le_bytes());
                }
                0x82 => {
                    d[base + 4096 - 10..base + 4096].copy_from_slice(b"SWAPSPACE2");
                }
                _ => {}
            }
        }
        d[510] = 0x55;
        d[511] = 0xAA;
        d
    }

    #[test]
    fn mbr_partitions_are_basic_volumes_and_only_file_systems_mount() {
        let disk = mbr_disk(&[(0x83, 2048, 4096), (0x82, 6144, 2048), (0x0c, 8192, 2048)]);
        let table = vdisk_mount::read_partitions(&disk).unwrap();
        let v = volumes(&table);
        assert_eq!(v.len(), 3, "{v:?}");
        assert!(v.iter().all(|v| v.volume_type == VIXMNTAPI_BASIC_PARTITION));
        assert_eq!(
            v.iter().map(VolumeSpec::name).collect::<Vec<_>>(),
            ["p1", "p2", "p3"]
        );
        assert_eq!(v[0].content.map(|k| k.mount_type()), Some("ext4"));
        assert!(v[0].check_mountable().is_ok());
        let swap = v[1].check_mountable().unwrap_err();
        assert!(swap.contains("partition 2 is a swap area"), "{swap}");
        let empty = v[2].check_mountable().unwrap_err();
        assert!(empty.contains("no recognised file system"), "{empty}");
    }

    #[test]
    fn extended_containers_are_not_volumes() {
        let mut disk = mbr_disk(&[(0x83, 2048, 2048), (0x05, 4096, 8192)]);
        // One logical partition: an EBR at the start of the container.
        let ebr = 4096 * 512;
        disk[ebr + 446 + 4] = 0x83;
        disk[ebr + 446 + 8..ebr + 446 + 12].copy_from_slice(&2048u32.to_le_bytes());
        disk[ebr + 446 + 12..ebr + 446 + 16].copy_from_slice(&2048u32.to_le_bytes());
        disk[ebr + 510] = 0x55;
        disk[ebr + 511] = 0xAA;
        let table = vdisk_mount::read_partitions(&disk).unwrap();
        let names: Vec<String> = volumes(&table).iter().map(VolumeSpec::name).collect();
        assert_eq!(names, ["p1", "p5"]);
    }

    #[test]
    fn a_blank_disk_has_no_volumes() {
        let table = vdisk_mount::read_partitions(&vec![0u8; 1 << 20]).unwrap();
        assert!(volumes(&table).is_empty());
    }

    #[test]
    fn a_file_system_on_the_whole_disk_is_one_volume() {
        let mut disk = vec![0u8; 4 << 20];
        disk[1024 + 56..1024 + 58].copy_from_slice(&0xEF53u16.to_le_bytes());
        let table = vdisk_mount::read_partitions(&disk).unwrap();
        let v = volumes(&table);
        assert_eq!(v.len(), 1, "{table:?}");
        assert_eq!(v[0].partition, None);
        assert_eq!(v[0].name(), "disk");
        assert_eq!(v[0].volume_type, VIXMNTAPI_BASIC_PARTITION);
        assert!(v[0].check_mountable().is_ok());
    }
}
