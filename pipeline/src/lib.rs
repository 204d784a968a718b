//! byol-pipeline: memory-mapped Parquet shards → shuffled, decoded uint8 batches.
//!
//! - [`dataset`]: shards mapped with memmap2, row groups read from the mapped bytes;
//! - [`plan`]: the epoch order as a pure function of (seed, epoch, rank, world), and
//!   the resume cursor;
//! - [`decode`] (feature `opencv`): decode into a fixed canvas;
//! - [`loader`]: the threaded stages and the batch slot pool;
//! - [`augment`]: BYOL's two views: parameters drawn on the host ([`augment::params`]),
//!   applied as tch ops ([`augment::tensor`]) or, on the CPU, fused per sample
//!   ([`augment::cpu`]).

pub mod augment;
pub mod dataset;
#[cfg(feature = "opencv")]
pub mod decode;
pub mod loader;
pub mod plan;

pub use dataset::Dataset;
pub use loader::{Batch, Epoch, Loader, LoaderConfig, StatsSnapshot};
pub use plan::{Cursor, Split};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Format(#[from] byol_format::shards::FormatError),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {path}")]
    Parquet {
        path: PathBuf,
        #[source]
        source: parquet::errors::ParquetError,
    },
    #[error("{0}")]
    Corrupt(String),
    #[error("invalid loader settings: {0}")]
    Config(String),
    #[error("a pipeline thread panicked: {0}")]
    Panic(String),
    #[error("{0}")]
    Stopped(String),
}

/// The OpenCV decoder, as the loader's [`loader::DecodeFn`].
#[cfg(feature = "opencv")]
pub fn opencv_decoder() -> loader::DecodeFn {
    decode::decode_to_canvas
}
