//! The `idx` layout: IDX files (MNIST, Fashion-MNIST), raw or gzip-compressed: an image
//! array `[n, rows, cols]` and an optional label array `[n]`. Also reachable as
//! `byol_tools::idx`.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::{Item, LayoutKind, Origin, ScanNotes, ScanOptions, Source, SourceError, Src};

/// Why an IDX file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum IdxError {
    #[error("reading {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
}

/// An IDX array of unsigned bytes.
#[derive(Debug, Clone)]
pub struct IdxU8 {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

impl IdxU8 {
    /// Number of items (the first dimension).
    pub fn len(&self) -> usize {
        self.dims.first().copied().unwrap_or(0)
    }

    /// Whether the array holds no items.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes per item (product of the other dimensions).
    pub fn item_size(&self) -> usize {
        self.dims[1..].iter().product()
    }

    /// The bytes of item `i`.
    pub fn item(&self, i: usize) -> &[u8] {
        let n = self.item_size();
        &self.data[i * n..(i + 1) * n]
    }
}

/// Reads an IDX file of type unsigned byte (0x08), gzip or raw.
///
/// # Errors
/// The file cannot be read, is not gzip/raw IDX of unsigned bytes, or is truncated.
pub fn read_idx_u8(path: &Path) -> Result<IdxU8, IdxError> {
    let io = |source| IdxError::Io {
        path: path.to_path_buf(),
        source,
    };
    let fmt = |msg: String| IdxError::Format {
        path: path.to_path_buf(),
        msg,
    };
    let raw = std::fs::read(path).map_err(io)?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(io)?;
        out
    } else {
        raw
    };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(fmt("not an IDX file (bad magic)".into()));
    }
    if bytes[2] != 0x08 {
        return Err(fmt(format!(
            "IDX element type 0x{:02x} is not unsigned byte (0x08)",
            bytes[2]
        )));
    }
    let ndim = bytes[3] as usize;
    if ndim == 0 || bytes.len() < 4 + 4 * ndim {
        return Err(fmt("truncated IDX header".into()));
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|k| {
            let o = 4 + 4 * k;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let n: usize = dims.iter().product();
    let start = 4 + 4 * ndim;
    if bytes.len() - start != n {
        return Err(fmt(format!(
            "dims {dims:?} need {n} bytes of data, file has {}",
            bytes.len() - start
        )));
    }
    Ok(IdxU8 {
        dims,
        data: bytes[start..].to_vec(),
    })
}

/// Reads the IDX `images` (and `labels`): one unlabeled or labelled item per image,
/// keyed `idx:N`; the classes are `class_names` (at least as many as the largest label
/// needs) or the numbers `0..=max`.
///
/// # Errors
/// A missing or unreadable file, an image array that is not `[n, rows, cols]`, a label
/// array that is not `[n]`, or too few class names.
pub fn scan(
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
        Some(p) => Some(read_labels(p, images, imgs.len())?),
        None => None,
    };
    let classes = match &lbls {
        None => Vec::new(),
        Some(l) => class_names(l, opts)?,
    };
    let items = (0..imgs.len())
        .map(|i| Item {
            key: format!("idx:{i}"),
            label: lbls.as_ref().map(|l| l[i] as i32).unwrap_or(-1),
            src: Src::Idx(i),
            size: 0,
        })
        .collect();
    let notes = ScanNotes::default();
    Ok(Source::new(
        LayoutKind::Idx,
        classes,
        items,
        notes,
        Origin::Idx(imgs),
    ))
}

/// The labels at `path`: one per image of `images` (`n` of them).
fn read_labels(path: &Path, images: &Path, n: usize) -> Result<Vec<u8>, SourceError> {
    let l = read_idx_u8(path)?;
    if l.dims.len() != 1 || l.len() != n {
        return Err(SourceError::Invalid(format!(
            "{}: {} labels (dims {:?}) for {} images in {}",
            path.display(),
            l.len(),
            l.dims,
            n,
            images.display()
        )));
    }
    Ok(l.data)
}

/// `--class-names`, or the numbers `0..=max label`.
fn class_names(labels: &[u8], opts: &ScanOptions) -> Result<Vec<String>, SourceError> {
    let n = labels
        .iter()
        .copied()
        .max()
        .map(|m| m as usize + 1)
        .unwrap_or(0);
    match &opts.class_names {
        Some(names) if names.len() >= n => Ok(names.clone()),
        Some(names) => Err(SourceError::Invalid(format!(
            "{} class names given but labels go up to {}",
            names.len(),
            n - 1
        ))),
        None => Ok((0..n).map(|i| i.to_string()).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_raw_and_gzip_and_rejects_bad_sizes() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut b = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3];
        b.extend(0u8..12);
        let raw = dir.path().join("a-idx3-ubyte");
        std::fs::write(&raw, &b).expect("write");
        let a = read_idx_u8(&raw).expect("raw");
        assert_eq!(a.dims, vec![2, 2, 3]);
        assert_eq!(a.item(1), &[6, 7, 8, 9, 10, 11]);

        let gz = dir.path().join("a-idx3-ubyte.gz");
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&b).expect("gz");
        std::fs::write(&gz, e.finish().expect("gz")).expect("write");
        assert_eq!(read_idx_u8(&gz).expect("gz").data, a.data);

        std::fs::write(&raw, &b[..b.len() - 1]).expect("write");
        let err = read_idx_u8(&raw).unwrap_err().to_string();
        assert!(
            err.contains("a-idx3-ubyte") && err.contains("need 12 bytes"),
            "{err}"
        );
    }
}
