//! Consolidation (commit): merging the top links of a chain into the link below them,
//! in place, whatever their formats; the target keeps its format.
//!
//! Every range the merged links hold (data or zeros) is written into the target
//! through the normal write path, without changing the target's CID, so the chain
//! above the target stays valid: while the copy runs, the target only changes under
//! ranges the links above it cover, and the whole chain reads exactly as before. An
//! interrupted commit can simply be run again. Only at the end does the target get a
//! new CID; then the merged links are removed (they would no longer match), or, when
//! kept, the lowest of them is re-pointed at the target's new CID (through a pending
//! CID record, [`crate::chain::PENDING_PARENT_CID_KEY`], so that the chain opens
//! between the two descriptor rewrites).
//!
//! As with VDDK, other children of the target (siblings of the merged link) become
//! invalid (their parentCID no longer matches), and children of the named link that
//! this call cannot know about are orphaned when it is removed.

use std::path::{Path, PathBuf};

use crate::chain::PENDING_PARENT_CID_KEY;
use crate::descriptor::Descriptor;
use crate::disk::{Disk, OpenOptions, RangeKind};
use crate::error::{Error, ErrorKind, Result};
use crate::ops::convert::Progress;
use crate::ops::files::unlink;

/// How to commit.
#[derive(Clone, Debug)]
pub struct CommitOptions {
    /// How many links from the top to merge into the link below them (1: the named
    /// child into its parent).
    pub links: usize,
    /// Keep the merged links (re-pointed at the target) instead of deleting them.
    pub keep_child: bool,
}

impl Default for CommitOptions {
    fn default() -> Self {
        CommitOptions {
            links: 1,
            keep_child: false,
        }
    }
}

/// What a commit did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitStats {
    /// The link the data was merged into.
    pub target: PathBuf,
    /// Guest bytes written into it.
    pub bytes: u64,
    /// The target's new CID.
    pub cid: u32,
}

/// Bytes copied per read/write.
const CHUNK: u64 = 4 << 20;

/// Merges the top `opts.links` links of the chain named by `top` into the link
/// below them.
pub fn commit(top: &Path, opts: &CommitOptions, progress: Progress<'_>) -> Result<CommitStats> {
    commit_inner(top, opts, progress).map_err(|e| e.within(top.display()))
}

fn commit_inner(top: &Path, opts: &CommitOptions, progress: Progress<'_>) -> Result<CommitStats> {
    let n = opts.links.max(1);
    // The whole chain, to validate it and find the target.
    let (target, merged): (PathBuf, Vec<PathBuf>) = {
        let whole = Disk::open(top)?;
        let links = whole.links();
        if links.len() <= n {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "the chain has {} link(s); committing {n} needs a link below them",
                    links.len()
                ),
            ));
        }
        (
            links[n].path().to_path_buf(),
            links[..n].iter().map(|l| l.path().to_path_buf()).collect(),
        )
    };
    // The target takes over the top link's change-tracking history (unless the
    // top link stays).
    let history = if opts.keep_child {
        None
    } else {
        crate::cbt::history(&merged[0])?
    };
    let source = OpenOptions::new().top_links(n).open(top)?;
    let dest = OpenOptions::new().write(true).open(&target)?;
    dest.keep_cid();
    // The map is walked twice (streamed, never held whole): the total, then the copy.
    let mut total = 0u64;
    source.for_each_range(0, source.capacity(), |r| {
        if r.kind != RangeKind::Unallocated {
            total += r.length;
        }
        Ok(())
    })?;
    if !progress(0, total) {
        return Err(Error::new(ErrorKind::Cancelled, "commit cancelled"));
    }
    let mut buf = vec![0u8; CHUNK as usize];
    let zeros = vec![0u8; CHUNK as usize];
    let mut done = 0u64;
    let copied = source.for_each_range(0, source.capacity(), |r| {
        if r.kind == RangeKind::Unallocated {
            return Ok(());
        }
        let end = (r.offset + r.length).min(dest.capacity());
        let mut off = r.offset;
        while off < end {
            let len = (end - off).min(CHUNK) as usize;
            if r.kind == RangeKind::Data {
                source.read_at(&mut buf[..len], off)?;
                dest.write_at(&buf[..len], off)?;
            } else {
                dest.write_at(&zeros[..len], off)?;
            }
            off += len as u64;
            done += len as u64;
            if !progress(done, total) {
                return Err(Error::new(
                    ErrorKind::Cancelled,
                    "commit cancelled (the chain still reads as before; run it again to finish)",
                ));
            }
        }
        Ok(())
    });
    if let Err(e) = copied {
        if e.kind() == ErrorKind::Cancelled {
            dest.flush()?;
        }
        return Err(e);
    }
    dest.flush()?;
    drop(source);
    if opts.keep_child {
        // The lowest merged link must end up naming the target's new CID, and two
        // descriptors cannot change in one step: the link first records the CID its
        // parent is about to get (the chain check accepts it as well as parentCID),
        // then the target takes it, then the link's parentCID follows and the record
        // goes. Every step is one atomic descriptor rewrite, so a kill at any point
        // leaves a chain that opens; running the commit again finishes it (its first
        // step also settles a record a killed run left).
        let cid = crate::ids::new_cid();
        let lowest = &merged[n - 1];
        let now = dest.cid()?;
        edit_link(lowest, |d| {
            d.set_parent_cid(now);
            d.set_ddb(PENDING_PARENT_CID_KEY, &format!("{cid:08x}"));
        })?;
        set_cid(&dest, cid)?;
        dest.close()?;
        edit_link(lowest, |d| {
            d.set_parent_cid(cid);
            d.remove_ddb(PENDING_PARENT_CID_KEY);
        })?;
        progress(total, total);
        return Ok(CommitStats {
            target,
            bytes: done,
            cid,
        });
    }
    // The merged links go first: the target alone then reads as the committed
    // result, whatever its CID.
    for p in &merged {
        unlink(p)?;
    }
    let cid = dest.links()[0].renew_cid()?;
    dest.close()?;
    if let Some(h) = history {
        crate::cbt::reinstall(&target, h)?;
    }
    progress(total, total);
    Ok(CommitStats {
        target,
        bytes: done,
        cid,
    })
}

/// Edits the descriptor of the (closed) link at `path` alone, keeping its CID.
fn edit_link(path: &Path, edit: impl FnOnce(&mut Descriptor)) -> Result<()> {
    let disk = OpenOptions::new()
        .write(true)
        .single_link(true)
        .open(path)?;
    let link = &disk.links()[0];
    {
        let mut d = link.descriptor()?;
        edit(&mut d);
        link.save_descriptor(&d)?;
    }
    disk.keep_cid();
    disk.close()
}

/// Sets the top link's CID (and longContentID) to `cid`.
fn set_cid(disk: &Disk, cid: u32) -> Result<()> {
    let link = &disk.links()[0];
    let mut d = link.descriptor()?;
    d.set_cid(cid);
    if let Some(long) = d.ddb("ddb.longContentID").map(str::to_string) {
        if long.len() == 32 && long.bytes().all(|b| b.is_ascii_hexdigit()) {
            d.set_ddb("ddb.longContentID", &format!("{}{cid:08x}", &long[..24]));
        }
    }
    link.save_descriptor(&d)
}
