//! The vdisk mounts of the system, as `/proc/self/mountinfo` lists them.
//!
//! A disk mounted by [`crate::mount`] has the file-system type `fuse.vdisk` and the
//! disk's canonical path as its source.

use std::io;
use std::path::{Path, PathBuf};

/// The FUSE subtype of our mounts (the type is `fuse.` followed by it).
pub const FS_SUBTYPE: &str = "vdisk";
/// The file-system type of our mounts in `mountinfo`.
pub const FS_TYPE: &str = "fuse.vdisk";

/// One mount of `mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    /// The file-system type (`fuse.vdisk`, `ext4`, ...).
    pub fs_type: String,
    /// The source (for ours, the disk's path).
    pub source: String,
    /// Mounted read-only.
    pub read_only: bool,
}

/// Undoes mountinfo's escapes: `\ooo` (octal) for space, tab, newline and backslash.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let digits = &b[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let v = digits.iter().fold(0u32, |v, d| v * 8 + u32::from(d - b'0'));
                if let Ok(byte) = u8::try_from(v) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses the text of a `mountinfo` file (lines that do not parse are skipped).
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            let mountpoint = fields.get(4)?;
            let mount_opts = fields.get(5)?;
            let fs_type = fields.get(sep + 1)?;
            let source = fields.get(sep + 2)?;
            Some(MountEntry {
                mountpoint: PathBuf::from(unescape(mountpoint)),
                fs_type: unescape(fs_type),
                source: unescape(source),
                read_only: mount_opts.split(',').any(|o| o == "ro"),
            })
        })
        .collect()
}

/// Every mount of this process's mount namespace.
pub fn all_mounts() -> io::Result<Vec<MountEntry>> {
    Ok(parse_mountinfo(&std::fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

/// The vdisk mounts (type `fuse.vdisk`), in mount order.
pub fn vdisk_mounts() -> io::Result<Vec<MountEntry>> {
    Ok(all_mounts()?
        .into_iter()
        .filter(|m| m.fs_type == FS_TYPE)
        .collect())
}

/// The vdisk mount on `dir` (compared as given and canonicalized), if any; the last
/// one when several are stacked there.
pub fn vdisk_mount_at(dir: &Path) -> io::Result<Option<MountEntry>> {
    let canonical = dir.canonicalize().ok();
    Ok(vdisk_mounts()?
        .into_iter()
        .rfind(|m| m.mountpoint == dir || Some(&m.mountpoint) == canonical.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_are_parsed_and_unescaped() {
        let text = "22 27 0:21 / /proc rw,relatime - proc proc rw\n\
            61 27 0:50 / /mnt/my\\040disk rw,nosuid,nodev,relatime shared:1 - fuse.vdisk /tmp/a\\040b/disk.vmdk rw,user_id=0,group_id=0,default_permissions,allow_other\n\
            62 27 0:51 / /mnt/ro ro,relatime - fuse.vdisk /tmp/x\\134y.vmdk ro,user_id=0\n\
            garbage\n";
        let all = parse_mountinfo(text);
        assert_eq!(all.len(), 3);
        assert_eq!(all[1].mountpoint, PathBuf::from("/mnt/my disk"));
        assert_eq!(all[1].source, "/tmp/a b/disk.vmdk");
        assert_eq!(all[1].fs_type, FS_TYPE);
        assert!(!all[1].read_only);
        assert_eq!(all[2].source, "/tmp/x\\y.vmdk");
        assert!(all[2].read_only);
        assert_eq!(unescape("a\\04"), "a\\04");
        assert_eq!(unescape("\\777x"), "\\777x");
    }
}
