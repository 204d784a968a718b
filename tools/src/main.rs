//! `byol-tools`: shard, inspect, verify and benchmark image datasets. The commands'
//! work is in the library; this file parses the arguments and prints the results.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use byol_format::cli::{emit, out};
use byol_tools::source::{Layout, SourceArgs};
use byol_tools::{bench, inspect, shard, verify};

#[derive(Parser)]
#[command(
    name = "byol-tools",
    version,
    about = "Turn image datasets into byol's Parquet shards, and check them"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Convert a source into Parquet shards plus manifest.json.
    Shard(Box<ShardArgs>),
    /// Classes, counts, shards, sizes and bytes of a dataset.
    Inspect {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Re-read every shard: checksums, schema, labels, keys, and that every image decodes.
    Verify {
        dir: PathBuf,
        #[arg(long)]
        workers: Option<usize>,
        /// Pixel limit as for `shard` [default: $BYOL_MAX_PIXELS, else 89478485].
        #[arg(long)]
        max_pixels: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Write generated photo-like JPEGs into class folders (test and benchmark data).
    Synth {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 1000)]
        images: usize,
        #[arg(long, default_value_t = 10)]
        classes: usize,
        #[arg(long, default_value_t = 375)]
        height: i32,
        #[arg(long, default_value_t = 500)]
        width: i32,
        #[arg(long, default_value_t = 90)]
        quality: u8,
    },
    /// Shard throughput on generated ImageNet-sized JPEGs vs the bare decode+encode cost.
    Bench {
        #[arg(long, default_value_t = 1000)]
        images: usize,
        #[arg(long, default_value_t = 375)]
        height: i32,
        #[arg(long, default_value_t = 500)]
        width: i32,
        #[arg(long)]
        workers: Option<usize>,
        /// --max-side of the re-encoding case.
        #[arg(long, default_value_t = 256)]
        resize_to: u32,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct ShardArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// Re-encode images whose longer side exceeds N, scaled to N (area interpolation).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    max_side: Option<u32>,
    /// JPEG quality of re-encoded images.
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u8).range(1..=100))]
    quality: u8,
    /// Skip images of more decoded pixels (decompression bombs) [default:
    /// $BYOL_MAX_PIXELS, else 89478485 as PIL's; 0: no limit].
    #[arg(long)]
    max_pixels: Option<u64>,
    /// Rows per shard (default: cut shards by --shard-bytes).
    #[arg(long, conflicts_with = "shard_bytes")]
    rows_per_shard: Option<u64>,
    /// Image bytes per shard, e.g. 128M or 1G [default: 128M].
    #[arg(long, value_parser = shard::parse_size)]
    shard_bytes: Option<u64>,
    /// Rows per Parquet row group.
    #[arg(long, default_value_t = 256)]
    row_group_rows: usize,
    /// Decode/encode threads [default: all cores].
    #[arg(long)]
    workers: Option<usize>,
    /// Seed of the row order (same inputs and seed: byte-identical shards).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Replace a complete or interrupted dataset in --out instead of refusing/resuming.
    #[arg(long)]
    force: bool,
    /// Print one JSON summary line on stdout.
    #[arg(long)]
    json: bool,
}

fn run_shard(a: ShardArgs) -> Result<ExitCode> {
    if let Some(n) = a.max_pixels {
        byol_format::image::set_max_pixels(n);
    }
    let resolved = Layout::resolve(&a.source)?;
    let source = resolved.scan()?;
    byol_format::image::set_opencv_threads(1);
    let opts = shard::ShardOptions {
        max_side: a.max_side,
        quality: a.quality,
        shard_bytes: match a.rows_per_shard {
            None => Some(a.shard_bytes.unwrap_or(128 << 20)),
            Some(_) => None,
        },
        rows_per_shard: a.rows_per_shard,
        row_group_rows: a.row_group_rows,
        workers: a.workers.unwrap_or_else(byol_format::cores).max(1),
        seed: a.seed,
        force: a.force,
        // A bar on a terminal, plain lines otherwise.
        progress: true,
    };
    let summary = shard::shard(&source, &resolved.source_arg, &a.source.out, &opts)?;
    emit(a.json, &summary, || summary.render())?;
    Ok(ExitCode::SUCCESS)
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Shard(a) => run_shard(*a),
        Cmd::Inspect { dir, json } => {
            let r = inspect::inspect(&dir)?;
            emit(json, &r, || r.render())?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Verify {
            dir,
            workers,
            max_pixels,
            json,
        } => {
            byol_format::image::set_opencv_threads(1);
            if let Some(n) = max_pixels {
                byol_format::image::set_max_pixels(n);
            }
            let r = verify::verify(&dir, workers.unwrap_or_else(byol_format::cores), true)?;
            emit(json, &r, || r.render())?;
            Ok(ExitCode::from(if r.ok { 0 } else { 1 }))
        }
        Cmd::Synth {
            out: dir,
            images,
            classes,
            height,
            width,
            quality,
        } => {
            let all =
                bench::write_synthetic_folder(&dir, images, (height, width), quality, classes)?;
            let bytes: usize = all.iter().map(|b| b.len()).sum();
            out(&format!(
                "wrote {} JPEGs ({height}x{width}, {bytes} bytes) in {classes} class folder(s) under {}\n",
                all.len(),
                dir.display()
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench {
            images,
            height,
            width,
            workers,
            resize_to,
            json,
        } => {
            byol_format::image::set_opencv_threads(1);
            let r = bench::run(&bench::BenchOptions {
                images,
                height,
                width,
                workers: workers.unwrap_or_else(byol_format::cores).max(1),
                quality: 90,
                resize_to,
                dir: None,
            })?;
            emit(json, &r, || r.render())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// SIGINT/SIGTERM/SIGHUP end byol-tools as they would by default (exit 128 + signal),
/// after removing the temporary tars of gzip-compressed sources; an interrupted `shard`
/// resumes from its last complete shard when rerun.
fn install_signal_cleanup() -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .context("installing signal handlers")?;
    std::thread::Builder::new()
        .name("byol-tools-signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                byol_tools::source::gzip::remove_temporaries();
                std::process::exit(128 + sig);
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}

fn main() -> ExitCode {
    byol_format::cli::init_logging("BYOL_LOG");
    if let Err(e) = install_signal_cleanup() {
        return byol_format::cli::exit("byol-tools", Err(e));
    }
    byol_format::cli::exit("byol-tools", run(Cli::parse()))
}
