//! The fine-tuning [`Step`]: one crop-and-flip view, cross-entropy on the classifier's
//! logits, gradients averaged over ranks, SGD (Nesterov) at the cosine schedule's rate;
//! checkpoints of the classifier and optimizer.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use byol_dist::ProcessGroup;
use byol_pipeline::augment::Augmenter;
use byol_pipeline::loader::Batch;

use crate::byol::{backward_synced, channels_last, lr_at, Optimizer, OptimizerKind};
use crate::classifier::{Classifier, CLASSIFIER};
use crate::config::{FinetuneConfig, TrainConfig};
use crate::error::{Context, Result};
use crate::run::{draw_curves, write_checkpoint, write_state, FinetuneMetrics, RankState};
use crate::train::batch::train_labels;
use crate::train::position::Position;
use crate::train::step_loop::{Interval, Step, StepOutput};

/// The optimizer of a fine-tuning recipe: SGD with (Nesterov) momentum, weight decay on
/// the weights of rank ≥ 2 only.
pub fn optimizer(f: &FinetuneConfig) -> Optimizer {
    let mut opt = Optimizer::new(OptimizerKind::Sgd, f.momentum, f.weight_decay, 0.0);
    opt.nesterov = f.nesterov;
    opt
}

/// One fine-tuning step on a batch already on the device: logits of `x` (the encoder in
/// training mode, or frozen and in inference mode when `linear`), cross-entropy averaged
/// over the labelled samples (label -100: ignored), backward, gradients averaged over
/// `group`'s ranks, one optimizer step at `lr`. Returns (loss, logits) as float32.
///
/// # Shapes
/// `x`: `[N, 3, S, S]` normalised, `labels`: `[N]` int64 → (scalar, `[N, K]`).
///
/// # Errors
/// A collective failed (SyncBatchNorm's backward or the gradient average).
pub fn finetune_step(
    net: &Classifier,
    opt: &mut Optimizer,
    (x, labels): (&Tensor, &Tensor),
    (lr, amp, linear): (f64, Option<Kind>, bool),
    group: Option<&ProcessGroup>,
) -> Result<(Tensor, Tensor)> {
    let (loss, logits) = crate::amp::autocast(x.device(), amp, || {
        let logits = if linear {
            let y = tch::no_grad(|| net.encoder.forward_t(x, false));
            tch::nn::Module::forward(&net.fc, &y)
        } else {
            net.forward_t(x, true)
        };
        let logits = logits.to_kind(Kind::Float);
        let valid = labels.ge(0).sum(Kind::Float).clamp_min(1.0);
        let loss =
            logits.cross_entropy_loss::<Tensor>(labels, None, tch::Reduction::Sum, -100, 0.0)
                / valid;
        (loss, logits)
    });
    backward_synced(&loss, &net.vs, group)?;
    opt.step(&net.vs, lr);
    Ok((loss, logits.detach()))
}

/// A fine-tuning run's step and schedule.
pub struct FinetuneStep<'a> {
    pub run: &'a Path,
    pub cfg: TrainConfig,
    pub recipe: FinetuneConfig,
    pub net: Classifier,
    pub opt: Optimizer,
    pub aug: Augmenter,
    pub device: Device,
    pub amp: Option<Kind>,
    pub group: Option<Arc<ProcessGroup>>,
    /// Steps in the run (the cosine spans them).
    pub total: u64,
    lr: f64,
}

impl<'a> FinetuneStep<'a> {
    pub fn new(
        run: &'a Path,
        cfg: TrainConfig,
        (net, opt): (Classifier, Optimizer),
        (device, amp, group): (Device, Option<Kind>, Option<Arc<ProcessGroup>>),
        total: u64,
    ) -> FinetuneStep<'a> {
        let recipe = cfg.finetune.clone().unwrap_or_default();
        FinetuneStep {
            run,
            aug: Augmenter::new(cfg.augment.clone()),
            cfg,
            recipe,
            net,
            opt,
            device,
            amp,
            group,
            total,
            lr: 0.0,
        }
    }
}

impl Step for FinetuneStep<'_> {
    fn step(&mut self, b: &mut Batch, pos: &mut Position) -> Result<StepOutput> {
        let f = &self.recipe;
        self.lr = lr_at(f.lr, pos.step, 0, self.total);
        let canvas = b.to_device(self.device);
        let mut x = self.aug.crop_flip(
            &canvas,
            b.valid_sizes(),
            (f.crop_scale, f.crop_ratio, f.flip_p),
            &mut pos.rng,
        );
        if self.cfg.train.channels_last {
            x = channels_last(&x);
        }
        let labels = Tensor::from_slice(&train_labels(b)).to_device(self.device);
        let (loss, logits) = finetune_step(
            &self.net,
            &mut self.opt,
            (&x, &labels),
            (self.lr, self.amp, f.linear),
            self.group.as_deref(),
        )?;
        let correct = logits.argmax(1, false).eq_tensor(&labels).sum(Kind::Float);
        let host = Vec::<f64>::try_from(
            Tensor::stack(&[loss, correct], 0)
                .to_kind(Kind::Double)
                .to_device(Device::Cpu),
        )?;
        Ok(StepOutput {
            loss: host[0],
            sums: vec![host[1]],
        })
    }

    fn report(&mut self, pos: &Position, i: &Interval) -> Result<(serde_json::Value, String)> {
        let correct = i.sums.first().copied().unwrap_or(0.0);
        let m = FinetuneMetrics {
            step: pos.step,
            epoch: pos.cursor.epoch,
            loss: pos.last_loss,
            lr: self.lr,
            images_per_s: i.images_per_s,
            stall: i.stall,
            train_top1: correct / i.images.max(1) as f64,
            comm_share: i.comm_share,
        };
        let message = format!(
            "loss {:.4}, lr {:.4}, train top-1 {:.1} %, {:.0} images/s, stall {:.0} %",
            m.loss,
            m.lr,
            100.0 * m.train_top1,
            m.images_per_s,
            100.0 * m.stall
        );
        Ok((serde_json::to_value(&m)?, message))
    }

    fn save(&mut self, pos: &Position, world: usize, ranks: Vec<RankState>) -> Result<PathBuf> {
        let st = pos.checkpoint_state(&self.cfg, world, ranks);
        let (net, opt) = (&self.net, &self.opt);
        write_checkpoint(self.run, pos.step, self.cfg.train.keep, |tmp| {
            net.save(&tmp.join(CLASSIFIER))?;
            let o = opt.state();
            if !o.is_empty() {
                let f = tmp.join(crate::run::OPTIMIZER);
                Tensor::write_safetensors(&o, &f)
                    .with_context(|| format!("writing {}", f.display()))?;
            }
            write_state(tmp, &st)
        })
    }

    fn draw_curves(&self) {
        if let Err(e) = draw_curves(self.run) {
            tracing::warn!("curves.png not written: {}", byol_format::error_chain(&e));
        }
    }
}
