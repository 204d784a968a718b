//! `byol preview`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use byol_format::cli::out;

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
    super::augment::preview(&a.data, &a.out, a.n, a.seed, a.canvas, cfg)?;
    out(&format!(
        "wrote {} ({} rows: canvas, view 1, view 2)\n",
        a.out.display(),
        a.n
    ))?;
    Ok(ExitCode::SUCCESS)
}
