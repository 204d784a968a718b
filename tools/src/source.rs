//! Enumerating the images of a source: ImageNet-style class folders, a flat folder
//! with a label file, or IDX files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::format::{Manifest, Skipped};
use crate::idx::{read_idx_u8, IdxU8};

/// Extensions (lower case) of files that are looked at; everything else is ignored.
pub const IMAGE_EXTENSIONS: &[&str] = &[
    "jpg", "jpeg", "jpe", "jfif", "png", "bmp", "dib", "tif", "tiff", "webp", "pbm", "pgm", "ppm",
    "pnm", "pxm", "jp2", "sr", "ras", "exr", "hdr", "pic",
];

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("source {0} does not exist")]
    Missing(PathBuf),
    #[error("source {0} is not a folder")]
    NotADir(PathBuf),
    #[error("no images found in {0} (files with an image extension: {ext})", ext = IMAGE_EXTENSIONS.join(", "))]
    Empty(PathBuf),
    #[error("reading {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {msg}")]
    Labels {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Idx(#[from] crate::idx::IdxError),
    #[error(transparent)]
    Manifest(#[from] crate::format::FormatError),
}

/// How the source is organised.
#[derive(Debug, Clone)]
pub enum Layout {
    /// One subfolder per class (torchvision ImageFolder); without subfolders every
    /// image is unlabeled (-1).
    ImageFolder,
    /// A flat folder plus a label file: CSV `key,class`, or an ILSVRC2012 validation
    /// ground truth (one 1-based class id per line, in sorted file order) with a
    /// synset list (line k: the WNID of class id k).
    Flat {
        labels: PathBuf,
        synsets: Option<PathBuf>,
    },
    /// IDX image and (optional) label files.
    Idx {
        images: PathBuf,
        labels: Option<PathBuf>,
    },
}

impl Layout {
    pub fn name(&self) -> &'static str {
        match self {
            Layout::ImageFolder => "imagefolder",
            Layout::Flat { .. } => "flat",
            Layout::Idx { .. } => "idx",
        }
    }
}

/// Where an item's bytes come from.
#[derive(Debug, Clone)]
pub enum Src {
    File(PathBuf),
    /// Index into [`Source::idx`].
    Idx(usize),
}

#[derive(Debug, Clone)]
pub struct Item {
    pub key: String,
    pub label: i32,
    pub src: Src,
    /// File size (0 for IDX items or unreadable files); part of the fingerprint.
    pub size: u64,
}

/// Everything found in a source.
#[derive(Debug)]
pub struct Source {
    pub layout: &'static str,
    pub classes: Vec<String>,
    /// Sorted by key.
    pub items: Vec<Item>,
    /// Files not looked at (no image extension, hidden, outside class folders).
    pub ignored: u64,
    /// Files skipped before decoding (for example: no label).
    pub skipped: Vec<Skipped>,
    /// The IDX images, for [`Src::Idx`] items.
    pub idx: Option<IdxU8>,
}

/// Options that apply to every layout.
#[derive(Debug, Clone, Default)]
pub struct ScanOptions {
    /// Use the classes (and their order) of this existing dataset.
    pub classes_from: Option<PathBuf>,
    /// Class names for IDX labels (index = label).
    pub class_names: Option<Vec<String>>,
}

fn has_image_extension(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SourceError + '_ {
    move |source| SourceError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Files below `dir` (recursive, symlinks followed, sorted), as (relative key, path,
/// size). Counts ignored files.
fn walk(
    root: &Path,
    dir: &Path,
    out: &mut Vec<(String, PathBuf, u64)>,
    ignored: &mut u64,
) -> Result<(), SourceError> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(io_err(dir))?;
    entries.sort();
    for p in entries {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with('.') {
            *ignored += 1;
            continue;
        }
        let meta = std::fs::metadata(&p);
        if let Ok(m) = &meta {
            if m.is_dir() {
                walk(root, &p, out, ignored)?;
                continue;
            }
        }
        if !has_image_extension(&p) {
            *ignored += 1;
            continue;
        }
        let key = p
            .strip_prefix(root)
            .unwrap_or(&p)
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join("/");
        // An unreadable entry (a broken link, say) is kept: reading it fails later and
        // it is listed as skipped with the reason.
        let size = meta.map(|m| m.len()).unwrap_or(0);
        out.push((key, p, size));
    }
    Ok(())
}

fn check_dir(src: &Path) -> Result<(), SourceError> {
    match std::fs::metadata(src) {
        Err(_) => Err(SourceError::Missing(src.to_path_buf())),
        Ok(m) if !m.is_dir() => Err(SourceError::NotADir(src.to_path_buf())),
        Ok(_) => Ok(()),
    }
}

/// Maps class names to indices: sorted names, or the given dataset's classes.
fn class_index(
    names: &BTreeSet<String>,
    opts: &ScanOptions,
) -> Result<(Vec<String>, BTreeMap<String, i32>), SourceError> {
    let classes: Vec<String> = match &opts.classes_from {
        Some(dir) => {
            let m = Manifest::load(dir)?;
            for n in names {
                if !m.classes.contains(n) {
                    return Err(SourceError::Invalid(format!(
                        "class {n:?} is not among the classes of {}",
                        dir.display()
                    )));
                }
            }
            m.classes
        }
        None => names.iter().cloned().collect(),
    };
    let index = classes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.clone(), i as i32))
        .collect();
    Ok((classes, index))
}

/// Scans `src` (a folder; unused for IDX) with `layout`.
pub fn scan(src: &Path, layout: &Layout, opts: &ScanOptions) -> Result<Source, SourceError> {
    let source = match layout {
        Layout::ImageFolder => scan_image_folder(src, opts)?,
        Layout::Flat { labels, synsets } => scan_flat(src, labels, synsets.as_deref(), opts)?,
        Layout::Idx { images, labels } => scan_idx(images, labels.as_deref(), opts)?,
    };
    if source.items.is_empty() {
        let p = match layout {
            Layout::Idx { images, .. } => images.clone(),
            _ => src.to_path_buf(),
        };
        return Err(SourceError::Empty(p));
    }
    Ok(source)
}

fn scan_image_folder(src: &Path, opts: &ScanOptions) -> Result<Source, SourceError> {
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
    let mut ignored = 0;
    let mut items = Vec::new();
    if class_dirs.is_empty() {
        // No class folders: every image is unlabeled.
        let mut files = Vec::new();
        walk(src, src, &mut files, &mut ignored)?;
        for (key, path, size) in files {
            items.push(Item {
                key,
                label: -1,
                src: Src::File(path),
                size,
            });
        }
        return Ok(Source {
            layout: "imagefolder",
            classes: Vec::new(),
            items,
            ignored,
            skipped: Vec::new(),
            idx: None,
        });
    }
    // Files next to the class folders belong to no class.
    ignored += (top.len() - class_dirs.len()) as u64;
    let names: BTreeSet<String> = class_dirs
        .iter()
        .map(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .collect();
    let (classes, index) = class_index(&names, opts)?;
    for dir in class_dirs {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let label = index[&name];
        let mut files = Vec::new();
        walk(src, dir, &mut files, &mut ignored)?;
        for (key, path, size) in files {
            items.push(Item {
                key,
                label,
                src: Src::File(path),
                size,
            });
        }
    }
    items.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(Source {
        layout: "imagefolder",
        classes,
        items,
        ignored,
        skipped: Vec::new(),
        idx: None,
    })
}

/// Label file contents: key → class name, or the i-th sorted file → class name.
enum LabelFile {
    Csv(BTreeMap<String, String>),
    Ordered(Vec<String>, Vec<String>),
}

fn read_labels(path: &Path, synsets: Option<&Path>) -> Result<LabelFile, SourceError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let lines: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty())
        .collect();
    let first = lines.first().map(|(_, l)| *l).unwrap_or("");
    if first.contains(',') {
        let mut map = BTreeMap::new();
        for (n, l) in &lines {
            let Some((k, c)) = l.split_once(',') else {
                return Err(SourceError::Labels {
                    path: path.to_path_buf(),
                    line: *n,
                    msg: format!("expected `key,class`, got {l:?}"),
                });
            };
            let (k, c) = (k.trim(), c.trim());
            if *n == lines[0].0 && k.eq_ignore_ascii_case("key") {
                continue; // header
            }
            if map.insert(k.to_string(), c.to_string()).is_some() {
                return Err(SourceError::Labels {
                    path: path.to_path_buf(),
                    line: *n,
                    msg: format!("key {k:?} appears twice"),
                });
            }
        }
        return Ok(LabelFile::Csv(map));
    }
    // ILSVRC2012 ground truth: 1-based class ids, one per line.
    let Some(syn_path) = synsets else {
        return Err(SourceError::Invalid(format!(
            "{} is not a `key,class` CSV; an ILSVRC-style ground-truth file (class ids) needs --synsets",
            path.display()
        )));
    };
    let syn_text = std::fs::read_to_string(syn_path).map_err(io_err(syn_path))?;
    let wnids: Vec<String> = syn_text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    let mut labels = Vec::with_capacity(lines.len());
    for (n, l) in &lines {
        let id: usize = l.parse().map_err(|_| SourceError::Labels {
            path: path.to_path_buf(),
            line: *n,
            msg: format!("expected a class id, got {l:?}"),
        })?;
        if id == 0 || id > wnids.len() {
            return Err(SourceError::Labels {
                path: path.to_path_buf(),
                line: *n,
                msg: format!(
                    "class id {id} outside 1..={} ({})",
                    wnids.len(),
                    syn_path.display()
                ),
            });
        }
        labels.push(wnids[id - 1].clone());
    }
    Ok(LabelFile::Ordered(labels, wnids))
}

fn scan_flat(
    src: &Path,
    labels: &Path,
    synsets: Option<&Path>,
    opts: &ScanOptions,
) -> Result<Source, SourceError> {
    check_dir(src)?;
    let mut files = Vec::new();
    let mut ignored = 0;
    walk(src, src, &mut files, &mut ignored)?;
    let lf = read_labels(labels, synsets)?;
    let mut skipped = Vec::new();
    let mut pairs: Vec<(String, PathBuf, u64, String)> = Vec::new();
    let names: BTreeSet<String> = match &lf {
        LabelFile::Csv(map) => {
            for (key, path, size) in files {
                // Keys may be given with or without folders; match the relative path first.
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                match map.get(&key).or_else(|| map.get(&name)) {
                    Some(c) => pairs.push((key, path, size, c.clone())),
                    None => skipped.push(Skipped {
                        key,
                        reason: format!("no label in {}", labels.display()),
                    }),
                }
            }
            map.values().cloned().collect()
        }
        LabelFile::Ordered(ls, wnids) => {
            if ls.len() != files.len() {
                return Err(SourceError::Invalid(format!(
                    "{} has {} labels but {} holds {} images",
                    labels.display(),
                    ls.len(),
                    src.display(),
                    files.len()
                )));
            }
            for ((key, path, size), c) in files.into_iter().zip(ls) {
                pairs.push((key, path, size, c.clone()));
            }
            wnids.iter().cloned().collect()
        }
    };
    let (classes, index) = class_index(&names, opts)?;
    let items = pairs
        .into_iter()
        .map(|(key, path, size, c)| Item {
            key,
            label: index[&c],
            src: Src::File(path),
            size,
        })
        .collect();
    Ok(Source {
        layout: "flat",
        classes,
        items,
        ignored,
        skipped,
        idx: None,
    })
}

fn scan_idx(
    images: &Path,
    labels: Option<&Path>,
    opts: &ScanOptions,
) -> Result<Source, SourceError> {
    if !images.exists() {
        return Err(SourceError::Missing(images.to_path_buf()));
    }
    let imgs = read_idx_u8(images)?;
    if imgs.dims.len() != 3 {
        return Err(SourceError::Invalid(format!(
            "{}: expected an image array [n, rows, cols], got dims {:?}",
            images.display(),
            imgs.dims
        )));
    }
    let lbls = match labels {
        Some(p) => {
            let l = read_idx_u8(p)?;
            if l.dims.len() != 1 || l.len() != imgs.len() {
                return Err(SourceError::Invalid(format!(
                    "{}: {} labels (dims {:?}) for {} images in {}",
                    p.display(),
                    l.len(),
                    l.dims,
                    imgs.len(),
                    images.display()
                )));
            }
            Some(l.data)
        }
        None => None,
    };
    let classes: Vec<String> = match (&lbls, &opts.class_names) {
        (None, _) => Vec::new(),
        (Some(l), names) => {
            let n = l.iter().copied().max().map(|m| m as usize + 1).unwrap_or(0);
            match names {
                Some(names) if names.len() >= n => names.clone(),
                Some(names) => {
                    return Err(SourceError::Invalid(format!(
                        "{} class names given but labels go up to {}",
                        names.len(),
                        n - 1
                    )))
                }
                None => (0..n).map(|i| i.to_string()).collect(),
            }
        }
    };
    let items = (0..imgs.len())
        .map(|i| Item {
            key: format!("idx:{i}"),
            label: lbls.as_ref().map(|l| l[i] as i32).unwrap_or(-1),
            src: Src::Idx(i),
            size: 0,
        })
        .collect();
    Ok(Source {
        layout: "idx",
        classes,
        items,
        ignored: 0,
        skipped: Vec::new(),
        idx: Some(imgs),
    })
}

/// A CRC over (key, label, size) of every item plus the classes: equal for the same
/// source listing, used to refuse resuming onto a different source.
pub fn fingerprint(s: &Source) -> String {
    let mut h = crc32fast::Hasher::new();
    for c in &s.classes {
        h.update(c.as_bytes());
        h.update(b"\n");
    }
    for it in &s.items {
        h.update(it.key.as_bytes());
        h.update(&it.label.to_le_bytes());
        h.update(&it.size.to_le_bytes());
    }
    if let Some(idx) = &s.idx {
        h.update(&idx.data);
    }
    format!("{:08x}:{}", h.finalize(), s.items.len())
}
