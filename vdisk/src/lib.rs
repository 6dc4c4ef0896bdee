//! # vdisk
//!
//! Read, write and create VMware virtual disks (VMDK): descriptor files, flat and
//! split extents, hosted sparse (`KDMV`) extents.
//!
//! ```no_run
//! use vdisk::{create, CreateOptions, DiskType, OpenOptions};
//!
//! # fn main() -> vdisk::Result<()> {
//! create("disk.vmdk".as_ref(), &CreateOptions::new(DiskType::MonolithicSparse, 64 << 20))?;
//! let disk = OpenOptions::new().write(true).open("disk.vmdk")?;
//! disk.write_at(&[0xab; 512], 1 << 20)?;
//! let mut buf = [0u8; 512];
//! disk.read_at(&mut buf, 1 << 20)?;
//! assert_eq!(buf, [0xab; 512]);
//! disk.close()?;
//! # Ok(())
//! # }
//! ```
//!
//! The central contract: an extent answers "where does this range live?"; one loop
//! in [`Disk`] walks the chain with that question, reads coalesced file ranges and
//! falls through to parents. See `ARCHITECTURE.md`.

pub mod cache;
pub mod cbt;
pub mod chain;
pub mod descriptor;
pub mod disk;
pub mod disk_type;
pub mod error;
pub mod extent;
pub mod fuzzing;
pub mod geometry;
pub mod ids;
pub mod limits;
pub mod link;
pub mod ops;
pub mod overlay;
pub mod paths;
pub mod replace;
pub mod storage;
pub mod virtual_disk;
pub mod zeros;

pub use disk::{
    DataSource, Disk, DiskInfo, ExtentInfo, LinkInfo, MapRange, OpenOptions, RangeKind,
};
pub use disk_type::DiskType;
pub use error::{Error, ErrorKind, Result};
pub use geometry::{AdapterType, Geometry};
pub use ops::convert::{convert, convert_from, ConvertOptions, ConvertStats, ImageFormat};
pub use ops::create::{create, CreateOptions};
pub use overlay::Overlay;
pub use virtual_disk::VirtualDisk;
