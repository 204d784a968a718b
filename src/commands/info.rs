//! `byol info`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use byol_format::cli::{json_line, out};

/// Check the native runtimes: libtorch (CPU/CUDA) and ONNX Runtime.
#[derive(clap::Args)]
pub struct InfoArgs {
    /// libonnxruntime.so to load [default: $BYOL_ORT_DYLIB, $ORT_DYLIB_PATH, then the
    /// library scripts/setup installed].
    #[arg(long)]
    ort_lib: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

/// Exit code 1 when ONNX Runtime cannot be loaded.
///
/// # Errors
/// Writing the report to stdout fails.
pub fn run(a: InfoArgs) -> Result<ExitCode> {
    let info = byol_trainer::train::runtime::probe(a.ort_lib.as_deref());
    if a.json {
        json_line(&info)?;
    } else {
        out(&format!(
            "libtorch   ok (check {}), {} thread(s), CUDA {}, {} device(s), cuDNN {}\n",
            info.torch_check,
            info.torch_threads,
            if info.cuda_available { "yes" } else { "no" },
            info.cuda_devices,
            if info.cudnn_available { "yes" } else { "no" },
        ))?;
        out(&format!(
            "precision  auto -> {} ({}); CPU flags: {}\n",
            info.auto_precision, info.auto_precision_reason, info.cpu
        ))?;
        out(&format!(
            "c10d       {} (distributed training backends of this build)\n",
            info.c10d_backends.join(", ")
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
