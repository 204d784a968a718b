//! `byol`: the trainer's command line.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

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
    Info {
        /// libonnxruntime.so to load [default: $BYOL_ORT_DYLIB, $ORT_DYLIB_PATH, then the
        /// library scripts/setup installed].
        #[arg(long)]
        ort_lib: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

fn out(text: &str) -> Result<()> {
    let mut o = std::io::stdout().lock();
    match o.write_all(text.as_bytes()).and_then(|_| o.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Info { ort_lib, json } => {
            let info = byol_trainer::runtime::probe(ort_lib.as_deref());
            if json {
                out(&format!("{}\n", serde_json::to_string(&info)?))?;
            } else {
                out(&format!(
                    "libtorch   ok (check {}), {} thread(s), CUDA {}, {} device(s), cuDNN {}\n",
                    info.torch_check,
                    info.torch_threads,
                    if info.cuda_available { "yes" } else { "no" },
                    info.cuda_devices,
                    if info.cudnn_available { "yes" } else { "no" },
                ))?;
                match (&info.ort_library, &info.ort_error) {
                    (Some(p), _) => out(&format!("onnxruntime ok ({p})\n"))?,
                    (None, Some(e)) => out(&format!("onnxruntime MISSING: {e}\n"))?,
                    _ => {}
                }
            }
            Ok(if info.ort_error.is_none() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BYOL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("byol: error: {}", chain.join(": "));
            ExitCode::from(2)
        }
    }
}
