//! What a fine-tuning run reports: `FT/finetune.json`, and the test accuracy of the
//! classifier it measures.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use byol_pipeline::loader::DecodeFn;

use crate::classifier::{topk_correct, Classifier};
use crate::config::{FinetuneConfig, TrainConfig};
use crate::error::Result;
use crate::train::{LoopSummary, Runtime};

/// `FT/finetune.json` and the `--json` summary.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinetuneReport {
    pub command: String,
    pub run: String,
    /// The pretrained run, checkpoint and step the encoder came from (its shape only
    /// with `init` random).
    pub source_run: String,
    pub source_checkpoint: String,
    pub source_step: u64,
    /// `byol` or `random`, and whether only the head was trained.
    pub init: String,
    pub linear: bool,
    pub train: String,
    pub test: String,
    pub classes: usize,
    /// Labelled training rows used, fewest and most of one class, how they were chosen,
    /// and the file listing them.
    pub labels: u64,
    pub labels_per_class: [u64; 2],
    pub subset: String,
    pub label_keys: String,
    pub steps: u64,
    pub total_steps: u64,
    pub epochs: f64,
    pub batch: usize,
    /// Test accuracy of the fine-tuned network (absent when the run stopped early).
    pub test_rows: u64,
    pub test_top1: Option<f64>,
    pub test_top5: Option<f64>,
    pub images_per_s: f64,
    pub data_stall: f64,
    pub decode_failures: u64,
    pub world_size: usize,
    pub precision: String,
    pub checkpoint: Option<String>,
    pub stopped_by_signal: bool,
    pub seconds: f64,
    #[serde(skip)]
    pub rank: usize,
}

impl FinetuneReport {
    /// The one-line table row a command prints.
    pub fn line(&self) -> String {
        let pct = |v: Option<f64>| v.map_or("-".into(), |a| format!("{:.2} %", 100.0 * a));
        format!(
            "{} {} on {} labels ({} classes): test top-1 {}, top-5 {} ({} test images), {} steps, {:.0} images/s",
            if self.linear { "linear" } else { "fine-tuned" },
            if self.init == "random" { "random init" } else { "BYOL encoder" },
            self.labels,
            self.classes,
            pct(self.test_top1),
            pct(self.test_top5),
            self.test_rows,
            self.steps,
            self.images_per_s
        )
    }
}

impl FinetuneReport {
    /// The report of a finished (or stopped) loop, before the test.
    pub fn new(
        out: &Path,
        opts: &super::FinetuneOptions,
        (recipe, chosen): (&FinetuneConfig, &super::LabelSubset),
        (s, spe): (&LoopSummary, u64),
        rt: &Runtime,
    ) -> FinetuneReport {
        FinetuneReport {
            command: "finetune".into(),
            run: out.display().to_string(),
            source_run: recipe.source_run.clone(),
            source_checkpoint: recipe.source_checkpoint.clone(),
            source_step: recipe.source_step,
            init: format!("{:?}", recipe.init).to_lowercase(),
            linear: recipe.linear,
            train: opts.train.display().to_string(),
            test: opts.test.display().to_string(),
            classes: recipe.classes.len(),
            labels: chosen.rows.len() as u64,
            labels_per_class: [
                chosen.per_class.iter().copied().min().unwrap_or(0),
                chosen.per_class.iter().copied().max().unwrap_or(0),
            ],
            subset: recipe.subset.clone(),
            label_keys: super::subset::keys_path(out).display().to_string(),
            steps: s.step,
            total_steps: s.total,
            epochs: s.step as f64 / spe.max(1) as f64,
            batch: recipe.batch,
            test_rows: 0,
            test_top1: None,
            test_top5: None,
            images_per_s: s.images as f64 / s.seconds,
            data_stall: s.data_stall,
            decode_failures: s.decode_failures,
            world_size: s.world,
            precision: rt.precision.name.into(),
            checkpoint: s.checkpoint.clone(),
            stopped_by_signal: s.stopped_by_signal,
            seconds: 0.0,
            rank: rt.rank(),
        }
    }
}

/// `FT/finetune.json`.
pub fn report_path(run: &Path) -> PathBuf {
    run.join("finetune.json")
}

/// Top-1 and top-5 accuracy of `net` (inference mode) on the test shards: each image's
/// centred square resized to the view size, as `byol eval` reads it. Returns (top-1,
/// top-5, images).
///
/// # Errors
/// The test shards cannot be read, or hold unlabeled rows.
pub fn test_accuracy(
    net: &Classifier,
    cfg: &TrainConfig,
    test: &Path,
    decode: DecodeFn,
    device: Device,
) -> Result<(f64, f64, u64)> {
    let (x, labels) =
        crate::eval::load_inputs(test, cfg.data.canvas, cfg.augment.size, decode, None)?;
    let logits = logits(net, &x, cfg, device);
    let n = labels.size()[0];
    let (c1, c5) = topk_correct(&logits, &labels);
    Ok((c1 / n as f64, c5 / n as f64, n as u64))
}

/// The classifier's logits in inference mode, in chunks.
///
/// # Shapes
/// `x`: `[N, 3, S, S]` uint8 → `[N, K]` float32 (CPU).
pub fn logits(net: &Classifier, x: &Tensor, cfg: &TrainConfig, device: Device) -> Tensor {
    crate::eval::inference(x, cfg, device, |xb| net.forward_t(xb, false))
}
