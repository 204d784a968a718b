//! Enumerating the images of a source: ImageNet-style class folders, a flat folder
//! with a label file, or IDX files.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use crate::idx::{read_idx_u8, IdxU8};
use crate::keys::has_image_extension;
pub use crate::keys::{key_of, unescape_key, IMAGE_EXTENSIONS};
use byol_format::shards::{Manifest, Skipped};

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
    Manifest(#[from] byol_format::shards::FormatError),
    #[error(transparent)]
    Tar(#[from] crate::tar_source::TarError),
}

/// How the source is organised.
#[derive(Debug, Clone)]
pub enum Layout {
    /// One subfolder per class (torchvision ImageFolder); without subfolders every
    /// image is unlabeled (-1).
    ImageFolder,
    /// A flat folder, or a tar archive of images (ImageNet's `ILSVRC2012_img_val.tar`),
    /// plus a label file: CSV `key,class`, or an ILSVRC2012 validation ground truth (one
    /// 1-based class id per line, in sorted file order) with a synset list (line k: the
    /// WNID of class id k).
    Flat {
        labels: PathBuf,
        synsets: Option<PathBuf>,
    },
    /// IDX image and (optional) label files.
    Idx {
        images: PathBuf,
        labels: Option<PathBuf>,
    },
    /// Tar archives, read in place (gzip-compressed ones through a temporary tar): class
    /// folders, a tar of class tars, or images without folders (see
    /// [`crate::tar_source`]). With a label file, use [`Layout::Flat`] with the archive
    /// as the source.
    Tar,
    /// WebDataset shards (one `.tar`, or a folder of them): samples grouped by key,
    /// `KEY.jpg|png|…` the image, `KEY.cls` the label (an integer).
    WebDataset,
    /// Parquet files in the Hugging Face layout (see [`crate::parquet_source`]): files,
    /// or folders that hold only `*.parquet` files.
    Parquet,
}

impl Layout {
    pub fn name(&self) -> &'static str {
        match self {
            Layout::ImageFolder => "imagefolder",
            Layout::Flat { .. } => "flat",
            Layout::Idx { .. } => "idx",
            Layout::Tar => "tar",
            Layout::WebDataset => "webdataset",
            Layout::Parquet => "parquet",
        }
    }
}

/// Where an item's bytes come from.
#[derive(Debug, Clone)]
pub enum Src {
    File(PathBuf),
    /// Index into [`Source::idx`].
    Idx(usize),
    /// `size` bytes at `offset` of the archive [`Source::archives`]`[archive]`.
    Tar {
        archive: usize,
        offset: u64,
        size: u64,
    },
    /// Row `row` of row group `group` of the Parquet file [`Source::archives`]`[file]`.
    Parquet {
        file: usize,
        group: usize,
        row: usize,
    },
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
    /// Keys spelled with `%XX` escapes because their path is not valid UTF-8 (see
    /// [`key_of`]).
    pub escaped: Vec<String>,
    /// The IDX images, for [`Src::Idx`] items.
    pub idx: Option<IdxU8>,
    /// The archives [`Src::Tar`] items are read from.
    pub archives: Vec<PathBuf>,
    /// Temporary uncompressed tars of gzip-compressed archives (deleted on drop).
    pub temps: Vec<tempfile::TempPath>,
    /// The image bytes of [`Src::Parquet`] items.
    pub parquet: Option<crate::parquet_source::ParquetImages>,
}

/// Options that apply to every layout.
#[derive(Debug, Clone, Default)]
pub struct ScanOptions {
    /// Use the classes (and their order) of this existing dataset.
    pub classes_from: Option<PathBuf>,
    /// Class names for IDX labels (index = label).
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

/// What a walk found: (key, path, size) of image files, and what it left out.
#[derive(Default)]
struct Walked {
    files: Vec<(String, PathBuf, u64)>,
    ignored: u64,
    skipped: Vec<Skipped>,
    escaped: Vec<String>,
}

/// Files below `dir` (recursive, symlinks followed, sorted by name; the `walkdir`
/// crate), keyed relative to `root`. Hidden entries and files without an image
/// extension are counted as ignored. A folder reached again through a link (a link to
/// an ancestor, which would loop, or a second path to a folder already walked) is not
/// walked again: it is listed as skipped with the reason. `seen` holds the (device,
/// inode) of every folder walked so far, across calls.
fn walk(
    root: &Path,
    dir: &Path,
    out: &mut Walked,
    seen: &mut HashSet<(u64, u64)>,
) -> Result<(), SourceError> {
    use std::os::unix::fs::MetadataExt;
    let rel = |p: &Path| key_of(p.strip_prefix(root).unwrap_or(p));
    let mut it = walkdir::WalkDir::new(dir)
        .follow_links(true)
        .sort_by_file_name()
        .into_iter();
    while let Some(entry) = it.next() {
        let e = match entry {
            Ok(e) => e,
            Err(err) => {
                let path = err.path().unwrap_or(dir).to_path_buf();
                if err.loop_ancestor().is_some() {
                    out.skipped.push(Skipped {
                        key: rel(&path).0,
                        reason: format!(
                            "link to a folder already being walked ({}): not walked again",
                            err.loop_ancestor()
                                .map(|a| a.display().to_string())
                                .unwrap_or_default()
                        ),
                    });
                    continue;
                }
                if path == dir {
                    let source = err
                        .into_io_error()
                        .unwrap_or_else(|| std::io::Error::other("walk failed"));
                    return Err(SourceError::Io { path, source });
                }
                // A broken link or an unreadable entry: kept when it has an image
                // extension (reading it fails later and it is listed as skipped).
                if path.is_dir() {
                    // A folder that cannot be listed (permissions): its images are not
                    // seen, so it is listed with the reason instead of vanishing.
                    out.skipped.push(Skipped {
                        key: rel(&path).0,
                        reason: format!("folder cannot be read: {err}"),
                    });
                } else if has_image_extension(&path) {
                    let (key, esc) = rel(&path);
                    if esc {
                        out.escaped.push(key.clone());
                    }
                    out.files.push((key, path, 0));
                } else {
                    out.ignored += 1;
                }
                continue;
            }
        };
        let hidden = e.depth() > 0 && e.file_name().as_encoded_bytes().starts_with(b".");
        if e.file_type().is_dir() {
            if hidden {
                out.ignored += 1;
                it.skip_current_dir();
                continue;
            }
            if let Ok(m) = e.metadata() {
                // The folder a walk starts at (the root or a class folder) is recorded
                // before the walk.
                let again = !seen.insert((m.dev(), m.ino()));
                if again && e.depth() > 0 {
                    out.skipped.push(Skipped {
                        key: rel(e.path()).0,
                        reason: "link to a folder that was already walked: not walked again".into(),
                    });
                    it.skip_current_dir();
                }
            }
            continue;
        }
        if hidden || !has_image_extension(e.path()) {
            out.ignored += 1;
            continue;
        }
        let (key, esc) = rel(e.path());
        if esc {
            out.escaped.push(key.clone());
        }
        let size = e.metadata().map(|m| m.len()).unwrap_or(0);
        out.files.push((key, e.path().to_path_buf(), size));
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

/// Scans `src` (a folder or archive; unused for IDX) with `layout`.
///
/// # Errors
/// [`SourceError`]: a missing or empty source, an unreadable or invalid label file (naming file and line), or I/O naming the path.
pub fn scan(src: &Path, layout: &Layout, opts: &ScanOptions) -> Result<Source, SourceError> {
    scan_sources(&[src.to_path_buf()], layout, opts)
}

/// [`scan`] over several sources: tar archives or WebDataset shards (`--src a.tar --src
/// b.tar`, or a glob). A key found again in a later archive replaces the earlier item
/// (tar's rule), which is listed as skipped. Other layouts take one source.
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
    let source = match layout {
        Layout::ImageFolder => scan_image_folder(one()?, opts)?,
        Layout::Flat { labels, synsets } => scan_flat(one()?, labels, synsets.as_deref(), opts)?,
        Layout::Idx { images, labels } => scan_idx(images, labels.as_deref(), opts)?,
        Layout::Tar => scan_tar(srcs, opts)?,
        Layout::WebDataset => scan_webdataset(srcs, opts)?,
        Layout::Parquet => scan_parquet(srcs, opts)?,
    };
    let src = srcs.first().map(|p| p.as_path()).unwrap_or(Path::new(""));
    let mut source = source;
    drop_escaped_collisions(&mut source);
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
    let mut w = Walked::default();
    let mut seen = HashSet::new();
    if let Ok(m) = std::fs::metadata(src) {
        use std::os::unix::fs::MetadataExt;
        seen.insert((m.dev(), m.ino()));
    }
    let mut items = Vec::new();
    if class_dirs.is_empty() {
        // No class folders: every image is unlabeled.
        walk(src, src, &mut w, &mut seen)?;
        for (key, path, size) in std::mem::take(&mut w.files) {
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
            ignored: w.ignored,
            skipped: w.skipped,
            escaped: w.escaped,
            idx: None,
            archives: Vec::new(),
            temps: Vec::new(),
            parquet: None,
        });
    }
    // Files next to the class folders belong to no class.
    w.ignored += (top.len() - class_dirs.len()) as u64;
    let class_name = |p: &Path| key_of(Path::new(p.file_name().unwrap_or_default())).0;
    // A Latin-1 folder whose escaped name equals a real folder name (`caf%E9` beside
    // `caf<0xE9>`) would merge two classes: the escaped one is skipped instead.
    let mut class_dirs = class_dirs;
    let real: BTreeSet<String> = class_dirs
        .iter()
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some())
        .map(|p| class_name(p))
        .collect();
    class_dirs.retain(|p| {
        let clash = p.file_name().and_then(|n| n.to_str()).is_none() && real.contains(&class_name(p));
        if clash {
            w.skipped.push(Skipped {
                key: class_name(p),
                reason: "class folder name is not UTF-8 and its escaped name equals another folder's name".into(),
            });
        }
        !clash
    });
    // Every class folder is its own class: a link from one class folder to another is
    // not walked as part of the first.
    for d in &class_dirs {
        if let Ok(m) = std::fs::metadata(d) {
            use std::os::unix::fs::MetadataExt;
            seen.insert((m.dev(), m.ino()));
        }
    }
    let names: BTreeSet<String> = class_dirs.iter().map(|p| class_name(p)).collect();
    let (classes, index) = class_index(&names, opts)?;
    for dir in class_dirs {
        let label = index[&class_name(dir)];
        walk(src, dir, &mut w, &mut seen)?;
        for (key, path, size) in std::mem::take(&mut w.files) {
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
        ignored: w.ignored,
        skipped: w.skipped,
        escaped: w.escaped,
        idx: None,
        archives: Vec::new(),
        temps: Vec::new(),
        parquet: None,
    })
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

/// One data row of a `key,class` label file.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelRow {
    /// 1-based line of the row in the file.
    pub line: u64,
    pub key: String,
    pub class: String,
}

/// Label file contents: `key,class` rows (the first row possibly a header; see
/// [`read_csv_labels`]), or the i-th sorted file → class name.
enum LabelFile {
    Csv(Vec<LabelRow>),
    Ordered(Vec<String>, Vec<String>),
}

/// Reads a `key,class` CSV as spreadsheets, Python's `csv` module, R and pandas write
/// it: RFC 4180 quoting, a UTF-8 byte-order mark or none, CRLF or LF line ends,
/// surrounding spaces trimmed, blank lines skipped (the `csv` crate). Every row must
/// have two fields. The first row is returned like the others: whether it is a header
/// is decided by the caller, which knows the image names.
///
/// # Errors
/// Unreadable file, malformed CSV, a row without exactly two fields or with an empty
/// field: each names the file and line.
pub fn read_csv_labels(path: &Path) -> Result<Vec<LabelRow>, SourceError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let body = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let bad = |line: u64, msg: String| SourceError::Labels {
        path: path.to_path_buf(),
        line: line as usize,
        msg,
    };
    let mut rd = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(body);
    let mut rows = Vec::new();
    for rec in rd.records() {
        let rec = rec.map_err(|e| {
            let line = e.position().map(|p| p.line()).unwrap_or(0);
            bad(line, format!("not valid CSV: {e}"))
        })?;
        let line = rec.position().map(|p| p.line()).unwrap_or(0);
        if rec.iter().all(str::is_empty) {
            continue;
        }
        if rec.len() != 2 {
            return Err(bad(
                line,
                format!(
                    "expected 2 fields `key,class`, got {}: {:?} (quote a field that holds a comma)",
                    rec.len(),
                    rec.iter().collect::<Vec<_>>()
                ),
            ));
        }
        let (k, c) = (&rec[0], &rec[1]);
        if k.is_empty() || c.is_empty() {
            return Err(bad(line, format!("empty key or class: {k:?},{c:?}")));
        }
        rows.push(LabelRow {
            line,
            key: k.to_string(),
            class: c.to_string(),
        });
    }
    Ok(rows)
}

fn read_labels(path: &Path, synsets: Option<&Path>) -> Result<LabelFile, SourceError> {
    let text = String::from_utf8_lossy(&std::fs::read(path).map_err(io_err(path))?).into_owned();
    let lines: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim_start_matches('\u{feff}').trim()))
        .filter(|(_, l)| !l.is_empty())
        .collect();
    let first = lines.first().map(|(_, l)| *l).unwrap_or("");
    if first.contains(',') {
        return Ok(LabelFile::Csv(read_csv_labels(path)?));
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
    let mut w = Walked::default();
    let mut temps = Vec::new();
    let mut archives = Vec::new();
    // (key, where the bytes are, size): a folder's image files, or an archive's members
    // keyed by their paths in it.
    let files: Vec<(String, Src, u64)> = if src.is_file() {
        let path = open_archive(src, opts, &mut temps)?;
        let t = crate::tar_source::scan(&path, src)?;
        archives.push(path);
        w.ignored = t.ignored;
        w.skipped = t.skipped;
        w.escaped = t.escaped;
        let mut by_key: BTreeMap<String, crate::tar_source::TarMember> = BTreeMap::new();
        for m in t.members {
            if let Some(old) = by_key.insert(m.key.clone(), m) {
                w.skipped.push(Skipped {
                    key: old.key,
                    reason: "replaced by a later member of the same name".into(),
                });
            }
        }
        by_key
            .into_values()
            .map(|m| {
                let src = Src::Tar {
                    archive: 0,
                    offset: m.offset,
                    size: m.size,
                };
                (m.key, src, m.size)
            })
            .collect()
    } else {
        check_dir(src)?;
        walk(src, src, &mut w, &mut HashSet::new())?;
        std::mem::take(&mut w.files)
            .into_iter()
            .map(|(k, p, n)| (k, Src::File(p), n))
            .collect()
    };
    let lf = read_labels(labels, synsets)?;
    let mut skipped = std::mem::take(&mut w.skipped);
    let mut pairs: Vec<(String, Src, u64, String)> = Vec::new();
    let names: BTreeSet<String> = match &lf {
        LabelFile::Csv(rows) => {
            // Rows name images by their path relative to the source or by file name.
            let by_key: BTreeMap<&str, usize> = files
                .iter()
                .enumerate()
                .map(|(i, f)| (f.0.as_str(), i))
                .collect();
            let mut by_name: BTreeMap<String, Vec<usize>> = BTreeMap::new();
            for (i, f) in files.iter().enumerate() {
                let name = f.0.rsplit('/').next().unwrap_or_default().to_string();
                by_name.entry(name).or_default().push(i);
            }
            for r in rows.iter() {
                if !by_key.contains_key(r.key.as_str()) {
                    if let Some(v) = by_name.get(&r.key).filter(|v| v.len() > 1) {
                        return Err(SourceError::Labels {
                            path: labels.to_path_buf(),
                            line: r.line as usize,
                            msg: format!(
                                "{:?} names {} files ({}); give the path relative to the source",
                                r.key,
                                v.len(),
                                v.iter()
                                    .map(|&i| files[i].0.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        });
                    }
                }
            }
            let find = |k: &str| -> Option<usize> {
                by_key.get(k).copied().or_else(|| match by_name.get(k) {
                    Some(v) if v.len() == 1 => Some(v[0]),
                    _ => None,
                })
            };
            // A first row that names no image is a header (`key,class`, `filename,label`,
            // any spelling); it is never data.
            let data = match rows.first() {
                Some(r) if find(&r.key).is_none() => &rows[1..],
                _ => &rows[..],
            };
            let mut label_of: Vec<Option<(String, u64)>> = vec![None; files.len()];
            let mut unmatched: Vec<u64> = Vec::new();
            for r in data {
                match find(&r.key) {
                    Some(i) => {
                        if let Some((_, first)) = &label_of[i] {
                            return Err(SourceError::Labels {
                                path: labels.to_path_buf(),
                                line: r.line as usize,
                                msg: format!(
                                    "{:?} is labelled twice (first on line {first})",
                                    files[i].0
                                ),
                            });
                        }
                        label_of[i] = Some((r.class.clone(), r.line));
                    }
                    None => unmatched.push(r.line),
                }
            }
            if !data.is_empty() && unmatched.len() == data.len() {
                return Err(SourceError::Labels {
                    path: labels.to_path_buf(),
                    line: data[0].line as usize,
                    msg: format!(
                        "no row names an image in {} (keys are paths relative to it, or file names, with their extension, case as on disk)",
                        src.display()
                    ),
                });
            }
            if !unmatched.is_empty() {
                let shown: Vec<String> = unmatched.iter().take(10).map(|l| l.to_string()).collect();
                eprintln!(
                    "byol-tools: warning: {}: {} row(s) name no image in {} (lines {}{})",
                    labels.display(),
                    unmatched.len(),
                    src.display(),
                    shown.join(", "),
                    if unmatched.len() > 10 { ", …" } else { "" }
                );
            }
            let mut names = BTreeSet::new();
            for ((key, src, size), l) in files.into_iter().zip(label_of) {
                match l {
                    Some((c, _)) => {
                        names.insert(c.clone());
                        pairs.push((key, src, size, c));
                    }
                    None => skipped.push(Skipped {
                        key,
                        reason: format!("no label in {}", labels.display()),
                    }),
                }
            }
            names
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
            for ((key, src, size), c) in files.into_iter().zip(ls) {
                pairs.push((key, src, size, c.clone()));
            }
            wnids.iter().cloned().collect()
        }
    };
    let (classes, index) = class_index(&names, opts)?;
    let items = pairs
        .into_iter()
        .map(|(key, src, size, c)| Item {
            key,
            label: index[&c],
            src,
            size,
        })
        .collect();
    Ok(Source {
        layout: "flat",
        classes,
        items,
        ignored: w.ignored,
        skipped,
        escaped: w.escaped,
        idx: None,
        archives,
        temps,
        parquet: None,
    })
}

/// The files given, and the files of the folders given that `keep` accepts (sorted by
/// name; a folder with none is an error saying it holds no `what`).
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

/// An archive ready to read in place: the file itself, or (gzip) a temporary
/// uncompressed copy, which `temps` keeps alive.
fn open_archive(
    archive: &Path,
    opts: &ScanOptions,
    temps: &mut Vec<tempfile::TempPath>,
) -> Result<PathBuf, SourceError> {
    if !archive.exists() {
        return Err(SourceError::Missing(archive.to_path_buf()));
    }
    if archive.is_dir() {
        return Err(SourceError::Invalid(format!(
            "{} is a folder; a tar source is an archive file",
            archive.display()
        )));
    }
    if !crate::tar_source::is_gzip(archive)? {
        return Ok(archive.to_path_buf());
    }
    let dir = match &opts.temp_dir {
        Some(d) => d.clone(),
        None => archive
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf(),
    };
    eprintln!(
        "byol-tools: {} is gzip-compressed: decompressing it once into a temporary tar in {}",
        archive.display(),
        dir.display()
    );
    let tmp = crate::tar_source::gunzip_to_temp(archive, &dir)?;
    let path = tmp.to_path_buf();
    temps.push(tmp);
    Ok(path)
}

/// Tar archives ([`crate::tar_source`]): a later member of the same name replaces an
/// earlier one (tar's rule, also across archives); with class folders or inner tars,
/// members outside them belong to no class and are ignored, as files next to class
/// folders are; without any, every image is unlabeled.
fn scan_tar(archives: &[PathBuf], opts: &ScanOptions) -> Result<Source, SourceError> {
    let mut temps = Vec::new();
    let mut read_from = Vec::new();
    let mut by_key: BTreeMap<String, (usize, crate::tar_source::TarMember)> = BTreeMap::new();
    let (mut skipped, mut escaped, mut ignored) = (Vec::new(), Vec::new(), 0u64);
    let mut dirs: BTreeSet<String> = BTreeSet::new();
    let mut cls_members = 0;
    for (ai, archive) in archives.iter().enumerate() {
        let path = open_archive(archive, opts, &mut temps)?;
        let t = crate::tar_source::scan(&path, archive)?;
        read_from.push(path);
        dirs.extend(t.dirs);
        cls_members += t.cls_members;
        // With several archives, a skipped member says which archive it is in.
        let from = |k: String| {
            if archives.len() > 1 {
                format!("{}: {k}", archive.display())
            } else {
                k
            }
        };
        skipped.extend(t.skipped.into_iter().map(|mut x| {
            x.reason = from(x.reason);
            x
        }));
        escaped.extend(t.escaped);
        ignored += t.ignored;
        for m in t.members {
            if let Some((_, old)) = by_key.insert(m.key.clone(), (ai, m)) {
                skipped.push(Skipped {
                    key: old.key,
                    reason: "replaced by a later member of the same name".into(),
                });
            }
        }
    }
    if cls_members > 0 {
        eprintln!(
            "byol-tools: note: {cls_members} member(s) named *.cls: if these are WebDataset shards, --layout webdataset reads their labels"
        );
    }
    let labelled = by_key.values().any(|(_, m)| m.class.is_some());
    // Class folders and inner tars without images are classes too, as on disk.
    let mut names: BTreeSet<String> = by_key
        .values()
        .filter_map(|(_, m)| m.class.clone())
        .collect();
    if labelled {
        names.extend(dirs);
    }
    let (classes, index) = if labelled {
        class_index(&names, opts)?
    } else {
        (Vec::new(), BTreeMap::new())
    };
    let mut items = Vec::new();
    for (ai, m) in by_key.into_values() {
        let label = match &m.class {
            Some(c) => index[c],
            None if labelled => {
                ignored += 1;
                continue;
            }
            None => -1,
        };
        items.push(Item {
            key: m.key,
            label,
            src: Src::Tar {
                archive: ai,
                offset: m.offset,
                size: m.size,
            },
            size: m.size,
        });
    }
    Ok(Source {
        layout: "tar",
        classes,
        items,
        ignored,
        skipped,
        escaped,
        idx: None,
        archives: read_from,
        temps,
        parquet: None,
    })
}

/// WebDataset shards: `src` is one `.tar` or a folder whose `*.tar` files (sorted by
/// name) are the shards. One row per sample key with an image member; its label is the
/// integer in `KEY.cls`, the class names `--class-names` (index = label) or the numbers
/// `0..=max`. Without any `.cls` every sample is unlabeled; with some, a sample without
/// one, or with text that is not a label, is skipped with the reason. A key seen again
/// in a later shard replaces the earlier sample (skipped with the reason).
fn scan_webdataset(srcs: &[PathBuf], opts: &ScanOptions) -> Result<Source, SourceError> {
    use crate::tar_source::{scan_webdataset as scan_shard, webdataset_key};
    let archives = files_and_folders(
        srcs,
        |p| {
            let n = p.to_string_lossy().to_ascii_lowercase();
            n.ends_with(".tar") || n.ends_with(".tar.gz") || n.ends_with(".tgz")
        },
        "WebDataset shards (.tar, .tar.gz or .tgz files)",
    )?;
    let mut temps = Vec::new();
    let mut read_from = Vec::new();
    let (mut skipped, mut escaped, mut ignored) = (Vec::new(), Vec::new(), 0u64);
    // sample key → (archive, member)
    let mut samples: BTreeMap<String, (usize, crate::tar_source::TarMember)> = BTreeMap::new();
    let mut labels: BTreeMap<String, String> = BTreeMap::new();
    for a in &archives {
        let path = open_archive(a, opts, &mut temps)?;
        read_from.push(path);
    }
    for (ai, (a, path)) in archives.iter().zip(&read_from).enumerate() {
        let (t, l) = scan_shard(path, a)?;
        skipped.extend(t.skipped);
        escaped.extend(t.escaped);
        ignored += t.ignored;
        labels.extend(l);
        for m in t.members {
            let key = webdataset_key(&m.key).to_string();
            if let Some((_, old)) = samples.insert(key.clone(), (ai, m)) {
                skipped.push(Skipped {
                    key: key.clone(),
                    reason: format!(
                        "{} replaced by a later image of the same sample (member or shard)",
                        old.key
                    ),
                });
            }
        }
    }
    let labelled = !labels.is_empty();
    let mut items = Vec::new();
    let mut max_label = -1i32;
    for (key, (ai, m)) in samples {
        let label = match (labelled, labels.get(&key)) {
            (false, _) => -1,
            (true, None) => {
                skipped.push(Skipped {
                    key,
                    reason: "no .cls label".into(),
                });
                continue;
            }
            (true, Some(text)) => match text.parse::<i32>() {
                Ok(n)
                    if n >= 0
                        && opts
                            .class_names
                            .as_ref()
                            .is_some_and(|c| n as usize >= c.len()) =>
                {
                    skipped.push(Skipped {
                        key,
                        reason: format!(
                            ".cls label {n} is beyond the {} --class-names",
                            opts.class_names.as_ref().map_or(0, |c| c.len())
                        ),
                    });
                    continue;
                }
                Ok(n) if n >= 0 => n,
                _ => {
                    skipped.push(Skipped {
                        key,
                        reason: format!(".cls holds {text:?}, not a label (an integer >= 0)"),
                    });
                    continue;
                }
            },
        };
        max_label = max_label.max(label);
        items.push(Item {
            key,
            label,
            src: Src::Tar {
                archive: ai,
                offset: m.offset,
                size: m.size,
            },
            size: m.size,
        });
    }
    let classes: Vec<String> = match &opts.class_names {
        Some(names) => names.clone(),
        None => (0..=max_label).map(|n| n.to_string()).collect(),
    };
    let classes = with_classes_from(classes, &mut items, opts)?;
    Ok(Source {
        layout: "webdataset",
        classes,
        items,
        ignored,
        skipped,
        escaped,
        idx: None,
        archives: read_from,
        temps,
        parquet: None,
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
        escaped: Vec::new(),
        idx: Some(imgs),
        archives: Vec::new(),
        temps: Vec::new(),
        parquet: None,
    })
}

/// Parquet files in the Hugging Face layout: the files given, and the `*.parquet` files
/// of the folders given (sorted by name). Labels are the `label` column's integers; the
/// class names are `--class-names`, else the `ClassLabel` names in the `huggingface`
/// metadata, else the numbers `0..=max`. Without a `label` column every row is unlabeled;
/// a row whose label is null, or beyond the class names, is skipped with the reason.
fn scan_parquet(srcs: &[PathBuf], opts: &ScanOptions) -> Result<Source, SourceError> {
    let files = files_and_folders(
        srcs,
        |p| p.extension().is_some_and(|e| e == "parquet"),
        ".parquet files",
    )?;
    let scan = crate::parquet_source::scan(&files)
        .map_err(|e| SourceError::Invalid(byol_format::error_chain(&e)))?;
    let names: Option<Vec<String>> = opts.class_names.clone().or(scan.class_names);
    let max = scan.rows.iter().map(|r| r.label).max().unwrap_or(-1);
    let classes: Vec<String> = match (&names, scan.labelled) {
        (_, false) => Vec::new(),
        (Some(n), true) => n.clone(),
        (None, true) => (0..=max).map(|n| n.to_string()).collect(),
    };
    let mut items = Vec::with_capacity(scan.rows.len());
    let mut skipped = Vec::new();
    for r in scan.rows {
        // A null or negative label (Hugging Face test splits use -1) is an unlabeled row.
        let label = if !scan.labelled || r.label < 0 {
            -1
        } else if r.label as usize >= classes.len() {
            skipped.push(Skipped {
                key: r.key,
                reason: format!(
                    "label {} is beyond the {} class names",
                    r.label,
                    classes.len()
                ),
            });
            continue;
        } else {
            r.label as i32
        };
        items.push(Item {
            key: r.key,
            label,
            src: Src::Parquet {
                file: r.file,
                group: r.group,
                row: r.row,
            },
            size: 0,
        });
    }
    let classes = with_classes_from(classes, &mut items, opts)?;
    Ok(Source {
        layout: "parquet",
        classes,
        items,
        ignored: 0,
        skipped,
        escaped: Vec::new(),
        idx: None,
        archives: files.clone(),
        temps: Vec::new(),
        parquet: Some(crate::parquet_source::ParquetImages::new(files)),
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
    // Parquet rows carry no size: the files' lengths stand for their contents.
    if s.parquet.is_some() {
        for a in &s.archives {
            let len = std::fs::metadata(a).map(|m| m.len()).unwrap_or(0);
            h.update(&len.to_le_bytes());
        }
    }
    format!("{:08x}:{}", h.finalize(), s.items.len())
}
