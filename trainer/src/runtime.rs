//! The native runtimes byol loads: libtorch (linked, found through the binary's
//! RPATH) and ONNX Runtime (loaded at run time from `libonnxruntime.so`).

use std::path::{Path, PathBuf};

use serde::Serialize;

/// Environment variables naming the ONNX Runtime library, in the order they are read.
pub const ORT_ENV_VARS: &[&str] = &["BYOL_ORT_DYLIB", "ORT_DYLIB_PATH"];

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "ONNX Runtime library not found (tried: {tried}); run `make setup`, or pass \
         --ort-lib PATH, or set BYOL_ORT_DYLIB to libonnxruntime.so (pip's onnxruntime has it \
         in onnxruntime/capi/)"
    )]
    OrtMissing { tried: String },
    #[error("loading ONNX Runtime from {path}")]
    OrtLoad {
        path: PathBuf,
        #[source]
        source: ort::LoadDynamicError,
    },
}

/// Finds `libonnxruntime.so`: the explicit path, then [`ORT_ENV_VARS`], then the path
/// `scripts/setup` found when this binary was built.
///
/// # Errors
/// No library at `--ort-lib`, or none of the default places has one (the message lists them).
pub fn ort_library(explicit: Option<&Path>) -> Result<PathBuf, RuntimeError> {
    let mut candidates: Vec<(String, PathBuf)> = Vec::new();
    if let Some(p) = explicit {
        candidates.push(("--ort-lib".into(), p.to_path_buf()));
    }
    for v in ORT_ENV_VARS {
        if let Ok(s) = std::env::var(v) {
            if !s.is_empty() {
                candidates.push((format!("${v}"), PathBuf::from(s)));
            }
        }
    }
    let built = env!("BYOL_ORT_DYLIB_DEFAULT");
    if !built.is_empty() {
        candidates.push(("build default".into(), PathBuf::from(built)));
    }
    // An explicit choice that does not exist is an error, not a reason to fall back.
    if let Some((how, p)) = candidates.first() {
        if explicit.is_some() || how.starts_with('$') {
            if p.is_file() {
                return Ok(p.clone());
            }
            return Err(RuntimeError::OrtMissing {
                tried: format!("{how}={}", p.display()),
            });
        }
    }
    for (_, p) in &candidates {
        if p.is_file() {
            return Ok(p.clone());
        }
    }
    Err(RuntimeError::OrtMissing {
        tried: if candidates.is_empty() {
            "no path configured".into()
        } else {
            candidates
                .iter()
                .map(|(h, p)| format!("{h}={}", p.display()))
                .collect::<Vec<_>>()
                .join(", ")
        },
    })
}

/// Loads ONNX Runtime (once per process) and returns the library path used.
///
/// # Errors
/// The ONNX Runtime library cannot be found or loaded.
pub fn init_ort(explicit: Option<&Path>) -> Result<PathBuf, RuntimeError> {
    let path = ort_library(explicit)?;
    // A second call in the same process returns the already-loaded library.
    let _builder = ort::init_from(&path).map_err(|source| RuntimeError::OrtLoad {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// What `byol info` reports.
#[derive(Debug, Clone, Serialize)]
pub struct RuntimeInfo {
    pub torch_threads: i32,
    pub cuda_available: bool,
    pub cuda_devices: usize,
    pub cudnn_available: bool,
    /// Result of a small computation on the default device, as a libtorch smoke test.
    pub torch_check: f64,
    pub ort_library: Option<String>,
    pub ort_error: Option<String>,
    pub ort_build: Option<String>,
    /// The CPU flags that matter for precision (`avx2 avx512f avx512_bf16 …`).
    pub cpu: String,
    /// What `train.precision = "auto"` picks on the default device, and why.
    pub auto_precision: String,
    pub auto_precision_reason: String,
    /// The c10d backends this build has for distributed training (`gloo`, and `nccl`
    /// when built with `BYOL_NCCL=1`).
    pub c10d_backends: Vec<String>,
}

/// Probes libtorch and ONNX Runtime.
pub fn probe(ort_lib: Option<&Path>) -> RuntimeInfo {
    use tch::{Cuda, Kind, Tensor};
    let cuda = Cuda::is_available();
    let device = if cuda {
        tch::Device::Cuda(0)
    } else {
        tch::Device::Cpu
    };
    // sum of squares 0..9 = 285
    let t = Tensor::arange(10, (Kind::Float, device));
    let check = (&t * &t).sum(Kind::Float).double_value(&[]);
    let (ort_library, ort_error, ort_build) = match init_ort(ort_lib) {
        Ok(p) => (
            Some(p.display().to_string()),
            None,
            Some(ort::info().to_string()),
        ),
        Err(e) => (None, Some(byol_format::error_chain(&e)), None),
    };
    let hw = crate::amp::Hardware::detect(device);
    let choice = crate::amp::choose_precision("auto", &hw).expect("auto is a known precision");
    RuntimeInfo {
        cpu: hw.cpu_summary(),
        auto_precision: choice.name.into(),
        auto_precision_reason: choice.reason,
        torch_threads: tch::get_num_threads(),
        cuda_available: cuda,
        cuda_devices: Cuda::device_count() as usize,
        cudnn_available: Cuda::cudnn_is_available(),
        torch_check: check,
        ort_library,
        ort_error,
        ort_build,
        c10d_backends: if byol_dist::has_nccl() {
            vec!["gloo".into(), "nccl".into()]
        } else {
            vec!["gloo".into()]
        },
    }
}
