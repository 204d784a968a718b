//! The fine-tuned network: the encoder (torchvision's layout, `encoder.*`) and a new
//! linear head (`fc.*`, torchvision's name), in one `VarStore`.

use std::path::Path;
use std::sync::Arc;

use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use byol_dist::ProcessGroup;

use crate::byol::named_contiguous;
use crate::config::EncoderConfig;
use crate::error::{Context, Result};
use crate::model::ResNet;

/// File name of a fine-tuned checkpoint's network.
pub const CLASSIFIER: &str = "classifier.safetensors";

/// Encoder + linear head.
pub struct Classifier {
    pub vs: nn::VarStore,
    pub encoder: ResNet,
    pub fc: nn::Linear,
}

impl Classifier {
    /// A classifier of `classes` outputs on `enc`, seeded with `seed` (the head as
    /// PyTorch's `nn.Linear` initialises it).
    pub fn new(device: Device, enc: &EncoderConfig, classes: i64, seed: u64) -> Classifier {
        tch::manual_seed(seed as i64);
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let encoder = ResNet::new(&(&root / "encoder"), enc);
        let fc = nn::linear(&root / "fc", encoder.out_dim(), classes, Default::default());
        Classifier { vs, encoder, fc }
    }

    /// Copies the encoder's weights and BatchNorm statistics (`encoder.*` of `vs`: a
    /// BYOL run's online network) into this classifier.
    ///
    /// # Errors
    /// A tensor of `vs`'s encoder has no counterpart of the same shape here.
    pub fn init_encoder_from(&mut self, vs: &nn::VarStore) -> Result<()> {
        let mine = self.vs.variables();
        tch::no_grad(|| -> Result<()> {
            for (k, v) in vs.variables() {
                if !k.starts_with("encoder.") {
                    continue;
                }
                let mut dst = mine
                    .get(&k)
                    .with_context(|| format!("the classifier has no {k}"))?
                    .shallow_clone();
                dst.f_copy_(&v.to_device(dst.device()))
                    .with_context(|| format!("copying {k}"))?;
            }
            Ok(())
        })
    }

    /// Every BatchNorm of the encoder becomes SyncBatchNorm over `group`.
    pub fn sync_batch_norm(&mut self, group: &Arc<ProcessGroup>) {
        for n in self.encoder.norms_mut() {
            n.sync_with(Arc::clone(group));
        }
    }

    /// Stores every 4-D weight in channels-last layout (see `Network::to_channels_last`).
    pub fn to_channels_last(&mut self) {
        crate::byol::vs_to_channels_last(&self.vs);
    }

    /// Freezes the encoder (`--linear`): only `fc.*` keeps `requires_grad`.
    pub fn freeze_encoder(&mut self) {
        for (k, mut t) in self.vs.variables() {
            if k.starts_with("encoder.") {
                let _ = t.requires_grad_(false);
            }
        }
    }

    /// # Shapes
    /// `x`: `[N, 3, S, S]` normalised → logits `[N, K]`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.fc.forward(&self.encoder.forward_t(x, train))
    }

    /// The head's outputs K.
    pub fn classes(&self) -> i64 {
        self.fc.ws.size()[0]
    }

    /// Writes every variable (contiguous copies) to `path` (safetensors).
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn save(&self, path: &Path) -> Result<()> {
        Tensor::write_safetensors(&named_contiguous(&self.vs), path)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Loads what [`Classifier::save`] wrote.
    ///
    /// # Errors
    /// The file is missing or does not fit this classifier, naming it.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        self.vs
            .load(path)
            .with_context(|| format!("loading {}", path.display()))
    }
}

/// Top-1 and top-5 correct predictions of `logits` for `labels` (counts, as f64).
///
/// # Shapes
/// `logits`: `[N, K]`, `labels`: `[N]` int64 → (top-1, top-5) counts.
pub fn topk_correct(logits: &Tensor, labels: &Tensor) -> (f64, f64) {
    let k = logits.size()[1].min(5);
    let (_, idx) = logits.topk(k, 1, true, true);
    let hit = idx.eq_tensor(&labels.unsqueeze(1));
    let top1 = hit.narrow(1, 0, 1).sum(Kind::Float).double_value(&[]);
    let top5 = hit.any_dim(1, false).sum(Kind::Float).double_value(&[]);
    (top1, top5)
}
