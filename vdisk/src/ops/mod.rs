//! Whole-disk operations, each a plain function over paths or an open [`crate::Disk`].

pub mod convert;
pub mod create;
pub mod files;
pub mod space;
pub mod stream_writer;
