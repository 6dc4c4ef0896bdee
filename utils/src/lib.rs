//! Shared pieces of the command-line tools: size parsing, human formatting, progress.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

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
    fn human_sizes() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(64 << 20), "64.0 MiB");
    }
}
