//! File-system (and swap, and LVM) signatures.

use std::fmt;

use crate::source::read_vec;
use crate::BlockSource;

/// Offset of the ext2/3/4 superblock.
const EXT_SUPERBLOCK: u64 = 1024;
/// The ext superblock magic, at offset 56 of the superblock.
const EXT_MAGIC: u16 = 0xEF53;
/// ext3's `has_journal` compat feature.
const EXT_COMPAT_HAS_JOURNAL: u32 = 0x4;
/// Incompat features ext3 knows (filetype, recover, meta_bg): any other makes it ext4.
const EXT3_INCOMPAT: u32 = 0x2 | 0x4 | 0x10;
/// Ro-compat features ext3 knows (sparse_super, large_file, btree_dir).
const EXT3_RO_COMPAT: u32 = 0x1 | 0x2 | 0x4;
/// Offset of the btrfs superblock; its magic is 64 bytes in.
const BTRFS_SUPERBLOCK: u64 = 65536;
/// Page sizes a swap signature is looked for at the end of.
const SWAP_PAGE_SIZES: [u64; 4] = [4096, 8192, 16384, 65536];
/// LVM2 labels are in one of the first four sectors.
const LVM_LABEL_SECTORS: u64 = 4;

/// A kind of file system (or other volume content).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FsKind {
    /// ext2 (no journal).
    Ext2,
    /// ext3 (journal, no ext4 features).
    Ext3,
    /// ext4.
    Ext4,
    /// FAT with 12-bit entries.
    Fat12,
    /// FAT with 16-bit entries.
    Fat16,
    /// FAT32.
    Fat32,
    /// exFAT.
    ExFat,
    /// NTFS.
    Ntfs,
    /// XFS.
    Xfs,
    /// btrfs.
    Btrfs,
    /// A Linux swap area.
    Swap,
    /// An LVM2 physical volume.
    Lvm2Pv,
}

impl FsKind {
    /// The name `blkid` and `mount -t` use: `ext4`, `vfat`, `ntfs`, `swap`, `LVM2_member`, ...
    pub fn mount_type(self) -> &'static str {
        match self {
            FsKind::Ext2 => "ext2",
            FsKind::Ext3 => "ext3",
            FsKind::Ext4 => "ext4",
            FsKind::Fat12 | FsKind::Fat16 | FsKind::Fat32 => "vfat",
            FsKind::ExFat => "exfat",
            FsKind::Ntfs => "ntfs",
            FsKind::Xfs => "xfs",
            FsKind::Btrfs => "btrfs",
            FsKind::Swap => "swap",
            FsKind::Lvm2Pv => "LVM2_member",
        }
    }

    /// Whether it holds files to mount (not swap, not an LVM physical volume).
    pub fn is_mountable(self) -> bool {
        !matches!(self, FsKind::Swap | FsKind::Lvm2Pv)
    }
}

impl fmt::Display for FsKind {
    /// The human name: `ext4`, `FAT32`, `exFAT`, `NTFS`, `LVM2 PV`, ...
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FsKind::Fat12 => "FAT12",
            FsKind::Fat16 => "FAT16",
            FsKind::Fat32 => "FAT32",
            FsKind::ExFat => "exFAT",
            FsKind::Ntfs => "NTFS",
            FsKind::Xfs => "XFS",
            FsKind::Lvm2Pv => "LVM2 PV",
            other => other.mount_type(),
        })
    }
}

/// A file system found by its signature.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Filesystem {
    /// Its kind.
    pub kind: FsKind,
    /// The volume label, when the signature block holds it (ext, FAT boot sector,
    /// XFS, btrfs, swap) and it is not empty.
    pub label: Option<String>,
}

impl Filesystem {
    fn new(kind: FsKind, label: Option<String>) -> Self {
        Filesystem { kind, label }
    }
}

impl fmt::Display for Filesystem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.label {
            Some(l) => write!(f, "{} \"{l}\"", self.kind),
            None => write!(f, "{}", self.kind),
        }
    }
}

/// A bounded view of `len` bytes at `start` of a source, clamped to the source.
struct Volume<'a> {
    src: &'a dyn BlockSource,
    start: u64,
    len: u64,
}

impl Volume<'_> {
    /// `n` bytes at `off` of the volume, or `None` past its end or on a read error.
    fn bytes(&self, off: u64, n: usize) -> Option<Vec<u8>> {
        if off.checked_add(n as u64)? > self.len {
            return None;
        }
        read_vec(self.src, self.start.checked_add(off)?, n).ok()
    }
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// A label from a fixed-size field: up to the first NUL, trailing spaces trimmed,
/// `None` if empty.
fn label(field: &[u8]) -> Option<String> {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    let text = String::from_utf8_lossy(&field[..end]);
    let text = text.trim_end_matches(' ');
    (!text.is_empty()).then(|| text.to_string())
}

/// Recognises the file system in the `length` bytes at byte `start` of `src` by its
/// signature (the range is clamped to the source). Unreadable or unrecognised content
/// gives `None`.
pub fn detect_filesystem(src: &dyn BlockSource, start: u64, length: u64) -> Option<Filesystem> {
    let len = length.min(src.size().saturating_sub(start));
    let vol = Volume { src, start, len };
    // Superblocks beyond the first sector first: mkfs of these leaves old boot
    // sectors in place, while FAT, exFAT and NTFS overwrite sector 0.
    xfs(&vol)
        .or_else(|| btrfs(&vol))
        .or_else(|| ext(&vol))
        .or_else(|| swap(&vol))
        .or_else(|| lvm(&vol))
        .or_else(|| boot_sector(&vol))
}

fn xfs(vol: &Volume) -> Option<Filesystem> {
    let sb = vol.bytes(0, 120)?;
    (&sb[..4] == b"XFSB").then(|| Filesystem::new(FsKind::Xfs, label(&sb[108..120])))
}

fn btrfs(vol: &Volume) -> Option<Filesystem> {
    let sb = vol.bytes(BTRFS_SUPERBLOCK, 0x12b + 256)?;
    (&sb[64..72] == b"_BHRfS_M")
        .then(|| Filesystem::new(FsKind::Btrfs, label(&sb[0x12b..0x12b + 256])))
}

fn ext(vol: &Volume) -> Option<Filesystem> {
    let sb = vol.bytes(EXT_SUPERBLOCK, 136)?;
    if u16_at(&sb, 56) != EXT_MAGIC {
        return None;
    }
    let (compat, incompat, ro_compat) = (u32_at(&sb, 92), u32_at(&sb, 96), u32_at(&sb, 100));
    let kind = if incompat & !EXT3_INCOMPAT != 0 || ro_compat & !EXT3_RO_COMPAT != 0 {
        FsKind::Ext4
    } else if compat & EXT_COMPAT_HAS_JOURNAL != 0 {
        FsKind::Ext3
    } else {
        FsKind::Ext2
    };
    Some(Filesystem::new(kind, label(&sb[120..136])))
}

fn swap(vol: &Volume) -> Option<Filesystem> {
    let found = SWAP_PAGE_SIZES.iter().any(|&page| {
        vol.bytes(page - 10, 10)
            .is_some_and(|m| &m[..] == b"SWAPSPACE2" || &m[..] == b"SWAP-SPACE")
    });
    if !found {
        return None;
    }
    // Version-1 header after 1024 bytes of boot bits: version, last page, bad pages,
    // UUID (16), label (16).
    let name = vol.bytes(1024 + 28, 16).and_then(|l| label(&l));
    Some(Filesystem::new(FsKind::Swap, name))
}

fn lvm(vol: &Volume) -> Option<Filesystem> {
    (0..LVM_LABEL_SECTORS).find_map(|s| {
        let sector = vol.bytes(s * 512, 32)?;
        (&sector[..8] == b"LABELONE" && &sector[24..32] == b"LVM2 001")
            .then(|| Filesystem::new(FsKind::Lvm2Pv, None))
    })
}

/// Volumes recognised by their boot sector: NTFS, exFAT, FAT.
fn boot_sector(vol: &Volume) -> Option<Filesystem> {
    let bs = vol.bytes(0, 512)?;
    match &bs[3..11] {
        b"NTFS    " => return Some(Filesystem::new(FsKind::Ntfs, None)),
        b"EXFAT   " => return Some(Filesystem::new(FsKind::ExFat, None)),
        _ => {}
    }
    if bs[510] != 0x55 || bs[511] != 0xAA {
        return None;
    }
    let labelled = |ext_sig: usize, at: usize| {
        (bs[ext_sig] == 0x29)
            .then(|| label(&bs[at..at + 11]))
            .flatten()
            .filter(|l| l != "NO NAME")
    };
    if &bs[82..90] == b"FAT32   " {
        return Some(Filesystem::new(FsKind::Fat32, labelled(66, 71)));
    }
    let kind = match &bs[54..62] {
        b"FAT12   " => Some(FsKind::Fat12),
        b"FAT16   " => Some(FsKind::Fat16),
        _ => None,
    };
    if let Some(kind) = kind {
        return Some(Filesystem::new(kind, labelled(38, 43)));
    }
    // No type string: trust a consistent BPB only.
    let kind = fat_kind_from_bpb(&bs)?;
    let name = if kind == FsKind::Fat32 {
        labelled(66, 71)
    } else {
        labelled(38, 43)
    };
    Some(Filesystem::new(kind, name))
}

/// The FAT variant from the cluster count of a BPB that passes every sanity check.
fn fat_kind_from_bpb(bs: &[u8]) -> Option<FsKind> {
    if bs[0] != 0xEB && bs[0] != 0xE9 {
        return None;
    }
    let bytes_per_sector = u64::from(u16_at(bs, 11));
    let per_cluster = u64::from(bs[13]);
    let reserved = u64::from(u16_at(bs, 14));
    let fats = u64::from(bs[16]);
    let root_entries = u64::from(u16_at(bs, 17));
    let media = bs[21];
    if !matches!(bytes_per_sector, 512 | 1024 | 2048 | 4096)
        || !per_cluster.is_power_of_two()
        || reserved == 0
        || !(1..=2).contains(&fats)
        || !(media == 0xF0 || media >= 0xF8)
    {
        return None;
    }
    let total = match u16_at(bs, 19) {
        0 => u64::from(u32_at(bs, 32)),
        n => u64::from(n),
    };
    let fat_size = match u16_at(bs, 22) {
        0 => u64::from(u32_at(bs, 36)),
        n => u64::from(n),
    };
    if total == 0 || fat_size == 0 {
        return None;
    }
    let root_sectors = (root_entries * 32).div_ceil(bytes_per_sector);
    let data = total.checked_sub(reserved + fats * fat_size + root_sectors)?;
    let clusters = data / per_cluster;
    Some(match clusters {
        0..4085 => FsKind::Fat12,
        4085..65525 => FsKind::Fat16,
        _ => FsKind::Fat32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detect(img: &Vec<u8>) -> Option<Filesystem> {
        detect_filesystem(img, 0, img.len() as u64)
    }

    #[test]
    fn signatures() {
        let mut img = vec![0u8; 128 * 1024];
        assert_eq!(detect(&img), None);

        img[1024 + 56..1024 + 58].copy_from_slice(&EXT_MAGIC.to_le_bytes());
        img[1024 + 120..1024 + 124].copy_from_slice(b"root");
        assert_eq!(
            detect(&img),
            Some(Filesystem::new(FsKind::Ext2, Some("root".into())))
        );
        img[1024 + 92] = 0x4;
        assert_eq!(detect(&img).unwrap().kind, FsKind::Ext3);
        img[1024 + 96] = 0x40 | 0x2;
        assert_eq!(detect(&img).unwrap().kind, FsKind::Ext4);
        // Too short a range for the superblock.
        assert_eq!(detect_filesystem(&img, 0, 1100), None);

        let mut img = vec![0u8; 128 * 1024];
        img[65536 + 64..65536 + 72].copy_from_slice(b"_BHRfS_M");
        img[65536 + 0x12b..65536 + 0x12b + 3].copy_from_slice(b"btr");
        assert_eq!(
            detect(&img),
            Some(Filesystem::new(FsKind::Btrfs, Some("btr".into())))
        );

        let mut img = vec![0u8; 8192];
        img[..4].copy_from_slice(b"XFSB");
        assert_eq!(detect(&img), Some(Filesystem::new(FsKind::Xfs, None)));

        let mut img = vec![0u8; 8192];
        img[4086..4096].copy_from_slice(b"SWAPSPACE2");
        img[1052..1056].copy_from_slice(b"swp1");
        assert_eq!(
            detect(&img),
            Some(Filesystem::new(FsKind::Swap, Some("swp1".into())))
        );

        let mut img = vec![0u8; 8192];
        img[512..520].copy_from_slice(b"LABELONE");
        img[536..544].copy_from_slice(b"LVM2 001");
        assert_eq!(detect(&img).unwrap().kind, FsKind::Lvm2Pv);
        assert_eq!(detect(&img).unwrap().kind.mount_type(), "LVM2_member");

        let mut img = vec![0u8; 8192];
        img[3..11].copy_from_slice(b"NTFS    ");
        assert_eq!(detect(&img).unwrap().kind, FsKind::Ntfs);
        img[3..11].copy_from_slice(b"EXFAT   ");
        assert_eq!(detect(&img).unwrap().kind, FsKind::ExFat);
    }

    #[test]
    fn fat_by_string_and_by_bpb() {
        let mut img = vec![0u8; 8192];
        img[0] = 0xEB;
        img[510] = 0x55;
        img[511] = 0xAA;
        img[82..90].copy_from_slice(b"FAT32   ");
        img[66] = 0x29;
        img[71..82].copy_from_slice(b"BOOT       ");
        let fs = detect(&img).unwrap();
        assert_eq!(
            (fs.kind, fs.label.as_deref()),
            (FsKind::Fat32, Some("BOOT"))
        );
        assert_eq!(fs.kind.mount_type(), "vfat");
        assert_eq!(fs.to_string(), "FAT32 \"BOOT\"");

        img[82..90].fill(0);
        img[54..62].copy_from_slice(b"FAT16   ");
        img[38] = 0x29;
        img[43..54].copy_from_slice(b"NO NAME    ");
        assert_eq!(detect(&img), Some(Filesystem::new(FsKind::Fat16, None)));

        // A BPB of 20000 sectors, one sector per cluster: FAT16 by its cluster count.
        img[54..62].fill(0);
        img[11..13].copy_from_slice(&512u16.to_le_bytes());
        img[13] = 1;
        img[14..16].copy_from_slice(&1u16.to_le_bytes());
        img[16] = 2;
        img[17..19].copy_from_slice(&512u16.to_le_bytes());
        img[19..21].copy_from_slice(&20000u16.to_le_bytes());
        img[21] = 0xF8;
        img[22..24].copy_from_slice(&79u16.to_le_bytes());
        assert_eq!(detect(&img).unwrap().kind, FsKind::Fat16);
        img[13] = 8;
        assert_eq!(detect(&img).unwrap().kind, FsKind::Fat12);
        img[16] = 7;
        assert_eq!(detect(&img), None);
    }
}
