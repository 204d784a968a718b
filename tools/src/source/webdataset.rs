//! The `webdataset` layout: WebDataset shards (`.tar` files, or folders of them), read
//! in place; samples grouped by key, `KEY.jpg|png|…` the image, `KEY.cls` the label.

use std::collections::BTreeMap;
use std::path::PathBuf;

use byol_format::shards::Skipped;

use super::gzip::Archives;
use super::tarfile::{scan_webdataset as scan_shard, webdataset_key, TarMember};
use super::{
    files_and_folders, with_classes_from, Item, LayoutKind, Origin, ScanNotes, ScanOptions, Source,
    SourceError,
};
use crate::keys::tar_name;

/// Scans the shards: the files given and the tar archives of the folders given (sorted
/// by name). One row per sample key with an image member; its label is the integer in
/// `KEY.cls`, the class names `--class-names` (index = label) or the numbers `0..=max`.
/// Without any `.cls` every sample is unlabeled; with some, a sample without one, or
/// with text that is not a label (or a label beyond `--class-names`), is skipped with
/// the reason. A key seen again in a later shard replaces the earlier sample (skipped
/// with the reason).
///
/// # Errors
/// A missing source, a folder without shards, an unreadable or truncated shard; a class
/// that `--classes-from`'s dataset lacks.
pub fn scan(srcs: &[PathBuf], opts: &ScanOptions) -> Result<Source, SourceError> {
    let archives = files_and_folders(
        srcs,
        |p| tar_name(p).is_some(),
        "WebDataset shards (.tar, .tar.gz or .tgz files)",
    )?;
    let mut read_from = Archives::default();
    for a in &archives {
        read_from.open(a, opts)?;
    }
    let mut notes = ScanNotes::default();
    // sample key → (archive, member)
    let mut samples: BTreeMap<String, (usize, TarMember)> = BTreeMap::new();
    let mut labels: BTreeMap<String, String> = BTreeMap::new();
    for (ai, (a, path)) in archives.iter().zip(&read_from.paths).enumerate() {
        let (t, l) = scan_shard(path, a)?;
        notes.absorb(t.notes);
        labels.extend(l);
        for m in t.members {
            let key = webdataset_key(&m.key).to_string();
            if let Some((_, old)) = samples.insert(key.clone(), (ai, m)) {
                notes.skipped.push(Skipped {
                    key: key.clone(),
                    reason: format!(
                        "{} replaced by a later image of the same sample (member or shard)",
                        old.key
                    ),
                });
            }
        }
    }
    let mut items = Vec::new();
    let mut max_label = -1i32;
    for (key, (ai, m)) in samples {
        let label = match label_of(&key, &labels, opts) {
            Ok(label) => label,
            Err(reason) => {
                notes.skipped.push(Skipped { key, reason });
                continue;
            }
        };
        max_label = max_label.max(label);
        items.push(Item {
            key,
            label,
            src: m.src(ai),
            size: m.size,
        });
    }
    let classes: Vec<String> = match &opts.class_names {
        Some(names) => names.clone(),
        None => (0..=max_label).map(|n| n.to_string()).collect(),
    };
    let classes = with_classes_from(classes, &mut items, opts)?;
    let origin = Origin::Tar(read_from);
    Ok(Source::new(
        LayoutKind::WebDataset,
        classes,
        items,
        notes,
        origin,
    ))
}

/// The label of sample `key` from the `.cls` texts (-1 when no sample has one), or why
/// the sample is skipped.
fn label_of(
    key: &str,
    labels: &BTreeMap<String, String>,
    opts: &ScanOptions,
) -> Result<i32, String> {
    if labels.is_empty() {
        return Ok(-1);
    }
    let Some(text) = labels.get(key) else {
        return Err("no .cls label".into());
    };
    let names = opts.class_names.as_ref();
    match text.parse::<i32>() {
        Ok(n) if n >= 0 && names.is_some_and(|c| n as usize >= c.len()) => Err(format!(
            ".cls label {n} is beyond the {} --class-names",
            names.map_or(0, |c| c.len())
        )),
        Ok(n) if n >= 0 => Ok(n),
        _ => Err(format!(
            ".cls holds {text:?}, not a label (an integer >= 0)"
        )),
    }
}
