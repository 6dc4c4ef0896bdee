//! Identifiers VMware writes into descriptors: content IDs (CID), the 128-bit
//! `ddb.longContentID` and the disk UUID `ddb.uuid`.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// CID value that means "no parent" in `parentCID`.
pub const CID_NO_PARENT: u32 = 0xffff_ffff;

/// 64 random bits from the standard library's OS-seeded hasher keys, mixed with a
/// counter and the clock so that consecutive calls differ.
pub fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    h.write_u64(now);
    h.finish()
}

/// A new random content ID, never one of the special values `ffffffff`/`fffffffe`.
pub fn new_cid() -> u32 {
    loop {
        let c = random_u64() as u32;
        if c < 0xffff_fffe {
            return c;
        }
    }
}

/// A `ddb.longContentID` value whose last 8 hex digits are `cid`, as VMware writes it.
pub fn long_content_id(cid: u32) -> String {
    format!("{:016x}{:08x}{cid:08x}", random_u64(), random_u64() as u32)
}

/// A `ddb.uuid` value in VMware's text form (`60 00 C2 xx ... xx-xx ... xx`).
pub fn new_disk_uuid() -> String {
    let a = random_u64().to_le_bytes();
    let b = random_u64().to_le_bytes();
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&a);
    bytes[8..].copy_from_slice(&b);
    bytes[0] = 0x60;
    bytes[1] = 0x00;
    bytes[2] = 0xC2;
    let hex: Vec<String> = bytes
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if i < 3 {
                format!("{b:02X}")
            } else {
                format!("{b:02x}")
            }
        })
        .collect();
    format!("{}-{}", hex[..8].join(" "), hex[8..].join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cids_differ_and_avoid_special_values() {
        let a = new_cid();
        let b = new_cid();
        assert_ne!(a, b);
        assert!(a < 0xffff_fffe);
    }

    #[test]
    fn uuid_has_vmware_shape() {
        let u = new_disk_uuid();
        assert_eq!(u.len(), 47);
        assert!(u.starts_with("60 00 C2 "));
        assert_eq!(&u[23..24], "-");
    }

    #[test]
    fn long_content_id_ends_with_cid() {
        assert!(long_content_id(0x1234abcd).ends_with("1234abcd"));
        assert_eq!(long_content_id(1).len(), 32);
    }
}
