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

use byol_dist::{Backend, DistEnv, ProcessGroup};
use byol_pipeline::augment::{Augmenter, SplitMix64};
use byol_pipeline::loader::DecodeFn;
use byol_pipeline::{Cursor, Dataset, Loader, LoaderConfig, Split};

use crate::amp::PrecisionChoice;
use crate::byol::{
    channels_last, copy_into, lr_at, named_gradients, tau_at, train_step_synced, Network,
    Optimizer, StepSettings,
};
use crate::config::{Resolved, TrainConfig};
use crate::run::{
    self, check_run_data, device_of, draw_curves, list_checkpoints, load_checkpoint, lock_run,
    run_config, same_classes, save_checkpoint, write_atomic, CheckpointParts, CheckpointState,
    KnnRow, Metrics, RankState,
};
use byol_format::progress::{Mode, Progress};

/// Set by the first SIGINT/SIGTERM: finish the step, checkpoint, exit.
pub static STOP: LazyLock<Arc<AtomicBool>> = LazyLock::new(|| Arc::new(AtomicBool::new(false)));

/// Takes SIGINT/SIGTERM for [`STOP`]: the first signal sets it; a second one, while a
/// long checkpoint or kNN evaluation is still finishing, ends the process at once with
/// exit code 130 (`_exit`: the run keeps its last complete checkpoint). SIGHUP (a
/// worker's launcher died, see `byol_dist::launch`) sets [`STOP`] however often it comes.
///
/// The two signals are blocked in the calling thread, and so in every thread created
/// after it (libtorch's, Gloo's, the loader's), and one thread waits for them with
/// `sigwait(2)`. A handler would run on whichever thread the kernel picks: a signal
/// landing on a Gloo or TCPStore thread interrupts its `epoll_wait` (`EINTR`), which
/// c10d reports as a failed collective. Call it first, before any thread starts.
///
/// # Errors
/// The operating system refused to change the signal mask or to start the thread.
pub fn install_signal_handlers() -> std::io::Result<()> {
    // SAFETY: sigset_t is plain data; these calls only fill and apply it.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        set
    };
    let stop = Arc::clone(&STOP);
    std::thread::Builder::new()
        .name("byol-signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: waits for one of the blocked signals in `set`.
            let rc = unsafe { libc::sigwait(&set, &mut sig) };
            if rc != 0 {
                continue;
            }
            if stop.swap(true, Ordering::SeqCst) && sig != libc::SIGHUP {
                // At once: exit() would run libtorch's static destructors while the
                // training thread still uses them.
                // SAFETY: ends the process without running anything else.
                unsafe { libc::_exit(130) };
            }
        })?;
    Ok(())
}

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

    /// One SGD step on (embedding, labels), its gradients averaged over `group`'s ranks;
    /// returns the number of correct predictions before the step (a scalar on the device).
    fn step(
        &mut self,
        y: &Tensor,
        labels: &Tensor,
        group: Option<&ProcessGroup>,
    ) -> Result<Tensor> {
        use tch::nn::Module;
        let logits = self.lin.forward(y);
        let correct = logits
            .argmax(1, false)
            .eq_tensor(labels)
            .to_kind(Kind::Float)
            .sum(Kind::Float);
        // Mean over the labelled rows (label -100: a replaced sample); 0, not NaN, when a
        // rank's batch has none, so that averaging over ranks stays finite.
        let valid = labels.ge(0).sum(Kind::Float).clamp_min(1.0);
        let loss =
            logits.cross_entropy_loss::<Tensor>(labels, None, tch::Reduction::Sum, -100, 0.0)
                / valid;
        crate::byol::zero_grad(&self.vs);
        loss.f_backward()?;
        if let Some(g) = group {
            g.average_gradients(&named_gradients(&self.vs))?;
        }
        self.opt.step(&self.vs, 0.05);
        Ok(correct)
    }

    /// Every tensor of the probe (weights, then optimizer buffers), in name order.
    fn tensors(&self) -> Vec<Tensor> {
        let mut v = sorted_variables(&self.vs);
        v.extend(self.opt.buffers_in_order());
        v
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
    /// The process group of a distributed run (gradients averaged, SyncBatchNorm).
    group: Option<Arc<ProcessGroup>>,
}

/// Every variable of `vs`, sorted by name.
fn sorted_variables(vs: &tch::nn::VarStore) -> Vec<Tensor> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v.into_iter().map(|(_, t)| t).collect()
}

/// The host-side values of one step.
struct StepResult {
    loss: f64,
    collapse: f64,
    /// Correct online-probe predictions in the batch (0 without labels).
    correct: f64,
}

impl Learner {
    /// Networks seeded with `train.seed`; a probe when the data has `classes` > 0. With a
    /// process group the BatchNorm layers are SyncBatchNorm (unless `model.sync_bn` is
    /// false) and gradients are averaged over its ranks.
    fn new(
        cfg: &TrainConfig,
        device: Device,
        amp: Option<Kind>,
        classes: Option<i64>,
        group: Option<Arc<ProcessGroup>>,
    ) -> Learner {
        let (mut online, mut target, opt) = build_model(cfg, device);
        if let Some(g) = group.as_ref().filter(|_| cfg.model.sync_bn.unwrap_or(true)) {
            online.sync_batch_norm(g);
            target.sync_batch_norm(g);
        }
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
            group,
        }
    }

    /// Copies rank `root`'s networks (weights and BatchNorm buffers), optimizer state and
    /// probe into every rank (in name order), so that all ranks start identical.
    fn broadcast_from(&self, root: usize) -> Result<()> {
        let Some(g) = &self.group else {
            return Ok(());
        };
        let mut all = sorted_variables(&self.online.vs);
        all.extend(sorted_variables(&self.target.vs));
        all.extend(self.opt.buffers_in_order());
        if let Some(p) = &self.probe {
            all.extend(p.tensors());
        }
        g.broadcast_all(&all, root)?;
        Ok(())
    }

    /// Loads checkpoint `dir` into the networks, optimizer and probe; returns its state.
    fn restore(&mut self, dir: &Path) -> Result<CheckpointState> {
        let c = load_checkpoint(dir, &mut self.online, &mut self.target)?;
        if let Some(o) = c.optimizer {
            self.opt.load_state(o, self.device);
        }
        if let (Some(p), Some(named)) = (self.probe.as_mut(), c.probe) {
            p.load(named, self.device);
        }
        Ok(c.state)
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
        let group = self.group.as_deref();
        let (loss, z1, y1) = train_step_synced(
            &self.online,
            &self.target,
            &mut self.opt,
            &v1,
            &v2,
            settings,
            group,
        )?;
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
        // Every rank steps the probe (its gradient average is a collective), labelled
        // batch or not.
        let run_probe = any_label || group.is_some();
        let correct = match self.probe.as_mut().filter(|_| run_probe) {
            Some(p) => {
                let labels = Tensor::from_slice(&labels).to_device(device);
                Some(p.step(&y1, &labels, group)?)
            }
            None => None,
        };
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
    let mut l = Learner::new(cfg, device, amp, classes, None);
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
    let env = DistEnv::from_env()?;
    let writer = env.as_ref().is_none_or(|e| e.rank == 0);
    // Rank 0 makes the folder and holds the lock; the others write nothing in it.
    let _lock = if writer {
        std::fs::create_dir_all(run).with_context(|| format!("creating {}", run.display()))?;
        Some(lock_run(run)?)
    } else {
        None
    };
    let latest = list_checkpoints(run).pop();
    let mut opts = opts.clone();
    if opts.resume_auto {
        opts.resume = latest.is_some();
        if writer {
            match &latest {
                Some(c) => eprintln!("byol train: --resume auto: continuing from {}", c.display()),
                None => eprintln!(
                    "byol train: --resume auto: no checkpoint in {}, starting a new run",
                    run.display()
                ),
            }
        }
        if opts.resume {
            // A restart keeps the length its first start chose.
            opts.time_budget = None;
        }
    }
    let cfg = run_config(
        config,
        run,
        opts.resume,
        opts.time_budget.is_some(),
        latest.is_some(),
    )?;
    let group = match &env {
        Some(e) => Some(Arc::new(join_group(e, &cfg, &opts, latest.as_deref())?)),
        None => None,
    };
    let (loader, labelled) = open_data(&cfg, data, run, &opts, decode, group.as_deref())?;
    let knn = opts.val.as_ref().map(|val| KnnSource {
        data: data.to_path_buf(),
        val: val.clone(),
        decode,
    });
    let mut s = Session::start(
        cfg, run, &opts, &loader, labelled, latest, knn, t_start, group,
    )?;
    'epochs: while s.step < s.stop_at {
        let mut epoch = loader.start_resumed(s.cursor, &s.splits);
        loop {
            if s.step >= s.stop_at || s.stopping() {
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

/// The device of this rank: `train.device`, and with CUDA the GPU `LOCAL_RANK`.
fn rank_device(cfg: &TrainConfig, env: Option<&DistEnv>) -> Result<Device> {
    let d = device_of(&cfg.train.device)?;
    Ok(match (d, env) {
        (Device::Cuda(_), Some(e)) => Device::Cuda(e.local_rank),
        _ => d,
    })
}

/// Joins the process group of a distributed run (Gloo on the CPU, NCCL on CUDA, with the
/// config's collective timeout), checks what only one process can do, and makes a panic
/// abort this worker. Every rank must see the same latest checkpoint (a run folder that
/// all nodes share).
fn join_group(
    env: &DistEnv,
    cfg: &TrainConfig,
    opts: &TrainOptions,
    latest: Option<&Path>,
) -> Result<ProcessGroup> {
    if !cfg.train.batch.is_multiple_of(env.world) {
        bail!(
            "train.batch {} is the global batch and must be divisible by the world size {} (each rank trains batch / world samples a step)",
            cfg.train.batch,
            env.world
        );
    }
    if opts.time_budget.is_some() {
        bail!("--time-budget is for one process; give a distributed run its length with train.epochs or train.total_steps");
    }
    let timeout = cfg.train.collective_timeout_s;
    if !(timeout.is_finite() && timeout > 0.0) {
        bail!("train.collective_timeout_s must be a positive number of seconds, not {timeout}");
    }
    let device = rank_device(cfg, Some(env))?;
    let mut backend = Backend::for_device(device);
    if backend == Backend::Nccl && !byol_dist::has_nccl() {
        // Gloo moves CUDA tensors through host memory: correct, slower.
        eprintln!(
            "byol: WARNING: this build has no NCCL (it is compiled in with BYOL_NCCL=1, as `make device` builds; see dist/build.rs); using Gloo for CUDA tensors"
        );
        backend = Backend::Gloo;
    }
    let g = ProcessGroup::new(env, backend, std::time::Duration::from_secs_f64(timeout))?;
    byol_dist::abort_on_panic(env.rank);
    if env.rank == 0 {
        eprintln!(
            "byol train: rank 0 of {}: c10d {} process group at {}:{} (collective timeout {timeout:.0} s)",
            env.world,
            backend.name(),
            env.master_addr,
            env.master_port
        );
    }
    // The same latest checkpoint on every rank (-1: none).
    let step = latest
        .and_then(|p| {
            p.file_name()?
                .to_str()?
                .strip_prefix("step-")?
                .parse::<i64>()
                .ok()
        })
        .unwrap_or(-1);
    let all = g.all_gather(&Tensor::from_slice(&[step]).to_device(device))?;
    let steps: Vec<i64> = all.iter().map(|t| t.int64_value(&[0])).collect();
    if steps.iter().any(|&s| s != step) {
        bail!(
            "the ranks see different latest checkpoints in the run folder (by rank: {steps:?}; -1 = none): every node must see the same run folder (a shared filesystem)"
        );
    }
    Ok(g)
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
    group: Option<&ProcessGroup>,
) -> Result<(Loader, Option<i64>)> {
    let ds = Dataset::open(data).with_context(|| format!("opening {}", data.display()))?;
    let writer = group.is_none_or(|g| g.rank() == 0);
    check_run_data(run, data, &ds.manifest, opts.resume, writer)?;
    if let Some(val) = &opts.val {
        let v = Dataset::open(val).with_context(|| format!("opening {}", val.display()))?;
        same_classes(data, &ds.manifest.classes, val, &v.manifest.classes)?;
    }
    let classes = ds.manifest.classes.len() as i64;
    let labelled = (classes > 0 && ds.manifest.totals.unlabeled == 0).then_some(classes);
    let mut lc = loader_config(cfg);
    if let Some(g) = group {
        lc.rank = g.rank();
        lc.world = g.world();
        lc.batch = cfg.train.batch / g.world();
    }
    let rank_batch = lc.batch;
    let loader = Loader::new(ds, lc, decode)?;
    if loader.batches_per_epoch() == 0 {
        bail!(
            "{} has {} rows per rank, fewer than one batch of {} per rank",
            data.display(),
            loader.samples_per_epoch(),
            rank_batch
        );
    }
    Ok((loader, labelled))
}

/// The precision for this machine, said on stderr (and a loud warning for emulated bf16).
fn choose_precision(
    cfg: &TrainConfig,
    device: Device,
    say: bool,
) -> Result<(PrecisionChoice, String)> {
    let hw = crate::amp::Hardware::detect(device);
    let choice = crate::amp::choose_precision(&cfg.train.precision, &hw)
        .map_err(crate::error::Error::Invalid)?;
    if say {
        eprintln!("byol train: precision {} ({})", choice.name, choice.reason);
    }
    if let Some(w) = choice.warning.as_ref().filter(|_| say) {
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
    comm0: f64,
}

/// Rank `rank`'s augmentation generator for a new run: rank 0's is the one-process
/// generator, the others are seeded from (seed, rank).
fn rank_generator(seed: u64, rank: usize) -> SplitMix64 {
    SplitMix64::new(
        seed ^ 0x00A5_5A00_B10B_5EED ^ (rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    )
}

/// Where rank `rank` of `world` resumes from checkpoint state `st`: its cursor,
/// generator and the epoch's earlier splits. The same world size continues each rank
/// exactly; another world size re-partitions what no rank has consumed of the current
/// epoch (adding a [`Split`]), and new ranks get generators derived from rank 0's.
pub fn rank_position(
    st: &CheckpointState,
    rank: usize,
    world: usize,
) -> (Cursor, SplitMix64, Vec<Split>) {
    let ranks = if st.ranks.is_empty() {
        vec![RankState {
            cursor: st.cursor,
            aug_rng: st.aug_rng,
        }]
    } else {
        st.ranks.clone()
    };
    let old = ranks.len();
    let rng = match ranks.get(rank) {
        Some(r) => SplitMix64::new(r.aug_rng),
        None => {
            SplitMix64::new(ranks[0].aug_rng ^ (rank as u64).wrapping_mul(0xD1B5_4A32_D192_ED03))
        }
    };
    if old == world {
        return (ranks[rank].cursor, rng, st.splits.clone());
    }
    let epoch = ranks[0].cursor.epoch;
    let consumed: Vec<u64> = ranks.iter().map(|r| r.cursor.consumed).collect();
    let mut splits = st.splits.clone();
    if !(splits.is_empty() && consumed.iter().all(|&c| c == 0)) {
        splits.push(Split {
            world: old,
            consumed,
        });
    }
    (Cursor { epoch, consumed: 0 }, rng, splits)
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
    /// How earlier world sizes consumed the current epoch (empty but after a resume at
    /// another world size).
    splits: Vec<Split>,
    rng: SplitMix64,
    last_loss: f64,
    // Distributed: rank 0 alone writes; every rank stops after the step where any rank
    // got a signal.
    writer: bool,
    stop_agreed: bool,
    // Checkpoints, monitors and reporting.
    latest: Option<PathBuf>,
    last_ckpt: Option<PathBuf>,
    last_knn_step: u64,
    low_collapse: u64,
    metrics: Option<std::fs::File>,
    win: Window,
    bar: Progress,
    t_start: Instant,
    run_t0: Instant,
    run_step0: u64,
    run_wait0: f64,
    run_failures0: u64,
    run_comm0: f64,
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
        group: Option<Arc<ProcessGroup>>,
    ) -> Result<Session<'a>> {
        if cfg.train.torch_threads > 0 {
            tch::set_num_threads(cfg.train.torch_threads);
        }
        let (rank, world) = group.as_ref().map_or((0, 1), |g| (g.rank(), g.world()));
        let writer = rank == 0;
        let device = rank_device(&cfg, group.as_ref().map(|g| g.env()))?;
        let (choice, cpu) = choose_precision(&cfg, device, writer)?;
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
        if writer {
            write_atomic(&run::config_path(run), cfg.to_toml().as_bytes())?;
        }

        let mut l = Learner::new(&cfg, device, choice.dtype, labelled, group.clone());
        let total = if cfg.train.total_steps > 0 {
            cfg.train.total_steps
        } else {
            spe * cfg.train.epochs
        };
        let (step, cursor, rng, splits, last_loss) = match latest.as_ref().filter(|_| opts.resume) {
            Some(dir) => {
                let st = l.restore(dir)?;
                if writer && st.world != world {
                    eprintln!(
                        "byol train: resuming a run last trained at world size {} with world size {world}: the rest of epoch {} is re-partitioned over the new ranks (each remaining sample once); the trajectory differs from an uninterrupted run",
                        st.world, st.cursor.epoch
                    );
                }
                let (cursor, rng, splits) = rank_position(&st, rank, world);
                (st.step, cursor, rng, splits, st.last_loss)
            }
            None => (
                0,
                Cursor::default(),
                rank_generator(cfg.train.seed, rank),
                Vec::new(),
                f64::NAN,
            ),
        };
        // Every rank starts from rank 0's weights, buffers and optimizer state.
        l.broadcast_from(0)?;
        let stop_at = opts.max_steps.unwrap_or(total).min(total);
        if writer && step > 0 && stop_at <= step {
            eprintln!(
                "byol train: the run is already at step {step} (stopping at {stop_at} of {total}): nothing to train"
            );
        }
        let metrics_path = run::metrics_path(run);
        if writer {
            let dropped = run::trim_metrics(run, step)?;
            if dropped > 0 {
                eprintln!(
                    "byol train: dropped {dropped} row(s) of {} after step {step}, written by an attempt that ended before its next checkpoint",
                    metrics_path.display()
                );
            }
        }
        let metrics = if writer {
            Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&metrics_path)
                    .with_context(|| format!("opening {}", metrics_path.display()))?,
            )
        } else {
            None
        };
        let bar = Progress::new(
            Mode::detect(opts.progress && writer),
            "train",
            stop_at,
            "steps",
            step,
        );
        let comm0 = group.as_ref().map_or(0.0, |g| g.comm_seconds());
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
            splits,
            rng,
            last_loss,
            writer,
            stop_agreed: false,
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
                comm0,
            },
            bar,
            t_start,
            run_t0: Instant::now(),
            run_step0: step,
            run_wait0: stats.consumer_wait_s,
            run_failures0: stats.decode_failures,
            run_comm0: comm0,
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
        if let Some(g) = &self.l.group {
            g.report_step(self.step)?;
        }
        let r = self.l.step(&mut b, &mut self.rng, lr, tau)?;
        let r = self.agree(r)?;
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
        self.win.images += (b.len() * self.world()) as u64;
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

    fn world(&self) -> usize {
        self.l.group.as_ref().map_or(1, |g| g.world())
    }

    /// Whether to stop before the next step: a signal (one process), or a signal on any
    /// rank at the last step (distributed).
    fn stopping(&self) -> bool {
        match &self.l.group {
            None => STOP.load(Ordering::SeqCst),
            Some(_) => self.stop_agreed,
        }
    }

    /// Distributed: one small `all_reduce` a step of (loss, collapse monitor, probe
    /// hits, signal flag): every rank then logs the loss and monitor averaged over ranks,
    /// sees a NaN on any rank at the same step, and stops after the same step.
    fn agree(&mut self, r: StepResult) -> Result<StepResult> {
        let Some(g) = &self.l.group else {
            return Ok(r);
        };
        let stop = if STOP.load(Ordering::SeqCst) {
            1.0
        } else {
            0.0
        };
        let v = g.sum_f64(&[r.loss, r.collapse, r.correct, stop], self.device)?;
        let w = g.world() as f64;
        self.stop_agreed = v[3] > 0.0;
        Ok(StepResult {
            loss: v[0] / w,
            collapse: v[1] / w,
            correct: v[2],
        })
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

    /// Appends one line to `RUN/metrics.jsonl` (rank 0 only).
    fn append(&mut self, line: &str) -> Result<()> {
        let Some(f) = self.metrics.as_mut() else {
            return Ok(());
        };
        writeln!(f, "{line}")
            .with_context(|| format!("writing {}", run::metrics_path(self.run).display()))
    }

    /// Writes the interval's metrics row and updates the progress message.
    fn log(&mut self, lr: f64, tau: f64, collapse: f64, loader: &Loader) -> Result<()> {
        let dt = self.win.t.elapsed().as_secs_f64().max(1e-9);
        let wait = loader.stats().consumer_wait_s;
        let comm = self.l.group.as_ref().map(|g| g.comm_seconds());
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
            comm_share: comm.map(|c| ((c - self.win.comm0) / dt).clamp(0.0, 1.0)),
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
            comm0: comm.unwrap_or(0.0),
        };
        Ok(())
    }

    /// Redraws `curves.png` (rank 0; a failure is only a warning).
    fn draw_curves(&self) {
        if !self.writer {
            return;
        }
        if let Err(e) = draw_curves(self.run) {
            tracing::warn!("curves.png not written: {}", byol_format::error_chain(&e));
        }
    }

    /// Saves a checkpoint of the current state (networks, optimizer, probe, cursor, RNG).
    /// Distributed: every rank's cursor and generator are gathered (a collective), and
    /// rank 0 alone writes.
    fn checkpoint(&mut self) -> Result<()> {
        let (world, ranks) = match &self.l.group {
            Some(g) => {
                let mine = [
                    self.cursor.epoch as i64,
                    self.cursor.consumed as i64,
                    self.rng.state() as i64,
                ];
                let all = g.all_gather(&Tensor::from_slice(&mine).to_device(self.device))?;
                let mut ranks = Vec::with_capacity(all.len());
                for t in all {
                    let v = Vec::<i64>::try_from(t.to_device(Device::Cpu))?;
                    ranks.push(RankState {
                        cursor: Cursor {
                            epoch: v[0] as u64,
                            consumed: v[1] as u64,
                        },
                        aug_rng: v[2] as u64,
                    });
                }
                (g.world(), ranks)
            }
            None => (1, Vec::new()),
        };
        if !self.writer {
            self.last_ckpt = Some(run::checkpoint_path(self.run, self.step));
            return Ok(());
        }
        let st = CheckpointState {
            step: self.step,
            cursor: self.cursor,
            aug_rng: self.rng.state(),
            last_loss: self.last_loss,
            config: self.cfg.clone(),
            world,
            ranks,
            splits: self.splits.clone(),
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
    /// Rank 0 only: the others go on to the next step's collectives and wait for it
    /// (bounded by `train.knn_bank`/`knn_queries`, well inside the collective timeout).
    fn knn_row(&mut self, epoch: u64) -> Result<Option<f64>> {
        let Some(src) = self.knn.as_ref().filter(|_| self.writer) else {
            return Ok(None);
        };
        let t = Instant::now();
        let acc = self
            .monitor
            .top1(&self.l.online, &self.cfg, src, self.device)?;
        if let Some(g) = &self.l.group {
            let (took, limit) = (t.elapsed().as_secs_f64(), g.timeout().as_secs_f64());
            if took > 0.5 * limit {
                eprintln!(
                    "byol: WARNING: the kNN monitor took {took:.0} s on rank 0 while the other ranks waited; that is over half of train.collective_timeout_s ({limit:.0} s): raise the timeout or lower train.knn_bank / knn_queries"
                );
            }
        }
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
        self.splits.clear();
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
        self.draw_curves();
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
        self.draw_curves();
        let stopped = STOP.load(Ordering::SeqCst);
        // Always leave a checkpoint at the step reached.
        let have = self
            .last_ckpt
            .as_ref()
            .is_some_and(|p| p.ends_with(format!("step-{:09}", self.step)));
        // A resumed run that trained no step keeps the checkpoint it resumed from
        // untouched (rewriting it at another world size would lose the ranks' state).
        if !have && self.step > 0 && self.step > self.run_step0 {
            self.checkpoint()?;
        }
        let secs = self.run_t0.elapsed().as_secs_f64().max(1e-9);
        let knn_in_run = self.monitor.seconds - self.monitor.calibration_seconds;
        let comm = self
            .l
            .group
            .as_ref()
            .map_or(0.0, |g| g.comm_seconds() - self.run_comm0);
        let images = ((self.step - self.run_step0) * self.cfg.train.batch as u64) as f64;
        let stats = loader.stats();
        Ok(TrainSummary {
            command: "train".into(),
            run: self.run.display().to_string(),
            world_size: self.world(),
            comm_seconds: comm,
            comm_share: (comm / (secs - knn_in_run).max(1e-9)).clamp(0.0, 1.0),
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
