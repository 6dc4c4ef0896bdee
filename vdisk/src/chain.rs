//! Opening a snapshot chain: from a link, follow `parentFileNameHint` to its parent,
//! and so on down to the base.
//!
//! Parent names are resolved by an open policy. By default a relative hint is taken
//! relative to the child's folder, and an absolute hint that does not exist here (an
//! ESXi `/vmfs/volumes/...` path, a Windows path) falls back to its file name in the
//! child's folder. The strict policy, for untrusted images, refuses absolute hints,
//! `..` components and symbolic links. Parents are opened read-only; each parent's
//! CID must equal its child's `parentCID` (or the CID the child records as pending
//! while a commit re-points it, [`PENDING_PARENT_CID_KEY`]) unless the caller opts
//! out; loops and chains deeper than the limit are refused, each with its own error.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind, Result};
use crate::ids::CID_NO_PARENT;
use crate::link::{Link, LinkOpen};

/// How to follow a chain.
#[derive(Clone, Copy, Debug)]
pub struct ChainPolicy {
    /// Open only the named link; unallocated ranges read as zeros (VDDK's
    /// `OPEN_SINGLE_LINK`).
    pub single_link: bool,
    /// Refuse a parent whose CID differs from the child's parentCID.
    pub check_cid: bool,
    /// Refuse absolute names, `..`, symbolic links and block devices (see
    /// [`crate::paths`]).
    pub strict_paths: bool,
    /// Most links in the chain, the top one included.
    pub max_depth: usize,
    /// Open only this many links from the top (no error if the chain goes on); used
    /// to read the links above a commit target without locking the target.
    pub stop_after: Option<usize>,
}

/// What a link says about its parent.
pub fn parent_of(link: &Link) -> Result<Option<(Vec<u8>, u32)>> {
    let d = link.descriptor()?;
    let parent_cid = d.parent_cid().unwrap_or(CID_NO_PARENT);
    match d.parent_file_name_hint() {
        Some(hint) if !hint.is_empty() => Ok(Some((d.file_name_bytes(hint), parent_cid))),
        _ if parent_cid != CID_NO_PARENT => Err(Error::new(
            ErrorKind::InvalidChain,
            format!(
                "{}: the link has a parentCID ({parent_cid:08x}) but no parentFileNameHint naming its parent",
                link.path().display()
            ),
        )),
        _ => Ok(None),
    }
}

/// Resolves a parent name found in the descriptor `child` under `policy`.
pub fn resolve_parent(child: &Path, hint: &[u8], strict: bool) -> Result<PathBuf> {
    let path = find_parent(child, hint, strict)?;
    crate::paths::check_file_type(&path, strict)?;
    Ok(path)
}

fn find_parent(child: &Path, hint: &[u8], strict: bool) -> Result<PathBuf> {
    if strict {
        return crate::paths::confine(child, hint, "the parent");
    }
    let dir = child.parent().unwrap_or(Path::new("."));
    let shown = String::from_utf8_lossy(hint).to_string();
    let windows_absolute = hint.first() != Some(&b'/') && crate::paths::is_absolute_name(hint);
    let candidate = if windows_absolute {
        None
    } else {
        Some(dir.join(Path::new(OsStr::from_bytes(hint))))
    };
    if let Some(p) = &candidate {
        if p.exists() {
            return Ok(p.clone());
        }
    }
    // Fall back to the file name in the child's folder (copied VM folders, ESXi and
    // Windows paths).
    let base = hint
        .rsplit(|&b| b == b'/' || b == b'\\')
        .next()
        .unwrap_or(hint);
    let fallback = dir.join(Path::new(OsStr::from_bytes(base)));
    if fallback.exists() {
        return Ok(fallback);
    }
    Err(Error::new(
        ErrorKind::FileNotFound,
        format!(
            "the parent disk {shown:?} named by {} is missing (looked for {})",
            child.display(),
            candidate.as_deref().unwrap_or(&fallback).display()
        ),
    ))
}

/// The DDB key in which a link records the CID its parent is about to get, while a
/// commit that keeps the link changes both (see [`crate::ops::commit`]): the two
/// descriptors cannot change in one step, and the chain must open in between.
pub const PENDING_PARENT_CID_KEY: &str = "ddb.vdisk.pendingParentCID";

/// The parent CID `link` records as pending ([`PENDING_PARENT_CID_KEY`]), if any.
pub fn pending_parent_cid(link: &Link) -> Result<Option<u32>> {
    Ok(link
        .descriptor()?
        .ddb(PENDING_PARENT_CID_KEY)
        .and_then(|v| u32::from_str_radix(v.trim(), 16).ok()))
}

/// Opens the parents below `top` (already open) and returns the whole chain, top first.
pub fn open_chain(top: Link, how: LinkOpen, policy: &ChainPolicy) -> Result<Vec<Link>> {
    let mut seen = HashSet::new();
    seen.insert(canonical(top.path()));
    let mut links = vec![top];
    if policy.single_link {
        return Ok(links);
    }
    loop {
        let child = links.last().expect("chain has a top link");
        let Some((hint, parent_cid)) = parent_of(child)? else {
            return Ok(links);
        };
        if policy.stop_after.is_some_and(|n| links.len() >= n) {
            return Ok(links);
        }
        if links.len() >= policy.max_depth {
            return Err(Error::new(
                ErrorKind::TooManyRedo,
                format!(
                    "the snapshot chain of {} has more than {} links",
                    links[0].path().display(),
                    policy.max_depth
                ),
            ));
        }
        let path = resolve_parent(child.path(), &hint, policy.strict_paths)?;
        if !seen.insert(canonical(&path)) {
            return Err(Error::new(
                ErrorKind::InvalidChain,
                format!(
                    "the snapshot chain loops: {} names {} as its parent, which is already in the chain",
                    child.path().display(),
                    path.display()
                ),
            ));
        }
        let parent = Link::open(
            &path,
            LinkOpen {
                writable: false,
                ..how
            },
        )?;
        if policy.check_cid {
            let cid = parent.descriptor()?.cid();
            let pending = pending_parent_cid(child)?;
            if cid != Some(parent_cid) && (cid.is_none() || cid != pending) {
                return Err(Error::new(
                    ErrorKind::CidMismatch,
                    format!(
                        "{} expects its parent {} to have CID {parent_cid:08x}, but it has {}: the parent changed after the snapshot was taken",
                        child.path().display(),
                        path.display(),
                        cid.map_or("none".to_string(), |c| format!("{c:08x}"))
                    ),
                ));
            }
        }
        links.push(parent);
    }
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}
