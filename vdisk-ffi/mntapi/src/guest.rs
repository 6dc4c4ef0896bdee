//! Finding the operating system in a mounted volume.
//!
//! Linux: `etc/os-release` (or `usr/lib/os-release`) gives the name and version;
//! the ELF class of a system program says whether it is 64-bit. Windows: a
//! `Windows/System32` folder (any case), 64-bit when `Windows/SysWOW64` exists.
//!
//! The volume belongs to a guest and may be hostile: paths inside it are resolved
//! the way the guest would resolve them ([`resolve_in`]: symbolic links followed
//! with absolute targets taken from the volume's root, `..` never above it), so a
//! link cannot make this library read a file of the host. Files read are bounded.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use crate::types::{VixOsFamily, VIXMNTAPI_OTHER, VIXMNTAPI_WINDOWS};

/// Most symbolic links followed to resolve one path (as Linux's limit).
const MAX_LINKS: usize = 40;
/// The largest os-release file read.
const MAX_OS_RELEASE: u64 = 64 * 1024;
/// Programs whose ELF class tells a Linux system's word size, in order.
const ELF_PROBES: [&str; 5] = [
    "usr/bin/env",
    "bin/sh",
    "usr/bin/sh",
    "sbin/init",
    "usr/lib/systemd/systemd",
];

/// An operating system found in a volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct OsFound {
    /// `VIXMNTAPI_WINDOWS` or `VIXMNTAPI_OTHER`.
    pub family: VixOsFamily,
    /// Major version (0 when unknown).
    pub major: u32,
    /// Minor version (0 when unknown).
    pub minor: u32,
    /// Whether it is 64-bit.
    pub is_64bit: bool,
    /// The vendor.
    pub vendor: String,
    /// The edition (empty when unknown).
    pub edition: String,
    /// Its folder on the host: the volume's folder (Linux) or its Windows folder.
    pub folder: PathBuf,
}

/// The operating system in the volume mounted at `root`, if any.
pub(crate) fn inspect(root: &Path) -> Option<OsFound> {
    linux(root).or_else(|| windows(root))
}

fn linux(root: &Path) -> Option<OsFound> {
    let file = ["etc/os-release", "usr/lib/os-release"]
        .iter()
        .filter_map(|rel| resolve_in(root, rel))
        .find(|p| fs::symlink_metadata(p).is_ok_and(|m| m.is_file()))?;
    let mut text = Vec::new();
    fs::File::open(&file)
        .ok()?
        .take(MAX_OS_RELEASE)
        .read_to_end(&mut text)
        .ok()?;
    let fields = parse_os_release(&String::from_utf8_lossy(&text));
    let get = |key: &str| {
        fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    };
    let (major, minor) = get("VERSION_ID").map(version_numbers).unwrap_or((0, 0));
    Some(OsFound {
        family: VIXMNTAPI_OTHER,
        major,
        minor,
        is_64bit: ELF_PROBES
            .iter()
            .filter_map(|rel| resolve_in(root, rel))
            .find_map(|p| elf_is_64bit(&p))
            .unwrap_or(false),
        vendor: get("NAME").or(get("ID")).unwrap_or("Linux").to_string(),
        edition: get("PRETTY_NAME")
            .or(get("VERSION_ID"))
            .unwrap_or("")
            .to_string(),
        folder: root.to_path_buf(),
    })
}

fn windows(root: &Path) -> Option<OsFound> {
    let folder = child_dir(root, "Windows")?;
    child_dir(&folder, "System32")?;
    Some(OsFound {
        family: VIXMNTAPI_WINDOWS,
        major: 0,
        minor: 0,
        is_64bit: child_dir(&folder, "SysWOW64").is_some(),
        vendor: "Microsoft".to_string(),
        edition: String::new(),
        folder,
    })
}

/// The sub-folder of `dir` named `name` in any case (a real folder, not a link).
fn child_dir(dir: &Path, name: &str) -> Option<PathBuf> {
    fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .find(|e| {
            e.file_name().to_string_lossy().eq_ignore_ascii_case(name)
                && e.file_type().is_ok_and(|t| t.is_dir())
        })
        .map(|e| e.path())
}

/// Whether the ELF file at `path` is 64-bit; None when it is not ELF.
fn elf_is_64bit(path: &Path) -> Option<bool> {
    if !fs::symlink_metadata(path).ok()?.is_file() {
        return None;
    }
    let mut ident = [0u8; 5];
    fs::File::open(path).ok()?.read_exact(&mut ident).ok()?;
    (ident[..4] == *b"\x7fELF").then_some(ident[4] == 2)
}

/// Resolves the relative path `rel` inside the folder `root` as the guest would:
/// symbolic links are followed (at most [`MAX_LINKS`]), absolute link targets start
/// again at `root`, and `..` stops at `root`. The result has no symbolic link in it
/// below `root`; None when a component does not exist.
pub(crate) fn resolve_in(root: &Path, rel: &str) -> Option<PathBuf> {
    let mut todo: VecDeque<OsString> = components(Path::new(rel));
    let mut done: Vec<OsString> = Vec::new();
    let mut links = 0;
    while let Some(name) = todo.pop_front() {
        if name == ".." {
            done.pop();
            continue;
        }
        let here: PathBuf = root.join(done.iter().collect::<PathBuf>()).join(&name);
        let meta = fs::symlink_metadata(&here).ok()?;
        if !meta.file_type().is_symlink() {
            done.push(name);
            continue;
        }
        links += 1;
        if links > MAX_LINKS {
            return None;
        }
        let target = fs::read_link(&here).ok()?;
        if target.is_absolute() {
            done.clear();
        }
        let mut rest = components(&target);
        rest.extend(todo);
        todo = rest;
    }
    Some(root.join(done.iter().collect::<PathBuf>()))
}

/// The normal and `..` components of a path (root and `.` dropped).
fn components(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

/// The `KEY=value` pairs of an os-release file, values unquoted (double quotes with
/// backslash escapes, or single quotes).
pub(crate) fn parse_os_release(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            if line.starts_with('#') {
                return None;
            }
            let (key, value) = line.split_once('=')?;
            let key = key.trim();
            if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return None;
            }
            Some((key.to_string(), unquote(value.trim())))
        })
        .collect()
}

fn unquote(v: &str) -> String {
    if let Some(inner) = v.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')) {
        return inner.to_string();
    }
    let Some(inner) = v.strip_prefix('"').and_then(|s| s.strip_suffix('"')) else {
        return v.to_string();
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                out.push(next);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The first two numbers of a version: `22.04` -> (22, 4), `12` -> (12, 0),
/// `rolling` -> (0, 0).
pub(crate) fn version_numbers(v: &str) -> (u32, u32) {
    let mut parts = v.split(['.', '-', '_']).map(|p| {
        let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u32>().unwrap_or(0)
    });
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn os_release_values_are_unquoted() {
        let f = parse_os_release(
            "# comment\nNAME=\"Test Linux\"\nID=testlinux\nVERSION_ID='1.2'\n\
             PRETTY_NAME=\"Test \\\"Quoted\\\" 1.2\"\nbad line\n=x\n",
        );
        assert_eq!(
            f,
            [
                ("NAME".to_string(), "Test Linux".to_string()),
                ("ID".to_string(), "testlinux".to_string()),
                ("VERSION_ID".to_string(), "1.2".to_string()),
                ("PRETTY_NAME".to_string(), "Test \"Quoted\" 1.2".to_string()),
            ]
        );
    }

    #[test]
    fn versions() {
        assert_eq!(version_numbers("22.04"), (22, 4));
        assert_eq!(version_numbers("12"), (12, 0));
        assert_eq!(version_numbers("3.18.4"), (3, 18));
        assert_eq!(version_numbers("rolling"), (0, 0));
        assert_eq!(version_numbers(""), (0, 0));
    }

    #[test]
    fn a_linux_root_is_found_through_a_relative_link() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fs::create_dir_all(r.join("usr/lib")).unwrap();
        fs::create_dir_all(r.join("etc")).unwrap();
        fs::write(
            r.join("usr/lib/os-release"),
            "NAME=\"Test Linux\"\nVERSION_ID=\"1.2\"\nPRETTY_NAME=\"Test Linux 1.2\"\n",
        )
        .unwrap();
        symlink("../usr/lib/os-release", r.join("etc/os-release")).unwrap();
        fs::create_dir_all(r.join("usr/bin")).unwrap();
        let mut elf = b"\x7fELF\x02".to_vec();
        elf.resize(64, 0);
        fs::write(r.join("usr/bin/env"), &elf).unwrap();
        let os = inspect(r).unwrap();
        assert_eq!(os.family, VIXMNTAPI_OTHER);
        assert_eq!((os.major, os.minor), (1, 2));
        assert!(os.is_64bit);
        assert_eq!(os.vendor, "Test Linux");
        assert_eq!(os.edition, "Test Linux 1.2");
        assert_eq!(os.folder, r);
    }

    #[test]
    fn absolute_links_stay_inside_the_volume() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fs::create_dir_all(r.join("etc")).unwrap();
        fs::create_dir_all(r.join("usr/lib")).unwrap();
        fs::write(r.join("usr/lib/os-release"), "ID=inside\n").unwrap();
        // On the host this would be the host's own file.
        symlink("/usr/lib/os-release", r.join("etc/os-release")).unwrap();
        assert_eq!(
            resolve_in(r, "etc/os-release"),
            Some(r.join("usr/lib/os-release"))
        );
        let os = inspect(r).unwrap();
        assert_eq!(os.vendor, "inside");
        assert_eq!(os.edition, "");
        assert!(!os.is_64bit);
        // `..` stops at the root.
        symlink("../../../../etc/passwd", r.join("escape")).unwrap();
        assert_eq!(resolve_in(r, "escape"), None);
        fs::write(r.join("etc/passwd"), "guest's\n").unwrap();
        assert_eq!(resolve_in(r, "escape"), Some(r.join("etc/passwd")));
    }

    #[test]
    fn link_loops_end() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        symlink("b", r.join("a")).unwrap();
        symlink("a", r.join("b")).unwrap();
        assert_eq!(resolve_in(r, "a"), None);
        assert_eq!(inspect(r), None);
    }

    #[test]
    fn a_windows_folder_is_found_in_any_case() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fs::create_dir_all(r.join("WINDOWS/system32")).unwrap();
        let os = inspect(r).unwrap();
        assert_eq!(os.family, VIXMNTAPI_WINDOWS);
        assert_eq!(os.folder, r.join("WINDOWS"));
        assert!(!os.is_64bit);
        fs::create_dir_all(r.join("WINDOWS/SysWOW64")).unwrap();
        assert!(inspect(r).unwrap().is_64bit);
    }

    #[test]
    fn nothing_found_in_a_plain_volume() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("data/etc")).unwrap();
        assert_eq!(inspect(root.path()), None);
    }
}
