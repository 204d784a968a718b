//! `byol eval`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use byol_format::cli::emit;

/// Linear probe and kNN on frozen features: BYOL vs random init vs raw pixels.
#[derive(clap::Args)]
pub struct EvalArgs {
    #[arg(long)]
    run: PathBuf,
    #[arg(long)]
    train: PathBuf,
    #[arg(long)]
    test: PathBuf,
    /// A checkpoint folder [default: the run's latest].
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

/// # Errors
/// See [`byol_trainer::eval::evaluate`].
pub fn run(a: EvalArgs) -> Result<ExitCode> {
    let report = a.run.join("eval.json");
    byol_format::fs::check_outputs(
        &[("--run", &report)],
        &[("--train", &a.train), ("--test", &a.test)],
    )?;
    let r = byol_trainer::eval::evaluate(
        &a.run,
        &a.train,
        &a.test,
        a.checkpoint.as_deref(),
        byol_pipeline::opencv_decoder(),
    )?;
    emit(a.json, &r, || r.table())?;
    Ok(ExitCode::SUCCESS)
}
