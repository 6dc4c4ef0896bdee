//! The policy for file names found inside disk files: extent names in a descriptor
//! and parent names in `parentFileNameHint`.
//!
//! A descriptor is data, and a hostile one can name any file on the host. Two rules
//! hold whatever the policy:
//! - a FIFO, socket or character device is never opened as a disk file (opening a
//!   FIFO blocks forever; `/dev/zero` or a tty is not a disk);
//! - block devices are allowed by default (raw device mappings and `fullDevice`
//!   disks name them), and refused by the strict policy.
//!
//! The strict policy, for untrusted images, also keeps every name inside the folder
//! of the file that names it: absolute names, `..` components, backslashes and
//! symbolic links anywhere below that folder are refused.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, ErrorKind, Result};

/// Whether a name is absolute on Unix or Windows (`/x`, `C:\x`, `C:/x`, `\\server`).
pub fn is_absolute_name(name: &[u8]) -> bool {
    name.first() == Some(&b'/')
        || name.starts_with(b"\\\\")
        || (name.len() > 2 && name[1] == b':' && (name[2] == b'\\' || name[2] == b'/'))
}

/// Resolves `name`, found in the file `owner`, under the strict policy: a relative
/// name inside `owner`'s folder, reached without symbolic links. `what` says what
/// the name is for the error message ("the parent", "extent 2").
pub fn confine(owner: &Path, name: &[u8], what: &str) -> Result<PathBuf> {
    let shown = String::from_utf8_lossy(name);
    let refuse = |why: String| {
        Error::new(
            ErrorKind::AccessDenied,
            format!(
                "{}: {what} {why}, which the strict open policy refuses",
                owner.display()
            ),
        )
    };
    if is_absolute_name(name) {
        return Err(refuse(format!("name {shown:?} is absolute")));
    }
    let rel = Path::new(OsStr::from_bytes(name));
    if name.is_empty()
        || name.contains(&b'\\')
        || rel
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::Prefix(_)))
    {
        return Err(refuse(format!("name {shown:?} leaves the disk's folder")));
    }
    let dir = owner.parent().unwrap_or(Path::new("."));
    let mut at = dir.to_path_buf();
    for c in rel.components() {
        at.push(c);
        if std::fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(refuse(format!(
                "{} is reached through a symbolic link",
                at.display()
            )));
        }
    }
    Ok(dir.join(rel))
}

/// Checks that `path` may be opened as a disk file: a regular file, or (unless
/// `strict`) a block device. A missing file passes: opening it reports that.
pub fn check_file_type(path: &Path, strict: bool) -> Result<()> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    let t = meta.file_type();
    let kind = if t.is_file() {
        return Ok(());
    } else if t.is_block_device() {
        if !strict {
            return Ok(());
        }
        "a block device, which the strict open policy refuses"
    } else if t.is_dir() {
        "a folder, not a disk file"
    } else if t.is_char_device() {
        "a character device, not a disk file"
    } else if t.is_fifo() {
        "a FIFO, not a disk file"
    } else if t.is_socket() {
        "a socket, not a disk file"
    } else {
        "not a regular file"
    };
    Err(Error::new(
        ErrorKind::AccessDenied,
        format!("{} is {kind}", path.display()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_names() {
        for n in [
            &b"/etc/passwd"[..],
            b"C:\\x.vmdk",
            b"c:/x.vmdk",
            b"\\\\srv\\x",
        ] {
            assert!(is_absolute_name(n), "{n:?}");
        }
        for n in [&b"x.vmdk"[..], b"a/b.vmdk", b"C:", b""] {
            assert!(!is_absolute_name(n), "{n:?}");
        }
    }

    #[test]
    fn confine_refuses_escapes() {
        let tmp = tempfile::tempdir().unwrap();
        let owner = tmp.path().join("d.vmdk");
        std::fs::create_dir(tmp.path().join("sub")).unwrap();
        std::os::unix::fs::symlink("/etc", tmp.path().join("link")).unwrap();
        assert_eq!(
            confine(&owner, b"sub/x-flat.vmdk", "extent 1").unwrap(),
            tmp.path().join("sub/x-flat.vmdk")
        );
        for (name, needle) in [
            (&b"/etc/passwd"[..], "is absolute"),
            (b"../x.vmdk", "leaves the disk's folder"),
            (b"sub/../../x", "leaves the disk's folder"),
            (b"a\\b", "leaves the disk's folder"),
            (b"", "leaves the disk's folder"),
            (b"link/passwd", "symbolic link"),
        ] {
            let e = confine(&owner, name, "extent 1").unwrap_err();
            assert_eq!(e.kind(), ErrorKind::AccessDenied, "{name:?}");
            assert!(e.to_string().contains(needle), "{name:?}: {e}");
        }
    }

    #[test]
    fn file_types() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(check_file_type(&tmp.path().join("missing"), true).is_ok());
        let f = tmp.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        assert!(check_file_type(&f, true).is_ok());
        let e = check_file_type(tmp.path(), false).unwrap_err();
        assert!(e.to_string().contains("a folder"), "{e}");
        let e = check_file_type(Path::new("/dev/null"), false).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
        assert_eq!(e.kind(), ErrorKind::AccessDenied);
    }
}
