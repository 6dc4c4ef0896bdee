//! Writer: encoding, line rendering, canonical new descriptors.

use super::model::{Entry, Eol, ExtentKind, ExtentLine, Kind, Line};
use super::parse::{is_ddb_key, is_ws};
use super::{CreateType, Descriptor};

/// Turns text from a descriptor (e.g. an extent file name) back into the
/// bytes it came from: UTF-8 when `latin1` is false, otherwise each char
/// below U+0100 becomes the byte of the same value (exact round trip of a
/// Latin-1 descriptor). Chars from U+0100 up, which a Latin-1 input cannot
/// contain, are written as UTF-8 (best effort).
pub fn name_bytes(s: &str, latin1: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    encode_into(s, latin1, &mut out);
    out
}

/// Appends `s` encoded as described in [`name_bytes`].
fn encode_into(s: &str, latin1: bool, out: &mut Vec<u8>) {
    if !latin1 {
        out.extend_from_slice(s.as_bytes());
        return;
    }
    for c in s.chars() {
        match u8::try_from(u32::from(c)) {
            Ok(b) => out.push(b),
            Err(_) => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
}

/// Removes characters that can never appear inside a value or file name.
fn strip_unsafe(s: &str) -> String {
    s.chars()
        .filter(|c| !matches!(c, '"' | '\r' | '\n' | '\0'))
        .collect()
}

/// Sanitizes a value for writing: drops `"`, CR, LF and NUL; in a Latin-1
/// descriptor, chars from U+0100 up become `?`.
pub(super) fn sanitize_value(v: &str, latin1: bool) -> String {
    strip_unsafe(v)
        .chars()
        .map(|c| {
            if latin1 && u32::from(c) > 0xff {
                '?'
            } else {
                c
            }
        })
        .collect()
}

/// Sanitizes a key: drops whitespace, `=`, `"`, CR, LF, NUL, BOM and
/// leading `#`.
pub(super) fn sanitize_key(k: &str, latin1: bool) -> String {
    let s: String = k
        .chars()
        .filter(|&c| !is_ws(c) && !matches!(c, '"' | '=' | '\r' | '\n' | '\0' | '\u{feff}'))
        .collect();
    sanitize_value(s.trim_start_matches('#'), latin1)
}

/// Renders one field of an extent line: bare unless it is empty or has
/// whitespace.
fn push_field(out: &mut String, s: &str) {
    out.push(' ');
    if s.is_empty() || s.contains(is_ws) {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        out.push_str(s);
    }
}

impl ExtentLine {
    /// The extent line exactly as [`ExtentLine::to_line`] writes it, i.e. as
    /// parsing that text gives it back.
    pub(super) fn normalized(&self) -> ExtentLine {
        let kind = match &self.kind {
            ExtentKind::Other(s) => ExtentKind::parse(&strip_unsafe(s)),
            k => k.clone(),
        };
        let mut file = self.file.as_deref().map(strip_unsafe);
        if file.is_none() && kind != ExtentKind::Zero {
            file = Some(String::new());
        }
        let offset = file.as_ref().and(self.offset);
        let extra = match offset {
            Some(_) => self.extra.iter().take(2).map(|s| strip_unsafe(s)).collect(),
            None => Vec::new(),
        };
        ExtentLine {
            access: self.access,
            sectors: self.sectors,
            kind,
            file,
            offset,
            extra,
        }
    }

    /// Renders the line VMware style: `RW 20480 SPARSE "disk.vmdk"`,
    /// `RW 4192256 FLAT "d-f001.vmdk" 0`, `RW 100 ZERO`.
    ///
    /// The output always parses back: `"`, CR, LF and NUL are removed from
    /// the file name and extra fields; a non-`ZERO` extent without a file
    /// name is written with `""`; the offset is written only after a file
    /// name and the extra fields (at most two) only after an offset.
    pub fn to_line(&self) -> String {
        let e = self.normalized();
        let mut s = format!("{} {}", e.access.as_str(), e.sectors);
        push_field(&mut s, e.kind.as_str());
        if let Some(f) = &e.file {
            s.push_str(" \"");
            s.push_str(f);
            s.push('"');
            if let Some(o) = e.offset {
                s.push(' ');
                s.push_str(&o.to_string());
                for x in &e.extra {
                    push_field(&mut s, x);
                }
            }
        }
        s
    }
}

/// A comment or blank line.
pub(super) fn verbatim_line(text: &str, eol: Eol) -> Line {
    let kind = if text.is_empty() {
        Kind::Blank
    } else {
        Kind::Comment
    };
    Line {
        text: text.to_string(),
        eol,
        kind,
    }
}

/// An entry line from an already sanitized key and value. DDB keys are
/// written `key = "value"`, header keys `key=value` or `key="value"`.
pub(super) fn entry_line(key: &str, value: &str, quoted: bool, eol: Eol) -> Line {
    let ddb = is_ddb_key(key);
    let quoted = ddb || quoted || value.contains(is_ws);
    let text = match (ddb, quoted) {
        (true, _) => format!("{key} = \"{value}\""),
        (false, true) => format!("{key}=\"{value}\""),
        (false, false) => format!("{key}={value}"),
    };
    let entry = Entry {
        key: key.to_string(),
        value: value.to_string(),
        quoted,
    };
    Line {
        text,
        eol,
        kind: if ddb {
            Kind::Ddb(entry)
        } else {
            Kind::Header(entry)
        },
    }
}

/// An extent line (normalized so that text and meaning agree).
pub(super) fn extent_line(e: &ExtentLine, eol: Eol) -> Line {
    Line {
        text: e.to_line(),
        eol,
        kind: Kind::Extent(e.normalized()),
    }
}

impl Descriptor {
    /// Serializes the descriptor. Lines that were not modified come out
    /// byte-identical to the input (which ends at its first NUL); modified
    /// and inserted lines are rendered VMware style and terminated like the
    /// input (CRLF if its first line ended in CRLF, else LF).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if self.bom {
            out.extend_from_slice("\u{feff}".as_bytes());
        }
        let n = self.lines.len();
        for (i, l) in self.lines.iter().enumerate() {
            encode_into(&l.text, self.latin1, &mut out);
            let eol = match l.eol {
                Eol::None if i + 1 < n => self.default_eol(),
                e => e,
            };
            match eol {
                Eol::None => {}
                Eol::Lf => out.push(b'\n'),
                Eol::CrLf => out.extend_from_slice(b"\r\n"),
            }
        }
        out
    }

    /// Canonical new descriptor in exactly VMware's layout: LF line ends,
    /// `# Disk DescriptorFile`, `version=1`, `encoding="UTF-8"`, `CID` and
    /// `parentCID` as 8 hex digits, `createType`, `parentFileNameHint` if
    /// given, a blank line, `# Extent description` and the extents, a blank
    /// line, `# The Disk Data Base`, `#DDB`, a blank line and the DDB
    /// entries `ddb.key = "value"` in the given order.
    ///
    /// Values are sanitized like the setters do (`"`, CR, LF removed); DDB
    /// keys without a `ddb.` prefix get one; at most
    /// [`crate::limits::MAX_EXTENTS`] extents are written.
    pub fn new(
        create_type: &CreateType,
        cid: u32,
        parent_cid: u32,
        parent_hint: Option<&str>,
        extents: &[ExtentLine],
        ddb: &[(&str, &str)],
    ) -> Descriptor {
        let lf = Eol::Lf;
        let mut lines = vec![
            verbatim_line("# Disk DescriptorFile", lf),
            entry_line("version", "1", false, lf),
            entry_line("encoding", "UTF-8", true, lf),
            entry_line("CID", &format!("{cid:08x}"), false, lf),
            entry_line("parentCID", &format!("{parent_cid:08x}"), false, lf),
            entry_line(
                "createType",
                &sanitize_value(create_type.as_str(), false),
                true,
                lf,
            ),
        ];
        if let Some(hint) = parent_hint {
            lines.push(entry_line(
                "parentFileNameHint",
                &sanitize_value(hint, false),
                true,
                lf,
            ));
        }
        lines.push(verbatim_line("", lf));
        lines.push(verbatim_line("# Extent description", lf));
        lines.extend(
            extents
                .iter()
                .take(crate::limits::MAX_EXTENTS)
                .map(|e| extent_line(e, lf)),
        );
        lines.push(verbatim_line("", lf));
        lines.push(verbatim_line("# The Disk Data Base", lf));
        lines.push(verbatim_line("#DDB", lf));
        lines.push(verbatim_line("", lf));
        for (k, v) in ddb {
            let key = sanitize_key(k, false);
            if key.is_empty() {
                continue;
            }
            let key = if is_ddb_key(&key) {
                key
            } else {
                format!("ddb.{key}")
            };
            lines.push(entry_line(&key, &sanitize_value(v, false), true, lf));
        }
        Descriptor {
            lines,
            crlf: false,
            latin1: false,
            bom: false,
        }
    }
}
