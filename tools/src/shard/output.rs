//! One shard file being written: rows buffered into row groups, the bytes counted and
//! checksummed as they pass, the file renamed to its final name when complete.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{ArrayRef, BinaryArray, Int32Array, RecordBatch, StringArray};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding};
use parquet::file::properties::{EnabledStatistics, WriterProperties};

use super::{io_at, ShardError};
use byol_format::fs::{commit, temp_path};
use byol_format::image::Prepared;
use byol_format::shards::{self, checksum_string, shard_file_name, ShardInfo};

/// A `Write` that counts and checksums what passes through.
struct CrcWriter<W: Write> {
    inner: W,
    crc: crc32fast::Hasher,
    written: u64,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn writer_properties(row_group_rows: usize) -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::UNCOMPRESSED)
        .set_dictionary_enabled(false)
        .set_encoding(Encoding::PLAIN)
        .set_statistics_enabled(EnabledStatistics::None)
        .set_max_row_group_row_count(Some(row_group_rows))
        .set_created_by(format!("byol-tools {}", env!("CARGO_PKG_VERSION")))
        .build()
}

/// One shard being written.
pub(super) struct OpenShard {
    index: usize,
    tmp: PathBuf,
    writer: ArrowWriter<CrcWriter<BufWriter<File>>>,
    /// Rows pushed so far.
    pub rows: u64,
    /// Image bytes pushed so far.
    pub image_bytes: u64,
    keys: Vec<String>,
    labels: Vec<i32>,
    images: Vec<Vec<u8>>,
    heights: Vec<i32>,
    widths: Vec<i32>,
}

impl OpenShard {
    /// Starts shard `index` of `out` under its temporary name.
    ///
    /// # Errors
    /// The file cannot be created.
    pub fn create(
        out: &Path,
        index: usize,
        row_group_rows: usize,
    ) -> Result<OpenShard, ShardError> {
        let tmp = temp_path(&out.join(shard_file_name(index)));
        let f = File::create(&tmp).map_err(io_at(&tmp))?;
        let w = CrcWriter {
            inner: BufWriter::with_capacity(1 << 20, f),
            crc: crc32fast::Hasher::new(),
            written: 0,
        };
        let writer =
            ArrowWriter::try_new(w, shards::schema(), Some(writer_properties(row_group_rows)))
                .map_err(|source| ShardError::Parquet {
                    path: tmp.clone(),
                    source,
                })?;
        Ok(OpenShard {
            index,
            tmp,
            writer,
            rows: 0,
            image_bytes: 0,
            keys: Vec::new(),
            labels: Vec::new(),
            images: Vec::new(),
            heights: Vec::new(),
            widths: Vec::new(),
        })
    }

    /// Rows buffered for the next row group.
    pub fn buffered(&self) -> usize {
        self.keys.len()
    }

    /// Buffers one row.
    pub fn push(&mut self, key: &str, label: i32, p: Prepared) {
        self.rows += 1;
        self.image_bytes += p.bytes.len() as u64;
        self.keys.push(key.to_string());
        self.labels.push(label);
        self.images.push(p.bytes);
        self.heights.push(p.height);
        self.widths.push(p.width);
    }

    /// Writes the buffered rows as one row group.
    ///
    /// # Errors
    /// Writing the shard fails.
    pub fn flush_row_group(&mut self) -> Result<(), ShardError> {
        if self.keys.is_empty() {
            return Ok(());
        }
        let images: Vec<&[u8]> = self.images.iter().map(|v| v.as_slice()).collect();
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(std::mem::take(&mut self.keys))),
            Arc::new(Int32Array::from(std::mem::take(&mut self.labels))),
            Arc::new(BinaryArray::from_vec(images)),
            Arc::new(Int32Array::from(std::mem::take(&mut self.heights))),
            Arc::new(Int32Array::from(std::mem::take(&mut self.widths))),
        ];
        let perr = |source| ShardError::Parquet {
            path: self.tmp.clone(),
            source,
        };
        let batch = RecordBatch::try_new(shards::schema(), cols)
            .map_err(|e| perr(parquet::errors::ParquetError::External(Box::new(e))))?;
        self.images.clear();
        self.writer.write(&batch).map_err(perr)?;
        self.writer.flush().map_err(perr)?;
        Ok(())
    }

    /// Closes, fsyncs and renames the shard to its final name.
    ///
    /// # Errors
    /// Writing, syncing or renaming the shard fails.
    pub fn finish(mut self, out: &Path) -> Result<ShardInfo, ShardError> {
        self.flush_row_group()?;
        let tmp = self.tmp.clone();
        let w = self
            .writer
            .into_inner()
            .map_err(|source| ShardError::Parquet {
                path: tmp.clone(),
                source,
            })?;
        let crc = w.crc.finalize();
        let written = w.written;
        let f = w.inner.into_inner().map_err(|e| ShardError::Io {
            path: tmp.clone(),
            source: e.into_error(),
        })?;
        drop(f);
        let name = shard_file_name(self.index);
        let dest = out.join(&name);
        commit(&tmp, &dest)?;
        Ok(ShardInfo {
            file: name,
            rows: self.rows,
            bytes: written,
            checksum: checksum_string(crc),
        })
    }
}
