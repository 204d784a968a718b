//! `byol bench train`: training images/s (an image = both views) against the
//! compute-only ceiling and a plain PyTorch BYOL script, measured in the same run.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::error::{Context, Result};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use byol_pipeline::augment::{Augmenter, SplitMix64};
use byol_pipeline::loader::DecodeFn;
use byol_pipeline::{Cursor, Dataset, Loader};

use crate::byol::{channels_last, train_step, Network, Optimizer, StepSettings};
use crate::config::TrainConfig;
use crate::train::{BatchPlan, Runtime};

#[derive(Debug, Serialize)]
pub struct TrainBench {
    pub command: String,
    pub device: String,
    pub batch: usize,
    pub size: i64,
    pub steps: usize,
    /// `bf16` or `fp32` (the config's `train.precision` resolved on this machine), and why.
    pub precision: String,
    pub precision_reason: String,
    /// Steps on two fixed views already on the device: model compute alone.
    pub compute_images_per_s: f64,
    /// Augmentation + step on random canvases already on the device (`--synthetic`).
    pub synthetic_images_per_s: f64,
    /// Shards → loader → augmentation → step (`--data`).
    pub data_images_per_s: Option<f64>,
    pub data_stall: Option<f64>,
    /// data (or synthetic) images/s ÷ compute-only images/s.
    pub ratio_to_compute: f64,
    /// The PyTorch reference script's output, when it ran.
    pub reference: Option<serde_json::Value>,
    /// compute-only images/s ÷ the reference's.
    pub ratio_to_reference: Option<f64>,
}

/// Waits for the device's queued work (no-op on the CPU).
pub fn sync(dev: Device) {
    if let Device::Cuda(i) = dev {
        tch::Cuda::synchronize(i as i64);
    }
}

struct Model {
    online: Network,
    target: Network,
    opt: Optimizer,
}

fn model(cfg: &TrainConfig, device: Device) -> Model {
    let (online, target, opt) = crate::train::build_model(cfg, device);
    Model {
        online,
        target,
        opt,
    }
}

/// Times `steps` calls of `f` after `warmup` untimed ones; returns images/s.
fn timed(
    batch: usize,
    warmup: usize,
    steps: usize,
    dev: Device,
    mut f: impl FnMut() -> Result<Tensor>,
) -> Result<f64> {
    for _ in 0..warmup {
        let _ = f()?;
    }
    sync(dev);
    let t0 = Instant::now();
    let mut last = None;
    for _ in 0..steps {
        last = Some(f()?);
    }
    if let Some(l) = last {
        l.double_value(&[]);
    }
    sync(dev);
    Ok((steps * batch) as f64 / t0.elapsed().as_secs_f64())
}

/// # Errors
/// The data cannot be opened, a step fails, or the PyTorch reference script fails.
pub fn bench_train(
    cfg: &TrainConfig,
    steps: usize,
    data: Option<&Path>,
    decode: Option<DecodeFn>,
    python: Option<&Path>,
) -> Result<TrainBench> {
    // One process: the runtime and batch plan `byol train` would use without torchrun.
    let rt = Runtime::local(&cfg.train)?;
    rt.warn_precision();
    let plan = BatchPlan::new(cfg.train.batch, &rt)?;
    let dev = rt.device;
    let b = plan.global;
    let size = cfg.augment.size;
    let warmup = 3;
    let choice = &rt.precision;
    let amp = choice.dtype;
    let st = StepSettings {
        lr: 0.1,
        tau: 0.99,
        amp,
    };
    let cl = |t: Tensor| {
        if cfg.train.channels_last {
            channels_last(&t)
        } else {
            t
        }
    };

    // 1. Compute only: fixed views on the device.
    let mut m = model(cfg, dev);
    let v1 = cl(Tensor::randn([b as i64, 3, size, size], (Kind::Float, dev)));
    let v2 = cl(Tensor::randn([b as i64, 3, size, size], (Kind::Float, dev)));
    let compute = timed(b, warmup, steps, dev, || {
        Ok(train_step(&m.online, &m.target, &mut m.opt, &v1, &v2, st).0)
    })?;

    // 2. Synthetic canvases: augmentation + step.
    let mut m = model(cfg, dev);
    let canvas = cfg.data.canvas as i64;
    let canv = (Tensor::rand([b as i64, 3, canvas, canvas], (Kind::Float, dev)) * 255.0)
        .to_kind(Kind::Uint8);
    let valid = vec![(canvas as i32, canvas as i32); b];
    let aug = Augmenter::new(cfg.augment.clone());
    let mut rng = SplitMix64::new(0);
    let synthetic = timed(b, warmup, steps, dev, || {
        let (a, c) = aug.views(&canv, &valid, &mut rng);
        Ok(train_step(&m.online, &m.target, &mut m.opt, &cl(a), &cl(c), st).0)
    })?;

    // 3. Real data through the loader.
    let (data_rate, stall) = match (data, decode) {
        (Some(d), Some(dec)) => {
            let (r, s) = time_data(cfg, &plan, d, dec, (warmup, steps), (st, dev))?;
            (Some(r), Some(s))
        }
        _ => (None, None),
    };

    // 4. The PyTorch reference, same config, same device.
    let reference = match python {
        Some(py) => Some(reference(cfg, py, (warmup, steps), amp.is_some())?),
        None => None,
    };
    let ratio_to_reference = reference
        .as_ref()
        .and_then(|r| r["images_per_s"].as_f64())
        .map(|r| compute / r);
    Ok(TrainBench {
        command: "bench train".into(),
        device: format!("{dev:?}"),
        batch: b,
        size,
        steps,
        precision: choice.name.into(),
        precision_reason: choice.reason.clone(),
        compute_images_per_s: compute,
        synthetic_images_per_s: synthetic,
        data_images_per_s: data_rate,
        data_stall: stall,
        ratio_to_compute: data_rate.unwrap_or(synthetic) / compute,
        reference,
        ratio_to_reference,
    })
}

/// Shards `d` → loader → augmentation → step, timed for `steps` after `warmup`:
/// (images/s, the share of the time the step waited for data).
fn time_data(
    cfg: &TrainConfig,
    plan: &BatchPlan,
    d: &Path,
    dec: DecodeFn,
    (warmup, steps): (usize, usize),
    (st, dev): (StepSettings, Device),
) -> Result<(f64, f64)> {
    let b = plan.global;
    let aug = Augmenter::new(cfg.augment.clone());
    let mut rng = SplitMix64::new(0);
    let cl = |t: Tensor| {
        if cfg.train.channels_last {
            channels_last(&t)
        } else {
            t
        }
    };
    let mut m = model(cfg, dev);
    let ds = Dataset::open(d).with_context(|| format!("opening {}", d.display()))?;
    let lc = plan.loader_config(cfg);
    let loader = Loader::new(ds, lc, dec)?;
    if loader.batches_per_epoch() == 0 {
        crate::bail!("{}: fewer rows than one batch", d.display());
    }
    let mut epoch = 0;
    let mut it = loader.start(Cursor { epoch, consumed: 0 });
    let mut wait0 = 0.0;
    let mut t0 = Instant::now();
    let mut done = 0;
    let mut last = None;
    while done < steps + warmup {
        let batch = match it.next() {
            Some(x) => x?,
            None => {
                epoch += 1;
                it = loader.start(Cursor { epoch, consumed: 0 });
                continue;
            }
        };
        let mut batch = batch;
        let c = batch.to_device(dev);
        let (a, v) = aug.views(&c, batch.valid_sizes(), &mut rng);
        last = Some(train_step(&m.online, &m.target, &mut m.opt, &cl(a), &cl(v), st).0);
        done += 1;
        if done == warmup {
            sync(dev);
            t0 = Instant::now();
            wait0 = loader.stats().consumer_wait_s;
        }
    }
    if let Some(l) = last {
        l.double_value(&[]);
    }
    sync(dev);
    let s = t0.elapsed().as_secs_f64();
    Ok((
        (steps * b) as f64 / s,
        ((loader.stats().consumer_wait_s - wait0) / s).clamp(0.0, 1.0),
    ))
}

/// Runs `benches/reference/byol_torch.py` with `py` on the effective config (after
/// `--set`), the same steps and precision; returns its JSON line.
fn reference(
    cfg: &TrainConfig,
    py: &Path,
    (warmup, steps): (usize, usize),
    bf16: bool,
) -> Result<serde_json::Value> {
    let script = reference_script("byol_torch.py");
    // The effective config (after --set), so both sides run the same settings.
    let eff = std::env::temp_dir().join(format!("byol-bench-{}.toml", std::process::id()));
    byol_format::fs::write_atomic(&eff, cfg.to_toml().as_bytes())?;
    let mut args: Vec<std::ffi::OsString> = vec!["--config".into(), eff.clone().into()];
    for a in [
        "--steps",
        &steps.to_string(),
        "--warmup",
        &warmup.to_string(),
        "--precision",
        if bf16 { "bf16" } else { "fp32" },
        "--json",
    ] {
        args.push(a.into());
    }
    if cfg.train.channels_last {
        args.push("--channels-last".into());
    }
    let r = run_reference(py, &script, &args);
    let _ = std::fs::remove_file(&eff);
    r
}

/// `benches/reference/NAME`: from the working directory when run in a checkout, else
/// next to this crate's sources.
pub fn reference_script(name: &str) -> PathBuf {
    let local = Path::new("benches/reference").join(name);
    if local.exists() {
        local
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../benches/reference")
            .join(name)
    }
}

/// Runs a reference script with `py` and `args`; returns the JSON object its standard
/// output ends with.
///
/// # Errors
/// The interpreter cannot be started, the script fails (its standard error is quoted),
/// or its last line is not JSON.
pub fn run_reference(
    py: &Path,
    script: &Path,
    args: &[std::ffi::OsString],
) -> Result<serde_json::Value> {
    let o = std::process::Command::new(py)
        .arg(script)
        .args(args)
        .output()
        .with_context(|| format!("running {} {}", py.display(), script.display()))?;
    if !o.status.success() {
        crate::bail!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&o.stderr).trim_end()
        );
    }
    let last = o
        .stdout
        .trim_ascii()
        .rsplit(|&b| b == b'\n')
        .next()
        .unwrap_or_default();
    serde_json::from_slice::<serde_json::Value>(last).with_context(|| {
        format!(
            "{} printed no JSON line: {}",
            script.display(),
            String::from_utf8_lossy(&o.stdout)
        )
    })
}
