//! `byol export --format torchvision`: the online encoder's weights as a safetensors
//! file under torchvision's `resnet18/34/50` `state_dict` names, for fine-tuning in
//! PyTorch.
//!
//! The names are the encoder's own without the `encoder.` prefix (they follow
//! torchvision's layout already), BatchNorm running statistics included, and a
//! `num_batches_tracked` (int64, the run's step) added for every BatchNorm, as
//! torchvision's modules carry one. A BYOL run has no `fc`: `load_state_dict(strict=False)`
//! into `torchvision.models.resnet50()` reports only `fc.weight` and `fc.bias` missing.
//! A fine-tuned run's head is `fc.weight`/`fc.bias`: the file loads with `strict=True`
//! into `torchvision.models.resnet50(num_classes=K)`.

use std::path::Path;

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::error::{Context, Result};
use crate::run::TrainedOnline;

/// What `byol export --format torchvision` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct TorchvisionExport {
    pub command: String,
    pub format: String,
    pub run: String,
    pub checkpoint: String,
    pub step: u64,
    pub file: String,
    pub bytes: u64,
    /// torchvision's constructor with the same layer names (`resnet18`, `resnet34`, `resnet50`).
    pub arch: String,
    /// Tensors written (weights, BatchNorm statistics, `num_batches_tracked`).
    pub tensors: usize,
    /// Whether torchvision's stock model of `arch` takes every tensor with its shape
    /// (width 1, the ImageNet stem).
    pub loads_into_stock_model: bool,
    /// A fine-tuned run's classes (`fc` has one output each, in this order).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub classes: Option<Vec<String>>,
    /// What differs from the stock model otherwise, one sentence per difference.
    pub differences: Vec<String>,
}

/// The encoder's tensors under torchvision's names (CPU, contiguous), sorted by name.
pub fn torchvision_state_dict(t: &TrainedOnline) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> = t
        .net
        .vs()
        .variables()
        .into_iter()
        .filter_map(|(k, v)| {
            let name = match k.strip_prefix("encoder.") {
                Some(name) => name.to_string(),
                None if k.starts_with("fc.") => k,
                None => return None,
            };
            Some((name, v.detach().to_device(Device::Cpu).contiguous()))
        })
        .collect();
    let bns: Vec<String> = named
        .iter()
        .filter_map(|(k, _)| k.strip_suffix(".running_var").map(str::to_string))
        .collect();
    for bn in bns {
        let n = Tensor::from(t.step as i64).to_kind(Kind::Int64);
        named.push((format!("{bn}.num_batches_tracked"), n));
    }
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// What keeps torchvision's stock model from taking these weights as they are.
pub(crate) fn differences(t: &TrainedOnline) -> Vec<String> {
    let e = &t.cfg.model.encoder;
    let mut d = Vec::new();
    if e.cifar_stem {
        d.push(
            "conv1.weight is a 3x3 stride-1 stem (CIFAR style) where torchvision has 7x7 stride 2; \
             replace the model's conv1 with nn.Conv2d(3, C, 3, 1, 1, bias=False) before loading"
                .to_string(),
        );
    }
    if !e.stem_pool() {
        d.push("no max-pool after the stem: set model.maxpool = nn.Identity()".to_string());
    }
    if (e.width - 1.0).abs() > 1e-9 {
        d.push(format!(
            "every layer is {}x torchvision's width: the stock model's shapes differ; build the \
             network with the widths of these tensors",
            e.width
        ));
    }
    d
}

/// Writes `t`'s encoder to `out` (safetensors, atomically) under torchvision's names.
///
/// # Errors
/// The file cannot be written.
pub fn export_torchvision(run: &Path, t: &TrainedOnline, out: &Path) -> Result<TorchvisionExport> {
    let named = torchvision_state_dict(t);
    byol_format::fs::write_atomic_with(out, |tmp| {
        Tensor::write_safetensors(&named, tmp).with_context(|| format!("writing {}", tmp.display()))
    })?;
    let bytes = std::fs::metadata(out)
        .with_context(|| format!("reading {}", out.display()))?
        .len();
    let differences = differences(t);
    Ok(TorchvisionExport {
        command: "export".into(),
        format: "torchvision".into(),
        run: run.display().to_string(),
        checkpoint: t.checkpoint.display().to_string(),
        step: t.step,
        file: out.display().to_string(),
        bytes,
        arch: format!("{:?}", t.cfg.model.encoder.arch).to_lowercase(),
        tensors: named.len(),
        loads_into_stock_model: differences.is_empty(),
        classes: t.classes().map(<[String]>::to_vec),
        differences,
    })
}
