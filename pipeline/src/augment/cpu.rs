//! BYOL's views fused per sample for the CPU.
//!
//! The tensor path in [`crate::augment`] makes about 60 passes over a float batch; on a
//! CPU each pass streams the whole batch through memory (a `[64, 3, 224, 224]` batch is
//! 38 MB) and the batch-wide ops do nothing for samples outside their subset but copy
//! them. Here each sample goes through all its steps while it stays in cache, samples
//! split over libtorch's intra-op thread count:
//!
//! - [`views_from_canvas`] (bilinear, the default): each view is cut straight from the
//!   sample's uint8 canvas (no float copy of the canvas), resized, put through the
//!   colour stages and normalised into the batch tensor, both views of a sample one
//!   after the other while its canvas is in cache;
//! - [`colour_stages`]: the colour stages alone, on float crops the tensor path made
//!   (bicubic sampling).
//!
//! The arithmetic is the tensor path's, step for step, in float32: the same sampling
//! positions as libtorch's `grid_sampler_2d` (bilinear, `align_corners=False`, border
//! padding), the same colour formulas and clamps, the same normalisation. Only the
//! order of additions differs (the bilinear weights applied row then column, the
//! contrast mean, the blur taps), so the two agree to about 1e-6 (tests hold them to
//! 1e-5 after normalisation). Every loop runs over contiguous `f32` lanes without
//! branches on pixel values, so the compiler vectorises it for the CPU's SIMD width.

use super::params::{axis_coords, gaussian_kernel1d, CropBox, ViewParams};

/// One sample's planes: `[3, h, w]` contiguous.
struct Sample<'a> {
    px: &'a mut [f32],
    h: usize,
    w: usize,
}

impl Sample<'_> {
    fn plane(&self) -> usize {
        self.h * self.w
    }

    fn clamp(&mut self) {
        for v in self.px.iter_mut() {
            *v = v.clamp(0.0, 1.0);
        }
    }

    fn brightness(&mut self, f: f32) {
        for v in self.px.iter_mut() {
            *v = (*v * f).clamp(0.0, 1.0);
        }
    }

    /// torchvision's `_blend(img, other, ratio)`: `other + ratio·(img − other)`, as
    /// libtorch's `lerp` computes it, clamped; `other` is a constant.
    fn blend_with_constant(&mut self, other: f32, ratio: f32) {
        let lerp = Lerp::new(ratio);
        for v in self.px.iter_mut() {
            *v = lerp.at(other, *v).clamp(0.0, 1.0);
        }
    }

    fn planes(&mut self) -> (&mut [f32], &mut [f32], &mut [f32]) {
        let n = self.plane();
        let (r, rest) = self.px.split_at_mut(n);
        let (g, b) = rest.split_at_mut(n);
        (r, g, &mut b[..n])
    }

    fn contrast(&mut self, f: f32) {
        let (r, g, b) = self.planes();
        let n = r.len();
        // Lanes of partial sums (vectorised), added in f64.
        let mut acc = [0f64; 8];
        for ((r, g), b) in r.chunks(8).zip(g.chunks(8)).zip(b.chunks(8)) {
            for (k, ((&r, &g), &b)) in r.iter().zip(g).zip(b).enumerate() {
                acc[k] += gray(r, g, b) as f64;
            }
        }
        let mean = (acc.iter().sum::<f64>() / n as f64) as f32;
        self.blend_with_constant(mean, f);
    }

    fn saturation(&mut self, f: f32) {
        let lerp = Lerp::new(f);
        let (r, g, b) = self.planes();
        for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
            let y = gray(*r, *g, *b);
            *r = lerp.at(y, *r).clamp(0.0, 1.0);
            *g = lerp.at(y, *g).clamp(0.0, 1.0);
            *b = lerp.at(y, *b).clamp(0.0, 1.0);
        }
    }

    fn hue(&mut self, f: f32) {
        let (r, g, b) = self.planes();
        for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
            let (h, s, v) = rgb_to_hsv(*r, *g, *b);
            let h = unit_remainder(h + f);
            (*r, *g, *b) = hsv_to_rgb(h, s, v);
        }
    }

    fn grayscale(&mut self) {
        let (r, g, b) = self.planes();
        for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
            let y = gray(*r, *g, *b);
            (*r, *g, *b) = (y, y, y);
        }
    }

    /// Separable blur with reflect padding: the vertical pass, then the horizontal one
    /// (the tensor path's order).
    fn blur(&mut self, ker: &[f32], tmp: &mut Vec<f32>, row: &mut Vec<f32>) {
        let (h, w, n) = (self.h, self.w, self.plane());
        let half = ker.len() / 2;
        tmp.resize(n, 0.0);
        row.resize(w + 2 * half, 0.0);
        for c in 0..3 {
            let p = &mut self.px[c * n..(c + 1) * n];
            for y in 0..h {
                let out = &mut tmp[y * w..(y + 1) * w];
                out.fill(0.0);
                for (t, &k) in ker.iter().enumerate() {
                    let sy = reflect(y as isize + t as isize - half as isize, h);
                    for (o, &v) in out.iter_mut().zip(&p[sy * w..(sy + 1) * w]) {
                        *o += k * v;
                    }
                }
            }
            for y in 0..h {
                let src = &tmp[y * w..(y + 1) * w];
                for (j, r) in row.iter_mut().enumerate() {
                    *r = src[reflect(j as isize - half as isize, w)];
                }
                let out = &mut p[y * w..(y + 1) * w];
                out.fill(0.0);
                for (t, &k) in ker.iter().enumerate() {
                    for (o, &v) in out.iter_mut().zip(&row[t..t + w]) {
                        *o += k * v;
                    }
                }
            }
        }
    }

    fn solarize(&mut self, threshold: f32) {
        for v in self.px.iter_mut() {
            *v = if *v >= threshold { 1.0 - *v } else { *v };
        }
    }
}

/// ITU-R 601 luma as torchvision computes it.
#[inline(always)]
fn gray(r: f32, g: f32, b: f32) -> f32 {
    r * 0.2989 + g * 0.587 + b * 0.114
}

/// libtorch's `lerp(start, end, weight)` for float32, with the branch on the weight
/// (one per sample) taken once.
#[derive(Clone, Copy)]
struct Lerp {
    weight: f32,
    small: bool,
}

impl Lerp {
    fn new(weight: f32) -> Lerp {
        Lerp {
            weight,
            small: weight.abs() < 0.5,
        }
    }

    #[inline(always)]
    fn at(self, start: f32, end: f32) -> f32 {
        if self.small {
            start + self.weight * (end - start)
        } else {
            end - (end - start) * (1.0 - self.weight)
        }
    }
}

/// libtorch's `remainder(a, 1.0)` (the sign of the divisor) for `a` in [−1, 2): `fmod`
/// is exact there, and so are these subtractions (Sterbenz).
#[inline(always)]
fn unit_remainder(a: f32) -> f32 {
    let m = if a >= 1.0 { a - 1.0 } else { a };
    if m < 0.0 {
        m + 1.0
    } else {
        m
    }
}

fn reflect(i: isize, n: usize) -> usize {
    let n = n as isize;
    let j = if i < 0 { -i } else { i };
    (if j >= n { 2 * (n - 1) - j } else { j }) as usize
}

/// The tensor path's `rgb_to_hsv` for one pixel, without branches on the values.
#[inline(always)]
fn rgb_to_hsv(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    let cr = maxc - minc;
    let eqc = cr == 0.0;
    let s = cr / if eqc { 1.0 } else { maxc };
    let crd = if eqc { 1.0 } else { cr };
    let is_r = maxc == r;
    let is_g = maxc == g;
    let num = if is_r {
        g - b
    } else if is_g {
        b - r
    } else {
        r - g
    };
    let off = if is_r {
        0.0
    } else if is_g {
        2.0
    } else {
        4.0
    };
    // The red case adds 0.0, which leaves every value (−0.0 aside, which fmod below
    // maps to the same result) as the tensor path's.
    let h = num / crd + off;
    // fmod(h/6 + 1, 1): the argument is in [5/6, 11/6).
    let x = h / 6.0 + 1.0;
    (if x >= 1.0 { x - 1.0 } else { x }, s, maxc)
}

/// The tensor path's closed-form `hsv_to_rgb` for one pixel.
#[inline(always)]
fn hsv_to_rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    let h6 = h * 6.0;
    let vs = v * s;
    let chan = |n: f32| {
        // remainder(h6 + n, 6) for h6 + n in [1, 12): exact.
        let x = h6 + n;
        let k = if x >= 6.0 { x - 6.0 } else { x };
        let w = k.min(4.0 - k).clamp(0.0, 1.0);
        v - vs * w
    };
    (chan(5.0), chan(3.0), chan(1.0))
}

/// Clamps `x`, a contiguous float32 batch `[B, 3, h, w]` (the resized crops), to
/// [0, 1] and applies the colour stages of `p` in place, on `threads` threads.
/// `blur_k` is the blur kernel size.
pub fn colour_stages(
    x: &mut [f32],
    (h, w): (usize, usize),
    p: &ViewParams,
    blur_k: usize,
    threshold: f64,
    threads: usize,
) {
    let per = 3 * h * w;
    let b = x.len() / per;
    assert_eq!(b * per, x.len());
    assert_eq!(p.jitter.len(), b);
    let chunk = b.div_ceil(threads.max(1)).max(1);
    std::thread::scope(|scope| {
        for (ci, part) in x.chunks_mut(chunk * per).enumerate() {
            scope.spawn(move || {
                let (mut tmp, mut row) = (Vec::new(), Vec::new());
                for (j, px) in part.chunks_mut(per).enumerate() {
                    let i = ci * chunk + j;
                    let mut s = Sample { px, h, w };
                    one_sample(&mut s, p, i, blur_k, threshold, &mut tmp, &mut row);
                }
            });
        }
    });
}

fn one_sample(
    s: &mut Sample,
    p: &ViewParams,
    i: usize,
    blur_k: usize,
    threshold: f64,
    tmp: &mut Vec<f32>,
    row: &mut Vec<f32>,
) {
    s.clamp();
    if p.jitter[i] {
        for &op in &p.order[i] {
            let f = p.factors[i][op] as f32;
            match op {
                0 => s.brightness(f),
                1 => s.contrast(f),
                2 => s.saturation(f),
                _ => s.hue(f),
            }
        }
    }
    if p.grayscale[i] {
        s.grayscale();
    }
    if p.blur[i] {
        let ker = gaussian_kernel1d(blur_k as i64, p.sigma[i]);
        s.blur(&ker, tmp, row);
    }
    if p.solarize[i] {
        s.solarize(threshold as f32);
    }
}

/// One output axis of a bilinear resized crop: for each output index the two source
/// indices and their weights, as libtorch's `grid_sampler_2d` (bilinear,
/// `align_corners=False`, border padding) computes them from the normalised grid of
/// [`axis_coords`] (clamped to the crop).
fn bilinear_taps(start: i64, len: i64, out: usize, canvas: usize, flip: bool) -> Vec<Tap> {
    let size = canvas as f32;
    axis_coords(start, len, out as i64, canvas as i64, flip, true)
        .map(|g| {
            // grid_sampler_unnormalize + clip_coordinates, in float32.
            let x = (((g + 1.0) * size - 1.0) / 2.0).clamp(0.0, size - 1.0);
            let x0 = x.floor();
            let w1 = x - x0;
            let i0 = x0 as usize;
            Tap {
                i0,
                i1: (i0 + 1).min(canvas - 1),
                w0: 1.0 - w1,
                w1,
            }
        })
        .collect()
}

#[derive(Clone, Copy)]
struct Tap {
    i0: usize,
    i1: usize,
    w0: f32,
    w1: f32,
}

/// Per-thread scratch buffers.
#[derive(Default)]
struct Scratch {
    row: Vec<f32>,
    tmp: Vec<f32>,
    pad: Vec<f32>,
}

/// Bilinear resized crop (and flip) of one sample's uint8 canvas `[3, S, S]` into
/// `out` `[3, size, size]` in [0, 1]: rows blended first over the crop's columns, then
/// columns gathered.
fn resized_crop_u8(
    canvas: &[u8],
    s: usize,
    bx: &CropBox,
    flip: bool,
    size: usize,
    out: &mut [f32],
    row: &mut Vec<f32>,
) {
    let xs = bilinear_taps(bx.left, bx.width, size, s, flip);
    let ys = bilinear_taps(bx.top, bx.height, size, s, false);
    let lo = xs.iter().map(|t| t.i0).min().unwrap_or(0);
    let hi = xs.iter().map(|t| t.i1).max().unwrap_or(0) + 1;
    row.resize(s, 0.0);
    for c in 0..3 {
        let plane = &canvas[c * s * s..(c + 1) * s * s];
        let dst = &mut out[c * size * size..(c + 1) * size * size];
        for (ty, orow) in ys.iter().zip(dst.chunks_exact_mut(size)) {
            let r0 = &plane[ty.i0 * s + lo..ty.i0 * s + hi];
            let r1 = &plane[ty.i1 * s + lo..ty.i1 * s + hi];
            for ((o, &a), &b) in row[lo..hi].iter_mut().zip(r0).zip(r1) {
                *o = a as f32 * ty.w0 + b as f32 * ty.w1;
            }
            for (o, tx) in orow.iter_mut().zip(&xs) {
                *o = (row[tx.i0] * tx.w0 + row[tx.i1] * tx.w1) * (1.0 / 255.0);
            }
        }
    }
}

/// What [`views_from_canvas`] makes of each sample: a view's drawn parameters, its
/// solarize threshold and its output `[B, 3, size, size]` (float32, contiguous).
pub struct ViewOut<'a> {
    pub params: &'a ViewParams,
    pub threshold: f64,
    pub out: &'a mut [f32],
}

/// BYOL's views of a batch straight from its uint8 canvases: for each sample and view,
/// the bilinear resized crop and flip, the colour stages and the normalisation by
/// `mean`/`std`, written into the view's output; samples split over `threads` threads.
///
/// # Shapes
/// `canvas`: `[B, 3, S, S]` uint8, contiguous; each view's `out`: `[B, 3, size, size]`.
///
/// # Panics
/// Lengths that do not match those shapes, or parameters for another batch size.
#[allow(clippy::too_many_arguments)]
pub fn views_from_canvas(
    canvas: &[u8],
    s: usize,
    views: &mut [ViewOut],
    size: usize,
    blur_k: usize,
    (mean, std): ([f64; 3], [f64; 3]),
    threads: usize,
) {
    let per_in = 3 * s * s;
    let b = canvas.len() / per_in;
    assert_eq!(b * per_in, canvas.len());
    let per = 3 * size * size;
    for v in views.iter() {
        assert_eq!(v.out.len(), b * per);
        assert_eq!(v.params.boxes.len(), b);
    }
    let chunk = b.div_ceil(threads.max(1)).max(1);
    // Each thread's share of every view's output.
    let mut parts: Vec<Vec<(&ViewParams, f64, &mut [f32])>> =
        (0..b.div_ceil(chunk)).map(|_| Vec::new()).collect();
    for v in views.iter_mut() {
        for (t, o) in v.out.chunks_mut(chunk * per).enumerate() {
            parts[t].push((v.params, v.threshold, o));
        }
    }
    let mean = mean.map(|m| m as f32);
    let std = std.map(|s| s as f32);
    std::thread::scope(|scope| {
        for (t, mut outs) in parts.into_iter().enumerate() {
            let canvas = &canvas[t * chunk * per_in..((t + 1) * chunk).min(b) * per_in];
            scope.spawn(move || {
                let mut sc = Scratch::default();
                for (j, cv) in canvas.chunks_exact(per_in).enumerate() {
                    let i = t * chunk + j;
                    for (p, threshold, out) in outs.iter_mut() {
                        let px = &mut out[j * per..(j + 1) * per];
                        resized_crop_u8(cv, s, &p.boxes[i], p.flips[i], size, px, &mut sc.row);
                        let mut smp = Sample {
                            px,
                            h: size,
                            w: size,
                        };
                        one_sample(&mut smp, p, i, blur_k, *threshold, &mut sc.tmp, &mut sc.pad);
                        for (c, plane) in smp.px.chunks_exact_mut(size * size).enumerate() {
                            let (m, sd) = (mean[c], std[c]);
                            for v in plane.iter_mut() {
                                *v = (*v - m) / sd;
                            }
                        }
                    }
                }
            });
        }
    });
}
