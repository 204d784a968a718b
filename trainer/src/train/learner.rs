//! BYOL's learner: online and target networks, optimizer, online linear probe and the
//! two-view augmentation — what one BYOL step needs — and [`build_model`].

use std::path::Path;
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use byol_dist::ProcessGroup;
use byol_pipeline::augment::{Augmenter, SplitMix64};

use super::runtime::Runtime;
use crate::byol::{
    channels_last, copy_into, named_gradients, train_step_synced, Network, Optimizer,
    OptimizerKind, StepSettings,
};
use crate::config::TrainConfig;
use crate::error::Result;
use crate::run::{self, load_checkpoint, CheckpointState};

/// The online linear probe: a linear classifier on the detached embedding, trained with
/// SGD alongside the networks (its state is part of the checkpoint).
pub struct Probe {
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
            opt: Optimizer::new(OptimizerKind::Sgd, 0.9, 0.0, 0.0),
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
    pub fn named(&self) -> run::Named {
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

/// The networks, optimizer, online probe and augmentation of a run: what one training
/// step needs.
pub struct Learner {
    pub online: Network,
    pub target: Network,
    pub opt: Optimizer,
    pub probe: Option<Probe>,
    aug: Augmenter,
    device: Device,
    amp: Option<Kind>,
    channels_last: bool,
    /// The process group of a distributed run (gradients averaged, SyncBatchNorm).
    pub group: Option<Arc<ProcessGroup>>,
}

/// Every variable of `vs`, sorted by name.
fn sorted_variables(vs: &tch::nn::VarStore) -> Vec<Tensor> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v.into_iter().map(|(_, t)| t).collect()
}

/// The host-side values of one step.
pub struct StepResult {
    pub loss: f64,
    pub collapse: f64,
    /// Correct online-probe predictions in the batch (0 without labels).
    pub correct: f64,
}

impl Learner {
    /// Networks seeded with `train.seed`; a probe when the data has `classes` > 0. With a
    /// process group the BatchNorm layers are SyncBatchNorm (unless `model.sync_bn` is
    /// false) and gradients are averaged over its ranks.
    pub fn new(
        cfg: &TrainConfig,
        rt: &Runtime,
        classes: Option<i64>,
        group: Option<Arc<ProcessGroup>>,
    ) -> Learner {
        let device = rt.device;
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
            amp: rt.precision.dtype,
            channels_last: cfg.train.channels_last,
            group,
        }
    }

    /// The device the networks live on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Copies rank `root`'s networks (weights and BatchNorm buffers), optimizer state and
    /// probe into every rank (in name order), so that all ranks start identical.
    pub fn broadcast_from(&self, root: usize) -> Result<()> {
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
    pub fn restore(&mut self, dir: &Path) -> Result<CheckpointState> {
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
    pub fn step(
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
        let labels = super::batch::train_labels(b);
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

/// Std of the L2-normalised rows × √d.
/// The collapse monitor as a scalar tensor on `z`'s device.
pub fn collapse_monitor(z: &Tensor) -> Tensor {
    let d = z.size()[1] as f64;
    let zn = z / z
        .norm_scalaropt_dim(2, [1i64].as_slice(), true)
        .clamp_min(1e-12);
    zn.std_dim([0i64].as_slice(), true, false).mean(Kind::Float) * d.sqrt()
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
