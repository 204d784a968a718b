//! A dataset folder opened for streaming: every shard memory-mapped (memmap2), its
//! Parquet footer parsed once, and row groups read one at a time from the mapped bytes.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{Array, BinaryArray, Int32Array, StringArray};
use bytes::Bytes;
use memmap2::{Mmap, UncheckedAdvice};
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
};
use parquet::arrow::ProjectionMask;

use byol_format::shards::{Manifest, COL_HEIGHT, COL_IMAGE, COL_KEY, COL_LABEL, COL_WIDTH};

use crate::plan::GroupSpan;
use crate::PipelineError;

/// The mapping, shared by the `Bytes` handed to the Parquet reader and the dataset.
struct SharedMap(Arc<Mmap>);

impl AsRef<[u8]> for SharedMap {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

struct Shard {
    path: PathBuf,
    map: Arc<Mmap>,
    bytes: Bytes,
    meta: ArrowReaderMetadata,
}

/// A row group in the dataset.
#[derive(Debug, Clone)]
pub struct GroupInfo {
    pub shard: usize,
    pub group: usize,
    pub span: GroupSpan,
    /// Byte range of the row group's column chunks in the shard file.
    pub byte_range: (u64, u64),
}

/// One row group's rows, read from the mapped shard.
pub struct LoadedGroup {
    pub info: GroupInfo,
    pub keys: StringArray,
    pub labels: Int32Array,
    pub images: BinaryArray,
    pub heights: Int32Array,
    pub widths: Int32Array,
}

impl LoadedGroup {
    /// Rows in this group.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Bytes held by this row group (the image column dominates).
    pub fn memory(&self) -> usize {
        self.images.get_buffer_memory_size() + self.keys.get_buffer_memory_size()
    }
}

/// An opened dataset.
pub struct Dataset {
    pub dir: PathBuf,
    pub manifest: Manifest,
    shards: Vec<Shard>,
    groups: Vec<GroupInfo>,
}

impl Dataset {
    /// Opens `dir`: reads the manifest, maps every shard, parses every footer.
    ///
    /// # Errors
    /// [`PipelineError`]: no or invalid manifest, a missing or changed shard, unreadable Parquet metadata (naming the file).
    pub fn open(dir: &Path) -> Result<Dataset, PipelineError> {
        let manifest = Manifest::load(dir)?;
        let mut shards = Vec::with_capacity(manifest.shards.len());
        let mut groups = Vec::new();
        let mut first_row = 0u64;
        for (si, s) in manifest.shards.iter().enumerate() {
            let path = dir.join(&s.file);
            let io = |source| PipelineError::Io {
                path: path.clone(),
                source,
            };
            let f = File::open(&path).map_err(io)?;
            // Safety: shards are immutable once renamed into place; a file truncated
            // underneath a running loader would fault, as with any mmap reader.
            let map = Arc::new(unsafe { Mmap::map(&f) }.map_err(io)?);
            let bytes = Bytes::from_owner(SharedMap(map.clone()));
            let meta =
                ArrowReaderMetadata::load(&bytes, ArrowReaderOptions::new()).map_err(|source| {
                    PipelineError::Parquet {
                        path: path.clone(),
                        source,
                    }
                })?;
            let md = meta.metadata();
            let mut rows_in_shard = 0;
            for g in 0..md.num_row_groups() {
                let rg = md.row_group(g);
                let rows = rg.num_rows() as u64;
                let mut lo = u64::MAX;
                let mut hi = 0;
                for c in rg.columns() {
                    let (start, len) = c.byte_range();
                    lo = lo.min(start);
                    hi = hi.max(start + len);
                }
                groups.push(GroupInfo {
                    shard: si,
                    group: g,
                    span: GroupSpan { first_row, rows },
                    byte_range: (lo.min(hi), hi),
                });
                first_row += rows;
                rows_in_shard += rows;
            }
            if rows_in_shard != s.rows {
                return Err(PipelineError::Corrupt(format!(
                    "{}: {rows_in_shard} rows, manifest says {}",
                    path.display(),
                    s.rows
                )));
            }
            shards.push(Shard {
                path,
                map,
                bytes,
                meta,
            });
        }
        Ok(Dataset {
            dir: dir.to_path_buf(),
            manifest,
            shards,
            groups,
        })
    }

    pub fn groups(&self) -> &[GroupInfo] {
        &self.groups
    }

    pub fn spans(&self) -> Vec<GroupSpan> {
        self.groups.iter().map(|g| g.span).collect()
    }

    pub fn rows(&self) -> u64 {
        self.groups.iter().map(|g| g.span.rows).sum()
    }

    pub fn shard_path(&self, shard: usize) -> &Path {
        &self.shards[shard].path
    }

    /// Row group `index`'s record batches, only `columns` read.
    fn read_group(
        &self,
        index: usize,
        columns: &[&str],
    ) -> Result<Vec<arrow_array::RecordBatch>, PipelineError> {
        let info = &self.groups[index];
        let sh = &self.shards[info.shard];
        let perr = |source| PipelineError::Parquet {
            path: sh.path.clone(),
            source,
        };
        let builder =
            ParquetRecordBatchReaderBuilder::new_with_metadata(sh.bytes.clone(), sh.meta.clone());
        let mask = ProjectionMask::columns(builder.parquet_schema(), columns.iter().copied());
        let reader = builder
            .with_row_groups(vec![info.group])
            .with_projection(mask)
            .with_batch_size(info.span.rows.max(1) as usize)
            .build()
            .map_err(perr)?;
        let mut batches = Vec::new();
        for b in reader {
            batches
                .push(b.map_err(|e| perr(parquet::errors::ParquetError::External(Box::new(e))))?);
        }
        Ok(batches)
    }

    /// Every row's key and label (-1: unlabeled) in global row order (row groups in
    /// manifest order, rows in file order: the ids [`crate::Loader::with_rows`] takes),
    /// reading only those two columns.
    ///
    /// # Errors
    /// A row group cannot be read or its columns have the wrong type (naming the shard).
    pub fn keys_and_labels(&self) -> Result<(Vec<String>, Vec<i32>), PipelineError> {
        let mut keys = Vec::with_capacity(self.rows() as usize);
        let mut labels = Vec::with_capacity(self.rows() as usize);
        for index in 0..self.groups.len() {
            let path = &self.shards[self.groups[index].shard].path;
            let typed = |name: &str| {
                PipelineError::Corrupt(format!(
                    "{}: column {name:?} missing or of the wrong type",
                    path.display()
                ))
            };
            for b in self.read_group(index, &[COL_KEY, COL_LABEL])? {
                let k = b
                    .column_by_name(COL_KEY)
                    .and_then(|c| c.as_any().downcast_ref::<StringArray>())
                    .ok_or_else(|| typed(COL_KEY))?;
                let l = b
                    .column_by_name(COL_LABEL)
                    .and_then(|c| c.as_any().downcast_ref::<Int32Array>())
                    .ok_or_else(|| typed(COL_LABEL))?;
                keys.extend(k.iter().map(|v| v.unwrap_or_default().to_string()));
                labels.extend(l.iter().map(|v| v.unwrap_or(-1)));
            }
        }
        Ok((keys, labels))
    }

    /// Reads row group `index` (all columns) from the mapped shard, then tells the
    /// kernel its pages are no longer needed by this process, so resident memory stays
    /// bounded by the open row groups rather than growing with the bytes streamed.
    ///
    /// # Errors
    /// [`PipelineError`]: the row group cannot be read or does not match the schema (naming the shard).
    pub fn load_group(&self, index: usize) -> Result<LoadedGroup, PipelineError> {
        let info = self.groups[index].clone();
        let sh = &self.shards[info.shard];
        let perr = |source| PipelineError::Parquet {
            path: sh.path.clone(),
            source,
        };
        let batches = self.read_group(
            index,
            &[COL_KEY, COL_LABEL, COL_IMAGE, COL_HEIGHT, COL_WIDTH],
        )?;
        let schema = byol_format::shards::schema();
        let batch = arrow_select_concat(&schema, &batches).map_err(perr)?;
        let col = |name: &str| -> Result<_, PipelineError> {
            batch.column_by_name(name).cloned().ok_or_else(|| {
                PipelineError::Corrupt(format!("{}: column {name:?} missing", sh.path.display()))
            })
        };
        let typed = |name: &str| {
            PipelineError::Corrupt(format!(
                "{}: column {name:?} has the wrong type",
                sh.path.display()
            ))
        };
        let keys = col(COL_KEY)?
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| typed(COL_KEY))?
            .clone();
        let labels = col(COL_LABEL)?
            .as_any()
            .downcast_ref::<Int32Array>()
            .ok_or_else(|| typed(COL_LABEL))?
            .clone();
        let images = col(COL_IMAGE)?
            .as_any()
            .downcast_ref::<BinaryArray>()
            .ok_or_else(|| typed(COL_IMAGE))?
            .clone();
        let heights = col(COL_HEIGHT)?
            .as_any()
            .downcast_ref::<Int32Array>()
            .ok_or_else(|| typed(COL_HEIGHT))?
            .clone();
        let widths = col(COL_WIDTH)?
            .as_any()
            .downcast_ref::<Int32Array>()
            .ok_or_else(|| typed(COL_WIDTH))?
            .clone();
        if keys.len() as u64 != info.span.rows {
            return Err(PipelineError::Corrupt(format!(
                "{} row group {}: {} rows, footer says {}",
                sh.path.display(),
                info.group,
                keys.len(),
                info.span.rows
            )));
        }
        let (lo, hi) = info.byte_range;
        if hi > lo {
            // Safety: the mapping is read-only and shared; dropping its pages only
            // means they are read again from the page cache if touched later.
            let _ignored = unsafe {
                sh.map.unchecked_advise_range(
                    UncheckedAdvice::DontNeed,
                    lo as usize,
                    (hi - lo) as usize,
                )
            };
        }
        Ok(LoadedGroup {
            info,
            keys,
            labels,
            images,
            heights,
            widths,
        })
    }
}

/// Concatenates the reader's batches (one row group normally yields exactly one).
fn arrow_select_concat(
    schema: &arrow_schema::SchemaRef,
    batches: &[arrow_array::RecordBatch],
) -> Result<arrow_array::RecordBatch, parquet::errors::ParquetError> {
    match batches.len() {
        1 => Ok(batches[0].clone()),
        0 => Ok(arrow_array::RecordBatch::new_empty(schema.clone())),
        _ => Err(parquet::errors::ParquetError::General(format!(
            "a row group was split into {} batches",
            batches.len()
        ))),
    }
}
