//! `byol train`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use byol_format::cli::emit;
use byol_trainer::train::{install_signal_handlers, train, TrainOptions};

/// Train (or resume) a BYOL run.
#[derive(clap::Args)]
pub struct TrainArgs {
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
    /// Continue from the run's latest checkpoint. `--resume auto`: continue when the run
    /// has a checkpoint, else start it (the one command line for torchrun --max-restarts).
    #[arg(long, num_args = 0..=1, default_missing_value = "yes", value_parser = ["yes", "auto"])]
    resume: Option<String>,
    /// Start N local workers of this command (data-parallel over c10d: Gloo on the CPU,
    /// NCCL on CUDA, one GPU each), as `torchrun --nproc-per-node N` would.
    #[arg(long, value_name = "N")]
    nproc_per_node: Option<usize>,
    /// Labelled held-out shards for the kNN monitor (each `train.knn_every_epochs`).
    #[arg(long)]
    val: Option<PathBuf>,
    /// Fit a new run into this wall time (e.g. 20m, 1h30m, 90s): a short calibration
    /// measures this machine's speed and sets train.total_steps to what fits.
    #[arg(long, value_parser = super::parse_duration)]
    time_budget: Option<f64>,
    /// Log to this MLflow tracking server (http[s]://HOST:PORT) [default:
    /// $MLFLOW_TRACKING_URI].
    #[arg(long, value_name = "URI")]
    mlflow: Option<String>,
    #[arg(long)]
    json: bool,
}

/// # Errors
/// See [`byol_trainer::train::train`]; also an unreadable config.
pub fn run(a: TrainArgs) -> Result<ExitCode> {
    if let Some(n) = a.nproc_per_node {
        return launch(n);
    }
    let mut inputs = vec![("--data", a.data.as_path())];
    inputs.extend(a.val.as_deref().map(|v| ("--val", v)));
    byol_format::fs::check_outputs(&[("--out", &a.out)], &inputs)?;
    let stop = install_signal_handlers().context("installing signal handlers")?;
    let resume = a.resume.as_deref() == Some("yes");
    let resume_auto = a.resume.as_deref() == Some("auto");
    // On --resume without --config, the --set overrides apply to the run's own config.
    let (cfg, sets) = match &a.config {
        Some(p) => (Some(super::read_config(p, &a.sets)?), Vec::new()),
        None => (None, a.sets),
    };
    let opts = TrainOptions {
        max_steps: a.max_steps,
        val: a.val,
        resume,
        resume_auto,
        progress: true,
        time_budget: a.time_budget,
        stop,
        mlflow: a.mlflow,
        sets,
    };
    let s = train(cfg, &a.data, &a.out, &opts, byol_pipeline::opencv_decoder())?;
    if s.rank != 0 {
        // Rank 0 reports for the job.
        return Ok(ExitCode::SUCCESS);
    }
    emit(a.json, &s, || {
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

/// `--nproc-per-node N`: this command line, without the flag, as N local workers.
pub fn launch(n: usize) -> Result<ExitCode> {
    if std::env::var("WORLD_SIZE").is_ok_and(|w| w.trim() != "1") {
        anyhow::bail!(
            "--nproc-per-node starts its own workers; this process is already one (WORLD_SIZE is set, e.g. by torchrun): drop the flag"
        );
    }
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let opts = byol_dist::launch::LaunchOptions {
        nproc: n,
        program: std::env::current_exe().context("finding this executable")?,
        args: byol_dist::launch::without_nproc_flag(&args),
        grace: std::time::Duration::from_secs(10),
        stop_timeout: std::time::Duration::from_secs(300),
    };
    let code = byol_dist::launch::run(&opts)?;
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}
