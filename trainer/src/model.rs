//! ResNet encoders in torchvision's layout and parameter names, and BYOL's MLP heads.
//!
//! Every layer is built from its own sub-path (`encoder.layer1.0.conv1`), so the keys
//! of a checkpoint match a torchvision `state_dict` (minus `num_batches_tracked` and
//! `fc`), and a torchvision ResNet saved as safetensors loads.

use std::sync::Arc;

pub use crate::config::{Arch, EncoderConfig, HeadConfig};
use byol_dist::ProcessGroup;
use tch::nn::{self, Module, ModuleT};
use tch::Tensor;

/// A BatchNorm layer (torch's `momentum` 0.1, `eps` 1e-5): local statistics, or
/// SyncBatchNorm over every rank of a process group in training mode once
/// [`Norm::sync_with`] is set. Its keys (`weight`, `bias`, `running_mean`, `running_var`)
/// are the same either way, and evaluation always uses the running statistics.
#[derive(Debug)]
pub struct Norm {
    pub bn: nn::BatchNorm,
    group: Option<Arc<ProcessGroup>>,
}

impl Norm {
    /// BatchNorm statistics over every rank of `group` from now on (training mode).
    pub fn sync_with(&mut self, group: Arc<ProcessGroup>) {
        self.group = Some(group);
    }

    /// # Shapes
    /// `[N, C, *]` → `[N, C, *]`.
    ///
    /// # Panics
    /// A failed SyncBatchNorm collective (a peer vanished or hung past the group's
    /// timeout): the worker aborts, naming the rank, so that its launcher ends the job.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        match (&self.group, train) {
            (Some(g), true) => g
                .sync_batch_norm(
                    x,
                    self.bn.ws.as_ref(),
                    self.bn.bs.as_ref(),
                    Some((&self.bn.running_mean, &self.bn.running_var)),
                    0.1,
                    1e-5,
                )
                .unwrap_or_else(|e| panic!("{e}")),
            _ => x.apply_t(&self.bn, train),
        }
    }
}

fn conv(p: nn::Path, cin: i64, cout: i64, k: i64, stride: i64, padding: i64) -> nn::Conv2D {
    let cfg = nn::ConvConfig {
        stride,
        padding,
        bias: false,
        // torchvision: kaiming normal, fan_out, relu
        ws_init: nn::Init::Kaiming {
            dist: nn::init::NormalOrUniform::Normal,
            fan: nn::init::FanInOut::FanOut,
            non_linearity: nn::init::NonLinearity::ReLU,
        },
        ..Default::default()
    };
    nn::conv2d(p, cin, cout, k, cfg)
}

fn bn(p: nn::Path, c: i64) -> Norm {
    Norm {
        bn: nn::batch_norm2d(
            p,
            c,
            nn::BatchNormConfig {
                ws_init: nn::Init::Const(1.0),
                ..Default::default()
            },
        ),
        group: None,
    }
}

#[derive(Debug)]
struct Block {
    convs: Vec<nn::Conv2D>,
    bns: Vec<Norm>,
    down: Option<(nn::Conv2D, Norm)>,
}

impl Block {
    fn basic(p: &nn::Path, cin: i64, cout: i64, stride: i64) -> Block {
        let down = (stride != 1 || cin != cout).then(|| {
            (
                conv(p / "downsample" / "0", cin, cout, 1, stride, 0),
                bn(p / "downsample" / "1", cout),
            )
        });
        Block {
            convs: vec![
                conv(p / "conv1", cin, cout, 3, stride, 1),
                conv(p / "conv2", cout, cout, 3, 1, 1),
            ],
            bns: vec![bn(p / "bn1", cout), bn(p / "bn2", cout)],
            down,
        }
    }

    fn bottleneck(p: &nn::Path, cin: i64, width: i64, stride: i64) -> Block {
        let cout = width * 4;
        let down = (stride != 1 || cin != cout).then(|| {
            (
                conv(p / "downsample" / "0", cin, cout, 1, stride, 0),
                bn(p / "downsample" / "1", cout),
            )
        });
        Block {
            convs: vec![
                conv(p / "conv1", cin, width, 1, 1, 0),
                conv(p / "conv2", width, width, 3, stride, 1),
                conv(p / "conv3", width, cout, 1, 1, 0),
            ],
            bns: vec![
                bn(p / "bn1", width),
                bn(p / "bn2", width),
                bn(p / "bn3", cout),
            ],
            down,
        }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let mut y = x.shallow_clone();
        let n = self.convs.len();
        for (i, (c, b)) in self.convs.iter().zip(&self.bns).enumerate() {
            y = b.forward_t(&y.apply(c), train);
            if i + 1 < n {
                y = y.relu();
            }
        }
        let id = match &self.down {
            Some((c, b)) => b.forward_t(&x.apply(c), train),
            None => x.shallow_clone(),
        };
        (y + id).relu()
    }
}

/// A ResNet without its classifier: images `[N, 3, H, W]` → features `[N, D]`.
#[derive(Debug)]
pub struct ResNet {
    conv1: nn::Conv2D,
    bn1: Norm,
    stem_pool: bool,
    blocks: Vec<Block>,
    out_dim: i64,
}

impl ResNet {
    /// Builds the encoder under `p` (its keys are `p/conv1.weight`, `p/layer1.0.conv1.weight`, …).
    pub fn new(p: &nn::Path, cfg: &EncoderConfig) -> ResNet {
        let (layers, bottleneck) = cfg.stages();
        let stem = cfg.channels(64);
        let (k, stride, pad) = cfg.stem_conv();
        let conv1 = conv(p / "conv1", 3, stem, k, stride, pad);
        let bn1 = bn(p / "bn1", stem);
        let mut blocks = Vec::new();
        let mut cin = stem;
        for (li, (&n, base)) in layers.iter().zip([64, 128, 256, 512]).enumerate() {
            let lp = p / format!("layer{}", li + 1);
            let width = cfg.channels(base);
            for bi in 0..n {
                let stride = EncoderConfig::block_stride(li, bi);
                let bp = &lp / bi.to_string();
                let b = if bottleneck {
                    Block::bottleneck(&bp, cin, width, stride)
                } else {
                    Block::basic(&bp, cin, width, stride)
                };
                cin = if bottleneck { width * 4 } else { width };
                blocks.push(b);
            }
        }
        ResNet {
            conv1,
            bn1,
            stem_pool: cfg.stem_pool(),
            blocks,
            out_dim: cin,
        }
    }

    /// Every BatchNorm layer, in construction order.
    pub fn norms_mut(&mut self) -> Vec<&mut Norm> {
        let mut v = vec![&mut self.bn1];
        for b in &mut self.blocks {
            v.extend(b.bns.iter_mut());
            if let Some((_, n)) = &mut b.down {
                v.push(n);
            }
        }
        v
    }

    /// Feature dimension (2048 for ResNet-50, 512 for ResNet-18/34, times the width).
    pub fn out_dim(&self) -> i64 {
        self.out_dim
    }

    /// # Shapes
    /// `x`: `[N, 3, H, W]` → `[N, out_dim]` (global average pool).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let mut y = self.bn1.forward_t(&x.apply(&self.conv1), train).relu();
        if self.stem_pool {
            y = y.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        }
        for b in &self.blocks {
            y = b.forward_t(&y, train);
        }
        y.adaptive_avg_pool2d([1, 1]).flatten(1, -1)
    }
}

/// BYOL's projector/predictor: Linear(bias) → BatchNorm → ReLU → Linear(no bias).
/// Keys: `0.weight`, `0.bias`, `1.*` (BN), `3.weight`, as an `nn.Sequential`.
#[derive(Debug)]
pub struct Mlp {
    l1: nn::Linear,
    pub bn: Norm,
    l2: nn::Linear,
}

impl Mlp {
    pub fn new(p: &nn::Path, cin: i64, cfg: &HeadConfig) -> Mlp {
        Mlp {
            l1: nn::linear(p / "0", cin, cfg.hidden, Default::default()),
            bn: Norm {
                bn: nn::batch_norm1d(
                    p / "1",
                    cfg.hidden,
                    nn::BatchNormConfig {
                        ws_init: nn::Init::Const(1.0),
                        ..Default::default()
                    },
                ),
                group: None,
            },
            l2: nn::linear(
                p / "3",
                cfg.hidden,
                cfg.out,
                nn::LinearConfig {
                    bias: false,
                    ..Default::default()
                },
            ),
        }
    }

    /// # Shapes
    /// `[N, cin]` → `[N, out]`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.bn
            .forward_t(&self.l1.forward(x), train)
            .relu()
            .apply(&self.l2)
    }
}

impl ModuleT for ResNet {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        ResNet::forward_t(self, xs, train)
    }
}
