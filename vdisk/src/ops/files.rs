//! Whole-link file operations: rename (descriptor and every extent file) and unlink.
//! Both lock every file of the link exclusively first, so a disk in use by another
//! writer or reader is refused with a `Locked` error.

use std::path::{Path, PathBuf};

use crate::disk::OpenOptions;
use crate::error::{Error, ErrorKind, Result};
use crate::ops::create::base_name;
use crate::storage::{FileStorage, LockMode};

/// The files of a link: its descriptor (or monolithic file) and extent files, with
/// the descriptor's text when it is a separate file.
struct LinkFiles {
    descriptor: PathBuf,
    embedded: bool,
    extents: Vec<PathBuf>,
    /// The change-tracking sidecar, if the link is tracked.
    cbt: Option<PathBuf>,
}

fn link_files(path: &Path) -> Result<LinkFiles> {
    // Only this link: its parents need not be present, nor unlocked.
    let disk = OpenOptions::new().single_link(true).open(path)?;
    let link = &disk.links()[0];
    let embedded = link.has_embedded_descriptor();
    let extents = link
        .extents()
        .iter()
        .filter_map(|e| e.path.clone())
        .filter(|p| !(embedded && p == path))
        .collect();
    Ok(LinkFiles {
        descriptor: path.to_path_buf(),
        embedded,
        extents,
        cbt: crate::cbt::sidecar_path(link)?,
    })
}

/// Takes exclusive locks on every file (held while the returned value lives).
fn lock_all(files: &LinkFiles) -> Result<Vec<FileStorage>> {
    std::iter::once(&files.descriptor)
        .chain(files.extents.iter())
        .map(|p| FileStorage::open(p, false, LockMode::Exclusive))
        .collect()
}

/// Deletes a disk link: the descriptor, then every extent file. Children of the
/// disk are not touched (they become orphans, as with VDDK).
///
/// The descriptor goes first so that the link disappears in one step: a crash (or
/// an error) part-way leaves extent files nothing names, never a descriptor whose
/// extents are partly gone - that disk would no longer open, and a commit, which
/// deletes the merged links last, could not be run again to finish.
pub fn unlink(path: &Path) -> Result<()> {
    let files = link_files(path)?;
    let _locks = lock_all(&files)?;
    std::fs::remove_file(&files.descriptor)
        .map_err(|e| Error::io(format!("cannot delete {}", files.descriptor.display()), e))?;
    for f in &files.extents {
        std::fs::remove_file(f)
            .map_err(|e| Error::io(format!("cannot delete {}", f.display()), e))?;
    }
    if let Some(f) = &files.cbt {
        match std::fs::remove_file(f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("cannot delete {}", f.display()), e)),
        }
    }
    Ok(())
}

/// The new name of an extent file when its disk is renamed from `old_stem` to
/// `new_stem`: the same suffix after the new stem (`a-s001.vmdk` -> `b-s001.vmdk`);
/// extent files that do not carry the old stem keep their names.
fn renamed_extent(file: &Path, old_stem: &str, new_dir: &Path, new_stem: &str) -> Option<PathBuf> {
    let name = file.file_name()?.to_str()?;
    let suffix = name.strip_prefix(old_stem)?;
    Some(new_dir.join(format!("{new_stem}{suffix}")))
}

/// Renames a disk link: the descriptor and every extent file named after it, and the
/// extent lines that name them. New names are hard links made first, the new
/// descriptor is written next; only then are the old names removed. A failure before
/// that point removes what was made and leaves the old names working.
pub fn rename(src: &Path, dst: &Path) -> Result<()> {
    if dst.exists() {
        return Err(Error::new(
            ErrorKind::AlreadyExists,
            format!("{} already exists", dst.display()),
        ));
    }
    let files = link_files(src)?;
    let locks = lock_all(&files)?;
    let (_, old_stem) = base_name(src)?;
    let (new_dir, new_stem) = base_name(dst)?;
    if files.embedded {
        // One file: rename it, then fix the (informational) extent line inside.
        std::fs::rename(src, dst).map_err(|e| {
            Error::io(
                format!("cannot rename {} to {}", src.display(), dst.display()),
                e,
            )
        })?;
        drop(locks);
        let fixed = (|| {
            let disk = crate::OpenOptions::new().write(true).open(dst)?;
            let link = &disk.links()[0];
            let mut d = link.descriptor()?;
            let mut lines = d.extents();
            if let (Some(line), Some(name)) =
                (lines.first_mut(), dst.file_name().and_then(|n| n.to_str()))
            {
                line.file = Some(name.to_string());
            }
            d.set_extents(&lines);
            link.save_descriptor(&d)?;
            drop(d);
            disk.close()
        })();
        if let Err(e) = fixed {
            tracing::warn!(
                "{}: renamed, but the embedded extent line was not updated: {e}",
                dst.display()
            );
        }
        return Ok(());
    }
    let mut moves: Vec<(PathBuf, PathBuf)> = Vec::new();
    for f in &files.extents {
        if let Some(to) = renamed_extent(f, &old_stem, &new_dir, &new_stem) {
            if to.exists() {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!("{} already exists", to.display()),
                ));
            }
            moves.push((f.clone(), to));
        }
    }
    let text =
        std::fs::read(src).map_err(|e| Error::io(format!("cannot read {}", src.display()), e))?;
    let mut d = crate::descriptor::Descriptor::parse(&text)?;
    let mut lines = d.extents();
    let src_dir = src.parent().unwrap_or(Path::new(""));
    for line in &mut lines {
        if let Some(name) = &line.file {
            let old = src_dir.join(name);
            if let Some((_, to)) = moves.iter().find(|(from, _)| *from == old) {
                let rel = to.strip_prefix(&new_dir).unwrap_or(to);
                line.file = Some(rel.display().to_string());
            }
        }
    }
    d.set_extents(&lines);
    let mut made: Vec<PathBuf> = Vec::new();
    let result = (|| {
        for (from, to) in &moves {
            std::fs::hard_link(from, to).map_err(|e| {
                Error::io(
                    format!("cannot link {} as {}", from.display(), to.display()),
                    e,
                )
            })?;
            made.push(to.clone());
        }
        std::fs::write(dst, d.to_bytes())
            .map_err(|e| Error::io(format!("cannot write {}", dst.display()), e))?;
        made.push(dst.to_path_buf());
        Ok(())
    })();
    if let Err(e) = result {
        for p in &made {
            let _ = std::fs::remove_file(p);
        }
        return Err(e);
    }
    drop(locks);
    // The new disk is complete; remove the old names.
    std::fs::remove_file(src)
        .map_err(|e| Error::io(format!("cannot remove {}", src.display()), e))?;
    for (from, _) in &moves {
        std::fs::remove_file(from)
            .map_err(|e| Error::io(format!("cannot remove {}", from.display()), e))?;
    }
    Ok(())
}
