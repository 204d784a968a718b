//! CPU decode into a fixed canvas (OpenCV).
//!
//! Each image is decoded once into a square canvas of side S: scaled so that its longer
//! side is S (aspect kept; area interpolation when shrinking, bilinear when enlarging),
//! placed at the top-left, the rest zero. JPEGs at least twice the canvas are decoded
//! with libjpeg's DCT scaling (1/2, 1/4, 1/8) first, never below the canvas size.
//! The canvas is written as RGB planes (CHW), ready for the device.

use opencv::core::{Mat, MatTraitConst, MatTraitConstManual, Size};
use opencv::imgproc;

use byol_format::image::{cv_err, decode_bgr, ImageError};
use byol_format::jpeg::dct_reduction;

/// Size of the valid region of the canvas for a stored `(h, w)` image.
pub fn canvas_fit(h: i32, w: i32, canvas: usize) -> (i32, i32) {
    let s = canvas as f64 / h.max(w).max(1) as f64;
    let vh = ((h as f64 * s).round() as i32).clamp(1, canvas as i32);
    let vw = ((w as f64 * s).round() as i32).clamp(1, canvas as i32);
    (vh, vw)
}

/// The DCT reduction used for a stored `(h, w)` image and a canvas.
pub fn reduction_for(bytes: &[u8], h: i32, w: i32, canvas: usize) -> u32 {
    let is_jpeg = bytes.len() > 2 && bytes[0] == 0xFF && bytes[1] == 0xD8;
    if is_jpeg && h.max(w) as usize >= 2 * canvas {
        dct_reduction(h.max(0) as u32, w.max(0) as u32, canvas as u32)
    } else {
        1
    }
}

/// Decodes `bytes` (stored size `h`×`w`) into `out`, a 3×S×S RGB canvas (CHW).
/// Returns the valid region `(height, width)`.
///
/// # Errors
/// [`ImageError`]: the bytes do not decode, exceed the pixel limit, or decode to another size than the row records.
pub fn decode_to_canvas(
    bytes: &[u8],
    h: i32,
    w: i32,
    canvas: usize,
    out: &mut [u8],
) -> Result<(i32, i32), ImageError> {
    let s = canvas;
    assert_eq!(out.len(), 3 * s * s, "canvas buffer size");
    let reduce = reduction_for(bytes, h, w, s);
    let img = decode_bgr(bytes, reduce)?;
    // The stored size is the reference: a row whose image decodes to another size
    // (at full resolution) is corrupt.
    if reduce == 1 && (img.rows(), img.cols()) != (h, w) {
        return Err(ImageError::SizeMismatch {
            height: img.rows(),
            width: img.cols(),
            recorded_height: h,
            recorded_width: w,
        });
    }
    let (vh, vw) = canvas_fit(h, w, s);
    let img = if (img.rows(), img.cols()) == (vh, vw) {
        img
    } else {
        let interp = if img.rows() > vh || img.cols() > vw {
            imgproc::INTER_AREA
        } else {
            imgproc::INTER_LINEAR
        };
        let mut r = Mat::default();
        imgproc::resize(&img, &mut r, Size::new(vw, vh), 0.0, 0.0, interp).map_err(cv_err)?;
        r
    };
    let img = if img.is_continuous() {
        img
    } else {
        img.try_clone().map_err(cv_err)?
    };
    let px = img.data_bytes().map_err(cv_err)?;
    let (vh, vw) = (vh as usize, vw as usize);
    let plane = s * s;
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for y in 0..s {
        let row = y * s;
        if y < vh {
            let src = &px[y * vw * 3..(y + 1) * vw * 3];
            for (x, p) in src.chunks_exact(3).enumerate() {
                b[row + x] = p[0];
                g[row + x] = p[1];
                r[row + x] = p[2];
            }
            r[row + vw..row + s].fill(0);
            g[row + vw..row + s].fill(0);
            b[row + vw..row + s].fill(0);
        } else {
            r[row..row + s].fill(0);
            g[row..row + s].fill(0);
            b[row..row + s].fill(0);
        }
    }
    Ok((vh as i32, vw as i32))
}

/// Decode only (no fit, no canvas): for the benchmark's decode-only rate.
///
/// # Errors
/// As [`decode_to_canvas`].
pub fn decode_only(bytes: &[u8], h: i32, w: i32, canvas: usize) -> Result<(i32, i32), ImageError> {
    let img = decode_bgr(bytes, reduction_for(bytes, h, w, canvas))?;
    Ok((img.rows(), img.cols()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_keeps_aspect_and_bounds() {
        assert_eq!(canvas_fit(375, 500, 256), (192, 256));
        assert_eq!(canvas_fit(28, 28, 32), (32, 32));
        assert_eq!(canvas_fit(10, 1000, 64), (1, 64));
        assert_eq!(canvas_fit(500, 375, 224), (224, 168));
    }

    #[test]
    fn gray_png_fills_three_equal_planes_and_zeroes_the_rest() {
        let px: Vec<u8> = (0..20 * 10).map(|i| (i % 251) as u8).collect();
        let png = byol_format::image::encode_gray_png(&px, 20, 10).expect("png");
        let mut out = vec![7u8; 3 * 40 * 40];
        let (vh, vw) = decode_to_canvas(&png, 20, 10, 40, &mut out).expect("decode");
        assert_eq!((vh, vw), (40, 20));
        let plane = 40 * 40;
        assert_eq!(&out[..plane], &out[plane..2 * plane]);
        assert_eq!(&out[..plane], &out[2 * plane..]);
        for y in 0..40 {
            assert!(out[y * 40 + 20..y * 40 + 40].iter().all(|&v| v == 0));
        }
    }
}
