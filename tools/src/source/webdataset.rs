//! The `webdataset` layout: WebDataset shards (`.tar` files, or folders of them), read
//! in place; samples grouped by key, `KEY.jpg|png|…` the image, `KEY.cls` the label;
//! [`looks_like_webdataset`] recognises shards given without `--layout`.

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
/// by name). One row per sample with an image member, keyed `SHARD/KEY` (the shard
/// relative to the shards' common folder, so the same key in two shards — a restarted
/// writer — gives two rows); its label is the integer in `KEY.cls`, the class names
/// `--class-names` (index = label) or the numbers `0..=max`. A sample without `.cls` is
/// stored unlabeled; one whose `.cls` is not a label (or beyond `--class-names`) is
/// skipped with the reason, as is an empty image member and a second image of the same
/// sample in one shard; every skipped entry names its shard and member.
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
    let names = super::relative_names(&archives);
    let mut notes = ScanNotes::default();
    // SHARD/KEY → (archive, member)
    let mut samples: BTreeMap<String, (usize, TarMember)> = BTreeMap::new();
    let mut labels: BTreeMap<String, String> = BTreeMap::new();
    for (ai, ((a, path), shard)) in archives
        .iter()
        .zip(&read_from.paths)
        .zip(&names)
        .enumerate()
    {
        let (mut t, l) = scan_shard(path, a)?;
        for x in &mut t.notes.skipped {
            x.key = format!("{shard}/{}", x.key);
        }
        notes.absorb(t.notes);
        labels.extend(l.into_iter().map(|(k, v)| (format!("{shard}/{k}"), v)));
        for m in t.members {
            if m.size == 0 {
                notes.skipped.push(Skipped {
                    key: format!("{shard}/{}", m.key),
                    reason: "an empty image member (0 bytes)".into(),
                });
                continue;
            }
            let key = format!("{shard}/{}", webdataset_key(&m.key));
            if let Some((_, old)) = samples.insert(key.clone(), (ai, m)) {
                notes.skipped.push(Skipped {
                    key: format!("{shard}/{}", old.key),
                    reason: "a second image of the same sample in this shard; the later member is stored".into(),
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

/// The label of sample `key` from the `.cls` texts (-1, unlabeled, when it has none), or
/// why the sample is skipped.
fn label_of(
    key: &str,
    labels: &BTreeMap<String, String>,
    opts: &ScanOptions,
) -> Result<i32, String> {
    let Some(text) = labels.get(key) else {
        return Ok(-1);
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

/// Whether the tar archive at `path` holds WebDataset samples: among its first 256
/// members, an image member with a `.cls` or `.json` member of the same sample key
/// beside it. Compressed archives and unreadable files answer `false` (they are then
/// read as plain tars, whose errors name them).
pub fn looks_like_webdataset(path: &std::path::Path) -> bool {
    use std::collections::BTreeSet;
    if !matches!(tar_name(path), Some(crate::keys::TarName::Plain)) {
        return false;
    }
    let Ok(f) = std::fs::File::open(path) else {
        return false;
    };
    let mut ar = tar::Archive::new(std::io::BufReader::new(f));
    let Ok(entries) = ar.entries() else {
        return false;
    };
    let (mut images, mut sidecars) = (BTreeSet::new(), BTreeSet::new());
    for e in entries.take(256) {
        let Ok(e) = e else { break };
        let Ok(p) = e.path() else { continue };
        let name = p.to_string_lossy().into_owned();
        let key = webdataset_key(&name).to_string();
        match p.extension().and_then(|x| x.to_str()) {
            Some("cls" | "json") => sidecars.insert(key),
            _ if crate::keys::has_image_extension(&p) => images.insert(key),
            _ => false,
        };
        if images.intersection(&sidecars).next().is_some() {
            return true;
        }
    }
    false
}
