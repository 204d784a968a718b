//! byol-tools: image datasets → byol's Parquet shards, and checks of those shards.
//!
//! The shard format itself ([`byol_format::shards`]) lives in the `byol-format` crate,
//! which the training pipeline reads it with; nothing else depends on this crate.

#[cfg(feature = "opencv")]
pub mod bench;
pub mod inspect;
pub mod keys;
pub mod read;
#[cfg(feature = "opencv")]
pub mod shard;
pub mod source;
#[cfg(feature = "opencv")]
pub mod verify;

/// The IDX reader and the `idx` layout ([`source::idx`]), also under its old path.
pub use source::idx;
