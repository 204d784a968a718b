//! `byol finetune`: the BYOL paper's semi-supervised and transfer evaluations as a
//! second training loop on the trainer's parts. A new linear head on the pretrained
//! run's online encoder (or a random one of the same shape: the supervised baseline)
//! is trained with cross-entropy on a labelled subset of the training shards, then
//! tested on the test shards.
//!
//! | part | from |
//! | --- | --- |
//! | device, precision, threads, rank, world | [`Runtime`] |
//! | global and per-rank batch | [`BatchPlan`] |
//! | epochs, stop, metrics rows, checkpoints | [`StepLoop`] with [`FinetuneStep`] |
//! | `--time-budget` | [`Budget::plan`] |
//! | the run folder and its checkpoints | [`crate::run`] |
//! | which labelled rows | [`subset`] |
//!
//! The fine-tuned run folder `FT` is a run folder like any other: `config.toml` (the
//! pretrained run's config with a `[finetune]` section), `data.json`, `metrics.jsonl`,
//! `curves.png`, `checkpoints/step-N/` (`classifier.safetensors`,
//! `optimizer.safetensors`, `state.json`), plus `label_keys.txt` and `finetune.json`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tch::{Device, Tensor};

use byol_dist::ProcessGroup;
use byol_pipeline::loader::{Batch, DecodeFn};
use byol_pipeline::{Dataset, Loader};

use crate::bail;
use crate::byol::Optimizer;
use crate::config::{FinetuneConfig, FinetuneInit, TrainConfig};
use crate::error::{Context, Result};
use crate::run::{self, check_run_data, list_checkpoints, lock_run, run_config, write_atomic};
use crate::train::step_loop::Step;
use crate::train::{
    BatchPlan, Budget, BudgetPlan, Cadence, LoopContext, Position, Runtime, StepLoop, StopSignal,
    Trial,
};

pub mod report;
pub mod step;
pub mod subset;

pub use crate::classifier::{topk_correct, Classifier, CLASSIFIER};
pub use report::{logits, report_path, test_accuracy, FinetuneReport};
pub use step::{finetune_step, FinetuneStep};
pub use subset::{choose, LabelChoice, LabelSubset};

/// What `byol finetune` is asked to do.
#[derive(Debug, Clone)]
pub struct FinetuneOptions {
    /// The pretrained run (`--run`) and its checkpoint (default: the latest).
    pub source: PathBuf,
    pub checkpoint: Option<PathBuf>,
    /// Training and test shards.
    pub train: PathBuf,
    pub test: PathBuf,
    pub labels: LabelChoice,
    /// The recipe (`--config FILE`'s `[finetune]`; default: the paper's), before
    /// `init`, `linear` and `sets`.
    pub recipe: FinetuneConfig,
    pub init: FinetuneInit,
    pub linear: bool,
    /// `--mlflow URI`: an MLflow tracking server (else `$MLFLOW_TRACKING_URI`).
    pub mlflow: Option<String>,
    /// `key=value` overrides of the fine-tuned run's config.
    pub sets: Vec<String>,
    pub resume: bool,
    pub resume_auto: bool,
    pub max_steps: Option<u64>,
    pub progress: bool,
    pub time_budget: Option<f64>,
    pub stop: StopSignal,
}

/// Fine-tunes (or resumes fine-tuning) into run folder `out`.
///
/// # Errors
/// A pretrained run without config or checkpoint; test shards whose classes differ
/// from the training shards' (naming both lists); a subset smaller than one batch;
/// `--resume` without a checkpoint; a config that differs on resume; a non-finite loss;
/// I/O in the run folder.
pub fn finetune(opts: &FinetuneOptions, out: &Path, decode: DecodeFn) -> Result<FinetuneReport> {
    let t_start = Instant::now();
    let Prepared {
        resume,
        latest,
        train_ds,
        mut cfg,
        keys,
        chosen,
    } = prepare(opts, out)?;
    let rt = Runtime::from_env(&cfg.train)?;
    let _lock = if rt.is_writer() {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let lock = lock_run(out)?;
        if !resume {
            subset::write_keys(out, &keys, &chosen.rows)?;
        }
        Some(lock)
    } else {
        None
    };
    let recipe = cfg.finetune.clone().context("not a fine-tuning config")?;
    let plan = BatchPlan::new(recipe.batch, &rt)?;
    if plan.world > 1 && opts.time_budget.is_some() {
        bail!("--time-budget is for one process; give a distributed run its length with finetune.epochs or finetune.total_steps");
    }
    let group = rt.join(Duration::from_secs_f64(cfg.train.collective_timeout_s))?;
    check_run_data(out, &opts.train, &train_ds.manifest, resume, rt.is_writer())?;
    let loader = subset_loader(train_ds, &cfg, plan, &chosen, decode)?;
    let spe = loader.batches_per_epoch();
    rt.announce_precision("finetune");
    let budget = match opts.time_budget {
        Some(seconds) => Some(plan_budget(
            &cfg,
            &rt,
            (&loader, plan, seconds, t_start),
            &opts.stop,
        )?),
        None => None,
    };
    record_config(&mut cfg, &rt, out, spe, budget.as_ref())?;
    let recipe = cfg.finetune.clone().context("not a fine-tuning config")?;
    let total = match recipe.total_steps {
        0 => recipe.epochs * spe,
        n => n,
    };
    let (mlflow, tracking) =
        crate::train::start_tracking(out, &cfg, &rt, plan.world, opts.mlflow.as_deref());
    let (net, opt, pos) = start(
        &cfg,
        &rt,
        (group.as_ref(), plan),
        latest.as_deref().filter(|_| resume),
    )?;
    let ctx = LoopContext {
        run: out,
        rt: &rt,
        group: group.clone(),
        batch: plan,
        stop: opts.stop.clone(),
        latest,
        progress: opts.progress,
        name: "finetune",
        max_decode_failure_rate: cfg.data.max_decode_failure_rate,
        tracking: tracking.clone(),
    };
    let cadence = Cadence {
        total,
        stop_at: opts.max_steps.unwrap_or(total).min(total),
        log_every: cfg.train.log_every,
        checkpoint_every: cfg.train.checkpoint_every,
    };
    let start_step = pos.step;
    let mut lp = StepLoop::new(ctx, pos, cadence, &loader)?;
    if let Some(tb) = lp.reporter().tensorboard() {
        crate::train::log_start(tb, &cfg, start_step, None);
    }
    let mut step = FinetuneStep::new(
        out,
        cfg.clone(),
        (net, opt),
        (rt.device, rt.precision.dtype, group),
        total,
    );
    lp.run(&loader, &mut step)?;
    let s = lp.finish(&loader, &mut step)?;
    let mut report = FinetuneReport::new(out, opts, (&recipe, &chosen), (&s, spe), &rt);
    if rt.is_writer() {
        if s.step == total && !s.stopped_by_signal {
            test_run(
                &mut report,
                &step,
                (&opts.test, s.epoch),
                (decode, rt.device),
                &tracking,
            )?;
        }
        report.seconds = t_start.elapsed().as_secs_f64();
        write_atomic(
            &report_path(out),
            serde_json::to_string_pretty(&report)?.as_bytes(),
        )?;
    }
    crate::train::end_tracking(mlflow, out, s.stopped_by_signal);
    Ok(report)
}

/// The finished run's test accuracy: into the report, a last metrics row and the curves.
fn test_run(
    report: &mut FinetuneReport,
    step: &FinetuneStep<'_>,
    (test, epoch): (&Path, u64),
    (decode, device): (DecodeFn, Device),
    tracking: &run::Tracking,
) -> Result<()> {
    let (top1, top5, n) = test_accuracy(&step.net, &step.cfg, test, decode, device)?;
    report.test_rows = n;
    report.test_top1 = Some(top1);
    report.test_top5 = Some(top5);
    append_test_row(step.run, (report.steps, epoch), (top1, top5), tracking)?;
    step.draw_curves();
    Ok(())
}

/// What a fine-tuning run starts from: whether it resumes (and from which checkpoint),
/// the training shards, the run's config, every row's key and the chosen subset.
struct Prepared {
    resume: bool,
    latest: Option<PathBuf>,
    train_ds: Dataset,
    cfg: TrainConfig,
    keys: Vec<String>,
    chosen: LabelSubset,
}

/// `--resume` decided (refused without a checkpoint), the test shards' classes checked
/// against the training shards', the config (FT's on resume, else the pretrained run's
/// with the recipe) and the labelled subset (FT's keys file on resume).
fn prepare(opts: &FinetuneOptions, out: &Path) -> Result<Prepared> {
    let latest = list_checkpoints(out).pop();
    let resume = opts.resume || (opts.resume_auto && latest.is_some());
    let train_ds =
        Dataset::open(&opts.train).with_context(|| format!("opening {}", opts.train.display()))?;
    let test_classes = Dataset::open(&opts.test)
        .with_context(|| format!("opening {}", opts.test.display()))?
        .manifest
        .classes;
    same_class_lists(
        &opts.train,
        &train_ds.manifest.classes,
        &opts.test,
        &test_classes,
    )?;
    let (keys, labels) = train_ds.keys_and_labels()?;
    let classes = train_ds.manifest.classes.len();
    let (mut cfg, choice) = if resume {
        let budgeted = opts.time_budget.is_some();
        let cfg = run_config(None, &opts.sets, out, true, budgeted, latest.as_deref())?;
        (cfg, LabelChoice::KeysFile(subset::keys_path(out)))
    } else {
        (
            new_config(opts, &train_ds.manifest.classes)?,
            opts.labels.clone(),
        )
    };
    let chosen = subset::choose(&keys, &labels, classes, &choice, cfg.train.seed)?;
    if !resume {
        if let Some(f) = cfg.finetune.as_mut() {
            f.subset = chosen.description.clone();
            f.labels = chosen.rows.len() as u64;
        }
        cfg = run_config(Some(cfg), &[], out, false, false, latest.as_deref())?;
    }
    Ok(Prepared {
        resume,
        latest,
        train_ds,
        cfg,
        keys,
        chosen,
    })
}

/// This rank's loader over the subset's rows.
///
/// # Errors
/// Fewer rows per rank than one batch.
fn subset_loader(
    ds: Dataset,
    cfg: &TrainConfig,
    plan: BatchPlan,
    chosen: &LabelSubset,
    decode: DecodeFn,
) -> Result<Loader> {
    let loader =
        Loader::new(ds, plan.loader_config(cfg), decode)?.with_rows(chosen.rows.clone())?;
    if loader.batches_per_epoch() == 0 {
        bail!(
            "the labelled subset has {} rows per rank, fewer than one batch of {} per rank: lower finetune.batch (--set finetune.batch=N) or take more labels",
            loader.samples_per_epoch(),
            plan.per_rank
        );
    }
    Ok(loader)
}

/// A new fine-tuned run's config: the pretrained run's (device, precision, data and
/// augmentation settings, the encoder's shape), its `[finetune]` the recipe with
/// `init`, `linear`, the provenance and the classes; then `--set`.
fn new_config(opts: &FinetuneOptions, classes: &[String]) -> Result<TrainConfig> {
    if opts.source.as_os_str().is_empty() {
        bail!("--run is required for a new fine-tuning run: the pretrained run whose encoder is fine-tuned (or whose shape --init random takes)");
    }
    let path = run::config_path(&opts.source);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "--run {}: not a run folder (no config.toml)",
            opts.source.display()
        )
    })?;
    let mut cfg = TrainConfig::from_toml(&text, &[])
        .with_context(|| format!("reading {}", path.display()))?;
    if cfg.finetune.is_some() {
        bail!(
            "--run {} is a fine-tuned run; give the pretrained run it came from",
            opts.source.display()
        );
    }
    let ckpt = match &opts.checkpoint {
        Some(c) => c.clone(),
        None => list_checkpoints(&opts.source)
            .pop()
            .with_context(|| format!("--run {} has no checkpoint", opts.source.display()))?,
    };
    let st = run::read_state(&ckpt)?;
    cfg.resolved = None;
    let mut f = opts.recipe.clone();
    f.init = opts.init;
    f.linear = f.linear || opts.linear;
    f.source_run = opts.source.display().to_string();
    f.source_checkpoint = ckpt.display().to_string();
    f.source_step = st.step;
    f.classes = classes.to_vec();
    cfg.finetune = Some(f);
    let cfg = cfg.with_sets(&opts.sets).context("--set")?;
    Ok(cfg)
}

/// The test shards must have the training shards' classes, in the same order.
fn same_class_lists(a: &Path, ca: &[String], b: &Path, cb: &[String]) -> Result<()> {
    if ca == cb {
        return Ok(());
    }
    let show = |c: &[String]| {
        let mut s = c
            .iter()
            .take(20)
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        if c.len() > 20 {
            s.push_str(&format!(", … ({} in all)", c.len()));
        }
        format!("[{s}]")
    };
    bail!(
        "the test shards' classes differ from the training shards': {} has {} and {} has {}; shard the test data with `byol-tools shard --classes-from {}`",
        a.display(),
        show(ca),
        b.display(),
        show(cb),
        a.display()
    )
}

/// Records the run's length (a budget's plan) and the resolved values, and writes
/// `FT/config.toml` (rank 0).
fn record_config(
    cfg: &mut TrainConfig,
    rt: &Runtime,
    out: &Path,
    spe: u64,
    budget: Option<&BudgetPlan>,
) -> Result<()> {
    if let (Some(b), Some(f)) = (budget, cfg.finetune.as_mut()) {
        f.total_steps = b.total_steps;
        f.epochs = b.epochs;
    }
    let prev = cfg.resolved.take();
    cfg.resolved = Some(crate::config::Resolved {
        device: format!("{:?}", rt.device).to_lowercase(),
        precision: rt.precision.name.into(),
        precision_reason: rt.precision.reason.clone(),
        cpu: rt.cpu.clone(),
        steps_per_epoch: spe,
        time_budget_s: budget
            .map(|b| b.seconds)
            .or(prev.as_ref().and_then(|p| p.time_budget_s)),
        calibrated_images_per_s: budget
            .map(|b| b.images_per_s)
            .or(prev.as_ref().and_then(|p| p.calibrated_images_per_s)),
        budget_reason: budget
            .map(|b| b.reason.clone())
            .or(prev.and_then(|p| p.budget_reason)),
    });
    if rt.is_writer() {
        write_atomic(&run::config_path(out), cfg.to_toml().as_bytes())?;
    }
    Ok(())
}

/// The classifier, optimizer and position: from checkpoint `resume_from`, or a new
/// run's (the head fresh, the encoder the pretrained run's or random); then every rank
/// takes rank 0's state.
fn start(
    cfg: &TrainConfig,
    rt: &Runtime,
    (group, plan): (Option<&Arc<ProcessGroup>>, BatchPlan),
    resume_from: Option<&Path>,
) -> Result<(Classifier, Optimizer, Position)> {
    let f = cfg.finetune.as_ref().context("not a fine-tuning config")?;
    let mut net = build_classifier(cfg, rt.device)?;
    let mut opt = step::optimizer(f);
    let pos = match resume_from {
        Some(dir) => {
            net.load(&dir.join(CLASSIFIER))?;
            let o = dir.join(run::OPTIMIZER);
            if o.exists() {
                let named = Tensor::read_safetensors(&o)
                    .with_context(|| format!("reading {}", o.display()))?;
                opt.load_state(named, rt.device);
            }
            let st = run::read_state(dir)?;
            Position::resumed(&st, plan.rank, plan.world)
        }
        None => {
            if f.init == FinetuneInit::Byol {
                let src = run::load_online(
                    Path::new(&f.source_run),
                    Some(Path::new(&f.source_checkpoint)),
                )?;
                net.init_encoder_from(src.net.vs())?;
            }
            Position::start(cfg.train.seed, plan.rank)
        }
    };
    if f.linear {
        net.freeze_encoder();
    }
    if let Some(g) = group.filter(|_| cfg.model.sync_bn.unwrap_or(true) && !f.linear) {
        net.sync_batch_norm(g);
    }
    if let Some(g) = group {
        let mut all: Vec<(String, Tensor)> = net.vs.variables().into_iter().collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        let mut tensors: Vec<Tensor> = all.into_iter().map(|(_, t)| t).collect();
        tensors.extend(opt.buffers_in_order());
        g.broadcast_all(&tensors, 0)?;
    }
    Ok((net, opt, pos))
}

/// A classifier of the config's encoder and classes (random, seeded by `train.seed`), in
/// the config's memory layout.
///
/// # Errors
/// The config has no `[finetune]` section.
pub fn build_classifier(cfg: &TrainConfig, device: Device) -> Result<Classifier> {
    let f = cfg.finetune.as_ref().context("not a fine-tuning config")?;
    let mut net = Classifier::new(
        device,
        &cfg.model.encoder,
        f.classes.len() as i64,
        cfg.train.seed,
    );
    if cfg.train.channels_last {
        net.to_channels_last();
    }
    Ok(net)
}

/// Calibrates a throw-away classifier's steps and plans the run's length.
fn plan_budget(
    cfg: &TrainConfig,
    rt: &Runtime,
    (loader, plan, seconds, t_start): (&Loader, BatchPlan, f64, Instant),
    stop: &StopSignal,
) -> Result<BudgetPlan> {
    let f = cfg.finetune.as_ref().context("not a fine-tuning config")?;
    let mut net = build_classifier(cfg, rt.device)?;
    if f.linear {
        net.freeze_encoder();
    }
    let run = PathBuf::new();
    let mut trial = FinetuneTrial {
        step: FinetuneStep::new(
            &run,
            cfg.clone(),
            (net, step::optimizer(f)),
            (rt.device, rt.precision.dtype, None),
            u64::MAX,
        ),
        pos: Position::start(cfg.train.seed ^ 0xCA11_B4A7_E000_0002, 0),
    };
    Budget {
        seconds,
        t_start,
        loader,
        images_per_step: plan.global,
        monitor_every_epochs: 0,
        command: "finetune",
    }
    .plan(stop, &mut trial)
}

/// The time-budget calibration's throw-away fine-tuning step.
struct FinetuneTrial<'a> {
    step: FinetuneStep<'a>,
    pos: Position,
}

impl Trial for FinetuneTrial<'_> {
    fn step(&mut self, b: &mut Batch) -> Result<()> {
        self.step.step(b, &mut self.pos)?;
        Ok(())
    }

    fn monitor(&mut self) -> Result<f64> {
        Ok(0.0)
    }
}

/// Appends the test row to `FT/metrics.jsonl`.
fn append_test_row(
    out: &Path,
    (step, epoch): (u64, u64),
    (top1, top5): (f64, f64),
    tracking: &run::Tracking,
) -> Result<()> {
    let row = run::TestRow {
        step,
        epoch,
        test_top1: top1,
        test_top5: top5,
    };
    run::open_metrics(out, None, "byol finetune", tracking)?.append(&row)
}
