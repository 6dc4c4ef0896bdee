//! Whole-link file operations: rename (descriptor and every extent file) and unlink.
//! Both lock every file of the link exclusively first, so a disk in use by another
//! writer or reader is refused with a `Locked` error.

use std::path::{Path, PathBuf};

use crate::descriptor::Descriptor;
use crate::disk::OpenOptions;
use crate::error::{Error, ErrorKind, Result};
use crate::extent::sparse::{
    read_descriptor_area, write_descriptor_area, SparseHeader, HEADER_SIZE,
};
use crate::ops::create::base_name;
use crate::replace::{remove_stale_temp, replace_file, sync_folder};
use crate::storage::{FileStorage, LockMode, Storage};

/// The files of a link: its descriptor (or monolithic file) and extent files.
struct LinkFiles {
    descriptor: PathBuf,
    /// The descriptor's content.
    text: Descriptor,
    embedded: bool,
    /// The extent files (without a monolithic file itself).
    extents: Vec<PathBuf>,
    /// The file of each extent line of the descriptor (None: a ZERO extent).
    lines: Vec<Option<PathBuf>>,
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
    let text = link.descriptor()?.clone();
    Ok(LinkFiles {
        descriptor: path.to_path_buf(),
        text,
        embedded,
        extents,
        lines: link.extents().iter().map(|e| e.path.clone()).collect(),
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
        remove_stale_temp(f)?;
    }
    // Leftovers of killed rewrites go with the disk.
    remove_stale_temp(&files.descriptor)
}

/// The names a rename works with.
struct Names<'a> {
    src: &'a Path,
    dst: &'a Path,
    src_dir: PathBuf,
    old_stem: String,
    new_dir: PathBuf,
    new_stem: String,
    /// Whether both names are in one folder (then extent names are the same
    /// relative names from either descriptor).
    same_folder: bool,
}

impl Names<'_> {
    /// The new name of an extent file `file` of the disk: the same suffix after the
    /// new stem in the new folder (`a-s001.vmdk` -> `b-s001.vmdk`); extent files
    /// that do not carry the old stem keep their names (None).
    fn renamed(&self, file: &Path) -> Option<PathBuf> {
        let suffix = file.file_name()?.to_str()?.strip_prefix(&self.old_stem)?;
        Some(self.new_dir.join(format!("{}{suffix}", self.new_stem)))
    }

    /// If `file` is an extent file already linked under its new name by an earlier,
    /// interrupted rename: the old name that is still a link to it.
    fn left_behind(&self, file: &Path) -> Option<PathBuf> {
        let suffix = file.file_name()?.to_str()?.strip_prefix(&self.new_stem)?;
        if folder_of(file) != folder_of(&self.new_dir.join("x")) {
            return None;
        }
        let old = self.src_dir.join(format!("{}{suffix}", self.old_stem));
        (old != file && same_file(&old, file)).then_some(old)
    }
}

/// The canonical folder of `file` (for comparisons).
fn folder_of(file: &Path) -> PathBuf {
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf())
}

/// Whether `a` and `b` both exist and are the same file (hard links of one inode).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::symlink_metadata(a), std::fs::symlink_metadata(b)) {
        (Ok(x), Ok(y)) => (x.dev(), x.ino()) == (y.dev(), y.ino()),
        _ => false,
    }
}

fn exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

fn already_exists(p: &Path) -> Error {
    Error::new(
        ErrorKind::AlreadyExists,
        format!("{} already exists", p.display()),
    )
}

/// Renames a disk link: the descriptor and every extent file named after it, and the
/// extent lines that name them. A disk already at `dst` is refused (`AlreadyExists`).
///
/// Crash safe and restartable: at every point exactly one of `src` and `dst` is a
/// descriptor, and it opens and reads the disk; two descriptors never name the same
/// extent files. Calling `rename(src, dst)` again after an interruption finishes
/// it. For a disk with separate extent files:
///
/// 1. each extent file named after the disk gets its new name as a hard link (a new
///    name that already is a link to the same file is a leftover of an interrupted
///    rename and is kept; another file there is `AlreadyExists`);
/// 2. `src` is rewritten (atomically, [`crate::replace`]) to name the new extent
///    names: relative names when `dst` is in the same folder, else absolute ones,
///    which name the same files from either folder;
/// 3. `src` is renamed to `dst` (atomic), the folders synced;
/// 4. (another folder only) `dst` is rewritten with relative names;
/// 5. the old extent names are removed, the folder synced.
///
/// A retry with `src` still there starts again at 1 (step 1 accepts its own
/// leftovers, and extent files already under their new name are recognised by the
/// old name still being a link to them); with only `dst` there it does 4 and 5 if
/// they are unfinished, and reports `src` missing if nothing was left to do. A
/// monolithic file (embedded descriptor) has its informational extent line set to
/// the new name first (in place, [`crate::extent::sparse::write_descriptor_area`])
/// and is then renamed.
pub fn rename(src: &Path, dst: &Path) -> Result<()> {
    let (src_dir, old_stem) = base_name(src)?;
    let (new_dir, new_stem) = base_name(dst)?;
    let names = Names {
        src,
        dst,
        same_folder: folder_of(src) == folder_of(dst),
        src_dir,
        old_stem,
        new_dir,
        new_stem,
    };
    match (exists(src), exists(dst)) {
        (true, true) => Err(already_exists(dst)),
        (false, true) => finish_rename(&names),
        _ => start_rename(&names),
    }
}

/// Syncs the folders of both names.
fn sync_folders(n: &Names<'_>) -> Result<()> {
    sync_folder(n.src)?;
    if !n.same_folder {
        sync_folder(n.dst)?;
    }
    Ok(())
}

/// Rename with `src` present: steps 1 to 5 (see [`rename`]).
fn start_rename(n: &Names<'_>) -> Result<()> {
    let (src, dst) = (n.src, n.dst);
    let files = link_files(src)?;
    if files.embedded {
        return rename_monolithic(n);
    }
    let mut locks = lock_all(&files)?;
    let mut d = files.text.clone();
    let lines = d.extents();
    let mut new_lines = lines.clone();
    // (old name, new name) of every extent file that moves; the old name goes last.
    let mut moves: Vec<(PathBuf, PathBuf)> = Vec::new();
    let mut made: Vec<PathBuf> = Vec::new();
    let linked = (|| -> Result<()> {
        for (line, path) in new_lines.iter_mut().zip(&files.lines) {
            let Some(path) = path else { continue };
            let (to, moved) = if let Some(old) = n.left_behind(path) {
                moves.push((old, path.clone()));
                (path.clone(), true)
            } else if let Some(to) = n.renamed(path) {
                if same_file(path, &to) {
                    // Linked by an interrupted rename.
                } else if exists(&to) {
                    return Err(already_exists(&to));
                } else {
                    std::fs::hard_link(path, &to).map_err(|e| {
                        Error::io(
                            format!("cannot link {} as {}", path.display(), to.display()),
                            e,
                        )
                    })?;
                    made.push(to.clone());
                }
                moves.push((path.clone(), to.clone()));
                (to, true)
            } else {
                (path.clone(), false)
            };
            // What the descriptor names, valid from the folder of src and of dst.
            let name = if n.same_folder {
                match (moved, to.file_name()) {
                    (true, Some(f)) => f.to_string_lossy().into_owned(),
                    _ => continue,
                }
            } else {
                std::path::absolute(&to)
                    .map_err(|e| Error::io(format!("cannot resolve {}", to.display()), e))?
                    .display()
                    .to_string()
            };
            line.file = Some(name);
        }
        if !made.is_empty() {
            sync_folder(dst)?;
        }
        if new_lines != lines {
            d.set_extents(&new_lines);
            locks[0] = replace_file(src, &d.to_bytes(), LockMode::Exclusive, true)?;
        }
        Ok(())
    })();
    if let Err(e) = linked {
        // Nothing names the links made so far: take them back.
        for p in &made {
            let _ = std::fs::remove_file(p);
        }
        return Err(e);
    }
    // The switch: the (rewritten) descriptor takes its new name in one step.
    switch_name(src, dst, n)?;
    if !n.same_folder {
        relative_names(n, &mut locks[0])?;
    }
    remove_old_names(n, &moves)?;
    drop(locks);
    Ok(())
}

/// Rename with only `dst` present: what an interrupted rename left (steps 4 and 5).
fn finish_rename(n: &Names<'_>) -> Result<()> {
    let files = link_files(n.dst)?;
    let moves: Vec<(PathBuf, PathBuf)> = if files.embedded {
        Vec::new()
    } else {
        files
            .extents
            .iter()
            .filter_map(|p| n.left_behind(p).map(|old| (old, p.clone())))
            .collect()
    };
    let mut locks = lock_all(&files)?;
    let rewritten = !files.embedded && relative_names(n, &mut locks[0])?;
    if moves.is_empty() && !rewritten {
        return Err(Error::new(
            ErrorKind::FileNotFound,
            format!(
                "{} does not exist ({} is there, with nothing left of a rename to finish)",
                n.src.display(),
                n.dst.display()
            ),
        ));
    }
    remove_old_names(n, &moves)
}

/// Step 4: extent lines of `dst` that name files in its own folder by absolute name
/// are made relative. Returns whether the descriptor changed; `lock` becomes the
/// rewritten descriptor's handle.
fn relative_names(n: &Names<'_>, lock: &mut FileStorage) -> Result<bool> {
    let dst = n.dst;
    let text =
        std::fs::read(dst).map_err(|e| Error::io(format!("cannot read {}", dst.display()), e))?;
    let mut d = Descriptor::parse(&text)?;
    let mut lines = d.extents();
    let here = folder_of(dst);
    let mut changed = false;
    for line in &mut lines {
        let Some(name) = &line.file else { continue };
        let p = Path::new(name);
        if p.is_absolute() && folder_of(p) == here {
            if let Some(f) = p.file_name() {
                line.file = Some(f.to_string_lossy().into_owned());
                changed = true;
            }
        }
    }
    if changed {
        d.set_extents(&lines);
        *lock = replace_file(dst, &d.to_bytes(), LockMode::Exclusive, true)?;
    }
    Ok(changed)
}

/// Step 5: the old names of moved extent files go (only while they still are links
/// to the new names), then the folder is synced.
fn remove_old_names(n: &Names<'_>, moves: &[(PathBuf, PathBuf)]) -> Result<()> {
    for (old, new) in moves {
        if old != new && same_file(old, new) {
            std::fs::remove_file(old)
                .map_err(|e| Error::io(format!("cannot remove {}", old.display()), e))?;
        }
    }
    if !moves.is_empty() {
        sync_folder(n.src)?;
    }
    Ok(())
}

/// A monolithic file: its embedded extent line (informational: readers ignore the
/// name) is set to the new name in place, then the file is renamed. A retry finds
/// either the file under its old name (and does both again) or under the new one.
fn rename_monolithic(n: &Names<'_>) -> Result<()> {
    let (src, dst) = (n.src, n.dst);
    let storage = match FileStorage::open(src, true, LockMode::Exclusive) {
        Ok(s) => s,
        // A file we may not write is still renamed (its extent line keeps the old
        // name, which readers ignore).
        Err(e) if matches!(e.kind(), ErrorKind::AccessDenied | ErrorKind::ReadOnly) => {
            FileStorage::open(src, false, LockMode::Exclusive)?
        }
        Err(e) => return Err(e),
    };
    if let Err(e) = set_embedded_name(&storage, dst) {
        tracing::warn!(
            "{}: the embedded extent line is not updated to the new name: {e}",
            src.display()
        );
    }
    switch_name(src, dst, n)?;
    drop(storage);
    Ok(())
}

/// Sets the file name of the embedded extent line of the monolithic file behind
/// `storage` to the file name of `dst`, unless it already is.
fn set_embedded_name(storage: &FileStorage, dst: &Path) -> Result<()> {
    let shown = storage.path().display().to_string();
    let mut head = [0u8; HEADER_SIZE];
    storage
        .read_exact_at(&mut head, 0)
        .map_err(|e| Error::io(format!("{shown}: cannot read the header"), e))?;
    let h = SparseHeader::parse(&head)?;
    let Some(area) = read_descriptor_area(storage, &h, &shown)? else {
        return Ok(());
    };
    let mut d = Descriptor::parse(&area)
        .map_err(|e| Error::invalid(format!("{shown}: embedded descriptor: {}", e.message)))?;
    let mut lines = d.extents();
    let name = dst.file_name().and_then(|f| f.to_str());
    match (lines.first_mut(), name) {
        (Some(line), Some(name)) if line.file.as_deref() != Some(name) => {
            line.file = Some(name.to_string());
        }
        _ => return Ok(()),
    }
    d.set_extents(&lines);
    write_descriptor_area(storage, &h, &d.to_bytes(), &shown)
}

/// Renames `src` to `dst` (refused if `dst` exists) and syncs both folders: the one
/// step in which the disk changes its name.
fn switch_name(src: &Path, dst: &Path, n: &Names<'_>) -> Result<()> {
    if exists(dst) {
        return Err(already_exists(dst));
    }
    std::fs::rename(src, dst).map_err(|e| {
        Error::io(
            format!("cannot rename {} to {}", src.display(), dst.display()),
            e,
        )
    })?;
    sync_folders(n)
}
