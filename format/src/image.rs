//! Turning one source image into the bytes stored in a shard (OpenCV).
//!
//! A source that is already a baseline 8-bit 3-component JPEG, upright (no EXIF
//! rotation) and within `max_side` is stored byte-for-byte after a full decode check.
//! Everything else OpenCV reads (grayscale, CMYK, palette, 16-bit, alpha, PNG, BMP,
//! TIFF, WebP, progressive JPEG, rotated JPEG) is decoded to 8-bit RGB with its EXIF
//! orientation applied, scaled down with area interpolation when its longer side
//! exceeds `max_side`, and re-encoded as a baseline JPEG.

use opencv::core::{Mat, MatTraitConst, Size, Vector, VectorToVec};
use opencv::{imgcodecs, imgproc};
use std::sync::atomic::{AtomicU64, Ordering};

pub use crate::jpeg::{dct_reduction, fit_size, parse_jpeg, JpegInfo};

pub use crate::image_error::ImageError;

/// The stored form of one image.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub bytes: Vec<u8>,
    pub height: i32,
    pub width: i32,
    /// True when the source bytes were kept unchanged.
    pub kept: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct PrepareOptions {
    /// Longer side above which images are scaled down (and so re-encoded).
    pub max_side: Option<u32>,
    /// JPEG quality for re-encoded images.
    pub quality: u8,
}

/// Calls OpenCV's `setNumThreads`: byol-tools parallelises over images itself.
pub fn set_opencv_threads(n: i32) {
    // Failure only means OpenCV keeps its own default; nothing to report.
    let _ignored = opencv::core::set_num_threads(n);
}

/// OpenCV's error as an [`ImageError`] (its message; the code is in it).
pub fn cv_err(e: opencv::Error) -> ImageError {
    ImageError::OpenCv(e.message)
}

/// PIL's `Image.MAX_IMAGE_PIXELS`: images with more pixels are refused as possible
/// decompression bombs (a 70 KB PNG can declare 24000×24000 pixels, 1.7 GB decoded).
pub const DEFAULT_MAX_PIXELS: u64 = 89_478_485;

/// Environment variable that sets the pixel limit of every command (`--max-pixels`
/// overrides it for `byol-tools shard` and `verify`).
pub const MAX_PIXELS_ENV: &str = "BYOL_MAX_PIXELS";

/// `u64::MAX`: not set yet (then [`MAX_PIXELS_ENV`] or the default).
static MAX_PIXELS: AtomicU64 = AtomicU64::new(u64::MAX);

/// Sets the largest image, in decoded pixels, that [`decode_bgr`] decodes in this
/// process (shard, verify and the training loader share it; 0: no limit).
pub fn set_max_pixels(n: u64) {
    MAX_PIXELS.store(n, Ordering::Relaxed);
}

/// The current limit: [`set_max_pixels`], else `$BYOL_MAX_PIXELS`, else
/// [`DEFAULT_MAX_PIXELS`].
pub fn max_pixels() -> u64 {
    let v = MAX_PIXELS.load(Ordering::Relaxed);
    if v != u64::MAX {
        return v;
    }
    let v = std::env::var(MAX_PIXELS_ENV)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(DEFAULT_MAX_PIXELS);
    MAX_PIXELS.store(v, Ordering::Relaxed);
    v
}

/// The EXIF orientation (1–8; 1 when there is none) of an image in any container the
/// `kamadak-exif` crate reads (JPEG — whichever APP1 segment holds the Exif block —
/// TIFF, PNG `eXIf`, WebP, HEIF): the value PIL's `ImageOps.exif_transpose` applies.
///
/// Read leniently, as PIL does: a broken entry or pointer (a dangling GPS or IFD1
/// offset, an odd next-IFD value) costs that entry, not the block, so an intact
/// orientation is still applied; a value outside 1–8 leaves the image as stored.
pub fn exif_orientation(bytes: &[u8]) -> u16 {
    exif::Reader::new()
        .continue_on_error(true)
        .read_from_container(&mut std::io::Cursor::new(bytes))
        .or_else(|e| e.distill_partial_result(|_ignored| {}))
        .ok()
        .and_then(|e| {
            e.get_field(exif::Tag::Orientation, exif::In::PRIMARY)
                .and_then(|f| f.value.get_uint(0))
        })
        .filter(|o| (1..=8).contains(o))
        .map(|o| o as u16)
        .unwrap_or(1)
}

/// Turns stored pixels upright for EXIF orientation `o`, as PIL's `exif_transpose`
/// does (2 mirror, 3 rotate 180°, 4 flip, 5 transpose, 6 rotate 90° clockwise,
/// 7 transverse, 8 rotate 90° counter-clockwise).
///
/// # Errors
/// [`ImageError::OpenCv`] when OpenCV's flip or transpose fails.
pub fn apply_orientation(img: Mat, o: u16) -> Result<Mat, ImageError> {
    use opencv::core::{
        flip, rotate, transpose, ROTATE_180, ROTATE_90_CLOCKWISE, ROTATE_90_COUNTERCLOCKWISE,
    };
    let mut out = Mat::default();
    match o {
        2 => flip(&img, &mut out, 1),
        3 => rotate(&img, &mut out, ROTATE_180),
        4 => flip(&img, &mut out, 0),
        5 => transpose(&img, &mut out),
        6 => rotate(&img, &mut out, ROTATE_90_CLOCKWISE),
        7 => {
            let mut t = Mat::default();
            transpose(&img, &mut t).map_err(cv_err)?;
            rotate(&t, &mut out, ROTATE_180)
        }
        8 => rotate(&img, &mut out, ROTATE_90_COUNTERCLOCKWISE),
        _ => return Ok(img),
    }
    .map_err(cv_err)?;
    Ok(out)
}

/// (height, width) of the stored pixels as the file's header declares them, read
/// without decoding (the `imagesize` crate); `None` for a format it does not know.
pub fn declared_size(bytes: &[u8]) -> Option<(u64, u64)> {
    imagesize::blob_size(bytes)
        .ok()
        .map(|s| (s.height as u64, s.width as u64))
}

/// Decodes to 8-bit BGR, upright: `reduce` is 1, 2, 4 or 8 (libjpeg DCT scaling for
/// JPEG sources); the EXIF orientation is read by [`exif_orientation`] and applied by
/// [`apply_orientation`] (OpenCV's own handling is off: it misses an Exif block that is
/// not the first APP1 segment and ignores other containers).
///
/// # Errors
/// A reason (for the manifest or the loader's fault count) when the image declares more
/// pixels than [`max_pixels`] after `reduce`, or OpenCV cannot decode it.
pub fn decode_bgr(bytes: &[u8], reduce: u32) -> Result<Mat, ImageError> {
    let limit = max_pixels();
    if let Some((h, w)) = declared_size(bytes) {
        let r = reduce.max(1) as u64;
        let px = h.div_ceil(r) * w.div_ceil(r);
        if limit > 0 && px > limit {
            return Err(ImageError::TooLarge {
                width: w,
                height: h,
                reduce: r,
                limit,
            });
        }
    }
    let flags = match reduce {
        2 => imgcodecs::IMREAD_REDUCED_COLOR_2,
        4 => imgcodecs::IMREAD_REDUCED_COLOR_4,
        8 => imgcodecs::IMREAD_REDUCED_COLOR_8,
        _ => imgcodecs::IMREAD_COLOR,
    } | imgcodecs::IMREAD_IGNORE_ORIENTATION;
    let buf = Mat::from_slice(bytes).map_err(cv_err)?;
    let img = imgcodecs::imdecode(&buf, flags).map_err(cv_err)?;
    if img.empty() || img.rows() <= 0 || img.cols() <= 0 {
        return Err(ImageError::Undecodable);
    }
    // OpenCV's TIFF reader (libtiff's RGBA path) turns TIFFs upright itself, even with
    // IMREAD_IGNORE_ORIENTATION; every other container is turned here.
    if is_tiff(bytes) {
        return Ok(img);
    }
    apply_orientation(img, exif_orientation(bytes))
}

/// A TIFF file (`II*\0` or `MM\0*`).
fn is_tiff(b: &[u8]) -> bool {
    b.starts_with(b"II*\0") || b.starts_with(b"MM\0*")
}

/// Area-resizes `img` to `(h, w)` unless it already has that size.
///
/// # Errors
/// [`ImageError::OpenCv`].
pub fn resize_area(img: Mat, h: i32, w: i32) -> Result<Mat, ImageError> {
    if img.rows() == h && img.cols() == w {
        return Ok(img);
    }
    let mut out = Mat::default();
    imgproc::resize(
        &img,
        &mut out,
        Size::new(w, h),
        0.0,
        0.0,
        imgproc::INTER_AREA,
    )
    .map_err(cv_err)?;
    Ok(out)
}

/// Encodes an 8-bit BGR (or gray) image as a baseline JPEG.
///
/// # Errors
/// [`ImageError::OpenCv`] or [`ImageError::EncodeFailed`].
pub fn encode_jpeg(img: &Mat, quality: u8) -> Result<Vec<u8>, ImageError> {
    let mut buf = Vector::<u8>::new();
    let params = Vector::<i32>::from_slice(&[imgcodecs::IMWRITE_JPEG_QUALITY, quality as i32]);
    let ok = imgcodecs::imencode(".jpg", img, &mut buf, &params).map_err(cv_err)?;
    if !ok {
        return Err(ImageError::EncodeFailed("JPEG"));
    }
    Ok(buf.to_vec())
}

/// Encodes an 8-bit single-channel image given as rows of bytes as PNG (lossless).
///
/// # Errors
/// [`ImageError::BufferSize`] when `pixels` is not `height × width` bytes; OpenCV's encoder failing.
pub fn encode_gray_png(pixels: &[u8], height: i32, width: i32) -> Result<Vec<u8>, ImageError> {
    if pixels.len() != (height as usize) * (width as usize) {
        return Err(ImageError::BufferSize {
            len: pixels.len(),
            height,
            width,
        });
    }
    let m = Mat::new_rows_cols_with_data(height, width, pixels).map_err(cv_err)?;
    let mut buf = Vector::<u8>::new();
    let params = Vector::<i32>::from_slice(&[imgcodecs::IMWRITE_PNG_COMPRESSION, 6]);
    let ok = imgcodecs::imencode(".png", &m, &mut buf, &params).map_err(cv_err)?;
    if !ok {
        return Err(ImageError::EncodeFailed("PNG"));
    }
    Ok(buf.to_vec())
}

/// Turns source bytes into stored bytes (see the module docs).
///
/// # Errors
/// An [`ImageError`] saying why the image cannot be stored (empty, corrupt or truncated JPEG, undecodable, too many pixels).
pub fn prepare(bytes: &[u8], opts: &PrepareOptions) -> Result<Prepared, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    let jpeg = parse_jpeg(bytes);
    if bytes.len() >= 2 && bytes[0] == 0xFF && bytes[1] == 0xD8 {
        match jpeg {
            None => return Err(ImageError::MalformedJpeg),
            Some(j) if !j.complete => return Err(ImageError::TruncatedJpeg),
            _ => {}
        }
    }
    let orientation = exif_orientation(bytes);
    if let Some(j) = jpeg {
        let within = opts.max_side.is_none_or(|m| j.height.max(j.width) <= m);
        if j.baseline && j.precision == 8 && j.components == 3 && orientation == 1 && within {
            let img = decode_bgr(bytes, 1)?;
            if img.rows() as u32 != j.height || img.cols() as u32 != j.width {
                return Err(ImageError::JpegSizeMismatch {
                    header_height: j.height,
                    header_width: j.width,
                    height: img.rows(),
                    width: img.cols(),
                });
            }
            return Ok(Prepared {
                bytes: bytes.to_vec(),
                height: img.rows(),
                width: img.cols(),
                kept: true,
            });
        }
    }
    // Decode (with DCT scaling when a JPEG is far larger than needed), fit, re-encode.
    let reduce = match (jpeg, opts.max_side) {
        (Some(j), Some(m)) => dct_reduction(j.height, j.width, m),
        _ => 1,
    };
    let img = decode_bgr(bytes, reduce)?;
    // The target size comes from the full-resolution size (a DCT-scaled decode rounds
    // up), with the EXIF rotation applied.
    let (full_h, full_w) = match jpeg {
        Some(j) if reduce > 1 && (5..=8).contains(&orientation) => {
            (j.width as i32, j.height as i32)
        }
        Some(j) if reduce > 1 => (j.height as i32, j.width as i32),
        _ => (img.rows(), img.cols()),
    };
    let (h, w) = fit_size(full_h, full_w, opts.max_side);
    let img = resize_area(img, h, w)?;
    let out = encode_jpeg(&img, opts.quality)?;
    Ok(Prepared {
        bytes: out,
        height: h,
        width: w,
        kept: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_image(h: i32, w: i32) -> Mat {
        let mut data = Vec::with_capacity((h * w * 3) as usize);
        for y in 0..h {
            for x in 0..w {
                data.extend_from_slice(&[(x * 3) as u8, (y * 5) as u8, ((x + y) * 2) as u8]);
            }
        }
        let m = Mat::new_rows_cols_with_data(h, w * 3, &data).expect("mat");
        m.reshape(3, h)
            .expect("reshape")
            .try_clone()
            .expect("clone")
    }

    #[test]
    fn baseline_jpeg_within_bounds_is_kept_byte_for_byte() {
        let src = encode_jpeg(&test_image(40, 60), 90).expect("encode");
        let info = parse_jpeg(&src).expect("jpeg");
        assert_eq!((info.height, info.width, info.components), (40, 60, 3));
        assert!(info.baseline && info.complete);
        assert_eq!(exif_orientation(&src), 1);
        let p = prepare(
            &src,
            &PrepareOptions {
                max_side: Some(100),
                quality: 90,
            },
        )
        .expect("prepare");
        assert!(p.kept);
        assert_eq!(p.bytes, src);
        assert_eq!((p.height, p.width), (40, 60));
    }

    #[test]
    fn large_jpeg_is_resized_keeping_aspect() {
        let src = encode_jpeg(&test_image(300, 400), 90).expect("encode");
        let p = prepare(
            &src,
            &PrepareOptions {
                max_side: Some(100),
                quality: 80,
            },
        )
        .expect("prepare");
        assert!(!p.kept);
        assert_eq!((p.height, p.width), (75, 100));
        let back = decode_bgr(&p.bytes, 1).expect("decode");
        assert_eq!((back.rows(), back.cols()), (75, 100));
    }

    #[test]
    fn truncated_and_empty_and_garbage_are_reasons() {
        let src = encode_jpeg(&test_image(64, 64), 90).expect("encode");
        let opts = PrepareOptions {
            max_side: None,
            quality: 90,
        };
        let e = prepare(&src[..src.len() / 2], &opts)
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated"), "{e}");
        assert!(prepare(&[], &opts)
            .unwrap_err()
            .to_string()
            .contains("empty"));
        let e = prepare(b"hello, I am text", &opts).unwrap_err().to_string();
        assert!(e.contains("cannot decode"), "{e}");
    }

    /// A valid PNG of `side`² 1-bit black pixels (tens of KB compressed).
    fn png_bomb(side: u32) -> Vec<u8> {
        use std::io::Write;
        let row = (side as usize).div_ceil(8) + 1;
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        let zeros = vec![0u8; row];
        for _ in 0..side {
            z.write_all(&zeros).expect("zlib");
        }
        let idat = z.finish().expect("zlib");
        let chunk = |t: &[u8], d: &[u8]| {
            let mut c = (d.len() as u32).to_be_bytes().to_vec();
            c.extend_from_slice(t);
            c.extend_from_slice(d);
            let mut h = crc32fast::Hasher::new();
            h.update(t);
            h.update(d);
            c.extend_from_slice(&h.finalize().to_be_bytes());
            c
        };
        let mut ihdr = side.to_be_bytes().to_vec();
        ihdr.extend_from_slice(&side.to_be_bytes());
        ihdr.extend_from_slice(&[1, 0, 0, 0, 0]);
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        png.extend(chunk(b"IHDR", &ihdr));
        png.extend(chunk(b"IDAT", &idat));
        png.extend(chunk(b"IEND", &[]));
        png
    }

    #[test]
    fn decompression_bomb_is_refused_before_decoding() {
        let bomb = png_bomb(24000);
        assert!(bomb.len() < 1 << 20, "{} bytes", bomb.len());
        assert_eq!(declared_size(&bomb), Some((24000, 24000)));
        let e = decode_bgr(&bomb, 1).unwrap_err().to_string();
        assert!(e.contains("decode limit"), "{e}");
        // A small image of the same kind decodes.
        let ok = decode_bgr(&png_bomb(64), 1).expect("64x64 PNG");
        assert_eq!((ok.rows(), ok.cols()), (64, 64));
    }

    #[test]
    fn dct_reduction_keeps_target() {
        assert_eq!(dct_reduction(500, 375, 256), 1);
        assert_eq!(dct_reduction(1000, 800, 256), 2);
        assert_eq!(dct_reduction(4000, 3000, 256), 8);
        assert_eq!(dct_reduction(2048, 1000, 256), 8);
        assert_eq!(dct_reduction(2047, 1000, 256), 4);
    }

    #[test]
    fn fit_size_rounds_and_keeps_at_least_one_pixel() {
        assert_eq!(fit_size(375, 500, Some(256)), (192, 256));
        assert_eq!(fit_size(10, 5000, Some(100)), (1, 100));
        assert_eq!(fit_size(10, 20, None), (10, 20));
    }
}
