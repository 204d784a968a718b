//! byol-tools: image datasets → byol's Parquet shards, and checks of those shards.
//!
//! The shard format ([`format`]) is the contract with the training pipeline.

#[cfg(feature = "opencv")]
pub mod bench;
pub mod cli;
pub mod format;
pub mod idx;
#[cfg(feature = "opencv")]
pub mod image;
pub mod inspect;
pub mod jpeg;
pub mod progress;
pub mod read;
pub mod rng;
#[cfg(feature = "opencv")]
pub mod shard;
pub mod source;
#[cfg(feature = "opencv")]
pub mod verify;

/// An error and its causes on one line: `a: b: c`.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
