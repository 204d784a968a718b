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
    let shrinks = img.rows() >= vh && img.cols() >= vw && (img.rows(), img.cols()) != (vh, vw);
    let integer = is_area_fast(img.cols(), vw) && is_area_fast(img.rows(), vh);
    if shrinks && !integer && img.typ() == opencv::core::CV_8UC3 && img.is_continuous() {
        let px = img.data_bytes().map_err(cv_err)?;
        let size = (img.rows() as usize, img.cols() as usize);
        if area_fit_bgr_to_planes(px, size, (vh, vw), s, out) {
            return Ok((vh, vw));
        }
    }
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

/// Whether OpenCV shrinks this axis by an integer factor, which it does with its own
/// fast box filter (`is_area_fast` in imgproc/src/resize.cpp, with another rounding).
fn is_area_fast(ssize: i32, dsize: i32) -> bool {
    let scale = 1.0 / (dsize as f64 / ssize as f64);
    (scale - scale.round()).abs() < f64::EPSILON
}

/// One axis of OpenCV's `INTER_AREA` shrink (`computeResizeAreaTab` in
/// imgproc/src/resize.cpp): `(output index, source index, weight)` in OpenCV's order,
/// each output covering `ssize / dsize` source pixels, partly covered ones weighed by
/// their share.
fn area_tab(ssize: usize, dsize: usize) -> Vec<(usize, usize, f32)> {
    let scale = 1.0 / (dsize as f64 / ssize as f64);
    let mut tab = Vec::with_capacity(2 * ssize + dsize);
    for dx in 0..dsize {
        let fsx1 = dx as f64 * scale;
        let fsx2 = fsx1 + scale;
        let cell = scale.min(ssize as f64 - fsx1);
        let mut sx2 = fsx2.floor() as i64;
        sx2 = sx2.min(ssize as i64 - 1);
        let sx1 = (fsx1.ceil() as i64).min(sx2);
        if sx1 as f64 - fsx1 > 1e-3 {
            tab.push((dx, (sx1 - 1) as usize, ((sx1 as f64 - fsx1) / cell) as f32));
        }
        for sx in sx1..sx2 {
            tab.push((dx, sx as usize, (1.0 / cell) as f32));
        }
        if fsx2 - sx2 as f64 > 1e-3 {
            let a = (fsx2 - sx2 as f64).min(1.0).min(cell) / cell;
            tab.push((dx, sx2 as usize, a as f32));
        }
    }
    tab
}

/// Most source pixels an output of [`area_fit_bgr_to_planes`] covers along x: every
/// shrink up to 3× and some beyond (JPEGs after DCT scaling always shrink by less than
/// 2×); larger ones go to OpenCV.
const AREA_TAPS: usize = 4;

/// One output of an area shrink along x: `n` consecutive sources from `start`, with
/// their weights.
#[derive(Clone, Copy, Default)]
struct Span {
    start: usize,
    n: usize,
    w: [f32; AREA_TAPS],
}

/// [`area_tab`] grouped by output, or `None` when an output covers more than
/// [`AREA_TAPS`] sources.
fn area_spans(ssize: usize, dsize: usize) -> Option<Vec<Span>> {
    let mut spans = vec![Span::default(); dsize];
    for (d, s, w) in area_tab(ssize, dsize) {
        let span = &mut spans[d];
        if span.n == 0 {
            span.start = s;
        }
        debug_assert_eq!(span.start + span.n, s, "consecutive sources");
        if span.n == AREA_TAPS {
            return None;
        }
        span.w[span.n] = w;
        span.n += 1;
    }
    Some(spans)
}

/// Rounds half to even, as `cvRound` does, for `0 ≤ v < 2²³`: adding and subtracting 2²³
/// leaves the nearest integer (ties to even) under the default rounding mode.
fn round_ties_even_small(v: f32) -> f32 {
    const BIG: f32 = 8_388_608.0;
    (v + BIG) - BIG
}

/// OpenCV's `INTER_AREA` shrink of a BGR image `[rows, cols, 3]` to `(vh, vw)`, written
/// as RGB planes into the top-left of the canvas `out` `[3, S, S]` (the rest zeroed):
/// the fit and the layout change in one pass, in OpenCV's float arithmetic and order
/// (each source row summed along x, the rows then weighed along y; rounded half to
/// even), so the pixels equal `cv::resize(INTER_AREA)`'s (tested). OpenCV's generic
/// area path (fractional factors) was the loader's slowest step.
///
/// Returns false, writing nothing, when an output covers more than [`AREA_TAPS`]
/// source pixels along x (shrinks beyond about 3×).
fn area_fit_bgr_to_planes(
    px: &[u8],
    (rows, cols): (usize, usize),
    (vh, vw): (i32, i32),
    s: usize,
    out: &mut [u8],
) -> bool {
    let (vh, vw) = (vh as usize, vw as usize);
    let Some(xs) = area_spans(cols, vw) else {
        return false;
    };
    let ytab = area_tab(rows, vh);
    let mut buf = vec![0f32; vw * 3];
    let mut sum = vec![0f32; vw * 3];
    out.fill(0);
    let plane = s * s;
    let flush = |dy: usize, sum: &[f32], out: &mut [u8]| {
        let (r, rest) = out.split_at_mut(plane);
        let (g, b) = rest.split_at_mut(plane);
        let row = dy * s..dy * s + vw;
        for (((v, r), g), b) in sum
            .chunks_exact(3)
            .zip(&mut r[row.clone()])
            .zip(&mut g[row.clone()])
            .zip(&mut b[row])
        {
            let q = |x: f32| round_ties_even_small(x.clamp(0.0, 255.0)) as u8;
            (*b, *g, *r) = (q(v[0]), q(v[1]), q(v[2]));
        }
    };
    let mut prev = ytab.first().map_or(0, |t| t.0);
    let mut summed = usize::MAX;
    for &(dy, sy, beta) in &ytab {
        // A source row shared by two outputs comes twice in a row: summed once.
        if sy != summed {
            let src = &px[sy * cols * 3..(sy + 1) * cols * 3];
            for (o, sp) in buf.chunks_exact_mut(3).zip(&xs) {
                let p = &src[sp.start * 3..(sp.start + sp.n) * 3];
                let mut a = [0f32; 3];
                for (p, &w) in p.chunks_exact(3).zip(&sp.w) {
                    a[0] += p[0] as f32 * w;
                    a[1] += p[1] as f32 * w;
                    a[2] += p[2] as f32 * w;
                }
                o.copy_from_slice(&a);
            }
            summed = sy;
        }
        if dy != prev {
            flush(prev, &sum, out);
            for (s, &b) in sum.iter_mut().zip(&buf) {
                *s = beta * b;
            }
            prev = dy;
        } else {
            for (s, &b) in sum.iter_mut().zip(&buf) {
                *s += beta * b;
            }
        }
    }
    flush(prev, &sum, out);
    true
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

    /// The fused area fit equals OpenCV's `resize(INTER_AREA)` followed by the BGR →
    /// RGB-planes copy, at fractional and unequal factors (integer ones stay OpenCV's).
    #[test]
    fn area_fit_equals_opencv_inter_area() {
        use opencv::core::{Mat, MatTraitManual, Scalar, CV_8UC3};
        let mut state = 12345u64;
        for (rows, cols, s) in [
            (375, 500, 256),
            (500, 375, 256),
            (512, 512, 256),
            (300, 299, 256),
            (1000, 10, 64),
            (257, 700, 256),
            (600, 700, 256),
            (200, 800, 256),
            (48, 40, 28),
        ] {
            let mut img =
                Mat::new_rows_cols_with_default(rows, cols, CV_8UC3, Scalar::all(0.0)).unwrap();
            for v in img.data_bytes_mut().unwrap() {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                *v = (state >> 56) as u8;
            }
            let (vh, vw) = canvas_fit(rows, cols, s);
            if is_area_fast(cols, vw) && is_area_fast(rows, vh) {
                // OpenCV's own fast path is used there.
                assert_eq!((rows, cols), (512, 512));
                continue;
            }
            let mut ours = vec![7u8; 3 * s * s];
            let done = area_fit_bgr_to_planes(
                img.data_bytes().unwrap(),
                (rows as usize, cols as usize),
                (vh, vw),
                s,
                &mut ours,
            );
            if !done {
                // Outputs covering more than AREA_TAPS sources: left to OpenCV, untouched.
                assert!(
                    cols > 3 * vw && ours.iter().all(|&v| v == 7),
                    "{rows}x{cols}"
                );
                continue;
            }
            let mut r = Mat::default();
            imgproc::resize(
                &img,
                &mut r,
                Size::new(vw, vh),
                0.0,
                0.0,
                imgproc::INTER_AREA,
            )
            .unwrap();
            let cv = r.data_bytes().unwrap();
            let mut worst = 0i32;
            let mut differ = 0usize;
            for y in 0..s {
                for x in 0..s {
                    for c in 0..3 {
                        let o = ours[(2 - c) * s * s + y * s + x] as i32;
                        let want = if y < vh as usize && x < vw as usize {
                            cv[(y * vw as usize + x) * 3 + c] as i32
                        } else {
                            0
                        };
                        worst = worst.max((o - want).abs());
                        differ += usize::from(o != want);
                    }
                }
            }
            assert_eq!((worst, differ), (0, 0), "{rows}x{cols} -> {vh}x{vw}");
        }
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
