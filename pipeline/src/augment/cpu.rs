//! BYOL's views fused per sample for the CPU.
//!
//! The tensor path in [`crate::augment`] makes about 60 passes over a float batch; on a
//! CPU each pass streams the whole batch through memory (a `[64, 3, 224, 224]` batch is
//! 38 MB) and the batch-wide ops do nothing for samples outside their subset but copy
//! them. Here each sample goes through all its steps while it stays in cache, samples
//! split over libtorch's intra-op thread count:
//!
//! - [`views_from_canvas`] (the default): each view is cut straight from the sample's
//!   uint8 canvas (no float copy of the canvas), resized (bilinear or bicubic),
//!   put through the colour stages and normalised into the batch tensor, both views of
//!   a sample one after the other while its canvas is in cache;
//! - [`colour_stages`]: the colour stages alone, on float crops the tensor path made.
//!
//! The arithmetic is the tensor path's, step for step, in float32: the same sampling
//! positions and weights as libtorch's `grid_sampler_2d` (bilinear or bicubic,
//! `align_corners=False`, border padding), the same colour formulas and clamps, the
//! same normalisation. What differs: the order of additions (the crop's weights applied
//! along x first, the contrast mean, the blur taps), the crop interpolating the uint8
//! values and then multiplying by 1/255 (the tensor path divides first), and blur taps
//! under 1e-9 skipped; so the two agree to about 2e-6 in [0, 1] (tests hold them to 2e-5
//! after normalisation). Every loop runs over contiguous `f32` lanes without branches on
//! pixel values, so the compiler vectorises it for the CPU's SIMD width.

use super::params::{axis_coords, gaussian_kernel1d, AugmentConfig, Interpolation, ViewParams};

/// One sample's planes: `[3, h, w]` contiguous.
struct Sample<'a> {
    px: &'a mut [f32],
    h: usize,
    w: usize,
}

impl Sample<'_> {
    #[inline(always)]
    fn plane(&self) -> usize {
        self.h * self.w
    }

    #[inline(always)]
    fn clamp(&mut self) {
        for v in self.px.iter_mut() {
            *v = v.clamp(0.0, 1.0);
        }
    }

    #[inline(always)]
    fn brightness(&mut self, f: f32) {
        for v in self.px.iter_mut() {
            *v = (*v * f).clamp(0.0, 1.0);
        }
    }

    /// torchvision's `_blend(img, other, ratio)`: `other + ratio·(img − other)`, as
    /// libtorch's `lerp` computes it, clamped; `other` is a constant.
    #[inline(always)]
    fn blend_with_constant(&mut self, other: f32, ratio: f32) {
        let lerp = Lerp::new(ratio);
        for v in self.px.iter_mut() {
            *v = lerp.at(other, *v).clamp(0.0, 1.0);
        }
    }

    #[inline(always)]
    fn planes(&mut self) -> (&mut [f32], &mut [f32], &mut [f32]) {
        let n = self.plane();
        let (r, rest) = self.px.split_at_mut(n);
        let (g, b) = rest.split_at_mut(n);
        (r, g, &mut b[..n])
    }

    #[inline(always)]
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

    #[inline(always)]
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

    #[inline(always)]
    fn hue(&mut self, f: f32) {
        let (r, g, b) = self.planes();
        for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
            let (h, s, v) = rgb_to_hsv(*r, *g, *b);
            let h = unit_remainder(h + f);
            (*r, *g, *b) = hsv_to_rgb(h, s, v);
        }
    }

    #[inline(always)]
    fn grayscale(&mut self) {
        let (r, g, b) = self.planes();
        for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
            let y = gray(*r, *g, *b);
            (*r, *g, *b) = (y, y, y);
        }
    }

    /// Separable blur with reflect padding: the vertical pass, then the horizontal one
    /// (the tensor path's order); each output sums its taps in order. The outer taps
    /// of a narrow kernel that weigh less than [`TAP_FLOOR`] are skipped (the kernel
    /// sums to 1, so a value moves by less than 23 × 1e-9).
    #[inline(always)]
    fn blur(&mut self, ker: &[f32], sc: &mut BlurScratch) {
        let (h, w, n) = (self.h, self.w, self.plane());
        let half = ker.len() / 2;
        let skip = ker.iter().position(|&k| k >= TAP_FLOOR).unwrap_or(half);
        let kept = &ker[skip..ker.len() - skip];
        sc.tmp.resize(n, 0.0);
        sc.row.resize(w + 2 * half, 0.0);
        sc.offs.resize(kept.len(), 0);
        for c in 0..3 {
            let p = &mut self.px[c * n..(c + 1) * n];
            for y in 0..h {
                for (t, o) in sc.offs.iter_mut().enumerate() {
                    *o = reflect(y as isize + (skip + t) as isize - half as isize, h) * w;
                }
                fir(p, &sc.offs, kept, &mut sc.tmp[y * w..(y + 1) * w]);
            }
            for (t, o) in sc.offs.iter_mut().enumerate() {
                *o = skip + t;
            }
            for y in 0..h {
                let src = &sc.tmp[y * w..(y + 1) * w];
                for (j, r) in sc.row.iter_mut().enumerate() {
                    *r = src[reflect(j as isize - half as isize, w)];
                }
                fir(&sc.row, &sc.offs, kept, &mut p[y * w..(y + 1) * w]);
            }
        }
    }

    #[inline(always)]
    fn solarize(&mut self, threshold: f32) {
        for v in self.px.iter_mut() {
            *v = if *v >= threshold { 1.0 - *v } else { *v };
        }
    }
}

/// Blur taps lighter than this are skipped: at σ = 0.5 a 23-tap kernel keeps 7, at
/// σ = 1 it keeps 13, at σ ≥ 1.8 all of them.
const TAP_FLOOR: f32 = 1e-9;

/// Scratch of [`Sample::blur`], kept per thread.
#[derive(Default)]
struct BlurScratch {
    tmp: Vec<f32>,
    row: Vec<f32>,
    offs: Vec<usize>,
}

/// A 1-D filter: `out[x] = Σ_t ker[t] · src[offs[t] + x]`, taps added in order from 0,
/// over blocks of outputs held in registers (loads only in the inner loop).
#[inline(always)]
fn fir(src: &[f32], offs: &[usize], ker: &[f32], out: &mut [f32]) {
    const L: usize = 16;
    let w = out.len();
    let mut x = 0;
    while x + L <= w {
        let mut acc = [0f32; L];
        for (&o, &k) in offs.iter().zip(ker) {
            let r = &src[o + x..o + x + L];
            for j in 0..L {
                acc[j] += k * r[j];
            }
        }
        out[x..x + L].copy_from_slice(&acc);
        x += L;
    }
    for (x, v) in out.iter_mut().enumerate().skip(x) {
        let mut a = 0f32;
        for (&o, &k) in offs.iter().zip(ker) {
            a += k * src[o + x];
        }
        *v = a;
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
    #[inline(always)]
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

#[inline(always)]
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
                let mut sc = BlurScratch::default();
                for (j, px) in part.chunks_mut(per).enumerate() {
                    let i = ci * chunk + j;
                    let mut s = Sample { px, h, w };
                    one_sample(&mut s, p, i, blur_k, threshold, &mut sc);
                }
            });
        }
    });
}

#[inline(always)]
fn one_sample(
    s: &mut Sample,
    p: &ViewParams,
    i: usize,
    blur_k: usize,
    threshold: f64,
    sc: &mut BlurScratch,
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
        s.blur(&ker, sc);
    }
    if p.solarize[i] {
        s.solarize(threshold as f32);
    }
}

/// One output index of a separable resampling: `N` source indices and their weights.
#[derive(Clone, Copy)]
struct Tap<const N: usize> {
    idx: [usize; N],
    w: [f32; N],
}

impl<const N: usize> Tap<N> {
    /// `Σ_k src[idx[k]] · w[k]`, summed in order.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    fn apply(&self, src: &[u8]) -> f32 {
        let mut a = src[self.idx[0]] as f32 * self.w[0];
        for k in 1..N {
            a += src[self.idx[k]] as f32 * self.w[k];
        }
        a
    }
}

/// One output axis of a bilinear resized crop: for each output index the two source
/// indices and their weights, as libtorch's `grid_sampler_2d` (bilinear,
/// `align_corners=False`, border padding) computes them from the normalised grid of
/// [`axis_coords`] (clamped to the crop).
fn bilinear_taps(start: i64, len: i64, out: usize, canvas: usize, flip: bool) -> Vec<Tap<2>> {
    let size = canvas as f32;
    axis_coords(start, len, out as i64, canvas as i64, flip, true)
        .map(|g| {
            // grid_sampler_unnormalize + clip_coordinates, in float32.
            let x = (((g + 1.0) * size - 1.0) / 2.0).clamp(0.0, size - 1.0);
            let x0 = x.floor();
            let w1 = x - x0;
            let i0 = x0 as usize;
            Tap {
                idx: [i0, (i0 + 1).min(canvas - 1)],
                w: [1.0 - w1, w1],
            }
        })
        .collect()
}

/// One output axis of a bicubic resized crop, as libtorch's `grid_sampler_2d` (bicubic,
/// A = −0.75, `align_corners=False`, border padding) computes it from [`axis_coords`]:
/// four taps, each clamped to `[0, valid)` (the tensor path replicates the last valid
/// row and column over the rest of the canvas, see
/// [`super::tensor::replicate_beyond_valid`]).
fn bicubic_taps(
    (start, len): (i64, i64),
    out: usize,
    canvas: usize,
    valid: usize,
    flip: bool,
) -> Vec<Tap<4>> {
    let size = canvas as f32;
    let last = valid.clamp(1, canvas) as isize - 1;
    axis_coords(start, len, out as i64, canvas as i64, flip, false)
        .map(|g| {
            let x = ((g + 1.0) * size - 1.0) / 2.0;
            let x0 = x.floor();
            let t = x - x0;
            let i = x0 as isize;
            Tap {
                idx: [0, 1, 2, 3].map(|k| (i - 1 + k).clamp(0, last) as usize),
                w: cubic_coefficients(t),
            }
        })
        .collect()
}

/// libtorch's `get_cubic_upsample_coefficients` (A = −0.75) at fraction `t`.
fn cubic_coefficients(t: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let near = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// Per-thread scratch buffers.
#[derive(Default)]
struct Scratch {
    row: Vec<f32>,
    blur: BlurScratch,
}

/// The shapes and constants every view of a batch shares.
#[derive(Clone, Copy)]
struct Frame {
    /// Canvas side S.
    canvas: usize,
    /// View side.
    size: usize,
    blur_k: usize,
    mean: [f32; 3],
    std: [f32; 3],
    bicubic: bool,
}

/// One view of one sample, start to end: `cv` its canvas `[3, S, S]` whose valid
/// region is `valid` (height, width), `px` its output `[3, size, size]`.
#[inline(always)]
fn view_of_sample(
    (cv, valid): (&[u8], (i32, i32)),
    f: &Frame,
    (p, i, threshold): (&ViewParams, usize, f64),
    px: &mut [f32],
    sc: &mut Scratch,
) {
    let (size, s, bx) = (f.size, f.canvas, &p.boxes[i]);
    if f.bicubic {
        let (vh, vw) = (valid.0.max(1) as usize, valid.1.max(1) as usize);
        let xs = bicubic_taps((bx.left, bx.width), size, s, vw, p.flips[i]);
        let ys = bicubic_taps((bx.top, bx.height), size, s, vh, false);
        resized_crop_u8(cv, s, (&xs, &ys), size, px, &mut sc.row);
    } else {
        let xs = bilinear_taps(bx.left, bx.width, size, s, p.flips[i]);
        let ys = bilinear_taps(bx.top, bx.height, size, s, false);
        resized_crop_u8(cv, s, (&xs, &ys), size, px, &mut sc.row);
    }
    let mut smp = Sample {
        px,
        h: size,
        w: size,
    };
    one_sample(&mut smp, p, i, f.blur_k, threshold, &mut sc.blur);
    for (c, plane) in px_planes(smp.px, size) {
        let (m, sd) = (f.mean[c], f.std[c]);
        for v in plane.iter_mut() {
            *v = (*v - m) / sd;
        }
    }
}

#[inline(always)]
fn px_planes(px: &mut [f32], size: usize) -> impl Iterator<Item = (usize, &mut [f32])> {
    px.chunks_exact_mut(size * size).enumerate()
}

/// [`view_of_sample`] compiled for AVX2 (8 float lanes instead of SSE2's 4); the same
/// operations in the same order, so the same values.
///
/// # Safety
/// The CPU must have AVX2 (checked by the caller with `is_x86_feature_detected!`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn view_of_sample_avx2(
    cv: (&[u8], (i32, i32)),
    f: &Frame,
    view: (&ViewParams, usize, f64),
    px: &mut [f32],
    sc: &mut Scratch,
) {
    view_of_sample(cv, f, view, px, sc)
}

/// Whether this CPU runs the AVX2 build of the per-sample views.
pub fn uses_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Resized crop (and flip) of one sample's uint8 canvas `[3, S, S]` into `out`
/// `[3, size, size]` in [0, 1], given each axis' taps: each source row the crop uses is
/// resampled along x once (`rows`, `[rows used, size]`), then each output row sums `N`
/// of them (contiguous lanes) — libtorch's order for bicubic (x, then y). A crop has
/// fewer rows than the view in all but the largest crops, so this gathers less than
/// resampling each output row.
#[inline(always)]
fn resized_crop_u8<const N: usize>(
    canvas: &[u8],
    s: usize,
    (xs, ys): (&[Tap<N>], &[Tap<N>]),
    size: usize,
    out: &mut [f32],
    rows: &mut Vec<f32>,
) {
    let y_lo = ys.iter().map(|t| t.idx[0]).min().unwrap_or(0);
    let y_hi = ys.iter().map(|t| t.idx[N - 1]).max().unwrap_or(0) + 1;
    rows.resize((y_hi - y_lo) * size, 0.0);
    for c in 0..3 {
        let plane = &canvas[c * s * s..(c + 1) * s * s];
        for (y, hrow) in (y_lo..y_hi).zip(rows.chunks_exact_mut(size)) {
            let src = &plane[y * s..(y + 1) * s];
            for (o, tx) in hrow.iter_mut().zip(xs) {
                *o = tx.apply(src);
            }
        }
        let dst = &mut out[c * size * size..(c + 1) * size * size];
        for (ty, orow) in ys.iter().zip(dst.chunks_exact_mut(size)) {
            let r: [&[f32]; N] = ty
                .idx
                .map(|y| &rows[(y - y_lo) * size..(y - y_lo + 1) * size]);
            // Term by term over whole rows (contiguous lanes), in the order of the sum.
            for (o, &a) in orow.iter_mut().zip(r[0]) {
                *o = a * ty.w[0];
            }
            for (rk, &wk) in r.iter().zip(&ty.w).skip(1) {
                for (o, &a) in orow.iter_mut().zip(*rk) {
                    *o += a * wk;
                }
            }
            for o in orow.iter_mut() {
                *o *= 1.0 / 255.0;
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
/// the resized crop and flip (`cfg.interpolation`), the colour stages and the
/// normalisation by `cfg.mean`/`cfg.std`, written into the view's output; samples split
/// over `threads` threads.
///
/// # Shapes
/// `canvas`: `[B, 3, S, S]` uint8, contiguous, sample `i` valid over `valid[i]`
/// (height, width) from the top-left; each view's `out`: `[B, 3, size, size]`.
///
/// # Panics
/// Lengths that do not match those shapes, parameters for another batch size, an empty
/// canvas or view, or a blur kernel whose half is not smaller than the view (reflect
/// padding needs it).
pub fn views_from_canvas(
    (canvas, valid): (&[u8], &[(i32, i32)]),
    s: usize,
    views: &mut [ViewOut],
    cfg: &AugmentConfig,
    threads: usize,
) {
    let size = cfg.size as usize;
    assert!(
        s > 0 && size > 0,
        "canvas {s} and view {size} must not be empty"
    );
    assert!(
        (cfg.blur_kernel() as usize) / 2 < size,
        "blur kernel {} too large for {size}-px views",
        cfg.blur_kernel()
    );
    let per_in = 3 * s * s;
    let b = canvas.len() / per_in;
    assert_eq!(b * per_in, canvas.len());
    assert_eq!(valid.len(), b);
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
    let frame = Frame {
        canvas: s,
        size,
        blur_k: cfg.blur_kernel() as usize,
        mean: cfg.mean.map(|m| m as f32),
        std: cfg.std.map(|s| s as f32),
        bicubic: cfg.interpolation == Interpolation::Bicubic,
    };
    let avx2 = uses_avx2();
    #[cfg(not(target_arch = "x86_64"))]
    let _ = avx2;
    std::thread::scope(|scope| {
        for (t, mut outs) in parts.into_iter().enumerate() {
            let canvas = &canvas[t * chunk * per_in..((t + 1) * chunk).min(b) * per_in];
            let frame = &frame;
            scope.spawn(move || {
                let mut sc = Scratch::default();
                for (j, cv) in canvas.chunks_exact(per_in).enumerate() {
                    let i = t * chunk + j;
                    let cv = (cv, valid[i]);
                    for (p, threshold, out) in outs.iter_mut() {
                        let px = &mut out[j * per..(j + 1) * per];
                        let view = (&**p, i, *threshold);
                        #[cfg(target_arch = "x86_64")]
                        if avx2 {
                            // Safety: AVX2 was detected on this CPU.
                            unsafe { view_of_sample_avx2(cv, frame, view, px, &mut sc) };
                            continue;
                        }
                        view_of_sample(cv, frame, view, px, &mut sc);
                    }
                }
            });
        }
    });
}
