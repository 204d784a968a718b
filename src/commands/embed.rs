//! `byol embed` and `byol predict`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use byol_format::cli::emit;
use byol_trainer::export::Output;

/// Embed every image of a shard folder with an exported model (ONNX Runtime) into a
/// Parquet file: row, key, label, embedding; with --top-k (or as `byol predict`) a
/// classifier's most probable classes and their probabilities instead.
#[derive(clap::Args)]
pub struct EmbedArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    data: PathBuf,
    /// Output Parquet file [default: embeddings.parquet, or predictions.parquet].
    #[arg(long)]
    out: Option<PathBuf>,
    /// A classifier's K most probable classes per image (`byol predict`: 5).
    #[arg(long, value_name = "K")]
    top_k: Option<usize>,
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

/// `predict`: top-k classes (5 unless `--top-k`); else embeddings unless `--top-k`.
///
/// # Errors
/// See [`byol_trainer::export::embed`].
pub fn run(a: EmbedArgs, predict: bool) -> Result<ExitCode> {
    let top_k = a.top_k.or(predict.then_some(5));
    let output = top_k.map_or(Output::Embeddings, Output::TopK);
    let out = a.out.unwrap_or_else(|| {
        PathBuf::from(match output {
            Output::Embeddings => "embeddings.parquet",
            Output::TopK(_) => "predictions.parquet",
        })
    });
    byol_format::fs::check_outputs(
        &[("--out", &out)],
        &[("--model", &a.model), ("--data", &a.data)],
    )?;
    let r = byol_trainer::export::embed(
        (&a.model, &a.data, &out),
        byol_pipeline::opencv_decoder(),
        (a.batch, a.canvas),
        a.ort_lib.as_deref(),
        output,
    )?;
    emit(a.json, &r, || {
        let what = match r.top_k {
            Some(k) => format!("top-{k} classes"),
            None => format!("{}-d", r.dim),
        };
        format!(
            "wrote {} ({} rows, {what}) in {:.1} s ({:.0} images/s); {} rows without a result{}\n",
            r.out,
            r.rows,
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
