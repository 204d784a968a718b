//! `RUN/metrics.jsonl` and `RUN/curves.png`: the rows a loop appends, their readers,
//! and the curves drawn from them.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::write_atomic;
use crate::error::{Context, Result};

/// `RUN/metrics.jsonl`.
pub fn metrics_path(run: &Path) -> PathBuf {
    run.join("metrics.jsonl")
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
    /// Distributed: share of the interval rank 0 waited for collectives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm_share: Option<f64>,
}

/// A kNN-monitor row in `RUN/metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KnnRow {
    pub step: u64,
    pub epoch: u64,
    /// Weighted kNN (k = 20) top-1 of held-out images against a bank of training images.
    pub knn_top1: f64,
}

/// One metrics row of a fine-tuning run (`byol finetune`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinetuneMetrics {
    pub step: u64,
    pub epoch: u64,
    /// Cross-entropy over the interval's last step.
    pub loss: f64,
    pub lr: f64,
    pub images_per_s: f64,
    pub stall: f64,
    /// Top-1 accuracy on this interval's (augmented) training batches.
    pub train_top1: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm_share: Option<f64>,
}

/// The test-set row a fine-tuning run appends when it finishes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TestRow {
    pub step: u64,
    pub epoch: u64,
    pub test_top1: f64,
    pub test_top5: f64,
}

/// One row of `RUN/metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MetricsRow {
    Knn(KnnRow),
    Test(TestRow),
    Step(Metrics),
    Finetune(FinetuneMetrics),
}

/// Reads `RUN/metrics.jsonl`.
///
/// # Errors
/// The file cannot be read, or a line is not a metrics row (naming file and line).
pub fn read_metrics(run: &Path) -> Result<Vec<MetricsRow>> {
    let path = metrics_path(run);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}:{}: not a metrics row", path.display(), i + 1))
        })
        .collect()
}

/// Where a run's rows go besides `metrics.jsonl` (rank 0).
#[derive(Clone, Default)]
pub struct Tracking {
    /// TensorBoard event files in `RUN/tb` (`train.tensorboard`).
    pub tensorboard: bool,
    /// An MLflow server (`--mlflow`, `$MLFLOW_TRACKING_URI`).
    pub mlflow: Option<super::mlflow::MlflowHandle>,
}

/// `RUN/metrics.jsonl` opened for appending rows ([`open_metrics`]).
pub struct MetricsFile {
    file: std::fs::File,
    path: PathBuf,
    /// The same rows as TensorBoard scalars (`train.tensorboard`).
    tb: Option<super::tensorboard::EventWriter>,
    /// And as MLflow metrics.
    mlflow: Option<super::mlflow::MlflowHandle>,
}

impl MetricsFile {
    /// Appends one row as one JSON line, in one write (a crash leaves the whole line or a
    /// fragment that the next [`open_metrics`] cuts off).
    ///
    /// # Errors
    /// The write failed, naming the file.
    pub fn append(&mut self, row: &impl Serialize) -> Result<()> {
        use std::io::Write;
        let value = serde_json::to_value(row)?;
        let mut line = serde_json::to_vec(&value)?;
        line.push(b'\n');
        self.file
            .write_all(&line)
            .with_context(|| format!("writing {}", self.path.display()))?;
        let step = value.get("step").and_then(|s| s.as_u64()).unwrap_or(0);
        let scalars = super::tensorboard::row_scalars(&value);
        if let Some(m) = &self.mlflow {
            m.metrics(step, scalars.clone());
        }
        if let Some(tb) = self.tb.as_mut() {
            tb.scalars(step, &scalars)?;
        }
        Ok(())
    }

    /// The TensorBoard event file the rows also go to (`None`: `train.tensorboard` off).
    pub fn tensorboard(&mut self) -> Option<&mut super::tensorboard::EventWriter> {
        self.tb.as_mut()
    }
}

/// Opens `RUN/metrics.jsonl` for appending: a torn last line (a write cut by a crash or a
/// full disk) is cut off first, and with `keep_through = Some(step)` the rows after
/// `step` are dropped ([`trim_metrics`]); each repair is said once on stderr, prefixed
/// with `who` (`byol train`). With `tracking.tensorboard`, the rows also go to a new
/// event file in `RUN/tb`, which with `keep_through` starts with a restart mark at
/// `step + 1` (the dropped rows are dropped in TensorBoard too); with `tracking.mlflow`,
/// to the MLflow run.
///
/// # Errors
/// The file cannot be read, repaired or opened; the event file cannot be made.
pub fn open_metrics(
    run: &Path,
    keep_through: Option<u64>,
    who: &str,
    tracking: &Tracking,
) -> Result<MetricsFile> {
    let path = metrics_path(run);
    let cut = byol_format::fs::cut_torn_last_line(&path)?;
    if cut > 0 {
        eprintln!(
            "{who}: cut an incomplete last line ({cut} bytes) from {}: a write an earlier attempt did not finish",
            path.display()
        );
    }
    if let Some(step) = keep_through {
        let dropped = trim_metrics(run, step)?;
        if dropped > 0 {
            eprintln!(
                "{who}: dropped {dropped} row(s) of {} after step {step}, written by an attempt that ended before its next checkpoint",
                path.display()
            );
        }
    }
    let file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let tb = if tracking.tensorboard {
        let mut w = super::tensorboard::EventWriter::create(run)?;
        if let Some(step) = keep_through {
            w.restart(step + 1)?;
        }
        Some(w)
    } else {
        None
    };
    Ok(MetricsFile {
        file,
        path,
        tb,
        mlflow: tracking.mlflow.clone(),
    })
}

/// Drops the rows of `RUN/metrics.jsonl` after `step`: rows an earlier attempt wrote
/// after its last checkpoint, which a resume from that checkpoint (or a new run, `step`
/// 0) trains again. Returns how many were dropped (the file is rewritten atomically).
///
/// # Errors
/// The file cannot be read or rewritten.
pub fn trim_metrics(run: &Path, step: u64) -> Result<usize> {
    let path = metrics_path(run);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut kept = String::with_capacity(text.len());
    let mut dropped = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        // Unparsable lines are kept (read_metrics reports them).
        let row_step = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("step")?.as_u64());
        if row_step.is_some_and(|s| s > step) {
            dropped += 1;
        } else {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    if dropped > 0 {
        write_atomic(&path, kept.as_bytes())?;
    }
    Ok(dropped)
}

/// Redraws `RUN/curves.png` from `RUN/metrics.jsonl`: the BYOL loss (left panel), the
/// online probe's and the kNN monitor's top-1 accuracy in % (right), against the step,
/// titled with the run folder's name. A fine-tuning run's: the cross-entropy, and the
/// top-1 on training batches and on the test set.
///
/// # Errors
/// Unreadable metrics, no font for the text, or I/O (see [`crate::plot::save_panels`]).
pub fn draw_curves(run: &Path) -> Result<()> {
    use crate::plot::{save_panels, Panel, Series, SeriesLabelPosition, BLUE, GREEN, ORANGE};
    let (mut loss, mut probe, mut knn) = (Vec::new(), Vec::new(), Vec::new());
    let mut finetune = false;
    for row in read_metrics(run)? {
        match row {
            MetricsRow::Step(m) => {
                loss.push((m.step as f64, m.loss));
                if let Some(a) = m.probe_acc {
                    probe.push((m.step as f64, 100.0 * a));
                }
            }
            MetricsRow::Knn(k) => knn.push((k.step as f64, 100.0 * k.knn_top1)),
            MetricsRow::Finetune(m) => {
                finetune = true;
                loss.push((m.step as f64, m.loss));
                probe.push((m.step as f64, 100.0 * m.train_top1));
            }
            MetricsRow::Test(t) => knn.push((t.step as f64, 100.0 * t.test_top1)),
        }
    }
    let (loss_title, probe_name, knn_name) = if finetune {
        (
            "cross-entropy loss",
            "training batches (augmented)",
            "test set",
        )
    } else {
        (
            "BYOL loss",
            "online linear probe (training batches)",
            "kNN (k = 20), held-out",
        )
    };
    let name = std::fs::canonicalize(run)
        .unwrap_or_else(|_| run.to_path_buf())
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| run.display().to_string());
    save_panels(
        &run.join("curves.png"),
        &format!("byol run {name}"),
        &[
            Panel {
                title: loss_title,
                y_label: "loss",
                y_range: None,
                legend: SeriesLabelPosition::UpperRight,
                series: &[Series {
                    name: "loss",
                    color: BLUE,
                    points: &loss,
                }],
            },
            Panel {
                title: "top-1 accuracy",
                y_label: "accuracy (%)",
                y_range: Some((0.0, 100.0)),
                legend: SeriesLabelPosition::LowerRight,
                series: &[
                    Series {
                        name: probe_name,
                        color: ORANGE,
                        points: &probe,
                    },
                    Series {
                        name: knn_name,
                        color: GREEN,
                        points: &knn,
                    },
                ],
            },
        ],
        (1000, 420),
    )?;
    Ok(())
}
