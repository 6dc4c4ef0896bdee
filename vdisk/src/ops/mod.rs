//! Whole-disk operations, each a plain function over paths or an open [`crate::Disk`].

pub mod attach;
pub mod backup;
pub mod check;
pub mod child;
pub mod closed;
pub mod commit;
pub mod convert;
pub mod create;
pub mod defrag;
pub mod files;
pub mod grow;
pub mod shrink;
pub mod space;
pub mod stream_writer;
