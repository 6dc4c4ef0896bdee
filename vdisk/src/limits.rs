//! Every limit the library enforces on what it reads, in one place. Sizes taken from
//! headers and descriptors are checked against these before anything is allocated, so
//! a hostile file can never make the library allocate more than these bounds.

/// Sector size: every VMDK offset and length is in 512-byte sectors.
pub const SECTOR_SIZE: u64 = 512;

/// Largest descriptor (standalone file or embedded area) we read, in bytes.
pub const MAX_DESCRIPTOR_BYTES: usize = 1 << 20;
/// Most lines a descriptor may have.
pub const MAX_DESCRIPTOR_LINES: usize = 100_000;
/// Most extent lines in one descriptor (a 64 TiB twoGbMaxExtent disk has 32768).
pub const MAX_EXTENTS: usize = 65_536;

/// Largest virtual capacity of a disk or extent we accept: 2^40 sectors (512 TiB).
pub const MAX_CAPACITY_SECTORS: u64 = 1 << 40;
/// Largest grain of a hosted sparse extent, in sectors (1 MiB). Real files use 128.
pub const MAX_GRAIN_SECTORS: u64 = 2048;
/// Most entries in one grain table (16 KiB tables). Real hosted files use 512.
pub const MAX_GTES_PER_GT: u32 = 4096;
/// Most grain directory entries of one extent (16 MiB of directory).
pub const MAX_GD_ENTRIES: u64 = 1 << 22;
/// A hosted sparse extent file cannot grow beyond 2^32 sectors (2 TiB): its grain
/// table entries are 32-bit sector numbers.
pub const MAX_SPARSE_FILE_SECTORS: u64 = 1 << 32;

/// Largest capacity of a seSparse extent: 2^37 sectors (64 TiB; qemu puts the
/// format's maximum just below). Bounds its grain directory to 4 Mi entries.
pub const MAX_SESPARSE_CAPACITY_SECTORS: u64 = 1 << 37;

/// Bytes of grain tables kept in memory per sparse extent (the cache is bounded).
pub const GT_CACHE_BYTES: usize = 4 << 20;

/// Extent size VMware uses for the split (twoGbMaxExtent*) types: 2047 MiB.
pub const SPLIT_EXTENT_SECTORS: u64 = 4_192_256;

/// Most grains a streamOptimized extent without a usable grain directory may have
/// (its map is then rebuilt in memory, 4 bytes per grain: 64 MiB).
pub const MAX_REBUILT_GRAINS: u64 = 1 << 24;
/// Padding or junk tolerated after a streamOptimized footer when looking for it.
pub const MAX_TRAILING_BYTES: u64 = 1 << 20;

/// Most links a snapshot chain may have (ESXi's limit of delta disks per chain).
pub const MAX_CHAIN_DEPTH: usize = 255;

/// How long a lock held by someone else is retried before the open fails with
/// `Locked`. A `flock` lock is shared by every copy of the file descriptor, so a
/// process that forks (another thread starting a helper program) holds the locks of
/// its open disks in the child until the child execs: a lock can look taken for a
/// moment although no one uses the disk.
pub const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(200);
/// Pause between two attempts to take a lock.
pub const LOCK_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(2);
/// How many times opening a locked file starts again because the file was renamed
/// over (a descriptor rewrite) while the lock was awaited; then the disk is
/// reported `Locked`.
pub const LOCK_REOPENS: u32 = 8;

/// A write that stays within one aligned block of this size of a regular file is
/// all-or-nothing for a killed process: the kernel copies a `pwrite` into the page
/// cache page by page and a signal can stop it only between pages (4 KiB, the
/// smallest page size of the platforms we build for). The embedded descriptor is
/// rewritten so that the switch from the old text to the new one is such a write.
pub const KILL_ATOMIC_BYTES: u64 = 4096;

/// The smallest block changed-block tracking records (4 KiB, a file-system block).
pub const MIN_CBT_BLOCK: u64 = 4 << 10;
/// The most blocks a change-tracking map holds (16 MiB of map): disks over 16 GiB
/// get larger blocks.
pub const MAX_CBT_BLOCKS: u64 = 1 << 22;

/// Most bits of one per-grain bitmap a check or repair holds (32 MiB): a file with
/// more grain slots is swept in windows of this many slots, one pass per window.
pub const CHECK_BITMAP_BITS: u64 = 1 << 28;
/// Bytes of repaired grain tables held before they are written (after a sync of the
/// grain copies they point to).
pub const REPAIR_BATCH_BYTES: u64 = 16 << 20;
