//! The batch plan and the training data: [`BatchPlan`] is the only place where the
//! global batch, the per-rank batch, the rank and the world size meet; [`open_data`]
//! opens the shards, records them in the run folder and builds the loader.

use std::path::Path;

use byol_pipeline::loader::DecodeFn;
use byol_pipeline::{Dataset, Loader, LoaderConfig};

use super::runtime::Runtime;
use crate::bail;
use crate::config::TrainConfig;
use crate::error::{Context, Result};
use crate::run::{check_run_data, same_classes};

/// How a step's batch is divided over the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPlan {
    /// Images a step trains on, over all ranks (`train.batch`).
    pub global: usize,
    /// Images each rank trains on a step: `global / world`.
    pub per_rank: usize,
    pub rank: usize,
    pub world: usize,
}

impl BatchPlan {
    /// `global` images a step over `rt`'s ranks.
    ///
    /// # Errors
    /// The world size does not divide the global batch.
    pub fn new(global: usize, rt: &Runtime) -> Result<BatchPlan> {
        let (rank, world) = (rt.rank(), rt.world());
        if !global.is_multiple_of(world) {
            bail!(
                "train.batch {global} is the global batch and must be divisible by the world size {world} (each rank trains batch / world samples a step)"
            );
        }
        Ok(BatchPlan {
            global,
            per_rank: global / world,
            rank,
            world,
        })
    }

    /// Images trained in `steps` steps, over all ranks.
    pub fn images(&self, steps: u64) -> u64 {
        steps * self.global as u64
    }

    /// This rank's loader settings for `cfg`: its share of the batch and of each epoch,
    /// decode threads (`data.decode_threads`, 0: every core), full batches only.
    pub fn loader_config(&self, cfg: &TrainConfig) -> LoaderConfig {
        LoaderConfig {
            batch: self.per_rank,
            canvas: cfg.data.canvas,
            seed: cfg.train.seed,
            rank: self.rank,
            world: self.world,
            window: cfg.data.window,
            decode_threads: match cfg.data.decode_threads {
                0 => byol_format::cores(),
                n => n,
            },
            drop_last: true,
            ..LoaderConfig::default()
        }
    }
}

/// The labels of a batch for a cross-entropy: a replacement sample (its image failed to
/// decode) and an unlabeled one get the ignore index -100, so they teach nothing.
pub fn train_labels(b: &byol_pipeline::loader::Batch) -> Vec<i64> {
    b.labels()
        .iter()
        .zip(b.replaced_mask())
        .map(|(&l, &r)| if r || l < 0 { -100 } else { l })
        .collect()
}

/// The training data of a run.
pub struct TrainData {
    pub loader: Loader,
    /// The number of classes when every row is labelled (then the online probe runs).
    pub labelled: Option<i64>,
}

/// Opens the training shards `data` (and checks the held-out shards `val` have the same
/// classes), records them in the run folder (`RUN/data.json`; on `resume` checks they
/// are the same), and builds this rank's loader.
///
/// # Errors
/// Unreadable shards, other data than the run's on resume, different classes in `val`,
/// or fewer rows per rank than one batch.
pub fn open_data(
    cfg: &TrainConfig,
    plan: &BatchPlan,
    (data, val): (&Path, Option<&Path>),
    (run, resume): (&Path, bool),
    decode: DecodeFn,
) -> Result<TrainData> {
    let ds = Dataset::open(data).with_context(|| format!("opening {}", data.display()))?;
    check_run_data(run, data, &ds.manifest, resume, plan.rank == 0)?;
    if let Some(val) = val {
        let v = Dataset::open(val).with_context(|| format!("opening {}", val.display()))?;
        same_classes(data, &ds.manifest.classes, val, &v.manifest.classes)?;
    }
    let classes = ds.manifest.classes.len() as i64;
    let labelled = (classes > 0 && ds.manifest.totals.unlabeled == 0).then_some(classes);
    let loader = Loader::new(ds, plan.loader_config(cfg), decode)?;
    if loader.batches_per_epoch() == 0 {
        bail!(
            "{} has {} rows per rank, fewer than one batch of {} per rank",
            data.display(),
            loader.samples_per_epoch(),
            plan.per_rank
        );
    }
    Ok(TrainData { loader, labelled })
}
