//! The colour stages of a view (jitter, grayscale, blur, solarize) fused per sample for
//! the CPU.
//!
//! The tensor path in [`crate::augment`] makes about 60 passes over a float batch; on a
//! CPU each pass streams the whole batch through memory (a `[64, 3, 224, 224]` batch is
//! 38 MB) and the batch-wide ops do nothing for samples outside their subset but copy
//! them. Here each sample goes through all its steps while its 600 KB stay in cache,
//! samples split over libtorch's intra-op thread count. The arithmetic is the tensor
//! path's, step for step, in float32 (tests hold the two to 1e-5); only sums (the
//! contrast mean, the blur taps) may round differently.

use super::params::{gaussian_kernel1d, ViewParams};

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

    fn brightness(&mut self, f: f32) {
        for v in self.px.iter_mut() {
            *v = (*v * f).clamp(0.0, 1.0);
        }
    }

    /// torchvision's `_blend(img, other, ratio)`: `other + ratio·(img − other)`, as
    /// libtorch's `lerp` computes it, clamped.
    fn blend_with(&mut self, other: impl Fn(usize) -> f32, ratio: f32) {
        let n = self.plane();
        for c in 0..3 {
            for (i, v) in self.px[c * n..(c + 1) * n].iter_mut().enumerate() {
                *v = lerp(other(i), *v, ratio).clamp(0.0, 1.0);
            }
        }
    }

    fn gray(&self, i: usize) -> f32 {
        let n = self.plane();
        self.px[i] * 0.2989 + self.px[n + i] * 0.587 + self.px[2 * n + i] * 0.114
    }

    fn contrast(&mut self, f: f32) {
        let n = self.plane();
        let mean = ((0..n).map(|i| self.gray(i) as f64).sum::<f64>() / n as f64) as f32;
        self.blend_with(|_| mean, f);
    }

    fn saturation(&mut self, f: f32) {
        let g: Vec<f32> = (0..self.plane()).map(|i| self.gray(i)).collect();
        self.blend_with(|i| g[i], f);
    }

    fn hue(&mut self, f: f32) {
        let n = self.plane();
        let (r, rest) = self.px.split_at_mut(n);
        let (g, b) = rest.split_at_mut(n);
        for i in 0..n {
            let (h, s, v) = rgb_to_hsv(r[i], g[i], b[i]);
            let h = remainder(h + f, 1.0);
            let (nr, ng, nb) = hsv_to_rgb(h, s, v);
            (r[i], g[i], b[i]) = (nr, ng, nb);
        }
    }

    fn grayscale(&mut self) {
        let n = self.plane();
        for i in 0..n {
            let y = self.gray(i);
            self.px[i] = y;
            self.px[n + i] = y;
            self.px[2 * n + i] = y;
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
            if *v >= threshold {
                *v = 1.0 - *v;
            }
        }
    }
}

/// libtorch's `lerp(start, end, weight)` for float32.
fn lerp(start: f32, end: f32, weight: f32) -> f32 {
    if weight.abs() < 0.5 {
        start + weight * (end - start)
    } else {
        end - (end - start) * (1.0 - weight)
    }
}

/// Python-style remainder (the sign of the divisor), as libtorch computes it.
fn remainder(a: f32, b: f32) -> f32 {
    let m = a % b;
    if m != 0.0 && ((b < 0.0) != (m < 0.0)) {
        m + b
    } else {
        m
    }
}

fn reflect(i: isize, n: usize) -> usize {
    let n = n as isize;
    let j = if i < 0 { -i } else { i };
    (if j >= n { 2 * (n - 1) - j } else { j }) as usize
}

/// The tensor path's `rgb_to_hsv` for one pixel.
fn rgb_to_hsv(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    let cr = maxc - minc;
    let eqc = cr == 0.0;
    let s = cr / if eqc { 1.0 } else { maxc };
    let crd = if eqc { 1.0 } else { cr };
    let h = if maxc == r {
        (g - b) / crd
    } else if maxc == g {
        (b - r) / crd + 2.0
    } else {
        (r - g) / crd + 4.0
    };
    // fmod(h/6 + 1, 1): the argument is positive.
    let x = h / 6.0 + 1.0;
    (x - x.trunc(), s, maxc)
}

/// The tensor path's closed-form `hsv_to_rgb` for one pixel.
fn hsv_to_rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    let h6 = h * 6.0;
    let vs = v * s;
    let chan = |n: f32| {
        let k = remainder(h6 + n, 6.0);
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
    for v in s.px.iter_mut() {
        *v = v.clamp(0.0, 1.0);
    }
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
