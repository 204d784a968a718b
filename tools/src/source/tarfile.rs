//! Reading tar archives in place (nothing extracted): a tar of class folders
//! (`class/xxx.jpg`), a tar of tars where each inner tar is a class (ImageNet's
//! `ILSVRC2012_img_train.tar`: `n01440764.tar`, …), a tar of images without folders
//! (unlabeled), and WebDataset shards ([`scan_webdataset`]).
//!
//! A scan reads only the headers (the `tar` crate, seeking past member data; an inner
//! tar is scanned the same way through a window of the archive file) and records where
//! each member's bytes lie in the archive file; the shard workers then read those bytes
//! with positioned reads ([`read_member`]). Memory is bounded by the item list, not by
//! the archive. Gzip-compressed archives are first decompressed by [`super::gzip`].

use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use byol_format::shards::Skipped;

use super::{ScanNotes, Src};
use crate::keys::{has_image_extension, key_of, tar_name, TarName};

/// Why an archive cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{archive}: corrupt or truncated gzip stream after {compressed} compressed bytes ({detail}); nothing was sharded")]
    Gzip {
        archive: PathBuf,
        compressed: u64,
        detail: String,
    },
    #[error(
        "{archive}: truncated or corrupt tar after byte {good_to} ({detail}); nothing was sharded"
    )]
    Truncated {
        archive: PathBuf,
        good_to: u64,
        detail: String,
    },
}

/// What a scan found.
#[derive(Debug, Default)]
pub struct TarScan {
    /// Image members in archive order (a later one may repeat an earlier key).
    pub members: Vec<TarMember>,
    /// Members without an image extension or hidden (ignored), members not used with
    /// the reason (a path leaving the archive, a link), and escaped keys.
    pub notes: ScanNotes,
    /// Top-level folders and inner tars (class names), members or not: an empty class
    /// folder or inner tar is still a class, as an empty class folder on disk is.
    pub dirs: std::collections::BTreeSet<String>,
    /// Members named `*.cls` (a hint that the archive is a WebDataset shard).
    pub cls_members: u64,
}

/// Bytes `[start, start + len)` of a file, as a seekable reader (an inner tar).
struct Window {
    file: BufReader<File>,
    start: u64,
    len: u64,
    pos: u64,
}

impl Read for Window {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        if n == 0 {
            return Ok(0);
        }
        let got = self.file.read(&mut buf[..n])?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl Seek for Window {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let target = match to {
            SeekFrom::Start(p) => p as i128,
            SeekFrom::Current(d) => self.pos as i128 + d as i128,
            SeekFrom::End(d) => self.len as i128 + d as i128,
        };
        if target < 0 {
            return Err(std::io::Error::other(
                "seek before the start of an inner tar",
            ));
        }
        self.pos = target as u64;
        self.file.seek(SeekFrom::Start(self.start + self.pos))?;
        Ok(self.pos)
    }
}

/// One image member: key (`%XX`-escaped where not UTF-8), the class folder or inner
/// tar it belongs to (`None`: at the top of the archive), and where its bytes are in
/// the archive file.
#[derive(Debug, Clone)]
pub struct TarMember {
    pub key: String,
    pub class: Option<String>,
    pub offset: u64,
    pub size: u64,
}

impl TarMember {
    /// Where this member's bytes are, as an item of archive `archive` of the source.
    pub fn src(&self, archive: usize) -> Src {
        Src::Tar {
            archive,
            offset: self.offset,
            size: self.size,
        }
    }
}

/// Whether a member path stays inside the archive's tree (no `..`, not absolute).
fn safe(path: &Path) -> bool {
    path.components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// The path a member names, without a leading `./`.
fn clean(bytes: &[u8]) -> std::path::PathBuf {
    Path::new(OsStr::from_bytes(bytes))
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}

struct Scan<'a> {
    archive: &'a Path,
    /// The archive as messages name it (the `.tar.gz` a temporary tar came from).
    name: &'a Path,
    out: TarScan,
    /// Where the last complete member ended (for the truncation message).
    good_to: u64,
}

impl Scan<'_> {
    fn truncated(&self, e: std::io::Error) -> TarError {
        // The tar crate quotes header bytes of a corrupt archive: keep the text printable
        // and short.
        let mut detail: String = e
            .to_string()
            .chars()
            .map(|c| {
                if c.is_control() || c == '\u{FFFD}' {
                    '?'
                } else {
                    c
                }
            })
            .collect();
        if detail.chars().count() > 160 {
            detail = detail.chars().take(160).collect::<String>() + "…";
        }
        TarError::Truncated {
            archive: self.name.to_path_buf(),
            good_to: self.good_to,
            detail,
        }
    }

    /// A link member (symbolic or hard) with an image name is listed as skipped: the
    /// archive's bytes for it are not an image, and following it could leave the archive.
    fn link(&mut self, path: &Path, kind: tar::EntryType) {
        if (kind.is_symlink() || kind.is_hard_link()) && has_image_extension(path) {
            self.out.notes.skipped.push(Skipped {
                key: key_of(path).0,
                reason: "a link member, not followed".into(),
            });
        }
    }

    /// Records one regular-file member at `offset` (in the archive file) under `path`.
    fn member(&mut self, path: &Path, class: Option<String>, offset: u64, size: u64) {
        if !safe(path) {
            self.out.notes.skipped.push(Skipped {
                key: path.display().to_string(),
                reason: "member path leaves the archive (absolute or ..)".into(),
            });
            return;
        }
        let (key, escaped) = key_of(path);
        let hidden = path
            .components()
            .any(|c| c.as_os_str().as_bytes().first() == Some(&b'.'));
        if hidden || !has_image_extension(path) {
            self.out.notes.ignored += 1;
            return;
        }
        if escaped {
            self.out.notes.escaped.push(key.clone());
        }
        self.out.members.push(TarMember {
            key,
            class,
            offset,
            size,
        });
    }

    /// The members of the inner tar (a class) at bytes `[base, base + len)` of the
    /// archive file.
    fn inner(&mut self, class: &str, base: u64, len: u64) -> Result<(), TarError> {
        self.out.dirs.insert(class.to_string());
        let within = |e: std::io::Error| {
            std::io::Error::new(e.kind(), format!("in the inner tar {class}.tar: {e}"))
        };
        let f = File::open(self.archive).map_err(|e| self.truncated(e))?;
        let mut w = Window {
            file: BufReader::with_capacity(1 << 16, f),
            start: base,
            len,
            pos: 0,
        };
        w.seek(SeekFrom::Start(0)).map_err(|e| self.truncated(e))?;
        let mut ar = tar::Archive::new(w);
        let entries = ar
            .entries_with_seek()
            .map_err(|e| self.truncated(within(e)))?;
        for e in entries {
            let e = e.map_err(|e| self.truncated(within(e)))?;
            let path = clean(&e.path_bytes());
            if !e.header().entry_type().is_file() {
                self.link(&Path::new(class).join(&path), e.header().entry_type());
                continue;
            }
            let (offset, size) = (base + e.raw_file_position(), e.size());
            if e.raw_file_position() + size > len {
                let err = std::io::Error::other(format!(
                    "the inner tar {class}.tar ends inside its member {}",
                    path.display()
                ));
                return Err(self.truncated(err));
            }
            self.member(
                &Path::new(class).join(&path),
                Some(class.to_string()),
                offset,
                size,
            );
        }
        Ok(())
    }
}

/// Visits every regular-file member of `archive` with (its path, the offset of its
/// data in the file, its size, a reader of its data), seeking past data the visitor
/// does not read.
fn each_member(
    archive: &Path,
    name: &Path,
    mut visit: impl FnMut(&mut Scan, &Path, u64, u64, &mut dyn Read) -> Result<(), TarError>,
) -> Result<TarScan, TarError> {
    let io_err = |source| TarError::Io {
        path: name.to_path_buf(),
        source,
    };
    let f = File::open(archive).map_err(io_err)?;
    let mut s = Scan {
        archive,
        name,
        out: TarScan::default(),
        good_to: 0,
    };
    let len = f.metadata().map_err(io_err)?.len();
    let mut ar = tar::Archive::new(BufReader::with_capacity(1 << 16, f));
    let entries = ar.entries_with_seek().map_err(|e| s.truncated(e))?;
    // Where the last entry's data ends, in 512-byte blocks: the end-of-archive marker
    // (two zero blocks) must follow it.
    let mut last_end = 0u64;
    for e in entries {
        let mut e = e.map_err(|e| s.truncated(e))?;
        last_end = (e.raw_file_position() + e.size()).div_ceil(512) * 512;
        let kind = e.header().entry_type();
        if kind.is_dir() {
            let path = clean(&e.path_bytes());
            let mut comps = path.components();
            if let (Some(c), None) = (comps.next(), comps.next()) {
                let name = key_of(Path::new(c.as_os_str())).0;
                if !name.starts_with('.') {
                    s.out.dirs.insert(name);
                }
            }
            continue;
        }
        if !kind.is_file() {
            s.link(&clean(&e.path_bytes()), kind);
            continue;
        }
        let path = clean(&e.path_bytes());
        let (offset, size) = (e.raw_file_position(), e.size());
        if offset + size > len {
            let e = std::io::Error::other(format!(
                "member {} needs bytes up to {}, the file has {len}",
                path.display(),
                offset + size
            ));
            return Err(s.truncated(e));
        }
        visit(&mut s, &path, offset, size, &mut e)?;
        s.good_to = offset + size;
    }
    if len < last_end + 1024 {
        let e = std::io::Error::other(format!(
            "no end-of-archive marker after the last entry (the file ends at byte {len})"
        ));
        return Err(s.truncated(e));
    }
    // Seeking past data never fails: a member whose bytes end beyond the file means the
    // archive was cut.
    if let Some(m) = s.out.members.iter().find(|m| m.offset + m.size > len) {
        let e = std::io::Error::other(format!("member {} ends beyond the end of the file", m.key));
        return Err(s.truncated(e));
    }
    Ok(s.out)
}

/// Scans `archive` (see the module docs): class folders, inner class tars, or images.
/// Messages name the archive as `name` (the compressed file a temporary tar came from).
///
/// # Errors
/// [`TarError`]: the archive cannot be opened, or is truncated or corrupt (naming the
/// archive and the byte after which it breaks).
pub fn scan(archive: &Path, name: &Path) -> Result<TarScan, TarError> {
    each_member(archive, name, |s, path, offset, size, _| {
        let top = path.components().count() == 1;
        match tar_name(path) {
            Some(TarName::Plain) if top && safe(path) => {
                let class = key_of(Path::new(path.file_stem().unwrap_or_default())).0;
                return s.inner(&class, offset, size);
            }
            Some(TarName::Gzip) if top => {
                s.out.notes.skipped.push(Skipped {
                    key: key_of(path).0,
                    reason:
                        "a compressed inner tar is not read: store inner class tars uncompressed"
                            .into(),
                });
                return Ok(());
            }
            _ => {}
        }
        if path.extension() == Some(OsStr::new("cls")) {
            s.out.cls_members += 1;
        }
        let mut comps = path.components();
        let class = match (comps.next(), comps.next()) {
            (Some(c), Some(_)) => Some(key_of(Path::new(c.as_os_str())).0),
            _ => None,
        };
        s.member(path, class, offset, size);
        Ok(())
    })
}

/// A WebDataset sample's key: the member path up to the first `.` of its file name
/// (`a/000001.seg.png` → `a/000001`).
pub fn webdataset_key(member_key: &str) -> &str {
    let start = member_key.rfind('/').map_or(0, |i| i + 1);
    match member_key[start..].find('.') {
        Some(d) => &member_key[..start + d],
        None => member_key,
    }
}

/// Scans a WebDataset shard: image members as in [`scan`] (without classes), and the
/// text of every `KEY.cls` member by sample key (trimmed; at most 1 KiB read).
///
/// # Errors
/// As [`scan`].
pub fn scan_webdataset(
    archive: &Path,
    name: &Path,
) -> Result<(TarScan, std::collections::BTreeMap<String, String>), TarError> {
    let mut labels = std::collections::BTreeMap::new();
    let t = each_member(archive, name, |s, path, offset, size, data| {
        if path.extension() == Some(OsStr::new("cls")) {
            let mut text = String::new();
            data.take(1024)
                .read_to_string(&mut text)
                .map_err(|e| s.truncated(e))?;
            let key = key_of(path).0;
            labels.insert(webdataset_key(&key).to_string(), text.trim().to_string());
            return Ok(());
        }
        s.member(path, None, offset, size);
        Ok(())
    })?;
    Ok((t, labels))
}

/// The bytes of a member: `size` bytes at `offset` of `archive` (a positioned read).
///
/// # Errors
/// The archive cannot be opened or ends before the member does.
pub fn read_member(archive: &Path, offset: u64, size: u64) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let f = File::open(archive)?;
    let mut buf = vec![0u8; size as usize];
    f.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}
