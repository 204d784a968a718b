//! Listing the image files below a folder (the `walkdir` crate): shared by the
//! image-folder and flat layouts.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use byol_format::shards::Skipped;

use super::{key_of, ScanNotes, SourceError};
use crate::keys::has_image_extension;

/// What a walk found: (key, path, size) of image files, and what it left out.
#[derive(Default)]
pub(super) struct Walked {
    pub files: Vec<(String, PathBuf, u64)>,
    pub notes: ScanNotes,
}

/// The (device, inode) of the folder at `p`, if it can be read.
pub(super) fn folder_id(p: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
}

/// Files below `dir` (recursive, symlinks followed, sorted by name), keyed relative to
/// `root`. Hidden entries and files without an image extension are counted as ignored.
/// A folder reached again through a link (a link to an ancestor, which would loop, or a
/// second path to a folder already walked) is not walked again: it is listed as skipped
/// with the reason. `seen` holds the (device, inode) of every folder walked so far,
/// across calls.
///
/// # Errors
/// `dir` itself cannot be read.
pub(super) fn walk(
    root: &Path,
    dir: &Path,
    out: &mut Walked,
    seen: &mut HashSet<(u64, u64)>,
) -> Result<(), SourceError> {
    let mut it = walkdir::WalkDir::new(dir)
        .follow_links(true)
        .sort_by_file_name()
        .into_iter();
    while let Some(entry) = it.next() {
        let e = match entry {
            Ok(e) => e,
            Err(err) => {
                out.failed(root, dir, err)?;
                continue;
            }
        };
        let hidden = e.depth() > 0 && e.file_name().as_encoded_bytes().starts_with(b".");
        if e.file_type().is_dir() {
            if hidden {
                out.notes.ignored += 1;
                it.skip_current_dir();
                continue;
            }
            if let Ok(m) = e.metadata() {
                // The folder a walk starts at (the root or a class folder) is recorded
                // before the walk.
                let again = !seen.insert((m.dev(), m.ino()));
                if again && e.depth() > 0 {
                    out.notes.skipped.push(Skipped {
                        key: rel(root, e.path()).0,
                        reason: "link to a folder that was already walked: not walked again".into(),
                    });
                    it.skip_current_dir();
                }
            }
            continue;
        }
        if hidden || !has_image_extension(e.path()) {
            out.notes.ignored += 1;
            continue;
        }
        let size = e.metadata().map(|m| m.len()).unwrap_or(0);
        out.file(root, e.path(), size);
    }
    Ok(())
}

/// The key of `p` relative to `root`.
fn rel(root: &Path, p: &Path) -> (String, bool) {
    key_of(p.strip_prefix(root).unwrap_or(p))
}

impl Walked {
    /// Records the image file `path` (keyed relative to `root`).
    fn file(&mut self, root: &Path, path: &Path, size: u64) {
        let (key, esc) = rel(root, path);
        if esc {
            self.notes.escaped.push(key.clone());
        }
        self.files.push((key, path.to_path_buf(), size));
    }

    /// An entry the walk could not visit: a link loop or an unreadable folder is listed
    /// as skipped; a broken link or unreadable file is kept when it has an image
    /// extension (reading it fails later and it is listed as skipped).
    ///
    /// # Errors
    /// The walk's own folder `dir` cannot be read.
    fn failed(&mut self, root: &Path, dir: &Path, err: walkdir::Error) -> Result<(), SourceError> {
        let path = err.path().unwrap_or(dir).to_path_buf();
        if let Some(ancestor) = err.loop_ancestor() {
            self.notes.skipped.push(Skipped {
                key: rel(root, &path).0,
                reason: format!(
                    "link to a folder already being walked ({}): not walked again",
                    ancestor.display()
                ),
            });
            return Ok(());
        }
        if path == dir {
            let source = err
                .into_io_error()
                .unwrap_or_else(|| std::io::Error::other("walk failed"));
            return Err(SourceError::Io { path, source });
        }
        if path.is_dir() {
            // A folder that cannot be listed (permissions): its images are not seen, so
            // it is listed with the reason instead of vanishing.
            self.notes.skipped.push(Skipped {
                key: rel(root, &path).0,
                reason: format!("folder cannot be read: {err}"),
            });
        } else if has_image_extension(&path) {
            self.file(root, &path, 0);
        } else {
            self.notes.ignored += 1;
        }
        Ok(())
    }
}

/// Checks that `src` is an existing folder.
///
/// # Errors
/// [`SourceError::Missing`] or [`SourceError::NotADir`].
pub(super) fn check_dir(src: &Path) -> Result<(), SourceError> {
    match std::fs::metadata(src) {
        Err(_) => Err(SourceError::Missing(src.to_path_buf())),
        Ok(m) if !m.is_dir() => Err(SourceError::NotADir(src.to_path_buf())),
        Ok(_) => Ok(()),
    }
}
