//! The bodies of `byol`'s commands, one module each; `main.rs` only parses and
//! dispatches.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub mod bench;
#[cfg(feature = "opencv")]
pub mod embed;
#[cfg(feature = "opencv")]
pub mod eval;
pub mod export;
#[cfg(feature = "opencv")]
pub mod finetune;
pub mod info;
#[cfg(feature = "opencv")]
pub mod preview;
#[cfg(feature = "opencv")]
pub mod train;

/// Python with torch for reference measurements: `$BYOL_PYTHON`, the project's venv
/// (next to `target/`), then `python3`.
pub fn default_python() -> PathBuf {
    if let Some(p) = std::env::var_os("BYOL_PYTHON") {
        return PathBuf::from(p);
    }
    let p = project_path(".venv/bin/python");
    if p.exists() {
        p
    } else {
        PathBuf::from("python3")
    }
}

/// `rel` inside the checkout this binary was built in (`target/release/byol` → the
/// folder holding `target/` and `Cargo.toml`), else relative to the working directory.
pub fn project_path(rel: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent()?.parent()?.parent().map(PathBuf::from))
        .filter(|root| root.join("Cargo.toml").exists())
        .map_or_else(|| PathBuf::from(rel), |root| root.join(rel))
}

/// A duration such as `20m`, `1h30m` or `90s` (humantime's syntax), in seconds.
///
/// # Errors
/// Not a humantime duration, or zero.
#[cfg(feature = "opencv")]
pub fn parse_duration(s: &str) -> Result<f64, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?}: {e} (expected a duration such as 20m, 1h30m, 90s)"))?;
    if d.is_zero() {
        return Err(format!("{s:?}: the budget must be longer than zero"));
    }
    Ok(d.as_secs_f64())
}

/// A TOML config file with `--set` overrides applied.
///
/// # Errors
/// The file cannot be read or is not a valid config (naming the file).
pub fn read_config(path: &Path, sets: &[String]) -> Result<byol_trainer::config::TrainConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    byol_trainer::config::TrainConfig::from_toml(&text, sets)
        .with_context(|| format!("{}", path.display()))
}
