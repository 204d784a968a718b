//! Keys and image extensions: how a file or archive member's path becomes a row's
//! `key`, and which names count as images. Shared by the folder and tar sources.

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
