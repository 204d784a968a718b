//! `byol train`: the training loop, checkpoints and exact resume.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use byol_pipeline::augment::{Augmenter, SplitMix64};
use byol_pipeline::loader::DecodeFn;
use byol_pipeline::{Cursor, Dataset, Loader, LoaderConfig};

use crate::byol::{
    channels_last, copy_into, lr_at, tau_at, train_step, Lars, Network, StepSettings,
};
use crate::config::{TrainConfig, RESUMABLE_CHANGES};

/// Set by SIGINT/SIGTERM: finish the step, checkpoint, exit.
pub static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Installs the SIGINT/SIGTERM handler that sets [`STOP`].
pub fn install_signal_handlers() {
    // Safety: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    pub max_steps: Option<u64>,
    /// Labelled held-out shards for the kNN monitor.
    pub val: Option<PathBuf>,
    pub resume: bool,
    /// Draw a progress bar.
    pub progress: bool,
}

/// What a checkpoint's `state.json` holds besides the tensors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointState {
    pub step: u64,
    pub cursor: Cursor,
    pub aug_rng: u64,
    pub last_loss: f64,
    pub config: TrainConfig,
}

/// One metrics row (`RUN/metrics.jsonl`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Metrics {
    pub step: u64,
    pub epoch: u64,
    pub loss: f64,
    pub lr: f64,
    pub tau: f64,
    pub images_per_s: f64,
    /// Share of the interval the step loop waited for data.
    pub stall: f64,
    /// std of the L2-normalised projections × √d: about 1 when healthy, 0 when collapsed.
    pub collapse: f64,
    /// Accuracy of the online linear probe on this interval's training batches (view 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_acc: Option<f64>,
}

/// A kNN-monitor row in `RUN/metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KnnRow {
    pub step: u64,
    pub epoch: u64,
    /// Weighted kNN (k = 20) top-1 of held-out images against a bank of training images.
    pub knn_top1: f64,
}

/// The online linear probe: a linear classifier on the detached embedding, trained with
/// SGD alongside the networks (its state is part of the checkpoint).
struct Probe {
    vs: tch::nn::VarStore,
    lin: tch::nn::Linear,
    opt: Lars,
}

impl Probe {
    fn new(device: Device, dim: i64, classes: i64) -> Probe {
        let vs = tch::nn::VarStore::new(device);
        let lin = tch::nn::linear(vs.root() / "probe", dim, classes, Default::default());
        Probe {
            vs,
            lin,
            opt: Lars::new(crate::byol::OptimizerKind::Sgd, 0.9, 0.0, 0.0),
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

    fn save(&self, path: &Path) -> Result<()> {
        let mut named = crate::byol::named_contiguous(&self.vs);
        named.extend(self.opt.state());
        named.sort_by(|a, b| a.0.cmp(&b.0));
        Tensor::write_safetensors(&named, path)?;
        Ok(())
    }

    fn load(&mut self, path: &Path, device: Device) -> Result<()> {
        let named = Tensor::read_safetensors(path)?;
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
        Ok(())
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
    pub checkpoint: Option<String>,
    pub stopped_by_signal: bool,
    pub seconds: f64,
}

pub fn device_of(s: &str) -> Result<Device> {
    Ok(match s {
        "auto" => Device::cuda_if_available(),
        "cpu" => Device::Cpu,
        "cuda" => {
            if !tch::Cuda::is_available() {
                bail!("config asks for device \"cuda\" but CUDA is not available");
            }
            Device::Cuda(0)
        }
        other => bail!("unknown device {other:?} (auto, cpu or cuda)"),
    })
}

fn checkpoints_dir(run: &Path) -> PathBuf {
    run.join("checkpoints")
}

/// Checkpoint folders, oldest first.
pub fn list_checkpoints(run: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(checkpoints_dir(run))
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .map(|n| n.to_string_lossy().starts_with("step-"))
                        .unwrap_or(false)
                        && p.join("state.json").exists()
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Writes a checkpoint atomically: a temporary folder, renamed when complete.
fn save_checkpoint(
    run: &Path,
    online: &Network,
    target: &Network,
    opt: &Lars,
    probe: Option<&Probe>,
    st: &CheckpointState,
    keep: usize,
) -> Result<PathBuf> {
    let dir = checkpoints_dir(run);
    std::fs::create_dir_all(&dir)?;
    let name = format!("step-{:09}", st.step);
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    online.save(&tmp.join("online.safetensors"))?;
    target.save(&tmp.join("target.safetensors"))?;
    let state = opt.state();
    if !state.is_empty() {
        Tensor::write_safetensors(&state, tmp.join("optimizer.safetensors"))?;
    }
    if let Some(p) = probe {
        p.save(&tmp.join("probe.safetensors"))?;
    }
    std::fs::write(tmp.join("state.json"), serde_json::to_string_pretty(st)?)?;
    let fin = dir.join(&name);
    let _ = std::fs::remove_dir_all(&fin);
    std::fs::rename(&tmp, &fin)?;
    let all = list_checkpoints(run);
    if all.len() > keep.max(1) {
        for old in &all[..all.len() - keep.max(1)] {
            let _ = std::fs::remove_dir_all(old);
        }
    }
    Ok(fin)
}

fn load_checkpoint(
    dir: &Path,
    online: &mut Network,
    target: &mut Network,
    opt: &mut Lars,
    probe: Option<&mut Probe>,
    device: Device,
) -> Result<CheckpointState> {
    online
        .vs
        .load(dir.join("online.safetensors"))
        .with_context(|| format!("loading {}", dir.display()))?;
    target
        .vs
        .load(dir.join("target.safetensors"))
        .with_context(|| format!("loading {}", dir.display()))?;
    let o = dir.join("optimizer.safetensors");
    if o.exists() {
        opt.load_state(Tensor::read_safetensors(&o)?, device);
    }
    if let Some(p) = probe {
        let f = dir.join("probe.safetensors");
        if f.exists() {
            p.load(&f, device)?;
        }
    }
    let st: CheckpointState =
        serde_json::from_str(&std::fs::read_to_string(dir.join("state.json"))?)?;
    Ok(st)
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
pub fn train(
    config: Option<TrainConfig>,
    data: &Path,
    run: &Path,
    opts: &TrainOptions,
    decode: DecodeFn,
) -> Result<TrainSummary> {
    let t_start = Instant::now();
    std::fs::create_dir_all(run).with_context(|| format!("creating {}", run.display()))?;
    let cfg_path = run.join("config.toml");
    let latest = list_checkpoints(run).pop();
    let cfg = if opts.resume {
        let saved_text = std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("--resume: no config in {}", run.display()))?;
        let saved = TrainConfig::from_toml(&saved_text, &[])?;
        if let Some(c) = &config {
            let diff: Vec<String> = saved
                .differences(c)
                .into_iter()
                .filter(|k| !RESUMABLE_CHANGES.contains(&k.as_str()))
                .collect();
            if !diff.is_empty() {
                bail!(
                    "--resume: the config differs from the run's in {} (only {} may change); start a new run for other settings",
                    diff.join(", "),
                    RESUMABLE_CHANGES.join(", ")
                );
            }
            c.clone()
        } else {
            saved
        }
    } else {
        let Some(c) = config else {
            bail!("--config is required for a new run")
        };
        if latest.is_some() {
            bail!(
                "{} already holds checkpoints; use --resume to continue it, or another --out",
                run.display()
            );
        }
        c
    };
    // The config is written before training starts.
    let tmp = run.join(".config.toml.tmp");
    std::fs::write(&tmp, cfg.to_toml())?;
    std::fs::rename(&tmp, &cfg_path)?;

    if cfg.train.torch_threads > 0 {
        tch::set_num_threads(cfg.train.torch_threads);
    }
    let device = device_of(&cfg.train.device)?;
    let amp = crate::amp::precision(&cfg.train.precision, device).map_err(anyhow::Error::msg)?;
    let (mut online, mut target, mut opt) = build_model(&cfg, device);

    let ds = Dataset::open(data).with_context(|| format!("opening {}", data.display()))?;
    let lc = loader_config(&cfg);
    let classes = ds.manifest.classes.len() as i64;
    let labelled = classes > 0 && ds.manifest.totals.unlabeled == 0;
    let loader = Loader::new(ds, lc, decode)?;
    let mut probe = labelled.then(|| Probe::new(device, online.encoder.out_dim(), classes));
    let spe = loader.batches_per_epoch();
    if spe == 0 {
        bail!(
            "{} has {} rows per rank, fewer than one batch of {}",
            data.display(),
            loader.samples_per_epoch(),
            cfg.train.batch
        );
    }
    let total = spe * cfg.train.epochs;
    let warmup = (cfg.optim.warmup_epochs * spe as f64).round() as u64;
    let peak_lr = cfg.optim.base_lr * cfg.train.batch as f64 / 256.0;
    let aug = Augmenter::new(cfg.augment.clone());

    let mut step = 0u64;
    let mut cursor = Cursor::default();
    let mut rng = SplitMix64::new(cfg.train.seed ^ 0x00A5_5A00_B10B_5EED);
    let mut last_loss = f64::NAN;
    if opts.resume {
        if let Some(dir) = &latest {
            let st = load_checkpoint(
                dir,
                &mut online,
                &mut target,
                &mut opt,
                probe.as_mut(),
                device,
            )?;
            step = st.step;
            cursor = st.cursor;
            rng = SplitMix64::new(st.aug_rng);
            last_loss = st.last_loss;
        }
    }
    let stop_at = opts.max_steps.unwrap_or(total).min(total);
    let metrics_path = run.join("metrics.jsonl");
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)?;
    let bar = if opts.progress {
        indicatif::ProgressBar::with_draw_target(
            Some(stop_at),
            indicatif::ProgressDrawTarget::stderr(),
        )
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("train {bar:25} {pos}/{len} steps  {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(step);

    let mut last_ckpt: Option<PathBuf> = None;
    let mut low_collapse = 0u64;
    let mut win_t = Instant::now();
    let mut win_imgs = 0u64;
    let mut win_correct = 0.0f64;
    let mut last_knn_step = u64::MAX;
    let mut monitor = KnnMonitor::default();
    let mut win_wait0 = loader.stats().consumer_wait_s;
    let run_t0 = Instant::now();
    let run_step0 = step;
    let run_wait0 = loader.stats().consumer_wait_s;
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
                &online,
                &target,
                &opt,
                probe.as_ref(),
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
            let canvas = b.to_device(device);
            let (mut v1, mut v2) = aug.views(&canvas, b.valid_sizes(), &mut rng);
            if cfg.train.channels_last {
                v1 = channels_last(&v1);
                v2 = channels_last(&v2);
            }
            let lr = lr_at(peak_lr, step, warmup, total);
            let tau = tau_at(cfg.train.tau_base, step, total);
            let settings = StepSettings { lr, tau, amp };
            let (loss, z1, y1) = train_step(&online, &target, &mut opt, &v1, &v2, settings);
            let correct = probe.as_mut().map(|p| {
                let labels = Tensor::from_slice(b.labels()).to_device(device);
                p.step(&y1, &labels)
            });
            // One host read per step for the loss, the collapse monitor and the probe's
            // count (each read waits for the device).
            let collapse_t = tch::no_grad(|| collapse_monitor(&z1));
            let mut scalars = vec![loss.detach(), collapse_t];
            scalars.extend(correct);
            let host = Vec::<f64>::try_from(
                Tensor::stack(&scalars, 0)
                    .to_kind(Kind::Double)
                    .to_device(Device::Cpu),
            )?;
            let (lv, collapse) = (host[0], host[1]);
            win_correct += host.get(2).copied().unwrap_or(0.0);
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
            bar.set_position(step);
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
                    probe_acc: probe.as_ref().map(|_| win_correct / win_imgs.max(1) as f64),
                };
                writeln!(metrics, "{}", serde_json::to_string(&m)?)?;
                bar.set_message(format!(
                    "loss {lv:.4} lr {lr:.4} tau {tau:.4} {:.0} img/s stall {:.0}%",
                    m.images_per_s,
                    100.0 * m.stall
                ));
                win_t = Instant::now();
                win_imgs = 0;
                win_correct = 0.0;
                win_wait0 = wait;
            }
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
            if let Some(val) = &opts.val {
                if cfg.train.knn_every_epochs > 0
                    && cursor.epoch.is_multiple_of(cfg.train.knn_every_epochs)
                {
                    let acc = monitor.top1(&online, &cfg, data, val, decode, device)?;
                    last_knn_step = step;
                    let row = KnnRow {
                        step,
                        epoch: cursor.epoch,
                        knn_top1: acc,
                    };
                    writeln!(metrics, "{}", serde_json::to_string(&row)?)?;
                    bar.println(format!(
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
    bar.finish_and_clear();
    // The run's last state gets a kNN row too (the final epoch end is not reached when
    // the step budget ends exactly there).
    if let Some(val) = &opts.val {
        if cfg.train.knn_every_epochs > 0 && step > 0 && last_knn_step != step && step == total {
            let acc = monitor.top1(&online, &cfg, data, val, decode, device)?;
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
    Ok(TrainSummary {
        command: "train".into(),
        run: run.display().to_string(),
        steps: step,
        total_steps: total,
        epoch: cursor.epoch,
        last_loss,
        images_per_s: ((step - run_step0) * cfg.train.batch as u64) as f64 / secs,
        train_images_per_s: ((step - run_step0) * cfg.train.batch as u64) as f64
            / (secs - monitor.seconds).max(1e-9),
        monitor_seconds: monitor.seconds,
        data_stall: ((loader.stats().consumer_wait_s - run_wait0) / secs).clamp(0.0, 1.0),
        checkpoint: last_ckpt
            .map(|p| p.display().to_string())
            .or_else(|| latest.map(|p| p.display().to_string())),
        stopped_by_signal: stopped,
        seconds: t_start.elapsed().as_secs_f64(),
    })
}

/// The kNN monitor's images: the first `knn_bank` training images and the first
/// `knn_queries` held-out ones (inputs and labels), decoded once per run.
struct KnnSet {
    bank: (Tensor, Tensor),
    queries: (Tensor, Tensor),
    classes: i64,
}

impl KnnSet {
    fn load(cfg: &TrainConfig, data: &Path, val: &Path, decode: DecodeFn) -> Result<KnnSet> {
        use crate::eval::load_inputs;
        let (canvas, size) = (cfg.data.canvas, cfg.augment.size);
        let bank = load_inputs(data, canvas, size, decode, Some(cfg.train.knn_bank))?;
        let queries = load_inputs(val, canvas, size, decode, Some(cfg.train.knn_queries))?;
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
}

impl KnnMonitor {
    fn top1(
        &mut self,
        online: &Network,
        cfg: &TrainConfig,
        data: &Path,
        val: &Path,
        decode: DecodeFn,
        device: Device,
    ) -> Result<f64> {
        let t = Instant::now();
        if self.set.is_none() {
            self.set = Some(KnnSet::load(cfg, data, val, decode)?);
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

/// Redraws `RUN/curves.png` from `RUN/metrics.jsonl`: loss (left); online-probe and
/// kNN accuracy (right).
pub fn draw_curves(run: &Path) -> Result<()> {
    use crate::plot::{save_curves, Series, BLUE, GREEN, ORANGE};
    let text = std::fs::read_to_string(run.join("metrics.jsonl"))?;
    let (mut loss, mut probe, mut knn) = (Vec::new(), Vec::new(), Vec::new());
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l)?;
        let step = v["step"].as_f64().unwrap_or(0.0);
        if let Some(x) = v["loss"].as_f64() {
            loss.push((step, x));
        }
        if let Some(x) = v["probe_acc"].as_f64() {
            probe.push((step, x));
        }
        if let Some(x) = v["knn_top1"].as_f64() {
            knn.push((step, x));
        }
    }
    save_curves(
        &run.join("curves.png"),
        &[Series {
            color: BLUE,
            points: &loss,
        }],
        &[
            Series {
                color: ORANGE,
                points: &probe,
            },
            Series {
                color: GREEN,
                points: &knn,
            },
        ],
    )?;
    Ok(())
}

/// The online and target networks (target = copy of online) and the optimizer of a
/// config, seeded with `train.seed`.
pub fn build_model(cfg: &TrainConfig, device: Device) -> (Network, Network, Lars) {
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
    let mut opt = Lars::new(o.kind, o.momentum, o.weight_decay, o.trust);
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
