//! `byol train`: BYOL's training loop, built from parts a second loop reuses.
//!
//! | part | what it decides |
//! | --- | --- |
//! | [`runtime`] | [`Runtime`]: device, precision, threads, rank and world, once |
//! | [`batch`] | [`BatchPlan`]: global and per-rank batch; [`open_data`]: the loader |
//! | [`budget`] | `--time-budget`: calibration and the planned length ([`BudgetPlan`]) |
//! | [`position`] | [`Position`]: step, cursor, generator; resuming at any world size |
//! | [`step_loop`] | [`StepLoop`]: epochs, stop, metrics rows, checkpoints, summary |
//! | [`signals`] | [`StopSignal`] and the signal thread |
//! | [`learner`], [`byol_step`], [`knn`] | BYOL's networks and step, the kNN monitor |

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use byol_dist::ProcessGroup;
use byol_pipeline::augment::SplitMix64;
use byol_pipeline::loader::{Batch, DecodeFn};

use crate::bail;
use crate::config::{Resolved, TrainConfig};
use crate::error::{Context, Result};
use crate::run::{self, checkpoint_step, list_checkpoints, lock_run, run_config, write_atomic};

pub mod batch;
pub mod budget;
pub mod byol_step;
pub mod knn;
pub mod learner;
pub mod position;
pub mod runtime;
pub mod signals;
pub mod step_loop;

pub use batch::{open_data, BatchPlan, TrainData};
pub use budget::{steps_for_budget, Budget, BudgetPlan, Calibration, Trial, BUDGET_RESERVE};
pub use learner::build_model;
pub use position::{rank_position, Position};
pub use runtime::Runtime;
pub use signals::{install_signal_handlers, StopSignal};
pub use step_loop::{Cadence, LoopContext, LoopSummary, StepLoop};

use byol_step::ByolStep;
use knn::{KnnMonitor, KnnSource};
use learner::Learner;

#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    pub max_steps: Option<u64>,
    /// Labelled held-out shards for the kNN monitor.
    pub val: Option<PathBuf>,
    pub resume: bool,
    /// `--resume auto`: resume from the latest checkpoint when the run has one, else
    /// start a new run (one command line for torchrun's `--max-restarts`).
    pub resume_auto: bool,
    /// Show progress on stderr: a bar on a terminal, a plain line every 30 s otherwise
    /// (see `byol_format::progress`).
    pub progress: bool,
    /// Wall-time budget in seconds for a new run: a short calibration measures this
    /// machine's training speed, then `train.total_steps` is set to what fits (see
    /// [`steps_for_budget`]).
    pub time_budget: Option<f64>,
    /// Set by a signal (see [`install_signal_handlers`]): finish the step, checkpoint,
    /// exit.
    pub stop: StopSignal,
    /// `--mlflow URI`: an MLflow tracking server (else `$MLFLOW_TRACKING_URI`).
    pub mlflow: Option<String>,
    /// `key=value` overrides for a resumed run's saved config (when no config is given).
    pub sets: Vec<String>,
}

/// The `--json` summary.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainSummary {
    pub command: String,
    pub run: String,
    pub steps: u64,
    pub total_steps: u64,
    pub epoch: u64,
    pub last_loss: f64,
    /// Processes that trained together (1 without a distributed environment).
    pub world_size: usize,
    /// Seconds rank 0 waited for collectives (gradient averaging, SyncBatchNorm, the
    /// per-step agreement), and their share of the training time.
    pub comm_seconds: f64,
    pub comm_share: f64,
    /// Images (both views) per second of wall time since this invocation started.
    pub images_per_s: f64,
    /// The same without the time spent in the kNN monitor.
    pub train_images_per_s: f64,
    pub monitor_seconds: f64,
    pub data_stall: f64,
    /// Samples of this invocation whose image failed to decode (each replaced by another
    /// sample of its batch, and logged with its key).
    pub decode_failures: u64,
    pub checkpoint: Option<String>,
    pub stopped_by_signal: bool,
    pub seconds: f64,
    /// `bf16` or `fp32`, and why (see `amp::choose_precision`).
    pub precision: String,
    pub precision_reason: String,
    /// `--time-budget` in seconds and the calibration's own seconds, when given.
    pub time_budget_s: Option<f64>,
    pub calibration_seconds: Option<f64>,
    /// This process's rank (rank 0 reports for the job).
    #[serde(skip)]
    pub rank: usize,
}

/// The resolved values `RUN/config.toml` records: this machine's device and precision,
/// and the budget (this start's, or the one the run was started with).
fn resolved(
    cfg: &mut TrainConfig,
    rt: &Runtime,
    spe: u64,
    budget: Option<&BudgetPlan>,
    resume: bool,
) -> Resolved {
    let choice = &rt.precision;
    let prev = cfg.resolved.take();
    if let Some(p) = prev
        .as_ref()
        .filter(|p| resume && p.precision != choice.name)
    {
        eprintln!(
            "byol train: precision changes from {} (when the run last started: {}) to {} on this machine",
            p.precision, p.precision_reason, choice.name
        );
    }
    let (time_budget_s, calibrated_images_per_s, budget_reason) = match budget {
        Some(b) => (
            Some(b.seconds),
            Some(b.images_per_s),
            Some(b.reason.clone()),
        ),
        None => prev
            .map(|p| (p.time_budget_s, p.calibrated_images_per_s, p.budget_reason))
            .unwrap_or_default(),
    };
    Resolved {
        device: format!("{:?}", rt.device).to_lowercase(),
        precision: choice.name.into(),
        precision_reason: choice.reason.clone(),
        cpu: rt.cpu.clone(),
        steps_per_epoch: spe,
        time_budget_s,
        calibrated_images_per_s,
        budget_reason,
    }
}

/// Trains (or resumes) a run. `config` is required for a new run; on `--resume` it may be
/// given and is then compared with the run's (or `opts.sets` applied to the run's).
///
/// The steps: the run's config ([`run_config`]), the [`Runtime`] and [`BatchPlan`], the
/// process group, the data ([`open_data`]), the time budget ([`Budget::plan`]), the
/// resolved config written to `RUN/config.toml`, the networks (restored on `--resume`),
/// then [`StepLoop::run`] with BYOL's step and [`StepLoop::finish`].
///
/// # Errors
/// Unreadable or incompatible configs and checkpoints, a dataset smaller than one batch,
/// a time budget too small for one step, a non-finite loss (naming the last good
/// checkpoint), and I/O errors in the run folder.
pub fn train(
    config: Option<TrainConfig>,
    data: &Path,
    run: &Path,
    opts: &TrainOptions,
    decode: DecodeFn,
) -> Result<TrainSummary> {
    let t_start = Instant::now();
    let (opts, latest) = resume_choice(run, opts);
    let mut cfg = run_config(
        config,
        &opts.sets,
        run,
        opts.resume,
        opts.time_budget.is_some(),
        latest.as_deref(),
    )?;
    let rt = Runtime::from_env(&cfg.train)?;
    let _lock = take_run_folder(&rt, run, &opts, latest.as_deref())?;
    let plan = BatchPlan::new(cfg.train.batch, &rt)?;
    if plan.world > 1 && opts.time_budget.is_some() {
        bail!("--time-budget is for one process; give a distributed run its length with train.epochs or train.total_steps");
    }
    let group = rt.join(std::time::Duration::from_secs_f64(
        cfg.train.collective_timeout_s,
    ))?;
    if let Some(g) = &group {
        same_latest_checkpoint(g, latest.as_deref(), rt.device)?;
    }
    let TrainData { loader, labelled } = open_data(
        &cfg,
        &plan,
        (data, opts.val.as_deref()),
        (run, opts.resume),
        decode,
    )?;
    let knn = opts.val.as_ref().map(|val| KnnSource {
        data: data.to_path_buf(),
        val: val.clone(),
        decode,
    });
    rt.announce_precision("train");
    let mut monitor = KnnMonitor::default();
    let budget = match opts.time_budget {
        Some(seconds) => Some(plan_budget(
            &cfg,
            &rt,
            Budget {
                seconds,
                t_start,
                loader: &loader,
                images_per_step: plan.global,
                monitor_every_epochs: 0,
                command: "train",
            },
            (labelled, knn.as_ref(), &mut monitor),
            &opts.stop,
        )?),
        None => None,
    };
    let spe = loader.batches_per_epoch();
    record_config(&mut cfg, &rt, run, (spe, budget.as_ref()), opts.resume)?;
    let total = cfg.total_steps(spe);
    let (mlflow, tracking) = start_tracking(run, &cfg, &rt, plan.world, opts.mlflow.as_deref());
    let mut learner = Learner::new(&cfg, &rt, labelled, group.clone());
    let pos = start_position(
        &mut learner,
        &rt,
        &plan,
        &cfg,
        latest.as_deref().filter(|_| opts.resume),
    )?;
    let cadence = Cadence {
        total,
        stop_at: opts.max_steps.unwrap_or(total).min(total),
        log_every: cfg.train.log_every,
        checkpoint_every: cfg.train.checkpoint_every,
    };
    let ctx = LoopContext {
        run,
        rt: &rt,
        group,
        batch: plan,
        stop: opts.stop.clone(),
        latest,
        progress: opts.progress,
        name: "train",
        max_decode_failure_rate: cfg.data.max_decode_failure_rate,
        tracking,
    };
    let start_step = pos.step;
    let mut lp = StepLoop::new(ctx, pos, cadence, &loader)?;
    if let Some(tb) = lp.reporter().tensorboard() {
        log_start(tb, &cfg, start_step, Some((data, decode, rt.device)));
    }
    let mut step = ByolStep::new(run, cfg, learner, (total, spe), (knn, monitor));
    lp.run(&loader, &mut step)?;
    let s = lp.finish(&loader, &mut step)?;
    end_tracking(mlflow, run, s.stopped_by_signal);
    let knn_in_run = step.monitor.seconds - step.monitor.calibration_seconds;
    Ok(summary(
        s,
        run,
        &rt,
        (t_start, knn_in_run),
        (opts.time_budget, budget),
    ))
}

/// Where a run's rows go besides `metrics.jsonl` (rank 0): TensorBoard when
/// `train.tensorboard`, an MLflow server when `--mlflow`/`$MLFLOW_TRACKING_URI` names one
/// (its tracking thread returned, to end with [`end_tracking`]).
pub(crate) fn start_tracking(
    run: &Path,
    cfg: &TrainConfig,
    rt: &Runtime,
    world: usize,
    mlflow_flag: Option<&str>,
) -> (Option<run::mlflow::Mlflow>, run::Tracking) {
    if !rt.is_writer() {
        return (None, run::Tracking::default());
    }
    let mlflow = run::mlflow::tracking_uri(mlflow_flag).map(|uri| {
        let tags = run::mlflow::run_tags(&format!("{:?}", rt.device), rt.precision.name, world);
        run::mlflow::Mlflow::start(run, uri, cfg, tags)
    });
    let tracking = run::Tracking {
        tensorboard: cfg.train.tensorboard,
        mlflow: mlflow.as_ref().map(run::mlflow::Mlflow::handle),
    };
    (mlflow, tracking)
}

/// Ends MLflow tracking: the run folder's summary files and curves as artifacts, the
/// MLflow run `FINISHED` (`KILLED` when a signal stopped it).
pub(crate) fn end_tracking(mlflow: Option<run::mlflow::Mlflow>, run: &Path, stopped: bool) {
    if let Some(m) = mlflow {
        let status = if stopped { "KILLED" } else { "FINISHED" };
        m.finish(run::mlflow::run_artifacts(run), status);
    }
}

/// What a run's TensorBoard log starts with at `step`: the resolved config as text and,
/// for a new BYOL run (`preview` given, step 0), the augmentation preview of the first 8
/// samples of the training data. Failures are warnings: training goes on.
pub(crate) fn log_start(
    tb: &mut crate::run::tensorboard::EventWriter,
    cfg: &TrainConfig,
    step: u64,
    preview: Option<(&Path, DecodeFn, Device)>,
) {
    let text = format!("```toml\n{}\n```", cfg.to_toml());
    let mut done = tb.text(step, "config", &text);
    if let (Some((data, decode, device)), 0) = (preview, step) {
        done = done.and_then(|()| {
            let grid = crate::preview::augmentation_grid(
                data,
                (8, cfg.train.seed, cfg.data.canvas),
                cfg.augment.clone(),
                decode,
                device,
            )?;
            let (png, hw) = crate::preview::grid_png(&grid)?;
            tb.png(step, "augmentation (canvas, view 1, view 2)", png, hw)
        });
    }
    if let Err(e) = done {
        eprintln!(
            "byol: warning: the TensorBoard log in {} lacks its start: {e}",
            tb.path().display()
        );
    }
}

/// `--resume auto` decided: resume when the run has a checkpoint (a restart keeps the
/// length its first start chose: no time budget), else start it. Returns the options
/// and the latest checkpoint.
fn resume_choice(run: &Path, opts: &TrainOptions) -> (TrainOptions, Option<PathBuf>) {
    let latest = list_checkpoints(run).pop();
    let mut opts = opts.clone();
    if opts.resume_auto {
        opts.resume = latest.is_some();
        if opts.resume {
            opts.time_budget = None;
        }
    }
    (opts, latest)
}

/// Rank 0 makes the run folder and holds its lock (the others write nothing in it), and
/// says what `--resume auto` chose.
fn take_run_folder(
    rt: &Runtime,
    run: &Path,
    opts: &TrainOptions,
    latest: Option<&Path>,
) -> Result<Option<std::fs::File>> {
    if !rt.is_writer() {
        return Ok(None);
    }
    std::fs::create_dir_all(run).with_context(|| format!("creating {}", run.display()))?;
    let lock = lock_run(run)?;
    if opts.resume_auto {
        match latest {
            Some(c) => eprintln!("byol train: --resume auto: continuing from {}", c.display()),
            None => eprintln!(
                "byol train: --resume auto: no checkpoint in {}, starting a new run",
                run.display()
            ),
        }
    }
    Ok(Some(lock))
}

/// Calibrates a throw-away BYOL learner (and the kNN monitor when it runs) and plans the
/// run's length within the budget.
fn plan_budget(
    cfg: &TrainConfig,
    rt: &Runtime,
    mut budget: Budget<'_>,
    (labelled, knn, monitor): (Option<i64>, Option<&KnnSource>, &mut KnnMonitor),
    stop: &StopSignal,
) -> Result<BudgetPlan> {
    let knn = knn.filter(|_| cfg.train.knn_every_epochs > 0);
    if knn.is_some() {
        budget.monitor_every_epochs = cfg.train.knn_every_epochs;
    }
    let mut trial = ByolTrial {
        learner: Learner::new(cfg, rt, labelled, None),
        rng: SplitMix64::new(cfg.train.seed ^ 0xCA11_B4A7_E000_0001),
        cfg,
        knn: knn.map(|s| (monitor, s)),
    };
    budget.plan(stop, &mut trial)
}

/// Records the run's length (a budget's plan), the resolved values and writes
/// `RUN/config.toml` (rank 0) before training starts.
fn record_config(
    cfg: &mut TrainConfig,
    rt: &Runtime,
    run: &Path,
    (spe, budget): (u64, Option<&BudgetPlan>),
    resume: bool,
) -> Result<()> {
    if let Some(b) = budget {
        // The planned length is the run's: recorded in its config, kept on resume.
        cfg.train.total_steps = b.total_steps;
        cfg.train.epochs = b.epochs;
    }
    cfg.resolved = Some(resolved(cfg, rt, spe, budget, resume));
    if rt.is_writer() {
        write_atomic(&run::config_path(run), cfg.to_toml().as_bytes())?;
    }
    Ok(())
}

/// This rank's place: restored from checkpoint `resume_from` (networks, optimizer,
/// probe), or a new run's start; then every rank takes rank 0's state.
fn start_position(
    learner: &mut Learner,
    rt: &Runtime,
    plan: &BatchPlan,
    cfg: &TrainConfig,
    resume_from: Option<&Path>,
) -> Result<Position> {
    let pos = match resume_from {
        Some(dir) => {
            let st = learner.restore(dir)?;
            if rt.is_writer() && st.world != plan.world {
                eprintln!(
                    "byol train: resuming a run last trained at world size {} with world size {}: the rest of epoch {} is re-partitioned over the new ranks (each remaining sample once); the trajectory differs from an uninterrupted run",
                    st.world, plan.world, st.cursor.epoch
                );
            }
            Position::resumed(&st, plan.rank, plan.world)
        }
        None => Position::start(cfg.train.seed, plan.rank),
    };
    learner.broadcast_from(0)?;
    Ok(pos)
}

/// The `--json` summary of a finished loop.
fn summary(
    s: LoopSummary,
    run: &Path,
    rt: &Runtime,
    (t_start, knn_in_run): (Instant, f64),
    (time_budget_s, budget): (Option<f64>, Option<BudgetPlan>),
) -> TrainSummary {
    let train_s = (s.seconds - knn_in_run).max(1e-9);
    TrainSummary {
        command: "train".into(),
        run: run.display().to_string(),
        steps: s.step,
        total_steps: s.total,
        epoch: s.epoch,
        last_loss: s.last_loss,
        world_size: s.world,
        comm_seconds: s.comm_seconds,
        comm_share: (s.comm_seconds / train_s).clamp(0.0, 1.0),
        images_per_s: s.images as f64 / s.seconds,
        train_images_per_s: s.images as f64 / train_s,
        monitor_seconds: knn_in_run,
        data_stall: s.data_stall,
        decode_failures: s.decode_failures,
        checkpoint: s.checkpoint,
        stopped_by_signal: s.stopped_by_signal,
        seconds: t_start.elapsed().as_secs_f64(),
        precision: rt.precision.name.into(),
        precision_reason: rt.precision.reason.clone(),
        time_budget_s,
        calibration_seconds: budget.map(|b| b.calibration_seconds),
        rank: rt.rank(),
    }
}

/// Every rank must see the same latest checkpoint (a run folder that all nodes share).
fn same_latest_checkpoint(g: &ProcessGroup, latest: Option<&Path>, device: Device) -> Result<()> {
    let step = latest.and_then(checkpoint_step).map_or(-1, |s| s as i64);
    let all = g.all_gather(&Tensor::from_slice(&[step]).to_device(device))?;
    let steps: Vec<i64> = all.iter().map(|t| t.int64_value(&[0])).collect();
    if steps.iter().any(|&s| s != step) {
        bail!(
            "the ranks see different latest checkpoints in the run folder (by rank: {steps:?}; -1 = none): every node must see the same run folder (a shared filesystem)"
        );
    }
    Ok(())
}

/// The time-budget calibration's throw-away BYOL learner and the kNN monitor.
struct ByolTrial<'a> {
    learner: Learner,
    rng: SplitMix64,
    cfg: &'a TrainConfig,
    knn: Option<(&'a mut KnnMonitor, &'a KnnSource)>,
}

impl Trial for ByolTrial<'_> {
    fn step(&mut self, b: &mut Batch) -> Result<()> {
        self.learner.step(b, &mut self.rng, 1e-3, 0.99)?;
        Ok(())
    }

    /// Decodes the monitor's images (untimed: counted as calibration), then times one run.
    fn monitor(&mut self) -> Result<f64> {
        let Some((m, src)) = self.knn.as_mut() else {
            return Ok(0.0);
        };
        m.load(self.cfg, src)?;
        let t = Instant::now();
        m.top1(&self.learner.online, self.cfg, src, self.learner.device())?;
        let s = t.elapsed().as_secs_f64();
        m.calibration_seconds += s;
        Ok(s)
    }
}
