//! `byol embed`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use byol_format::cli::emit;

/// Embed every image of a shard folder with an exported encoder (ONNX Runtime) into
/// a Parquet file: row, key, label, embedding.
#[derive(clap::Args)]
pub struct EmbedArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    data: PathBuf,
    #[arg(long, default_value = "embeddings.parquet")]
    out: PathBuf,
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Decode canvas [default: the model's byol.canvas metadata].
    #[arg(long)]
    canvas: Option<usize>,
    #[arg(long)]
    ort_lib: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

/// # Errors
/// See [`byol_trainer::export::embed`].
pub fn run(a: EmbedArgs) -> Result<ExitCode> {
    let r = byol_trainer::export::embed(
        &a.model,
        &a.data,
        &a.out,
        byol_pipeline::opencv_decoder(),
        a.batch,
        a.canvas,
        a.ort_lib.as_deref(),
    )?;
    emit(a.json, &r, || {
        format!(
            "wrote {} ({} rows, {}-d) in {:.1} s ({:.0} images/s); {} rows without an embedding{}\n",
            r.out,
            r.rows,
            r.dim,
            r.seconds,
            r.images_per_s,
            r.missing,
            if r.missing_keys.is_empty() {
                String::new()
            } else {
                format!(": {}", r.missing_keys.join(", "))
            }
        )
    })?;
    Ok(ExitCode::SUCCESS)
}
