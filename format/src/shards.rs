//! The shard format: the contract between `byol-tools` (writer) and the training
//! pipeline (reader). See `docs/data.md` ("Shard format").
//!
//! A dataset is a folder holding `manifest.json` and `shard-NNNNN.parquet` files.
//! The manifest is written last, so a folder without one is never a complete dataset.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema};
use serde::{Deserialize, Serialize};

/// Name of the manifest file inside a dataset folder.
pub const MANIFEST: &str = "manifest.json";

/// The share of stored images that may fail to decode before training stops (the
/// default of `data.max_decode_failure_rate`; `byol-tools verify` compares with it). A
/// real dataset has a handful of damaged files in millions; 1 % means the data is
/// broken (a bad copy, a wrong format), not unlucky.
pub const DEFAULT_MAX_DECODE_FAILURE_RATE: f64 = 0.01;
/// Value of [`Manifest::format`].
pub const FORMAT_NAME: &str = "byol-shards";
/// Current value of [`Manifest::version`].
pub const FORMAT_VERSION: u32 = 1;

pub const COL_KEY: &str = "key";
pub const COL_LABEL: &str = "label";
pub const COL_IMAGE: &str = "image";
pub const COL_HEIGHT: &str = "height";
pub const COL_WIDTH: &str = "width";

/// File name of shard `index`.
pub fn shard_file_name(index: usize) -> String {
    format!("shard-{index:05}.parquet")
}

/// The Arrow schema of every shard.
pub fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new(COL_KEY, DataType::Utf8, false),
        Field::new(COL_LABEL, DataType::Int32, false),
        Field::new(COL_IMAGE, DataType::Binary, false),
        Field::new(COL_HEIGHT, DataType::Int32, false),
        Field::new(COL_WIDTH, DataType::Int32, false),
    ]))
}

/// `manifest.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// Format version, [`FORMAT_VERSION`] when written by this build.
    pub version: u32,
    /// Class names; a row's `label` indexes this list (-1: unlabeled).
    pub classes: Vec<String>,
    pub shards: Vec<ShardInfo>,
    pub totals: Totals,
    pub settings: Settings,
    /// Every source file that was not stored, with the reason.
    pub skipped: Vec<Skipped>,
    /// Keys whose source path is not valid UTF-8, spelled with `%XX` escapes
    /// (`byol_tools::source::key_of`; `unescape_key` gives the path bytes back).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub escaped_keys: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ShardInfo {
    pub file: String,
    pub rows: u64,
    /// Size of the shard file in bytes.
    pub bytes: u64,
    /// `crc32:XXXXXXXX` of the whole shard file.
    pub checksum: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Totals {
    /// Images stored.
    pub rows: u64,
    /// Bytes of all shard files.
    pub bytes: u64,
    /// Bytes of the stored (encoded) images alone.
    pub image_bytes: u64,
    /// Images stored per class (same order as `classes`); unlabeled rows are not counted.
    pub per_class: Vec<u64>,
    /// Rows whose label is -1.
    pub unlabeled: u64,
    /// Source images kept byte-for-byte.
    pub kept_original: u64,
    /// Source images decoded and re-encoded.
    pub reencoded: u64,
    /// Source files that looked like images but could not be stored (listed in `skipped`).
    pub skipped: u64,
    /// Files without an image extension (or outside class folders) that were not looked at.
    pub ignored: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Settings {
    /// `imagefolder`, `flat` or `idx`.
    pub layout: String,
    /// The source as given on the command line.
    pub source: String,
    /// Longer side above which images are resized (area interpolation) and re-encoded.
    pub max_side: Option<u32>,
    /// JPEG quality of re-encoded images.
    pub quality: u8,
    pub rows_per_shard: Option<u64>,
    pub shard_bytes: Option<u64>,
    /// Rows per Parquet row group (the unit the pipeline reads).
    pub row_group_rows: usize,
    /// Seed of the row order.
    pub seed: u64,
    /// Lossless sources (IDX) are stored as PNG rather than JPEG.
    pub lossless_png: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Skipped {
    pub key: String,
    pub reason: String,
}

/// Errors reading a dataset folder.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{dir}: no {MANIFEST} (not a byol dataset, or an interrupted `byol-tools shard` run)")]
    NoManifest { dir: PathBuf },
    #[error("reading {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid manifest")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: format {format:?} version {version} is not supported (this build reads {FORMAT_NAME:?} version {FORMAT_VERSION})")]
    Version {
        path: PathBuf,
        format: String,
        version: u32,
    },
}

impl Manifest {
    /// `crc32:XXXXXXXX` over the classes and every shard's file name, rows and checksum:
    /// equal for the same dataset wherever it is copied, different when any shard or
    /// class differs. Runs record it to refuse resuming on other data.
    pub fn fingerprint(&self) -> String {
        let mut h = crc32fast::Hasher::new();
        for c in &self.classes {
            h.update(c.as_bytes());
            h.update(&[0]);
        }
        for s in &self.shards {
            h.update(s.file.as_bytes());
            h.update(&s.rows.to_le_bytes());
            h.update(s.checksum.as_bytes());
        }
        format!("crc32:{:08x}", h.finalize())
    }

    /// Reads and checks `DIR/manifest.json`.
    ///
    /// # Errors
    /// [`FormatError`]: no manifest, unreadable or invalid JSON, or another format version (naming the file).
    pub fn load(dir: &Path) -> Result<Manifest, FormatError> {
        let path = dir.join(MANIFEST);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(FormatError::NoManifest {
                    dir: dir.to_path_buf(),
                })
            }
            Err(source) => return Err(FormatError::Io { path, source }),
        };
        let m: Manifest = serde_json::from_str(&text).map_err(|source| FormatError::Json {
            path: path.clone(),
            source,
        })?;
        if m.format != FORMAT_NAME || m.version != FORMAT_VERSION {
            return Err(FormatError::Version {
                path,
                format: m.format,
                version: m.version,
            });
        }
        Ok(m)
    }
}

/// Incremental CRC-32 used for shard checksums.
pub fn checksum_string(crc: u32) -> String {
    format!("crc32:{crc:08x}")
}

/// Checksum of a whole file, as stored in the manifest.
///
/// # Errors
/// The file cannot be read.
pub fn file_checksum(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(checksum_string(h.finalize()))
}
