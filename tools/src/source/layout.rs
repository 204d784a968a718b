//! How a source is organised ([`Layout`]), and deciding it from the `shard` command's
//! arguments ([`Layout::resolve`]): `--src` globs expanded, the layout inferred when not
//! given, and every combination of options that a layout would not read refused.

use std::path::{Path, PathBuf};

use byol_format::shards::MANIFEST;

use super::{scan_sources, ScanOptions, Source, SourceError};
use crate::keys::{has_image_extension, is_parquet_name, tar_name};

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
    /// folders, a tar of class tars, or images without folders (see [`super::tar`]).
    /// With a label file, use [`Layout::Flat`] with the archive as the source.
    Tar,
    /// WebDataset shards (one `.tar`, or a folder of them): samples grouped by key,
    /// `KEY.jpg|png|…` the image, `KEY.cls` the label (an integer).
    WebDataset,
    /// Parquet files in the Hugging Face layout (see [`super::parquet`]): files, or
    /// folders that hold only `*.parquet` files.
    Parquet,
}

/// A layout without its files: what `--layout` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LayoutKind {
    /// One subfolder per class (ImageNet train, torchvision ImageFolder).
    #[value(name = "imagefolder")]
    ImageFolder,
    /// A flat folder or a tar of images, plus --labels (CSV `key,class`, or ILSVRC
    /// ground truth + --synsets).
    Flat,
    /// IDX files (MNIST, Fashion-MNIST): --images and --labels.
    Idx,
    /// Tar archives, read in place (.tar.gz/.tgz through a temporary tar): class folders,
    /// a tar of class tars (ImageNet train), or images without folders (unlabeled).
    Tar,
    /// WebDataset shards (.tar files or folders of them): KEY.jpg/png/… + KEY.cls.
    #[value(name = "webdataset")]
    WebDataset,
    /// Parquet files in the Hugging Face layout (an `image` column of bytes, a `label`
    /// column, ClassLabel names in the metadata): files or folders of `*.parquet`.
    Parquet,
}

impl LayoutKind {
    /// The name `--layout` and the manifest's `settings.layout` use.
    pub fn name(self) -> &'static str {
        match self {
            LayoutKind::ImageFolder => "imagefolder",
            LayoutKind::Flat => "flat",
            LayoutKind::Idx => "idx",
            LayoutKind::Tar => "tar",
            LayoutKind::WebDataset => "webdataset",
            LayoutKind::Parquet => "parquet",
        }
    }

    /// Whether the layout reads several sources (tar archives, WebDataset shards,
    /// Parquet files).
    fn takes_several(self) -> bool {
        matches!(
            self,
            LayoutKind::Tar | LayoutKind::WebDataset | LayoutKind::Parquet
        )
    }
}

/// The `shard` command's source options and output folder, as given; clap parses them
/// (`#[command(flatten)]`), so each field's doc is its `--help` text.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SourceArgs {
    /// Source folder or archive (not used with --layout idx). Repeatable for tar
    /// archives and WebDataset shards; a quoted glob (`'shards/*.tar'`) expands.
    #[arg(long)]
    pub src: Vec<PathBuf>,
    /// Output dataset folder.
    #[arg(long)]
    pub out: PathBuf,
    /// [default: flat when --src is a tar with --labels, tar when every --src is a
    /// `.tar`/`.tar.gz`/`.tgz` file, parquet when every --src is a `.parquet` file or
    /// a folder holding only `.parquet` files, else imagefolder]
    #[arg(long, value_enum)]
    pub layout: Option<LayoutKind>,
    /// Label file (flat: CSV or ILSVRC ground truth; idx: IDX labels).
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// IDX image file (idx layout).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Synset list for an ILSVRC ground-truth label file (line k: WNID of class id k).
    #[arg(long)]
    pub synsets: Option<PathBuf>,
    /// Take the class list (names and order) from this existing dataset.
    #[arg(long)]
    pub classes_from: Option<PathBuf>,
    /// Comma-separated class names for IDX, WebDataset and Parquet labels 0, 1, ...
    #[arg(long)]
    pub class_names: Option<String>,
}

/// A source ready to scan: what [`Layout::resolve`] decided.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The sources, globs expanded (empty for idx).
    pub srcs: Vec<PathBuf>,
    pub layout: Layout,
    /// The source as the manifest's `settings.source` names it.
    pub source_arg: String,
    pub options: ScanOptions,
}

impl Resolved {
    /// Lists the source's images.
    ///
    /// # Errors
    /// As [`scan_sources`].
    pub fn scan(&self) -> Result<Source, SourceError> {
        scan_sources(&self.srcs, &self.layout, &self.options)
    }
}

/// Why the `shard` command's source options are refused.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("--src {pattern:?} is not a valid glob pattern")]
    BadGlob {
        pattern: String,
        #[source]
        source: glob::PatternError,
    },
    #[error("expanding --src {pattern:?}")]
    Glob {
        pattern: String,
        #[source]
        source: glob::GlobError,
    },
    #[error("--src {0:?} matches no file")]
    NoMatch(String),
    #[error("{} is a byol dataset (it has {MANIFEST}): it is already sharded; train on it with --data, or shard the images it came from", .0.display())]
    AlreadySharded(PathBuf),
    #[error("{0} --src given: several sources are for tar archives, WebDataset shards and Parquet files")]
    SeveralSources(usize),
    #[error("--class-names {0:?}: a class name is empty")]
    EmptyClassName(String),
    #[error("--class-names {names:?}: {name:?} is given twice")]
    ClassNameTwice { names: String, name: String },
    #[error("--class-names names IDX, WebDataset and Parquet labels; other layouts take class names from folders or --labels (WebDataset shards not recognised as such: add --layout webdataset)")]
    ClassNamesUnread,
    #[error("--labels is read by --layout flat (a folder or a tar of images) and idx only")]
    LabelsUnread,
    #[error("--layout tar needs --src ARCHIVE.tar")]
    TarNeedsSrc,
    #[error("--layout webdataset needs --src SHARD.tar or a folder of shards")]
    WebDatasetNeedsSrc,
    #[error("--layout parquet needs --src FILE.parquet or a folder of them")]
    ParquetNeedsSrc,
    #[error("--src is required")]
    SrcRequired,
    #[error("--layout flat needs --labels FILE (CSV key,class or ILSVRC ground truth)")]
    FlatNeedsLabels,
    #[error("--layout idx needs --images FILE")]
    IdxNeedsImages,
    #[error(transparent)]
    Collision(#[from] byol_format::fs::Collision),
}

impl Layout {
    /// The layout's kind.
    pub fn kind(&self) -> LayoutKind {
        match self {
            Layout::ImageFolder => LayoutKind::ImageFolder,
            Layout::Flat { .. } => LayoutKind::Flat,
            Layout::Idx { .. } => LayoutKind::Idx,
            Layout::Tar => LayoutKind::Tar,
            Layout::WebDataset => LayoutKind::WebDataset,
            Layout::Parquet => LayoutKind::Parquet,
        }
    }

    /// The layout's name ([`LayoutKind::name`]).
    pub fn name(&self) -> &'static str {
        self.kind().name()
    }

    /// Decides what to scan from the `shard` command's options: `--src` globs expanded
    /// (sorted), byol datasets refused as sources, the layout inferred when not given
    /// (flat for tar archives with `--labels`, webdataset for tar archives — or a folder
    /// of them — whose first archive pairs an image with a `.cls`/`.json` member of the
    /// same key, tar for other tar archives, parquet for
    /// `.parquet` files or folders of them, else imagefolder), and options the layout
    /// does not read refused. A gzip-compressed archive will be decompressed beside
    /// `out`, the output folder.
    ///
    /// # Errors
    /// [`ResolveError`], in this order: a bad or unmatched glob, a byol dataset as a
    /// source, several sources for a layout that takes one, bad `--class-names` or ones
    /// the layout does not read, `--labels` the layout does not read, an option the
    /// layout needs missing.
    pub fn resolve(args: &SourceArgs) -> Result<Resolved, ResolveError> {
        let srcs = expand_globs(&args.src)?;
        let mut inputs: Vec<(&str, &Path)> = srcs.iter().map(|p| ("--src", p.as_path())).collect();
        for (flag, p) in [
            ("--labels", &args.labels),
            ("--images", &args.images),
            ("--synsets", &args.synsets),
            ("--classes-from", &args.classes_from),
        ] {
            inputs.extend(p.as_deref().map(|p| (flag, p)));
        }
        byol_format::fs::check_outputs(&[("--out", &args.out)], &inputs)?;
        if let Some(d) = srcs.iter().find(|p| p.join(MANIFEST).is_file()) {
            return Err(ResolveError::AlreadySharded(d.clone()));
        }
        let kind = args.layout.unwrap_or_else(|| infer(&srcs, args));
        if srcs.len() > 1 && !kind.takes_several() {
            return Err(ResolveError::SeveralSources(srcs.len()));
        }
        let class_names = match &args.class_names {
            Some(names) => Some(parse_class_names(names, kind)?),
            None => None,
        };
        if args.labels.is_some() && !matches!(kind, LayoutKind::Flat | LayoutKind::Idx) {
            return Err(ResolveError::LabelsUnread);
        }
        let layout = Layout::of_kind(kind, srcs.is_empty(), args)?;
        let source_arg = match &layout {
            Layout::Idx { images, .. } => images.display().to_string(),
            _ => srcs
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" "),
        };
        // A gzip-compressed archive is decompressed next to the output.
        let temp_dir = std::path::absolute(&args.out)
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf));
        let options = ScanOptions {
            classes_from: args.classes_from.clone(),
            class_names,
            temp_dir,
        };
        Ok(Resolved {
            srcs,
            layout,
            source_arg,
            options,
        })
    }

    /// The layout of `kind` with the files it reads from `args`; `no_src`: no `--src`
    /// was given.
    fn of_kind(kind: LayoutKind, no_src: bool, args: &SourceArgs) -> Result<Layout, ResolveError> {
        let src_missing = match kind {
            LayoutKind::Tar => Some(ResolveError::TarNeedsSrc),
            LayoutKind::WebDataset => Some(ResolveError::WebDatasetNeedsSrc),
            LayoutKind::Parquet => Some(ResolveError::ParquetNeedsSrc),
            LayoutKind::ImageFolder | LayoutKind::Flat => Some(ResolveError::SrcRequired),
            LayoutKind::Idx => None,
        };
        if let (true, Some(e)) = (no_src, src_missing) {
            return Err(e);
        }
        Ok(match kind {
            LayoutKind::Tar => Layout::Tar,
            LayoutKind::WebDataset => Layout::WebDataset,
            LayoutKind::Parquet => Layout::Parquet,
            LayoutKind::ImageFolder => Layout::ImageFolder,
            LayoutKind::Flat => Layout::Flat {
                labels: args.labels.clone().ok_or(ResolveError::FlatNeedsLabels)?,
                synsets: args.synsets.clone(),
            },
            LayoutKind::Idx => Layout::Idx {
                images: args.images.clone().ok_or(ResolveError::IdxNeedsImages)?,
                labels: args.labels.clone(),
            },
        })
    }
}

/// The layout of sources given without `--layout` (see [`Layout::resolve`]).
fn infer(srcs: &[PathBuf], args: &SourceArgs) -> LayoutKind {
    let archives = !srcs.is_empty() && srcs.iter().all(|p| p.is_file() && tar_name(p).is_some());
    match (archives, &args.labels) {
        (true, Some(_)) => LayoutKind::Flat,
        (true, None) if super::webdataset::looks_like_webdataset(&srcs[0]) => {
            LayoutKind::WebDataset
        }
        (true, None) => LayoutKind::Tar,
        (false, None) if folder_of_webdataset_shards(srcs) => LayoutKind::WebDataset,
        (false, _) if is_parquet_source(srcs) => LayoutKind::Parquet,
        (false, _) => LayoutKind::ImageFolder,
    }
}

/// One folder whose first tar archive (by name) holds WebDataset samples.
fn folder_of_webdataset_shards(srcs: &[PathBuf]) -> bool {
    let [dir] = srcs else { return false };
    let Ok(rd) = std::fs::read_dir(dir) else {
        return false;
    };
    let mut tars: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && tar_name(p).is_some())
        .collect();
    tars.sort();
    tars.first()
        .is_some_and(|t| super::webdataset::looks_like_webdataset(t))
}

/// `--class-names` split at commas (names trimmed), for a layout that reads them.
fn parse_class_names(names: &str, kind: LayoutKind) -> Result<Vec<String>, ResolveError> {
    let v: Vec<&str> = names.split(',').map(str::trim).collect();
    if v.iter().any(|n| n.is_empty()) {
        return Err(ResolveError::EmptyClassName(names.to_string()));
    }
    if let Some((_, name)) = v.iter().enumerate().find(|(i, n)| v[..*i].contains(n)) {
        return Err(ResolveError::ClassNameTwice {
            names: names.to_string(),
            name: name.to_string(),
        });
    }
    if !matches!(
        kind,
        LayoutKind::Idx | LayoutKind::WebDataset | LayoutKind::Parquet
    ) {
        return Err(ResolveError::ClassNamesUnread);
    }
    Ok(v.into_iter().map(String::from).collect())
}

/// `--src` values with glob characters that name no file are expanded (the `glob`
/// crate, sorted); a pattern matching nothing is an error.
fn expand_globs(srcs: &[PathBuf]) -> Result<Vec<PathBuf>, ResolveError> {
    let mut out = Vec::new();
    for p in srcs {
        let text = p.to_string_lossy();
        if p.exists() || !text.contains(['*', '?', '[']) {
            out.push(p.clone());
            continue;
        }
        let pattern = text.to_string();
        let mut found: Vec<PathBuf> = glob::glob(&text)
            .map_err(|source| ResolveError::BadGlob {
                pattern: pattern.clone(),
                source,
            })?
            .collect::<Result<_, _>>()
            .map_err(|source| ResolveError::Glob {
                pattern: pattern.clone(),
                source,
            })?;
        found.sort();
        if found.is_empty() {
            return Err(ResolveError::NoMatch(pattern));
        }
        out.extend(found);
    }
    Ok(out)
}

/// Every source a `.parquet` file, or a folder with `.parquet` files and no image files
/// (other files, such as a Hugging Face snapshot's `README.md`, are left alone); a byol
/// dataset (it has `manifest.json`) is not one.
fn is_parquet_source(srcs: &[PathBuf]) -> bool {
    !srcs.is_empty()
        && srcs.iter().all(|p| {
            if p.is_file() {
                return is_parquet_name(p);
            }
            let Ok(rd) = std::fs::read_dir(p) else {
                return false;
            };
            let names: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
            !p.join(MANIFEST).exists()
                && names.iter().any(|n| n.is_file() && is_parquet_name(n))
                && !names.iter().any(|n| has_image_extension(n))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(src: &[&Path]) -> SourceArgs {
        SourceArgs {
            src: src.iter().map(|p| p.to_path_buf()).collect(),
            out: PathBuf::from("/data/out/ds"),
            ..SourceArgs::default()
        }
    }

    fn refused(a: &SourceArgs) -> String {
        Layout::resolve(a).unwrap_err().to_string()
    }

    #[test]
    fn the_layout_is_inferred_from_the_sources() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        let tars = [t.join("a.tar"), t.join("b.TGZ")];
        for p in &tars {
            std::fs::write(p, b"").unwrap();
        }
        let r = Layout::resolve(&args(&[&tars[0], &tars[1]])).unwrap();
        assert_eq!(r.layout.kind(), LayoutKind::Tar);
        let src = tars[0].display().to_string();
        assert_eq!(r.source_arg, format!("{src} {}", tars[1].display()));
        assert_eq!(r.options.temp_dir, Some(PathBuf::from("/data/out")));
        let mut labelled = args(&[&tars[0]]);
        labelled.labels = Some("gt.txt".into());
        let r = Layout::resolve(&labelled).unwrap();
        assert!(matches!(r.layout, Layout::Flat { .. }), "{r:?}");

        // A Hugging Face snapshot: Parquet files beside a README, no images.
        let hf = t.join("hf");
        std::fs::create_dir(&hf).unwrap();
        std::fs::write(hf.join("train.parquet"), b"").unwrap();
        std::fs::write(hf.join("README.md"), b"").unwrap();
        assert_eq!(
            Layout::resolve(&args(&[&hf])).unwrap().layout.kind(),
            LayoutKind::Parquet
        );
        std::fs::write(hf.join("x.jpg"), b"").unwrap();
        assert_eq!(
            Layout::resolve(&args(&[&hf])).unwrap().layout.kind(),
            LayoutKind::ImageFolder
        );

        // IDX takes no --src; the manifest names the image file.
        let mut idx = args(&[]);
        idx.layout = Some(LayoutKind::Idx);
        idx.images = Some("train-images".into());
        let r = Layout::resolve(&idx).unwrap();
        assert_eq!(r.source_arg, "train-images");
        assert!(r.srcs.is_empty());
    }

    #[test]
    fn options_a_layout_does_not_read_are_refused_with_their_message() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        let dataset = t.join("ds");
        std::fs::create_dir(&dataset).unwrap();
        std::fs::write(dataset.join(MANIFEST), b"{}").unwrap();
        assert!(refused(&args(&[&dataset])).contains("already sharded"));
        assert_eq!(
            refused(&args(&[t, t])),
            "2 --src given: several sources are for tar archives, WebDataset shards and Parquet files"
        );
        let mut a = args(&[t]);
        a.class_names = Some("a, ,b".into());
        assert_eq!(
            refused(&a),
            "--class-names \"a, ,b\": a class name is empty"
        );
        a.class_names = Some("a,b,a".into());
        assert_eq!(refused(&a), "--class-names \"a,b,a\": \"a\" is given twice");
        a.class_names = Some("a,b".into());
        assert!(matches!(
            Layout::resolve(&a),
            Err(ResolveError::ClassNamesUnread)
        ));
        a.class_names = None;
        a.labels = Some("l.csv".into());
        a.layout = Some(LayoutKind::Tar);
        assert!(matches!(
            Layout::resolve(&a),
            Err(ResolveError::LabelsUnread)
        ));

        let mut none = args(&[]);
        for (kind, text) in [
            (LayoutKind::Tar, "--layout tar needs --src ARCHIVE.tar"),
            (LayoutKind::ImageFolder, "--src is required"),
            (LayoutKind::Flat, "--src is required"),
            (LayoutKind::Idx, "--layout idx needs --images FILE"),
        ] {
            none.layout = Some(kind);
            assert_eq!(refused(&none), text);
        }
        let mut flat = args(&[t]);
        flat.layout = Some(LayoutKind::Flat);
        assert!(matches!(
            Layout::resolve(&flat),
            Err(ResolveError::FlatNeedsLabels)
        ));
        let glob = t.join("nothing-*.tar");
        assert!(refused(&args(&[&glob])).ends_with("matches no file"));
    }

    #[test]
    fn layout_names_match_the_command_line() {
        use clap::ValueEnum;
        for k in LayoutKind::value_variants() {
            let v = k.to_possible_value().unwrap();
            assert_eq!(v.get_name(), k.name());
        }
    }
}
