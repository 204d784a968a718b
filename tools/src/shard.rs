//! `byol-tools shard`: source images → Parquet shards + manifest.
//!
//! Items are listed in key order, permuted with the seed, and processed by a pool of
//! workers; a single writer takes the results back in order, so the output depends
//! only on the inputs and the settings (never on thread timing). Each shard is written
//! under a temporary name and renamed when complete; after each rename a progress file
//! records where the next shard starts, so a rerun of an interrupted run continues from
//! there and produces the same bytes as an uninterrupted run. The manifest is written
//! last.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arrow_array::{ArrayRef, BinaryArray, Int32Array, RecordBatch, StringArray};
use byol_format::progress::{Mode, Progress as Display};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use serde::{Deserialize, Serialize};

use crate::source::{fingerprint, Source, Src};
use byol_format::fs::{commit, sync_dir, temp_path, write_atomic, FileError};
use byol_format::image::{encode_gray_png, prepare, ImageError, PrepareOptions, Prepared};
use byol_format::rng::SplitMix64;
use byol_format::shards::{
    self, checksum_string, shard_file_name, Manifest, Settings, ShardInfo, Skipped, Totals,
    FORMAT_NAME, FORMAT_VERSION, MANIFEST,
};

/// Progress of an unfinished run, kept next to the shards until the manifest exists.
pub const PROGRESS: &str = ".byol-shard-progress.json";

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}")]
    Parquet {
        path: PathBuf,
        #[source]
        source: parquet::errors::ParquetError,
    },
    #[error("{0}")]
    Refused(String),
    #[error("no image of {total} could be stored ({skipped} skipped; reasons in {manifest})")]
    NothingStored {
        total: usize,
        skipped: usize,
        manifest: PathBuf,
    },
    #[error("a decode worker stopped unexpectedly")]
    WorkerDied,
    #[error(transparent)]
    File(#[from] FileError),
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> ShardError + '_ {
    move |source| ShardError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone)]
pub struct ShardOptions {
    pub max_side: Option<u32>,
    pub quality: u8,
    pub rows_per_shard: Option<u64>,
    pub shard_bytes: Option<u64>,
    pub row_group_rows: usize,
    pub workers: usize,
    pub seed: u64,
    pub force: bool,
    /// Show progress on stderr (a bar on a terminal, plain lines otherwise).
    pub progress: bool,
}

impl ShardOptions {
    pub fn settings(&self, source: &Source, source_arg: &str) -> Settings {
        Settings {
            layout: source.layout.to_string(),
            source: source_arg.to_string(),
            max_side: self.max_side,
            quality: self.quality,
            rows_per_shard: self.rows_per_shard,
            shard_bytes: self.shard_bytes,
            row_group_rows: self.row_group_rows,
            seed: self.seed,
            lossless_png: source.idx.is_some(),
        }
    }
}

/// The `--json` summary of a shard run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardSummary {
    pub command: String,
    pub out: String,
    pub rows: u64,
    pub shards: usize,
    pub classes: usize,
    pub skipped: u64,
    pub ignored: u64,
    pub kept_original: u64,
    pub reencoded: u64,
    pub bytes: u64,
    pub image_bytes: u64,
    /// Shards that an earlier, interrupted run had completed.
    pub resumed_shards: usize,
    pub seconds: f64,
    /// Images processed by this run per second (skipped ones included).
    pub images_per_s: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Progress {
    settings: Settings,
    fingerprint: String,
    shards: Vec<ShardInfo>,
    /// Position in the shuffled order where the next shard starts.
    next_pos: usize,
    skipped: Vec<Skipped>,
    totals: Totals,
}

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
struct OpenShard {
    index: usize,
    tmp: PathBuf,
    writer: ArrowWriter<CrcWriter<BufWriter<File>>>,
    rows: u64,
    image_bytes: u64,
    keys: Vec<String>,
    labels: Vec<i32>,
    images: Vec<Vec<u8>>,
    heights: Vec<i32>,
    widths: Vec<i32>,
}

impl OpenShard {
    fn create(out: &Path, index: usize, row_group_rows: usize) -> Result<OpenShard, ShardError> {
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

    fn push(&mut self, key: &str, label: i32, p: Prepared) {
        self.rows += 1;
        self.image_bytes += p.bytes.len() as u64;
        self.keys.push(key.to_string());
        self.labels.push(label);
        self.images.push(p.bytes);
        self.heights.push(p.height);
        self.widths.push(p.width);
    }

    /// Writes the buffered rows as one row group.
    fn flush_row_group(&mut self) -> Result<(), ShardError> {
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
    fn finish(mut self, out: &Path) -> Result<ShardInfo, ShardError> {
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

/// Our own files in a dataset folder (shards, manifest, progress, temporaries).
fn dataset_files(out: &Path) -> Result<Vec<PathBuf>, ShardError> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(out).map_err(io_at(out))? {
        let p = e.map_err(io_at(out))?.path();
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let ours = name == MANIFEST
            || name == PROGRESS
            || (name.starts_with("shard-") && name.ends_with(".parquet"))
            || (name.starts_with('.') && name.ends_with(".tmp"));
        if ours {
            v.push(p);
        }
    }
    Ok(v)
}

/// Decides how to start: fresh, or resuming an interrupted run.
fn prepare_out(
    out: &Path,
    settings: &Settings,
    fp: &str,
    force: bool,
) -> Result<Option<Progress>, ShardError> {
    std::fs::create_dir_all(out).map_err(io_at(out))?;
    let files = dataset_files(out)?;
    if force {
        for f in &files {
            std::fs::remove_file(f).map_err(io_at(f))?;
        }
        return Ok(None);
    }
    if out.join(MANIFEST).exists() {
        return Err(ShardError::Refused(format!(
            "{} already holds a complete dataset ({MANIFEST}); use --force to replace it",
            out.display()
        )));
    }
    let progress_path = out.join(PROGRESS);
    let progress = if progress_path.exists() {
        let text = std::fs::read_to_string(&progress_path).map_err(io_at(&progress_path))?;
        let p: Progress = serde_json::from_str(&text).map_err(|e| {
            ShardError::Refused(format!(
                "{}: unreadable progress file ({e}); use --force to start over",
                progress_path.display()
            ))
        })?;
        if p.settings != *settings || p.fingerprint != fp {
            return Err(ShardError::Refused(format!(
                "{} holds an interrupted run with different settings or source files; \
                 rerun with the same arguments to complete it, or use --force to start over",
                out.display()
            )));
        }
        for s in &p.shards {
            let path = out.join(&s.file);
            let len = std::fs::metadata(&path)
                .map(|m| m.len())
                .unwrap_or(u64::MAX);
            if len != s.bytes {
                return Err(ShardError::Refused(format!(
                    "{} of the interrupted run is missing or changed; use --force to start over",
                    path.display()
                )));
            }
        }
        Some(p)
    } else {
        let stray = files.iter().any(|f| {
            f.file_name()
                .map(|n| n.to_string_lossy().starts_with("shard-"))
                .unwrap_or(false)
        });
        if stray {
            return Err(ShardError::Refused(format!(
                "{} holds shard files but no manifest or progress record; use --force to start over",
                out.display()
            )));
        }
        None
    };
    // Temporaries of an interrupted shard are rewritten from scratch.
    for f in files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with('.') && name.ends_with(".tmp") {
            std::fs::remove_file(&f).map_err(io_at(&f))?;
        }
    }
    Ok(progress)
}

/// Why one source item is not stored (its text goes into the manifest's `skipped`).
#[derive(Debug, thiserror::Error)]
enum SkipReason {
    #[error("unreadable: {0}")]
    Unreadable(std::io::Error),
    #[error("IDX data missing")]
    NoIdx,
    #[error("Parquet source missing")]
    NoParquet,
    #[error("no image bytes (a null image, or an image stored as a path only)")]
    NullImage,
    #[error("internal error (panic) while decoding")]
    Panic,
    #[error(transparent)]
    Image(#[from] ImageError),
}

/// Reads and prepares one item (runs on a worker).
fn process(source: &Source, idx: usize, opts: &PrepareOptions) -> Result<Prepared, SkipReason> {
    let item = &source.items[idx];
    match &item.src {
        Src::File(path) => {
            let bytes = std::fs::read(path).map_err(SkipReason::Unreadable)?;
            Ok(prepare(&bytes, opts)?)
        }
        Src::Tar {
            archive,
            offset,
            size,
        } => {
            let path = &source.archives[*archive];
            let bytes = crate::tar_source::read_member(path, *offset, *size)
                .map_err(SkipReason::Unreadable)?;
            Ok(prepare(&bytes, opts)?)
        }
        Src::Parquet { file, group, row } => {
            let Some(images) = &source.parquet else {
                return Err(SkipReason::NoParquet);
            };
            let bytes = images
                .image(*file, *group, *row)
                .map_err(|e| SkipReason::Unreadable(std::io::Error::other(e)))?
                .ok_or(SkipReason::NullImage)?;
            Ok(prepare(&bytes, opts)?)
        }
        Src::Idx(i) => {
            let Some(idx) = &source.idx else {
                return Err(SkipReason::NoIdx);
            };
            let (h, w) = (idx.dims[1] as i32, idx.dims[2] as i32);
            let bytes = encode_gray_png(idx.item(*i), h, w)?;
            Ok(Prepared {
                bytes,
                height: h,
                width: w,
                kept: false,
            })
        }
    }
}

/// The order in which items are stored: key order permuted with the seed.
pub fn storage_order(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    SplitMix64::new(seed).shuffle(&mut order);
    order
}

/// The storage order for `source`: [`storage_order`], except for Parquet sources, whose
/// images are read a row group at a time: their row groups are permuted with the seed
/// and the rows of each [`crate::parquet_source::WINDOW`] consecutive row groups are
/// shuffled together (as the training loader's plan does), so that the workers need
/// only the row groups of one window in memory.
pub fn storage_order_for(source: &Source, seed: u64) -> Vec<usize> {
    let n = source.items.len();
    if source.parquet.is_none() {
        return storage_order(n, seed);
    }
    // Runs of consecutive items from the same row group (items are in file, row order).
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    let mut last = None;
    for (i, it) in source.items.iter().enumerate() {
        let g = match it.src {
            Src::Parquet { file, group, .. } => Some((file, group)),
            _ => None,
        };
        if g != last || runs.is_empty() {
            runs.push(i..i + 1);
            last = g;
        } else if let Some(r) = runs.last_mut() {
            r.end = i + 1;
        }
    }
    let mut rng = SplitMix64::new(seed);
    rng.shuffle(&mut runs);
    let mut order = Vec::with_capacity(n);
    for window in runs.chunks(crate::parquet_source::WINDOW) {
        let start = order.len();
        for r in window {
            order.extend(r.clone());
        }
        rng.shuffle(&mut order[start..]);
    }
    order
}

/// Runs the whole shard job.
///
/// # Errors
/// [`ShardError`]: the output folder holds another dataset or cannot be written, no image could be stored, or a worker died.
pub fn shard(
    source: &Source,
    source_arg: &str,
    out: &Path,
    opts: &ShardOptions,
) -> Result<ShardSummary, ShardError> {
    let t0 = Instant::now();
    if opts.row_group_rows == 0 || opts.rows_per_shard == Some(0) || opts.shard_bytes == Some(0) {
        return Err(ShardError::Refused(
            "row and byte limits must be positive".into(),
        ));
    }
    let settings = opts.settings(source, source_arg);
    let fp = fingerprint(source);
    let resumed = prepare_out(out, &settings, &fp, opts.force)?;
    let n = source.items.len();
    let order = storage_order_for(source, opts.seed);
    let mut state = resumed.clone().unwrap_or(Progress {
        settings: settings.clone(),
        fingerprint: fp,
        shards: Vec::new(),
        next_pos: 0,
        skipped: Vec::new(),
        totals: Totals {
            per_class: vec![0; source.classes.len()],
            ..Totals::default()
        },
    });
    let resumed_shards = state.shards.len();
    let start = state.next_pos;
    let prep = PrepareOptions {
        max_side: opts.max_side,
        quality: opts.quality,
    };
    let workers = opts.workers.max(1);
    let window = 64 * workers;

    let mut bar = Display::new(
        Mode::detect(opts.progress),
        "shard",
        n as u64,
        "images",
        start as u64,
    );

    let (job_tx, job_rx) = crossbeam_channel::bounded::<usize>(2 * workers);
    let (res_tx, res_rx) =
        crossbeam_channel::bounded::<(usize, Result<Prepared, SkipReason>)>(window);
    let (tok_tx, tok_rx) = crossbeam_channel::bounded::<()>(window);
    for _ in 0..window {
        let _ = tok_tx.send(());
    }

    let result = std::thread::scope(|s| {
        let order = &order;
        s.spawn(move || {
            for pos in start..n {
                if tok_rx.recv().is_err() || job_tx.send(pos).is_err() {
                    return;
                }
            }
        });
        for _ in 0..workers {
            let job_rx = job_rx.clone();
            let res_tx = res_tx.clone();
            let prep = &prep;
            s.spawn(move || {
                for pos in job_rx {
                    let idx = order[pos];
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        process(source, idx, prep)
                    }))
                    .unwrap_or(Err(SkipReason::Panic));
                    if res_tx.send((pos, r)).is_err() {
                        return;
                    }
                }
            });
        }
        drop(job_rx);
        drop(res_tx);
        write_in_order(source, out, opts, order, &mut state, res_rx, tok_tx, &bar)
    });
    bar.finish();
    result?;

    // Everything is written: the manifest makes the dataset complete.
    let mut skipped = source.skipped.clone();
    skipped.extend(state.skipped.iter().cloned());
    skipped.sort();
    let mut totals = state.totals.clone();
    totals.skipped = skipped.len() as u64;
    totals.ignored = source.ignored;
    totals.rows = state.shards.iter().map(|s| s.rows).sum();
    totals.bytes = state.shards.iter().map(|s| s.bytes).sum();
    let manifest = Manifest {
        format: FORMAT_NAME.to_string(),
        version: FORMAT_VERSION,
        classes: source.classes.clone(),
        shards: state.shards.clone(),
        totals: totals.clone(),
        settings,
        skipped,
        escaped_keys: source.escaped.clone(),
    };
    let text =
        serde_json::to_string_pretty(&manifest).map_err(|e| ShardError::Refused(e.to_string()))?;
    let mpath = out.join(MANIFEST);
    write_atomic(&mpath, format!("{text}\n").as_bytes())?;
    let ppath = out.join(PROGRESS);
    if ppath.exists() {
        std::fs::remove_file(&ppath).map_err(io_at(&ppath))?;
    }
    sync_dir(out);
    if totals.rows == 0 {
        return Err(ShardError::NothingStored {
            total: n + source.skipped.len(),
            skipped: totals.skipped as usize,
            manifest: mpath,
        });
    }
    let seconds = t0.elapsed().as_secs_f64();
    Ok(ShardSummary {
        command: "shard".into(),
        out: out.display().to_string(),
        rows: totals.rows,
        shards: manifest.shards.len(),
        classes: manifest.classes.len(),
        skipped: totals.skipped,
        ignored: totals.ignored,
        kept_original: totals.kept_original,
        reencoded: totals.reencoded,
        bytes: totals.bytes,
        image_bytes: totals.image_bytes,
        resumed_shards,
        seconds,
        images_per_s: (n - start) as f64 / seconds.max(1e-9),
    })
}

#[allow(clippy::too_many_arguments)]
fn write_in_order(
    source: &Source,
    out: &Path,
    opts: &ShardOptions,
    order: &[usize],
    state: &mut Progress,
    res_rx: crossbeam_channel::Receiver<(usize, Result<Prepared, SkipReason>)>,
    tok_tx: crossbeam_channel::Sender<()>,
    bar: &Display,
) -> Result<(), ShardError> {
    let n = order.len();
    let mut next = state.next_pos;
    let mut pending: BTreeMap<usize, Result<Prepared, SkipReason>> = BTreeMap::new();
    let mut open: Option<OpenShard> = None;
    // Counters of the shard in progress; merged into `state` when it completes.
    let mut cur = Totals {
        per_class: vec![0; source.classes.len()],
        ..Totals::default()
    };
    let mut cur_skipped: Vec<Skipped> = Vec::new();
    while next < n {
        let (pos, r) = res_rx.recv().map_err(|_| ShardError::WorkerDied)?;
        pending.insert(pos, r);
        while let Some(r) = pending.remove(&next) {
            let item = &source.items[order[next]];
            match r {
                Ok(p) => {
                    if open.is_none() {
                        open = Some(OpenShard::create(
                            out,
                            state.shards.len(),
                            opts.row_group_rows,
                        )?);
                    }
                    let sh = open.as_mut().ok_or(ShardError::WorkerDied)?;
                    if p.kept {
                        cur.kept_original += 1;
                    } else {
                        cur.reencoded += 1;
                    }
                    cur.image_bytes += p.bytes.len() as u64;
                    if item.label >= 0 {
                        cur.per_class[item.label as usize] += 1;
                    } else {
                        cur.unlabeled += 1;
                    }
                    sh.push(&item.key, item.label, p);
                    if sh.keys.len() >= opts.row_group_rows {
                        sh.flush_row_group()?;
                    }
                    let full = opts.rows_per_shard.is_some_and(|r| sh.rows >= r)
                        || opts.shard_bytes.is_some_and(|b| sh.image_bytes >= b);
                    if full {
                        let done = open.take().ok_or(ShardError::WorkerDied)?;
                        complete_shard(out, done, next + 1, state, &mut cur, &mut cur_skipped)?;
                    }
                }
                Err(reason) => {
                    tracing::warn!(key = %item.key, %reason, "skipped");
                    cur_skipped.push(Skipped {
                        key: item.key.clone(),
                        reason: reason.to_string(),
                    });
                }
            }
            next += 1;
            bar.inc(1);
            if !cur_skipped.is_empty() || !state.skipped.is_empty() {
                bar.set_message(format!(
                    "{} skipped",
                    state.skipped.len() + cur_skipped.len()
                ));
            }
            // Let the feeder run one more item ahead; it may already have finished.
            let _ = tok_tx.try_send(());
        }
    }
    if let Some(sh) = open.take() {
        complete_shard(out, sh, n, state, &mut cur, &mut cur_skipped)?;
    } else {
        merge(state, &mut cur, &mut cur_skipped);
        state.next_pos = n;
    }
    Ok(())
}

fn merge(state: &mut Progress, cur: &mut Totals, cur_skipped: &mut Vec<Skipped>) {
    let t = &mut state.totals;
    t.kept_original += cur.kept_original;
    t.reencoded += cur.reencoded;
    t.image_bytes += cur.image_bytes;
    t.unlabeled += cur.unlabeled;
    for (a, b) in t.per_class.iter_mut().zip(cur.per_class.iter_mut()) {
        *a += *b;
        *b = 0;
    }
    cur.kept_original = 0;
    cur.reencoded = 0;
    cur.image_bytes = 0;
    cur.unlabeled = 0;
    state.skipped.append(cur_skipped);
}

fn complete_shard(
    out: &Path,
    sh: OpenShard,
    next_pos: usize,
    state: &mut Progress,
    cur: &mut Totals,
    cur_skipped: &mut Vec<Skipped>,
) -> Result<(), ShardError> {
    let info = sh.finish(out)?;
    tracing::debug!(file = %info.file, rows = info.rows, "shard complete");
    state.shards.push(info);
    state.next_pos = next_pos;
    merge(state, cur, cur_skipped);
    let text = serde_json::to_string(&state).map_err(|e| ShardError::Refused(e.to_string()))?;
    let p = out.join(PROGRESS);
    write_atomic(&p, text.as_bytes())?;
    Ok(())
}
