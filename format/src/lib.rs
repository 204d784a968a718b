//! byol-format: the ground floor every byol crate stands on — no libtorch, no CLI parser.
//!
//! - [`shards`]: the Parquet shard schema and `manifest.json`, the contract between
//!   `byol-tools` (writer) and `byol-pipeline` (reader);
//! - [`fs`]: the one atomic, fsynced file write used by every writer;
//! - [`rng`]: the SplitMix64 generator behind shard order and augmentation draws;
//! - [`jpeg`]: JPEG header parsing and DCT-scaled decode sizes;
//! - [`image`] (feature `opencv`): the one image decode `shard`, `verify` and the loader
//!   share, and the re-encoding `shard` stores; its errors ([`image_error`]) on every build;
//! - [`progress`]: the progress bar / plain progress lines of long commands;
//! - [`cli`] (feature `cli`): what both command-line programs share.

#[cfg(feature = "cli")]
pub mod cli;
pub mod fs;
#[cfg(feature = "opencv")]
pub mod image;
pub mod image_error;
pub mod jpeg;
pub mod progress;
pub mod rng;
pub mod shards;

/// The cores this process may use (`available_parallelism`, 1 when unknown): the
/// default for decode threads, shard workers and a launcher's per-worker share.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

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
