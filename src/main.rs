//! `byol`: the trainer's command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use byol_tools::cli::{emit, out};
use clap::{Parser, Subcommand};

mod alloc;
mod augment_cmds;
#[cfg(feature = "opencv")]
mod bench_pipeline;

#[derive(Parser)]
#[command(
    name = "byol",
    version,
    about = "Streaming BYOL trainer: Parquet shards in, ONNX encoders out"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check the native runtimes: libtorch (CPU/CUDA) and ONNX Runtime.
    Info {
        /// libonnxruntime.so to load [default: $BYOL_ORT_DYLIB, $ORT_DYLIB_PATH, then the
        /// library scripts/setup installed].
        #[arg(long)]
        ort_lib: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Benchmarks; each reports a ratio against a baseline measured in the same run.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Train (or resume) a BYOL run.
    #[cfg(feature = "opencv")]
    Train {
        /// TOML config (required for a new run; on --resume compared with the run's).
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        data: PathBuf,
        /// Run folder: config.toml, metrics.jsonl, checkpoints/.
        #[arg(long)]
        out: PathBuf,
        /// Override a config value, e.g. --set optim.base_lr=0.3 (repeatable).
        #[arg(long = "set")]
        sets: Vec<String>,
        /// Stop (with a checkpoint) when the global step reaches N.
        #[arg(long)]
        max_steps: Option<u64>,
        /// Continue from the run's latest checkpoint.
        #[arg(long)]
        resume: bool,
        /// Labelled held-out shards for the kNN monitor (each `train.knn_every_epochs`).
        #[arg(long)]
        val: Option<PathBuf>,
        /// Fit a new run into this wall time (e.g. 20m, 1h30m, 90s): a short calibration
        /// measures this machine's speed and sets train.total_steps to what fits.
        #[arg(long, value_parser = parse_duration)]
        time_budget: Option<f64>,
        #[arg(long)]
        json: bool,
    },
    /// Export a run's online encoder to ONNX (BatchNorm folded, normalisation inside) and
    /// check it in ONNX Runtime against libtorch.
    Export {
        #[arg(long)]
        run: PathBuf,
        /// A checkpoint folder [default: the run's latest].
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        #[arg(long, default_value = "encoder.onnx")]
        out: PathBuf,
        /// Compare on the first 256 images of these shards instead of random images.
        #[cfg(feature = "opencv")]
        #[arg(long)]
        check_data: Option<PathBuf>,
        /// libonnxruntime.so [default: $BYOL_ORT_DYLIB, $ORT_DYLIB_PATH, the venv's].
        #[arg(long)]
        ort_lib: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Embed every image of a shard folder with an exported encoder (ONNX Runtime) into
    /// a Parquet file: row, key, label, embedding.
    #[cfg(feature = "opencv")]
    Embed {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value = "embeddings.parquet")]
        out: PathBuf,
        #[arg(long, default_value_t = 256)]
        batch: usize,
        /// Decode canvas [default: the model's byol.canvas metadata].
        #[arg(long)]
        canvas: Option<usize>,
        #[arg(long)]
        ort_lib: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Linear probe and kNN on frozen features: BYOL vs random init vs raw pixels.
    #[cfg(feature = "opencv")]
    Eval {
        #[arg(long)]
        run: PathBuf,
        #[arg(long)]
        train: PathBuf,
        #[arg(long)]
        test: PathBuf,
        /// A checkpoint folder [default: the run's latest].
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Write a grid of augmented pairs: each row the canvas, view 1 and view 2.
    #[cfg(feature = "opencv")]
    Preview {
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value = "views.png")]
        out: PathBuf,
        #[arg(long, default_value_t = 16)]
        n: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 256)]
        canvas: usize,
        /// Output side of the views.
        #[arg(long, default_value_t = 224)]
        size: i64,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
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
        #[arg(long, default_value_t = 256)]
        batch: usize,
        #[arg(long, default_value_t = 224)]
        size: i64,
        #[arg(long, default_value_t = 256)]
        canvas: usize,
        #[arg(long)]
        data: Option<PathBuf>,
        /// Decode threads with --data [default: all cores].
        #[arg(long)]
        threads: Option<usize>,
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
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

#[cfg(feature = "opencv")]
fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn default_python() -> PathBuf {
    if let Some(p) = std::env::var_os("BYOL_PYTHON") {
        return PathBuf::from(p);
    }
    let exe_root = std::env::current_exe().ok().and_then(|e| {
        e.parent()
            .and_then(|p| p.parent())
            .and_then(|p| p.parent())
            .map(|p| p.join(".venv/bin/python"))
    });
    match exe_root {
        Some(p) if p.exists() => p,
        _ => PathBuf::from("python3"),
    }
}

/// A duration such as `20m`, `1h30m` or `90s` (humantime's syntax), in seconds.
fn parse_duration(s: &str) -> Result<f64, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?}: {e} (expected a duration such as 20m, 1h30m, 90s)"))?;
    if d.is_zero() {
        return Err(format!("{s:?}: the budget must be longer than zero"));
    }
    Ok(d.as_secs_f64())
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Bench(BenchCmd::Train {
            config,
            sets,
            synthetic: _,
            data,
            steps,
            python,
            no_reference,
            json,
        }) => {
            let text = std::fs::read_to_string(&config)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", config.display()))?;
            let cfg = byol_trainer::config::TrainConfig::from_toml(&text, &sets)?;
            #[cfg(feature = "opencv")]
            let decode = Some(byol_pipeline::opencv_decoder());
            #[cfg(not(feature = "opencv"))]
            let decode: Option<byol_pipeline::loader::DecodeFn> = None;
            if data.is_some() && decode.is_none() {
                anyhow::bail!("--data needs a build with the `opencv` feature; use --synthetic");
            }
            #[cfg(feature = "opencv")]
            byol_tools::image::set_opencv_threads(1);
            let py = (!no_reference).then(|| python.unwrap_or_else(default_python));
            let r = byol_trainer::bench::bench_train(
                &cfg,
                steps,
                data.as_deref(),
                decode,
                py.as_deref(),
            )?;
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
                        (Some(v), Some(x)) => format!("; PyTorch reference {:.1} images/s, byol/PyTorch {x:.2}", v["images_per_s"].as_f64().unwrap_or(0.0)),
                        _ => String::new(),
                    }
                )
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Export {
            run: run_dir,
            checkpoint,
            out: path,
            #[cfg(feature = "opencv")]
            check_data,
            ort_lib,
            json,
        } => {
            let t = byol_trainer::eval::load_online(&run_dir, checkpoint.as_deref())?;
            #[cfg(feature = "opencv")]
            let check = match check_data {
                Some(d) => {
                    byol_tools::image::set_opencv_threads(1);
                    let (x, _) = byol_trainer::eval::load_inputs(
                        &d,
                        t.cfg.data.canvas,
                        t.cfg.augment.size,
                        byol_pipeline::opencv_decoder(),
                        Some(256),
                    )?;
                    Some((x, format!("images of {}", d.display())))
                }
                None => None,
            };
            #[cfg(not(feature = "opencv"))]
            let check = None;
            let r = byol_trainer::onnx::export_run(&run_dir, &t, &path, check, ort_lib.as_deref())?;
            emit(json, &r, || {
                format!(
                    "wrote {} ({} convolutions, {}-d embedding, {} px input, {:.1} MB) from {}\n\
                     ONNX Runtime vs libtorch on {} {}: max |diff| {:.2e} (max |value| {:.2e}), min cosine {:.6}; \
                     {:.3} vs {:.3} ms/image\n",
                    r.file.path,
                    r.file.convs,
                    r.file.dim,
                    r.file.size,
                    r.file.bytes as f64 / 1e6,
                    r.checkpoint,
                    r.check_images,
                    r.check_source,
                    r.max_abs_diff,
                    r.max_abs_value,
                    r.min_cosine,
                    r.ort_ms_per_image,
                    r.libtorch_ms_per_image
                )
            })?;
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "opencv")]
        Cmd::Embed {
            model,
            data,
            out: path,
            batch,
            canvas,
            ort_lib,
            json,
        } => {
            byol_tools::image::set_opencv_threads(1);
            let r = byol_trainer::onnx::embed(
                &model,
                &data,
                &path,
                byol_pipeline::opencv_decoder(),
                batch,
                canvas,
                ort_lib.as_deref(),
            )?;
            emit(json, &r, || {
                format!(
                    "wrote {} ({} rows, {}-d) in {:.1} s ({:.0} images/s); {} rows without an embedding{}\n",
                    r.out,
                    r.rows,
                    r.dim,
                    r.seconds,
                    r.images_per_s,
                    r.missing,
                    if r.missing_keys.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", r.missing_keys.join(", "))
                    }
                )
            })?;
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "opencv")]
        Cmd::Eval {
            run: run_dir,
            train,
            test,
            checkpoint,
            json,
        } => {
            byol_tools::image::set_opencv_threads(1);
            let r = byol_trainer::eval::evaluate(
                &run_dir,
                &train,
                &test,
                checkpoint.as_deref(),
                byol_pipeline::opencv_decoder(),
            )?;
            emit(json, &r, || r.table())?;
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "opencv")]
        Cmd::Train {
            config,
            data,
            out: run_dir,
            sets,
            max_steps,
            resume,
            val,
            time_budget,
            json,
        } => {
            use byol_trainer::config::TrainConfig;
            byol_tools::image::set_opencv_threads(1);
            byol_trainer::train::install_signal_handlers();
            let cfg = match &config {
                Some(p) => {
                    let text = std::fs::read_to_string(p)
                        .map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()))?;
                    Some(
                        TrainConfig::from_toml(&text, &sets)
                            .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?,
                    )
                }
                None if !sets.is_empty() && resume => {
                    let saved = std::fs::read_to_string(run_dir.join("config.toml"))?;
                    Some(TrainConfig::from_toml(&saved, &sets)?)
                }
                None => None,
            };
            let opts = byol_trainer::train::TrainOptions {
                max_steps,
                val,
                resume,
                progress: true,
                time_budget,
            };
            let s = byol_trainer::train::train(
                cfg,
                &data,
                &run_dir,
                &opts,
                byol_pipeline::opencv_decoder(),
            )?;
            emit(json, &s, || {
                format!(
                    "{} step {}/{} (epoch {}), loss {:.4}, {:.1} images/s, data stall {:.0} %, checkpoint {}\n",
                    if s.stopped_by_signal { "stopped by signal at" } else { "done:" },
                    s.steps,
                    s.total_steps,
                    s.epoch,
                    s.last_loss,
                    s.images_per_s,
                    100.0 * s.data_stall,
                    s.checkpoint.as_deref().unwrap_or("none")
                )
            })?;
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "opencv")]
        Cmd::Preview {
            data,
            out: path,
            n,
            seed,
            canvas,
            size,
        } => {
            byol_tools::image::set_opencv_threads(1);
            let cfg = byol_pipeline::augment::AugmentConfig {
                size,
                ..Default::default()
            };
            augment_cmds::preview(&data, &path, n, seed, canvas, cfg)?;
            out(&format!(
                "wrote {} ({n} rows: canvas, view 1, view 2)\n",
                path.display()
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench(BenchCmd::Augment {
            batch,
            size,
            canvas,
            data,
            threads,
            seconds,
            json,
        }) => {
            let cfg = byol_pipeline::augment::AugmentConfig {
                size,
                ..Default::default()
            };
            let r = match data {
                #[cfg(feature = "opencv")]
                Some(d) => {
                    byol_tools::image::set_opencv_threads(1);
                    augment_cmds::bench_data(
                        &d,
                        batch,
                        canvas,
                        threads.unwrap_or_else(cores),
                        seconds,
                        cfg,
                    )?
                }
                #[cfg(not(feature = "opencv"))]
                Some(_) => {
                    let _ = threads;
                    anyhow::bail!("--data needs a build with the `opencv` feature")
                }
                None => augment_cmds::bench_synthetic(batch as i64, canvas as i64, seconds, cfg)?,
            };
            emit(json, &r, || {
                format!(
                    "{:.0} images/s ({:.0} views/s) on {}, batch {}, canvas {} -> {}{}\n",
                    r.images_per_s,
                    r.views_per_s,
                    r.device,
                    r.batch,
                    r.canvas,
                    r.size,
                    match (&r.data, r.data_stall) {
                        (Some(d), Some(s)) => format!(", from {d} (data stall {:.0} %)", 100.0 * s),
                        _ => " (random canvases)".into(),
                    }
                ) + &match (r.tensor_path_images_per_s, r.ratio_to_tensor_path) {
                    (Some(t), Some(x)) => {
                        format!("batched tensor path: {t:.0} images/s (fused is {x:.2}x)\n")
                    }
                    _ => String::new(),
                }
            })?;
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "opencv")]
        Cmd::Bench(BenchCmd::Pipeline {
            data,
            canvas,
            batch,
            threads,
            seconds,
            json,
        }) => {
            byol_tools::image::set_opencv_threads(1);
            let r =
                bench_pipeline::run(&data, canvas, batch, threads.unwrap_or_else(cores), seconds)?;
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
        Cmd::Info { ort_lib, json } => {
            let info = byol_trainer::runtime::probe(ort_lib.as_deref());
            if json {
                out(&format!("{}\n", serde_json::to_string(&info)?))?;
            } else {
                out(&format!(
                    "libtorch   ok (check {}), {} thread(s), CUDA {}, {} device(s), cuDNN {}\n",
                    info.torch_check,
                    info.torch_threads,
                    if info.cuda_available { "yes" } else { "no" },
                    info.cuda_devices,
                    if info.cudnn_available { "yes" } else { "no" },
                ))?;
                out(&format!(
                    "precision  auto -> {} ({}); CPU flags: {}\n",
                    info.auto_precision, info.auto_precision_reason, info.cpu
                ))?;
                match (&info.ort_library, &info.ort_error) {
                    (Some(p), _) => out(&format!("onnxruntime ok ({p})\n"))?,
                    (None, Some(e)) => out(&format!("onnxruntime MISSING: {e}\n"))?,
                    _ => {}
                }
            }
            Ok(if info.ort_error.is_none() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

/// Large Rust blocks (row groups) in their own mappings; see `alloc`.
#[global_allocator]
static ALLOC: alloc::LargeMmap = alloc::LargeMmap;

fn main() -> ExitCode {
    // glibc's heap for libtorch and OpenCV: blocks up to 32 MiB (the most glibc allows)
    // stay on the heap and 256 MiB of free space may stay at its top, so a training
    // step's activations reuse memory instead of faulting in fresh pages every step
    // (the float32 Fashion-MNIST step: 610 images/s, against 450 with an 8 MiB threshold
    // and 555 with glibc's adaptive default). Row groups are Rust blocks and get their
    // own mappings: see `alloc`.
    // Safety: called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
    byol_tools::cli::init_logging("BYOL_LOG");
    byol_tools::cli::exit("byol", run(Cli::parse()))
}
