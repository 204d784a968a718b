//! The `imagefolder` layout: one subfolder per class (torchvision's ImageFolder); a
//! folder without subfolders holds unlabeled images.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use byol_format::shards::Skipped;

use super::walk::{check_dir, folder_id, walk, Walked};
use super::{
    class_index, io_err, key_of, Item, LayoutKind, Origin, ScanOptions, Source, SourceError, Src,
};

/// Scans the class folders of `src` (every image below a class folder is of that
/// class; files next to the class folders are ignored), or, without class folders,
/// every image below `src` as unlabeled.
///
/// # Errors
/// A missing or unreadable folder; a class that `--classes-from`'s dataset lacks.
pub fn scan(src: &Path, opts: &ScanOptions) -> Result<Source, SourceError> {
    check_dir(src)?;
    let mut top: Vec<PathBuf> = std::fs::read_dir(src)
        .map_err(io_err(src))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(io_err(src))?;
    top.sort();
    let class_dirs: Vec<&PathBuf> = top
        .iter()
        .filter(|p| {
            let hidden = p
                .file_name()
                .map(|n| n.to_string_lossy().starts_with('.'))
                .unwrap_or(true);
            !hidden && p.is_dir()
        })
        .collect();
    let mut w = Walked::default();
    let mut seen: HashSet<(u64, u64)> = folder_id(src).into_iter().collect();
    if class_dirs.is_empty() {
        // No class folders: every image is unlabeled.
        walk(src, src, &mut w, &mut seen)?;
        let items = items_of(std::mem::take(&mut w.files), -1).collect();
        let layout = LayoutKind::ImageFolder;
        return Ok(Source::new(
            layout,
            Vec::new(),
            items,
            w.notes,
            Origin::Files,
        ));
    }
    // Files next to the class folders belong to no class.
    w.notes.ignored += (top.len() - class_dirs.len()) as u64;
    let class_dirs = without_clashes(class_dirs, &mut w);
    // Every class folder is its own class: a link from one class folder to another is
    // not walked as part of the first.
    seen.extend(class_dirs.iter().filter_map(|d| folder_id(d)));
    let names: BTreeSet<String> = class_dirs.iter().map(|p| class_name(p)).collect();
    let (classes, index) = class_index(&names, opts)?;
    let mut items = Vec::new();
    for dir in class_dirs {
        walk(src, dir, &mut w, &mut seen)?;
        items.extend(items_of(
            std::mem::take(&mut w.files),
            index[&class_name(dir)],
        ));
    }
    items.sort_by(|a, b| a.key.cmp(&b.key));
    let layout = LayoutKind::ImageFolder;
    Ok(Source::new(layout, classes, items, w.notes, Origin::Files))
}

/// A class folder's name as a class name (escaped where not UTF-8).
fn class_name(p: &Path) -> String {
    key_of(Path::new(p.file_name().unwrap_or_default())).0
}

/// The walked files as items of class `label`.
fn items_of(files: Vec<(String, PathBuf, u64)>, label: i32) -> impl Iterator<Item = Item> {
    files.into_iter().map(move |(key, path, size)| Item {
        key,
        label,
        src: Src::File(path),
        size,
    })
}

/// A Latin-1 folder whose escaped name equals a real folder name (`caf%E9` beside
/// `caf<0xE9>`) would merge two classes: the escaped one is skipped instead.
fn without_clashes<'a>(mut class_dirs: Vec<&'a PathBuf>, w: &mut Walked) -> Vec<&'a PathBuf> {
    let real: BTreeSet<String> = class_dirs
        .iter()
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some())
        .map(|p| class_name(p))
        .collect();
    class_dirs.retain(|p| {
        let clash =
            p.file_name().and_then(|n| n.to_str()).is_none() && real.contains(&class_name(p));
        if clash {
            w.notes.skipped.push(Skipped {
                key: class_name(p),
                reason: "class folder name is not UTF-8 and its escaped name equals another folder's name".into(),
            });
        }
        !clash
    });
    class_dirs
}
