//! The `flat` layout: a flat folder, or a tar archive of images (ImageNet's
//! `ILSVRC2012_img_val.tar`), plus a label file (see [`super::labels`]).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;

use byol_format::shards::Skipped;

use super::gzip::Archives;
use super::labels::{read_labels, LabelFile, LabelRow};
use super::tar::Latest;
use super::walk::{check_dir, walk, Walked};
use super::{
    class_index, Item, LayoutKind, Origin, ScanNotes, ScanOptions, Source, SourceError, Src,
};

/// An image of the source: key, where its bytes are, size.
type File = (String, Src, u64);
/// A labelled image: key, where its bytes are, size, class name.
type Pair = (String, Src, u64, String);

/// Scans `src` (a folder, walked recursively, or a tar archive read in place) and labels
/// its images from `labels`: CSV rows name images by their path relative to the source
/// or by file name (a first row that names no image is a header); an image without a
/// row is skipped with the reason. ILSVRC ground truth labels the images in sorted order.
///
/// # Errors
/// A missing source or label file; a label file that names no image, an image twice, a
/// file name shared by several images, or (ground truth) has another count than the
/// images; a class that `--classes-from`'s dataset lacks.
pub fn scan(
    src: &Path,
    labels: &Path,
    synsets: Option<&Path>,
    opts: &ScanOptions,
) -> Result<Source, SourceError> {
    let (files, mut notes, origin) = if src.is_file() {
        archive_files(src, opts)?
    } else {
        folder_files(src)?
    };
    let (pairs, names) = match read_labels(labels, synsets)? {
        LabelFile::Csv(rows) => csv_pairs(src, labels, &rows, files, &mut notes.skipped)?,
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
            let pairs = files
                .into_iter()
                .zip(ls)
                .map(|((key, src, size), c)| (key, src, size, c))
                .collect();
            (pairs, wnids.into_iter().collect())
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
    Ok(Source::new(LayoutKind::Flat, classes, items, notes, origin))
}

/// The members of the archive `src`, keyed by their paths in it (a later member of the
/// same name replaces an earlier one).
fn archive_files(
    src: &Path,
    opts: &ScanOptions,
) -> Result<(Vec<File>, ScanNotes, Origin), SourceError> {
    let mut archives = Archives::default();
    let path = archives.open(src, opts)?;
    let t = super::tarfile::scan(&path, src)?;
    let mut notes = t.notes;
    let mut latest = Latest::default();
    latest.add(0, t.members, &mut notes.skipped);
    let files = latest
        .into_members()
        .map(|(ai, m)| {
            let src = m.src(ai);
            (m.key, src, m.size)
        })
        .collect();
    Ok((files, notes, Origin::Tar(archives)))
}

/// The image files below the folder `src`, keyed by their paths relative to it.
fn folder_files(src: &Path) -> Result<(Vec<File>, ScanNotes, Origin), SourceError> {
    check_dir(src)?;
    let mut w = Walked::default();
    walk(src, src, &mut w, &mut HashSet::new())?;
    let files = w
        .files
        .into_iter()
        .map(|(k, p, n)| (k, Src::File(p), n))
        .collect();
    Ok((files, w.notes, Origin::Files))
}

/// Finds the image a CSV row names: its key, or its file name when only one image has
/// that name.
struct Matcher<'a> {
    files: &'a [File],
    by_key: BTreeMap<&'a str, usize>,
    by_name: BTreeMap<String, Vec<usize>>,
}

impl<'a> Matcher<'a> {
    fn new(files: &'a [File]) -> Matcher<'a> {
        let by_key = files
            .iter()
            .enumerate()
            .map(|(i, f)| (f.0.as_str(), i))
            .collect();
        let mut by_name: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            let name = f.0.rsplit('/').next().unwrap_or_default().to_string();
            by_name.entry(name).or_default().push(i);
        }
        Matcher {
            files,
            by_key,
            by_name,
        }
    }

    fn find(&self, k: &str) -> Option<usize> {
        self.by_key
            .get(k)
            .copied()
            .or_else(|| match self.by_name.get(k) {
                Some(v) if v.len() == 1 => Some(v[0]),
                _ => None,
            })
    }

    /// Refuses a row whose key is no image's path but the file name of several.
    fn refuse_ambiguous(&self, labels: &Path, rows: &[LabelRow]) -> Result<(), SourceError> {
        for r in rows {
            if self.by_key.contains_key(r.key.as_str()) {
                continue;
            }
            if let Some(v) = self.by_name.get(&r.key).filter(|v| v.len() > 1) {
                return Err(SourceError::Labels {
                    path: labels.to_path_buf(),
                    line: r.line as usize,
                    msg: format!(
                        "{:?} names {} files ({}); give the path relative to the source",
                        r.key,
                        v.len(),
                        v.iter()
                            .map(|&i| self.files[i].0.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                });
            }
        }
        Ok(())
    }

    /// The class (and line) of every image from the data rows; rows that name no image
    /// are warned about, and refused when no row names one.
    fn assign(
        &self,
        src: &Path,
        labels: &Path,
        data: &[LabelRow],
    ) -> Result<Vec<Option<(String, u64)>>, SourceError> {
        let mut label_of: Vec<Option<(String, u64)>> = vec![None; self.files.len()];
        let mut unmatched: Vec<u64> = Vec::new();
        for r in data {
            let Some(i) = self.find(&r.key) else {
                unmatched.push(r.line);
                continue;
            };
            if let Some((_, first)) = &label_of[i] {
                return Err(SourceError::Labels {
                    path: labels.to_path_buf(),
                    line: r.line as usize,
                    msg: format!(
                        "{:?} is labelled twice (first on line {first})",
                        self.files[i].0
                    ),
                });
            }
            label_of[i] = Some((r.class.clone(), r.line));
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
        Ok(label_of)
    }
}

/// Labels `files` from CSV `rows`: the labelled images and the class names; an image
/// without a row is skipped with the reason.
fn csv_pairs(
    src: &Path,
    labels: &Path,
    rows: &[LabelRow],
    files: Vec<File>,
    skipped: &mut Vec<Skipped>,
) -> Result<(Vec<Pair>, BTreeSet<String>), SourceError> {
    let m = Matcher::new(&files);
    m.refuse_ambiguous(labels, rows)?;
    // A first row that names no image is a header (`key,class`, `filename,label`, any
    // spelling); it is never data.
    let data = match rows.first() {
        Some(r) if m.find(&r.key).is_none() => &rows[1..],
        _ => rows,
    };
    let label_of = m.assign(src, labels, data)?;
    let mut names = BTreeSet::new();
    let mut pairs = Vec::new();
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
    Ok((pairs, names))
}
