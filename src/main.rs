//! `byol`: the trainer's command line.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

mod alloc;
mod commands;

#[derive(Parser)]
#[command(
    name = "byol",
    version,
    about = "Streaming BYOL trainer: Parquet shards in, ONNX encoders out"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check the native runtimes: libtorch (CPU/CUDA) and ONNX Runtime.
    Info(commands::info::InfoArgs),
    /// Benchmarks; each reports a ratio against a baseline measured in the same run.
    #[command(subcommand)]
    Bench(commands::bench::BenchCmd),
    /// Train (or resume) a BYOL run.
    #[cfg(feature = "opencv")]
    Train(commands::train::TrainArgs),
    /// Fine-tune a run's encoder with a new linear head on a labelled subset (the BYOL
    /// paper's semi-supervised and transfer evaluations), or a random encoder as the
    /// supervised baseline; reports top-1/top-5 on the test shards.
    #[cfg(feature = "opencv")]
    Finetune(commands::finetune::FinetuneArgs),
    /// Export a run's online encoder (or a fine-tuned classifier) to ONNX (BatchNorm
    /// folded, normalisation inside) and check it in ONNX Runtime against libtorch.
    Export(commands::export::ExportArgs),
    /// Embed every image of a shard folder with an exported encoder (ONNX Runtime) into
    /// a Parquet file: row, key, label, embedding.
    #[cfg(feature = "opencv")]
    Embed(commands::embed::EmbedArgs),
    /// A classifier's most probable classes per image of a shard folder, with their
    /// probabilities, into a Parquet file (`byol embed --top-k 5`).
    #[cfg(feature = "opencv")]
    Predict(commands::embed::EmbedArgs),
    /// Linear probe and kNN on frozen features: BYOL vs random init vs raw pixels.
    #[cfg(feature = "opencv")]
    Eval(commands::eval::EvalArgs),
    /// Write a grid of augmented pairs: each row the canvas, view 1 and view 2.
    #[cfg(feature = "opencv")]
    Preview(commands::preview::PreviewArgs),
}

fn run(cli: Cli) -> Result<ExitCode> {
    // byol parallelises over images itself; OpenCV's own threads would compete.
    #[cfg(feature = "opencv")]
    byol_format::image::set_opencv_threads(1);
    match cli.cmd {
        Cmd::Info(a) => commands::info::run(a),
        Cmd::Bench(c) => commands::bench::run(c),
        #[cfg(feature = "opencv")]
        Cmd::Train(a) => commands::train::run(a),
        #[cfg(feature = "opencv")]
        Cmd::Finetune(a) => commands::finetune::run(a),
        Cmd::Export(a) => commands::export::run(a),
        #[cfg(feature = "opencv")]
        Cmd::Embed(a) => commands::embed::run(a, false),
        #[cfg(feature = "opencv")]
        Cmd::Predict(a) => commands::embed::run(a, true),
        #[cfg(feature = "opencv")]
        Cmd::Eval(a) => commands::eval::run(a),
        #[cfg(feature = "opencv")]
        Cmd::Preview(a) => commands::preview::run(a),
    }
}

/// Large Rust blocks (row groups) in their own mappings; see `alloc`.
#[global_allocator]
static ALLOC: alloc::LargeMmap = alloc::LargeMmap;

fn main() -> ExitCode {
    // glibc's heap for libtorch and OpenCV: blocks up to 32 MiB (the most glibc allows)
    // stay on the heap and 256 MiB of free space may stay at its top, so a training
    // step's activations reuse memory instead of faulting in fresh pages every step
    // (the float32 Fashion-MNIST step: 610 images/s, against 450 with an 8 MiB threshold
    // and 555 with glibc's adaptive default). Row groups are Rust blocks and get their
    // own mappings: see `alloc`.
    // Safety: called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
    byol_format::cli::init_logging("BYOL_LOG");
    byol_format::cli::exit("byol", run(Cli::parse()))
}
