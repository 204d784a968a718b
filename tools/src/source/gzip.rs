//! Gzip-compressed tars: a gzip stream cannot be read at an offset, so
//! [`gunzip_to_temp`] first streams it once into a temporary uncompressed tar (deleted
//! when the source is dropped; JPEG members barely compress, so it is about the
//! archive's size), which is then read in place like any other. [`Archives`] holds the
//! archives a tar-based source reads, temporaries included.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use super::tarfile::TarError;
use super::{ScanOptions, SourceError};

/// The archives a tar-based source ([`super::Origin::Tar`]) reads its items from.
#[derive(Debug, Default)]
pub struct Archives {
    /// The files read in place, by [`super::Src::Tar`]'s `archive` index: the archive
    /// itself, or the temporary tar of a gzip-compressed one.
    pub paths: Vec<PathBuf>,
    /// Temporary uncompressed tars of gzip-compressed archives (deleted on drop).
    pub temps: Vec<tempfile::TempPath>,
}

impl Archives {
    /// Adds `archive`, ready to read in place: the file itself, or (gzip) a temporary
    /// uncompressed copy in `opts.temp_dir` (default: the archive's folder). Returns the
    /// path to read.
    ///
    /// # Errors
    /// A missing archive, a folder, an unreadable or corrupt gzip stream, or a temporary
    /// tar that cannot be written.
    pub fn open(&mut self, archive: &Path, opts: &ScanOptions) -> Result<PathBuf, SourceError> {
        if !archive.exists() {
            return Err(SourceError::Missing(archive.to_path_buf()));
        }
        if archive.is_dir() {
            return Err(SourceError::Invalid(format!(
                "{} is a folder; a tar source is an archive file",
                archive.display()
            )));
        }
        if !is_gzip(archive)? {
            self.paths.push(archive.to_path_buf());
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
        let tmp = gunzip_to_temp(archive, &dir)?;
        let path = tmp.to_path_buf();
        self.temps.push(tmp);
        self.paths.push(path.clone());
        Ok(path)
    }
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
