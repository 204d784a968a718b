//! BYOL's [`Step`]: one BYOL step at the step's learning rate and τ, the collapse
//! monitor, the online probe's accuracy in each metrics row, the kNN monitor at epoch
//! ends, and checkpoints of both networks, optimizer and probe.

use std::path::{Path, PathBuf};

use byol_pipeline::loader::Batch;

use super::knn::{KnnMonitor, KnnSource};
use super::learner::Learner;
use super::position::Position;
use super::step_loop::{Interval, Reporter, Step, StepOutput};
use crate::byol::{lr_at, tau_at};
use crate::config::TrainConfig;
use crate::error::Result;
use crate::run::{draw_curves, save_checkpoint, CheckpointParts, KnnRow, Metrics, RankState};

/// A BYOL run's step, schedules and monitors.
pub struct ByolStep<'a> {
    pub run: &'a Path,
    pub cfg: TrainConfig,
    pub learner: Learner,
    pub knn: Option<KnnSource>,
    pub monitor: KnnMonitor,
    /// The schedules: steps in the run, warm-up steps, peak learning rate.
    pub total: u64,
    pub warmup: u64,
    pub peak_lr: f64,
    /// The last step's learning rate, τ and collapse monitor (for the row).
    lr: f64,
    tau: f64,
    collapse: f64,
    low_collapse: u64,
    last_knn_step: u64,
}

/// Sums a BYOL step reports: the collapse monitor (averaged by the row) and the probe's
/// correct predictions.
const COLLAPSE: usize = 0;
const CORRECT: usize = 1;

impl<'a> ByolStep<'a> {
    /// BYOL's step for `cfg`: warm-up `optim.warmup_epochs` of `steps_per_epoch`, peak
    /// learning rate `optim.base_lr × train.batch / 256` (the paper's scaling).
    pub fn new(
        run: &'a Path,
        cfg: TrainConfig,
        learner: Learner,
        (total, steps_per_epoch): (u64, u64),
        knn: (Option<KnnSource>, KnnMonitor),
    ) -> ByolStep<'a> {
        ByolStep {
            run,
            warmup: (cfg.optim.warmup_epochs * steps_per_epoch as f64).round() as u64,
            peak_lr: cfg.optim.base_lr * cfg.train.batch as f64 / 256.0,
            cfg,
            learner,
            knn: knn.0,
            monitor: knn.1,
            total,
            lr: 0.0,
            tau: 0.0,
            collapse: 0.0,
            low_collapse: 0,
            last_knn_step: u64::MAX,
        }
    }

    fn world(&self) -> f64 {
        self.learner
            .group
            .as_ref()
            .map_or(1.0, |g| g.world() as f64)
    }

    /// Warns once when the projections have had almost no spread for
    /// `train.collapse_span` steps.
    fn watch_collapse(&mut self, step: u64, collapse: f64) {
        if collapse >= self.cfg.train.collapse_threshold {
            self.low_collapse = 0;
            return;
        }
        self.low_collapse += 1;
        if self.low_collapse == self.cfg.train.collapse_span {
            tracing::error!(
                step,
                collapse,
                "COLLAPSE: the projections have had almost no spread for {} steps",
                self.cfg.train.collapse_span
            );
            eprintln!(
                "byol: warning: representation collapse suspected at step {step} (monitor {collapse:.4})"
            );
        }
    }

    /// Runs the kNN monitor and appends its row; returns its accuracy. Rank 0 only: the
    /// others wait for it on the store, outside the collective timeout (the step loop's
    /// `after_rank0_work`).
    fn knn_row(&mut self, out: &mut Reporter, step: u64, epoch: u64) -> Result<Option<f64>> {
        let Some(src) = self.knn.as_ref().filter(|_| out.is_writer()) else {
            return Ok(None);
        };
        let l = &self.learner;
        let acc = self.monitor.top1(&l.online, &self.cfg, src, l.device())?;
        self.last_knn_step = step;
        out.append(&KnnRow {
            step,
            epoch,
            knn_top1: acc,
        })?;
        Ok(Some(acc))
    }
}

impl Step for ByolStep<'_> {
    fn step(&mut self, b: &mut Batch, pos: &mut Position) -> Result<StepOutput> {
        self.lr = lr_at(self.peak_lr, pos.step, self.warmup, self.total);
        self.tau = tau_at(self.cfg.train.tau_base, pos.step, self.total);
        let r = self.learner.step(b, &mut pos.rng, self.lr, self.tau)?;
        let mut sums = vec![0.0; 2];
        sums[COLLAPSE] = r.collapse;
        sums[CORRECT] = r.correct;
        Ok(StepOutput { loss: r.loss, sums })
    }

    fn after_step(&mut self, pos: &Position, _loss: f64, sums: &[f64]) {
        self.collapse = sums[COLLAPSE] / self.world();
        self.watch_collapse(pos.step, self.collapse);
    }

    fn report(&mut self, pos: &Position, i: &Interval) -> Result<(serde_json::Value, String)> {
        let correct = i.sums.get(CORRECT).copied().unwrap_or(0.0);
        let m = Metrics {
            step: pos.step,
            epoch: pos.cursor.epoch,
            loss: pos.last_loss,
            lr: self.lr,
            tau: self.tau,
            images_per_s: i.images_per_s,
            stall: i.stall,
            collapse: self.collapse,
            probe_acc: self
                .learner
                .probe
                .as_ref()
                .map(|_| correct / i.images.max(1) as f64),
            comm_share: i.comm_share,
        };
        let message = format!(
            "loss {:.4}, lr {:.4}, tau {:.4}, {:.0} images/s, stall {:.0} %",
            m.loss,
            self.lr,
            self.tau,
            m.images_per_s,
            100.0 * m.stall
        );
        Ok((serde_json::to_value(&m)?, message))
    }

    fn save(&mut self, pos: &Position, world: usize, ranks: Vec<RankState>) -> Result<PathBuf> {
        let st = pos.checkpoint_state(&self.cfg, world, ranks);
        let l = &self.learner;
        let parts = CheckpointParts {
            online: &l.online,
            target: &l.target,
            optimizer: l.opt.state(),
            probe: l.probe.as_ref().map(|p| p.named()),
        };
        save_checkpoint(self.run, parts, &st, self.cfg.train.keep)
    }

    /// The kNN monitor every `train.knn_every_epochs`.
    fn end_epoch(&mut self, out: &mut Reporter, pos: &Position) -> Result<()> {
        let every = self.cfg.train.knn_every_epochs;
        let epoch = pos.cursor.epoch;
        if every > 0 && epoch.is_multiple_of(every) {
            if let Some(acc) = self.knn_row(out, pos.step, epoch)? {
                out.bar
                    .println(&format!("epoch {epoch}: kNN top-1 {:.2} %", 100.0 * acc));
            }
        }
        Ok(())
    }

    /// The run's final kNN row when it finished between epoch ends.
    fn before_finish(&mut self, out: &mut Reporter, pos: &Position, trained: bool) -> Result<()> {
        let due = self.cfg.train.knn_every_epochs > 0
            && trained
            && self.last_knn_step != pos.step
            && pos.step == self.total;
        if due {
            self.knn_row(out, pos.step, pos.cursor.epoch + 1)?;
        }
        Ok(())
    }

    fn draw_curves(&self) {
        if let Err(e) = draw_curves(self.run) {
            tracing::warn!("curves.png not written: {}", byol_format::error_chain(&e));
        }
    }
}
