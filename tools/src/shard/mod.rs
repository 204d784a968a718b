//! `byol-tools shard`: source images → Parquet shards + manifest.
//!
//! Items are listed in key order, permuted with the seed ([`storage_order_for`]), and
//! processed by a pool of workers; a single writer (`write.rs`) takes the results back in
//! order, so the output depends only on the inputs and the settings (never on thread
//! timing). Each shard is written under a temporary name and renamed when complete
//! (`output.rs`); after each rename a progress file records where the next shard starts
//! (`resume.rs`), so a rerun of an interrupted run continues from there and produces the
//! same bytes as an uninterrupted run. The manifest is written last.

use std::path::{Path, PathBuf};
use std::time::Instant;

use byol_format::progress::{Mode, Progress as Display};
use serde::{Deserialize, Serialize};

use crate::source::{fingerprint, Source, Src};
use byol_format::fs::{sync_dir, write_atomic, FileError};
use byol_format::image::{encode_gray_png, prepare, ImageError, PrepareOptions, Prepared};
use byol_format::rng::SplitMix64;
use byol_format::shards::{Manifest, Settings, Totals, FORMAT_NAME, FORMAT_VERSION, MANIFEST};

pub use resume::PROGRESS;
use resume::{prepare_out, Progress};
use write::Writer;

mod output;
mod resume;
mod write;

/// Why a shard run failed or was refused.
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

/// How to shard: image re-encoding, shard and row-group sizes, threads, seed.
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

/// A size in bytes as `--shard-bytes` takes it: a number with an optional `K`, `M` or
/// `G` suffix (any case; powers of 1024).
///
/// # Errors
/// Not a number, or zero (the text says which).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("not a size: {s:?} (examples: 4096, 64M, 1G)"))?;
    if n == 0 {
        return Err("size must be positive".into());
    }
    Ok(n * mult)
}

impl ShardOptions {
    /// The manifest's record of these options for `source` (named `source_arg`).
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
            lossless_png: source.origin.idx().is_some(),
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

impl ShardSummary {
    /// The human-readable summary line.
    pub fn render(&self) -> String {
        let resumed = if self.resumed_shards > 0 {
            format!(
                "; resumed after {} shard(s) of an interrupted run",
                self.resumed_shards
            )
        } else {
            String::new()
        };
        format!(
            "stored {} images in {} shard(s) at {} ({} kept as-is, {} re-encoded); {} skipped, {} ignored; {:.1} s, {:.0} images/s{resumed}\n",
            self.rows,
            self.shards,
            self.out,
            self.kept_original,
            self.reencoded,
            self.skipped,
            self.ignored,
            self.seconds,
            self.images_per_s,
        )
    }
}

/// Why one source item is not stored (its text goes into the manifest's `skipped`).
#[derive(Debug, thiserror::Error)]
pub(crate) enum SkipReason {
    #[error("unreadable: {0}")]
    Unreadable(std::io::Error),
    #[error("IDX data missing")]
    NoIdx,
    #[error("tar archive missing")]
    NoArchive,
    #[error("Parquet source missing")]
    NoParquet,
    #[error("no image bytes (a null image, or an image stored as a path only)")]
    NullImage,
    #[error("internal error (panic) while decoding")]
    Panic,
    /// A source file whose data cannot be read at all (a Parquet row group): the command
    /// stops naming it rather than skip all its rows.
    #[error("{0}")]
    SourceFile(String),
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
            let path = source
                .origin
                .archive(*archive)
                .ok_or(SkipReason::NoArchive)?;
            let bytes = crate::source::tarfile::read_member(path, *offset, *size)
                .map_err(SkipReason::Unreadable)?;
            Ok(prepare(&bytes, opts)?)
        }
        Src::Parquet { file, group, row } => {
            let Some(images) = source.origin.parquet() else {
                return Err(SkipReason::NoParquet);
            };
            let bytes = images
                .image(*file, *group, *row)
                .map_err(SkipReason::SourceFile)?
                .ok_or(SkipReason::NullImage)?;
            Ok(prepare(&bytes, opts)?)
        }
        Src::Idx(i) => {
            let Some(idx) = source.origin.idx() else {
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
/// and the rows of each [`crate::source::parquet::WINDOW`] consecutive row groups are
/// shuffled together (as the training loader's plan does), so that the workers need
/// only the row groups of one window in memory.
pub fn storage_order_for(source: &Source, seed: u64) -> Vec<usize> {
    let n = source.items.len();
    if source.origin.parquet().is_none() {
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
    for window in runs.chunks(crate::source::parquet::WINDOW) {
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
    let mut state = resumed.unwrap_or(Progress {
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
    let mut bar = Display::new(
        Mode::detect(opts.progress),
        "shard",
        n as u64,
        "images",
        start as u64,
    );
    let result = run_pool(Writer {
        source,
        out,
        opts,
        order: &order,
        state: &mut state,
        bar: &bar,
    });
    bar.finish();
    result?;
    let totals = write_manifest(source, out, &state, settings)?;
    let seconds = t0.elapsed().as_secs_f64();
    Ok(ShardSummary {
        command: "shard".into(),
        out: out.display().to_string(),
        rows: totals.rows,
        shards: state.shards.len(),
        classes: source.classes.len(),
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

/// Prepares the items from position `w.state.next_pos` of the storage order on: a
/// feeder hands positions to `opts.workers` workers (at most `64 × workers` ahead of
/// the writer), each reads and prepares its item, and `w` stores the results in order.
///
/// # Errors
/// As [`Writer::run`].
fn run_pool(w: Writer) -> Result<(), ShardError> {
    let (source, order, n) = (w.source, w.order, w.order.len());
    let start = w.state.next_pos;
    let prep = PrepareOptions {
        max_side: w.opts.max_side,
        quality: w.opts.quality,
    };
    let workers = w.opts.workers.max(1);
    let window = 64 * workers;
    let (job_tx, job_rx) = crossbeam_channel::bounded::<usize>(2 * workers);
    let (res_tx, res_rx) = crossbeam_channel::bounded::<write::Done>(window);
    let (tok_tx, tok_rx) = crossbeam_channel::bounded::<()>(window);
    for _ in 0..window {
        let _ = tok_tx.send(());
    }
    std::thread::scope(|s| {
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
        w.run(res_rx, tok_tx)
    })
}

/// Everything is written: the manifest makes the dataset complete, and the progress
/// file goes. Returns the dataset's totals.
///
/// # Errors
/// The manifest cannot be written, or no row was stored (the manifest then lists why).
fn write_manifest(
    source: &Source,
    out: &Path,
    state: &Progress,
    settings: Settings,
) -> Result<Totals, ShardError> {
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
            total: source.items.len() + source.skipped.len(),
            skipped: totals.skipped as usize,
            manifest: mpath,
        });
    }
    Ok(totals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_suffixes_and_refuse_zero() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size(" 1g "), Ok(1 << 30));
        assert_eq!(parse_size("2k"), Ok(2048));
        assert_eq!(parse_size("0M"), Err("size must be positive".into()));
        assert!(parse_size("lots").unwrap_err().starts_with("not a size"));
    }
}
