//! The descriptor embedded in a monolithic sparse file: `descriptor_size` sectors at
//! sector `descriptor_offset`, the text followed by NUL bytes. Readers take the text
//! up to the first NUL.
//!
//! # Rewriting it without ever leaving an unreadable descriptor
//!
//! A rewrite cannot go to another file and be renamed into place (the descriptor
//! lives inside the extent), so it relies on two facts: a reader stops at the first
//! NUL, so bytes after it can change unseen; and a `pwrite` to a regular file is
//! applied page by page, a SIGKILL stopping it only between pages, so a write within
//! one aligned 4 KiB block of the file ([`KILL_ATOMIC_BYTES`]) is all-or-nothing for
//! a killed process. With `old` the text on disk (ending at its NUL, `lo`) and `new`
//! the text to write followed by its NUL (`ln` bytes of text):
//!
//! 1. **Grow unseen.** The part of `new` + NUL lying after the old NUL
//!    (`lo + 1 .. ln + 1`) is written first: the old NUL still ends the visible
//!    text. Sync.
//! 2. **Switch.** The bytes up to `min(lo, ln)` that differ from what is on disk are
//!    written in one write. Before it the area reads `old`, after it `new` (its
//!    NUL is in place: written in step 1, or by this write when `new` is the
//!    shorter). Sync.
//! 3. **Clear the tail.** Whatever is left after the new NUL (the end of a longer
//!    old text, leftovers of an interrupted rewrite) is zeroed, unseen. Sync.
//!
//! The switch is atomic when the first and the last byte it changes lie in the same
//! 4 KiB block of the file. That holds for every descriptor of up to 3.5 KiB in the
//! usual area at sector 1 (bytes 512..4096 of the file are one block), whatever the
//! edit, and for any edit whose changes (and moved NUL) fall within one block.
//! **What remains non-atomic**: a text longer than that whose changes span two
//! blocks - a CID renewal of a descriptor over 3.5 KiB, whose `CID` line is in the
//! first block and `ddb.longContentID` in the next, or an edit near the top that
//! shifts the rest of a long text. The switch is then one write per block, in
//! order, and a process killed between two of them leaves a mixture of the two
//! texts (which may not parse). No reader looks elsewhere for a copy, so this
//! cannot be avoided in place; VMware's and qemu's monolithic files have the same
//! window. A power loss can tear any write at sector granularity: the syncs order
//! the steps, but the switch itself is atomic only against a killed process.

use crate::error::{Error, ErrorKind, Result};
use crate::limits::{KILL_ATOMIC_BYTES, SECTOR_SIZE};
use crate::storage::Storage;

use super::SparseHeader;

/// Reads the embedded descriptor area a header points at (None if it has none).
pub fn read_descriptor_area(
    storage: &dyn Storage,
    h: &SparseHeader,
    name: &str,
) -> Result<Option<Vec<u8>>> {
    if h.descriptor_offset == 0 {
        return Ok(None);
    }
    // The size is bounded by the header parser; the offset is checked here (a
    // streamOptimized extent is not checked on open the way a sparse one is).
    let file_len = storage
        .len()
        .map_err(|e| Error::io(format!("{name}: cannot read file size"), e))?;
    let bytes = h.descriptor_size * SECTOR_SIZE;
    let at = h
        .descriptor_offset
        .checked_mul(SECTOR_SIZE)
        .filter(|at| at.checked_add(bytes).is_some_and(|end| end <= file_len))
        .ok_or_else(|| {
            Error::invalid(format!(
                "{name}: embedded descriptor (sector {}, {} sectors) lies past the end of the file ({file_len} bytes)",
                h.descriptor_offset, h.descriptor_size
            ))
        })?;
    let mut buf = vec![0u8; bytes as usize];
    storage
        .read_exact_at(&mut buf, at)
        .map_err(|e| Error::io(format!("{name}: cannot read the embedded descriptor"), e))?;
    Ok(Some(buf))
}

/// One write of the rewrite: `bytes` at index `start` of the area.
#[derive(Debug, PartialEq, Eq)]
struct Piece {
    start: usize,
    bytes: Vec<u8>,
}

/// The writes that turn the area `cur` into `text` + NULs (see the module
/// documentation), each to be followed by a sync: growth beyond the old NUL,
/// the switch, the tail cleared. Empty steps are left out.
fn plan(cur: &[u8], text: &[u8]) -> Vec<Piece> {
    let area = cur.len();
    // The old terminator (the area's end if the text fills it).
    let lo = cur.iter().position(|&b| b == 0).unwrap_or(area);
    // The new text and its NUL, as far as the area goes.
    let mut new = text.to_vec();
    if new.len() < area {
        new.push(0);
    }
    let mut img = cur.to_vec();
    let mut pieces = Vec::new();
    let mut apply = |img: &mut Vec<u8>, start: usize, bytes: Vec<u8>| {
        if !bytes.is_empty() {
            img[start..start + bytes.len()].copy_from_slice(&bytes);
            pieces.push(Piece { start, bytes });
        }
    };
    // 1. What lies after the old NUL.
    if new.len() > lo + 1 {
        let from = lo + 1;
        if let Some((f, l)) = differing(&img[from..new.len()], &new[from..]) {
            apply(&mut img, from + f, new[from + f..=from + l].to_vec());
        }
    }
    // 2. The switch: bytes up to min(lo, ln), the old or the new NUL included.
    if let Some(last) = new.len().checked_sub(1) {
        let end = lo.min(last);
        if let Some((f, l)) = differing(&img[..=end], &new[..=end]) {
            apply(&mut img, f, new[f..=l].to_vec());
        }
    }
    // 3. Everything after the new text's NUL back to zeros.
    let tail = new.len();
    if let (Some(f), Some(l)) = (
        img[tail..].iter().position(|&b| b != 0),
        img[tail..].iter().rposition(|&b| b != 0),
    ) {
        apply(&mut img, tail + f, vec![0; l - f + 1]);
    }
    pieces
}

/// First and last index where `a` and `b` (same length) differ.
fn differing(a: &[u8], b: &[u8]) -> Option<(usize, usize)> {
    let f = a.iter().zip(b).position(|(x, y)| x != y)?;
    let l = a.iter().zip(b).rposition(|(x, y)| x != y)?;
    Some((f, l))
}

/// Rewrites the embedded descriptor area of the file behind `storage` (whose header
/// is `h`) to hold `text`, in the order the module documentation gives, syncing
/// after each step. `name` names the file in errors. The text must fit the area and
/// hold no NUL byte.
pub fn write_descriptor_area(
    storage: &dyn Storage,
    h: &SparseHeader,
    text: &[u8],
    name: &str,
) -> Result<()> {
    let Some(cur) = read_descriptor_area(storage, h, name)? else {
        return Err(Error::new(
            ErrorKind::NotSupported,
            format!("{name}: the extent has no embedded descriptor"),
        ));
    };
    if text.len() > cur.len() {
        return Err(Error::new(
            ErrorKind::FileTooBig,
            format!(
                "{name}: the descriptor ({} bytes) does not fit the embedded area ({} bytes)",
                text.len(),
                cur.len()
            ),
        ));
    }
    if text.contains(&0) {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("{name}: a descriptor cannot hold a NUL byte"),
        ));
    }
    // Checked by read_descriptor_area: the area lies within the file.
    let at = h.descriptor_offset * SECTOR_SIZE;
    for p in plan(&cur, text) {
        let first = at + p.start as u64;
        let last = first + p.bytes.len() as u64 - 1;
        if first / KILL_ATOMIC_BYTES != last / KILL_ATOMIC_BYTES {
            tracing::debug!(
                "{name}: descriptor write at bytes {first}..={last} spans {} blocks",
                last / KILL_ATOMIC_BYTES - first / KILL_ATOMIC_BYTES + 1
            );
        }
        storage
            .write_all_at(&p.bytes, first)
            .and_then(|()| storage.sync())
            .map_err(|e| Error::io(format!("{name}: cannot write the embedded descriptor"), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::descriptor::Descriptor;
    use crate::storage::MemStorage;

    /// The area's text as a reader sees it.
    fn visible(area: &[u8]) -> &[u8] {
        &area[..area.iter().position(|&b| b == 0).unwrap_or(area.len())]
    }

    /// A descriptor of about `len` bytes (padded with DDB entries).
    fn text_of(len: usize, cid: u32, tag: &str) -> Vec<u8> {
        let mut t = format!(
            "# Disk DescriptorFile\nversion=1\nCID={cid:08x}\nparentCID=ffffffff\n\
             createType=\"monolithicSparse\"\n\n# Extent description\n\
             RW 2048 SPARSE \"disk.vmdk\"\n\n# The Disk Data Base\n#DDB\n\n"
        );
        let mut i = 0;
        while t.len() + 40 < len {
            t.push_str(&format!("ddb.pad{i:04} = \"{tag}{}\"\n", "x".repeat(12)));
            i += 1;
        }
        t.push_str(&format!("ddb.longContentID = \"{cid:032x}\"\n"));
        t.into_bytes()
    }

    /// The area at sector 1, 20 sectors (as VMware, qemu and we create it), as a
    /// file image: header sector, area, what follows.
    fn file_with(text: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 512 + 20 * 512 + 512];
        f[512..512 + text.len()].copy_from_slice(text);
        f
    }

    /// Applies the writes of `plan` to a file image the way a killed process
    /// leaves it: block by block (a write split at 4 KiB boundaries of the file),
    /// stopping after `stop` blocks. Returns the image and whether it stopped.
    fn apply_until(file: &mut [u8], at: usize, pieces: &[Piece], stop: usize) -> bool {
        let mut n = 0;
        for p in pieces {
            let mut s = at + p.start;
            let end = s + p.bytes.len();
            while s < end {
                if n == stop {
                    return true;
                }
                let block_end = ((s / 4096) + 1) * 4096;
                let e = end.min(block_end);
                file[s..e].copy_from_slice(&p.bytes[s - at - p.start..e - at - p.start]);
                s = e;
                n += 1;
            }
        }
        false
    }

    /// Every kill point of a rewrite from `old` to `new` leaves the old or the new
    /// text; the finished rewrite leaves exactly the new one and zeros.
    fn assert_rewrite_atomic(old: &[u8], new: &[u8]) {
        let base = file_with(old);
        let pieces = plan(&base[512..512 + 20 * 512], new);
        for stop in 0.. {
            let mut f = base.clone();
            let stopped = apply_until(&mut f, 512, &pieces, stop);
            let area = &f[512..512 + 20 * 512];
            let seen = visible(area);
            assert!(
                seen == old || seen == new,
                "{} -> {} bytes: killed after {stop} blocks, the area reads neither text",
                old.len(),
                new.len()
            );
            Descriptor::parse(area).unwrap();
            if !stopped {
                assert_eq!(seen, new);
                assert!(area[new.len()..].iter().all(|&b| b == 0));
                break;
            }
        }
    }

    #[test]
    fn every_kill_point_leaves_the_old_or_the_new_descriptor() {
        // Short texts (within the first block), growing, shrinking, same length.
        let short = text_of(700, 0x1111_1111, "a");
        assert_rewrite_atomic(&short, &text_of(700, 0x2222_2222, "a"));
        assert_rewrite_atomic(&short, &text_of(900, 0x1111_1111, "a"));
        assert_rewrite_atomic(&text_of(900, 1, "a"), &short);
        // Growing across the first block boundary (byte 3584 of the area): the
        // part beyond the old NUL goes first, the switch stays in the first block.
        let long = text_of(5000, 0x1111_1111, "a");
        assert_rewrite_atomic(&short, &long);
        // Shrinking back: the new NUL goes in with the switch; the tail after it.
        assert_rewrite_atomic(&long, &short);
        // A long text whose change lies in one block (a key appended at its end).
        let mut longer = long.clone();
        longer.extend_from_slice(b"ddb.added = \"1\"\n");
        assert_rewrite_atomic(&long, &longer);
        assert_rewrite_atomic(&longer, &long);
        // Leftovers of an interrupted rewrite after the NUL are cleared.
        let mut dirty = file_with(&short);
        dirty[512 + short.len() + 1..512 + 6000].fill(b'z');
        let pieces = plan(&dirty[512..512 + 20 * 512], &short);
        assert_eq!(pieces.len(), 1);
        apply_until(&mut dirty, 512, &pieces, usize::MAX);
        assert!(dirty[512 + short.len()..].iter().all(|&b| b == 0));
        // Nothing to do for the same text.
        assert!(plan(&file_with(&short)[512..512 + 20 * 512], &short).is_empty());
    }

    #[test]
    fn a_switch_across_two_blocks_is_the_documented_exception() {
        // A CID renewal of a long descriptor: CID in the first block,
        // longContentID in the second. Not atomic; the plan says so by spanning.
        let old = text_of(5000, 0x1111_1111, "a");
        let new = text_of(5000, 0x2222_2222, "a");
        let pieces = plan(&file_with(&old)[512..512 + 20 * 512], &new);
        assert_eq!(pieces.len(), 1);
        let (first, last) = (
            512 + pieces[0].start,
            512 + pieces[0].start + pieces[0].bytes.len() - 1,
        );
        assert_ne!(first / 4096, last / 4096);
    }

    #[test]
    fn write_refuses_what_does_not_fit_and_nul_bytes() {
        let mut h = crate::extent::sparse::header::new_sparse_header(2048, 128, 20).unwrap();
        h.descriptor_offset = 1;
        let s = MemStorage::new(file_with(b"old"));
        let e = write_descriptor_area(&s, &h, &vec![b'x'; 20 * 512 + 1], "f").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FileTooBig);
        let e = write_descriptor_area(&s, &h, b"a\0b", "f").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        write_descriptor_area(&s, &h, b"new text", "f").unwrap();
        let f = s.into_bytes();
        assert_eq!(visible(&f[512..]), b"new text");
    }
}
