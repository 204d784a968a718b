//! `byol-tools bench`: shard throughput on generated ImageNet-sized JPEGs, next to the
//! bare per-image cost (the same `prepare` on bytes already in memory, same threads,
//! no files, ordering or Parquet around it), measured in the same run.

use std::path::{Path, PathBuf};
use std::time::Instant;

use opencv::core::{Mat, MatTraitConst};
use serde::{Deserialize, Serialize};

use crate::shard::{shard, ShardOptions};
use crate::source::{scan, Layout, ScanOptions, Source};
use byol_format::fs::FileError;
use byol_format::image::cv_err;
use byol_format::image::{encode_jpeg, prepare, PrepareOptions};
use byol_format::rng::SplitMix64;

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Image(#[from] byol_format::image::ImageError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    #[error(transparent)]
    Shard(#[from] crate::shard::ShardError),
    /// A measured step did not do what it should (the text says what).
    #[error("{0}")]
    Check(String),
}

/// What to benchmark: the generated images and the shard settings.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub images: usize,
    pub height: i32,
    pub width: i32,
    pub workers: usize,
    pub quality: u8,
    /// `--max-side` of the re-encoding case.
    pub resize_to: u32,
    /// Where to generate the images (a temporary folder when `None`).
    pub dir: Option<PathBuf>,
}

/// One measured case: shard throughput next to the bare per-image cost.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchCase {
    /// `keep` (valid baseline JPEGs stored as they are, after a decode check) or
    /// `resize-N` (decode, area-resize to N, re-encode).
    pub case: String,
    pub shard_images_per_s: f64,
    pub bare_images_per_s: f64,
    /// shard / bare: how much of the per-image ceiling the whole tool reaches.
    pub ratio: f64,
}

/// The `--json` report of `bench`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchReport {
    pub command: String,
    pub images: usize,
    pub height: i32,
    pub width: i32,
    pub workers: usize,
    pub mean_jpeg_bytes: f64,
    pub cases: Vec<BenchCase>,
    /// Shard throughput from an uncompressed tar of the same images (`keep` case, read
    /// in place) over that from the folder: 1.0 means the archive costs nothing.
    pub tar_vs_folder: f64,
}

impl BenchReport {
    /// The human-readable report.
    pub fn render(&self) -> String {
        let mut s = format!(
            "{} generated {}x{} JPEGs (mean {:.0} B), {} worker(s)\n",
            self.images, self.height, self.width, self.mean_jpeg_bytes, self.workers
        );
        for c in &self.cases {
            s += &format!(
                "  {:<12} shard {:>8.0} images/s   bare {:>8.0} images/s   ratio {:.2}\n",
                c.case, c.shard_images_per_s, c.bare_images_per_s, c.ratio
            );
        }
        s += &format!(
            "  from a tar (read in place) vs from the folder: {:.2}x\n",
            self.tar_vs_folder
        );
        s
    }
}

/// A photo-like test image: smooth colour fields, edges and noise, so JPEG sizes
/// are close to ImageNet's (about 100 KB at 500×375, quality 90).
///
/// # Errors
/// OpenCV fails to make or encode the image.
pub fn synthetic_image(h: i32, w: i32, seed: u64) -> Result<Mat, BenchError> {
    let mut r = SplitMix64::new(seed);
    let mut f =
        |lo: f64, hi: f64| lo + (hi - lo) * (r.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let (fx, fy, ph) = (
        f(0.005, 0.05),
        f(0.005, 0.05),
        f(0.0, std::f64::consts::TAU),
    );
    let (cx, cy, rad) = (
        f(0.2, 0.8) * w as f64,
        f(0.2, 0.8) * h as f64,
        f(0.1, 0.4) * h as f64,
    );
    let base = [f(40.0, 200.0), f(40.0, 200.0), f(40.0, 200.0)];
    let mut noise = SplitMix64::new(seed ^ 0xA5A5);
    let mut data = Vec::with_capacity((h * w * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            let (xf, yf) = (x as f64, y as f64);
            let wave = 50.0 * ((xf * fx + ph).sin() * (yf * fy).cos());
            let inside = ((xf - cx).powi(2) + (yf - cy).powi(2)).sqrt() < rad;
            for (c, b) in base.iter().enumerate() {
                let n = (noise.next_u64() % 41) as f64 - 20.0;
                let disc = if inside { 60.0 * (c as f64 - 1.0) } else { 0.0 };
                data.push((b + wave + disc + n).clamp(0.0, 255.0) as u8);
            }
        }
    }
    let m = Mat::new_rows_cols_with_data(h, w * 3, &data).map_err(cv_err)?;
    Ok(m.reshape(3, h)
        .map_err(cv_err)?
        .try_clone()
        .map_err(cv_err)?)
}

/// Writes `n` generated JPEGs into `dir/class-KK/NNNNNN.jpg` (round-robin over
/// `classes` folders) and returns their bytes.
///
/// # Errors
/// The folder or an image cannot be written.
pub fn write_synthetic_folder(
    dir: &Path,
    n: usize,
    (h, w): (i32, i32),
    quality: u8,
    classes: usize,
) -> Result<Vec<Vec<u8>>, BenchError> {
    let classes = classes.max(1);
    for c in 0..classes {
        let d = dir.join(format!("class-{c:02}"));
        std::fs::create_dir_all(&d).map_err(FileError::at("creating", &d))?;
    }
    let mut all = Vec::with_capacity(n);
    for i in 0..n {
        let img = synthetic_image(h, w, i as u64)?;
        if img.rows() != h {
            return Err(BenchError::Check(format!(
                "synthetic image {i} has {} rows, not {h}",
                img.rows()
            )));
        }
        let bytes = encode_jpeg(&img, quality)?;
        let p = dir
            .join(format!("class-{:02}", i % classes))
            .join(format!("{i:06}.jpg"));
        byol_format::fs::write_atomic(&p, &bytes)?;
        all.push(bytes);
    }
    Ok(all)
}

/// `prepare` over in-memory bytes on `workers` threads; images/s.
fn bare(images: &[Vec<u8>], opts: &PrepareOptions, workers: usize) -> Result<f64, BenchError> {
    let t0 = Instant::now();
    let failures: usize = std::thread::scope(|s| {
        let hs: Vec<_> = (0..workers)
            .map(|t| {
                s.spawn(move || {
                    (t..images.len())
                        .step_by(workers)
                        .filter(|&i| prepare(&images[i], opts).is_err())
                        .count()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or(usize::MAX)).sum()
    });
    if failures != 0 {
        return Err(BenchError::Check(format!(
            "{failures} generated images failed to prepare"
        )));
    }
    Ok(images.len() as f64 / t0.elapsed().as_secs_f64())
}

/// Shards `source` (read from `from`) into `dir/shards` with `o`'s settings and
/// `max_side`, and checks that all `expected` images were stored; images/s.
///
/// # Errors
/// Sharding fails, or stores another number of images.
fn timed_shard(
    o: &BenchOptions,
    dir: &Path,
    source: &Source,
    from: &Path,
    max_side: Option<u32>,
    expected: usize,
) -> Result<f64, BenchError> {
    let opts = ShardOptions {
        max_side,
        quality: o.quality,
        rows_per_shard: None,
        shard_bytes: Some(64 << 20),
        row_group_rows: 256,
        workers: o.workers,
        seed: 0,
        force: true,
        progress: false,
    };
    let t0 = Instant::now();
    let out = dir.join("shards");
    let summary = shard(source, &from.display().to_string(), &out, &opts)?;
    let rate = summary.rows as f64 / t0.elapsed().as_secs_f64();
    if summary.rows as usize != expected {
        return Err(BenchError::Check(format!(
            "shard from {} stored {} of {}",
            from.display(),
            summary.rows,
            expected
        )));
    }
    Ok(rate)
}

/// Writes the folder `src` as the uncompressed tar `tar_path` (synced).
fn write_tar(src: &Path, tar_path: &Path) -> std::io::Result<()> {
    let mut b = tar::Builder::new(std::fs::File::create(tar_path)?);
    b.append_dir_all(".", src)?;
    b.into_inner()?.sync_all()
}

/// Runs the benchmark: generated images sharded from a folder (kept, and resized) and
/// from a tar, each next to the bare per-image cost.
///
/// # Errors
/// The synthetic images cannot be made, or a measured step fails its check.
pub fn run(o: &BenchOptions) -> Result<BenchReport, BenchError> {
    let tmp;
    let dir = match &o.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempdir()?;
            tmp.0.clone()
        }
    };
    let src = dir.join("synthetic");
    let images = write_synthetic_folder(&src, o.images, (o.height, o.width), o.quality, 1)?;
    let mean = images.iter().map(|b| b.len()).sum::<usize>() as f64 / images.len().max(1) as f64;
    let source = scan(&src, &Layout::ImageFolder, &ScanOptions::default())?;
    let timed_shard = |source: &Source, from: &Path, max_side| {
        timed_shard(o, &dir, source, from, max_side, images.len())
    };
    let mut cases = Vec::new();
    for max_side in [None, Some(o.resize_to)] {
        let prep = PrepareOptions {
            max_side,
            quality: o.quality,
        };
        // Warm the page cache and OpenCV once, then measure.
        let _ = bare(&images[..images.len().min(8)], &prep, 1);
        let bare_rate = bare(&images, &prep, o.workers)?;
        let shard_rate = timed_shard(&source, &src, max_side)?;
        cases.push(BenchCase {
            case: match max_side {
                None => "keep".into(),
                Some(m) => format!("resize-{m}"),
            },
            shard_images_per_s: shard_rate,
            bare_images_per_s: bare_rate,
            ratio: shard_rate / bare_rate,
        });
    }
    // The same images as one uncompressed tar of class folders, sharded in place.
    let tar_path = dir.join("synthetic.tar");
    write_tar(&src, &tar_path).map_err(FileError::at("writing", &tar_path))?;
    let tar_source = scan(&tar_path, &Layout::Tar, &ScanOptions::default())?;
    let tar_rate = timed_shard(&tar_source, &tar_path, None)?;
    let (folder_rate, keep_bare) = (cases[0].shard_images_per_s, cases[0].bare_images_per_s);
    cases.push(BenchCase {
        case: "keep-tar".into(),
        shard_images_per_s: tar_rate,
        bare_images_per_s: keep_bare,
        ratio: tar_rate / keep_bare,
    });
    Ok(BenchReport {
        tar_vs_folder: tar_rate / folder_rate,
        command: "bench".into(),
        images: images.len(),
        height: o.height,
        width: o.width,
        workers: o.workers,
        mean_jpeg_bytes: mean,
        cases,
    })
}

/// A temporary folder removed on drop (avoids a runtime dependency on `tempfile`).
struct TmpDir(PathBuf);

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir() -> Result<TmpDir, BenchError> {
    let base = std::env::temp_dir().join(format!("byol-tools-bench-{}", std::process::id()));
    std::fs::create_dir_all(&base).map_err(FileError::at("creating", &base))?;
    Ok(TmpDir(base))
}
