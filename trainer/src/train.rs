//! `byol train`: the training loop, checkpoints and exact resume.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use byol_pipeline::augment::{Augmenter, SplitMix64};
use byol_pipeline::loader::DecodeFn;
use byol_pipeline::{Cursor, Dataset, Loader, LoaderConfig};

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
    let cfg_path = run::config_path(run);
    let latest = list_checkpoints(run).pop();
    let mut cfg = run_config(
        config,
        run,
        opts.resume,
        opts.time_budget.is_some(),
        latest.is_some(),
    )?;

    if cfg.train.torch_threads > 0 {
        tch::set_num_threads(cfg.train.torch_threads);
    }
    let device = device_of(&cfg.train.device)?;
    let hw = crate::amp::Hardware::detect(device);
    let choice =
        crate::amp::choose_precision(&cfg.train.precision, &hw).map_err(anyhow::Error::msg)?;
    eprintln!("byol train: precision {} ({})", choice.name, choice.reason);
    if let Some(w) = &choice.warning {
        tracing::warn!("{w}");
        eprintln!("byol: WARNING: {w}");
    }
    let amp = choice.dtype;

    let ds = Dataset::open(data).with_context(|| format!("opening {}", data.display()))?;
    check_run_data(run, data, &ds.manifest, opts.resume)?;
    if let Some(val) = &opts.val {
        let v = Dataset::open(val).with_context(|| format!("opening {}", val.display()))?;
        same_classes(data, &ds.manifest.classes, val, &v.manifest.classes)?;
    }
    let lc = loader_config(&cfg);
    let classes = ds.manifest.classes.len() as i64;
    let labelled = (classes > 0 && ds.manifest.totals.unlabeled == 0).then_some(classes);
    let loader = Loader::new(ds, lc, decode)?;
    let spe = loader.batches_per_epoch();
    if spe == 0 {
        bail!(
            "{} has {} rows per rank, fewer than one batch of {}",
            data.display(),
            loader.samples_per_epoch(),
            cfg.train.batch
        );
    }
    let mut monitor = KnnMonitor::default();
    let knn_src = opts.val.as_ref().map(|val| KnnSource {
        data: data.to_path_buf(),
        val: val.clone(),
        decode,
    });
    let knn_on = cfg.train.knn_every_epochs > 0;

    // A time budget: measure, then fix the run's length (and so its schedules) in its
    // config before the first real step.
    let mut calibration_seconds = None;
    let mut resolved_budget = None;
    if let Some(budget) = opts.time_budget {
        let t_cal = Instant::now();
        let seconds = (budget * 0.03).clamp(10.0, 60.0);
        let knn = knn_src
            .as_ref()
            .filter(|_| knn_on)
            .map(|s| (&mut monitor, s));
        let c = calibrate(&cfg, &loader, amp, labelled, device, seconds, knn)?;
        calibration_seconds = Some(t_cal.elapsed().as_secs_f64());
        let spent = t_start.elapsed().as_secs_f64();
        let available = budget * (1.0 - BUDGET_RESERVE) - spent;
        let knn_every = if knn_src.is_some() {
            cfg.train.knn_every_epochs
        } else {
            0
        };
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
        resolved_budget = Some((budget, rate, reason));
    }
    let prev = cfg.resolved.take();
    if let Some(p) = prev
        .as_ref()
        .filter(|p| opts.resume && p.precision != choice.name)
    {
        eprintln!(
            "byol train: precision changes from {} (when the run last started: {}) to {} on this machine",
            p.precision, p.precision_reason, choice.name
        );
    }
    let (time_budget_s, calibrated_images_per_s, budget_reason) = match resolved_budget {
        Some((b, r, why)) => (Some(b), Some(r), Some(why)),
        None => prev
            .map(|p| (p.time_budget_s, p.calibrated_images_per_s, p.budget_reason))
            .unwrap_or_default(),
    };
    cfg.resolved = Some(Resolved {
        device: format!("{device:?}").to_lowercase(),
        precision: choice.name.into(),
        precision_reason: choice.reason.clone(),
        cpu: hw.cpu_summary(),
        steps_per_epoch: spe,
        time_budget_s,
        calibrated_images_per_s,
        budget_reason,
    });
    // The config is written before training starts.
    write_atomic(&cfg_path, cfg.to_toml().as_bytes())?;

    let mut l = Learner::new(&cfg, device, amp, labelled);
    let total = if cfg.train.total_steps > 0 {
        cfg.train.total_steps
    } else {
        spe * cfg.train.epochs
    };
    let warmup = (cfg.optim.warmup_epochs * spe as f64).round() as u64;
    let peak_lr = cfg.optim.base_lr * cfg.train.batch as f64 / 256.0;

    let mut step = 0u64;
    let mut cursor = Cursor::default();
    let mut rng = SplitMix64::new(cfg.train.seed ^ 0x00A5_5A00_B10B_5EED);
    let mut last_loss = f64::NAN;
    if opts.resume {
        if let Some(dir) = &latest {
            let c = load_checkpoint(dir, &mut l.online, &mut l.target)?;
            if let Some(o) = c.optimizer {
                l.opt.load_state(o, device);
            }
            if let (Some(p), Some(named)) = (l.probe.as_mut(), c.probe) {
                p.load(named, device);
            }
            let st = c.state;
            step = st.step;
            cursor = st.cursor;
            rng = SplitMix64::new(st.aug_rng);
            last_loss = st.last_loss;
        }
    }
    let stop_at = opts.max_steps.unwrap_or(total).min(total);
    let metrics_path = run::metrics_path(run);
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .with_context(|| format!("opening {}", metrics_path.display()))?;
    let mut bar = Progress::new(Mode::detect(opts.progress), "train", stop_at, "steps", step);

    let mut last_ckpt: Option<PathBuf> = None;
    let mut low_collapse = 0u64;
    let mut win_t = Instant::now();
    let mut win_imgs = 0u64;
    let mut win_correct = 0.0f64;
    let mut last_knn_step = u64::MAX;
    let mut win_wait0 = loader.stats().consumer_wait_s;
    let run_t0 = Instant::now();
    let run_step0 = step;
    let run_wait0 = loader.stats().consumer_wait_s;
    let run_failures0 = loader.stats().decode_failures;
    let state_of = |step: u64, cursor: Cursor, rng: &SplitMix64, loss: f64| CheckpointState {
        step,
        cursor,
        aug_rng: rng.state(),
        last_loss: loss,
        config: cfg.clone(),
    };
    // Writes a checkpoint of the current state (networks, optimizer, probe, cursor, RNG).
    macro_rules! checkpoint {
        ($loss:expr) => {
            save_checkpoint(
                run,
                CheckpointParts {
                    online: &l.online,
                    target: &l.target,
                    optimizer: l.opt.state(),
                    probe: l.probe.as_ref().map(Probe::named),
                },
                &state_of(step, cursor, &rng, $loss),
                cfg.train.keep,
            )?
        };
    }
    'epochs: while step < stop_at {
        let mut epoch = loader.start(cursor);
        let at_epoch_end: bool;
        loop {
            if step >= stop_at || STOP.load(Ordering::SeqCst) {
                break 'epochs;
            }
            let Some(b) = epoch.next() else {
                at_epoch_end = true;
                break;
            };
            let mut b = b?;
            let lr = lr_at(peak_lr, step, warmup, total);
            let tau = tau_at(cfg.train.tau_base, step, total);
            let r = l.step(&mut b, &mut rng, lr, tau)?;
            let (lv, collapse) = (r.loss, r.collapse);
            win_correct += r.correct;
            if !lv.is_finite() {
                bail!(
                    "loss is {lv} at step {step}; stopping. The last good checkpoint is {}",
                    last_ckpt
                        .as_ref()
                        .or(latest.as_ref())
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| "none".into())
                );
            }
            step += 1;
            cursor = b.cursor;
            last_loss = lv;
            win_imgs += b.len() as u64;
            drop(b);
            if collapse < cfg.train.collapse_threshold {
                low_collapse += 1;
                if low_collapse == cfg.train.collapse_span {
                    tracing::error!(
                        step,
                        collapse,
                        "COLLAPSE: the projections have had almost no spread for {} steps",
                        cfg.train.collapse_span
                    );
                    eprintln!("byol: warning: representation collapse suspected at step {step} (monitor {collapse:.4})");
                }
            } else {
                low_collapse = 0;
            }
            if step.is_multiple_of(cfg.train.log_every.max(1)) || step == stop_at {
                let dt = win_t.elapsed().as_secs_f64().max(1e-9);
                let wait = loader.stats().consumer_wait_s;
                let m = Metrics {
                    step,
                    epoch: cursor.epoch,
                    loss: lv,
                    lr,
                    tau,
                    images_per_s: win_imgs as f64 / dt,
                    stall: ((wait - win_wait0) / dt).clamp(0.0, 1.0),
                    collapse,
                    probe_acc: l
                        .probe
                        .as_ref()
                        .map(|_| win_correct / win_imgs.max(1) as f64),
                };
                writeln!(metrics, "{}", serde_json::to_string(&m)?)?;
                bar.set_message(format!(
                    "loss {lv:.4}, lr {lr:.4}, tau {tau:.4}, {:.0} images/s, stall {:.0} %",
                    m.images_per_s,
                    100.0 * m.stall
                ));
                win_t = Instant::now();
                win_imgs = 0;
                win_correct = 0.0;
                win_wait0 = wait;
            }
            bar.set_position(step);
            if step.is_multiple_of(cfg.train.checkpoint_every.max(1)) {
                last_ckpt = Some(checkpoint!(lv));
            }
        }
        drop(epoch);
        if at_epoch_end {
            cursor = Cursor {
                epoch: cursor.epoch + 1,
                consumed: 0,
            };
            if let Some(src) = &knn_src {
                if knn_on && cursor.epoch.is_multiple_of(cfg.train.knn_every_epochs) {
                    let acc = monitor.top1(&l.online, &cfg, src, device)?;
                    last_knn_step = step;
                    let row = KnnRow {
                        step,
                        epoch: cursor.epoch,
                        knn_top1: acc,
                    };
                    writeln!(metrics, "{}", serde_json::to_string(&row)?)?;
                    bar.println(&format!(
                        "epoch {}: kNN top-1 {:.2} %",
                        cursor.epoch,
                        100.0 * acc
                    ));
                }
            }
            if let Err(e) = draw_curves(run) {
                tracing::warn!("curves.png not written: {e}");
            }
            last_ckpt = Some(checkpoint!(last_loss));
        }
    }
    bar.finish();
    // The run's last state gets a kNN row too (the final epoch end is not reached when
    // the step budget ends exactly there).
    if let Some(src) = &knn_src {
        if knn_on && step > run_step0 && last_knn_step != step && step == total {
            let acc = monitor.top1(&l.online, &cfg, src, device)?;
            let row = KnnRow {
                step,
                epoch: cursor.epoch + 1,
                knn_top1: acc,
            };
            writeln!(metrics, "{}", serde_json::to_string(&row)?)?;
        }
    }
    let _ = draw_curves(run);
    let stopped = STOP.load(Ordering::SeqCst);
    // Always leave a checkpoint at the step we stopped at.
    let have = last_ckpt
        .as_ref()
        .is_some_and(|p| p.ends_with(format!("step-{step:09}")));
    if !have && step > 0 {
        last_ckpt = Some(checkpoint!(last_loss));
    }
    let secs = run_t0.elapsed().as_secs_f64().max(1e-9);
    let knn_in_run = monitor.seconds - monitor.calibration_seconds;
    Ok(TrainSummary {
        command: "train".into(),
        run: run.display().to_string(),
        steps: step,
        total_steps: total,
        epoch: cursor.epoch,
        last_loss,
        images_per_s: ((step - run_step0) * cfg.train.batch as u64) as f64 / secs,
        train_images_per_s: ((step - run_step0) * cfg.train.batch as u64) as f64
            / (secs - knn_in_run).max(1e-9),
        monitor_seconds: knn_in_run,
        data_stall: ((loader.stats().consumer_wait_s - run_wait0) / secs).clamp(0.0, 1.0),
        decode_failures: loader.stats().decode_failures - run_failures0,
        checkpoint: last_ckpt
            .map(|p| p.display().to_string())
            .or_else(|| latest.map(|p| p.display().to_string())),
        stopped_by_signal: stopped,
        seconds: t_start.elapsed().as_secs_f64(),
        precision: choice.name.into(),
        precision_reason: choice.reason,
        time_budget_s: opts.time_budget,
        calibration_seconds,
    })
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
