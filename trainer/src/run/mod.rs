//! The run folder, owned here: every file `byol train` writes into `RUN/` and every
//! reader of one (`byol eval`, `export`, `embed`, `info`).
//!
//! ```text
//! RUN/config.toml          the run's config, with resolved values ([`run_config`])
//! RUN/data.json            what it was trained on ([`RunData`])
//! RUN/.lock                held by the one `byol train` using the folder ([`lock_run`])
//! RUN/metrics.jsonl        one JSON row per log interval ([`Metrics`]) or kNN run ([`KnnRow`])
//! RUN/tb/                  the same rows, the config and the augmentation preview as
//!                          TensorBoard event files ([`tensorboard`])
//! RUN/curves.png           loss and accuracies against step ([`draw_curves`])
//! RUN/checkpoints/step-NNNNNNNNN/
//!     online.safetensors, target.safetensors, optimizer.safetensors, probe.safetensors,
//!     state.json ([`CheckpointState`])
//! RUN/eval.json            `byol eval`'s report
//! ```
//! Every file is written atomically ([`byol_format::fs`]).

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::bail;
use crate::error::{Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use byol_pipeline::Cursor;

use crate::byol::Network;
use crate::classifier::Classifier;
use crate::config::{TrainConfig, RESUMABLE_CHANGES};

/// File names inside a checkpoint folder.
const ONLINE: &str = "online.safetensors";
const TARGET: &str = "target.safetensors";
pub const OPTIMIZER: &str = "optimizer.safetensors";
const PROBE: &str = "probe.safetensors";
const STATE: &str = "state.json";

mod metrics;
pub mod mlflow;
pub mod tensorboard;
pub use metrics::{
    draw_curves, metrics_path, open_metrics, read_metrics, trim_metrics, FinetuneMetrics, KnnRow,
    Metrics, MetricsFile, MetricsRow, TestRow, Tracking,
};

/// `RUN/config.toml`.
pub fn config_path(run: &Path) -> PathBuf {
    run.join("config.toml")
}

/// What a checkpoint's `state.json` holds besides the tensors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointState {
    pub step: u64,
    /// Rank 0's cursor and augmentation generator (the only ones of a one-process run).
    pub cursor: Cursor,
    pub aug_rng: u64,
    pub last_loss: f64,
    pub config: TrainConfig,
    /// Ranks that trained the run up to this checkpoint.
    #[serde(default = "one")]
    pub world: usize,
    /// Every rank's cursor and generator, rank order (empty for one process).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranks: Vec<RankState>,
    /// How earlier world sizes consumed the current epoch before a resume at another
    /// world size (see `byol_pipeline::plan::resumed_order`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub splits: Vec<byol_pipeline::Split>,
}

fn one() -> usize {
    1
}

/// One rank's place in the data and its augmentation generator.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct RankState {
    pub cursor: Cursor,
    pub aug_rng: u64,
}

fn checkpoints_dir(run: &Path) -> PathBuf {
    run.join("checkpoints")
}

/// The folder of the checkpoint at `step`: `RUN/checkpoints/step-NNNNNNNNN`.
pub fn checkpoint_path(run: &Path, step: u64) -> PathBuf {
    checkpoints_dir(run).join(format!("step-{step:09}"))
}

/// The step of a checkpoint folder `RUN/checkpoints/step-NNNNNNNNN` (`None`: not one).
pub fn checkpoint_step(dir: &Path) -> Option<u64> {
    dir.file_name()?
        .to_str()?
        .strip_prefix("step-")?
        .parse()
        .ok()
}

/// Checkpoint folders, oldest first.
pub fn list_checkpoints(run: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(checkpoints_dir(run))
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| checkpoint_step(p).is_some() && p.join(STATE).exists())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Named tensors as stored in a safetensors file.
pub type Named = Vec<(String, Tensor)>;

/// What a checkpoint holds besides `state.json`: the two networks, the optimizer's
/// buffers (empty for plain SGD without momentum) and the online probe's weights and
/// buffers (when the run has one).
pub struct CheckpointParts<'a> {
    pub online: &'a Network,
    pub target: &'a Network,
    pub optimizer: Named,
    pub probe: Option<Named>,
}

/// Writes `RUN/checkpoints/step-NNNNNNNNN/` atomically (a temporary folder, fsynced,
/// renamed when complete), then removes all but the newest `keep` checkpoints.
///
/// # Errors
/// I/O and serialisation errors, naming the checkpoint.
pub fn save_checkpoint(
    run: &Path,
    parts: CheckpointParts<'_>,
    st: &CheckpointState,
    keep: usize,
) -> Result<PathBuf> {
    write_checkpoint(run, st.step, keep, |tmp| {
        parts.online.save(&tmp.join(ONLINE))?;
        parts.target.save(&tmp.join(TARGET))?;
        if !parts.optimizer.is_empty() {
            Tensor::write_safetensors(&parts.optimizer, tmp.join(OPTIMIZER))?;
        }
        if let Some(p) = &parts.probe {
            Tensor::write_safetensors(p, tmp.join(PROBE))?;
        }
        write_state(tmp, st)
    })
}

/// Writes a checkpoint's `state.json` (any serialisable state: a loop's own) into
/// checkpoint folder `dir`.
///
/// # Errors
/// Serialisation or I/O, naming the file.
pub fn write_state(dir: &Path, st: &impl Serialize) -> Result<()> {
    let state = dir.join(STATE);
    std::fs::write(&state, serde_json::to_string_pretty(st)?)
        .with_context(|| format!("writing {}", state.display()))
}

/// The checkpoint folder of any loop at `step`: `fill` writes its files (at least
/// `state.json`, see [`write_state`]) into a temporary folder, which is fsynced and
/// renamed to `RUN/checkpoints/step-NNNNNNNNN` when complete; then all but the newest
/// `keep` checkpoints are removed.
///
/// # Errors
/// What `fill` returns, or I/O, naming the checkpoint.
pub fn write_checkpoint(
    run: &Path,
    step: u64,
    keep: usize,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let dir = checkpoints_dir(run);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let fin = checkpoint_path(run, step);
    byol_format::fs::write_atomic_with(&fin, |tmp| -> Result<()> {
        std::fs::create_dir_all(tmp).with_context(|| format!("creating {}", tmp.display()))?;
        fill(tmp)
    })
    .with_context(|| format!("saving checkpoint {}", fin.display()))?;
    let all = list_checkpoints(run);
    if all.len() > keep.max(1) {
        for old in &all[..all.len() - keep.max(1)] {
            let _ = std::fs::remove_dir_all(old);
        }
    }
    Ok(fin)
}

/// What [`load_checkpoint`] read besides the networks.
pub struct LoadedCheckpoint {
    pub state: CheckpointState,
    /// The optimizer's buffers (`None`: the checkpoint has none).
    pub optimizer: Option<Named>,
    /// The online probe's weights and buffers (`None`: none saved).
    pub probe: Option<Named>,
}

/// Loads checkpoint folder `dir` into `online` and `target`.
///
/// # Errors
/// Missing or unreadable files, or tensors that do not fit the networks, naming `dir`.
pub fn load_checkpoint(
    dir: &Path,
    online: &mut Network,
    target: &mut Network,
) -> Result<LoadedCheckpoint> {
    let ctx = || format!("loading {}", dir.display());
    online.vs.load(dir.join(ONLINE)).with_context(ctx)?;
    target.vs.load(dir.join(TARGET)).with_context(ctx)?;
    let read = |name: &str| -> Result<Option<Named>> {
        let f = dir.join(name);
        Ok(if f.exists() {
            Some(Tensor::read_safetensors(&f).with_context(|| format!("reading {}", f.display()))?)
        } else {
            None
        })
    };
    Ok(LoadedCheckpoint {
        state: read_state(dir)?,
        optimizer: read(OPTIMIZER)?,
        probe: read(PROBE)?,
    })
}

/// A checkpoint's `state.json`.
///
/// # Errors
/// The file is missing or not a [`CheckpointState`], naming it.
pub fn read_state(dir: &Path) -> Result<CheckpointState> {
    let f = dir.join(STATE);
    let text = std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
    serde_json::from_str(&text).with_context(|| format!("reading {}", f.display()))
}

/// The run's config: the given one for a new run (refused when the folder already holds
/// checkpoints); on `--resume` the saved one (with `sets` applied when no config is
/// given), or the given one, when it differs from the saved one only in
/// [`RESUMABLE_CHANGES`]. The result is also compared with the config the checkpoint
/// `latest` was written with, so that a `RUN/config.toml` edited by hand between runs
/// cannot change the run's length or schedules behind its back. `RUN/config.toml` is
/// read once, here.
///
/// # Errors
/// `--resume` without a checkpoint (`latest` is `None`: only `--resume auto` starts a
/// run) or without a saved config; a config that differs from the saved one or from the
/// checkpoint's outside [`RESUMABLE_CHANGES`] (naming each key and both values);
/// `--resume` with `--time-budget` (`budgeted`); a new run without a config, or into a
/// folder that already holds checkpoints.
pub fn run_config(
    config: Option<TrainConfig>,
    sets: &[String],
    run: &Path,
    resume: bool,
    budgeted: bool,
    latest: Option<&Path>,
) -> Result<TrainConfig> {
    let cfg_path = config_path(run);
    if resume {
        let Some(latest) = latest else {
            bail!(
                "--resume: {} holds no checkpoint to continue from (checkpoints/step-*/state.json); use --resume auto to start the run when there is none, or start it again without --resume",
                run.display()
            );
        };
        if budgeted {
            bail!(
                "--time-budget chooses the length of a new run; a resumed run keeps the steps its config.toml holds (train.total_steps); drop --time-budget"
            );
        }
        let saved_text = std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("--resume: no config in {}", run.display()))?;
        let saved = TrainConfig::from_toml(&saved_text, &[])
            .with_context(|| format!("reading {}", cfg_path.display()))?;
        let mut c = match config {
            Some(c) => c,
            None => saved
                .with_sets(sets)
                .with_context(|| format!("{}", cfg_path.display()))?,
        };
        let changed = fixed_differences(&saved, &c);
        if !changed.is_empty() {
            bail!(
                "--resume: the config differs from the run's in {} (only {} may change); start a new run for other settings",
                changed.join(", "),
                RESUMABLE_CHANGES.join(", ")
            );
        }
        let written_with = read_state(latest)?.config;
        let edited = fixed_differences(&written_with, &c);
        if !edited.is_empty() {
            bail!(
                "--resume: {} differs from the config checkpoint {} was written with in {} (only {} may change); put the old values back, or start a new run for other settings",
                cfg_path.display(),
                latest.display(),
                edited.join(", "),
                RESUMABLE_CHANGES.join(", ")
            );
        }
        c.resolved = saved.resolved;
        return Ok(c);
    }
    let Some(c) = config else {
        bail!("--config is required for a new run")
    };
    if latest.is_some() {
        bail!(
            "{} already holds checkpoints; use --resume to continue it, or another --out",
            run.display()
        );
    }
    Ok(c)
}

/// The differences between `old` and `new` outside [`RESUMABLE_CHANGES`], as
/// `key old → new`.
fn fixed_differences(old: &TrainConfig, new: &TrainConfig) -> Vec<String> {
    old.differences(new)
        .into_iter()
        .filter(|d| !RESUMABLE_CHANGES.contains(&d.key.as_str()))
        .map(|d| d.to_string())
        .collect()
}

/// The advisory lock that one `byol train` holds on its run folder (`RUN/.lock`, flock:
/// the operating system releases it when the process ends, however it ends). Holds the
/// holder's pid for the message another process gets.
///
/// # Errors
/// The folder is locked by another process (naming it), or the lock file cannot be made.
pub fn lock_run(run: &Path) -> Result<std::fs::File> {
    use std::io::{Read, Seek};
    let path = run.join(".lock");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match f.try_lock() {
        Ok(()) => {
            f.set_len(0)
                .and_then(|_| f.rewind())
                .and_then(|_| write!(f, "{}", std::process::id()))
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(f)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = f.read_to_string(&mut pid);
            bail!(
                "{} is in use by another `byol train` (pid {}); wait for it to finish, stop it, or use another --out",
                run.display(),
                if pid.trim().is_empty() { "unknown" } else { pid.trim() }
            )
        }
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

/// What a run records of its training data (`RUN/data.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunData {
    pub path: String,
    /// [`byol_format::shards::Manifest::fingerprint`].
    pub fingerprint: String,
    pub rows: u64,
    pub classes: Vec<String>,
}

/// A new run records its data in `RUN/data.json`; a resumed run refuses other data,
/// naming both. Only a process that `record`s (rank 0) writes the file.
///
/// # Errors
/// Other data on `--resume`, or an unreadable/unwritable `data.json`.
pub fn check_run_data(
    run: &Path,
    data: &Path,
    m: &byol_format::shards::Manifest,
    resume: bool,
    record: bool,
) -> Result<()> {
    let path = run.join("data.json");
    let now = RunData {
        path: data.display().to_string(),
        fingerprint: m.fingerprint(),
        rows: m.totals.rows,
        classes: m.classes.clone(),
    };
    if resume {
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                eprintln!(
                    "byol: warning: {} has no data.json (a run from before datasets were recorded); recording {} now, unchecked",
                    run.display(),
                    data.display()
                );
                None
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        if let Some(text) = text {
            let was: RunData = serde_json::from_str(&text)
                .with_context(|| format!("reading {}", path.display()))?;
            if was.fingerprint != now.fingerprint {
                bail!(
                    "--resume: {} was trained on {} ({} rows, {} classes, {}), but --data is {} ({} rows, {} classes, {}); resume with the same data, or start a new run",
                    run.display(),
                    was.path,
                    was.rows,
                    was.classes.len(),
                    was.fingerprint,
                    now.path,
                    now.rows,
                    now.classes.len(),
                    now.fingerprint
                );
            }
            return Ok(());
        }
    }
    if !record {
        return Ok(());
    }
    write_atomic(&path, serde_json::to_string_pretty(&now)?.as_bytes())
}

/// Two datasets used together (training and held-out data) must have the same classes,
/// by name and in the same order.
///
/// # Errors
/// The class lists differ: the message names both datasets and the first difference.
pub fn same_classes(a: &Path, ca: &[String], b: &Path, cb: &[String]) -> Result<()> {
    if ca == cb {
        return Ok(());
    }
    let first = ca
        .iter()
        .zip(cb)
        .position(|(x, y)| x != y)
        .map(|i| {
            format!(
                "class {i} is {:?} in one and {:?} in the other",
                ca[i], cb[i]
            )
        })
        .unwrap_or_else(|| format!("{} vs {} classes", ca.len(), cb.len()));
    bail!(
        "{} and {} have different classes ({first}); shard the held-out data with `byol-tools shard --classes-from {}`",
        a.display(),
        b.display(),
        a.display()
    )
}

/// [`byol_format::fs::write_atomic`] (temporary name, fsync, rename) into `anyhow`.
///
/// # Errors
/// [`byol_format::fs::FileError`], naming the file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(byol_format::fs::write_atomic(path, bytes)?)
}

/// The network a run folder trains: BYOL's online network, or a fine-tuned classifier.
pub enum TrainedNet {
    Byol(Box<Network>),
    Classifier(Box<Classifier>),
}

impl TrainedNet {
    /// Every variable (weights and BatchNorm statistics).
    pub fn vs(&self) -> &tch::nn::VarStore {
        match self {
            TrainedNet::Byol(n) => &n.vs,
            TrainedNet::Classifier(c) => &c.vs,
        }
    }

    /// The encoder (`encoder.*`).
    pub fn encoder(&self) -> &crate::model::ResNet {
        match self {
            TrainedNet::Byol(n) => &n.encoder,
            TrainedNet::Classifier(c) => &c.encoder,
        }
    }

    /// The classifier of a fine-tuned run.
    pub fn classifier(&self) -> Option<&Classifier> {
        match self {
            TrainedNet::Byol(_) => None,
            TrainedNet::Classifier(c) => Some(c),
        }
    }
}

/// A run's network loaded from one of its checkpoints, in eval-ready layout: the
/// online network of a BYOL run, the classifier of a fine-tuned one.
pub struct TrainedOnline {
    pub cfg: TrainConfig,
    pub net: TrainedNet,
    pub checkpoint: PathBuf,
    pub step: u64,
    pub device: Device,
}

impl TrainedOnline {
    /// The classes of a fine-tuned run's head, in label order.
    pub fn classes(&self) -> Option<&[String]> {
        self.cfg.finetune.as_ref().map(|f| f.classes.as_slice())
    }
}

/// Loads the network of `run` (BYOL's online network, or a fine-tuned classifier) from
/// `checkpoint` (default: the latest).
///
/// # Errors
/// No `config.toml` (not a run folder), no checkpoint, or a checkpoint that does not fit the config.
pub fn load_online(run: &Path, checkpoint: Option<&Path>) -> Result<TrainedOnline> {
    let cfg = TrainConfig::from_toml(
        &std::fs::read_to_string(config_path(run))
            .with_context(|| format!("{}: not a run folder", run.display()))?,
        &[],
    )?;
    let ckpt: PathBuf = match checkpoint {
        Some(c) => c.to_path_buf(),
        None => list_checkpoints(run)
            .pop()
            .with_context(|| format!("{} has no checkpoint", run.display()))?,
    };
    let st = read_state(&ckpt)?;
    let device = crate::runtime::resolve_device(cfg.train.device, 0)?;
    let net = match &cfg.finetune {
        Some(f) => {
            let mut c = Classifier::new(device, &cfg.model.encoder, f.classes.len() as i64, 0);
            c.load(&ckpt.join(crate::classifier::CLASSIFIER))?;
            if cfg.train.channels_last {
                c.to_channels_last();
            }
            TrainedNet::Classifier(Box::new(c))
        }
        None => {
            let mut net = Network::new(
                device,
                &cfg.model.encoder,
                &cfg.model.projector,
                Some(&cfg.model.predictor),
            );
            net.vs
                .load(ckpt.join(ONLINE))
                .with_context(|| format!("loading {}", ckpt.display()))?;
            if cfg.train.channels_last {
                net.to_channels_last();
            }
            TrainedNet::Byol(Box::new(net))
        }
    };
    Ok(TrainedOnline {
        cfg,
        net,
        checkpoint: ckpt,
        step: st.step,
        device,
    })
}
