//! `byol bench augment`: the two views per sample against a baseline in the same run.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use anyhow::Result;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use byol_pipeline::augment::{AugmentConfig, Augmenter, SplitMix64};

#[derive(Debug, Serialize)]
pub struct AugmentBench {
    pub command: String,
    pub device: String,
    pub batch: i64,
    pub canvas: i64,
    pub size: i64,
    pub seconds: f64,
    /// Samples per second, each sample giving both views.
    pub images_per_s: f64,
    /// Views per second (2 × images).
    pub views_per_s: f64,
    /// CPU only, without `--data`: the same with the batched tensor ops instead of the
    /// fused per-sample colour stages, and the ratio fused ÷ tensor.
    pub tensor_path_images_per_s: Option<f64>,
    pub ratio_to_tensor_path: Option<f64>,
    /// With `--data`: the loader feeding the augmentation, end to end.
    pub data: Option<String>,
    pub decode_threads: Option<usize>,
    /// Share of the time the augmentation waited for the loader.
    pub data_stall: Option<f64>,
    /// libtorch's intra-op threads, which make the views on the CPU (`--threads`).
    pub view_threads: usize,
    /// With `--reference`: the same two views made by other tools from the same shards,
    /// with the same thread count, measured after byol in the same run.
    pub references: Vec<ReferenceRate>,
}

/// Restricts this process (and the reference scripts it starts, which inherit it) to
/// `n` of the cores it may run on, so that every tool of a comparison gets the same
/// cores; returns how many it runs on.
///
/// # Errors
/// The affinity cannot be read or set.
pub fn pin_to_cores(n: usize) -> Result<usize> {
    // Safety: a zeroed cpu_set_t is a valid empty set; the calls only read and write it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let size = std::mem::size_of::<libc::cpu_set_t>();
        anyhow::ensure!(
            libc::sched_getaffinity(0, size, &mut set) == 0,
            "reading the CPU affinity: {}",
            std::io::Error::last_os_error()
        );
        let allowed: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect();
        if n == 0 || n >= allowed.len() {
            return Ok(allowed.len());
        }
        let mut pinned: libc::cpu_set_t = std::mem::zeroed();
        for &c in &allowed[..n] {
            libc::CPU_SET(c, &mut pinned);
        }
        anyhow::ensure!(
            libc::sched_setaffinity(0, size, &pinned) == 0,
            "pinning to {n} cores: {}",
            std::io::Error::last_os_error()
        );
        Ok(n)
    }
}

/// Another tool's two-view rate on the same data, threads, batch and size.
#[derive(Debug, Serialize)]
pub struct ReferenceRate {
    /// `torchvision` or `dali`.
    pub name: String,
    pub images_per_s: f64,
    /// byol's images/s ÷ this tool's.
    pub byol_ratio: f64,
    /// The script's own JSON report.
    pub report: serde_json::Value,
}

/// The reference tools `byol bench augment --reference` knows: name, script, the
/// script's thread-count option, and the Python that runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Reference {
    /// A torchvision DataLoader (`--workers` processes), the project's venv.
    Torchvision,
    /// NVIDIA DALI's CPU pipeline (`num_threads`), `.venv-dali` (made by `make bench`),
    /// the colour-jitter order random per sample as torchvision's and byol's.
    Dali,
    /// The same with DALI's usual single `color_twist` (fixed order, contrast about
    /// grey 128): cheaper, not the same augmentation.
    DaliFixed,
}

impl Reference {
    pub fn name(self) -> &'static str {
        match self {
            Reference::Torchvision => "torchvision",
            Reference::Dali => "dali",
            Reference::DaliFixed => "dali-fixed",
        }
    }

    /// The interpreter that runs this tool's script.
    ///
    /// # Errors
    /// DALI's default `.venv-dali` is missing (says how to make it).
    pub fn python(self) -> Result<std::path::PathBuf> {
        match self {
            Reference::Torchvision => Ok(crate::commands::default_python()),
            Reference::Dali | Reference::DaliFixed => {
                if let Some(p) = std::env::var_os("BYOL_DALI_PYTHON") {
                    return Ok(p.into());
                }
                let py = crate::commands::project_path(".venv-dali/bin/python");
                anyhow::ensure!(
                    py.exists(),
                    "DALI's Python {} is missing: `scripts/setup_dali` (or `make bench`) makes it, or set BYOL_DALI_PYTHON",
                    py.display()
                );
                Ok(py)
            }
        }
    }

    /// Runs this tool on `data` with `threads` threads; `byol` is byol's images/s.
    ///
    /// # Errors
    /// Its interpreter is missing (see [`Reference::python`]), or the script fails.
    pub fn measure(
        self,
        data: &Path,
        (batch, cfg, threads, seconds): (usize, &AugmentConfig, usize, f64),
        byol: f64,
    ) -> Result<ReferenceRate> {
        let py = self.python()?;
        let (script, threads_flag) = match self {
            Reference::Torchvision => ("torchvision_two_views.py", "--workers"),
            Reference::Dali | Reference::DaliFixed => ("dali_two_views.py", "--threads"),
        };
        let script = byol_trainer::bench::reference_script(script);
        // The same settings on both sides: the augmentation as JSON (AugmentConfig's
        // fields, as in a config's [augment] section).
        let settings = std::env::temp_dir().join(format!(
            "byol-bench-augment-{}-{}.json",
            std::process::id(),
            self.name()
        ));
        byol_format::fs::write_atomic(&settings, serde_json::to_string(cfg)?.as_bytes())?;
        let args: Vec<std::ffi::OsString> = vec![
            "--data".into(),
            data.into(),
            "--batch".into(),
            batch.to_string().into(),
            "--augment".into(),
            settings.clone().into(),
            threads_flag.into(),
            threads.to_string().into(),
            "--seconds".into(),
            seconds.to_string().into(),
            "--json".into(),
        ];
        let mut args = args;
        if self == Reference::DaliFixed {
            args.extend(["--jitter-order".into(), "fixed".into()]);
        }
        let report = byol_trainer::bench::run_reference(&py, &script, &args);
        let _ = std::fs::remove_file(&settings);
        let report = report?;
        let images_per_s = report["images_per_s"]
            .as_f64()
            .with_context(|| format!("{} reported no images_per_s", script.display()))?;
        Ok(ReferenceRate {
            name: self.name().into(),
            images_per_s,
            byol_ratio: byol / images_per_s,
            report,
        })
    }
}

use byol_trainer::bench::sync;

/// Views/s on random canvases (no data) on the current device.
///
/// # Errors
/// A tch operation fails.
pub fn bench_synthetic(
    batch: i64,
    canvas: i64,
    seconds: f64,
    cfg: AugmentConfig,
) -> Result<AugmentBench> {
    let dev = Device::cuda_if_available();
    let canv =
        (Tensor::rand([batch, 3, canvas, canvas], (Kind::Float, dev)) * 255.0).to_kind(Kind::Uint8);
    let mut r = SplitMix64::new(0);
    let valid: Vec<(i32, i32)> = (0..batch)
        .map(|_| {
            let a = canvas as i32 - (r.below(canvas as u64 / 3)) as i32;
            if r.bernoulli(0.5) {
                (a, canvas as i32)
            } else {
                (canvas as i32, a)
            }
        })
        .collect();
    let mut aug = Augmenter::new(cfg);
    let size = aug.cfg.size;
    let mut rate = |aug: &Augmenter| {
        // Warm-up (kernel selection, allocator).
        let _ = aug.views(&canv, &valid, &mut r);
        sync(dev);
        let t0 = Instant::now();
        let mut n = 0i64;
        while t0.elapsed() < Duration::from_secs_f64(seconds) || n == 0 {
            let (a, b) = aug.views(&canv, &valid, &mut r);
            let _ = std::hint::black_box((a, b));
            n += batch;
            if dev.is_cuda() && n % (batch * 8) == 0 {
                sync(dev);
            }
        }
        sync(dev);
        let s = t0.elapsed().as_secs_f64();
        (n as f64 / s, s)
    };
    let (images_per_s, s) = rate(&aug);
    // On the CPU, the batched tensor path too (what a GPU runs), in the same run.
    let tensor = (dev == Device::Cpu).then(|| {
        aug.fused_cpu = false;
        rate(&aug).0
    });
    Ok(AugmentBench {
        command: "bench augment".into(),
        device: format!("{dev:?}"),
        batch,
        canvas,
        size,
        seconds: s,
        images_per_s,
        views_per_s: 2.0 * images_per_s,
        tensor_path_images_per_s: tensor,
        ratio_to_tensor_path: tensor.map(|t| images_per_s / t),
        data: None,
        decode_threads: None,
        data_stall: None,
        view_threads: tch::get_num_threads() as usize,
        references: Vec::new(),
    })
}

/// Shards in, both views out: the loader feeding the augmentation.
///
/// # Errors
/// The dataset cannot be opened or the loader fails.
#[cfg(feature = "opencv")]
pub fn bench_data(
    data: &Path,
    batch: usize,
    canvas: usize,
    threads: usize,
    seconds: f64,
    cfg: AugmentConfig,
) -> Result<AugmentBench> {
    use byol_pipeline::{opencv_decoder, Cursor, Dataset, Loader, LoaderConfig};
    let dev = Device::cuda_if_available();
    let ds = Dataset::open(data).with_context(|| format!("opening {}", data.display()))?;
    let lc = LoaderConfig {
        batch,
        canvas,
        decode_threads: threads,
        ..LoaderConfig::default()
    };
    let loader = Loader::new(ds, lc, opencv_decoder())?;
    anyhow::ensure!(loader.batches_per_epoch() > 0, "fewer rows than one batch");
    let aug = Augmenter::new(cfg);
    let size = aug.cfg.size;
    let mut rng = SplitMix64::new(0);
    let mut n = 0usize;
    let mut t0: Option<Instant> = None;
    let mut wait0 = 0.0;
    let mut epoch = 0;
    'outer: loop {
        for b in loader.start(Cursor { epoch, consumed: 0 }) {
            let mut b = b?;
            let canv = b.to_device(dev);
            let (v1, v2) = aug.views(&canv, b.valid_sizes(), &mut rng);
            let _ = std::hint::black_box((v1, v2));
            match t0 {
                None => {
                    sync(dev);
                    t0 = Some(Instant::now());
                    wait0 = loader.stats().consumer_wait_s;
                }
                Some(t) => {
                    n += b.len();
                    if t.elapsed().as_secs_f64() >= seconds {
                        break 'outer;
                    }
                }
            }
        }
        epoch += 1;
    }
    sync(dev);
    let s = t0.map(|t| t.elapsed().as_secs_f64()).unwrap_or(1.0);
    let stall = (loader.stats().consumer_wait_s - wait0) / s;
    Ok(AugmentBench {
        command: "bench augment".into(),
        device: format!("{dev:?}"),
        batch: batch as i64,
        canvas: canvas as i64,
        size,
        seconds: s,
        images_per_s: n as f64 / s,
        views_per_s: 2.0 * n as f64 / s,
        tensor_path_images_per_s: None,
        ratio_to_tensor_path: None,
        data: Some(data.display().to_string()),
        decode_threads: Some(threads),
        data_stall: Some(stall),
        view_threads: tch::get_num_threads() as usize,
        references: Vec::new(),
    })
}
