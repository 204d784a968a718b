//! `byol-tools`: shard, inspect, verify and benchmark image datasets.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use byol_format::cli::{json_line, out};
use byol_tools::{bench, inspect, shard, source, verify};

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

#[derive(Clone, Copy, ValueEnum)]
enum LayoutArg {
    /// One subfolder per class (ImageNet train, torchvision ImageFolder).
    Imagefolder,
    /// A flat folder or a tar of images, plus --labels (CSV `key,class`, or ILSVRC
    /// ground truth + --synsets).
    Flat,
    /// IDX files (MNIST, Fashion-MNIST): --images and --labels.
    Idx,
    /// Tar archives, read in place (.tar.gz/.tgz through a temporary tar): class folders,
    /// a tar of class tars (ImageNet train), or images without folders (unlabeled).
    Tar,
    /// WebDataset shards (.tar files or folders of them): KEY.jpg/png/… + KEY.cls.
    Webdataset,
    /// Parquet files in the Hugging Face layout (an `image` column of bytes, a `label`
    /// column, ClassLabel names in the metadata): files or folders of `*.parquet`.
    Parquet,
}

// Parsed once per process; boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Convert a source into Parquet shards plus manifest.json.
    Shard {
        /// Source folder or archive (not used with --layout idx). Repeatable for tar
        /// archives and WebDataset shards; a quoted glob (`'shards/*.tar'`) expands.
        #[arg(long)]
        src: Vec<PathBuf>,
        /// Output dataset folder.
        #[arg(long)]
        out: PathBuf,
        /// [default: flat when --src is a tar with --labels, tar when every --src is a
        /// `.tar`/`.tar.gz`/`.tgz` file, parquet when every --src is a `.parquet` file or
        /// a folder holding only `.parquet` files, else imagefolder]
        #[arg(long, value_enum)]
        layout: Option<LayoutArg>,
        /// Label file (flat: CSV or ILSVRC ground truth; idx: IDX labels).
        #[arg(long)]
        labels: Option<PathBuf>,
        /// IDX image file (idx layout).
        #[arg(long)]
        images: Option<PathBuf>,
        /// Synset list for an ILSVRC ground-truth label file (line k: WNID of class id k).
        #[arg(long)]
        synsets: Option<PathBuf>,
        /// Take the class list (names and order) from this existing dataset.
        #[arg(long)]
        classes_from: Option<PathBuf>,
        /// Comma-separated class names for IDX, WebDataset and Parquet labels 0, 1, ...
        #[arg(long)]
        class_names: Option<String>,
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
        #[arg(long, value_parser = parse_bytes)]
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
    },
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

fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("not a size: {s:?} (examples: 4096, 64M, 1G)"))?;
    if n == 0 {
        return Err("size must be positive".into());
    }
    Ok(n * mult)
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Shard {
            src,
            out: out_dir,
            layout,
            labels,
            images,
            synsets,
            classes_from,
            class_names,
            max_side,
            quality,
            max_pixels,
            rows_per_shard,
            shard_bytes,
            row_group_rows,
            workers,
            seed,
            force,
            json,
        } => {
            if let Some(n) = max_pixels {
                byol_format::image::set_max_pixels(n);
            }
            let src = expand_globs(&src)?;
            if let Some(d) = src
                .iter()
                .find(|p| p.join(byol_format::shards::MANIFEST).is_file())
            {
                bail!(
                    "{} is a byol dataset (it has {}): it is already sharded; train on it with --data, or shard the images it came from",
                    d.display(),
                    byol_format::shards::MANIFEST
                );
            }
            let archives = !src.is_empty() && src.iter().all(|p| p.is_file() && is_tar_name(p));
            let layout = layout.unwrap_or(match (archives, &labels) {
                (true, Some(_)) => LayoutArg::Flat,
                (true, None) => LayoutArg::Tar,
                (false, _) if is_parquet_source(&src) => LayoutArg::Parquet,
                (false, _) => LayoutArg::Imagefolder,
            });
            if src.len() > 1
                && !matches!(
                    layout,
                    LayoutArg::Tar | LayoutArg::Webdataset | LayoutArg::Parquet
                )
            {
                bail!(
                    "{} --src given: several sources are for tar archives, WebDataset shards and Parquet files",
                    src.len()
                );
            }
            let src_arg = src
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" ");
            let first = src.first().cloned();
            if let Some(names) = &class_names {
                let v: Vec<&str> = names.split(',').map(str::trim).collect();
                if v.iter().any(|n| n.is_empty()) {
                    bail!("--class-names {names:?}: a class name is empty");
                }
                if let Some(d) = v.iter().enumerate().find(|(i, n)| v[..*i].contains(n)) {
                    bail!("--class-names {names:?}: {:?} is given twice", d.1);
                }
                if !matches!(
                    layout,
                    LayoutArg::Idx | LayoutArg::Webdataset | LayoutArg::Parquet
                ) {
                    bail!("--class-names names IDX, WebDataset and Parquet labels; other layouts take class names from folders or --labels");
                }
            }
            if labels.is_some() && !matches!(layout, LayoutArg::Flat | LayoutArg::Idx) {
                bail!(
                    "--labels is read by --layout flat (a folder or a tar of images) and idx only"
                );
            }
            let (layout, src_arg) = match layout {
                LayoutArg::Tar => {
                    if first.is_none() {
                        bail!("--layout tar needs --src ARCHIVE.tar")
                    };
                    (source::Layout::Tar, src_arg)
                }
                LayoutArg::Webdataset => {
                    if first.is_none() {
                        bail!("--layout webdataset needs --src SHARD.tar or a folder of shards")
                    };
                    (source::Layout::WebDataset, src_arg)
                }
                LayoutArg::Parquet => {
                    if first.is_none() {
                        bail!("--layout parquet needs --src FILE.parquet or a folder of them")
                    };
                    (source::Layout::Parquet, src_arg)
                }
                LayoutArg::Imagefolder => {
                    if first.is_none() {
                        bail!("--src is required")
                    };
                    (source::Layout::ImageFolder, src_arg)
                }
                LayoutArg::Flat => {
                    if first.is_none() {
                        bail!("--src is required")
                    };
                    let Some(l) = labels else {
                        bail!("--layout flat needs --labels FILE (CSV key,class or ILSVRC ground truth)")
                    };
                    (source::Layout::Flat { labels: l, synsets }, src_arg)
                }
                LayoutArg::Idx => {
                    let Some(i) = images else {
                        bail!("--layout idx needs --images FILE")
                    };
                    let arg = i.display().to_string();
                    (source::Layout::Idx { images: i, labels }, arg)
                }
            };
            // A gzip-compressed archive is decompressed next to the output.
            let temp_dir = std::path::absolute(&out_dir)
                .ok()
                .and_then(|p| p.parent().map(|p| p.to_path_buf()));
            let scan_opts = source::ScanOptions {
                classes_from,
                class_names: class_names
                    .map(|s| s.split(',').map(|c| c.trim().to_string()).collect()),
                temp_dir,
            };
            let source = source::scan_sources(&src, &layout, &scan_opts)?;
            let workers = workers.unwrap_or_else(cores).max(1);
            byol_format::image::set_opencv_threads(1);
            let opts = shard::ShardOptions {
                max_side,
                quality,
                shard_bytes: if rows_per_shard.is_none() {
                    Some(shard_bytes.unwrap_or(128 << 20))
                } else {
                    None
                },
                rows_per_shard,
                row_group_rows,
                workers,
                seed,
                force,
                // A bar on a terminal, plain lines otherwise.
                progress: true,
            };
            let summary = shard::shard(&source, &src_arg, &out_dir, &opts)?;
            if json {
                json_line(&summary)?;
            } else {
                out(&format!(
                    "stored {} images in {} shard(s) at {} ({} kept as-is, {} re-encoded); {} skipped, {} ignored; {:.1} s, {:.0} images/s{}\n",
                    summary.rows,
                    summary.shards,
                    summary.out,
                    summary.kept_original,
                    summary.reencoded,
                    summary.skipped,
                    summary.ignored,
                    summary.seconds,
                    summary.images_per_s,
                    if summary.resumed_shards > 0 {
                        format!("; resumed after {} shard(s) of an interrupted run", summary.resumed_shards)
                    } else {
                        String::new()
                    }
                ))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Inspect { dir, json } => {
            let r = inspect::inspect(&dir)?;
            if json {
                json_line(&r)?;
            } else {
                out(&r.render())?;
            }
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
            let r = verify::verify(&dir, workers.unwrap_or_else(cores), true)?;
            if json {
                json_line(&r)?;
            } else {
                for p in &r.problems {
                    out(&format!(
                        "{}{}: {}\n",
                        p.shard,
                        p.key
                            .as_ref()
                            .map(|k| format!(" key {k}"))
                            .unwrap_or_default(),
                        p.problem
                    ))?;
                }
                out(&format!(
                    "{}: {} shard(s), {} rows, {} images decoded, {} problem(s), {:.1} s\n",
                    if r.ok { "OK" } else { "FAILED" },
                    r.shards,
                    r.rows,
                    r.decoded,
                    r.problems.len(),
                    r.seconds
                ))?;
            }
            Ok(if r.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
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
                workers: workers.unwrap_or_else(cores).max(1),
                quality: 90,
                resize_to,
                dir: None,
            })?;
            if json {
                json_line(&r)?;
            } else {
                out(&format!(
                    "{} generated {}x{} JPEGs (mean {:.0} B), {} worker(s)\n",
                    r.images, r.height, r.width, r.mean_jpeg_bytes, r.workers
                ))?;
                for c in &r.cases {
                    out(&format!(
                        "  {:<12} shard {:>8.0} images/s   bare {:>8.0} images/s   ratio {:.2}\n",
                        c.case, c.shard_images_per_s, c.bare_images_per_s, c.ratio
                    ))?;
                }
                out(&format!(
                    "  from a tar (read in place) vs from the folder: {:.2}x\n",
                    r.tar_vs_folder
                ))?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A tar archive's name: `.tar`, or gzip-compressed `.tar.gz` / `.tgz` (refused with a
/// message by the tar source).
/// `--src` values with glob characters that name no file are expanded (the `glob`
/// crate, sorted); a pattern matching nothing is an error.
fn expand_globs(srcs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in srcs {
        let text = p.to_string_lossy();
        if p.exists() || !text.contains(['*', '?', '[']) {
            out.push(p.clone());
            continue;
        }
        let mut found: Vec<PathBuf> = glob::glob(&text)
            .with_context(|| format!("--src {text:?} is not a valid glob pattern"))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("expanding --src {text:?}"))?;
        found.sort();
        if found.is_empty() {
            bail!("--src {text:?} matches no file");
        }
        out.extend(found);
    }
    Ok(out)
}

/// Every source a `.parquet` file, or a folder with `.parquet` files and no image files
/// (other files, such as a Hugging Face snapshot's `README.md`, are left alone); a byol
/// dataset (it has `manifest.json`) is not one.
fn is_parquet_source(srcs: &[PathBuf]) -> bool {
    let parquet = |p: &std::path::Path| p.extension().is_some_and(|e| e == "parquet");
    !srcs.is_empty()
        && srcs.iter().all(|p| {
            if p.is_file() {
                return parquet(p);
            }
            let Ok(rd) = std::fs::read_dir(p) else {
                return false;
            };
            let names: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
            !p.join(byol_format::shards::MANIFEST).exists()
                && names.iter().any(|n| n.is_file() && parquet(n))
                && !names
                    .iter()
                    .any(|n| byol_tools::keys::has_image_extension(n))
        })
}

fn is_tar_name(p: &std::path::Path) -> bool {
    let n = p.to_string_lossy().to_ascii_lowercase();
    n.ends_with(".tar") || n.ends_with(".tar.gz") || n.ends_with(".tgz")
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
                byol_tools::tar_source::remove_temporaries();
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
