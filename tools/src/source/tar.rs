//! The `tar` layout: tar archives read in place ([`super::tarfile`]; gzip-compressed
//! ones through a temporary tar, [`super::gzip`]): class folders, a tar of class tars,
//! or images without folders. With a label file, the `flat` layout reads an archive.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use byol_format::shards::Skipped;

use super::gzip::Archives;
use super::tarfile::TarMember;
use super::{class_index, Item, LayoutKind, Origin, ScanNotes, ScanOptions, Source, SourceError};

/// Image members by key, with the index of the archive each is in: a later member of
/// the same name in the same archive replaces an earlier one (tar's rule), which is
/// listed as skipped.
#[derive(Default)]
pub(super) struct Latest(BTreeMap<String, (usize, TarMember)>);

impl Latest {
    /// Adds the `members` of archive `archive`; replaced ones go to `skipped`.
    pub(super) fn add(
        &mut self,
        archive: usize,
        members: Vec<TarMember>,
        skipped: &mut Vec<Skipped>,
    ) {
        for m in members {
            if let Some((_, old)) = self.0.insert(m.key.clone(), (archive, m)) {
                skipped.push(Skipped {
                    key: old.key,
                    reason: "replaced by a later member of the same name".into(),
                });
            }
        }
    }

    /// (archive, member) in key order.
    pub(super) fn into_members(self) -> impl Iterator<Item = (usize, TarMember)> {
        self.0.into_values()
    }
}

/// Scans `archives` in order: with class folders or inner tars, members outside them
/// belong to no class and are ignored, as files next to class folders are; without any,
/// every image is unlabeled. Class folders and inner tars without images are classes
/// too, as on disk. With several archives, keys (of rows and of skipped members) start
/// with the archive's name relative to the archives' common folder.
///
/// # Errors
/// A missing, unreadable, truncated or corrupt archive (naming it); a class that
/// `--classes-from`'s dataset lacks.
pub fn scan(archives: &[PathBuf], opts: &ScanOptions) -> Result<Source, SourceError> {
    let mut read_from = Archives::default();
    let mut latest = Latest::default();
    let mut notes = ScanNotes::default();
    let mut dirs: BTreeSet<String> = BTreeSet::new();
    let mut cls_members = 0;
    let names = super::relative_names(archives);
    for (ai, (archive, name)) in archives.iter().zip(&names).enumerate() {
        let path = read_from.open(archive, opts)?;
        let mut t = super::tarfile::scan(&path, archive)?;
        dirs.extend(t.dirs);
        cls_members += t.cls_members;
        if archives.len() > 1 {
            // Several archives: keys start with the archive's name, so the same member
            // name in two archives is two images.
            for x in &mut t.notes.skipped {
                x.key = format!("{name}/{}", x.key);
            }
            for m in &mut t.members {
                m.key = format!("{name}/{}", m.key);
            }
        }
        notes.absorb(t.notes);
        latest.add(ai, t.members, &mut notes.skipped);
    }
    if cls_members > 0 {
        eprintln!(
            "byol-tools: note: {cls_members} member(s) named *.cls: if these are WebDataset shards, --layout webdataset reads their labels"
        );
    }
    let members: Vec<(usize, TarMember)> = latest.into_members().collect();
    let labelled = members.iter().any(|(_, m)| m.class.is_some());
    let (classes, index) = if labelled {
        let mut names: BTreeSet<String> = members
            .iter()
            .filter_map(|(_, m)| m.class.clone())
            .collect();
        names.extend(dirs);
        class_index(&names, opts)?
    } else {
        (Vec::new(), BTreeMap::new())
    };
    let mut items = Vec::new();
    for (ai, m) in members {
        let label = match &m.class {
            Some(c) => index[c],
            None if labelled => {
                notes.ignored += 1;
                continue;
            }
            None => -1,
        };
        items.push(Item {
            label,
            src: m.src(ai),
            size: m.size,
            key: m.key,
        });
    }
    let origin = Origin::Tar(read_from);
    Ok(Source::new(LayoutKind::Tar, classes, items, notes, origin))
}
