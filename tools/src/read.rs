//! Reading shards back (used by `inspect` and `verify`; the training pipeline has its
//! own memory-mapped reader).

use std::fs::File;
use std::path::{Path, PathBuf};

use arrow_array::{Array, BinaryArray, Int32Array, RecordBatch, StringArray};
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
};
use parquet::arrow::ProjectionMask;

use byol_format::shards::{self, COL_HEIGHT, COL_IMAGE, COL_KEY, COL_LABEL, COL_WIDTH};

/// Why a shard (or a Parquet source file) cannot be read, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a readable Parquet shard")]
    Parquet {
        path: PathBuf,
        #[source]
        source: parquet::errors::ParquetError,
    },
    #[error("{path}: {msg}")]
    Schema { path: PathBuf, msg: String },
}

/// One row group's columns, borrowed from the record batch.
pub struct Rows {
    pub batch: RecordBatch,
}

impl Rows {
    /// Rows in the row group.
    pub fn len(&self) -> usize {
        self.batch.num_rows()
    }
    /// Whether the row group has no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn col<T: 'static>(&self, name: &str) -> Option<&T> {
        self.batch
            .column_by_name(name)?
            .as_any()
            .downcast_ref::<T>()
    }
    /// The `key` column (`None`: missing or another type).
    pub fn keys(&self) -> Option<&StringArray> {
        self.col(COL_KEY)
    }
    /// The `label` column.
    pub fn labels(&self) -> Option<&Int32Array> {
        self.col(COL_LABEL)
    }
    /// The `image` column.
    pub fn images(&self) -> Option<&BinaryArray> {
        self.col(COL_IMAGE)
    }
    /// The `height` column.
    pub fn heights(&self) -> Option<&Int32Array> {
        self.col(COL_HEIGHT)
    }
    /// The `width` column.
    pub fn widths(&self) -> Option<&Int32Array> {
        self.col(COL_WIDTH)
    }
}

/// Reads a shard one row group at a time; `with_images: false` skips the image column.
///
/// # Errors
/// [`ReadError`] naming the shard, or `f`'s own error.
pub fn for_each_row_group(
    path: &Path,
    with_images: bool,
    mut f: impl FnMut(Rows) -> Result<(), ReadError>,
) -> Result<(), ReadError> {
    let file = File::open(path).map_err(|source| ReadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let perr = |source| ReadError::Parquet {
        path: path.to_path_buf(),
        source,
    };
    // The footer is parsed once; each row group gets its own reader over that metadata.
    let meta = ArrowReaderMetadata::load(&file, ArrowReaderOptions::new()).map_err(perr)?;
    let builder = ParquetRecordBatchReaderBuilder::new_with_metadata(file, meta.clone());
    let want = shards::schema();
    let have = builder.schema().clone();
    for field in want.fields() {
        match have.field_with_name(field.name()) {
            Ok(f) if f.data_type() == field.data_type() => {}
            Ok(f) => {
                return Err(ReadError::Schema {
                    path: path.to_path_buf(),
                    msg: format!(
                        "column {:?} has type {}, expected {}",
                        field.name(),
                        f.data_type(),
                        field.data_type()
                    ),
                })
            }
            Err(_) => {
                return Err(ReadError::Schema {
                    path: path.to_path_buf(),
                    msg: format!("column {:?} is missing", field.name()),
                })
            }
        }
    }
    let groups = builder.metadata().num_row_groups();
    let names: Vec<&str> = if with_images {
        vec![COL_KEY, COL_LABEL, COL_IMAGE, COL_HEIGHT, COL_WIDTH]
    } else {
        vec![COL_KEY, COL_LABEL, COL_HEIGHT, COL_WIDTH]
    };
    let mask = ProjectionMask::columns(builder.parquet_schema(), names.iter().copied());
    for g in 0..groups {
        let file = File::open(path).map_err(|source| ReadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let reader = ParquetRecordBatchReaderBuilder::new_with_metadata(file, meta.clone())
            .with_row_groups(vec![g])
            .with_projection(mask.clone())
            .with_batch_size(1 << 20)
            .build()
            .map_err(perr)?;
        for batch in reader {
            let batch =
                batch.map_err(|e| perr(parquet::errors::ParquetError::External(Box::new(e))))?;
            f(Rows { batch })?;
        }
    }
    Ok(())
}
