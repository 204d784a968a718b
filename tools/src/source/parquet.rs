//! The `parquet` layout: Parquet image datasets in the Hugging Face layout: an image column that is
//! a struct of `bytes` and `path` (the `datasets` library's `Image` feature) or plain
//! binary, an optional integer label column, and class names from the `huggingface`
//! schema metadata's `ClassLabel` `names` when present. The metadata says which columns
//! those are (CIFAR-10's image column is `img`); without it they are `image` (or `img`)
//! and `label`. A byol shard is refused (it is already sharded).
//!
//! A scan reads only the label column (and the files' metadata); the shard workers read
//! the image column one row group at a time through [`ParquetImages`], which keeps the
//! last [`CACHED_GROUPS`] row groups. Rows are stored in a windowed order (row groups
//! permuted, the rows of each [`WINDOW`] consecutive ones shuffled together, see
//! `shard::storage_order_for`), so memory stays bounded by those row groups however
//! large the dataset.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arrow_array::{Array, BinaryArray, LargeBinaryArray, StructArray};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use byol_format::shards::{self, Skipped};

use super::{
    files_and_folders, with_classes_from, Item, LayoutKind, Origin, ScanNotes, ScanOptions, Source,
    SourceError, Src,
};
use crate::keys::is_parquet_name;

/// Row groups whose rows are shuffled together when stored.
pub const WINDOW: usize = 8;
/// Row groups of images kept in memory by the shard workers.
pub const CACHED_GROUPS: usize = 2 * WINDOW;

/// Why a Parquet source cannot be read (the file named): the shard reader's errors.
pub use crate::read::ReadError as ParquetSourceError;

/// One row of a scan: its key (`FILE/ROW`: the file relative to the files' common folder, the row's index in it), label (-1:
/// none, null, or negative as Hugging Face test splits mark unknown labels), and where it
/// is.
#[derive(Debug, Clone)]
pub struct ParquetRow {
    pub key: String,
    pub label: i64,
    pub file: usize,
    pub group: usize,
    pub row: usize,
}

/// What a scan of the files found.
#[derive(Debug, Default)]
pub struct ParquetScan {
    pub rows: Vec<ParquetRow>,
    /// `ClassLabel` names from the `huggingface` metadata (the first file that has them).
    pub class_names: Option<Vec<String>>,
    /// Whether any file has a label column.
    pub labelled: bool,
}

fn parquet_err(
    path: &Path,
) -> impl FnOnce(parquet::errors::ParquetError) -> ParquetSourceError + '_ {
    move |source| ParquetSourceError::Parquet {
        path: path.to_path_buf(),
        source,
    }
}

fn builder(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>, ParquetSourceError> {
    let f = File::open(path).map_err(|source| ParquetSourceError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    ParquetRecordBatchReaderBuilder::try_new(f).map_err(parquet_err(path))
}

/// Which columns hold the image and the label, as the `huggingface` schema metadata
/// declares them (the feature of `_type` `Image`, the first of `_type` `ClassLabel` with
/// its `names`), else the columns named `image` (or `img`) and `label`.
struct Columns {
    image: usize,
    label: Option<usize>,
    names: Option<Vec<String>>,
}

fn features(
    path: &Path,
    schema: &arrow_schema::Schema,
) -> Option<serde_json::Map<String, serde_json::Value>> {
    let json = schema.metadata().get("huggingface")?;
    let v: serde_json::Value = match serde_json::from_str(json) {
        Ok(v) => v,
        Err(e) => {
            eprintln!(
                "byol-tools: warning: {}: the `huggingface` schema metadata is not JSON ({e}); columns are found by name",
                path.display()
            );
            return None;
        }
    };
    v.get("info")
        .and_then(|i| i.get("features"))
        .or_else(|| v.get("features"))?
        .as_object()
        .cloned()
}

fn columns(path: &Path, schema: &arrow_schema::Schema) -> Result<Columns, ParquetSourceError> {
    let bad = |msg: String| ParquetSourceError::Schema {
        path: path.to_path_buf(),
        msg,
    };
    let byol = [
        shards::COL_KEY,
        shards::COL_LABEL,
        shards::COL_IMAGE,
        shards::COL_HEIGHT,
        shards::COL_WIDTH,
    ];
    if byol.iter().all(|c| schema.column_with_name(c).is_some()) {
        return Err(bad(
            "a byol shard (already sharded): train on its folder with --data, or shard the images it came from".into(),
        ));
    }
    let feats = features(path, schema);
    let of_type = |t: &str| -> Option<String> {
        feats.as_ref()?.iter().find_map(|(name, f)| {
            (f.get("_type").and_then(|x| x.as_str()) == Some(t)).then(|| name.clone())
        })
    };
    let image = image_column(schema, of_type("Image")).map_err(bad)?;
    let label_name = of_type("ClassLabel").or_else(|| {
        schema
            .column_with_name("label")
            .map(|_| "label".to_string())
    });
    let names = label_name.as_ref().and_then(|l| {
        let n = feats.as_ref()?.get(l)?.get("names")?.as_array()?;
        n.iter().map(|x| x.as_str().map(String::from)).collect()
    });
    let label = match &label_name {
        Some(l) => Some(
            schema
                .column_with_name(l)
                .ok_or_else(|| {
                    bad(format!(
                        "the metadata names the label column `{l}`, which the file lacks"
                    ))
                })?
                .0,
        ),
        None => None,
    };
    Ok(Columns {
        image,
        label,
        names,
    })
}

/// The index of the image column: `declared` (the metadata's `Image` feature), else the
/// column named `image` or `img`; it must be binary, or a struct with binary `bytes`.
/// The error text says why there is none.
fn image_column(schema: &arrow_schema::Schema, declared: Option<String>) -> Result<usize, String> {
    let image_name = declared
        .or_else(|| {
            ["image", "img"]
                .iter()
                .find(|n| schema.column_with_name(n).is_some())
                .map(|n| n.to_string())
        })
        .ok_or_else(|| {
            let cols: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            format!(
                "no image column: none is declared an `Image` feature in the `huggingface` metadata, and none is named `image` or `img` (columns: {})",
                cols.join(", ")
            )
        })?;
    let (image, f) = schema.column_with_name(&image_name).ok_or_else(|| {
        format!("the metadata names the image column `{image_name}`, which the file lacks")
    })?;
    let ok = match f.data_type() {
        DataType::Binary | DataType::LargeBinary => true,
        DataType::Struct(fields) => fields.iter().any(|c| {
            c.name() == "bytes" && matches!(c.data_type(), DataType::Binary | DataType::LargeBinary)
        }),
        _ => false,
    };
    if !ok {
        return Err(format!(
            "the image column `{image_name}` is {}, not binary or a struct with binary `bytes`",
            f.data_type()
        ));
    }
    Ok(image)
}

/// The files given, and the `*.parquet` files of the folders given (sorted by name), as a
/// source. Labels are the label column's integers; the class names are `--class-names`,
/// else the `ClassLabel` names in the `huggingface` metadata, else the numbers `0..=max`.
/// Without a label column every row is unlabeled; a row whose label is null or negative
/// is unlabeled; one beyond the class names is skipped with the reason.
///
/// # Errors
/// A missing source, a folder without `.parquet` files, a file that is not a usable
/// Parquet image dataset (naming it), or a class that `--classes-from`'s dataset lacks.
pub fn scan(srcs: &[PathBuf], opts: &ScanOptions) -> Result<Source, SourceError> {
    let files = files_and_folders(srcs, is_parquet_name, ".parquet files")?;
    let scan =
        scan_files(&files).map_err(|e| SourceError::Invalid(byol_format::error_chain(&e)))?;
    let names: Option<Vec<String>> = opts.class_names.clone().or(scan.class_names);
    let max = scan.rows.iter().map(|r| r.label).max().unwrap_or(-1);
    let classes: Vec<String> = match (&names, scan.labelled) {
        (_, false) => Vec::new(),
        (Some(n), true) => n.clone(),
        (None, true) => (0..=max).map(|n| n.to_string()).collect(),
    };
    let mut items = Vec::with_capacity(scan.rows.len());
    let mut notes = ScanNotes::default();
    for r in scan.rows {
        // A null or negative label (Hugging Face test splits use -1) is an unlabeled row.
        let label = if !scan.labelled || r.label < 0 {
            -1
        } else if r.label as usize >= classes.len() {
            notes.skipped.push(Skipped {
                key: r.key,
                reason: format!(
                    "label {} is beyond the {} class names",
                    r.label,
                    classes.len()
                ),
            });
            continue;
        } else {
            r.label as i32
        };
        items.push(Item {
            key: r.key,
            label,
            src: Src::Parquet {
                file: r.file,
                group: r.group,
                row: r.row,
            },
            size: 0,
        });
    }
    let classes = with_classes_from(classes, &mut items, opts)?;
    let origin = Origin::Parquet(ParquetImages::new(files));
    Ok(Source::new(
        LayoutKind::Parquet,
        classes,
        items,
        notes,
        origin,
    ))
}

/// Scans `files` (in the order given): every row's key, label and place; the labels
/// come from an integer `label` column (null: unlabeled).
///
/// # Errors
/// [`ParquetSourceError`] naming the file: unreadable, not Parquet, no usable `image`
/// column, or a `label` column that is not integer.
pub fn scan_files(files: &[PathBuf]) -> Result<ParquetScan, ParquetSourceError> {
    let mut out = ParquetScan::default();
    let names = super::relative_names(files);
    for (fi, (path, name)) in files.iter().zip(&names).enumerate() {
        let b = builder(path)?;
        let schema = b.schema().clone();
        let cols = columns(path, &schema)?;
        if out.class_names.is_none() {
            out.class_names = cols.names.clone();
        }
        readable_codecs(path, b.metadata())?;
        let groups: Vec<usize> = b
            .metadata()
            .row_groups()
            .iter()
            .map(|g| g.num_rows() as usize)
            .collect();
        let label_col = cols.label;
        let mut labels: Vec<i64> = Vec::new();
        if let Some(li) = label_col {
            out.labelled = true;
            let mask = ProjectionMask::roots(b.parquet_schema(), [li]);
            let reader = b.with_projection(mask).build().map_err(parquet_err(path))?;
            for batch in reader {
                let batch = batch.map_err(|e| ParquetSourceError::Schema {
                    path: path.to_path_buf(),
                    msg: e.to_string(),
                })?;
                let col =
                    arrow_cast_i64(batch.column(0)).ok_or_else(|| ParquetSourceError::Schema {
                        path: path.to_path_buf(),
                        msg: format!(
                            "the label column `{}` is {}, not an integer",
                            schema.field(label_col.unwrap_or(0)).name(),
                            batch.column(0).data_type()
                        ),
                    })?;
                labels.extend(col);
            }
        }
        let mut row_in_file = 0usize;
        for (g, &n) in groups.iter().enumerate() {
            for r in 0..n {
                let label = labels.get(row_in_file).copied().unwrap_or(-1);
                out.rows.push(ParquetRow {
                    key: format!("{name}/{row_in_file:09}"),
                    label,
                    file: fi,
                    group: g,
                    row: r,
                });
                row_in_file += 1;
            }
        }
    }
    Ok(out)
}

/// Refuses a file with a column chunk in a codec this build cannot decompress (LZO:
/// arrow-rs has none), naming the file, column and codec. Snappy, gzip, LZ4 (both
/// kinds), zstd and Brotli are read.
fn readable_codecs(
    path: &Path,
    meta: &parquet::file::metadata::ParquetMetaData,
) -> Result<(), ParquetSourceError> {
    for g in meta.row_groups() {
        for c in g.columns() {
            if matches!(c.compression(), parquet::basic::Compression::LZO) {
                return Err(ParquetSourceError::Schema {
                    path: path.to_path_buf(),
                    msg: format!(
                        "column `{}` is compressed with LZO, which no Parquet reader in Rust decompresses; rewrite the file with zstd or snappy (e.g. pyarrow.parquet.write_table(t, f, compression=\"zstd\"))",
                        c.column_path()
                    ),
                });
            }
        }
    }
    Ok(())
}

/// An integer column as i64 values (null: -1).
fn arrow_cast_i64(a: &dyn Array) -> Option<Vec<i64>> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{
        Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type, UInt32Type, UInt8Type,
    };
    macro_rules! ints {
        ($t:ty) => {
            Some(
                a.as_primitive::<$t>()
                    .iter()
                    .map(|v| v.map_or(-1, |x| x as i64))
                    .collect(),
            )
        };
    }
    match a.data_type() {
        DataType::Int64 => ints!(Int64Type),
        DataType::Int32 => ints!(Int32Type),
        DataType::Int16 => ints!(Int16Type),
        DataType::Int8 => ints!(Int8Type),
        DataType::UInt32 => ints!(UInt32Type),
        DataType::UInt16 => ints!(UInt16Type),
        DataType::UInt8 => ints!(UInt8Type),
        _ => None,
    }
}

/// One row group's images (`None`: a null image or null `bytes`).
type Group = Arc<Vec<Option<Vec<u8>>>>;

/// Cached row groups, oldest first, and their images by (file, row group).
type Cache = (VecDeque<(usize, usize)>, HashMap<(usize, usize), Group>);

/// The image bytes of the files' rows, read a row group at a time and cached.
#[derive(Debug)]
pub struct ParquetImages {
    pub files: Vec<PathBuf>,
    cache: Mutex<Cache>,
}

impl ParquetImages {
    /// The images of `files` (indexed as [`Src::Parquet`]'s `file`), none read yet.
    pub fn new(files: Vec<PathBuf>) -> ParquetImages {
        ParquetImages {
            files,
            cache: Mutex::new((VecDeque::new(), HashMap::new())),
        }
    }

    /// The image bytes of row `row` of row group `group` of file `file`.
    ///
    /// # Errors
    /// The row group cannot be read (the message names the file and row group).
    pub fn image(&self, file: usize, group: usize, row: usize) -> Result<Option<Vec<u8>>, String> {
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let g = match c.1.get(&(file, group)) {
            Some(g) => Arc::clone(g),
            None => {
                let path = &self.files[file];
                let g: Group = Arc::new(
                    read_group(path, group)
                        .map_err(|e| format!("{}: row group {group}: {e}", path.display()))?,
                );
                c.0.push_back((file, group));
                c.1.insert((file, group), Arc::clone(&g));
                while c.0.len() > CACHED_GROUPS {
                    if let Some(old) = c.0.pop_front() {
                        c.1.remove(&old);
                    }
                }
                g
            }
        };
        drop(c);
        Ok(g.get(row).cloned().flatten())
    }
}

/// The `image` column of one row group.
fn read_group(path: &Path, group: usize) -> Result<Vec<Option<Vec<u8>>>, String> {
    let b = builder(path).map_err(|e| e.to_string())?;
    let col = columns(path, b.schema()).map_err(|e| e.to_string())?.image;
    let mask = ProjectionMask::roots(b.parquet_schema(), [col]);
    let reader = b
        .with_projection(mask)
        .with_row_groups(vec![group])
        .build()
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| e.to_string())?;
        let a = batch.column(0);
        let bytes: &dyn Array = match a.as_any().downcast_ref::<StructArray>() {
            Some(s) => {
                let b = s.column_by_name("bytes").ok_or("no `bytes` field")?;
                // A null struct is a null image.
                for i in 0..s.len() {
                    if s.is_null(i) {
                        out.push(None);
                    } else {
                        out.push(binary_at(b.as_ref(), i));
                    }
                }
                continue;
            }
            None => a.as_ref(),
        };
        for i in 0..bytes.len() {
            out.push(binary_at(bytes, i));
        }
    }
    Ok(out)
}

fn binary_at(a: &dyn Array, i: usize) -> Option<Vec<u8>> {
    if a.is_null(i) {
        return None;
    }
    if let Some(b) = a.as_any().downcast_ref::<BinaryArray>() {
        return Some(b.value(i).to_vec());
    }
    a.as_any()
        .downcast_ref::<LargeBinaryArray>()
        .map(|b| b.value(i).to_vec())
}
