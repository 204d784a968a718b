//! An exported encoder in ONNX Runtime (`ort`, loaded dynamically), and the parity
//! check `byol export` runs before a file is renamed into place.

use std::path::Path;

use crate::bail;
use crate::error::{Context, Result};
use tch::{Kind, Tensor};

use super::graph::{export, ExportInfo};

/// An exported encoder loaded in ONNX Runtime.
pub struct OnnxEncoder {
    _env: ort::environment::Environment,
    session: ort::session::Session,
    /// Input side S (`pixels` is `[N, 3, S, S]`).
    pub size: i64,
    /// Output dimension.
    pub dim: i64,
    /// `byol.canvas` from the model's metadata (decode canvas used in training).
    pub canvas: Option<usize>,
    /// A classifier's class names (`byol.classes`), in the order of its `logits`
    /// output; `None` for an encoder.
    pub classes: Option<Vec<String>>,
}

impl OnnxEncoder {
    /// Loads `path` with the ONNX Runtime library found by [`crate::runtime::ort_library`].
    ///
    /// # Errors
    /// ONNX Runtime cannot be loaded, or the model is not an encoder with `pixels [N,3,S,S]` and `embedding [N,D]`.
    pub fn load(path: &Path, ort_lib: Option<&Path>, threads: usize) -> Result<OnnxEncoder> {
        let lib = crate::runtime::ort_library(ort_lib)?;
        let env = ort::init_from(&lib)
            .with_context(|| format!("loading ONNX Runtime from {}", lib.display()))?
            .with_name("byol")
            .build()?;
        let mut builder = ort::session::Session::builder(&env)?;
        if threads > 0 {
            builder = builder
                .with_intra_threads(threads)
                .context("ONNX Runtime session options")?;
        }
        let session = builder
            .commit_from_file(path)
            .with_context(|| format!("loading {}", path.display()))?;
        let shape = |outlets: &[ort::value::Outlet], name: &str| -> Result<Vec<i64>> {
            let o = outlets
                .iter()
                .find(|o| o.name() == name)
                .with_context(|| format!("{}: no {name:?} in the model", path.display()))?;
            Ok(o.dtype()
                .tensor_shape()
                .with_context(|| format!("{}: {name:?} is not a tensor", path.display()))?
                .to_vec())
        };
        let ins = shape(session.inputs(), "pixels")?;
        let outs = shape(session.outputs(), "embedding")?;
        if ins.len() != 4 || ins[1] != 3 || ins[2] <= 0 || ins[2] != ins[3] || outs.len() != 2 {
            bail!(
                "{}: expected pixels [N,3,S,S] and embedding [N,D], found {ins:?} and {outs:?}",
                path.display()
            );
        }
        let meta = |key: &str| session.metadata().ok().and_then(|m| m.custom(key));
        let canvas = meta("byol.canvas").and_then(|v| v.parse().ok());
        let classes = if session.outputs().iter().any(|o| o.name() == "logits") {
            let k = shape(session.outputs(), "logits")?;
            let names: Vec<String> = match meta("byol.classes") {
                Some(v) => serde_json::from_str(&v).with_context(|| {
                    format!("{}: byol.classes is not a JSON list", path.display())
                })?,
                None => (0..k.get(1).copied().unwrap_or(0))
                    .map(|i| i.to_string())
                    .collect(),
            };
            if k.len() != 2 || k[1] != names.len() as i64 {
                bail!(
                    "{}: logits {k:?} do not match the {} classes of its metadata",
                    path.display(),
                    names.len()
                );
            }
            Some(names)
        } else {
            None
        };
        Ok(OnnxEncoder {
            _env: env,
            size: ins[2],
            dim: outs[1],
            canvas,
            classes,
            session,
        })
    }

    /// Embeddings of `x` (`[N, 3, S, S]`, float in [0, 1]) as `[N, D]` float32 (CPU).
    ///
    /// # Shapes
    /// `x`: `[N, 3, S, S]` float in [0, 1] → `[N, D]` float32 (CPU).
    ///
    /// # Errors
    /// ONNX Runtime fails on the input.
    pub fn embed(&mut self, x: &Tensor) -> Result<Tensor> {
        Ok(self.run(x)?.0)
    }

    /// Embeddings and, for a classifier, logits of `x`.
    ///
    /// # Shapes
    /// `x`: `[N, 3, S, S]` float in [0, 1] → (`[N, D]`, `[N, K]`) float32 (CPU).
    ///
    /// # Errors
    /// ONNX Runtime fails on the input.
    pub fn run(&mut self, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let x = x
            .to_kind(Kind::Float)
            .contiguous()
            .to_device(tch::Device::Cpu);
        let shape = x.size();
        let data = Vec::<f32>::try_from(x.flatten(0, -1))?;
        let input = ort::value::Tensor::from_array((shape.clone(), data))?;
        let out = self.session.run(ort::inputs!["pixels" => input])?;
        let get = |name: &str| -> Result<Tensor> {
            let (s, v) = out[name].try_extract_tensor::<f32>()?;
            let dims: Vec<i64> = s.to_vec();
            Ok(Tensor::from_slice(v).view(dims.as_slice()))
        };
        let logits = match self.classes {
            Some(_) => Some(get("logits")?),
            None => None,
        };
        Ok((get("embedding")?, logits))
    }
}

/// What `byol export` did: the file and the ONNX Runtime check against libtorch.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportReport {
    pub command: String,
    pub run: String,
    pub checkpoint: String,
    pub step: u64,
    #[serde(flatten)]
    pub file: ExportInfo,
    /// Images compared (`--check-data` images, or random ones).
    pub check_images: usize,
    pub check_source: String,
    /// max |ONNX Runtime − libtorch| over all embedding (and logit) values, and max |libtorch|.
    pub max_abs_diff: f64,
    pub max_abs_value: f64,
    /// Smallest cosine similarity between an ONNX Runtime embedding and libtorch's.
    pub min_cosine: f64,
    pub libtorch_ms_per_image: f64,
    pub ort_ms_per_image: f64,
    pub ort_library: String,
}

/// Tolerance of the export check: |ORT − libtorch| ≤ `EXPORT_TOL`·max(1, max |libtorch|).
pub const EXPORT_TOL: f64 = 1e-3;

/// Exports the online encoder `t` (loaded from `run`) to `out`, then loads the file in
/// ONNX Runtime and compares its embeddings with libtorch's on `check` inputs
/// (`[N,3,S,S]` uint8; random images when `None`). The file is renamed into place only
/// when the check passes.
///
/// # Errors
/// The export fails, ONNX Runtime cannot run it, or its embeddings differ from libtorch's by more than [`EXPORT_TOL`] (the file is then not written).
pub fn export_run(
    run: &Path,
    t: &crate::run::TrainedOnline,
    out: &Path,
    check: Option<(Tensor, String)>,
    ort_lib: Option<&Path>,
) -> Result<ExportReport> {
    let size = t.cfg.augment.size;
    let mut meta = vec![
        ("byol.run", run.display().to_string()),
        ("byol.checkpoint", t.checkpoint.display().to_string()),
        ("byol.step", t.step.to_string()),
    ];
    if let Some(c) = t.classes() {
        meta.push(("byol.classes", serde_json::to_string(c)?));
    }
    byol_format::fs::write_atomic_with(out, |tmp| -> Result<ExportReport> {
        let mut info = export(t.net.vs(), &t.cfg, tmp, &meta)?;
        let (x, source) = check.unwrap_or_else(|| {
            tch::manual_seed(0);
            (
                Tensor::randint(256, [64, 3, size, size], (Kind::Uint8, tch::Device::Cpu)),
                "random images".into(),
            )
        });
        let n = x.size()[0] as usize;
        let t0 = std::time::Instant::now();
        let mut reference = crate::eval::features(t.net.encoder(), &x, &t.cfg, t.device);
        if let Some(c) = t.net.classifier() {
            // The logits follow the embedding in the compared values.
            let l = crate::finetune::logits(c, &x, &t.cfg, t.device);
            reference = Tensor::cat(&[reference, l], 1);
        }
        let torch_s = t0.elapsed().as_secs_f64();
        let mut enc = OnnxEncoder::load(tmp, ort_lib, 0)?;
        let t1 = std::time::Instant::now();
        let mut chunks = Vec::new();
        for c in x.split(256, 0) {
            let (e, l) = enc.run(&(c.to_kind(Kind::Float) / 255.0))?;
            chunks.push(match l {
                Some(l) => Tensor::cat(&[e, l], 1),
                None => e,
            });
        }
        let ort_s = t1.elapsed().as_secs_f64();
        let got = Tensor::cat(&chunks, 0);
        let diff = (&got - &reference).abs().max().double_value(&[]);
        let scale = reference.abs().max().double_value(&[]);
        let cos = Tensor::cosine_similarity(&got, &reference, 1, 1e-8)
            .min()
            .double_value(&[]);
        if diff.is_nan() || diff > EXPORT_TOL * scale.max(1.0) {
            bail!(
                "ONNX Runtime disagrees with libtorch on {n} {source}: max |diff| {diff:.3e} \
             (max |value| {scale:.3e}, tolerance {EXPORT_TOL:.0e} relative); {} not written",
                out.display()
            );
        }
        info.path = out.display().to_string();
        Ok(ExportReport {
            command: "export".into(),
            run: run.display().to_string(),
            checkpoint: t.checkpoint.display().to_string(),
            step: t.step,
            file: info,
            check_images: n,
            check_source: source,
            max_abs_diff: diff,
            max_abs_value: scale,
            min_cosine: cos,
            libtorch_ms_per_image: 1e3 * torch_s / n as f64,
            ort_ms_per_image: 1e3 * ort_s / n as f64,
            ort_library: crate::runtime::ort_library(ort_lib)?.display().to_string(),
        })
    })
}
