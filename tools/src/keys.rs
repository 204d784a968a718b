//! Keys and file names: how a file or archive member's path becomes a row's `key`, and
//! which names count as images, tar archives and Parquet files. Shared by every source
//! and by layout inference.

use std::path::Path;

/// Extensions (lower case) of files that are looked at; everything else is ignored.
pub const IMAGE_EXTENSIONS: &[&str] = &[
    "jpg", "jpeg", "jpe", "jfif", "png", "bmp", "dib", "tif", "tiff", "webp", "pbm", "pgm", "ppm",
    "pnm", "pxm", "jp2", "sr", "ras", "exr", "hdr", "pic",
];

/// Whether `p` has one of the [`IMAGE_EXTENSIONS`] (any case).
pub fn has_image_extension(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}

/// What a file name says a tar archive is: [`tar_name`]'s answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TarName {
    /// `NAME.tar`: read in place.
    Plain,
    /// `NAME.tar.gz` or `NAME.tgz`: gzip-compressed (decompressed once into a temporary
    /// tar; refused as an inner class tar).
    Gzip,
}

/// The one rule for which file names are tar archives: the file name (any case) ends in
/// `.tar` ([`TarName::Plain`]) or `.tar.gz` / `.tgz` ([`TarName::Gzip`]) after at least
/// one other character. `None`: not a tar archive's name.
pub fn tar_name(p: &Path) -> Option<TarName> {
    let name = p.file_name()?.to_string_lossy().to_ascii_lowercase();
    let has = |suffix: &str| name.len() > suffix.len() && name.ends_with(suffix);
    if has(".tar") {
        Some(TarName::Plain)
    } else if has(".tar.gz") || has(".tgz") {
        Some(TarName::Gzip)
    } else {
        None
    }
}

/// Whether `p` is named as a Parquet file (`*.parquet`).
pub fn is_parquet_name(p: &Path) -> bool {
    p.extension().is_some_and(|e| e == "parquet")
}

/// A path relative to a source root as a `key`: its components joined by `/`. A key
/// whose path is valid UTF-8 is that text. A path with a component that is not valid
/// UTF-8 (Latin-1 names from old archives, say) is spelled with every byte outside
/// UTF-8, and every `%`, of each component written `%XX`; such keys are listed in the
/// manifest's `escaped_keys`, and [`unescape_key`] turns them back into the bytes.
pub fn key_of(rel: &Path) -> (String, bool) {
    use std::os::unix::ffi::OsStrExt;
    let parts: Vec<&std::ffi::OsStr> = rel.components().map(|c| c.as_os_str()).collect();
    if let Some(t) = rel.to_str() {
        return (
            parts
                .iter()
                .map(|p| p.to_str().unwrap_or(t))
                .collect::<Vec<_>>()
                .join("/"),
            false,
        );
    }
    let esc = |b: &[u8]| {
        let mut out = String::new();
        let mut rest = b;
        while !rest.is_empty() {
            match std::str::from_utf8(rest) {
                Ok(t) => {
                    out.push_str(&t.replace('%', "%25"));
                    break;
                }
                Err(e) => {
                    let (ok, bad) = rest.split_at(e.valid_up_to());
                    out.push_str(&std::str::from_utf8(ok).unwrap_or("").replace('%', "%25"));
                    let n = e.error_len().unwrap_or(bad.len());
                    for x in &bad[..n] {
                        out.push_str(&format!("%{x:02X}"));
                    }
                    rest = &bad[n..];
                }
            }
        }
        out
    };
    (
        parts
            .iter()
            .map(|p| esc(p.as_bytes()))
            .collect::<Vec<_>>()
            .join("/"),
        true,
    )
}

/// The path bytes of an escaped key (see [`key_of`]).
pub fn unescape_key(key: &str) -> Vec<u8> {
    let b = key.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_names_are_told_by_one_rule() {
        for (name, want) in [
            ("a.tar", Some(TarName::Plain)),
            ("dir/B.TAR", Some(TarName::Plain)),
            ("a.tar.gz", Some(TarName::Gzip)),
            ("a.TGZ", Some(TarName::Gzip)),
            (".tar", None),
            ("a.tar.bz2", None),
            ("a.jpg", None),
        ] {
            assert_eq!(tar_name(Path::new(name)), want, "{name}");
        }
        assert!(is_parquet_name(Path::new("x/train-00000.parquet")));
        assert!(!is_parquet_name(Path::new("x/README.md")));
    }
}
