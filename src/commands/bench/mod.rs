//! `byol bench train | augment | pipeline`: each reports a ratio against a baseline
//! measured in the same run. One module per benchmark: `byol bench train` is
//! `byol_trainer::bench`, [`augment`] and [`pipeline`] are here.

pub mod augment;
#[cfg(feature = "opencv")]
pub mod pipeline;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use byol_format::cli::emit;

#[derive(clap::Subcommand)]
pub enum BenchCmd {
    /// Training images/s: compute only, with augmentation on random canvases
    /// (--synthetic, always measured), with --data the whole pipeline; and a plain
    /// PyTorch BYOL script with the same config on the same device.
    Train {
        #[arg(long)]
        config: PathBuf,
        #[arg(long = "set")]
        sets: Vec<String>,
        /// Feed random canvases instead of shards (the default without --data).
        #[arg(long)]
        synthetic: bool,
        #[arg(long, conflicts_with = "synthetic")]
        data: Option<PathBuf>,
        #[arg(long, default_value_t = 20)]
        steps: usize,
        /// Python with torch for the reference [default: $BYOL_PYTHON, the venv's, python3].
        #[arg(long)]
        python: Option<PathBuf>,
        #[arg(long)]
        no_reference: bool,
        #[arg(long)]
        json: bool,
    },
    /// Two-view augmentation throughput on the current device; with --data, the loader
    /// feeding it (shards in, both views out).
    Augment {
        /// Take the augmentation settings and the canvas from this training config
        /// (e.g. a preset in configs/) [default: BYOL's settings at 224 px].
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override a value of --config, e.g. --set augment.interpolation=bicubic
        /// (repeatable).
        #[arg(long = "set", requires = "config")]
        sets: Vec<String>,
        #[arg(long, default_value_t = 256)]
        batch: usize,
        /// View side [default: the config's, else 224].
        #[arg(long)]
        size: Option<i64>,
        /// Canvas side [default: the config's, else 256].
        #[arg(long)]
        canvas: Option<usize>,
        #[arg(long)]
        data: Option<PathBuf>,
        /// Threads [default: all cores]: byol's decode threads (with --data) and the
        /// views' threads, DALI's num_threads, torchvision's DataLoader workers.
        #[arg(long)]
        threads: Option<usize>,
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
        /// With --data: also measure these tools making the same two views from the
        /// same shards with as many threads, in the same run (comma-separated).
        #[arg(long, value_enum, value_delimiter = ',', requires = "data")]
        reference: Vec<augment::Reference>,
        #[arg(long)]
        json: bool,
    },
    /// The loader alone (no model) vs the bare decode + fit-to-canvas ceiling.
    #[cfg(feature = "opencv")]
    Pipeline {
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value_t = 256)]
        canvas: usize,
        #[arg(long, default_value_t = 256)]
        batch: usize,
        /// Decode threads [default: all cores].
        #[arg(long)]
        threads: Option<usize>,
        #[arg(long, default_value_t = 30.0)]
        seconds: f64,
        #[arg(long)]
        json: bool,
    },
}

/// # Errors
/// The benchmark's own errors (unreadable config or data, a failing step).
pub fn run(cmd: BenchCmd) -> Result<ExitCode> {
    match cmd {
        BenchCmd::Train {
            config,
            sets,
            synthetic: _,
            data,
            steps,
            python,
            no_reference,
            json,
        } => train(config, sets, data, steps, python, no_reference, json),
        BenchCmd::Augment {
            config,
            sets,
            batch,
            size,
            canvas,
            data,
            threads,
            seconds,
            reference,
            json,
        } => {
            let (mut cfg, mut canv) = (byol_pipeline::augment::AugmentConfig::default(), 256);
            if let Some(c) = &config {
                let t = super::read_config(c, &sets)?;
                (cfg, canv) = (t.augment, t.data.canvas);
            }
            cfg.size = size.unwrap_or(cfg.size);
            augment(
                (batch, cfg, canvas.unwrap_or(canv)),
                data,
                threads,
                seconds,
                &reference,
                json,
            )
        }
        #[cfg(feature = "opencv")]
        BenchCmd::Pipeline {
            data,
            canvas,
            batch,
            threads,
            seconds,
            json,
        } => {
            let threads = threads.unwrap_or_else(byol_format::cores);
            let r = pipeline::run(&data, canvas, batch, threads, seconds)?;
            emit(json, &r, || {
                format!(
                    "pipeline {:.0} images/s, bare ceiling {:.0} images/s, ratio {:.2}; decode only {:.0} images/s; \
                     {} thread(s), canvas {}, batch {}; loader peak RSS {:.0} MiB; {} decode failure(s)\n",
                    r.pipeline_images_per_s,
                    r.bare_images_per_s,
                    r.ratio,
                    r.decode_only_images_per_s,
                    r.threads,
                    r.canvas,
                    r.batch,
                    r.loader_peak_rss_mib,
                    r.decode_failures
                )
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn train(
    config: PathBuf,
    sets: Vec<String>,
    data: Option<PathBuf>,
    steps: usize,
    python: Option<PathBuf>,
    no_reference: bool,
    json: bool,
) -> Result<ExitCode> {
    let cfg = super::read_config(&config, &sets)?;
    #[cfg(feature = "opencv")]
    let decode = Some(byol_pipeline::opencv_decoder());
    #[cfg(not(feature = "opencv"))]
    let decode: Option<byol_pipeline::loader::DecodeFn> = None;
    if data.is_some() && decode.is_none() {
        anyhow::bail!("--data needs a build with the `opencv` feature; use --synthetic");
    }
    let py = (!no_reference).then(|| python.unwrap_or_else(super::default_python));
    let r = byol_trainer::bench::bench_train(&cfg, steps, data.as_deref(), decode, py.as_deref())?;
    emit(json, &r, || {
        format!(
            "{} {} batch {} size {}: compute only {:.1} images/s; with augmentation {:.1}{}; ratio to compute {:.2}{}\n",
            r.device,
            r.precision,
            r.batch,
            r.size,
            r.compute_images_per_s,
            r.synthetic_images_per_s,
            match (r.data_images_per_s, r.data_stall) {
                (Some(d), Some(s)) => format!("; from shards {d:.1} (stall {:.0} %)", 100.0 * s),
                _ => String::new(),
            },
            r.ratio_to_compute,
            match (&r.reference, r.ratio_to_reference) {
                (Some(v), Some(x)) => format!(
                    "; PyTorch reference {:.1} images/s, byol/PyTorch {x:.2}",
                    v["images_per_s"].as_f64().unwrap_or(0.0)
                ),
                _ => String::new(),
            }
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

fn augment(
    (batch, cfg, canvas): (usize, byol_pipeline::augment::AugmentConfig, usize),
    data: Option<PathBuf>,
    threads: Option<usize>,
    seconds: f64,
    references: &[augment::Reference],
    json: bool,
) -> Result<ExitCode> {
    #[cfg(feature = "opencv")]
    use augment::bench_data;
    use augment::bench_synthetic;
    let threads = threads.unwrap_or_else(byol_format::cores);
    // The views' threads too; and the same cores for every tool: byol's decode and view
    // threads run side by side, so the fair unit is the core, not the thread.
    tch::set_num_threads(threads as i32);
    let cpus = augment::pin_to_cores(threads)?;
    // Every reference's interpreter is there before byol's own measurement.
    for reference in references {
        reference.python()?;
    }
    let mut r = match &data {
        #[cfg(feature = "opencv")]
        Some(d) => bench_data(d, batch, canvas, threads, seconds, cfg.clone())?,
        #[cfg(not(feature = "opencv"))]
        Some(_) => anyhow::bail!("--data needs a build with the `opencv` feature"),
        None => bench_synthetic(batch as i64, canvas as i64, seconds, cfg.clone())?,
    };
    if let Some(d) = &data {
        for reference in references {
            eprintln!(
                "byol: measuring {} on the same shards ({threads} threads)",
                reference.name()
            );
            let m = reference.measure(d, (batch, &cfg, threads, seconds), r.images_per_s)?;
            r.references.push(m);
        }
    }
    emit(json, &r, || {
        let mut out = format!(
            "{:.0} images/s ({:.0} views/s) on {} ({cpus} cores), batch {}, canvas {} -> {}{}\n",
            r.images_per_s,
            r.views_per_s,
            r.device,
            r.batch,
            r.canvas,
            r.size,
            match (&r.data, r.data_stall) {
                (Some(d), Some(s)) => format!(
                    ", from {d}, {threads} threads (data stall {:.0} %)",
                    100.0 * s
                ),
                _ => " (random canvases)".into(),
            }
        );
        if let (Some(t), Some(x)) = (r.tensor_path_images_per_s, r.ratio_to_tensor_path) {
            out += &format!("batched tensor path: {t:.0} images/s (fused is {x:.2}x)\n");
        }
        if !r.references.is_empty() {
            out += &format!("{:<12} {:>9}  {:>10}\n", "two views", "images/s", "byol is");
            out += &format!("{:<12} {:>9.0}  {:>10}\n", "byol", r.images_per_s, "");
            for m in &r.references {
                out += &format!(
                    "{:<12} {:>9.0}  {:>9.2}x\n",
                    m.name, m.images_per_s, m.byol_ratio
                );
            }
        }
        out
    })?;
    Ok(ExitCode::SUCCESS)
}
