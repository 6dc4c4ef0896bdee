//! Shared pieces of the command-line tools: size parsing, human formatting, progress,
//! streamed JSON output.

pub mod remote;
pub use remote::{is_nbd_uri, nbd_client_options, open_for_reading};

use std::cell::RefCell;
use std::io::{IsTerminal, Write};

use indicatif::{ProgressBar, ProgressStyle};
use serde::ser::{Error as _, SerializeSeq, Serializer};
use serde::Serialize;
use serde_json::Value;

/// Parses a vmware-vdiskmanager size: a number (decimals allowed) with an optional
/// unit `KB`, `MB`, `GB`, `TB` (or `K`, `M`, `G`, `T`, binary multiples); a bare
/// number is a count of 512-byte sectors. The result is in bytes, rounded up to a
/// whole sector.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let upper = t.to_ascii_uppercase();
    let (num, mult): (&str, u64) = [
        ("TB", 1u64 << 40),
        ("GB", 1 << 30),
        ("MB", 1 << 20),
        ("KB", 1 << 10),
        ("T", 1 << 40),
        ("G", 1 << 30),
        ("M", 1 << 20),
        ("K", 1 << 10),
    ]
    .iter()
    .find(|(suffix, _)| upper.ends_with(suffix))
    .map(|(suffix, m)| (&t[..t.len() - suffix.len()], *m))
    .unwrap_or((t, 512));
    let bad = || format!("invalid size {s:?} (examples: 64MB, 36GB, 2048 sectors)");
    let bytes = if let Ok(n) = num.trim().parse::<u64>() {
        n.checked_mul(mult).ok_or_else(bad)?
    } else {
        let f: f64 = num.trim().parse().map_err(|_| bad())?;
        if !f.is_finite() || f < 0.0 || f * mult as f64 > 9.0e18 {
            return Err(bad());
        }
        (f * mult as f64).ceil() as u64
    };
    if bytes == 0 {
        return Err(format!("size {s:?} is zero"));
    }
    Ok(bytes.div_ceil(512) * 512)
}

/// `1.5 GiB`-style text.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A progress bar on stderr when it is a terminal and `quiet` is off; hidden otherwise.
pub fn progress_bar(total: u64, quiet: bool, what: &str) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

/// A progress bar counting steps (tables, files) rather than bytes, on stderr when
/// it is a terminal and not `quiet`.
pub fn step_bar(quiet: bool, what: &str) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    if let Ok(style) = ProgressStyle::with_template("{msg} [{bar:40}] {percent}% ({eta})") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

/// What a walk gets to hand on its elements: returns an error (which the walk
/// passes up, ending it) once the output has failed.
pub type Emit<'e> = dyn FnMut(Value) -> vdisk::Result<()> + 'e;

/// The walk behind a [`JsonWalk`].
type Walk<'a> = Box<dyn FnOnce(&mut Emit<'_>) -> vdisk::Result<()> + 'a>;

/// A JSON array whose elements a walk produces while it is being written (a disk's
/// allocation map, its changed areas): serialized as `serde_json` serializes a whole
/// array, holding one element at a time, so documents of millions of elements take
/// no memory. An error of the walk ends the array unfinished and becomes the
/// serialization error (its message is the walk's).
pub struct JsonWalk<'a> {
    walk: RefCell<Option<Walk<'a>>>,
}

impl<'a> JsonWalk<'a> {
    /// The array of what `walk` hands to its emitter.
    pub fn new(walk: impl FnOnce(&mut Emit<'_>) -> vdisk::Result<()> + 'a) -> JsonWalk<'a> {
        JsonWalk {
            walk: RefCell::new(Some(Box::new(walk))),
        }
    }
}

impl Serialize for JsonWalk<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let walk = self
            .walk
            .borrow_mut()
            .take()
            .ok_or_else(|| S::Error::custom("a streamed JSON array can be written once"))?;
        let mut seq = serializer.serialize_seq(None)?;
        let mut output_error = None;
        let walked = walk(&mut |v| {
            seq.serialize_element(&v).map_err(|e| {
                output_error = Some(e);
                vdisk::Error::new(vdisk::ErrorKind::Cancelled, "the output failed")
            })
        });
        if let Some(e) = output_error {
            return Err(e);
        }
        walked.map_err(|e| S::Error::custom(e.to_string()))?;
        seq.end()
    }
}

/// Writes `doc` to stdout as pretty JSON (`serde_json::to_string_pretty`'s layout)
/// and a newline, streamed through a buffer. A reader that went away (a closed
/// pipe) ends the program quietly, as for the other output.
pub fn print_json(doc: &impl Serialize) -> Result<(), String> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let written = serde_json::to_writer_pretty(&mut out, doc)
        .map_err(|e| match e.io_error_kind() {
            Some(kind) => output_failed(std::io::Error::from(kind)),
            None => e.to_string(),
        })
        .and_then(|()| {
            writeln!(out)
                .and_then(|()| out.flush())
                .map_err(output_failed)
        });
    // What the walk printed before it failed is complete lines of JSON so far.
    let _ = out.flush();
    written
}

/// Writes to stdout, through a buffer, what `walk` formats while it runs (a line of
/// a disk's allocation map at a time). Output that cannot be written ends the walk;
/// an error of the walk is returned after what was written before it.
pub fn print_walk(
    walk: impl FnOnce(&mut dyn FnMut(std::fmt::Arguments<'_>) -> vdisk::Result<()>) -> vdisk::Result<()>,
) -> Result<(), String> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut output_error = None;
    let walked = walk(&mut |line| {
        out.write_fmt(line).map_err(|e| {
            output_error = Some(e);
            vdisk::Error::new(vdisk::ErrorKind::Cancelled, "the output failed")
        })
    });
    if let Some(e) = output_error {
        return Err(output_failed(e));
    }
    out.flush().map_err(output_failed)?;
    walked.map_err(|e| e.to_string())
}

/// The message for output that could not be written; a closed pipe ends the
/// program quietly (exit 0).
pub fn output_failed(e: std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    format!("cannot write output: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_vdiskmanager() {
        assert_eq!(parse_size("64MB").unwrap(), 64 << 20);
        assert_eq!(parse_size("36GB").unwrap(), 36 << 30);
        assert_eq!(parse_size("8192.0GB").unwrap(), 8192 << 30);
        assert_eq!(parse_size("1.5KB").unwrap(), 1536);
        assert_eq!(parse_size("2048").unwrap(), 2048 * 512);
        assert_eq!(parse_size("100k").unwrap(), 102400);
        assert_eq!(parse_size("1000").unwrap(), 512_000);
        assert!(parse_size("abc").is_err());
        assert!(parse_size("0MB").is_err());
        assert!(parse_size("-5MB").is_err());
        assert!(parse_size("99999999999999TB").is_err());
    }

    #[test]
    fn streamed_arrays_are_laid_out_as_serde_json_lays_out_whole_ones() {
        for n in [0u64, 1, 3] {
            let items: Vec<Value> = (0..n)
                .map(|i| serde_json::json!({"start": i, "length": 2 * i, "zero": i == 1}))
                .collect();
            let whole = serde_json::json!({"areas": items, "bytes": n});
            let walk = JsonWalk::new(|emit| {
                for v in &items {
                    emit(v.clone())?;
                }
                Ok(())
            });
            #[derive(Serialize)]
            struct Doc<'a> {
                areas: JsonWalk<'a>,
                bytes: u64,
            }
            let streamed = serde_json::to_string_pretty(&Doc {
                areas: walk,
                bytes: n,
            })
            .unwrap();
            assert_eq!(streamed, serde_json::to_string_pretty(&whole).unwrap());
            let top = JsonWalk::new(|emit| {
                for v in &items {
                    emit(v.clone())?;
                }
                Ok(())
            });
            assert_eq!(
                serde_json::to_string_pretty(&top).unwrap(),
                serde_json::to_string_pretty(&items).unwrap()
            );
        }
    }

    #[test]
    fn a_failed_walk_is_the_serialization_error() {
        let walk = JsonWalk::new(|emit| {
            emit(Value::from(1))?;
            Err(vdisk::Error::invalid("grain table 7 is bad"))
        });
        let e = serde_json::to_string_pretty(&walk).unwrap_err();
        assert_eq!(e.to_string(), "grain table 7 is bad");
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(64 << 20), "64.0 MiB");
    }
}
