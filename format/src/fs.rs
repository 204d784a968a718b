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
    use std::os::unix::ffi::OsStrExt;
    // `out/` names a folder: a file is not written there under the name `out`.
    let wants_folder = path.as_os_str().as_bytes().ends_with(b"/");
    let given = path;
    let resolved = resolve_output(path).map_err(E::from)?;
    let path = resolved.as_path();
    let tmp = temp_path(path);
    remove_any(&tmp);
    match write(&tmp) {
        Ok(_) if wants_folder && !tmp.is_dir() => {
            remove_any(&tmp);
            Err(FileError {
                op: "writing",
                path: given.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "the name ends with / (a folder); give a file name",
                ),
            }
            .into())
        }
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

/// Repairs an append-only file of lines (`RUN/metrics.jsonl`) before it is appended to:
/// a last line without its newline (a write cut short by a crash or a full disk) is cut
/// off, so the next line does not run into it. The file is created when absent. Returns
/// the number of bytes cut (0 when the file was whole; the caller says it once).
///
/// # Errors
/// [`FileError`] naming the file that cannot be opened, read or truncated.
pub fn cut_torn_last_line(path: &Path) -> Result<u64, FileError> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
        .map_err(FileError::at("opening", path))?;
    let len = f.metadata().map_err(FileError::at("reading", path))?.len();
    if len == 0 {
        return Ok(0);
    }
    // Look back in growing windows for the last newline.
    let mut window = 4096u64;
    let keep = loop {
        let from = len.saturating_sub(window);
        let mut tail = Vec::with_capacity((len - from) as usize);
        f.seek(SeekFrom::Start(from))
            .and_then(|_| Read::by_ref(&mut f).take(len - from).read_to_end(&mut tail))
            .map_err(FileError::at("reading", path))?;
        if tail.last() == Some(&b'\n') {
            break len;
        }
        if let Some(i) = tail.iter().rposition(|&b| b == b'\n') {
            break from + i as u64 + 1;
        }
        if from == 0 {
            break 0;
        }
        window *= 4;
    };
    if keep < len {
        f.set_len(keep)
            .and_then(|_| f.sync_all())
            .map_err(FileError::at("truncating", path))?;
    }
    Ok(len - keep)
}

/// An output path resolved for writing: absolute, through the existing folders' real
/// names (`.`/`..`/symbolic links resolved), with a file name — so that the temporary
/// name ([`temp_path`]) of any name a user may give (`out.onnx`, `./x/`, `../y`) is a
/// sibling of the output, and collisions with inputs are seen through links.
///
/// # Errors
/// [`FileError`] when the path names no file (`/`, `..`) or its folder does not exist.
pub fn resolve_output(path: &Path) -> Result<PathBuf, FileError> {
    let err = |why: &str| FileError {
        op: "writing",
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, why.to_string()),
    };
    if let Ok(p) = std::fs::canonicalize(path) {
        if p.parent().is_none() {
            return Err(err("names no file or folder to write"));
        }
        return Ok(p);
    }
    let name = match path.file_name() {
        Some(n) if path.components().next_back() != Some(std::path::Component::ParentDir) => n,
        _ => return Err(err("names no file or folder to write")),
    };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let dir = std::fs::canonicalize(dir.unwrap_or(Path::new("."))).map_err(|e| FileError {
        op: "writing",
        path: path.to_path_buf(),
        source: std::io::Error::new(
            e.kind(),
            format!("no folder {}", dir.unwrap_or(Path::new(".")).display()),
        ),
    })?;
    Ok(dir.join(name))
}

/// A path resolved for comparison: the real path of what exists, else the real path of
/// its nearest existing ancestor joined with the rest.
fn real(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut rest = Vec::new();
    let mut cur = abs.as_path();
    loop {
        if let Ok(r) = std::fs::canonicalize(cur) {
            return rest.iter().rev().fold(r, |p: PathBuf, n| p.join(n));
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                cur = parent;
            }
            _ => return abs,
        }
    }
}

/// An output that would overwrite, or be written inside, one of a command's inputs (or
/// hold one inside the folder it replaces).
#[derive(Debug, thiserror::Error)]
#[error("{out_flag} {} {why} {in_flag} {}: give {out_flag} another path", out.display(), input.display())]
pub struct Collision {
    pub out_flag: String,
    pub out: PathBuf,
    pub in_flag: String,
    pub input: PathBuf,
    pub why: &'static str,
}

/// Refuses outputs that collide with inputs, before any work: an output that is an
/// input (the same file or folder, also through a link), lies inside an input folder,
/// or is a folder that holds an input. Each pair is `(flag, path)` as the user gave it,
/// for the message; absent inputs are compared by name.
///
/// # Errors
/// [`Collision`] naming the first output and input that collide.
pub fn check_outputs(outputs: &[(&str, &Path)], inputs: &[(&str, &Path)]) -> Result<(), Collision> {
    for (of, o) in outputs {
        let ro = real(o);
        for (inf, i) in inputs {
            let ri = real(i);
            let why = if ro == ri {
                "is the same path as"
            } else if ro.starts_with(&ri) {
                "lies inside"
            } else if ri.starts_with(&ro) {
                "is a folder that holds"
            } else {
                continue;
            };
            return Err(Collision {
                out_flag: of.to_string(),
                out: o.to_path_buf(),
                in_flag: inf.to_string(),
                input: i.to_path_buf(),
                why,
            });
        }
    }
    Ok(())
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

    #[test]
    fn a_torn_last_line_is_cut_before_appending() {
        use std::io::Write;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("metrics.jsonl");
        std::fs::write(&p, "{\"step\":1}\n{\"step\":2}\n{\"st").unwrap();
        assert_eq!(cut_torn_last_line(&p).unwrap(), 4);
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        writeln!(f, "{{\"step\":3}}").unwrap();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "{\"step\":1}\n{\"step\":2}\n{\"step\":3}\n"
        );
        assert_eq!(cut_torn_last_line(&p).unwrap(), 0);
        // A file that is one long fragment (longer than the first window).
        std::fs::write(&p, "x".repeat(10_000)).unwrap();
        assert_eq!(cut_torn_last_line(&p).unwrap(), 10_000);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 0);
    }

    #[test]
    fn outputs_over_inputs_are_refused_naming_both() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("0.parquet"), b"x").unwrap();
        let model = d.path().join("m.onnx");
        std::fs::write(&model, b"x").unwrap();
        std::os::unix::fs::symlink(&model, d.path().join("link.onnx")).unwrap();
        let ins = [("--model", model.as_path()), ("--data", data.as_path())];
        let refused = |out: &Path| {
            check_outputs(&[("--out", out)], &ins)
                .unwrap_err()
                .to_string()
        };
        assert!(refused(&model).contains("is the same path as --model"));
        assert!(refused(&d.path().join("link.onnx")).contains("--model"));
        assert!(refused(&data.join("0.parquet")).contains("lies inside --data"));
        assert!(refused(&data.join("new/e.parquet")).contains("lies inside --data"));
        assert!(refused(d.path()).contains("holds"));
        let dotted = data.join("../m.onnx");
        assert!(refused(&dotted).contains("--model"), "{}", refused(&dotted));
        check_outputs(&[("--out", &d.path().join("e.parquet"))], &ins).unwrap();
    }

    #[test]
    fn every_output_name_resolves_to_a_sibling_temporary() {
        let d = tempfile::tempdir().unwrap();
        let cwd = std::env::current_dir().unwrap();
        let sub = d.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let real_dir = std::fs::canonicalize(d.path()).unwrap();
        assert_eq!(
            resolve_output(&sub.join("../e.bin")).unwrap(),
            real_dir.join("e.bin")
        );
        assert_eq!(
            resolve_output(&sub.join("x/")).unwrap(),
            real_dir.join("sub/x")
        );
        let e = write_atomic(Path::new(&format!("{}/f.onnx/", sub.display())), b"x").unwrap_err();
        assert!(
            std::error::Error::source(&e)
                .unwrap()
                .to_string()
                .contains("ends with /"),
            "{e}"
        );
        assert!(!sub.join("f.onnx").exists() && !temp_path(&sub.join("f.onnx")).exists());
        assert!(resolve_output(&sub.join("no/x"))
            .unwrap_err()
            .to_string()
            .contains("no/x"));
        assert_eq!(resolve_output(&sub).unwrap(), real_dir.join("sub"));
        assert!(resolve_output(Path::new("/")).is_err());
        assert!(resolve_output(&sub.join("..")).is_ok());
        assert!(resolve_output(Path::new("e.bin")).unwrap().starts_with(cwd));
    }
}
