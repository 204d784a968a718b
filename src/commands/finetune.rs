//! `byol finetune`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use byol_format::cli::emit;
use byol_trainer::config::{FinetuneConfig, FinetuneInit, TrainConfig};
use byol_trainer::finetune::{finetune, FinetuneOptions, LabelChoice};
use byol_trainer::train::install_signal_handlers;

/// Where the encoder starts.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Init {
    /// The pretrained run's online encoder.
    Byol,
    /// A random encoder of the same shape: the supervised baseline.
    Random,
}

/// Fine-tune a run's encoder with a new linear head on labelled shards.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("subset").args(["label_fraction", "labels_per_class", "label_keys"])))]
pub struct FinetuneArgs {
    /// The pretrained BYOL run (its encoder, or only its shape with --init random).
    #[arg(long)]
    run: Option<PathBuf>,
    /// A checkpoint folder of --run [default: its latest].
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Labelled training shards (the same dataset as the run's, or another: transfer).
    #[arg(long)]
    train: PathBuf,
    /// Labelled test shards with the training shards' classes.
    #[arg(long)]
    test: PathBuf,
    /// The fine-tuned run folder: config.toml, label_keys.txt, checkpoints/, finetune.json.
    #[arg(long)]
    out: PathBuf,
    /// A class-balanced fraction of each class's labelled rows (e.g. 0.01), drawn from
    /// train.seed.
    #[arg(long)]
    label_fraction: Option<f64>,
    /// N labelled rows of each class, drawn from train.seed.
    #[arg(long, value_name = "N")]
    labels_per_class: Option<usize>,
    /// The labelled rows: a file of keys, one per line (FT/label_keys.txt of an earlier
    /// run, or SimCLR's 1 % / 10 % ImageNet lists).
    #[arg(long, value_name = "FILE")]
    label_keys: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "byol")]
    init: Init,
    /// Train the head only (the encoder frozen): linear evaluation through the same loop.
    #[arg(long)]
    linear: bool,
    /// A TOML file whose [finetune] table is the recipe [default: the paper's,
    /// configs/finetune-imagenet.toml].
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a value of the fine-tuned run's config, e.g. --set finetune.lr=0.05
    /// (repeatable).
    #[arg(long = "set")]
    sets: Vec<String>,
    /// Stop (with a checkpoint) when the step reaches N.
    #[arg(long)]
    max_steps: Option<u64>,
    /// Continue from FT's latest checkpoint; `--resume auto`: continue, or start when
    /// there is none.
    #[arg(long, num_args = 0..=1, default_missing_value = "yes", value_parser = ["yes", "auto"])]
    resume: Option<String>,
    /// Start N local workers of this command (data-parallel over c10d).
    #[arg(long, value_name = "N")]
    nproc_per_node: Option<usize>,
    /// Fit a new run into this wall time (e.g. 5m): sets finetune.total_steps.
    #[arg(long, value_parser = super::parse_duration)]
    time_budget: Option<f64>,
    /// Log to this MLflow tracking server (http[s]://HOST:PORT) [default:
    /// $MLFLOW_TRACKING_URI].
    #[arg(long, value_name = "URI")]
    mlflow: Option<String>,
    #[arg(long)]
    json: bool,
}

/// The recipe of `--config FILE` (its `[finetune]` table), or the default.
fn recipe(path: Option<&PathBuf>) -> Result<FinetuneConfig> {
    let Some(p) = path else {
        return Ok(FinetuneConfig::default());
    };
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    let cfg = TrainConfig::from_toml(&text, &[]).with_context(|| format!("{}", p.display()))?;
    cfg.finetune
        .with_context(|| format!("{} has no [finetune] table", p.display()))
}

/// # Errors
/// See [`byol_trainer::finetune::finetune`]; also an unreadable recipe.
pub fn run(a: FinetuneArgs) -> Result<ExitCode> {
    if let Some(n) = a.nproc_per_node {
        return super::train::launch(n);
    }
    let mut inputs = vec![("--train", a.train.as_path()), ("--test", a.test.as_path())];
    inputs.extend(a.run.as_deref().map(|r| ("--run", r)));
    inputs.extend(a.checkpoint.as_deref().map(|c| ("--checkpoint", c)));
    inputs.extend(a.label_keys.as_deref().map(|k| ("--label-keys", k)));
    byol_format::fs::check_outputs(&[("--out", &a.out)], &inputs)?;
    let stop = install_signal_handlers().context("installing signal handlers")?;
    let labels = match (a.label_fraction, a.labels_per_class, a.label_keys) {
        (Some(f), _, _) => LabelChoice::Fraction(f),
        (_, Some(n), _) => LabelChoice::PerClass(n),
        (_, _, Some(k)) => LabelChoice::KeysFile(k),
        _ => LabelChoice::All,
    };
    let resume = a.resume.as_deref() == Some("yes");
    let resume_auto = a.resume.as_deref() == Some("auto");
    let opts = FinetuneOptions {
        source: a.run.unwrap_or_default(),
        checkpoint: a.checkpoint,
        train: a.train,
        test: a.test,
        labels,
        recipe: recipe(a.config.as_ref())?,
        init: match a.init {
            Init::Byol => FinetuneInit::Byol,
            Init::Random => FinetuneInit::Random,
        },
        linear: a.linear,
        sets: a.sets,
        resume,
        resume_auto,
        max_steps: a.max_steps,
        progress: true,
        time_budget: a.time_budget,
        stop,
        mlflow: a.mlflow,
    };
    let r = finetune(&opts, &a.out, byol_pipeline::opencv_decoder())?;
    if r.rank != 0 {
        return Ok(ExitCode::SUCCESS);
    }
    emit(a.json, &r, || format!("{}\n", r.line()))?;
    Ok(ExitCode::SUCCESS)
}
