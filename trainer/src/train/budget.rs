//! `--time-budget`: a short calibration measures this machine's step time, then the
//! run's length is planned to fit ([`Budget::plan`] returns a [`BudgetPlan`]; the caller
//! records it in the run's config).

use std::time::Instant;

use byol_pipeline::loader::Batch;
use byol_pipeline::{Cursor, Loader};

use super::signals::StopSignal;
use crate::bail;
use crate::error::Result;

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

/// What a calibration runs: training steps of a throw-away copy of the run, and the
/// run's periodic monitor.
pub trait Trial {
    /// One training step on `b`.
    ///
    /// # Errors
    /// The step failed.
    fn step(&mut self, b: &mut Batch) -> Result<()>;
    /// Runs the monitor once (its set-up untimed); returns the seconds of one run, 0
    /// without a monitor.
    ///
    /// # Errors
    /// The monitor failed.
    fn monitor(&mut self) -> Result<f64>;
}

/// Times `trial`'s steps on `loader` for about `seconds` (at least 3 steps after 2
/// warm-up steps), then one monitor run.
///
/// # Errors
/// A stop signal, or a failed step or monitor.
pub fn calibrate(
    loader: &Loader,
    seconds: f64,
    stop: &StopSignal,
    trial: &mut dyn Trial,
) -> Result<Calibration> {
    let mut epoch_no = 0;
    let mut epoch = loader.start(Cursor::default());
    let (warmup, min_steps) = (2u64, 3u64);
    let mut done = 0u64;
    let mut t0 = Instant::now();
    loop {
        if stop.is_set() {
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
        trial.step(&mut b?)?;
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
    Ok(Calibration {
        steps,
        step_s,
        knn_s: trial.monitor()?,
    })
}

/// What `--time-budget` decided: the run's length and how it was found.
#[derive(Debug, Clone)]
pub struct BudgetPlan {
    /// The budget, seconds.
    pub seconds: f64,
    /// The run's length: steps, and the epochs they start.
    pub total_steps: u64,
    pub epochs: u64,
    /// Training images/s the calibration measured.
    pub images_per_s: f64,
    pub reason: String,
    pub calibration_seconds: f64,
}

/// A time budget to plan a run in.
pub struct Budget<'a> {
    /// Seconds from `t_start` the run may take.
    pub seconds: f64,
    pub t_start: Instant,
    pub loader: &'a Loader,
    /// Images a step trains on (the global batch).
    pub images_per_step: usize,
    /// Epochs between monitor runs (0: no monitor).
    pub monitor_every_epochs: u64,
    /// The command on the plan's line (`train`, `finetune`).
    pub command: &'static str,
}

impl Budget<'_> {
    /// Calibrates `trial`, then plans the most steps that fit in the budget (see
    /// [`steps_for_budget`]), keeping [`BUDGET_RESERVE`] back; says the plan on stderr.
    ///
    /// # Errors
    /// A failed calibration, or a budget too small for one step.
    pub fn plan(&self, stop: &StopSignal, trial: &mut dyn Trial) -> Result<BudgetPlan> {
        let budget = self.seconds;
        let t_cal = Instant::now();
        let spe = self.loader.batches_per_epoch();
        let knn_every = self.monitor_every_epochs;
        let seconds = (budget * 0.03).clamp(10.0, 60.0);
        let c = calibrate(self.loader, seconds, stop, trial)?;
        let spent = self.t_start.elapsed().as_secs_f64();
        let available = budget * (1.0 - BUDGET_RESERVE) - spent;
        let n = steps_for_budget(available, c.step_s, spe, c.knn_s, knn_every);
        let rate = self.images_per_step as f64 / c.step_s;
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
        eprintln!("byol {}: time budget: {reason}", self.command);
        Ok(BudgetPlan {
            seconds: budget,
            total_steps: n,
            epochs: n.div_ceil(spe),
            images_per_s: rate,
            reason,
            calibration_seconds: t_cal.elapsed().as_secs_f64(),
        })
    }
}

#[cfg(test)]
mod tests {
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
