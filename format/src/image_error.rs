//! [`ImageError`]: why an image could not be decoded or stored. Outside the `opencv`
//! feature so that the loader's decode-function type names it on every build.

/// Why an image could not be decoded or stored; its text goes into the manifest's
/// `skipped` list and the loader's decode-failure log.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("empty file (0 bytes)")]
    Empty,
    #[error("corrupt JPEG: malformed header")]
    MalformedJpeg,
    #[error("truncated JPEG: no end-of-image marker")]
    TruncatedJpeg,
    #[error("corrupt JPEG: header says {header_height}x{header_width}, decoded {height}x{width}")]
    JpegSizeMismatch {
        header_height: u32,
        header_width: u32,
        height: i32,
        width: i32,
    },
    /// Refused before decoding: a possible decompression bomb.
    #[error("{}", too_large(*.width, *.height, *.reduce, *.limit))]
    TooLarge {
        width: u64,
        height: u64,
        /// DCT scale denominator the decode would use (1, 2, 4, 8).
        reduce: u64,
        limit: u64,
    },
    #[error("cannot decode: corrupt or not an image")]
    Undecodable,
    /// The image decodes to another size than the one its shard row records.
    #[error("decodes to {height}x{width}, recorded {recorded_height}x{recorded_width}")]
    SizeMismatch {
        height: i32,
        width: i32,
        recorded_height: i32,
        recorded_width: i32,
    },
    #[error("{len} bytes for a {height}x{width} image")]
    BufferSize { len: usize, height: i32, width: i32 },
    #[error("{0} encode failed")]
    EncodeFailed(&'static str),
    /// OpenCV's message.
    #[error("OpenCV: {0}")]
    OpenCv(String),
}

fn too_large(w: u64, h: u64, r: u64, limit: u64) -> String {
    let px = h.div_ceil(r) * w.div_ceil(r);
    format!(
        "{w}x{h} pixels ({:.0} Mpx{}) exceeds the decode limit of {:.0} Mpx \
         (a possible decompression bomb; raise it with --max-pixels)",
        (h * w) as f64 / 1e6,
        if r > 1 {
            format!(", {:.0} Mpx at 1/{r} scale", px as f64 / 1e6)
        } else {
            String::new()
        },
        limit as f64 / 1e6
    )
}
