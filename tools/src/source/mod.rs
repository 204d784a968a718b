//! Enumerating the images of a source. Each layout has its own module, which builds a
//! [`Source`] through [`Source::new`] with the data only it needs in its [`Origin`]:
//!
//! | layout        | module           | origin                         |
//! |---------------|------------------|--------------------------------|
//! | `imagefolder` | [`folder`]       | [`Origin::Files`]              |
//! | `flat`        | [`flat`]         | files, or one tar ([`Origin::Tar`]) |
//! | `idx`         | [`idx`]          | [`Origin::Idx`]                |
//! | `tar`         | [`tar`]          | [`Origin::Tar`]                |
//! | `webdataset`  | [`webdataset`]   | [`Origin::Tar`]                |
//! | `parquet`     | [`parquet`]      | [`Origin::Parquet`]            |
//!
//! [`layout`] decides the layout from the command line ([`Layout::resolve`]); `walk.rs`
//! lists folders, [`tarfile`] reads tar archives in place, [`gzip`] decompresses
//! gzip-compressed ones into temporary tars, [`labels`] reads flat label files.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use byol_format::shards::{Manifest, Skipped};

pub use crate::keys::{key_of, unescape_key, IMAGE_EXTENSIONS};
pub use labels::{read_csv_labels, LabelRow};
pub use layout::{Layout, LayoutKind, ResolveError, Resolved, SourceArgs};

pub mod flat;
pub mod folder;
pub mod gzip;
pub mod idx;
pub mod labels;
pub mod layout;
pub mod parquet;
pub mod tar;
pub mod tarfile;
mod walk;
pub mod webdataset;

/// Why a source cannot be listed.
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
    Idx(#[from] idx::IdxError),
    #[error(transparent)]
    Manifest(#[from] byol_format::shards::FormatError),
    #[error(transparent)]
    Tar(#[from] tarfile::TarError),
}

/// Where an item's bytes come from; the index fields point into the source's
/// [`Origin`].
#[derive(Debug, Clone)]
pub enum Src {
    File(PathBuf),
    /// Image `i` of [`Origin::Idx`].
    Idx(usize),
    /// `size` bytes at `offset` of archive `archive` of [`Origin::Tar`].
    Tar {
        archive: usize,
        offset: u64,
        size: u64,
    },
    /// Row `row` of row group `group` of file `file` of [`Origin::Parquet`].
    Parquet {
        file: usize,
        group: usize,
        row: usize,
    },
}

/// One image of a source.
#[derive(Debug, Clone)]
pub struct Item {
    pub key: String,
    pub label: i32,
    pub src: Src,
    /// File size (0 for IDX and Parquet items, or unreadable files); part of the
    /// fingerprint.
    pub size: u64,
}

/// What a layout's items are read from, beyond their own [`Src`].
#[derive(Debug)]
pub enum Origin {
    /// Image files, each item's [`Src::File`].
    Files,
    /// Tar archives read in place ([`Src::Tar`] items).
    Tar(gzip::Archives),
    /// Parquet files, read a row group at a time ([`Src::Parquet`] items).
    Parquet(parquet::ParquetImages),
    /// The IDX image array ([`Src::Idx`] items).
    Idx(idx::IdxU8),
}

impl Origin {
    /// The tar archive [`Src::Tar`]`{ archive, .. }` is read from (`None`: not a tar
    /// source, or no such archive).
    pub fn archive(&self, archive: usize) -> Option<&Path> {
        match self {
            Origin::Tar(a) => a.paths.get(archive).map(PathBuf::as_path),
            _ => None,
        }
    }

    /// The Parquet images of a Parquet source.
    pub fn parquet(&self) -> Option<&parquet::ParquetImages> {
        match self {
            Origin::Parquet(p) => Some(p),
            _ => None,
        }
    }

    /// The IDX images of an IDX source.
    pub fn idx(&self) -> Option<&idx::IdxU8> {
        match self {
            Origin::Idx(i) => Some(i),
            _ => None,
        }
    }
}

/// What a scan reports besides its items.
#[derive(Debug, Default)]
pub struct ScanNotes {
    /// Files not looked at (no image extension, hidden, outside class folders).
    pub ignored: u64,
    /// Files skipped before decoding, with the reason (for example: no label).
    pub skipped: Vec<Skipped>,
    /// Keys spelled with `%XX` escapes because their path is not valid UTF-8 (see
    /// [`key_of`]).
    pub escaped: Vec<String>,
}

impl ScanNotes {
    /// Adds `other`'s counts and lists to these.
    pub fn absorb(&mut self, other: ScanNotes) {
        self.ignored += other.ignored;
        self.skipped.extend(other.skipped);
        self.escaped.extend(other.escaped);
    }
}

/// Everything found in a source.
#[derive(Debug)]
pub struct Source {
    /// The layout's name ([`Layout::name`]).
    pub layout: &'static str,
    pub classes: Vec<String>,
    /// Sorted by key (IDX: by index; Parquet: by file and row).
    pub items: Vec<Item>,
    /// Files not looked at (no image extension, hidden, outside class folders).
    pub ignored: u64,
    /// Files skipped before decoding (for example: no label).
    pub skipped: Vec<Skipped>,
    /// Keys spelled with `%XX` escapes because their path is not valid UTF-8 (see
    /// [`key_of`]).
    pub escaped: Vec<String>,
    /// What the items are read from.
    pub origin: Origin,
}

impl Source {
    /// The one constructor every layout uses: the common part, and the layout's own data
    /// in `origin`.
    pub fn new(
        layout: LayoutKind,
        classes: Vec<String>,
        items: Vec<Item>,
        notes: ScanNotes,
        origin: Origin,
    ) -> Source {
        Source {
            layout: layout.name(),
            classes,
            items,
            ignored: notes.ignored,
            skipped: notes.skipped,
            escaped: notes.escaped,
            origin,
        }
    }
}

/// Options that apply to every layout.
#[derive(Debug, Clone, Default)]
pub struct ScanOptions {
    /// Use the classes (and their order) of this existing dataset.
    pub classes_from: Option<PathBuf>,
    /// Class names for IDX, WebDataset and Parquet labels (index = label).
    pub class_names: Option<Vec<String>>,
    /// Where a gzip-compressed archive is decompressed to a temporary tar (default: the
    /// archive's own folder).
    pub temp_dir: Option<PathBuf>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SourceError + '_ {
    move |source| SourceError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Scans `src` (a folder or archive; unused for IDX) with `layout`.
///
/// # Errors
/// [`SourceError`]: a missing or empty source, an unreadable or invalid label file
/// (naming file and line), or I/O naming the path.
pub fn scan(src: &Path, layout: &Layout, opts: &ScanOptions) -> Result<Source, SourceError> {
    scan_sources(&[src.to_path_buf()], layout, opts)
}

/// [`scan`] over several sources: tar archives, WebDataset shards or Parquet files
/// (`--src a.tar --src b.tar`, or a glob). A key found again in a later archive replaces
/// the earlier item (tar's rule), which is listed as skipped. Other layouts take one
/// source.
///
/// # Errors
/// As [`scan`]; several sources for a layout that takes one.
pub fn scan_sources(
    srcs: &[PathBuf],
    layout: &Layout,
    opts: &ScanOptions,
) -> Result<Source, SourceError> {
    let one = || -> Result<&Path, SourceError> {
        match srcs {
            [s] => Ok(s.as_path()),
            [] => Err(SourceError::Invalid("no source given".into())),
            _ => Err(SourceError::Invalid(format!(
                "--layout {} takes one --src, got {}",
                layout.name(),
                srcs.len()
            ))),
        }
    };
    let mut source = match layout {
        Layout::ImageFolder => folder::scan(one()?, opts)?,
        Layout::Flat { labels, synsets } => flat::scan(one()?, labels, synsets.as_deref(), opts)?,
        Layout::Idx { images, labels } => idx::scan(images, labels.as_deref(), opts)?,
        Layout::Tar => tar::scan(srcs, opts)?,
        Layout::WebDataset => webdataset::scan(srcs, opts)?,
        Layout::Parquet => parquet::scan(srcs, opts)?,
    };
    drop_escaped_collisions(&mut source);
    if source.items.is_empty() {
        let p = match layout {
            Layout::Idx { images, .. } => images.clone(),
            _ => srcs.first().cloned().unwrap_or_default(),
        };
        return Err(SourceError::Empty(p));
    }
    Ok(source)
}

/// Sources whose labels are numbers with names (WebDataset, Parquet): with
/// `--classes-from`, each label is renumbered to its name's index among that dataset's
/// classes, which become the classes.
///
/// # Errors
/// A class name that dataset does not have, or an unreadable dataset.
fn with_classes_from(
    classes: Vec<String>,
    items: &mut [Item],
    opts: &ScanOptions,
) -> Result<Vec<String>, SourceError> {
    let Some(dir) = &opts.classes_from else {
        return Ok(classes);
    };
    let target = Manifest::load(dir)?.classes;
    let mut map = Vec::with_capacity(classes.len());
    for c in &classes {
        map.push(target.iter().position(|t| t == c));
    }
    for it in items.iter_mut().filter(|it| it.label >= 0) {
        let name = &classes[it.label as usize];
        it.label = map[it.label as usize].ok_or_else(|| {
            SourceError::Invalid(format!(
                "class {name:?} is not among the classes of {}",
                dir.display()
            ))
        })? as i32;
    }
    Ok(target)
}

/// Maps class names to indices: sorted names (integer names in numeric order), or the
/// classes of `--classes-from`'s dataset.
///
/// # Errors
/// A name that dataset does not have, or an unreadable dataset.
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
        None => {
            let mut v: Vec<String> = names.iter().cloned().collect();
            // Integer class names (pandas' integer labels) in numeric order: 2 before 10.
            if v.iter().all(|n| n.parse::<i64>().is_ok()) {
                v.sort_by_key(|n| n.parse::<i64>().unwrap_or(0));
            }
            v
        }
    };
    let index = classes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.clone(), i as i32))
        .collect();
    Ok((classes, index))
}

/// An escaped key (see [`key_of`]) that equals the key of a file whose name really is
/// that text (`caf%E9.jpg` next to a Latin-1 `caf\xE9.jpg`) would merge two files: the
/// escaped one is skipped with the reason instead.
fn drop_escaped_collisions(source: &mut Source) {
    if source.escaped.is_empty() {
        return;
    }
    let escaped: HashSet<&String> = source.escaped.iter().collect();
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    for it in &source.items {
        *count.entry(it.key.as_str()).or_default() += 1;
    }
    let clash: HashSet<String> = count
        .into_iter()
        .filter(|(k, n)| *n > 1 && escaped.contains(&k.to_string()))
        .map(|(k, _)| k.to_string())
        .collect();
    if clash.is_empty() {
        return;
    }
    let mut kept = Vec::with_capacity(source.items.len());
    for it in source.items.drain(..) {
        let is_escaped = matches!(&it.src, Src::File(p) if p.to_str().is_none());
        if clash.contains(&it.key) && is_escaped {
            source.skipped.push(Skipped {
                key: it.key,
                reason: "its name is not UTF-8 and its escaped key equals another file's name"
                    .into(),
            });
        } else {
            kept.push(it);
        }
    }
    source.items = kept;
    source.escaped.retain(|k| !clash.contains(k));
}

/// The files given, and the files of the folders given that `keep` accepts (sorted by
/// name; a folder with none is an error saying it holds no `what`).
///
/// # Errors
/// A missing source, an unreadable folder, or a folder without such files.
fn files_and_folders(
    srcs: &[PathBuf],
    keep: impl Fn(&Path) -> bool,
    what: &str,
) -> Result<Vec<PathBuf>, SourceError> {
    let mut out = Vec::new();
    for src in srcs {
        if src.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(src)
                .map_err(io_err(src))?
                .map(|e| e.map(|e| e.path()))
                .collect::<Result<_, _>>()
                .map_err(io_err(src))?;
            v.retain(|p| keep(p));
            v.sort();
            if v.is_empty() {
                return Err(SourceError::Invalid(format!(
                    "{} holds no {what}",
                    src.display()
                )));
            }
            out.extend(v);
        } else if !src.exists() {
            return Err(SourceError::Missing(src.to_path_buf()));
        } else {
            out.push(src.to_path_buf());
        }
    }
    Ok(out)
}

/// Names of files from one or several sources that stay unique: each path relative to
/// the files' common folder (the file name alone when they share one folder), `/`
/// between components. Keys of multi-file sources start with it, so two folders that
/// both hold `0000.parquet` or `shard-000.tar` give different keys.
pub(crate) fn relative_names(files: &[PathBuf]) -> Vec<String> {
    let abs: Vec<PathBuf> = files
        .iter()
        .map(|f| std::path::absolute(f).unwrap_or_else(|_| f.clone()))
        .collect();
    let mut root: Option<PathBuf> = None;
    for f in &abs {
        let parent = f.parent().map(Path::to_path_buf).unwrap_or_default();
        root = Some(match root {
            None => parent,
            Some(r) => r
                .components()
                .zip(parent.components())
                .take_while(|(a, b)| a == b)
                .map(|(a, _)| a)
                .collect(),
        });
    }
    let root = root.unwrap_or_default();
    abs.iter()
        .map(|f| {
            f.strip_prefix(&root)
                .unwrap_or(f)
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/")
        })
        .collect()
}

/// A CRC over (key, label, size) of every item plus the classes, the IDX pixels and the
/// Parquet files' lengths: equal for the same source listing, used to refuse resuming
/// onto a different source.
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
    match &s.origin {
        Origin::Idx(idx) => h.update(&idx.data),
        // Parquet rows carry no size: the files' lengths stand for their contents.
        Origin::Parquet(p) => {
            for a in &p.files {
                let len = std::fs::metadata(a).map(|m| m.len()).unwrap_or(0);
                h.update(&len.to_le_bytes());
            }
        }
        Origin::Files | Origin::Tar(_) => {}
    }
    format!("{:08x}:{}", h.finalize(), s.items.len())
}
