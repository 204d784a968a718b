//! BYOL: online and target networks, the loss, the EMA update, LARS and schedules.

use std::collections::HashMap;

use tch::{nn, Device, Kind, Tensor};

use crate::model::{EncoderConfig, HeadConfig, Mlp, ResNet};

/// One network (encoder + projector [+ predictor]) in its own `VarStore`.
pub struct Network {
    pub vs: nn::VarStore,
    pub encoder: ResNet,
    pub projector: Mlp,
    pub predictor: Option<Mlp>,
}

impl Network {
    pub fn new(
        device: Device,
        enc: &EncoderConfig,
        proj: &HeadConfig,
        pred: Option<&HeadConfig>,
    ) -> Network {
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let encoder = ResNet::new(&(&root / "encoder"), enc);
        let projector = Mlp::new(&(&root / "projector"), encoder.out_dim(), proj);
        let predictor = pred.map(|p| Mlp::new(&(&root / "predictor"), proj.out, p));
        Network {
            vs,
            encoder,
            projector,
            predictor,
        }
    }

    /// Every BatchNorm of the network becomes SyncBatchNorm over `group` (training mode).
    pub fn sync_batch_norm(&mut self, group: &std::sync::Arc<byol_dist::ProcessGroup>) {
        let mut norms = self.encoder.norms_mut();
        norms.push(&mut self.projector.bn);
        if let Some(p) = self.predictor.as_mut() {
            norms.push(&mut p.bn);
        }
        for n in norms {
            n.sync_with(std::sync::Arc::clone(group));
        }
    }

    /// Stores every 4-D weight in channels-last layout (see [`vs_to_channels_last`]).
    pub fn to_channels_last(&mut self) {
        vs_to_channels_last(&self.vs);
    }

    /// Writes every variable (contiguous copies) to a safetensors file.
    ///
    /// # Errors
    /// The safetensors file cannot be written.
    pub fn save(&self, path: &std::path::Path) -> Result<(), tch::TchError> {
        Tensor::write_safetensors(&named_contiguous(&self.vs), path)
    }

    /// # Shapes
    /// `x`: `[N, 3, H, W]` → (embedding `[N, D]`, projection `[N, P]`, prediction `[N, P]` if any).
    pub fn forward(&self, x: &Tensor, train: bool) -> (Tensor, Tensor, Option<Tensor>) {
        let y = self.encoder.forward_t(x, train);
        let z = self.projector.forward_t(&y, train);
        let p = self.predictor.as_ref().map(|m| m.forward_t(&z, train));
        (y, z, p)
    }
}

/// Stores every 4-D weight of `vs` in channels-last layout (NHWC strides, NCHW shape);
/// libtorch's convolutions then run in that layout when the input has it too.
pub fn vs_to_channels_last(vs: &nn::VarStore) {
    tch::no_grad(|| {
        for (_, mut t) in vs.variables() {
            if t.dim() == 4 {
                let cl = channels_last(&t);
                t.set_data(&cl);
            }
        }
    });
}

/// `loss.backward()`, then the gradients of `vs` averaged over `group`'s ranks (name
/// order). A failure inside the backward pass of a distributed step is SyncBatchNorm's
/// all-reduce, and is reported as that collective's error.
///
/// # Errors
/// The backward pass or the gradient average failed.
pub fn backward_synced(
    loss: &Tensor,
    vs: &nn::VarStore,
    group: Option<&byol_dist::ProcessGroup>,
) -> Result<(), crate::error::Error> {
    zero_grad(vs);
    if let Err(e) = loss.f_backward() {
        return Err(match group {
            Some(g) => g
                .collective_error("backward (SyncBatchNorm all_reduce)", e.to_string())
                .into(),
            None => e.into(),
        });
    }
    if let Some(g) = group {
        g.average_gradients(&named_gradients(vs))?;
    }
    Ok(())
}

/// Every variable of `vs` as a contiguous copy, sorted by name (tch's safetensors
/// writer refuses channels-last tensors).
pub fn named_contiguous(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(k, t)| (k, t.contiguous()))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// The same values in channels-last layout: `[N, C, H, W]` with NHWC strides.
pub fn channels_last(t: &Tensor) -> Tensor {
    t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

/// `2 − 2·cos(p, z)` per row, `[N]`.
pub fn regression_loss(p: &Tensor, z: &Tensor) -> Tensor {
    let pn = p / p
        .norm_scalaropt_dim(2, [1i64].as_slice(), true)
        .clamp_min(1e-12);
    let zn = z / z
        .norm_scalaropt_dim(2, [1i64].as_slice(), true)
        .clamp_min(1e-12);
    let cos = (pn * zn).sum_dim_intlist([1i64].as_slice(), false, Kind::Float);
    cos.neg() * 2.0 + 2.0
}

/// Symmetric BYOL loss: mean over the batch of `loss(p1, sg(z2')) + loss(p2, sg(z1'))`.
pub fn byol_loss(p1: &Tensor, p2: &Tensor, zt1: &Tensor, zt2: &Tensor) -> Tensor {
    (regression_loss(p1, &zt2.detach()) + regression_loss(p2, &zt1.detach())).mean(Kind::Float)
}

/// τ at step k of K: `1 − (1 − τ_base)·(cos(πk/K) + 1)/2`.
pub fn tau_at(base: f64, step: u64, total: u64) -> f64 {
    let k = step.min(total) as f64 / total.max(1) as f64;
    1.0 - (1.0 - base) * ((std::f64::consts::PI * k).cos() + 1.0) / 2.0
}

/// Learning rate at `step`: linear warm-up from 0 over `warmup` steps, then cosine to 0.
pub fn lr_at(peak: f64, step: u64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        return peak * step as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let k = (step - warmup).min(total.saturating_sub(warmup)) as f64 / span;
    peak * 0.5 * (1.0 + (std::f64::consts::PI * k).cos())
}

/// `ξ ← τ ξ + (1 − τ) θ` for every target variable, paired with the online one by name
/// (BatchNorm running statistics included; the target's BN runs on batch statistics
/// in training, so those only matter if the target is ever evaluated).
pub fn ema_update(target: &nn::VarStore, online: &nn::VarStore, tau: f64) {
    let on = online.variables();
    tch::no_grad(|| {
        for (name, mut t) in target.variables() {
            if let Some(o) = on.get(&name) {
                if t.is_floating_point() {
                    let _ = t.lerp_(o, 1.0 - tau);
                } else {
                    t.copy_(o);
                }
            }
        }
    });
}

/// Copies every online variable into the target with the same name.
pub fn copy_into(target: &nn::VarStore, online: &nn::VarStore) {
    let on = online.variables();
    tch::no_grad(|| {
        for (name, mut t) in target.variables() {
            if let Some(o) = on.get(&name) {
                t.copy_(o);
            }
        }
    });
}

pub use crate::config::OptimizerKind;

/// The optimizer of the networks (and of the online probe), one of [`OptimizerKind`]:
///
/// - `Lars`, as BYOL's official code defines it: weight decay added to the gradient,
///   then scaled by `η‖w‖/‖g + wd·w‖` (unscaled when either norm is 0), then momentum:
///   `m ← μm + g'`, and the step `w ← w − lr·m`. Biases and normalisation parameters
///   (every 1-D tensor) are excluded from both weight decay and adaptation;
/// - `Sgd`: the same without adaptation; with `nesterov`, the step is `g' + μm` after
///   the momentum update (`torch.optim.SGD(nesterov=True)`);
/// - `Adamw`: `torch.optim.AdamW` (1-D tensors get no weight decay).
pub struct Optimizer {
    pub kind: OptimizerKind,
    pub momentum: f64,
    pub weight_decay: f64,
    pub trust: f64,
    /// Nesterov momentum (SGD and LARS).
    pub nesterov: bool,
    /// Momentum (AdamW: first-moment) buffers by variable name.
    pub buffers: HashMap<String, Tensor>,
    /// AdamW: second-moment buffers, β2, ε and the step count.
    pub second: HashMap<String, Tensor>,
    pub beta2: f64,
    pub eps: f64,
    pub t: u64,
}

impl Optimizer {
    pub fn new(kind: OptimizerKind, momentum: f64, weight_decay: f64, trust: f64) -> Optimizer {
        Optimizer {
            kind,
            momentum,
            weight_decay,
            trust,
            nesterov: false,
            buffers: HashMap::new(),
            second: HashMap::new(),
            beta2: 0.999,
            eps: 1e-8,
            t: 0,
        }
    }

    /// AdamW step (torch semantics; 1-D tensors get no weight decay).
    fn adamw_step(&mut self, names: Vec<(String, Tensor)>, lr: f64) {
        self.t += 1;
        let (b1, b2) = (self.momentum, self.beta2);
        let c1 = 1.0 - b1.powi(self.t as i32);
        let c2 = 1.0 - b2.powi(self.t as i32);
        tch::no_grad(|| {
            for (name, mut w) in names {
                let g = w.grad();
                if !g.defined() {
                    continue;
                }
                if !Optimizer::excluded(&w) && self.weight_decay != 0.0 {
                    w *= 1.0 - lr * self.weight_decay;
                }
                let m = self
                    .buffers
                    .entry(name.clone())
                    .or_insert_with(|| g.zeros_like());
                *m *= b1;
                *m += &g * (1.0 - b1);
                let v = self.second.entry(name).or_insert_with(|| g.zeros_like());
                *v *= b2;
                *v += &g * &g * (1.0 - b2);
                let denom = (&*v / c2).sqrt() + self.eps;
                w -= (&*m / c1) / denom * lr;
            }
        });
    }

    /// True for parameters excluded from weight decay and adaptation.
    pub fn excluded(t: &Tensor) -> bool {
        t.dim() <= 1
    }

    /// One step over the trainable variables of `vs`, using their gradients.
    pub fn step(&mut self, vs: &nn::VarStore, lr: f64) {
        let names = trainable_by_name(vs);
        if self.kind == OptimizerKind::Adamw {
            return self.adamw_step(names, lr);
        }
        tch::no_grad(|| {
            for (name, mut w) in names {
                let g = w.grad();
                if !g.defined() {
                    continue;
                }
                let mut u = g.shallow_clone();
                if !Optimizer::excluded(&w) {
                    if self.weight_decay != 0.0 {
                        u = &u + &w * self.weight_decay;
                    }
                    if self.kind == OptimizerKind::Lars {
                        // On the device (no host round trip per parameter on a GPU).
                        let (wn, un) = (w.norm(), u.norm());
                        let ok = wn.gt(0.0).logical_and(&un.gt(0.0));
                        let ratio = (&wn / &un * self.trust).where_self(&ok, &wn.ones_like());
                        u = &u * ratio;
                    }
                }
                let m = match self.buffers.get_mut(&name) {
                    Some(m) => {
                        *m *= self.momentum;
                        *m += &u;
                        m.shallow_clone()
                    }
                    None => {
                        let m = u.copy();
                        self.buffers.insert(name.clone(), m.shallow_clone());
                        m
                    }
                };
                if self.nesterov {
                    w -= (u + m * self.momentum) * lr;
                } else {
                    w -= m * lr;
                }
            }
        });
    }

    /// The buffers themselves (momentum, then AdamW's second moments), each set in name
    /// order: what a rank receives from rank 0 before the first step.
    pub fn buffers_in_order(&self) -> Vec<Tensor> {
        let mut out = Vec::new();
        for map in [&self.buffers, &self.second] {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.extend(keys.into_iter().map(|k| map[k].shallow_clone()));
        }
        out
    }

    /// Momentum buffers as named tensors (for checkpoints).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self
            .buffers
            .iter()
            .map(|(k, t)| (format!("momentum.{k}"), t.contiguous()))
            .collect();
        v.extend(
            self.second
                .iter()
                .map(|(k, t)| (format!("second.{k}"), t.contiguous())),
        );
        if self.t > 0 {
            v.push(("adam_step".into(), Tensor::from_slice(&[self.t as i64])));
        }
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub fn load_state(&mut self, named: Vec<(String, Tensor)>, device: Device) {
        self.buffers.clear();
        self.second.clear();
        for (k, t) in named {
            if let Some(name) = k.strip_prefix("momentum.") {
                self.buffers.insert(name.to_string(), t.to_device(device));
            } else if let Some(name) = k.strip_prefix("second.") {
                self.second.insert(name.to_string(), t.to_device(device));
            } else if k == "adam_step" {
                self.t = t.int64_value(&[0]) as u64;
            }
        }
    }
}

/// The trainable variables of `vs`, sorted by name.
pub fn trainable_by_name(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// Zeroes every gradient of `vs`.
pub fn zero_grad(vs: &nn::VarStore) {
    for mut t in vs.trainable_variables() {
        let mut g = t.grad();
        if g.defined() {
            let _ = g.detach_().zero_();
        }
        let _ = &mut t;
    }
}

/// Schedule values and precision of one training step.
#[derive(Debug, Clone, Copy)]
pub struct StepSettings {
    pub lr: f64,
    pub tau: f64,
    /// Autocast dtype for the forward passes (`None`: float32). The loss is computed in
    /// float32 either way, and the backward pass runs outside the autocast region.
    pub amp: Option<Kind>,
}

/// One BYOL training step on two views (already on the device, in the network's
/// layout). Returns the loss (scalar), the online projection and the embedding of view 1
/// (both float32).
pub fn train_step(
    online: &Network,
    target: &Network,
    opt: &mut Optimizer,
    v1: &Tensor,
    v2: &Tensor,
    s: StepSettings,
) -> (Tensor, Tensor, Tensor) {
    train_step_synced(online, target, opt, v1, v2, s, None)
        .expect("a single-process step has no collective to fail")
}

/// The trainable variables of `vs` with their gradients, sorted by name (the fixed order
/// in which every rank averages them).
pub fn named_gradients(vs: &nn::VarStore) -> Vec<Tensor> {
    trainable_by_name(vs)
        .into_iter()
        .map(|(_, t)| t.grad())
        .filter(|g| g.defined())
        .collect()
}

/// [`train_step`] as one rank of `group`: the per-rank loss is over this rank's share of
/// the global batch, and the gradients are averaged over ranks (in name order) between
/// the backward pass and the optimizer step, so that every rank takes the step of the
/// global batch's mean loss. Without a group it is [`train_step`].
///
/// # Errors
/// A collective failed (inside SyncBatchNorm's backward or the gradient average).
pub fn train_step_synced(
    online: &Network,
    target: &Network,
    opt: &mut Optimizer,
    v1: &Tensor,
    v2: &Tensor,
    s: StepSettings,
    group: Option<&byol_dist::ProcessGroup>,
) -> Result<(Tensor, Tensor, Tensor), crate::error::Error> {
    let device = v1.device();
    let (loss, z1, y1) = crate::amp::autocast(device, s.amp, || {
        let (y1, z1, p1) = online.forward(v1, true);
        let (_, _, p2) = online.forward(v2, true);
        let (zt1, zt2) = tch::no_grad(|| (target.forward(v1, true).1, target.forward(v2, true).1));
        let (Some(p1), Some(p2)) = (p1, p2) else {
            unreachable!("online network built without predictor")
        };
        let f = |t: Tensor| t.to_kind(Kind::Float);
        let loss = byol_loss(&f(p1), &f(p2), &f(zt1), &f(zt2));
        (loss, f(z1), f(y1.detach()))
    });
    backward_synced(&loss, &online.vs, group)?;
    opt.step(&online.vs, s.lr);
    ema_update(&target.vs, &online.vs, s.tau);
    Ok((loss, z1, y1))
}
