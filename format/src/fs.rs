//! Atomic file writes: every file byol writes (shards, manifests, checkpoints, run
//! configs, ONNX models, embeddings, plots) goes to a temporary name in the same folder,
//! is fsynced, renamed to its final name, and its folder is fsynced — so a crash or a
//! full disk leaves either the old file or the new one, never half of one.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// An I/O error and the file it concerns.
#[derive(Debug, thiserror::Error)]
#[error("{op} {}", path.display())]
pub struct FileError {
    /// What was being done (`writing`, `renaming to`, …).
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl FileError {
    /// A closure for `map_err` that names `path`.
    pub fn at<'a>(
        op: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(std::io::Error) -> FileError + 'a {
        move |source| FileError {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The temporary name `path` is written under: `.NAME.tmp` in the same folder (a file or
/// a folder). Readers ignore such names; writers that resume may remove them.
pub fn temp_path(path: &Path) -> PathBuf {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.join(format!(".{name}.tmp"))
}

/// fsyncs `path`: a file, or a folder and every file below it.
fn sync_tree(path: &Path) -> Result<(), FileError> {
    let meta = std::fs::metadata(path).map_err(FileError::at("reading", path))?;
    if meta.is_dir() {
        for e in std::fs::read_dir(path).map_err(FileError::at("reading", path))? {
            let p = e.map_err(FileError::at("reading", path))?.path();
            sync_tree(&p)?;
        }
        sync_dir(path);
        Ok(())
    } else {
        File::open(path)
            .and_then(|f| f.sync_all())
            .map_err(FileError::at("syncing", path))
    }
}

/// fsyncs a folder so that a rename in it survives a crash. Best effort: not every
/// filesystem supports fsync on a folder.
pub fn sync_dir(dir: &Path) {
    if let Ok(f) = File::open(dir) {
        let _ignored = f.sync_all();
    }
}

/// Moves a complete temporary file or folder `tmp` to `path`: fsyncs it, renames, and
/// fsyncs the parent folder. A file replaces a file; a folder replaces a folder (the
/// old one is removed first). A file never replaces a folder: that is refused, so an
/// output path that names a folder (a run, a dataset) is never lost.
///
/// # Errors
/// [`FileError`] naming the file that could not be synced, removed or renamed, or the
/// folder a file would have replaced.
pub fn commit(tmp: &Path, path: &Path) -> Result<(), FileError> {
    sync_tree(tmp)?;
    if path.is_dir() {
        if !tmp.is_dir() {
            return Err(FileError {
                op: "writing",
                path: path.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::IsADirectory,
                    "a folder is there; give a file name",
                ),
            });
        }
        std::fs::remove_dir_all(path).map_err(FileError::at("removing", path))?;
    }
    std::fs::rename(tmp, path).map_err(FileError::at("renaming to", path))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")));
    Ok(())
}

/// Writes `path` atomically through `write`, which fills the temporary path it is given
/// ([`temp_path`]; a file or a folder, absent at the call). On success the result is
/// committed ([`commit`]); on error the temporary is removed and `path` is untouched.
///
/// # Errors
/// `write`'s error, or a [`FileError`] (converted into `E`) from committing.
pub fn write_atomic_with<T, E: From<FileError>>(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<T, E>,
) -> Result<T, E> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(d) = dir.filter(|d| !d.is_dir()) {
        return Err(FileError {
            op: "writing",
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no folder {}", d.display()),
            ),
        }
        .into());
    }
    let tmp = temp_path(path);
    remove_any(&tmp);
    match write(&tmp) {
        Ok(v) => match commit(&tmp, path) {
            Ok(()) => Ok(v),
            Err(e) => {
                remove_any(&tmp);
                Err(e.into())
            }
        },
        Err(e) => {
            remove_any(&tmp);
            Err(e)
        }
    }
}

/// Writes `bytes` to `path` atomically ([`write_atomic_with`]).
///
/// # Errors
/// [`FileError`] naming the temporary or final file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    write_atomic_with(path, |tmp| {
        File::create(tmp)
            .and_then(|mut f| f.write_all(bytes))
            .map_err(FileError::at("writing", tmp))
    })
}

fn remove_any(p: &Path) {
    if p.is_dir() {
        let _ignored = std::fs::remove_dir_all(p);
    } else {
        let _ignored = std::fs::remove_file(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.json");
        write_atomic(&p, b"old").unwrap();
        let r: Result<(), FileError> = write_atomic_with(&p, |tmp| {
            std::fs::write(tmp, b"half").unwrap();
            Err(FileError::at("writing", tmp)(std::io::Error::other(
                "disk full",
            )))
        });
        assert!(r.unwrap_err().to_string().contains(".a.json.tmp"));
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert!(!temp_path(&p).exists());
    }

    #[test]
    fn a_file_never_replaces_a_folder() {
        let d = tempfile::tempdir().unwrap();
        let run = d.path().join("run");
        std::fs::create_dir(&run).unwrap();
        std::fs::write(run.join("keep.txt"), b"x").unwrap();
        let e = write_atomic(&run, b"model").unwrap_err();
        assert!(e.to_string().contains("run"), "{e}");
        assert_eq!(std::fs::read(run.join("keep.txt")).unwrap(), b"x");
        assert!(!temp_path(&run).exists());
        let e = write_atomic(&d.path().join("nodir/x.bin"), b"x").unwrap_err();
        assert!(
            std::error::Error::source(&e)
                .unwrap()
                .to_string()
                .contains("no folder"),
            "{e}"
        );
    }

    #[test]
    fn a_folder_replaces_a_folder() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ckpt");
        for v in ["1", "2"] {
            write_atomic_with(&p, |tmp| {
                std::fs::create_dir(tmp).map_err(FileError::at("creating", tmp))?;
                std::fs::write(tmp.join("x"), v).map_err(FileError::at("writing", tmp))
            })
            .unwrap();
        }
        assert_eq!(std::fs::read_to_string(p.join("x")).unwrap(), "2");
        assert!(!temp_path(&p).exists());
    }
}
