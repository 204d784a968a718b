//! Tar archives as a source, read in place (nothing extracted): WebDataset shards
//! ([`scan_webdataset`]), a tar of class folders
//! (`class/xxx.jpg`), or a tar of tars where each inner tar is a class (ImageNet's
//! `ILSVRC2012_img_train.tar`: `n01440764.tar`, …), or a tar of images without folders
//! (unlabeled).
//!
//! A scan reads only the headers (the `tar` crate, seeking past member data; an inner
//! tar is scanned the same way through a window of the archive file) and records where
//! each member's bytes lie in the archive file; the shard workers then read those bytes
//! with positioned reads. Memory is bounded by the item list, not by the archive.
//! A gzip-compressed tar cannot be read at an offset: [`gunzip_to_temp`] first streams
//! it once into a temporary uncompressed tar (deleted when the source is dropped; JPEG
//! members barely compress, so it is about the archive's size), which is then read in
//! place like any other.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use byol_format::shards::Skipped;

use crate::keys::{has_image_extension, key_of};

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
    /// Members not used, with the reason (a path leaving the archive).
    pub skipped: Vec<Skipped>,
    /// Keys spelled with `%XX` escapes (see [`key_of`]).
    pub escaped: Vec<String>,
    /// Members without an image extension.
    pub ignored: u64,
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
            self.out.skipped.push(Skipped {
                key: key_of(path).0,
                reason: "a link member, not followed".into(),
            });
        }
    }

    /// Records one regular-file member at `offset` (in the archive file) under `path`.
    fn member(&mut self, path: &Path, class: Option<String>, offset: u64, size: u64) {
        if !safe(path) {
            self.out.skipped.push(Skipped {
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
            self.out.ignored += 1;
            return;
        }
        if escaped {
            self.out.escaped.push(key.clone());
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

/// Whether `path` starts with gzip's magic bytes.
///
/// # Errors
/// The file cannot be read.
pub fn is_gzip(path: &Path) -> Result<bool, TarError> {
    let mut magic = [0u8; 2];
    let mut f = File::open(path).map_err(|source| TarError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let n = f.read(&mut magic).map_err(|source| TarError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(n == 2 && magic == [0x1f, 0x8b])
}

/// Temporary tars made by this process: removed by the signal handler of `byol-tools`
/// (see [`remove_temporaries`]) when a signal ends the process before they are dropped.
static TEMPORARIES: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Removes every temporary tar this process made (from a signal handler's thread).
pub fn remove_temporaries() {
    let list = TEMPORARIES.lock().unwrap_or_else(|e| e.into_inner());
    for p in list.iter() {
        let _ = std::fs::remove_file(p);
    }
}

const TEMP_PREFIX: &str = ".byol-tools-gunzip-";

/// Removes temporary tars in `dir` left by `byol-tools` processes that no longer run
/// (killed with SIGKILL): their names carry the process id.
fn remove_stale_temporaries(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(TEMP_PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                eprintln!(
                    "byol-tools: removing {}, left by an earlier run that was killed",
                    e.path().display()
                );
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Streams the gzip-compressed `archive` (every member of a multi-member gzip, as
/// `gunzip` does; the `flate2` crate) into a temporary tar in `dir` (made if missing),
/// named `.byol-tools-gunzip-PID-*.tar`, deleted when the returned path is dropped, or
/// by [`remove_temporaries`] on a signal, or by a later run when this process was killed.
///
/// # Errors
/// [`TarError::Gzip`] naming the archive and how many compressed bytes were good for a
/// corrupt or truncated stream; [`TarError::Io`] naming the temporary tar when it cannot
/// be written (a full disk, a read-only folder).
pub fn gunzip_to_temp(archive: &Path, dir: &Path) -> Result<tempfile::TempPath, TarError> {
    use std::io::Write;
    let io_at = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TarError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io_at(dir))?;
    remove_stale_temporaries(dir);
    let f = File::open(archive).map_err(io_at(archive))?;
    let counted = CountingReader {
        inner: BufReader::with_capacity(1 << 20, f),
        n: 0,
    };
    let mut gz = flate2::read::MultiGzDecoder::new(counted);
    let tmp = tempfile::Builder::new()
        .prefix(&format!("{TEMP_PREFIX}{}-", std::process::id()))
        .suffix(".tar")
        .tempfile_in(dir)
        .map_err(io_at(dir))?;
    let (file, path) = tmp.into_parts();
    TEMPORARIES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(path.to_path_buf());
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match gz.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(TarError::Gzip {
                    archive: archive.to_path_buf(),
                    compressed: gz.get_ref().n,
                    detail: e.to_string(),
                })
            }
        };
        // A write error is the temporary tar's (a full disk), not the archive's.
        w.write_all(&buf[..n]).map_err(io_at(&path))?;
    }
    w.flush().map_err(io_at(&path))?;
    Ok(path)
}

/// Counts the bytes read through it (the compressed position of a gzip error).
struct CountingReader<R> {
    inner: R,
    n: u64,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n += k as u64;
        Ok(k)
    }
}

/// Scans `archive` (see the module docs): class folders, inner class tars, or images.
/// Messages name the archive as `name` (the compressed file a temporary tar came from).
///
/// # Errors
/// [`TarError`]: the archive cannot be opened, or is truncated or corrupt (naming the
/// archive and the byte after which it breaks).
pub fn scan(archive: &Path, name: &Path) -> Result<TarScan, TarError> {
    each_member(archive, name, |s, path, offset, size, _| {
        let is_tar = path.extension() == Some(OsStr::new("tar"));
        if is_tar && path.components().count() == 1 && safe(path) {
            let class = key_of(Path::new(path.file_stem().unwrap_or_default())).0;
            return s.inner(&class, offset, size);
        }
        let lower = path.to_string_lossy().to_ascii_lowercase();
        if path.components().count() == 1 && (lower.ends_with(".tar.gz") || lower.ends_with(".tgz"))
        {
            s.out.skipped.push(Skipped {
                key: key_of(path).0,
                reason: "a compressed inner tar is not read: store inner class tars uncompressed"
                    .into(),
            });
            return Ok(());
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
