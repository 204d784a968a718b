//! `byol train`: the training loop, checkpoints and exact resume.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Instant;

use crate::bail;
use crate::error::{Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use byol_pipeline::augment::{Augmenter, SplitMix64};
use byol_pipeline::loader::DecodeFn;
use byol_pipeline::{Cursor, Dataset, Loader, LoaderConfig};

use crate::amp::PrecisionChoice;
use crate::byol::{
    channels_last, copy_into, lr_at, tau_at, train_step, Network, Optimizer, StepSettings,
};
use crate::config::{Resolved, TrainConfig};
use crate::run::{
    self, check_run_data, device_of, draw_curves, list_checkpoints, load_checkpoint, lock_run,
    run_config, same_classes, save_checkpoint, write_atomic, CheckpointParts, CheckpointState,
    KnnRow, Metrics,
};
use byol_format::progress::{Mode, Progress};

/// Set by the first SIGINT/SIGTERM: finish the step, checkpoint, exit.
pub static STOP: LazyLock<Arc<AtomicBool>> = LazyLock::new(|| Arc::new(AtomicBool::new(false)));

/// Installs the SIGINT/SIGTERM handlers (`signal-hook`): the first signal sets [`STOP`];
/// a second one, while a long checkpoint or kNN evaluation is still finishing, ends the
/// process at once with exit code 130 (the run keeps its last complete checkpoint).
///
/// # Errors
/// The operating system refused to install a handler.
pub fn install_signal_handlers() -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    for sig in [SIGINT, SIGTERM] {
        // Registered first, so that it sees the flag before the first signal sets it.
        signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&STOP))?;
        signal_hook::flag::register(sig, Arc::clone(&STOP))?;
    }
    Ok(())
}

#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    pub max_steps: Option<u64>,
    /// Labelled held-out shards for the kNN monitor.
    pub val: Option<PathBuf>,
    pub resume: bool,
    /// Show progress on stderr: a bar on a terminal, a plain line every 30 s otherwise
    /// (see `byol_format::progress`).
    pub progress: bool,
    /// Wall-time budget in seconds for a new run: a short calibration measures this
    /// machine's training speed, then `train.total_steps` is set to what fits (see
    /// [`steps_for_budget`]).
    pub time_budget: Option<f64>,
}

/// The online linear probe: a linear classifier on the detached embedding, trained with
/// SGD alongside the networks (its state is part of the checkpoint).
struct Probe {
    vs: tch::nn::VarStore,
    lin: tch::nn::Linear,
    opt: Optimizer,
}

impl Probe {
    fn new(device: Device, dim: i64, classes: i64) -> Probe {
        let vs = tch::nn::VarStore::new(device);
        let lin = tch::nn::linear(vs.root() / "probe", dim, classes, Default::default());
        Probe {
            vs,
            lin,
            opt: Optimizer::new(crate::byol::OptimizerKind::Sgd, 0.9, 0.0, 0.0),
        }
    }

    /// One SGD step on (embedding, labels); returns the number of correct predictions
    /// before the step (a scalar on the device).
    fn step(&mut self, y: &Tensor, labels: &Tensor) -> Tensor {
        use tch::nn::Module;
        let logits = self.lin.forward(y);
        let correct = logits
            .argmax(1, false)
            .eq_tensor(labels)
            .to_kind(Kind::Float)
            .sum(Kind::Float);
        let loss = logits.cross_entropy_for_logits(labels);
        crate::byol::zero_grad(&self.vs);
        loss.backward();
        self.opt.step(&self.vs, 0.05);
        correct
    }

    /// Weights and optimizer buffers, as a checkpoint stores them.
    fn named(&self) -> run::Named {
        let mut named = crate::byol::named_contiguous(&self.vs);
        named.extend(self.opt.state());
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named
    }

    /// Restores what [`Probe::named`] saved.
    fn load(&mut self, named: run::Named, device: Device) {
        let vars = self.vs.variables();
        let mut buffers = Vec::new();
        tch::no_grad(|| {
            for (k, t) in named {
                match vars.get(&k) {
                    Some(v) => {
                        let mut v = v.shallow_clone();
                        v.copy_(&t);
                    }
                    None => buffers.push((k, t)),
                }
            }
        });
        self.opt.load_state(buffers, device);
    }
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
}

/// The networks, optimizer, online probe and augmentation of a run: what one training
/// step needs.
struct Learner {
    online: Network,
    target: Network,
    opt: Optimizer,
    probe: Option<Probe>,
    aug: Augmenter,
    device: Device,
    amp: Option<Kind>,
    channels_last: bool,
}

/// The host-side values of one step.
struct StepResult {
    loss: f64,
    collapse: f64,
    /// Correct online-probe predictions in the batch (0 without labels).
    correct: f64,
}

impl Learner {
    /// Networks seeded with `train.seed`; a probe when the data has `classes` > 0.
    fn new(cfg: &TrainConfig, device: Device, amp: Option<Kind>, classes: Option<i64>) -> Learner {
        let (online, target, opt) = build_model(cfg, device);
        let probe = classes.map(|c| Probe::new(device, online.encoder.out_dim(), c));
        Learner {
            online,
            target,
            opt,
            probe,
            aug: Augmenter::new(cfg.augment.clone()),
            device,
            amp,
            channels_last: cfg.train.channels_last,
        }
    }

    /// Loads checkpoint `dir` into the networks, optimizer and probe; returns where the
    /// run stood: (step, cursor, augmentation generator, last loss).
    fn restore(&mut self, dir: &Path) -> Result<(u64, Cursor, SplitMix64, f64)> {
        let c = load_checkpoint(dir, &mut self.online, &mut self.target)?;
        if let Some(o) = c.optimizer {
            self.opt.load_state(o, self.device);
        }
        if let (Some(p), Some(named)) = (self.probe.as_mut(), c.probe) {
            p.load(named, self.device);
        }
        let st = c.state;
        Ok((
            st.step,
            st.cursor,
            SplitMix64::new(st.aug_rng),
            st.last_loss,
        ))
    }

    /// One BYOL step (two views of `b`, online/target update, probe step) at learning
    /// rate `lr` and EMA rate `tau`; one host read for the loss, the collapse monitor
    /// and the probe's count.
    fn step(
        &mut self,
        b: &mut byol_pipeline::loader::Batch,
        rng: &mut SplitMix64,
        lr: f64,
        tau: f64,
    ) -> Result<StepResult> {
        let canvas = b.to_device(self.device);
        let (mut v1, mut v2) = self.aug.views(&canvas, b.valid_sizes(), rng);
        if self.channels_last {
            v1 = channels_last(&v1);
            v2 = channels_last(&v2);
        }
        let settings = StepSettings {
            lr,
            tau,
            amp: self.amp,
        };
        let (loss, z1, y1) = train_step(
            &self.online,
            &self.target,
            &mut self.opt,
            &v1,
            &v2,
            settings,
        );
        let device = self.device;
        // A replacement sample (its image failed to decode) teaches the probe nothing:
        // its label becomes cross-entropy's ignore index (-100), never a prediction.
        let labels: Vec<i64> = b
            .labels()
            .iter()
            .zip(b.replaced_mask())
            .map(|(&l, &r)| if r || l < 0 { -100 } else { l })
            .collect();
        let any_label = labels.iter().any(|&l| l >= 0);
        let correct = self.probe.as_mut().filter(|_| any_label).map(|p| {
            let labels = Tensor::from_slice(&labels).to_device(device);
            p.step(&y1, &labels)
        });
        // Each host read waits for the device, so the three values are read together.
        let collapse_t = tch::no_grad(|| collapse_monitor(&z1));
        let mut scalars = vec![loss.detach(), collapse_t];
        scalars.extend(correct);
        let host = Vec::<f64>::try_from(
            Tensor::stack(&scalars, 0)
                .to_kind(Kind::Double)
                .to_device(Device::Cpu),
        )?;
        Ok(StepResult {
            loss: host[0],
            collapse: host[1],
            correct: host.get(2).copied().unwrap_or(0.0),
        })
    }
}

/// What the calibration before a time-budgeted run measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    /// Steps timed (after two untimed warm-up steps).
    pub steps: u64,
    /// Seconds per training step, data loading included.
    pub step_s: f64,
    /// Seconds of one kNN-monitor evaluation (0 without `--val`).
    pub knn_s: f64,
}

/// Share of a time budget held back for checkpoints, curves and the final summary.
pub const BUDGET_RESERVE: f64 = 0.03;

/// The most steps whose training time fits in `available_s` seconds: `step_s` per
/// step, plus `knn_s` for each kNN-monitor run (one every `knn_every_epochs` epochs of
/// `steps_per_epoch` steps, and one at the end; `knn_every_epochs` 0: none).
pub fn steps_for_budget(
    available_s: f64,
    step_s: f64,
    steps_per_epoch: u64,
    knn_s: f64,
    knn_every_epochs: u64,
) -> u64 {
    if available_s <= 0.0 || step_s <= 0.0 || steps_per_epoch == 0 {
        return 0;
    }
    let cost = |n: u64| {
        let knn_runs = if knn_every_epochs == 0 || knn_s <= 0.0 {
            0
        } else {
            n / (steps_per_epoch * knn_every_epochs) + 1
        };
        n as f64 * step_s + knn_runs as f64 * knn_s
    };
    // Largest n with cost(n) <= available (cost is increasing): binary search.
    let (mut lo, mut hi) = (0u64, (available_s / step_s).floor() as u64 + 1);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if cost(mid) <= available_s {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

/// Times training steps of a throw-away copy of the run (same config, data and loader)
/// for about `seconds` (at least 3 steps after 2 warm-up steps), and one kNN-monitor
/// evaluation when `knn` is given (its images stay loaded for the run).
fn calibrate(
    cfg: &TrainConfig,
    loader: &Loader,
    amp: Option<Kind>,
    classes: Option<i64>,
    device: Device,
    seconds: f64,
    knn: Option<(&mut KnnMonitor, &KnnSource)>,
) -> Result<Calibration> {
    let mut l = Learner::new(cfg, device, amp, classes);
    let mut rng = SplitMix64::new(cfg.train.seed ^ 0xCA11_B4A7_E000_0001);
    let mut epoch_no = 0;
    let mut epoch = loader.start(Cursor::default());
    let (warmup, min_steps) = (2u64, 3u64);
    let mut done = 0u64;
    let mut t0 = Instant::now();
    loop {
        if STOP.load(Ordering::SeqCst) {
            bail!("stopped by a signal during the time-budget calibration");
        }
        let Some(b) = epoch.next() else {
            epoch_no += 1;
            epoch = loader.start(Cursor {
                epoch: epoch_no,
                consumed: 0,
            });
            continue;
        };
        let mut b = b?;
        l.step(&mut b, &mut rng, 1e-3, 0.99)?;
        done += 1;
        if done == warmup {
            t0 = Instant::now();
        }
        if done >= warmup + min_steps && t0.elapsed().as_secs_f64() >= seconds {
            break;
        }
    }
    drop(epoch);
    let steps = done - warmup;
    let step_s = t0.elapsed().as_secs_f64() / steps as f64;
    let knn_s = match knn {
        Some((m, src)) => {
            m.load(cfg, src)?;
            let t = Instant::now();
            m.top1(&l.online, cfg, src, device)?;
            let s = t.elapsed().as_secs_f64();
            m.calibration_seconds += s;
            s
        }
        None => 0.0,
    };
    Ok(Calibration {
        steps,
        step_s,
        knn_s,
    })
}

/// Std of the L2-normalised rows × √d.
/// The collapse monitor as a scalar tensor on `z`'s device.
fn collapse_monitor(z: &Tensor) -> Tensor {
    let d = z.size()[1] as f64;
    let zn = z / z
        .norm_scalaropt_dim(2, [1i64].as_slice(), true)
        .clamp_min(1e-12);
    zn.std_dim([0i64].as_slice(), true, false).mean(Kind::Float) * d.sqrt()
}

/// Trains (or resumes) a run. `config` is required for a new run; on `--resume` it may be
/// given and is then compared with the run's.
///
/// The loop is a sequence of named steps: [`open_data`] and [`Session::start`] (set-up:
/// precision, time budget, networks, resume), [`Session::step`] (one BYOL step and its
/// metrics row), [`Session::end_epoch`] (kNN monitor, curves, checkpoint) and
/// [`Session::finish`] (the last checkpoint and the summary).
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
    std::fs::create_dir_all(run).with_context(|| format!("creating {}", run.display()))?;
    let _lock = lock_run(run)?;
    let latest = list_checkpoints(run).pop();
    let cfg = run_config(
        config,
        run,
        opts.resume,
        opts.time_budget.is_some(),
        latest.is_some(),
    )?;
    let (loader, labelled) = open_data(&cfg, data, run, opts, decode)?;
    let knn = opts.val.as_ref().map(|val| KnnSource {
        data: data.to_path_buf(),
        val: val.clone(),
        decode,
    });
    let mut s = Session::start(cfg, run, opts, &loader, labelled, latest, knn, t_start)?;
    'epochs: while s.step < s.stop_at {
        let mut epoch = loader.start(s.cursor);
        loop {
            if s.step >= s.stop_at || STOP.load(Ordering::SeqCst) {
                break 'epochs;
            }
            let Some(b) = epoch.next() else { break };
            s.step(b?, &loader)?;
        }
        drop(epoch);
        s.end_epoch()?;
    }
    s.finish(&loader)
}

/// Opens the training data (and checks the held-out data's classes), records it in the
/// run folder, and builds the loader. Returns the loader and the number of classes when
/// every row is labelled (then the online probe runs).
fn open_data(
    cfg: &TrainConfig,
    data: &Path,
    run: &Path,
    opts: &TrainOptions,
    decode: DecodeFn,
) -> Result<(Loader, Option<i64>)> {
    let ds = Dataset::open(data).with_context(|| format!("opening {}", data.display()))?;
    check_run_data(run, data, &ds.manifest, opts.resume)?;
    if let Some(val) = &opts.val {
        let v = Dataset::open(val).with_context(|| format!("opening {}", val.display()))?;
        same_classes(data, &ds.manifest.classes, val, &v.manifest.classes)?;
    }
    let classes = ds.manifest.classes.len() as i64;
    let labelled = (classes > 0 && ds.manifest.totals.unlabeled == 0).then_some(classes);
    let loader = Loader::new(ds, loader_config(cfg), decode)?;
    if loader.batches_per_epoch() == 0 {
        bail!(
            "{} has {} rows per rank, fewer than one batch of {}",
            data.display(),
            loader.samples_per_epoch(),
            cfg.train.batch
        );
    }
    Ok((loader, labelled))
}

/// The precision for this machine, said on stderr (and a loud warning for emulated bf16).
fn choose_precision(cfg: &TrainConfig, device: Device) -> Result<(PrecisionChoice, String)> {
    let hw = crate::amp::Hardware::detect(device);
    let choice = crate::amp::choose_precision(&cfg.train.precision, &hw)
        .map_err(crate::error::Error::Invalid)?;
    eprintln!("byol train: precision {} ({})", choice.name, choice.reason);
    if let Some(w) = &choice.warning {
        tracing::warn!("{w}");
        eprintln!("byol: WARNING: {w}");
    }
    Ok((choice, hw.cpu_summary()))
}

/// What `--time-budget` decided.
struct Budget {
    seconds: f64,
    images_per_s: f64,
    reason: String,
    calibration_seconds: f64,
}

/// Calibrates, then fixes the run's length (`train.total_steps`, and so its schedules)
/// to what fits in `budget` seconds from `t_start`.
#[allow(clippy::too_many_arguments)]
fn fit_budget(
    cfg: &mut TrainConfig,
    budget: f64,
    loader: &Loader,
    choice: &PrecisionChoice,
    labelled: Option<i64>,
    device: Device,
    knn: Option<(&mut KnnMonitor, &KnnSource)>,
    t_start: Instant,
) -> Result<Budget> {
    let t_cal = Instant::now();
    let spe = loader.batches_per_epoch();
    let knn_every = if knn.is_some() {
        cfg.train.knn_every_epochs
    } else {
        0
    };
    let seconds = (budget * 0.03).clamp(10.0, 60.0);
    let c = calibrate(cfg, loader, choice.dtype, labelled, device, seconds, knn)?;
    let spent = t_start.elapsed().as_secs_f64();
    let available = budget * (1.0 - BUDGET_RESERVE) - spent;
    let n = steps_for_budget(available, c.step_s, spe, c.knn_s, knn_every);
    let rate = cfg.train.batch as f64 / c.step_s;
    if n == 0 {
        bail!(
            "--time-budget {budget:.0} s leaves no time for a training step: the calibration took {spent:.0} s and one step takes {:.1} s ({rate:.1} images/s)",
            c.step_s
        );
    }
    let reason = format!(
        "calibrated {rate:.1} images/s ({} steps timed, {:.2} s each){}; {:.0} s of the {budget:.0} s budget left after {spent:.0} s of calibration and a {:.0} % reserve: {n} steps = {:.2} epochs of {spe}",
        c.steps,
        c.step_s,
        if knn_every > 0 { format!(", kNN monitor {:.1} s a run", c.knn_s) } else { String::new() },
        available,
        100.0 * BUDGET_RESERVE,
        n as f64 / spe as f64
    );
    eprintln!("byol train: time budget: {reason}");
    cfg.train.total_steps = n;
    cfg.train.epochs = n.div_ceil(spe);
    Ok(Budget {
        seconds: budget,
        images_per_s: rate,
        reason,
        calibration_seconds: t_cal.elapsed().as_secs_f64(),
    })
}

/// The resolved values `RUN/config.toml` records: this machine's device and precision,
/// and the budget (this start's, or the one the run was started with).
fn resolved(
    cfg: &mut TrainConfig,
    device: Device,
    choice: &PrecisionChoice,
    cpu: String,
    spe: u64,
    budget: Option<&Budget>,
    resume: bool,
) -> Resolved {
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
        device: format!("{device:?}").to_lowercase(),
        precision: choice.name.into(),
        precision_reason: choice.reason.clone(),
        cpu,
        steps_per_epoch: spe,
        time_budget_s,
        calibrated_images_per_s,
        budget_reason,
    }
}

/// The counters of one logging interval.
struct Window {
    t: Instant,
    images: u64,
    correct: f64,
    wait0: f64,
}

/// A run in progress: its config and learner, where it stands, and what it reports.
struct Session<'a> {
    run: &'a Path,
    cfg: TrainConfig,
    device: Device,
    choice: PrecisionChoice,
    l: Learner,
    knn: Option<KnnSource>,
    monitor: KnnMonitor,
    // Schedule.
    total: u64,
    warmup: u64,
    peak_lr: f64,
    stop_at: u64,
    // Position: what a checkpoint stores.
    step: u64,
    cursor: Cursor,
    rng: SplitMix64,
    last_loss: f64,
    // Checkpoints, monitors and reporting.
    latest: Option<PathBuf>,
    last_ckpt: Option<PathBuf>,
    last_knn_step: u64,
    low_collapse: u64,
    metrics: std::fs::File,
    win: Window,
    bar: Progress,
    t_start: Instant,
    run_t0: Instant,
    run_step0: u64,
    run_wait0: f64,
    run_failures0: u64,
    time_budget: Option<f64>,
    calibration_seconds: Option<f64>,
}

impl<'a> Session<'a> {
    /// Set-up: threads, device and precision; the time budget (a new run); the resolved
    /// config written to `RUN/config.toml`; the networks, restored from the latest
    /// checkpoint on `--resume`; the metrics file and the progress display.
    #[allow(clippy::too_many_arguments)]
    fn start(
        mut cfg: TrainConfig,
        run: &'a Path,
        opts: &TrainOptions,
        loader: &Loader,
        labelled: Option<i64>,
        latest: Option<PathBuf>,
        knn: Option<KnnSource>,
        t_start: Instant,
    ) -> Result<Session<'a>> {
        if cfg.train.torch_threads > 0 {
            tch::set_num_threads(cfg.train.torch_threads);
        }
        let device = device_of(&cfg.train.device)?;
        let (choice, cpu) = choose_precision(&cfg, device)?;
        let spe = loader.batches_per_epoch();
        let mut monitor = KnnMonitor::default();
        let budget = match opts.time_budget {
            Some(b) => {
                let knn = knn
                    .as_ref()
                    .filter(|_| cfg.train.knn_every_epochs > 0)
                    .map(|s| (&mut monitor, s));
                Some(fit_budget(
                    &mut cfg, b, loader, &choice, labelled, device, knn, t_start,
                )?)
            }
            None => None,
        };
        let r = resolved(
            &mut cfg,
            device,
            &choice,
            cpu,
            spe,
            budget.as_ref(),
            opts.resume,
        );
        cfg.resolved = Some(r);
        // The config is written before training starts.
        write_atomic(&run::config_path(run), cfg.to_toml().as_bytes())?;

        let mut l = Learner::new(&cfg, device, choice.dtype, labelled);
        let total = if cfg.train.total_steps > 0 {
            cfg.train.total_steps
        } else {
            spe * cfg.train.epochs
        };
        let (step, cursor, rng, last_loss) = match latest.as_ref().filter(|_| opts.resume) {
            Some(dir) => l.restore(dir)?,
            None => (
                0,
                Cursor::default(),
                SplitMix64::new(cfg.train.seed ^ 0x00A5_5A00_B10B_5EED),
                f64::NAN,
            ),
        };
        let stop_at = opts.max_steps.unwrap_or(total).min(total);
        let metrics_path = run::metrics_path(run);
        let metrics = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .with_context(|| format!("opening {}", metrics_path.display()))?;
        let bar = Progress::new(Mode::detect(opts.progress), "train", stop_at, "steps", step);
        let stats = loader.stats();
        Ok(Session {
            run,
            warmup: (cfg.optim.warmup_epochs * spe as f64).round() as u64,
            peak_lr: cfg.optim.base_lr * cfg.train.batch as f64 / 256.0,
            cfg,
            device,
            choice,
            l,
            knn,
            monitor,
            total,
            stop_at,
            step,
            cursor,
            rng,
            last_loss,
            latest,
            last_ckpt: None,
            last_knn_step: u64::MAX,
            low_collapse: 0,
            metrics,
            win: Window {
                t: Instant::now(),
                images: 0,
                correct: 0.0,
                wait0: stats.consumer_wait_s,
            },
            bar,
            t_start,
            run_t0: Instant::now(),
            run_step0: step,
            run_wait0: stats.consumer_wait_s,
            run_failures0: stats.decode_failures,
            time_budget: opts.time_budget,
            calibration_seconds: budget.map(|b| b.calibration_seconds),
        })
    }

    /// One BYOL step on batch `b` at this step's learning rate and τ, then the collapse
    /// monitor, a metrics row every `train.log_every` steps and a checkpoint every
    /// `train.checkpoint_every`.
    fn step(&mut self, mut b: byol_pipeline::loader::Batch, loader: &Loader) -> Result<()> {
        let lr = lr_at(self.peak_lr, self.step, self.warmup, self.total);
        let tau = tau_at(self.cfg.train.tau_base, self.step, self.total);
        let r = self.l.step(&mut b, &mut self.rng, lr, tau)?;
        if !r.loss.is_finite() {
            bail!(
                "loss is {} at step {}; stopping. The last good checkpoint is {}",
                r.loss,
                self.step,
                self.last_ckpt
                    .as_ref()
                    .or(self.latest.as_ref())
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "none".into())
            );
        }
        self.step += 1;
        self.cursor = b.cursor;
        self.last_loss = r.loss;
        self.win.images += b.len() as u64;
        self.win.correct += r.correct;
        drop(b);
        self.watch_collapse(r.collapse);
        if self.step.is_multiple_of(self.cfg.train.log_every.max(1)) || self.step == self.stop_at {
            self.log(lr, tau, r.collapse, loader)?;
        }
        self.bar.set_position(self.step);
        if self
            .step
            .is_multiple_of(self.cfg.train.checkpoint_every.max(1))
        {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Warns once when the projections have had almost no spread for
    /// `train.collapse_span` steps.
    fn watch_collapse(&mut self, collapse: f64) {
        if collapse >= self.cfg.train.collapse_threshold {
            self.low_collapse = 0;
            return;
        }
        self.low_collapse += 1;
        if self.low_collapse == self.cfg.train.collapse_span {
            tracing::error!(
                step = self.step,
                collapse,
                "COLLAPSE: the projections have had almost no spread for {} steps",
                self.cfg.train.collapse_span
            );
            eprintln!(
                "byol: warning: representation collapse suspected at step {} (monitor {collapse:.4})",
                self.step
            );
        }
    }

    /// Appends one line to `RUN/metrics.jsonl`.
    fn append(&mut self, line: &str) -> Result<()> {
        writeln!(self.metrics, "{line}")
            .with_context(|| format!("writing {}", run::metrics_path(self.run).display()))
    }

    /// Writes the interval's metrics row and updates the progress message.
    fn log(&mut self, lr: f64, tau: f64, collapse: f64, loader: &Loader) -> Result<()> {
        let dt = self.win.t.elapsed().as_secs_f64().max(1e-9);
        let wait = loader.stats().consumer_wait_s;
        let m = Metrics {
            step: self.step,
            epoch: self.cursor.epoch,
            loss: self.last_loss,
            lr,
            tau,
            images_per_s: self.win.images as f64 / dt,
            stall: ((wait - self.win.wait0) / dt).clamp(0.0, 1.0),
            collapse,
            probe_acc: self
                .l
                .probe
                .as_ref()
                .map(|_| self.win.correct / self.win.images.max(1) as f64),
        };
        self.append(&serde_json::to_string(&m)?)?;
        self.bar.set_message(format!(
            "loss {:.4}, lr {lr:.4}, tau {tau:.4}, {:.0} images/s, stall {:.0} %",
            m.loss,
            m.images_per_s,
            100.0 * m.stall
        ));
        self.win = Window {
            t: Instant::now(),
            images: 0,
            correct: 0.0,
            wait0: wait,
        };
        Ok(())
    }

    /// Saves a checkpoint of the current state (networks, optimizer, probe, cursor, RNG).
    fn checkpoint(&mut self) -> Result<()> {
        let st = CheckpointState {
            step: self.step,
            cursor: self.cursor,
            aug_rng: self.rng.state(),
            last_loss: self.last_loss,
            config: self.cfg.clone(),
        };
        let parts = CheckpointParts {
            online: &self.l.online,
            target: &self.l.target,
            optimizer: self.l.opt.state(),
            probe: self.l.probe.as_ref().map(Probe::named),
        };
        self.last_ckpt = Some(save_checkpoint(self.run, parts, &st, self.cfg.train.keep)?);
        Ok(())
    }

    /// Runs the kNN monitor (when due) and appends its row; returns its accuracy.
    fn knn_row(&mut self, epoch: u64) -> Result<Option<f64>> {
        let Some(src) = &self.knn else {
            return Ok(None);
        };
        let acc = self
            .monitor
            .top1(&self.l.online, &self.cfg, src, self.device)?;
        self.last_knn_step = self.step;
        let row = KnnRow {
            step: self.step,
            epoch,
            knn_top1: acc,
        };
        self.append(&serde_json::to_string(&row)?)?;
        Ok(Some(acc))
    }

    /// At an epoch's end: the cursor moves to the next epoch, the kNN monitor runs every
    /// `train.knn_every_epochs`, `curves.png` is redrawn and a checkpoint saved.
    fn end_epoch(&mut self) -> Result<()> {
        self.cursor = Cursor {
            epoch: self.cursor.epoch + 1,
            consumed: 0,
        };
        let every = self.cfg.train.knn_every_epochs;
        if every > 0 && self.cursor.epoch.is_multiple_of(every) {
            if let Some(acc) = self.knn_row(self.cursor.epoch)? {
                self.bar.println(&format!(
                    "epoch {}: kNN top-1 {:.2} %",
                    self.cursor.epoch,
                    100.0 * acc
                ));
            }
        }
        if let Err(e) = draw_curves(self.run) {
            tracing::warn!("curves.png not written: {}", byol_format::error_chain(&e));
        }
        self.checkpoint()
    }

    /// After the last step (or a signal): the run's final kNN row when it finished
    /// between epoch ends, the curves, a checkpoint at the step reached, the summary.
    fn finish(mut self, loader: &Loader) -> Result<TrainSummary> {
        self.bar.finish();
        let knn_due = self.cfg.train.knn_every_epochs > 0
            && self.step > self.run_step0
            && self.last_knn_step != self.step
            && self.step == self.total;
        if knn_due {
            self.knn_row(self.cursor.epoch + 1)?;
        }
        if let Err(e) = draw_curves(self.run) {
            tracing::warn!("curves.png not written: {}", byol_format::error_chain(&e));
        }
        let stopped = STOP.load(Ordering::SeqCst);
        // Always leave a checkpoint at the step reached.
        let have = self
            .last_ckpt
            .as_ref()
            .is_some_and(|p| p.ends_with(format!("step-{:09}", self.step)));
        if !have && self.step > 0 {
            self.checkpoint()?;
        }
        let secs = self.run_t0.elapsed().as_secs_f64().max(1e-9);
        let knn_in_run = self.monitor.seconds - self.monitor.calibration_seconds;
        let images = ((self.step - self.run_step0) * self.cfg.train.batch as u64) as f64;
        let stats = loader.stats();
        Ok(TrainSummary {
            command: "train".into(),
            run: self.run.display().to_string(),
            steps: self.step,
            total_steps: self.total,
            epoch: self.cursor.epoch,
            last_loss: self.last_loss,
            images_per_s: images / secs,
            train_images_per_s: images / (secs - knn_in_run).max(1e-9),
            monitor_seconds: knn_in_run,
            data_stall: ((stats.consumer_wait_s - self.run_wait0) / secs).clamp(0.0, 1.0),
            decode_failures: stats.decode_failures - self.run_failures0,
            checkpoint: self
                .last_ckpt
                .or(self.latest)
                .map(|p| p.display().to_string()),
            stopped_by_signal: stopped,
            seconds: self.t_start.elapsed().as_secs_f64(),
            precision: self.choice.name.into(),
            precision_reason: self.choice.reason,
            time_budget_s: self.time_budget,
            calibration_seconds: self.calibration_seconds,
        })
    }
}

/// Where the kNN monitor's images come from: the training shards (bank) and the
/// held-out shards (queries).
struct KnnSource {
    data: PathBuf,
    val: PathBuf,
    decode: DecodeFn,
}

/// The kNN monitor's images: the first `knn_bank` training images and the first
/// `knn_queries` held-out ones (inputs and labels), decoded once per run.
struct KnnSet {
    bank: (Tensor, Tensor),
    queries: (Tensor, Tensor),
    classes: i64,
}

impl KnnSet {
    fn load(cfg: &TrainConfig, src: &KnnSource) -> Result<KnnSet> {
        use crate::eval::load_inputs;
        let (canvas, size) = (cfg.data.canvas, cfg.augment.size);
        let bank = load_inputs(
            &src.data,
            canvas,
            size,
            src.decode,
            Some(cfg.train.knn_bank),
        )?;
        let queries = load_inputs(
            &src.val,
            canvas,
            size,
            src.decode,
            Some(cfg.train.knn_queries),
        )?;
        let classes = bank
            .1
            .max()
            .int64_value(&[])
            .max(queries.1.max().int64_value(&[]))
            + 1;
        Ok(KnnSet {
            bank,
            queries,
            classes,
        })
    }

    /// kNN (k = 20) top-1 of the queries against the bank, with the online encoder in
    /// eval mode.
    fn top1(&self, online: &Network, cfg: &TrainConfig, device: Device) -> f64 {
        use crate::eval::{features, knn};
        let fb = features(online, &self.bank.0, cfg, device);
        let fq = features(online, &self.queries.0, cfg, device);
        knn(
            &fb,
            &self.bank.1,
            &fq,
            &self.queries.1,
            self.classes,
            &[20],
            0.07,
        )[0]
    }
}

/// The kNN monitor: its images, decoded on first use, and the seconds it has taken
/// (excluded from `train_images_per_s`).
#[derive(Default)]
struct KnnMonitor {
    set: Option<KnnSet>,
    seconds: f64,
    /// Of `seconds`, what the time-budget calibration spent.
    calibration_seconds: f64,
}

impl KnnMonitor {
    /// Decodes the images (once); its time counts as calibration.
    fn load(&mut self, cfg: &TrainConfig, src: &KnnSource) -> Result<()> {
        let t = Instant::now();
        if self.set.is_none() {
            self.set = Some(KnnSet::load(cfg, src)?);
        }
        let s = t.elapsed().as_secs_f64();
        self.seconds += s;
        self.calibration_seconds += s;
        Ok(())
    }

    fn top1(
        &mut self,
        online: &Network,
        cfg: &TrainConfig,
        src: &KnnSource,
        device: Device,
    ) -> Result<f64> {
        let t = Instant::now();
        if self.set.is_none() {
            self.set = Some(KnnSet::load(cfg, src)?);
        }
        let acc = self
            .set
            .as_ref()
            .expect("loaded above")
            .top1(online, cfg, device);
        self.seconds += t.elapsed().as_secs_f64();
        Ok(acc)
    }
}

/// The online and target networks (target = copy of online) and the optimizer of a
/// config, seeded with `train.seed`.
pub fn build_model(cfg: &TrainConfig, device: Device) -> (Network, Network, Optimizer) {
    tch::manual_seed(cfg.train.seed as i64);
    let mut online = Network::new(
        device,
        &cfg.model.encoder,
        &cfg.model.projector,
        Some(&cfg.model.predictor),
    );
    let mut target = Network::new(device, &cfg.model.encoder, &cfg.model.projector, None);
    copy_into(&target.vs, &online.vs);
    if cfg.train.channels_last {
        online.to_channels_last();
        target.to_channels_last();
    }
    let o = &cfg.optim;
    let mut opt = Optimizer::new(o.kind, o.momentum, o.weight_decay, o.trust);
    opt.beta2 = o.beta2;
    opt.eps = o.eps;
    (online, target, opt)
}

/// The training loader's settings for a config.
pub fn loader_config(cfg: &TrainConfig) -> LoaderConfig {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    LoaderConfig {
        batch: cfg.train.batch,
        canvas: cfg.data.canvas,
        seed: cfg.train.seed,
        window: cfg.data.window,
        decode_threads: if cfg.data.decode_threads == 0 {
            cores
        } else {
            cfg.data.decode_threads
        },
        drop_last: true,
        ..LoaderConfig::default()
    }
}

#[cfg(test)]
mod budget_tests {
    use super::steps_for_budget;

    #[test]
    fn steps_fill_the_budget_without_passing_it() {
        // 100 s at 0.5 s a step, no kNN monitor: 200 steps.
        assert_eq!(steps_for_budget(100.0, 0.5, 50, 0.0, 0), 200);
        // 1,110 s of a 20-minute budget at 113 images/s (batch 256: 2.265 s a step).
        let n = steps_for_budget(1110.0, 256.0 / 113.0, 234, 0.0, 1);
        assert_eq!(n, 489);
        assert!(n as f64 * 256.0 / 113.0 <= 1110.0);
        assert!((n + 1) as f64 * 256.0 / 113.0 > 1110.0);
    }

    #[test]
    fn knn_passes_are_paid_for() {
        // 10 steps of 1 s per epoch, a 5 s kNN pass at each epoch end and at the end:
        // 65 steps cross 6 epoch ends, 65 + 7·5 = 100 s.
        let n = steps_for_budget(100.0, 1.0, 10, 5.0, 1);
        assert_eq!(n, 65);
        let cost = |n: u64| n as f64 + (n / 10 + 1) as f64 * 5.0;
        assert!(cost(n) <= 100.0 && cost(n + 1) > 100.0);
        // Every second epoch only.
        // Every second epoch only: 79 steps, 3 passes + the last, 79 + 4·5 = 99 s.
        assert_eq!(steps_for_budget(100.0, 1.0, 10, 5.0, 2), 79);
    }

    #[test]
    fn no_time_means_no_steps() {
        assert_eq!(steps_for_budget(-3.0, 1.0, 10, 0.0, 0), 0);
        assert_eq!(steps_for_budget(0.5, 1.0, 10, 0.0, 0), 0);
        assert_eq!(steps_for_budget(10.0, 1.0, 0, 0.0, 0), 0);
    }
}
