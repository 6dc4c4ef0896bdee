//! Setters. All are infallible: `"`, CR, LF (and NUL) are removed from
//! keys and values before writing, so the result always parses back.

use super::model::{Kind, Line};
use super::parse::{is_ddb_key, trim_ws};
use super::write::{entry_line, extent_line, sanitize_key, sanitize_value, verbatim_line};
use super::{Descriptor, ExtentLine};
use crate::descriptor::CreateType;

/// Whether a line is the comment `# <title>` (case-insensitive, any spacing).
fn is_comment(l: &Line, title: &str) -> bool {
    matches!(l.kind, Kind::Comment)
        && trim_ws(trim_ws(&l.text).trim_start_matches('#')).eq_ignore_ascii_case(title)
}

impl Descriptor {
    /// Sets `CID`, written bare as 8 hex digits (`CID=0000abcd`). A new
    /// line is placed right before `parentCID` if that exists.
    pub fn set_cid(&mut self, cid: u32) {
        self.put_header("CID", &format!("{cid:08x}"), false);
    }

    /// Sets `parentCID`, written bare as 8 hex digits. A new line is placed
    /// right after `CID` if that exists.
    pub fn set_parent_cid(&mut self, cid: u32) {
        self.put_header("parentCID", &format!("{cid:08x}"), false);
    }

    /// Sets `createType` (quoted, canonical spelling).
    pub fn set_create_type(&mut self, t: &CreateType) {
        self.put_header("createType", t.as_str(), true);
    }

    /// Sets (quoted) or, with `None`, removes `parentFileNameHint`. A new
    /// line is placed right after `createType` if that exists.
    /// `"`, CR and LF are removed from the hint.
    pub fn set_parent_file_name_hint(&mut self, hint: Option<&str>) {
        match hint {
            Some(h) => self.put_header("parentFileNameHint", h, true),
            None => self.remove_header("parentFileNameHint"),
        }
    }

    /// Sets a header key. An existing line (the last one, if duplicated) is
    /// rewritten in place keeping the file's spelling of the key; otherwise a
    /// line is inserted after the last header line before the extents (with
    /// `CID`/`parentCID` kept adjacent and `parentFileNameHint` after
    /// `createType`).
    ///
    /// `"`, CR, LF and NUL are removed from `value`; whitespace, `=` and
    /// quotes are removed from `key` (an empty key does nothing). A value
    /// containing whitespace is quoted even if `quoted` is false. A key
    /// starting with `ddb.` is handed to [`Descriptor::set_ddb`].
    pub fn set_header(&mut self, key: &str, value: &str, quoted: bool) {
        self.put_header(key, value, quoted);
    }

    /// Removes every header line with `key` (case-insensitive). A key
    /// starting with `ddb.` is handed to [`Descriptor::remove_ddb`].
    pub fn remove_header(&mut self, key: &str) {
        if is_ddb_key(key) {
            self.remove_ddb(key);
            return;
        }
        self.lines
            .retain(|l| !matches!(&l.kind, Kind::Header(e) if e.key.eq_ignore_ascii_case(key)));
    }

    /// Replaces all extent lines. The new ones go where the first extent
    /// line was; if there was none, after an existing `# Extent description`
    /// comment, else after the header behind a new such comment. At most
    /// [`crate::limits::MAX_EXTENTS`] extents are kept; lines are rendered
    /// with [`ExtentLine::to_line`].
    pub fn set_extents(&mut self, extents: &[ExtentLine]) {
        let eol = self.default_eol();
        let new: Vec<Line> = extents
            .iter()
            .take(crate::limits::MAX_EXTENTS)
            .map(|e| extent_line(e, eol))
            .collect();
        if let Some(first) = self
            .lines
            .iter()
            .position(|l| matches!(l.kind, Kind::Extent(_)))
        {
            self.lines.retain(|l| !matches!(l.kind, Kind::Extent(_)));
            self.insert_lines(first, new);
            return;
        }
        if new.is_empty() {
            return;
        }
        if let Some(c) = self
            .lines
            .iter()
            .position(|l| is_comment(l, "Extent description"))
        {
            self.insert_lines(c + 1, new);
            return;
        }
        let at = self.header_insert_pos();
        let mut block = Vec::with_capacity(new.len() + 3);
        let prev_blank = at
            .checked_sub(1)
            .and_then(|p| self.lines.get(p))
            .is_none_or(|l| matches!(l.kind, Kind::Blank));
        if !prev_blank {
            block.push(verbatim_line("", eol));
        }
        block.push(verbatim_line("# Extent description", eol));
        block.extend(new);
        if self
            .lines
            .get(at)
            .is_some_and(|l| !matches!(l.kind, Kind::Blank))
        {
            block.push(verbatim_line("", eol));
        }
        self.insert_lines(at, block);
    }

    /// Sets a DDB entry, written `key = "value"`. `key` should include the
    /// `ddb.` prefix (it is added if missing). An existing entry (the last,
    /// if duplicated) is rewritten in place keeping the file's key spelling;
    /// a new one goes after the last DDB entry, else into an existing `#DDB`
    /// section, else at the end of the file behind new
    /// `# The Disk Data Base` / `#DDB` comments.
    ///
    /// `"`, CR, LF and NUL are removed from `value`; whitespace, `=` and
    /// quotes from `key` (an empty key does nothing).
    pub fn set_ddb(&mut self, key: &str, value: &str) {
        let key = sanitize_key(key, self.latin1);
        if key.is_empty() {
            return;
        }
        let key = if is_ddb_key(&key) {
            key
        } else {
            format!("ddb.{key}")
        };
        let value = sanitize_value(value, self.latin1);
        let eol = self.default_eol();
        if let Some(i) = self.last_ddb(&key) {
            self.rewrite_entry(i, &value, true);
            return;
        }
        let line = entry_line(&key, &value, true, eol);
        if let Some(i) = self
            .lines
            .iter()
            .rposition(|l| matches!(l.kind, Kind::Ddb(_)))
        {
            self.insert_lines(i + 1, vec![line]);
            return;
        }
        if let Some(c) = self.lines.iter().position(|l| is_comment(l, "DDB")) {
            let mut at = c + 1;
            while self
                .lines
                .get(at)
                .is_some_and(|l| matches!(l.kind, Kind::Blank | Kind::Comment))
            {
                at += 1;
            }
            self.insert_lines(at, vec![line]);
            return;
        }
        let mut block = Vec::with_capacity(5);
        if self
            .lines
            .last()
            .is_some_and(|l| !matches!(l.kind, Kind::Blank))
        {
            block.push(verbatim_line("", eol));
        }
        block.push(verbatim_line("# The Disk Data Base", eol));
        block.push(verbatim_line("#DDB", eol));
        block.push(verbatim_line("", eol));
        block.push(line);
        let end = self.lines.len();
        self.insert_lines(end, block);
    }

    /// Removes every DDB entry with `key` (case-insensitive, including the
    /// `ddb.` prefix); returns whether any was removed.
    pub fn remove_ddb(&mut self, key: &str) -> bool {
        let before = self.lines.len();
        self.lines
            .retain(|l| !matches!(&l.kind, Kind::Ddb(e) if e.key.eq_ignore_ascii_case(key)));
        self.lines.len() != before
    }

    /// Common implementation of the header setters.
    fn put_header(&mut self, key: &str, value: &str, quoted: bool) {
        let key = sanitize_key(key, self.latin1);
        if key.is_empty() {
            return;
        }
        if is_ddb_key(&key) {
            self.set_ddb(&key, value);
            return;
        }
        let value = sanitize_value(value, self.latin1);
        if let Some(i) = self.last_header(&key) {
            self.rewrite_entry(i, &value, quoted);
            return;
        }
        let at = if key.eq_ignore_ascii_case("CID") {
            self.last_header("parentCID")
        } else if key.eq_ignore_ascii_case("parentCID") {
            self.last_header("CID").map(|i| i + 1)
        } else if key.eq_ignore_ascii_case("parentFileNameHint") {
            self.last_header("createType").map(|i| i + 1)
        } else {
            None
        }
        .unwrap_or_else(|| self.header_insert_pos());
        let line = entry_line(&key, &value, quoted, self.default_eol());
        self.insert_lines(at, vec![line]);
    }

    /// Re-renders entry line `i` with a new (sanitized) value, keeping its
    /// key spelling and terminator.
    fn rewrite_entry(&mut self, i: usize, value: &str, quoted: bool) {
        let Some(key) = self.entry_at(i).map(|e| e.key.clone()) else {
            return;
        };
        if let Some(l) = self.lines.get_mut(i) {
            *l = entry_line(&key, value, quoted, l.eol);
        }
    }

    /// Where a new header line goes: after the last header line before the
    /// first extent line (or, without extents, the first DDB line); without
    /// such a header line, at the top (after a leading
    /// `# Disk DescriptorFile` comment).
    fn header_insert_pos(&self) -> usize {
        let boundary = self
            .lines
            .iter()
            .position(|l| matches!(l.kind, Kind::Extent(_)))
            .or_else(|| {
                self.lines
                    .iter()
                    .position(|l| matches!(l.kind, Kind::Ddb(_)))
            })
            .unwrap_or(self.lines.len());
        let before = self.lines.get(..boundary).unwrap_or(&[]);
        match before
            .iter()
            .rposition(|l| matches!(l.kind, Kind::Header(_)))
        {
            Some(i) => i + 1,
            None => match self.lines.first() {
                Some(l) if is_comment(l, "Disk DescriptorFile") => 1,
                _ => 0,
            },
        }
    }

    /// Inserts lines at `at` (clamped), giving an unterminated preceding
    /// last line a terminator first.
    fn insert_lines(&mut self, at: usize, new: Vec<Line>) {
        if new.is_empty() {
            return;
        }
        let at = at.min(self.lines.len());
        let eol = self.default_eol();
        if let Some(prev) = at.checked_sub(1).and_then(|p| self.lines.get_mut(p)) {
            if prev.eol == super::model::Eol::None {
                prev.eol = eol;
            }
        }
        self.lines.splice(at..at, new);
    }
}
