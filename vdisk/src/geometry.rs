//! Disk geometry (CHS) as VMware products compute it for new disks, and the adapter
//! types a descriptor can name.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, ErrorKind};

/// Cylinders, heads and sectors per track.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Geometry {
    /// Number of cylinders.
    pub cylinders: u32,
    /// Number of heads.
    pub heads: u32,
    /// Sectors per track.
    pub sectors: u32,
}

/// The virtual controller a disk is meant for (`ddb.adapterType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AdapterType {
    /// IDE (`ide`).
    Ide,
    /// BusLogic SCSI (`buslogic`).
    BusLogic,
    /// LSI Logic parallel SCSI (`lsilogic`).
    LsiLogic,
    /// LSI Logic SAS (`lsisas1068`).
    LsiSas,
    /// VMware paravirtual SCSI (`pvscsi`).
    Pvscsi,
    /// Legacy ESX (`legacyESX`).
    LegacyEsx,
}

impl AdapterType {
    /// The spelling used in descriptors.
    pub fn as_str(self) -> &'static str {
        match self {
            AdapterType::Ide => "ide",
            AdapterType::BusLogic => "buslogic",
            AdapterType::LsiLogic => "lsilogic",
            AdapterType::LsiSas => "lsisas1068",
            AdapterType::Pvscsi => "pvscsi",
            AdapterType::LegacyEsx => "legacyESX",
        }
    }

    /// Whether the adapter is an IDE controller (the geometry rules differ).
    pub fn is_ide(self) -> bool {
        self == AdapterType::Ide
    }

    /// VDDK's `VixDiskLibAdapterType` number: 1 IDE, 2 BusLogic, 3 LSI Logic. VDDK
    /// has no number for the other SCSI controllers and reports them as LSI Logic.
    pub fn vddk_code(self) -> u32 {
        match self {
            AdapterType::Ide => 1,
            AdapterType::BusLogic => 2,
            AdapterType::LsiLogic
            | AdapterType::LsiSas
            | AdapterType::Pvscsi
            | AdapterType::LegacyEsx => 3,
        }
    }

    /// The adapter of VDDK's `VixDiskLibAdapterType` number `n` (1 to 3).
    pub fn from_vddk_code(n: u32) -> Result<AdapterType, Error> {
        Ok(match n {
            1 => AdapterType::Ide,
            2 => AdapterType::BusLogic,
            3 => AdapterType::LsiLogic,
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!("unknown adapter type {n} (VDDK's adapters are 1 to 3)"),
                ))
            }
        })
    }
}

impl fmt::Display for AdapterType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AdapterType {
    type Err = Error;

    /// Accepts the descriptor spellings (case-insensitive) and `lsisas`.
    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "ide" => AdapterType::Ide,
            "buslogic" => AdapterType::BusLogic,
            "lsilogic" => AdapterType::LsiLogic,
            "lsisas" | "lsisas1068" => AdapterType::LsiSas,
            "pvscsi" => AdapterType::Pvscsi,
            "legacyesx" => AdapterType::LegacyEsx,
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!(
                        "unknown adapter type {s:?} (expected ide, buslogic, lsilogic, lsisas, pvscsi or legacyESX)"
                    ),
                ))
            }
        })
    }
}

impl Geometry {
    /// The geometry VMware gives a new disk of `capacity_sectors` on `adapter`:
    /// IDE disks get 16 heads and 63 sectors with at most 16383 cylinders; SCSI disks
    /// get 64/32 below 1 GiB, 128/32 below 2 GiB and 255/63 above, with at most 65535
    /// cylinders.
    pub fn for_new_disk(capacity_sectors: u64, adapter: AdapterType) -> Geometry {
        let (heads, sectors, max_cyl): (u32, u32, u64) = if adapter.is_ide() {
            (16, 63, 16383)
        } else if capacity_sectors < 2 * 1024 * 1024 {
            (64, 32, 65535)
        } else if capacity_sectors < 4 * 1024 * 1024 {
            (128, 32, 65535)
        } else {
            (255, 63, 65535)
        };
        let cylinders = (capacity_sectors / (u64::from(heads) * u64::from(sectors))).min(max_cyl);
        Geometry {
            cylinders: cylinders as u32,
            heads,
            sectors,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vddk_adapter_codes_round_trip_and_other_scsi_reads_as_lsilogic() {
        for n in 1..=3 {
            assert_eq!(AdapterType::from_vddk_code(n).unwrap().vddk_code(), n);
        }
        for name in ["lsisas1068", "pvscsi", "legacyESX", "LSILOGIC"] {
            assert_eq!(
                name.parse::<AdapterType>().unwrap().vddk_code(),
                3,
                "{name}"
            );
        }
        for n in [0, 4, 256] {
            let e = AdapterType::from_vddk_code(n).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        }
    }

    #[test]
    fn esxi_small_lsilogic_disk_gets_64_heads_32_sectors() {
        // ESXi's 2 MiB lsilogic sample: 2/64/32.
        let g = Geometry::for_new_disk(4096, AdapterType::LsiLogic);
        assert_eq!((g.cylinders, g.heads, g.sectors), (2, 64, 32));
    }

    #[test]
    fn ide_cylinders_are_capped() {
        let g = Geometry::for_new_disk(100 << 21, AdapterType::Ide);
        assert_eq!((g.cylinders, g.heads, g.sectors), (16383, 16, 63));
    }

    #[test]
    fn large_scsi_disk_uses_255_63() {
        let g = Geometry::for_new_disk(16 << 21, AdapterType::LsiLogic);
        assert_eq!((g.cylinders, g.heads, g.sectors), (2088, 255, 63));
    }

    #[test]
    fn adapter_names_parse_case_insensitively() {
        assert_eq!(
            "LegacyESX".parse::<AdapterType>().unwrap(),
            AdapterType::LegacyEsx
        );
        assert_eq!(
            "lsisas".parse::<AdapterType>().unwrap(),
            AdapterType::LsiSas
        );
        assert!("scsi".parse::<AdapterType>().is_err());
    }
}
