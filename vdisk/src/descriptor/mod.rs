//! VMDK descriptor text: model, tolerant parser and faithful writer.
//!
//! A descriptor is kept as its ordered list of lines. Every line remembers
//! its original text and terminator, so [`Descriptor::to_bytes`] reproduces
//! untouched lines byte for byte; only lines changed through a setter are
//! re-rendered (VMware style). Lookups are case-insensitive on keys and the
//! last of duplicate keys wins.
//!
//! [`Descriptor::parse`] checks syntax only (and the limits in
//! `crate::limits`); whether the descriptor makes sense (has a
//! `createType`, extents, ...) is up to the caller.

mod create_type;
mod edit;
mod model;
mod parse;
#[cfg(test)]
mod tests;
mod write;

pub use create_type::CreateType;
pub use model::{ExtentAccess, ExtentKind, ExtentLine};
pub use write::name_bytes;

use model::{Entry, Eol, Kind, Line};

/// A descriptor syntax or limit error.
///
/// `line` is 1-based; 0 means the whole input (e.g. too large).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct DescriptorError {
    /// 1-based line number, or 0 for the whole input.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// A parsed (or newly created) VMDK descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// All lines in file order.
    lines: Vec<Line>,
    /// Whether new lines end in CRLF (input's first line did).
    crlf: bool,
    /// Whether the input was not UTF-8 and was decoded as Latin-1.
    latin1: bool,
    /// Whether the input started with a UTF-8 byte order mark. It belongs to the
    /// file, not to its first line: written back first, whatever lines are
    /// inserted before that line.
    bom: bool,
}

impl Descriptor {
    /// Parses descriptor text (a standalone file or an embedded, NUL-padded
    /// area: everything from the first NUL byte on is ignored).
    ///
    /// Accepts LF and CRLF line ends, comments and blank lines anywhere,
    /// leading and trailing whitespace, whitespace around `=`, quoted or
    /// bare values and case-insensitive keys, access words and extent types.
    /// Text that is not valid UTF-8 is decoded as Latin-1 (see
    /// [`Descriptor::is_latin1`]). Only syntax is checked.
    ///
    /// # Errors
    /// A [`DescriptorError`] naming the line for any syntax error, a stray
    /// carriage return, or more than [`crate::limits::MAX_DESCRIPTOR_LINES`]
    /// lines or [`crate::limits::MAX_EXTENTS`] extent lines; line 0 if the
    /// text before the first NUL exceeds
    /// [`crate::limits::MAX_DESCRIPTOR_BYTES`].
    pub fn parse(bytes: &[u8]) -> Result<Descriptor, DescriptorError> {
        parse::parse_descriptor(bytes)
    }

    /// The `version` header (decimal), if present and valid.
    pub fn version(&self) -> Option<u32> {
        self.header("version").and_then(parse::parse_dec_u32)
    }

    /// The `CID` header (hexadecimal, any width), if present and valid.
    pub fn cid(&self) -> Option<u32> {
        self.header("CID").and_then(parse::parse_hex_u32)
    }

    /// The `parentCID` header (hexadecimal, any width), if present and valid.
    /// `ffffffff` means "no parent".
    pub fn parent_cid(&self) -> Option<u32> {
        self.header("parentCID").and_then(parse::parse_hex_u32)
    }

    /// The `createType` header, if present.
    pub fn create_type(&self) -> Option<CreateType> {
        self.header("createType").map(CreateType::parse)
    }

    /// The `parentFileNameHint` header (as stored; for a Latin-1 descriptor
    /// see [`name_bytes`]), if present.
    pub fn parent_file_name_hint(&self) -> Option<&str> {
        self.header("parentFileNameHint")
    }

    /// Value (without quotes) of a header key (not a `ddb.` key), compared
    /// case-insensitively; the last occurrence wins.
    pub fn header(&self, key: &str) -> Option<&str> {
        self.last_header(key)
            .and_then(|i| self.entry_at(i))
            .map(|e| e.value.as_str())
    }

    /// All extent lines in file order.
    pub fn extents(&self) -> Vec<ExtentLine> {
        self.lines
            .iter()
            .filter_map(|l| match &l.kind {
                Kind::Extent(e) => Some(e.clone()),
                _ => None,
            })
            .collect()
    }

    /// Value (without quotes) of a DDB entry; `key` includes the `ddb.`
    /// prefix and is compared case-insensitively; the last occurrence wins.
    pub fn ddb(&self, key: &str) -> Option<&str> {
        self.last_ddb(key)
            .and_then(|i| self.entry_at(i))
            .map(|e| e.value.as_str())
    }

    /// All DDB entries `(key, value)` in file order, one per key
    /// (case-insensitive): the position and key spelling of the first
    /// occurrence, the value of the last.
    pub fn ddb_entries(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        for l in &self.lines {
            if let Kind::Ddb(e) = &l.kind {
                let lower = e.key.to_ascii_lowercase();
                match seen.get(&lower).and_then(|&i| out.get_mut(i)) {
                    Some(slot) => slot.1.clone_from(&e.value),
                    None => {
                        seen.insert(lower, out.len());
                        out.push((e.key.clone(), e.value.clone()));
                    }
                }
            }
        }
        out
    }

    /// Whether the input was not valid UTF-8 and was decoded as Latin-1;
    /// [`Descriptor::to_bytes`] then writes Latin-1 again.
    pub fn is_latin1(&self) -> bool {
        self.latin1
    }

    /// Whether the input used CRLF line ends (its first line did); inserted
    /// lines then end in CRLF too.
    pub fn uses_crlf(&self) -> bool {
        self.crlf
    }

    /// Original bytes of a file name taken from this descriptor
    /// (same as [`name_bytes`] with [`Descriptor::is_latin1`]).
    pub fn file_name_bytes(&self, name: &str) -> Vec<u8> {
        name_bytes(name, self.latin1)
    }

    /// Terminator for inserted lines.
    fn default_eol(&self) -> Eol {
        if self.crlf {
            Eol::CrLf
        } else {
            Eol::Lf
        }
    }

    /// The entry of line `i`, if it is a header or DDB line.
    fn entry_at(&self, i: usize) -> Option<&Entry> {
        match self.lines.get(i).map(|l| &l.kind) {
            Some(Kind::Header(e)) | Some(Kind::Ddb(e)) => Some(e),
            _ => None,
        }
    }

    /// Index of the last header line with `key` (case-insensitive).
    fn last_header(&self, key: &str) -> Option<usize> {
        self.lines
            .iter()
            .rposition(|l| matches!(&l.kind, Kind::Header(e) if e.key.eq_ignore_ascii_case(key)))
    }

    /// Index of the last DDB line with `key` (case-insensitive).
    fn last_ddb(&self, key: &str) -> Option<usize> {
        self.lines
            .iter()
            .rposition(|l| matches!(&l.kind, Kind::Ddb(e) if e.key.eq_ignore_ascii_case(key)))
    }
}
