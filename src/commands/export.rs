//! `byol export`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use byol_format::cli::emit;

/// What `byol export` writes.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// ONNX: the encoder in inference form (BatchNorm folded, normalisation inside),
    /// checked in ONNX Runtime against libtorch.
    Onnx,
    /// safetensors under torchvision's resnet `state_dict` names, for PyTorch.
    Torchvision,
    /// A timm / Hugging Face model folder: model.safetensors, config.json, README.md.
    Hf,
}

/// Export a run's online encoder to ONNX (BatchNorm folded, normalisation inside) and
/// check it in ONNX Runtime against libtorch; or its weights for torchvision.
#[derive(clap::Args)]
pub struct ExportArgs {
    #[arg(long)]
    run: PathBuf,
    /// A checkpoint folder [default: the run's latest].
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "onnx")]
    format: Format,
    /// Output file [default: encoder.onnx, encoder.safetensors for torchvision, the
    /// folder encoder-hf for hf].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Compare on the first 256 images of these shards instead of random images.
    #[cfg(feature = "opencv")]
    #[arg(long)]
    check_data: Option<PathBuf>,
    /// libonnxruntime.so [default: $BYOL_ORT_DYLIB, $ORT_DYLIB_PATH, the venv's].
    #[arg(long)]
    ort_lib: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

/// # Errors
/// See [`byol_trainer::export::export_run`].
pub fn run(a: ExportArgs) -> Result<ExitCode> {
    let mut inputs = vec![("--run", a.run.as_path())];
    inputs.extend(a.checkpoint.as_deref().map(|c| ("--checkpoint", c)));
    #[cfg(feature = "opencv")]
    inputs.extend(a.check_data.as_deref().map(|d| ("--check-data", d)));
    if let Some(out) = &a.out {
        byol_format::fs::check_outputs(&[("--out", out)], &inputs)?;
    }
    let t = byol_trainer::run::load_online(&a.run, a.checkpoint.as_deref())?;
    if a.format == Format::Hf {
        let out = a.out.unwrap_or_else(|| PathBuf::from("encoder-hf"));
        let r = byol_trainer::export::export_hf(&a.run, &t, &out)?;
        emit(a.json, &r, || {
            format!(
                "wrote {} ({} tensors under timm's {} names, num_classes {}, {} features) from {}\n{}",
                r.dir,
                r.tensors,
                r.arch,
                r.num_classes,
                r.num_features,
                r.checkpoint,
                if r.timm_builds_it {
                    format!("timm.create_model(\"local-dir:{}\", pretrained=True) loads it\n", r.dir)
                } else {
                    format!("timm's {} differs: {}\n", r.arch, r.differences.join("; "))
                }
            )
        })?;
        return Ok(ExitCode::SUCCESS);
    }
    if a.format == Format::Torchvision {
        let out = a
            .out
            .unwrap_or_else(|| PathBuf::from("encoder.safetensors"));
        let r = byol_trainer::export::export_torchvision(&a.run, &t, &out)?;
        emit(a.json, &r, || {
            format!(
                "wrote {} ({} tensors under torchvision's {} names, {:.1} MB) from {}\n{}",
                r.file,
                r.tensors,
                r.arch,
                r.bytes as f64 / 1e6,
                r.checkpoint,
                if r.loads_into_stock_model {
                    format!("torchvision.models.{}() loads it with strict=False; only fc.* is missing\n", r.arch)
                } else {
                    format!(
                        "differs from torchvision.models.{}(): {}\n",
                        r.arch,
                        r.differences.join("; ")
                    )
                }
            )
        })?;
        return Ok(ExitCode::SUCCESS);
    }
    let out = a.out.unwrap_or_else(|| PathBuf::from("encoder.onnx"));
    #[cfg(feature = "opencv")]
    let check = match &a.check_data {
        Some(d) => {
            let (x, _) = byol_trainer::eval::load_inputs(
                d,
                t.cfg.data.canvas,
                t.cfg.augment.size,
                byol_pipeline::opencv_decoder(),
                Some(256),
            )?;
            Some((x, format!("images of {}", d.display())))
        }
        None => None,
    };
    #[cfg(not(feature = "opencv"))]
    let check = None;
    let r = byol_trainer::export::export_run(&a.run, &t, &out, check, a.ort_lib.as_deref())?;
    emit(a.json, &r, || {
        format!(
            "wrote {} ({} convolutions, {}-d embedding, {} px input, {:.1} MB) from {}\n\
             ONNX Runtime vs libtorch on {} {}: max |diff| {:.2e} (max |value| {:.2e}), min cosine {:.6}; \
             {:.3} vs {:.3} ms/image\n",
            r.file.path,
            r.file.convs,
            r.file.dim,
            r.file.size,
            r.file.bytes as f64 / 1e6,
            r.checkpoint,
            r.check_images,
            r.check_source,
            r.max_abs_diff,
            r.max_abs_value,
            r.min_cosine,
            r.ort_ms_per_image,
            r.libtorch_ms_per_image
        )
    })?;
    Ok(ExitCode::SUCCESS)
}
