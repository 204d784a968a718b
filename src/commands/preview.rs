//! `byol preview`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use byol_format::cli::out;
use byol_pipeline::augment::AugmentConfig;

/// Write a grid of augmented pairs: each row the canvas, view 1 and view 2.
#[derive(clap::Args)]
pub struct PreviewArgs {
    #[arg(long)]
    data: PathBuf,
    #[arg(long, default_value = "views.png")]
    out: PathBuf,
    #[arg(long, default_value_t = 16)]
    n: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 256)]
    canvas: usize,
    /// Output side of the views.
    #[arg(long, default_value_t = 224)]
    size: i64,
}

/// # Errors
/// The dataset cannot be read or the grid cannot be written.
pub fn run(a: PreviewArgs) -> Result<ExitCode> {
    let cfg = byol_pipeline::augment::AugmentConfig {
        size: a.size,
        ..Default::default()
    };
    byol_format::fs::check_outputs(&[("--out", &a.out)], &[("--data", &a.data)])?;
    preview(&a.data, &a.out, a.n, a.seed, a.canvas, cfg)?;
    out(&format!(
        "wrote {} ({} rows: canvas, view 1, view 2)\n",
        a.out.display(),
        a.n
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// Writes a grid: one row per sample with the canvas, view 1 and view 2
/// ([`byol_trainer::preview::augmentation_grid`]).
///
/// # Errors
/// The dataset cannot be read or the PNG cannot be written.
fn preview(
    data: &Path,
    out: &Path,
    n: usize,
    seed: u64,
    canvas: usize,
    cfg: AugmentConfig,
) -> Result<()> {
    let grid = byol_trainer::preview::augmentation_grid(
        data,
        (n, seed, canvas),
        cfg,
        byol_pipeline::opencv_decoder(),
        tch::Device::cuda_if_available(),
    )?;
    // tch picks the image format from the extension: the temporary name keeps it.
    let ext = out.extension().and_then(|e| e.to_str()).unwrap_or("png");
    let tmp = byol_format::fs::temp_path(out).with_extension(format!("tmp.{ext}"));
    tch::vision::image::save(&grid, &tmp).with_context(|| format!("writing {}", tmp.display()))?;
    byol_format::fs::commit(&tmp, out)?;
    Ok(())
}
