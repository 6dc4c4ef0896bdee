//! Data types of the descriptor model.

/// Access mode of an extent (first field of an extent line).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExtentAccess {
    /// `RW`: readable and writable.
    ReadWrite,
    /// `RDONLY`: read-only.
    ReadOnly,
    /// `NOACCESS`: neither readable nor writable.
    NoAccess,
}

impl ExtentAccess {
    /// Recognises an access word (case-insensitive); `None` if it is not one.
    pub fn parse(s: &str) -> Option<ExtentAccess> {
        if s.eq_ignore_ascii_case("RW") {
            Some(ExtentAccess::ReadWrite)
        } else if s.eq_ignore_ascii_case("RDONLY") {
            Some(ExtentAccess::ReadOnly)
        } else if s.eq_ignore_ascii_case("NOACCESS") {
            Some(ExtentAccess::NoAccess)
        } else {
            None
        }
    }

    /// VMware spelling: `RW`, `RDONLY` or `NOACCESS`.
    pub fn as_str(self) -> &'static str {
        match self {
            ExtentAccess::ReadWrite => "RW",
            ExtentAccess::ReadOnly => "RDONLY",
            ExtentAccess::NoAccess => "NOACCESS",
        }
    }
}

/// Type of an extent (third field of an extent line).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ExtentKind {
    /// `FLAT`: raw data in a plain file.
    Flat,
    /// `SPARSE`: hosted sparse (VMDK4 / streamOptimized) file.
    Sparse,
    /// `ZERO`: reads as zeros, has no file.
    Zero,
    /// `VMFS`: flat file on VMFS.
    Vmfs,
    /// `VMFSSPARSE`: ESX delta (COWD) file.
    VmfsSparse,
    /// `VMFSRDM`: raw device mapping.
    VmfsRdm,
    /// `VMFSRAW`: raw VMFS device.
    VmfsRaw,
    /// `SESPARSE`: space-efficient sparse file.
    SeSparse,
    /// `VSANSPARSE`: vSAN sparse object.
    VsanSparse,
    /// Any other type word, kept with its original spelling.
    Other(String),
}

impl ExtentKind {
    /// Recognises a type word (case-insensitive); unknown words become
    /// [`ExtentKind::Other`]. Never fails.
    pub fn parse(s: &str) -> ExtentKind {
        const KNOWN: [(&str, ExtentKind); 9] = [
            ("FLAT", ExtentKind::Flat),
            ("SPARSE", ExtentKind::Sparse),
            ("ZERO", ExtentKind::Zero),
            ("VMFS", ExtentKind::Vmfs),
            ("VMFSSPARSE", ExtentKind::VmfsSparse),
            ("VMFSRDM", ExtentKind::VmfsRdm),
            ("VMFSRAW", ExtentKind::VmfsRaw),
            ("SESPARSE", ExtentKind::SeSparse),
            ("VSANSPARSE", ExtentKind::VsanSparse),
        ];
        KNOWN
            .into_iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(s))
            .map(|(_, kind)| kind)
            .unwrap_or_else(|| ExtentKind::Other(s.to_string()))
    }

    /// VMware spelling (upper case); for [`ExtentKind::Other`], the stored text.
    pub fn as_str(&self) -> &str {
        match self {
            ExtentKind::Flat => "FLAT",
            ExtentKind::Sparse => "SPARSE",
            ExtentKind::Zero => "ZERO",
            ExtentKind::Vmfs => "VMFS",
            ExtentKind::VmfsSparse => "VMFSSPARSE",
            ExtentKind::VmfsRdm => "VMFSRDM",
            ExtentKind::VmfsRaw => "VMFSRAW",
            ExtentKind::SeSparse => "SESPARSE",
            ExtentKind::VsanSparse => "VSANSPARSE",
            ExtentKind::Other(s) => s,
        }
    }
}

/// One extent line:
/// `ACCESS SECTORS TYPE ["FILENAME" [OFFSET [PARTITION-UUID DEVICE-ID]]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtentLine {
    /// Access mode.
    pub access: ExtentAccess,
    /// Extent size in 512-byte sectors.
    pub sectors: u64,
    /// Extent type.
    pub kind: ExtentKind,
    /// File name as written in the descriptor (without quotes); `None` for
    /// `ZERO` extents. For a Latin-1 descriptor use [`super::name_bytes`]
    /// to get the original bytes back.
    pub file: Option<String>,
    /// Start offset in sectors inside the file (fifth field), if present.
    pub offset: Option<u64>,
    /// Sixth and seventh fields (partition UUID, device id), kept opaque and
    /// without surrounding quotes.
    pub extra: Vec<String>,
}

/// Line terminator of one stored line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Eol {
    /// Last line of the input, no terminator.
    None,
    /// `\n`.
    Lf,
    /// `\r\n`.
    CrLf,
}

/// A `key=value` entry (header key or DDB entry).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Entry {
    /// Key with the spelling found in (or written to) the text.
    pub(super) key: String,
    /// Value without quotes.
    pub(super) value: String,
    /// Whether the value was written in double quotes.
    pub(super) quoted: bool,
}

/// What a line means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// Empty or whitespace-only line.
    Blank,
    /// `#` comment.
    Comment,
    /// Header `key=value` (key not starting with `ddb.`).
    Header(Entry),
    /// DDB `ddb.key = "value"`.
    Ddb(Entry),
    /// Extent line.
    Extent(ExtentLine),
}

/// One line: its text (original unless rewritten), terminator and meaning.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Line {
    /// Text without the terminator (decoded; Latin-1 if the descriptor is).
    pub(super) text: String,
    /// Terminator.
    pub(super) eol: Eol,
    /// Meaning.
    pub(super) kind: Kind,
}
