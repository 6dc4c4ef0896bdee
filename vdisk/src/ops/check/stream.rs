//! Checking streamOptimized extents: is the stream whole?
//!
//! A stream file is written front to back and ends with an end-of-stream marker
//! (after the footer, when the directory is at the end). A file that stops before
//! it was cut short - a download or copy that did not finish - even when every
//! grain it still holds reads fine. The check walks the markers from `overHead`
//! and reports a stream that ends without the marker, one whose last block runs past
//! the end of the file, and a directory-at-the-end layout without a footer. qemu-img
//! writes no end-of-stream marker (its layout keeps a full grain directory and a
//! redundant copy at the front and no metadata markers); for that layout a missing
//! marker is not a finding. Stream files cannot be repaired in place: the findings
//! say to get the file again (or convert what is left).
//!
//! The grains themselves are verified by reading them (`super::verify_opens`).

use std::path::Path;

use super::report::{CheckReport, Finding};
use crate::error::{Error, Result};
use crate::extent::sparse::header::{SparseHeader, GD_AT_END};
use crate::extent::stream::{find_footer, walk_markers, StreamEnd};
use crate::storage::{FileStorage, Storage};

const CANNOT_REPAIR: &str =
    "stream files cannot be repaired in place: get the file again, or convert what it holds";

/// Checks the stream file `p` with header `h`.
pub(super) fn check_stream(
    p: &Path,
    storage: &FileStorage,
    h: &SparseHeader,
    report: &mut CheckReport,
) -> Result<()> {
    let file_len = storage
        .len()
        .map_err(|e| Error::io(format!("cannot read the size of {}", p.display()), e))?;
    let name = p.display().to_string();
    let walk = match walk_markers(storage, h, file_len, &mut |_, _, _| Ok(())) {
        Ok(w) => w,
        Err(e) => {
            report.push(Finding::fatal(
                p,
                format!("the stream's markers are damaged: {e}; {CANNOT_REPAIR}"),
            ));
            return Ok(());
        }
    };
    let at_end = h.gd_offset == GD_AT_END;
    let footer = if at_end {
        find_footer(storage, h, file_len, &name)?
    } else {
        None
    };
    let ended = matches!(walk.end, StreamEnd::EndOfStream { .. });
    if at_end && footer.is_none() {
        let problem = if ended {
            "the header puts the grain directory at the end of the stream, but the footer that says where is missing or damaged (this library rebuilds the grain map from the markers; qemu-img and VMware refuse the file)".to_string()
        } else {
            format!(
                "the header puts the grain directory at the end of the stream, but the stream {} and has no footer: the file is truncated ({file_len} bytes)",
                walk.end.describe()
            )
        };
        report.push(Finding::fatal(p, format!("{problem}; {CANNOT_REPAIR}")));
        return Ok(());
    }
    // qemu-img's layout: the directory in the header with a redundant copy, grain
    // markers only, no end-of-stream marker.
    let qemu_layout = !at_end && h.has_redundant_gd() && walk.metadata_markers == 0;
    match walk.end {
        StreamEnd::EndOfStream { .. } => {}
        StreamEnd::FileEnd { .. } if qemu_layout => {}
        end @ StreamEnd::FileEnd { .. } => report.push(Finding::fatal(
            p,
            format!(
                "the stream {}: the file is truncated (the end-of-stream marker and whatever followed the last complete block are missing); {CANNOT_REPAIR}",
                end.describe()
            ),
        )),
        end @ StreamEnd::CutShort { .. } => report.push(Finding::fatal(
            p,
            format!(
                "the stream {} but the file ends at byte {file_len}: the file is truncated; {CANNOT_REPAIR}",
                end.describe()
            ),
        )),
    }
    Ok(())
}
