//! `byol bench pipeline`: the loader alone against the bare per-image ceiling.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use byol_pipeline::decode::{decode_only, decode_to_canvas};
use byol_pipeline::{opencv_decoder, Cursor, Dataset, Loader, LoaderConfig};

#[derive(Debug, Serialize)]
pub struct PipelineBench {
    pub command: String,
    pub data: String,
    pub rows: u64,
    pub canvas: usize,
    pub batch: usize,
    pub threads: usize,
    pub seconds: f64,
    /// The whole loader: mapped shards → shuffled, decoded, batched canvases.
    pub pipeline_images_per_s: f64,
    /// Same decode + fit-to-canvas over bytes already in memory, same threads, no pipeline.
    pub bare_images_per_s: f64,
    pub ratio: f64,
    /// Decode alone (with the same DCT scaling), same threads.
    pub decode_only_images_per_s: f64,
    /// Peak resident memory of the process while the loader ran (MiB).
    pub loader_peak_rss_mib: f64,
    pub decode_failures: u64,
    pub stats: byol_pipeline::StatsSnapshot,
}

/// Peak resident set size (VmHWM) in MiB.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Resets the kernel's peak-RSS counter for this process (Linux).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Runs `f(i)` for i = 0, 1, 2, … on `threads` threads until `dur` passes; returns calls/s.
fn timed_parallel(threads: usize, dur: Duration, f: &(dyn Fn(usize, &mut Vec<u8>) + Sync)) -> f64 {
    let t0 = Instant::now();
    let counts: Vec<usize> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut scratch = Vec::new();
                    let mut i = t;
                    let mut n = 0;
                    while t0.elapsed() < dur {
                        f(i, &mut scratch);
                        i += threads;
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or(0)).collect()
    });
    counts.iter().sum::<usize>() as f64 / t0.elapsed().as_secs_f64()
}

/// # Errors
/// The dataset cannot be opened or the loader fails.
pub fn run(
    data: &Path,
    canvas: usize,
    batch: usize,
    threads: usize,
    seconds: f64,
) -> Result<PipelineBench> {
    let threads = threads.max(1);
    let cfg = LoaderConfig {
        batch,
        canvas,
        decode_threads: threads,
        slots: 4,
        drop_last: true,
        ..LoaderConfig::default()
    };
    let ds = Dataset::open(data).with_context(|| format!("opening {}", data.display()))?;
    let rows = ds.rows();
    let loader = Loader::new(ds, cfg, opencv_decoder())?;
    anyhow::ensure!(
        loader.batches_per_epoch() > 0,
        "{} has fewer rows ({rows}) than one batch ({batch})",
        data.display()
    );

    // 1. The loader alone, epoch after epoch, timed from the first batch on.
    reset_peak_rss();
    let dur = Duration::from_secs_f64(seconds);
    let mut epoch = 0;
    let mut images = 0usize;
    let mut t0: Option<Instant> = None;
    let mut checksum = 0i64;
    'outer: loop {
        for b in loader.start(Cursor { epoch, consumed: 0 }) {
            let b = b?;
            match t0 {
                None => t0 = Some(Instant::now()),
                Some(t) => {
                    images += b.len();
                    if t.elapsed() >= dur {
                        break 'outer;
                    }
                }
            }
            // Touch the batch as a consumer would (one value per sample).
            checksum += b.labels().iter().sum::<i64>();
        }
        epoch += 1;
    }
    let elapsed = t0.map(|t| t.elapsed().as_secs_f64()).unwrap_or(1.0);
    let pipeline_rate = images as f64 / elapsed;
    let loader_rss = peak_rss_mib();
    let stats = loader.stats();
    std::hint::black_box(checksum);

    // 2. The bare ceiling over the same images, in memory.
    let ds = loader.dataset();
    let mut samples: Vec<(Vec<u8>, i32, i32)> = Vec::new();
    let want = (images.max(batch)).min(4096).min(rows as usize);
    'load: for g in 0..ds.groups().len() {
        let lg = ds.load_group(g)?;
        for i in 0..lg.len() {
            samples.push((
                lg.images.value(i).to_vec(),
                lg.heights.value(i),
                lg.widths.value(i),
            ));
            if samples.len() >= want {
                break 'load;
            }
        }
    }
    let n = samples.len();
    let per = 3 * canvas * canvas;
    let half = Duration::from_secs_f64((seconds / 2.0).max(1.0));
    let bare = timed_parallel(threads, half, &|i, scratch| {
        if scratch.len() != per {
            scratch.resize(per, 0);
        }
        let (b, h, w) = &samples[i % n];
        let _ = decode_to_canvas(b, *h, *w, canvas, scratch);
    });
    let dec = timed_parallel(threads, half, &|i, _| {
        let (b, h, w) = &samples[i % n];
        let _ = decode_only(b, *h, *w, canvas);
    });
    Ok(PipelineBench {
        command: "bench pipeline".into(),
        data: data.display().to_string(),
        rows,
        canvas,
        batch,
        threads,
        seconds: elapsed,
        pipeline_images_per_s: pipeline_rate,
        bare_images_per_s: bare,
        ratio: pipeline_rate / bare,
        decode_only_images_per_s: dec,
        loader_peak_rss_mib: loader_rss,
        decode_failures: stats.decode_failures,
        stats,
    })
}
