//! The step loop every training loop drives: epochs of batches from the loader, the
//! stop signal (agreed over ranks), a metrics row every `log_every` steps, a checkpoint
//! every `checkpoint_every` steps and at each epoch end, the progress display, and the
//! counters of the final summary. What a step does, what a row holds and what a
//! checkpoint stores belong to a [`Step`] (BYOL's is `train::byol_step`).
//!
//! The loop owns position, stop, checkpoint cadence and reporting; a step owns only its
//! model and loss.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tch::Device;

use byol_dist::ProcessGroup;
use byol_format::progress::{Mode, Progress};
use byol_pipeline::loader::Batch;
use byol_pipeline::Loader;

use super::batch::BatchPlan;
use super::position::Position;
use super::runtime::Runtime;
use super::signals::StopSignal;
use crate::bail;
use crate::error::Result;
use crate::run::{self, RankState};

/// A step's values on this rank, before the ranks agree.
#[derive(Debug, Clone, Default)]
pub struct StepOutput {
    /// This rank's loss (averaged over ranks).
    pub loss: f64,
    /// Values summed over ranks (for example correct predictions).
    pub sums: Vec<f64>,
}

/// One logging interval, as a [`Step`] reports it.
#[derive(Debug, Clone)]
pub struct Interval {
    /// Images per second over all ranks.
    pub images_per_s: f64,
    /// Images trained, over all ranks.
    pub images: u64,
    /// Share of the interval the loop waited for data.
    pub stall: f64,
    /// Distributed: share of the interval rank 0 waited for collectives.
    pub comm_share: Option<f64>,
    /// [`StepOutput::sums`] summed over the interval's steps and the ranks.
    pub sums: Vec<f64>,
}

/// Where a loop writes what it reports: `RUN/metrics.jsonl` (rank 0) and the progress
/// display.
pub struct Reporter {
    metrics: Option<run::MetricsFile>,
    pub bar: Progress,
}

impl Reporter {
    /// Appends one JSON line to `RUN/metrics.jsonl` (rank 0 only; a no-op elsewhere).
    ///
    /// # Errors
    /// The write failed, naming the file.
    pub fn append(&mut self, row: &impl serde::Serialize) -> Result<()> {
        match self.metrics.as_mut() {
            Some(f) => f.append(row),
            None => Ok(()),
        }
    }

    /// Whether this process writes (rank 0).
    pub fn is_writer(&self) -> bool {
        self.metrics.is_some()
    }

    /// The run's TensorBoard event file (rank 0 with `train.tensorboard`).
    pub fn tensorboard(&mut self) -> Option<&mut crate::run::tensorboard::EventWriter> {
        self.metrics.as_mut()?.tensorboard()
    }
}

/// What a training loop plugs into [`StepLoop`].
pub trait Step {
    /// One step on this rank's batch `b`; `pos.step` is the step's index (not yet
    /// counted) and `pos.rng` the rank's augmentation generator.
    ///
    /// # Errors
    /// The step failed.
    fn step(&mut self, b: &mut Batch, pos: &mut Position) -> Result<StepOutput>;

    /// After the ranks agreed on a step (loss averaged, sums summed): per-step watches.
    fn after_step(&mut self, _pos: &Position, _loss: f64, _sums: &[f64]) {}

    /// The metrics row (`RUN/metrics.jsonl`) and progress message of an interval.
    ///
    /// # Errors
    /// The row cannot be made.
    fn report(
        &mut self,
        pos: &Position,
        interval: &Interval,
    ) -> Result<(serde_json::Value, String)>;

    /// Writes a checkpoint of `pos` with every rank's place (rank 0 only).
    ///
    /// # Errors
    /// The checkpoint cannot be written.
    fn save(&mut self, pos: &Position, world: usize, ranks: Vec<RankState>) -> Result<PathBuf>;

    /// At an epoch's end, after the cursor moved to the next epoch (a monitor, say).
    ///
    /// # Errors
    /// What the hook does failed.
    fn end_epoch(&mut self, _out: &mut Reporter, _pos: &Position) -> Result<()> {
        Ok(())
    }

    /// Before the last checkpoint; `trained` tells whether this invocation trained a step.
    ///
    /// # Errors
    /// What the hook does failed.
    fn before_finish(
        &mut self,
        _out: &mut Reporter,
        _pos: &Position,
        _trained: bool,
    ) -> Result<()> {
        Ok(())
    }

    /// Redraws the run's curves (rank 0; a failure is only a warning).
    fn draw_curves(&self) {}
}

/// The loop's length and cadence.
#[derive(Debug, Clone, Copy)]
pub struct Cadence {
    /// The run's length in steps (the schedules span it).
    pub total: u64,
    /// Where this invocation stops (`--max-steps`, at most `total`).
    pub stop_at: u64,
    pub log_every: u64,
    pub checkpoint_every: u64,
}

/// What the loop needs of the run around it.
pub struct LoopContext<'a> {
    pub run: &'a Path,
    pub rt: &'a Runtime,
    pub group: Option<Arc<ProcessGroup>>,
    pub batch: BatchPlan,
    pub stop: StopSignal,
    /// The checkpoint the run resumed from.
    pub latest: Option<PathBuf>,
    /// Show progress on stderr (rank 0).
    pub progress: bool,
    /// The command's name on the progress display.
    pub name: &'static str,
    /// `data.max_decode_failure_rate`: above it the loop stops ([`StepLoop::run`]).
    pub max_decode_failure_rate: f64,
    /// Where the rows go besides `metrics.jsonl` (TensorBoard, MLflow).
    pub tracking: run::Tracking,
}

/// The counters of one logging interval, and of the whole invocation.
#[derive(Debug, Clone)]
struct Counters {
    t: Instant,
    step: u64,
    images: u64,
    sums: Vec<f64>,
    wait: f64,
    comm: f64,
    failures: u64,
    /// Samples the loader had decoded (or failed to).
    decoded: u64,
}

/// What a finished loop reports.
#[derive(Debug, Clone)]
pub struct LoopSummary {
    pub step: u64,
    pub total: u64,
    pub epoch: u64,
    pub last_loss: f64,
    pub world: usize,
    /// Seconds of this invocation's loop, and the images it trained (all ranks).
    pub seconds: f64,
    pub images: u64,
    pub comm_seconds: f64,
    pub data_stall: f64,
    pub decode_failures: u64,
    pub checkpoint: Option<String>,
    pub stopped_by_signal: bool,
}

/// A loop in progress.
pub struct StepLoop<'a> {
    pub run: &'a Path,
    pub pos: Position,
    pub cadence: Cadence,
    pub out: Reporter,
    group: Option<Arc<ProcessGroup>>,
    device: Device,
    batch: BatchPlan,
    stop: StopSignal,
    stop_agreed: bool,
    max_decode_failure_rate: f64,
    latest: Option<PathBuf>,
    last_ckpt: Option<PathBuf>,
    win: Counters,
    start: Counters,
}

impl<'a> StepLoop<'a> {
    /// A loop at `pos`: rows of `RUN/metrics.jsonl` after `pos.step` (from an attempt
    /// that ended before its next checkpoint) are dropped, the file opened for appending
    /// (rank 0), the progress display started.
    ///
    /// # Errors
    /// The metrics file cannot be trimmed or opened.
    pub fn new(
        ctx: LoopContext<'a>,
        pos: Position,
        cadence: Cadence,
        loader: &Loader,
    ) -> Result<StepLoop<'a>> {
        let writer = ctx.rt.is_writer();
        let step = pos.step;
        if writer && step > 0 && cadence.stop_at <= step {
            eprintln!(
                "byol {}: the run is already at step {step} (stopping at {} of {}): nothing to train",
                ctx.name, cadence.stop_at, cadence.total
            );
        }
        let metrics = if writer {
            Some(run::open_metrics(
                ctx.run,
                Some(step),
                &format!("byol {}", ctx.name),
                &ctx.tracking,
            )?)
        } else {
            None
        };
        let bar = Progress::new(
            Mode::detect(ctx.progress && writer),
            ctx.name,
            cadence.stop_at,
            "steps",
            step,
        );
        let stats = loader.stats();
        let now = Counters {
            t: Instant::now(),
            step,
            images: 0,
            sums: Vec::new(),
            wait: stats.consumer_wait_s,
            comm: ctx.group.as_ref().map_or(0.0, |g| g.comm_seconds()),
            failures: stats.decode_failures,
            decoded: stats.images,
        };
        Ok(StepLoop {
            run: ctx.run,
            pos,
            cadence,
            out: Reporter { metrics, bar },
            group: ctx.group,
            device: ctx.rt.device,
            batch: ctx.batch,
            stop: ctx.stop,
            stop_agreed: false,
            max_decode_failure_rate: ctx.max_decode_failure_rate,
            latest: ctx.latest,
            last_ckpt: None,
            win: now.clone(),
            start: now,
        })
    }

    /// Where the loop reports (rank 0 writes; the others' is empty).
    pub fn reporter(&mut self) -> &mut Reporter {
        &mut self.out
    }

    /// Trains until `cadence.stop_at` or a stop, epoch after epoch.
    ///
    /// # Errors
    /// A failed step, collective, checkpoint or hook; a non-finite loss; more decode
    /// failures than `data.max_decode_failure_rate` allows ([`StepLoop::check_decoding`]).
    pub fn run(&mut self, loader: &Loader, task: &mut dyn Step) -> Result<()> {
        'epochs: while self.pos.step < self.cadence.stop_at {
            let mut epoch = loader.start_resumed(self.pos.cursor, &self.pos.splits);
            loop {
                if self.pos.step >= self.cadence.stop_at || self.stopping() {
                    break 'epochs;
                }
                let Some(b) = epoch.next() else { break };
                self.one_step(b?, loader, task)?;
            }
            drop(epoch);
            self.end_epoch(task)?;
        }
        Ok(())
    }

    /// One step, its agreement over ranks, and the row/checkpoint when due.
    fn one_step(&mut self, mut b: Batch, loader: &Loader, task: &mut dyn Step) -> Result<()> {
        if let Some(g) = &self.group {
            g.report_step(self.pos.step)?;
        }
        let out = task.step(&mut b, &mut self.pos)?;
        let (loss, sums) = self.agree(out)?;
        if !loss.is_finite() {
            bail!(
                "loss is {loss} at step {}; stopping. The last good checkpoint is {}",
                self.pos.step,
                self.last_ckpt
                    .as_ref()
                    .or(self.latest.as_ref())
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "none".into())
            );
        }
        self.pos.step += 1;
        self.pos.cursor = b.cursor;
        self.pos.last_loss = loss;
        drop(b);
        self.win.images += self.batch.images(1);
        if self.win.sums.len() < sums.len() {
            self.win.sums.resize(sums.len(), 0.0);
        }
        for (w, s) in self.win.sums.iter_mut().zip(&sums) {
            *w += s;
        }
        task.after_step(&self.pos, loss, &sums);
        self.check_decoding(loader)?;
        let step = self.pos.step;
        if step.is_multiple_of(self.cadence.log_every.max(1)) || step == self.cadence.stop_at {
            self.log(loader, task)?;
        }
        self.out.bar.set_position(step);
        if step.is_multiple_of(self.cadence.checkpoint_every.max(1)) {
            self.checkpoint(task)?;
        }
        Ok(())
    }

    /// Stops a loop fed mostly with canvases of replaced samples: when more than
    /// `data.max_decode_failure_rate` of the samples this invocation decoded failed,
    /// judged once 100 samples (or this rank's epoch, if smaller) were decoded.
    ///
    /// # Errors
    /// The count, the share, the first failed samples (key, shard, reason) and what to do.
    fn check_decoding(&self, loader: &Loader) -> Result<()> {
        let s = loader.stats();
        let decoded = s.images - self.start.decoded;
        let failed = s.decode_failures - self.start.failures;
        if failed == 0 || decoded < 100.min(loader.samples_per_epoch()) {
            return Ok(());
        }
        let rate = failed as f64 / decoded as f64;
        if rate <= self.max_decode_failure_rate {
            return Ok(());
        }
        bail!(
            "{failed} of the {decoded} samples decoded so far failed ({:.1} %, above data.max_decode_failure_rate = {}): the dataset is damaged (a bad copy, or images OpenCV cannot read). First: {}. Check it with `byol-tools verify DIR`, re-shard the source, or raise data.max_decode_failure_rate (--set) to train on what decodes",
            100.0 * rate,
            self.max_decode_failure_rate,
            loader.first_failures().join("; ")
        )
    }

    /// Whether to stop before the next step: a signal (one process), or a signal on any
    /// rank at the last step (distributed).
    fn stopping(&self) -> bool {
        match &self.group {
            None => self.stop.is_set(),
            Some(_) => self.stop_agreed,
        }
    }

    /// Distributed: one small `all_reduce` a step of (loss, sums…, signal flag): every
    /// rank then sees the loss averaged over ranks, a NaN on any rank at the same step,
    /// and stops after the same step.
    fn agree(&mut self, out: StepOutput) -> Result<(f64, Vec<f64>)> {
        let Some(g) = &self.group else {
            return Ok((out.loss, out.sums));
        };
        let stop = if self.stop.is_set() { 1.0 } else { 0.0 };
        let mut v = vec![out.loss];
        v.extend(&out.sums);
        v.push(stop);
        let v = g.sum_f64(&v, self.device)?;
        let n = v.len();
        self.stop_agreed = v[n - 1] > 0.0;
        Ok((v[0] / g.world() as f64, v[1..n - 1].to_vec()))
    }

    /// Writes the interval's metrics row and updates the progress message.
    fn log(&mut self, loader: &Loader, task: &mut dyn Step) -> Result<()> {
        let dt = self.win.t.elapsed().as_secs_f64().max(1e-9);
        let wait = loader.stats().consumer_wait_s;
        let comm = self.group.as_ref().map(|g| g.comm_seconds());
        let interval = Interval {
            images_per_s: self.win.images as f64 / dt,
            images: self.win.images,
            stall: ((wait - self.win.wait) / dt).clamp(0.0, 1.0),
            comm_share: comm.map(|c| ((c - self.win.comm) / dt).clamp(0.0, 1.0)),
            sums: std::mem::take(&mut self.win.sums),
        };
        let (row, message) = task.report(&self.pos, &interval)?;
        self.out.append(&row)?;
        self.out.bar.set_message(message);
        self.win = Counters {
            t: Instant::now(),
            step: self.pos.step,
            images: 0,
            sums: Vec::new(),
            wait,
            comm: comm.unwrap_or(0.0),
            failures: 0,
            decoded: 0,
        };
        Ok(())
    }

    /// Saves a checkpoint of the current state. Distributed: every rank's cursor and
    /// generator are gathered (a collective), and rank 0 alone writes.
    ///
    /// # Errors
    /// A failed collective or write.
    pub fn checkpoint(&mut self, task: &mut dyn Step) -> Result<()> {
        let (world, ranks) = self.pos.gather(self.group.as_deref(), self.device)?;
        self.last_ckpt = Some(if self.out.is_writer() {
            task.save(&self.pos, world, ranks)?
        } else {
            run::checkpoint_path(self.run, self.pos.step)
        });
        self.after_rank0_work("the checkpoint")
    }

    /// Distributed: the end of work rank 0 did alone; the other ranks wait for it on the
    /// store, outside the collective timeout ([`ProcessGroup::after_rank0_work`]).
    fn after_rank0_work(&self, what: &str) -> Result<()> {
        match &self.group {
            Some(g) => Ok(g.after_rank0_work(what)?),
            None => Ok(()),
        }
    }

    /// At an epoch's end: the cursor moves to the next epoch, the step's hook runs, the
    /// curves are redrawn and a checkpoint saved.
    fn end_epoch(&mut self, task: &mut dyn Step) -> Result<()> {
        self.pos.next_epoch();
        task.end_epoch(&mut self.out, &self.pos)?;
        if self.out.is_writer() {
            task.draw_curves();
        }
        self.after_rank0_work("the end-of-epoch monitor and curves")?;
        self.checkpoint(task)
    }

    /// After the last step (or a stop): the step's hook, the curves, a checkpoint at the
    /// step reached (unless this invocation trained nothing: a resumed run keeps the
    /// checkpoint it resumed from untouched), and the counters.
    ///
    /// # Errors
    /// A failed hook or checkpoint.
    pub fn finish(mut self, loader: &Loader, task: &mut dyn Step) -> Result<LoopSummary> {
        self.out.bar.finish();
        let trained = self.pos.step > self.start.step;
        task.before_finish(&mut self.out, &self.pos, trained)?;
        if self.out.is_writer() {
            task.draw_curves();
        }
        self.after_rank0_work("the last monitor and curves")?;
        let have = self.last_ckpt.as_ref() == Some(&run::checkpoint_path(self.run, self.pos.step));
        if !have && self.pos.step > 0 && trained {
            self.checkpoint(task)?;
        }
        let seconds = self.start.t.elapsed().as_secs_f64().max(1e-9);
        let stats = loader.stats();
        Ok(LoopSummary {
            step: self.pos.step,
            total: self.cadence.total,
            epoch: self.pos.cursor.epoch,
            last_loss: self.pos.last_loss,
            world: self.batch.world,
            seconds,
            images: self.batch.images(self.pos.step - self.start.step),
            comm_seconds: self
                .group
                .as_ref()
                .map_or(0.0, |g| g.comm_seconds() - self.start.comm),
            data_stall: ((stats.consumer_wait_s - self.start.wait) / seconds).clamp(0.0, 1.0),
            decode_failures: stats.decode_failures - self.start.failures,
            checkpoint: self
                .last_ckpt
                .or(self.latest)
                .map(|p| p.display().to_string()),
            stopped_by_signal: self.stop.is_set(),
        })
    }
}
