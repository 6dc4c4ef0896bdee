//! The `createType` header value.

/// Disk type named by the descriptor's `createType` key.
///
/// Parsing is case-insensitive and accepts the historical aliases
/// (`2GbMaxExtentSparse`, `vmfsSeSparse`, `vmfsRDM`, `vmfsRDMP`, ...);
/// [`CreateType::as_str`] always gives VMware's canonical spelling.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CreateType {
    /// `monolithicSparse`: one hosted sparse file.
    MonolithicSparse,
    /// `monolithicFlat`: descriptor plus one flat extent.
    MonolithicFlat,
    /// `twoGbMaxExtentSparse` (alias `2GbMaxExtentSparse`): split sparse extents.
    TwoGbMaxExtentSparse,
    /// `twoGbMaxExtentFlat` (alias `2GbMaxExtentFlat`): split flat extents.
    TwoGbMaxExtentFlat,
    /// `streamOptimized`: compressed sparse file for streaming.
    StreamOptimized,
    /// `vmfs`: ESX flat disk.
    Vmfs,
    /// `vmfsPreallocated`.
    VmfsPreallocated,
    /// `vmfsEagerZeroedThick`.
    VmfsEagerZeroedThick,
    /// `vmfsThin`.
    VmfsThin,
    /// `vmfsThick`.
    VmfsThick,
    /// `vmfsSparse`: ESX delta (COWD) disk.
    VmfsSparse,
    /// `seSparse` (alias `vmfsSeSparse`).
    SeSparse,
    /// `vmfsRawDeviceMap` (alias `vmfsRDM`).
    VmfsRawDeviceMap,
    /// `vmfsPassthroughRawDeviceMap` (alias `vmfsRDMP`).
    VmfsPassthroughRawDeviceMap,
    /// `vmfsRaw`.
    VmfsRaw,
    /// `fullDevice`: a whole physical disk.
    FullDevice,
    /// `partitionedDevice`: partitions of a physical disk.
    PartitionedDevice,
    /// `custom`.
    Custom,
    /// `vsanSparse`.
    VsanSparse,
    /// Any other value, kept with its original spelling.
    Other(String),
}

impl CreateType {
    /// Recognises a `createType` value (case-insensitive, aliases accepted).
    /// Unknown values become [`CreateType::Other`]; this never fails.
    pub fn parse(s: &str) -> CreateType {
        match s.to_ascii_lowercase().as_str() {
            "monolithicsparse" => CreateType::MonolithicSparse,
            "monolithicflat" => CreateType::MonolithicFlat,
            "twogbmaxextentsparse" | "2gbmaxextentsparse" => CreateType::TwoGbMaxExtentSparse,
            "twogbmaxextentflat" | "2gbmaxextentflat" => CreateType::TwoGbMaxExtentFlat,
            "streamoptimized" => CreateType::StreamOptimized,
            "vmfs" => CreateType::Vmfs,
            "vmfspreallocated" => CreateType::VmfsPreallocated,
            "vmfseagerzeroedthick" => CreateType::VmfsEagerZeroedThick,
            "vmfsthin" => CreateType::VmfsThin,
            "vmfsthick" => CreateType::VmfsThick,
            "vmfssparse" => CreateType::VmfsSparse,
            "sesparse" | "vmfssesparse" => CreateType::SeSparse,
            "vmfsrawdevicemap" | "vmfsrdm" => CreateType::VmfsRawDeviceMap,
            "vmfspassthroughrawdevicemap" | "vmfsrdmp" => CreateType::VmfsPassthroughRawDeviceMap,
            "vmfsraw" => CreateType::VmfsRaw,
            "fulldevice" => CreateType::FullDevice,
            "partitioneddevice" => CreateType::PartitionedDevice,
            "custom" => CreateType::Custom,
            "vsansparse" => CreateType::VsanSparse,
            _ => CreateType::Other(s.to_string()),
        }
    }

    /// Canonical VMware spelling (for [`CreateType::Other`], the stored text).
    pub fn as_str(&self) -> &str {
        match self {
            CreateType::MonolithicSparse => "monolithicSparse",
            CreateType::MonolithicFlat => "monolithicFlat",
            CreateType::TwoGbMaxExtentSparse => "twoGbMaxExtentSparse",
            CreateType::TwoGbMaxExtentFlat => "twoGbMaxExtentFlat",
            CreateType::StreamOptimized => "streamOptimized",
            CreateType::Vmfs => "vmfs",
            CreateType::VmfsPreallocated => "vmfsPreallocated",
            CreateType::VmfsEagerZeroedThick => "vmfsEagerZeroedThick",
            CreateType::VmfsThin => "vmfsThin",
            CreateType::VmfsThick => "vmfsThick",
            CreateType::VmfsSparse => "vmfsSparse",
            CreateType::SeSparse => "seSparse",
            CreateType::VmfsRawDeviceMap => "vmfsRawDeviceMap",
            CreateType::VmfsPassthroughRawDeviceMap => "vmfsPassthroughRawDeviceMap",
            CreateType::VmfsRaw => "vmfsRaw",
            CreateType::FullDevice => "fullDevice",
            CreateType::PartitionedDevice => "partitionedDevice",
            CreateType::Custom => "custom",
            CreateType::VsanSparse => "vsanSparse",
            CreateType::Other(s) => s,
        }
    }
}

impl std::fmt::Display for CreateType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
