//! Resuming: the progress file an unfinished run keeps next to its shards, and the
//! decision, at start, to begin afresh or continue an interrupted run.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{io_at, ShardError};
use byol_format::shards::{Settings, ShardInfo, Skipped, Totals, MANIFEST};

/// Progress of an unfinished run, kept next to the shards until the manifest exists.
pub const PROGRESS: &str = ".byol-shard-progress.json";

/// The progress file's contents: what an interrupted run had completed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Progress {
    pub settings: Settings,
    pub fingerprint: String,
    pub shards: Vec<ShardInfo>,
    /// Position in the shuffled order where the next shard starts.
    pub next_pos: usize,
    pub skipped: Vec<Skipped>,
    pub totals: Totals,
}

/// Our own files in a dataset folder (shards, manifest, progress, temporaries).
fn dataset_files(out: &Path) -> Result<Vec<PathBuf>, ShardError> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(out).map_err(io_at(out))? {
        let p = e.map_err(io_at(out))?.path();
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let ours = name == MANIFEST
            || name == PROGRESS
            || (name.starts_with("shard-") && name.ends_with(".parquet"))
            || (name.starts_with('.') && name.ends_with(".tmp"));
        if ours {
            v.push(p);
        }
    }
    Ok(v)
}

/// Decides how to start: fresh (`None`; with `force`, after removing our files), or
/// resuming the interrupted run recorded in the progress file.
///
/// # Errors
/// [`ShardError::Refused`] when `out` holds a complete dataset, another run's progress
/// or stray shards (without `force`); I/O naming the path.
pub(super) fn prepare_out(
    out: &Path,
    settings: &Settings,
    fp: &str,
    force: bool,
) -> Result<Option<Progress>, ShardError> {
    std::fs::create_dir_all(out).map_err(io_at(out))?;
    let files = dataset_files(out)?;
    if force {
        for f in &files {
            std::fs::remove_file(f).map_err(io_at(f))?;
        }
        return Ok(None);
    }
    if out.join(MANIFEST).exists() {
        return Err(ShardError::Refused(format!(
            "{} already holds a complete dataset ({MANIFEST}); use --force to replace it",
            out.display()
        )));
    }
    let progress_path = out.join(PROGRESS);
    let progress = if progress_path.exists() {
        let text = std::fs::read_to_string(&progress_path).map_err(io_at(&progress_path))?;
        let p: Progress = serde_json::from_str(&text).map_err(|e| {
            ShardError::Refused(format!(
                "{}: unreadable progress file ({e}); use --force to start over",
                progress_path.display()
            ))
        })?;
        if p.settings != *settings || p.fingerprint != fp {
            return Err(ShardError::Refused(format!(
                "{} holds an interrupted run with different settings or source files; \
                 rerun with the same arguments to complete it, or use --force to start over",
                out.display()
            )));
        }
        for s in &p.shards {
            let path = out.join(&s.file);
            let len = std::fs::metadata(&path)
                .map(|m| m.len())
                .unwrap_or(u64::MAX);
            if len != s.bytes {
                return Err(ShardError::Refused(format!(
                    "{} of the interrupted run is missing or changed; use --force to start over",
                    path.display()
                )));
            }
        }
        Some(p)
    } else {
        let stray = files.iter().any(|f| {
            f.file_name()
                .map(|n| n.to_string_lossy().starts_with("shard-"))
                .unwrap_or(false)
        });
        if stray {
            return Err(ShardError::Refused(format!(
                "{} holds shard files but no manifest or progress record; use --force to start over",
                out.display()
            )));
        }
        None
    };
    // Temporaries of an interrupted shard are rewritten from scratch.
    for f in files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with('.') && name.ends_with(".tmp") {
            std::fs::remove_file(&f).map_err(io_at(&f))?;
        }
    }
    Ok(progress)
}
