//! The native runtimes byol loads: libtorch (linked, found through the binary's
//! RPATH) and ONNX Runtime (loaded at run time from `libonnxruntime.so`).

use std::path::{Path, PathBuf};

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
    #[error("config asks for device \"cuda\" but CUDA is not available")]
    NoCuda,
    #[error("loading ONNX Runtime from {path}")]
    OrtLoad {
        path: PathBuf,
        #[source]
        source: ort::LoadDynamicError,
    },
}

/// The device `choice` names (`train.device`); `local_rank` picks the GPU of a
/// distributed rank.
///
/// # Errors
/// [`RuntimeError::NoCuda`]: `cuda` without CUDA.
pub fn resolve_device(
    choice: crate::config::DeviceChoice,
    local_rank: usize,
) -> Result<tch::Device, RuntimeError> {
    use crate::config::DeviceChoice;
    use tch::Device;
    Ok(match choice {
        DeviceChoice::Auto if tch::Cuda::is_available() => Device::Cuda(local_rank),
        DeviceChoice::Auto | DeviceChoice::Cpu => Device::Cpu,
        DeviceChoice::Cuda if tch::Cuda::is_available() => Device::Cuda(local_rank),
        DeviceChoice::Cuda => return Err(RuntimeError::NoCuda),
    })
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
