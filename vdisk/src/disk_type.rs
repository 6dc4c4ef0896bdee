//! The disk types users choose from when creating or converting a disk, with their
//! numbers in vmware-vdiskmanager (`-t N`) and in VDDK (`VixDiskLibDiskType`).

use std::fmt;
use std::str::FromStr;

use crate::descriptor::CreateType;
use crate::error::{Error, ErrorKind};

/// A kind of virtual disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DiskType {
    /// One growable hosted sparse file (`monolithicSparse`).
    MonolithicSparse,
    /// Growable, split in 2 GB hosted sparse files (`twoGbMaxExtentSparse`).
    TwoGbMaxExtentSparse,
    /// Preallocated, one flat file (`monolithicFlat`).
    MonolithicFlat,
    /// Preallocated, split in 2 GB flat files (`twoGbMaxExtentFlat`).
    TwoGbMaxExtentFlat,
    /// ESX preallocated flat file (`vmfs`).
    Vmfs,
    /// ESX thin-provisioned flat file (`vmfs` with `ddb.thinProvisioned`).
    VmfsThin,
    /// Compressed, optimised for streaming (`streamOptimized`).
    StreamOptimized,
    /// ESX COW delta (`vmfsSparse`).
    VmfsSparse,
    /// ESX space-efficient sparse delta (`seSparse`).
    SeSparse,
}

impl DiskType {
    /// The type of vmware-vdiskmanager's `-t N`.
    pub fn from_vdiskmanager(n: u32) -> Result<DiskType, Error> {
        Ok(match n {
            0 => DiskType::MonolithicSparse,
            1 => DiskType::TwoGbMaxExtentSparse,
            2 => DiskType::MonolithicFlat,
            3 => DiskType::TwoGbMaxExtentFlat,
            4 => DiskType::Vmfs,
            5 => DiskType::StreamOptimized,
            6 => DiskType::VmfsThin,
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!("unknown disk type {n} (expected 0 to 6)"),
                ))
            }
        })
    }

    /// Every disk type.
    pub const ALL: [DiskType; 9] = [
        DiskType::MonolithicSparse,
        DiskType::TwoGbMaxExtentSparse,
        DiskType::MonolithicFlat,
        DiskType::TwoGbMaxExtentFlat,
        DiskType::Vmfs,
        DiskType::VmfsThin,
        DiskType::StreamOptimized,
        DiskType::VmfsSparse,
        DiskType::SeSparse,
    ];

    /// VDDK's `VixDiskLibDiskType` number; `None` for seSparse, which VDDK's
    /// enumeration has no value for (VDDK makes seSparse children itself, on ESXi).
    pub fn vddk_code(self) -> Option<u32> {
        Some(match self {
            DiskType::MonolithicSparse => 1,
            DiskType::MonolithicFlat => 2,
            DiskType::TwoGbMaxExtentSparse => 3,
            DiskType::TwoGbMaxExtentFlat => 4,
            DiskType::Vmfs => 5,
            DiskType::StreamOptimized => 6,
            DiskType::VmfsThin => 7,
            DiskType::VmfsSparse => 8,
            DiskType::SeSparse => return None,
        })
    }

    /// The type of VDDK's `VixDiskLibDiskType` number `n`.
    pub fn from_vddk_code(n: u32) -> Result<DiskType, Error> {
        DiskType::ALL
            .into_iter()
            .find(|t| t.vddk_code() == Some(n))
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidArgument,
                    format!("unknown disk type {n} (VDDK's types are 1 to 8)"),
                )
            })
    }

    /// The `createType` written into the descriptor. Thin ESX disks are written as
    /// `vmfs` plus `ddb.thinProvisioned = "1"`, as ESXi does (and as qemu accepts).
    pub fn create_type(self) -> CreateType {
        match self {
            DiskType::MonolithicSparse => CreateType::MonolithicSparse,
            DiskType::TwoGbMaxExtentSparse => CreateType::TwoGbMaxExtentSparse,
            DiskType::MonolithicFlat => CreateType::MonolithicFlat,
            DiskType::TwoGbMaxExtentFlat => CreateType::TwoGbMaxExtentFlat,
            DiskType::Vmfs | DiskType::VmfsThin => CreateType::Vmfs,
            DiskType::StreamOptimized => CreateType::StreamOptimized,
            DiskType::VmfsSparse => CreateType::VmfsSparse,
            DiskType::SeSparse => CreateType::SeSparse,
        }
    }

    /// The disk type a descriptor describes, if it is one of ours.
    pub fn from_create_type(t: &CreateType, thin: bool) -> Option<DiskType> {
        Some(match t {
            CreateType::MonolithicSparse => DiskType::MonolithicSparse,
            CreateType::TwoGbMaxExtentSparse => DiskType::TwoGbMaxExtentSparse,
            CreateType::MonolithicFlat => DiskType::MonolithicFlat,
            CreateType::TwoGbMaxExtentFlat => DiskType::TwoGbMaxExtentFlat,
            CreateType::Vmfs if thin => DiskType::VmfsThin,
            CreateType::VmfsThin => DiskType::VmfsThin,
            CreateType::Vmfs
            | CreateType::VmfsPreallocated
            | CreateType::VmfsEagerZeroedThick
            | CreateType::VmfsThick => DiskType::Vmfs,
            CreateType::StreamOptimized => DiskType::StreamOptimized,
            CreateType::VmfsSparse => DiskType::VmfsSparse,
            CreateType::SeSparse => DiskType::SeSparse,
            _ => return None,
        })
    }

    /// The name users see (the createType spelling, `vmfsThin` for thin ESX disks).
    pub fn name(self) -> &'static str {
        match self {
            DiskType::MonolithicSparse => "monolithicSparse",
            DiskType::TwoGbMaxExtentSparse => "twoGbMaxExtentSparse",
            DiskType::MonolithicFlat => "monolithicFlat",
            DiskType::TwoGbMaxExtentFlat => "twoGbMaxExtentFlat",
            DiskType::Vmfs => "vmfs",
            DiskType::VmfsThin => "vmfsThin",
            DiskType::StreamOptimized => "streamOptimized",
            DiskType::VmfsSparse => "vmfsSparse",
            DiskType::SeSparse => "seSparse",
        }
    }

    /// The largest capacity VMware's products support for the type: 62 TB for
    /// ESX disks (VMFS 5 and 6) and seSparse, 2 TB for vmfsSparse (COWD), 8 TB
    /// for the hosted types. Larger disks work here (up to
    /// [`crate::limits::MAX_CAPACITY_SECTORS`]); VMware's tools may refuse them.
    pub fn supported_capacity(self) -> u64 {
        const TIB: u64 = 1 << 40;
        match self {
            DiskType::Vmfs | DiskType::VmfsThin | DiskType::SeSparse => 62 * TIB,
            DiskType::VmfsSparse => 2 * TIB,
            DiskType::MonolithicSparse
            | DiskType::TwoGbMaxExtentSparse
            | DiskType::MonolithicFlat
            | DiskType::TwoGbMaxExtentFlat
            | DiskType::StreamOptimized => 8 * TIB,
        }
    }

    /// A warning when `capacity` is beyond [`DiskType::supported_capacity`].
    pub fn capacity_warning(self, capacity: u64) -> Option<String> {
        let max = self.supported_capacity();
        (capacity > max).then(|| {
            format!(
                "{capacity} bytes is more than VMware supports for {self} disks ({} TiB): \
                 VMware's tools may refuse it",
                max >> 40
            )
        })
    }

    /// Whether disks of this type grow as data is written (sparse).
    pub fn is_sparse(self) -> bool {
        matches!(
            self,
            DiskType::MonolithicSparse
                | DiskType::TwoGbMaxExtentSparse
                | DiskType::StreamOptimized
                | DiskType::VmfsSparse
                | DiskType::SeSparse
        )
    }
}

impl fmt::Display for DiskType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DiskType {
    type Err = Error;

    /// Accepts a vdiskmanager number (`0`..`6`) or a type name (case-insensitive).
    fn from_str(s: &str) -> Result<DiskType, Error> {
        if let Ok(n) = s.parse::<u32>() {
            return DiskType::from_vdiskmanager(n);
        }
        let all = [
            DiskType::MonolithicSparse,
            DiskType::TwoGbMaxExtentSparse,
            DiskType::MonolithicFlat,
            DiskType::TwoGbMaxExtentFlat,
            DiskType::Vmfs,
            DiskType::VmfsThin,
            DiskType::StreamOptimized,
            DiskType::VmfsSparse,
            DiskType::SeSparse,
        ];
        all.into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidArgument,
                    format!("unknown disk type {s:?}"),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vddk_codes_round_trip_and_unknown_ones_are_refused() {
        for t in DiskType::ALL {
            match t.vddk_code() {
                Some(n) => assert_eq!(DiskType::from_vddk_code(n).unwrap(), t),
                None => assert_eq!(t, DiskType::SeSparse),
            }
        }
        let codes: Vec<u32> = DiskType::ALL.iter().filter_map(|t| t.vddk_code()).collect();
        assert_eq!(codes.len(), 8);
        for n in [0, 9, 256, u32::MAX] {
            let e = DiskType::from_vddk_code(n).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument);
            assert!(
                e.to_string().contains(&format!("unknown disk type {n}")),
                "{e}"
            );
        }
    }
}
