//! Tolerant parser: line splitting, line classification and the nom
//! tokenizers for `key=value` and extent lines.

use std::borrow::Cow;

use nom::branch::alt;
use nom::bytes::complete::{take_till, take_while1};
use nom::character::complete::char;
use nom::combinator::rest;
use nom::sequence::{delimited, separated_pair};
use nom::{IResult, Parser};

use super::model::{Entry, Eol, ExtentAccess, ExtentKind, ExtentLine, Kind, Line};
use super::{Descriptor, DescriptorError};

/// Field separator / trimmable whitespace inside a line.
pub(super) fn is_ws(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\u{b}' | '\u{c}')
}

/// Trims [`is_ws`] characters on both sides.
pub(super) fn trim_ws(s: &str) -> &str {
    s.trim_matches(is_ws)
}

/// Whether `key` names a DDB entry (`ddb.` prefix, case-insensitive).
pub(super) fn is_ddb_key(key: &str) -> bool {
    key.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("ddb."))
}

fn err(line: usize, message: impl Into<String>) -> DescriptorError {
    DescriptorError {
        line,
        message: message.into(),
    }
}

/// Shortens text quoted in error messages.
fn show(s: &str) -> String {
    const MAX: usize = 48;
    if s.chars().count() > MAX {
        let mut t: String = s.chars().take(MAX).collect();
        t.push_str("...");
        t
    } else {
        s.to_string()
    }
}

/// Numeric parse failure.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum NumError {
    /// Not a (non-empty) run of digits.
    NotNumber,
    /// Does not fit the target type.
    TooLarge,
}

/// Parses an unsigned decimal number (digits only, overflow checked).
pub(super) fn parse_dec_u64(s: &str) -> Result<u64, NumError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(NumError::NotNumber);
    }
    s.bytes().try_fold(0u64, |acc, b| {
        acc.checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(b - b'0')))
            .ok_or(NumError::TooLarge)
    })
}

/// Parses a decimal `u32` (digits only); `None` if invalid or too large.
pub(super) fn parse_dec_u32(s: &str) -> Option<u32> {
    parse_dec_u64(s).ok().and_then(|v| u32::try_from(v).ok())
}

/// Parses a hexadecimal `u32` of any width (hex digits only); `None` if
/// invalid or too large.
pub(super) fn parse_hex_u32(s: &str) -> Option<u32> {
    if s.is_empty() {
        return None;
    }
    s.chars().try_fold(0u32, |acc, c| {
        let d = c.to_digit(16)?;
        acc.checked_mul(16)?.checked_add(d)
    })
}

/// One field of a line: double-quoted (no escapes) or bare.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tok<'a> {
    Quoted(&'a str),
    Bare(&'a str),
}

impl<'a> Tok<'a> {
    fn text(self) -> &'a str {
        match self {
            Tok::Quoted(s) | Tok::Bare(s) => s,
        }
    }
}

/// nom: a quoted string (up to the next `"`) or a bare word (up to
/// whitespace or a quote).
fn token(i: &str) -> IResult<&str, Tok<'_>> {
    alt((
        delimited(char('"'), take_till(|c: char| c == '"'), char('"')).map(Tok::Quoted),
        take_while1(|c: char| !is_ws(c) && c != '"').map(Tok::Bare),
    ))
    .parse(i)
}

/// nom: `key=value` split at the first `=`.
fn key_value(i: &str) -> IResult<&str, (&str, &str)> {
    separated_pair(take_till(|c: char| c == '='), char('='), rest).parse(i)
}

/// Checks what follows a token: end of text or whitespace.
fn check_after(tok: Tok<'_>, after: &str, lineno: usize) -> Result<(), DescriptorError> {
    match after.chars().next() {
        None => Ok(()),
        Some(c) if is_ws(c) => Ok(()),
        Some(_) => Err(match tok {
            Tok::Quoted(_) => err(
                lineno,
                format!(
                    "unexpected text \"{}\" after closing quote",
                    show(trim_ws(after))
                ),
            ),
            Tok::Bare(s) => err(lineno, format!("unexpected quote after \"{}\"", show(s))),
        }),
    }
}

/// Splits an extent line into at most 7 fields.
fn tokenize(t: &str, lineno: usize) -> Result<Vec<Tok<'_>>, DescriptorError> {
    let mut out = Vec::with_capacity(7);
    let mut rest = t;
    loop {
        rest = rest.trim_start_matches(is_ws);
        if rest.is_empty() {
            return Ok(out);
        }
        if out.len() == 7 {
            return Err(err(lineno, "extent line has more than 7 fields"));
        }
        match token(rest) {
            Ok((after, tok)) => {
                check_after(tok, after, lineno)?;
                out.push(tok);
                rest = after;
            }
            Err(_) => return Err(err(lineno, "missing closing quote")),
        }
    }
}

fn parse_num(tok: Tok<'_>, lineno: usize, what: &str) -> Result<u64, DescriptorError> {
    let text = tok.text();
    let res = match tok {
        Tok::Quoted(_) => Err(NumError::NotNumber),
        Tok::Bare(s) => parse_dec_u64(s),
    };
    res.map_err(|e| match e {
        NumError::NotNumber => err(lineno, format!("{what} \"{}\" is not a number", show(text))),
        NumError::TooLarge => err(lineno, format!("{what} \"{}\" is too large", show(text))),
    })
}

/// Parses a trimmed extent line.
fn parse_extent(t: &str, lineno: usize) -> Result<ExtentLine, DescriptorError> {
    let toks = tokenize(t, lineno)?;
    let mut it = toks.into_iter();
    let access = match it.next() {
        Some(Tok::Bare(s)) => ExtentAccess::parse(s),
        _ => None,
    }
    .ok_or_else(|| err(lineno, "extent line has no access mode"))?;
    let sectors = match it.next() {
        Some(tok) => parse_num(tok, lineno, "extent sector count")?,
        None => return Err(err(lineno, "extent line has no sector count")),
    };
    let kind = match it.next() {
        Some(tok) => ExtentKind::parse(tok.text()),
        None => return Err(err(lineno, "extent line has no type")),
    };
    let file = match it.next() {
        Some(Tok::Quoted(s)) => Some(s.to_string()),
        Some(Tok::Bare(s)) => {
            return Err(err(
                lineno,
                format!("extent file name \"{}\" is not in double quotes", show(s)),
            ))
        }
        None => None,
    };
    if file.is_none() && kind != ExtentKind::Zero {
        return Err(err(
            lineno,
            format!("{} extent has no file name", show(kind.as_str())),
        ));
    }
    let offset = match it.next() {
        Some(tok) => Some(parse_num(tok, lineno, "extent offset")?),
        None => None,
    };
    let extra = it.map(|tok| tok.text().to_string()).collect();
    Ok(ExtentLine {
        access,
        sectors,
        kind,
        file,
        offset,
        extra,
    })
}

/// Parses a trimmed `key=value` line.
fn parse_entry(t: &str, lineno: usize) -> Result<Entry, DescriptorError> {
    let (k, v) = match key_value(t) {
        Ok((_, kv)) => kv,
        Err(_) => return Err(err(lineno, "expected key=value")),
    };
    let key = trim_ws(k);
    if key.is_empty() {
        return Err(err(lineno, "missing key before \"=\""));
    }
    if key.contains(|c: char| is_ws(c) || c == '"') {
        return Err(err(lineno, format!("invalid key \"{}\"", show(key))));
    }
    let v = v.trim_start_matches(is_ws);
    let (value, quoted) = if v.is_empty() {
        ("", false)
    } else {
        match token(v) {
            Ok((after, tok)) => {
                let after = trim_ws(after);
                if !after.is_empty() {
                    let what = match tok {
                        Tok::Quoted(_) => "closing quote",
                        Tok::Bare(_) => "value",
                    };
                    return Err(err(
                        lineno,
                        format!("unexpected text \"{}\" after {what}", show(after)),
                    ));
                }
                (tok.text(), matches!(tok, Tok::Quoted(_)))
            }
            Err(_) => return Err(err(lineno, "missing closing quote")),
        }
    };
    Ok(Entry {
        key: key.to_string(),
        value: value.to_string(),
        quoted,
    })
}

/// Classifies one line (without terminator). `lineno` is 1-based.
pub(super) fn classify(line: &str, lineno: usize) -> Result<Kind, DescriptorError> {
    let t = trim_ws(line);
    if t.is_empty() {
        return Ok(Kind::Blank);
    }
    if t.starts_with('#') {
        return Ok(Kind::Comment);
    }
    let first = t.split(is_ws).next().unwrap_or("");
    if ExtentAccess::parse(first).is_some() {
        return parse_extent(t, lineno).map(Kind::Extent);
    }
    if t.contains('=') {
        let entry = parse_entry(t, lineno)?;
        return Ok(if is_ddb_key(&entry.key) {
            Kind::Ddb(entry)
        } else {
            Kind::Header(entry)
        });
    }
    Err(err(
        lineno,
        format!(
            "expected key=value, an extent line or a comment, found \"{}\"",
            show(t)
        ),
    ))
}

/// UTF-8 if valid, else Latin-1 (flag `true`).
fn decode(bytes: &[u8]) -> (Cow<'_, str>, bool) {
    match std::str::from_utf8(bytes) {
        Ok(s) => (Cow::Borrowed(s), false),
        Err(_) => (
            Cow::Owned(bytes.iter().map(|&b| char::from(b)).collect()),
            true,
        ),
    }
}

/// Implementation of [`Descriptor::parse`].
pub(super) fn parse_descriptor(bytes: &[u8]) -> Result<Descriptor, DescriptorError> {
    let (bytes, _) = bytes.split_at(bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len()));
    if bytes.len() > crate::limits::MAX_DESCRIPTOR_BYTES {
        return Err(err(
            0,
            format!(
                "descriptor is {} bytes, more than the limit of {}",
                bytes.len(),
                crate::limits::MAX_DESCRIPTOR_BYTES
            ),
        ));
    }
    let (text, latin1) = decode(bytes);
    let bom = text.starts_with('\u{feff}');
    let mut lines = Vec::new();
    let mut extents = 0usize;
    let mut rest: &str = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut lineno = 0usize;
    while !rest.is_empty() {
        lineno += 1;
        if lineno > crate::limits::MAX_DESCRIPTOR_LINES {
            return Err(err(
                lineno,
                format!(
                    "too many lines (limit {})",
                    crate::limits::MAX_DESCRIPTOR_LINES
                ),
            ));
        }
        let (seg, eol, next) = match rest.split_once('\n') {
            Some((seg, next)) => match seg.strip_suffix('\r') {
                Some(s) => (s, Eol::CrLf, next),
                None => (seg, Eol::Lf, next),
            },
            None => (rest, Eol::None, ""),
        };
        if seg.contains('\r') {
            return Err(err(lineno, "stray carriage return"));
        }
        let kind = classify(seg, lineno)?;
        if matches!(kind, Kind::Extent(_)) {
            extents += 1;
            if extents > crate::limits::MAX_EXTENTS {
                return Err(err(
                    lineno,
                    format!("too many extents (limit {})", crate::limits::MAX_EXTENTS),
                ));
            }
        }
        lines.push(Line {
            text: seg.to_string(),
            eol,
            kind,
        });
        rest = next;
    }
    let crlf = lines.first().is_some_and(|l| l.eol == Eol::CrLf);
    Ok(Descriptor {
        lines,
        crlf,
        latin1,
        bom,
    })
}
