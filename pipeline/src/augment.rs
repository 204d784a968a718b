//! BYOL's two views, made on the device (GPU when present, CPU otherwise) with tch.
//!
//! Every probability and parameter is drawn per sample from a generator the caller
//! owns ([`SplitMix64`], whose whole state is one `u64` that checkpoints store). The
//! operations follow `torchvision.transforms.v2.functional` on float images in [0, 1]
//! (values clamped after each step, as torchvision does):
//!
//! 1. random resized crop inside each sample's valid region (torchvision's
//!    `RandomResizedCrop.get_params`: 10 tries, then the centre-crop fallback) and
//!    horizontal flip, for the whole batch in one `grid_sample` (bilinear by default,
//!    bicubic selectable; no antialiasing, i.e. `antialias=False`);
//! 2. colour jitter with probability p: brightness, contrast, saturation, hue, factors
//!    and the order of the four drawn per sample;
//! 3. grayscale with probability p;
//! 4. Gaussian blur with probability p, σ ~ U(σ_min, σ_max) per sample, separable,
//!    kernel 23 at 224 px scaled with the output size, reflect padding;
//! 5. solarize (x ≥ threshold → 1 − x) with probability p;
//! 6. normalisation by mean and std.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

pub use byol_tools::rng::SplitMix64;

/// Settings of one view.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ViewConfig {
    /// Crop area as a fraction of the valid region: U(min, max).
    pub crop_scale: [f64; 2],
    /// Crop aspect ratio (w/h): log-uniform in [min, max].
    pub crop_ratio: [f64; 2],
    pub flip_p: f64,
    pub jitter_p: f64,
    pub brightness: f64,
    pub contrast: f64,
    pub saturation: f64,
    pub hue: f64,
    pub grayscale_p: f64,
    pub blur_p: f64,
    pub blur_sigma: [f64; 2],
    pub solarize_p: f64,
    pub solarize_threshold: f64,
}

impl Default for ViewConfig {
    /// BYOL's view 1.
    fn default() -> Self {
        ViewConfig {
            crop_scale: [0.08, 1.0],
            crop_ratio: [3.0 / 4.0, 4.0 / 3.0],
            flip_p: 0.5,
            jitter_p: 0.8,
            brightness: 0.4,
            contrast: 0.4,
            saturation: 0.2,
            hue: 0.1,
            grayscale_p: 0.2,
            blur_p: 1.0,
            blur_sigma: [0.1, 2.0],
            solarize_p: 0.0,
            solarize_threshold: 0.5,
        }
    }
}

impl ViewConfig {
    /// BYOL's view 2: blur 0.1, solarize 0.2.
    pub fn byol_view2() -> Self {
        ViewConfig {
            blur_p: 0.1,
            solarize_p: 0.2,
            ..ViewConfig::default()
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    Bilinear,
    Bicubic,
}

/// Settings of the two-view augmentation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// Output side (views are size × size).
    pub size: i64,
    pub interpolation: Interpolation,
    /// Blur kernel at 224 px (scaled with `size`, kept odd, at least 3).
    pub blur_kernel_224: i64,
    pub mean: [f64; 3],
    pub std: [f64; 3],
    pub view1: ViewConfig,
    pub view2: ViewConfig,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            size: 224,
            interpolation: Interpolation::Bilinear,
            blur_kernel_224: 23,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
            view1: ViewConfig::default(),
            view2: ViewConfig::byol_view2(),
        }
    }
}

impl AugmentConfig {
    pub fn blur_kernel(&self) -> i64 {
        let mut k = (self.blur_kernel_224 as f64 * self.size as f64 / 224.0).round() as i64;
        if k % 2 == 0 {
            k += 1;
        }
        k.max(3)
    }
}

/// A crop box in canvas pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CropBox {
    pub top: i64,
    pub left: i64,
    pub height: i64,
    pub width: i64,
}

/// torchvision's `RandomResizedCrop.get_params` on a `h`×`w` region.
pub fn crop_params(
    rng: &mut SplitMix64,
    h: i64,
    w: i64,
    scale: [f64; 2],
    ratio: [f64; 2],
) -> CropBox {
    let area = (h * w) as f64;
    let (lr0, lr1) = (ratio[0].ln(), ratio[1].ln());
    for _ in 0..10 {
        let target = area * rng.uniform(scale[0], scale[1]);
        let aspect = rng.uniform(lr0, lr1).exp();
        let cw = (target * aspect).sqrt().round_ties_even() as i64;
        let ch = (target / aspect).sqrt().round_ties_even() as i64;
        if 0 < cw && cw <= w && 0 < ch && ch <= h {
            let top = rng.below((h - ch + 1) as u64) as i64;
            let left = rng.below((w - cw + 1) as u64) as i64;
            return CropBox {
                top,
                left,
                height: ch,
                width: cw,
            };
        }
    }
    let in_ratio = w as f64 / h as f64;
    let (ch, cw) = if in_ratio < ratio[0] {
        ((w as f64 / ratio[0]).round_ties_even() as i64, w)
    } else if in_ratio > ratio[1] {
        (h, (h as f64 * ratio[1]).round_ties_even() as i64)
    } else {
        (h, w)
    };
    CropBox {
        top: (h - ch) / 2,
        left: (w - cw) / 2,
        height: ch,
        width: cw,
    }
}

/// Normalised sampling coordinates along one axis for every output pixel:
/// torchvision's `resize` (align_corners=False) of the crop `[start, start+len)`.
fn axis_coords(
    start: i64,
    len: i64,
    out: i64,
    canvas: i64,
    flip: bool,
    clamp: bool,
) -> impl Iterator<Item = f32> {
    let scale = len as f64 / out as f64;
    (0..out).map(move |o| {
        let o = if flip { out - 1 - o } else { o };
        let mut src = (o as f64 + 0.5) * scale - 0.5;
        if clamp {
            src = src.clamp(0.0, (len - 1) as f64);
        }
        let x = start as f64 + src;
        ((2.0 * x + 1.0) / canvas as f64 - 1.0) as f32
    })
}

/// Resized crop (and horizontal flip) of every sample in one batched `grid_sample`.
///
/// `img`: float `[B, C, S, S]`; returns `[B, C, out, out]`.
pub fn resized_crop_flip(
    img: &Tensor,
    boxes: &[CropBox],
    flips: &[bool],
    out: i64,
    interp: Interpolation,
) -> Tensor {
    let (b, s) = (img.size()[0], img.size()[3]);
    assert_eq!(boxes.len() as i64, b);
    let clamp = interp == Interpolation::Bilinear;
    let mut gx = Vec::with_capacity((b * out) as usize);
    let mut gy = Vec::with_capacity((b * out) as usize);
    for (bx, &f) in boxes.iter().zip(flips) {
        gx.extend(axis_coords(bx.left, bx.width, out, s, f, clamp));
        gy.extend(axis_coords(
            bx.top,
            bx.height,
            out,
            img.size()[2],
            false,
            clamp,
        ));
    }
    let dev = img.device();
    let gx = Tensor::from_slice(&gx)
        .to_device(dev)
        .view([b, 1, out])
        .expand([b, out, out], false);
    let gy = Tensor::from_slice(&gy)
        .to_device(dev)
        .view([b, out, 1])
        .expand([b, out, out], false);
    let grid = Tensor::stack(&[gx, gy], 3).to_kind(img.kind());
    let mode = match interp {
        Interpolation::Bilinear => 0,
        Interpolation::Bicubic => 2,
    };
    // padding 1 = border; the clamped bilinear grid never leaves the crop anyway.
    img.grid_sampler_2d(&grid, mode, 1, false)
}

/// ITU-R 601 luma as torchvision computes it: `[N, 3, H, W]` → `[N, 1, H, W]`.
pub fn rgb_to_grayscale(img: &Tensor) -> Tensor {
    let c = img.unbind(1);
    let g: Tensor = &c[0] * 0.2989 + &c[1] * 0.587 + &c[2] * 0.114;
    g.unsqueeze(1)
}

/// Per-sample factors `[N]` as `[N, 1, 1, 1]` on the image's device and kind.
fn per_sample(f: &[f64], img: &Tensor) -> Tensor {
    let v: Vec<f32> = f.iter().map(|&x| x as f32).collect();
    Tensor::from_slice(&v)
        .to_device(img.device())
        .to_kind(img.kind())
        .view([-1, 1, 1, 1])
}

/// `1 - t`.
fn one_minus(t: &Tensor) -> Tensor {
    t.neg() + 1.0
}

/// torchvision's `_blend`: `ratio·a + (1 − ratio)·b`, clamped (as one `lerp` pass).
fn blend(a: &Tensor, b: &Tensor, ratio: &Tensor) -> Tensor {
    let mut x = b.lerp_tensor(a, ratio);
    let _ = x.clamp_(0.0, 1.0);
    x
}

pub fn adjust_brightness(img: &Tensor, f: &[f64]) -> Tensor {
    (img * per_sample(f, img)).clamp(0.0, 1.0)
}

pub fn adjust_contrast(img: &Tensor, f: &[f64]) -> Tensor {
    let mean = rgb_to_grayscale(img)
        .mean_dim([1i64, 2, 3].as_slice(), true, Kind::Float)
        .to_kind(img.kind());
    blend(img, &mean, &per_sample(f, img))
}

pub fn adjust_saturation(img: &Tensor, f: &[f64]) -> Tensor {
    blend(img, &rgb_to_grayscale(img), &per_sample(f, img))
}

/// torchvision's `_rgb_to_hsv`: `[N, 3, H, W]` → hue, saturation, value `[N, 1, H, W]` each.
fn rgb_to_hsv(img: &Tensor) -> (Tensor, Tensor, Tensor) {
    let c = img.split(1, 1);
    let (r, g, b) = (&c[0], &c[1], &c[2]);
    let maxc = img.amax([1i64].as_slice(), true);
    let minc = img.amin([1i64].as_slice(), true);
    let cr = &maxc - &minc;
    let eqc = cr.eq(0.0);
    let ones = maxc.ones_like();
    let s = &cr / ones.where_self(&eqc, &maxc);
    let crd = ones.where_self(&eqc, &cr);
    // torchvision: bc − gc if max is red; 2 + rc − bc if green; 4 + gc − rc else, with
    // xc = (max − x)/cr; so bc − gc = (g − b)/cr etc.: the same values in fewer passes.
    let h_r: Tensor = (g - b) / &crd;
    let h_g: Tensor = (b - r) / &crd + 2.0;
    let h_b: Tensor = (r - g) / &crd + 4.0;
    let h = h_r.where_self(
        &maxc.eq_tensor(r),
        &h_g.where_self(&maxc.eq_tensor(g), &h_b),
    );
    let h = (h / 6.0 + 1.0).fmod(1.0);
    (h, s, maxc)
}

/// HSV → RGB in closed form (`v − v·s·clamp(min(k, 4 − k), 0, 1)`, k = (n + 6h) mod 6
/// for n = 5, 3, 1): the same values as torchvision's sector table, in fewer passes.
fn hsv_to_rgb(h: &Tensor, s: &Tensor, v: &Tensor) -> Tensor {
    let h6 = h * 6.0;
    let vs = v * s;
    let chan = |n: f64| -> Tensor {
        let k = (&h6 + n).remainder(6.0);
        let mut w = k.minimum(&(k.neg() + 4.0));
        let _ = w.clamp_(0.0, 1.0);
        v - &vs * w
    };
    Tensor::cat(&[chan(5.0), chan(3.0), chan(1.0)], 1)
}

pub fn adjust_hue(img: &Tensor, f: &[f64]) -> Tensor {
    let (h, s, v) = rgb_to_hsv(img);
    let h = (h + per_sample(f, img)).remainder(1.0);
    hsv_to_rgb(&h, &s, &v)
}

/// Gaussian kernel as torchvision builds it.
pub fn gaussian_kernel1d(k: i64, sigma: f64) -> Vec<f32> {
    let half = (k - 1) as f64 * 0.5;
    let pdf: Vec<f64> = (0..k)
        .map(|i| {
            let x = -half + i as f64;
            (-0.5 * (x / sigma).powi(2)).exp()
        })
        .collect();
    let sum: f64 = pdf.iter().sum();
    pdf.iter().map(|p| (p / sum) as f32).collect()
}

/// Separable Gaussian blur with per-sample σ and reflect padding: `[N, C, H, W]`.
pub fn gaussian_blur(img: &Tensor, k: i64, sigmas: &[f64]) -> Tensor {
    let sz = img.size();
    let (n, c, h, w) = (sz[0], sz[1], sz[2], sz[3]);
    let mut ker = Vec::with_capacity((n * c * k) as usize);
    for &s in sigmas {
        let k1 = gaussian_kernel1d(k, s);
        for _ in 0..c {
            ker.extend_from_slice(&k1);
        }
    }
    let ker = Tensor::from_slice(&ker)
        .to_device(img.device())
        .to_kind(img.kind());
    let half = k / 2;
    let x = img
        .reshape([1, n * c, h, w])
        .reflection_pad2d([half, half, half, half]);
    let x = x.conv2d(
        &ker.view([n * c, 1, k, 1]),
        None::<Tensor>,
        [1, 1],
        [0, 0],
        [1, 1],
        n * c,
    );
    let x = x.conv2d(
        &ker.view([n * c, 1, 1, k]),
        None::<Tensor>,
        [1, 1],
        [0, 0],
        [1, 1],
        n * c,
    );
    x.reshape([n, c, h, w])
}

pub fn solarize(img: &Tensor, threshold: f64) -> Tensor {
    one_minus(img).where_self(&img.ge(threshold), img)
}

/// Applies `f` to the samples listed in `idx` only (in place of the others).
fn on_subset(img: &Tensor, idx: &[i64], f: impl FnOnce(&Tensor) -> Tensor) -> Tensor {
    if idx.is_empty() {
        return img.shallow_clone();
    }
    if idx.len() as i64 == img.size()[0] {
        return f(img);
    }
    let it = Tensor::from_slice(idx).to_device(img.device());
    let sub = f(&img.index_select(0, &it));
    img.index_copy(0, &it, &sub)
}

/// Everything drawn for one view of one batch (for tests and previews).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ViewParams {
    pub boxes: Vec<CropBox>,
    pub flips: Vec<bool>,
    pub jitter: Vec<bool>,
    /// brightness, contrast, saturation, hue factors.
    pub factors: Vec<[f64; 4]>,
    /// Order of the four jitter operations (indices into `factors`).
    pub order: Vec<[usize; 4]>,
    pub grayscale: Vec<bool>,
    pub blur: Vec<bool>,
    pub sigma: Vec<f64>,
    pub solarize: Vec<bool>,
}

/// Draws every parameter of one view for samples with the given valid regions.
pub fn draw_view(rng: &mut SplitMix64, v: &ViewConfig, valid: &[(i32, i32)]) -> ViewParams {
    let n = valid.len();
    let mut p = ViewParams {
        boxes: Vec::with_capacity(n),
        flips: Vec::with_capacity(n),
        jitter: Vec::with_capacity(n),
        factors: Vec::with_capacity(n),
        order: Vec::with_capacity(n),
        grayscale: Vec::with_capacity(n),
        blur: Vec::with_capacity(n),
        sigma: Vec::with_capacity(n),
        solarize: Vec::with_capacity(n),
    };
    for &(h, w) in valid {
        p.boxes.push(crop_params(
            rng,
            h.max(1) as i64,
            w.max(1) as i64,
            v.crop_scale,
            v.crop_ratio,
        ));
        p.flips.push(rng.bernoulli(v.flip_p));
        p.jitter.push(rng.bernoulli(v.jitter_p));
        p.factors.push([
            rng.uniform(1.0 - v.brightness, 1.0 + v.brightness).max(0.0),
            rng.uniform(1.0 - v.contrast, 1.0 + v.contrast).max(0.0),
            rng.uniform(1.0 - v.saturation, 1.0 + v.saturation).max(0.0),
            rng.uniform(-v.hue, v.hue),
        ]);
        let mut o = [0usize, 1, 2, 3];
        rng.shuffle(&mut o);
        p.order.push(o);
        p.grayscale.push(rng.bernoulli(v.grayscale_p));
        p.blur.push(rng.bernoulli(v.blur_p));
        p.sigma.push(rng.uniform(v.blur_sigma[0], v.blur_sigma[1]));
        p.solarize.push(rng.bernoulli(v.solarize_p));
    }
    p
}

/// Replicates each sample's last valid row and column over the rest of its canvas, so
/// that a bicubic kernel reaching past a crop at the valid region's edge reads valid
/// pixels only (bilinear sampling is clamped to the crop and needs no such step).
pub fn replicate_beyond_valid(img: &Tensor, valid: &[(i32, i32)]) -> Tensor {
    let sz = img.size();
    let (b, c, h, w) = (sz[0], sz[1], sz[2], sz[3]);
    let mut iy = Vec::with_capacity((b * h) as usize);
    let mut ix = Vec::with_capacity((b * w) as usize);
    for &(vh, vw) in valid {
        iy.extend((0..h).map(|y| y.min(vh.max(1) as i64 - 1)));
        ix.extend((0..w).map(|x| x.min(vw.max(1) as i64 - 1)));
    }
    let dev = img.device();
    let iy = Tensor::from_slice(&iy)
        .to_device(dev)
        .view([b, 1, h, 1])
        .expand([b, c, h, w], false);
    let ix = Tensor::from_slice(&ix)
        .to_device(dev)
        .view([b, 1, 1, w])
        .expand([b, c, h, w], false);
    img.gather(2, &iy, false).gather(3, &ix, false)
}

/// Applies drawn parameters: `img` float `[B, 3, S, S]` in [0, 1] → view `[B, 3, size, size]`
/// in [0, 1] (before normalisation). For bicubic sampling `img` should have gone
/// through [`replicate_beyond_valid`].
///
/// On the CPU the colour stages run fused per sample ([`crate::augment_cpu`]); elsewhere,
/// or with `fused_cpu` false, as batched tensor ops ([`colour_stages`]).
pub fn apply_view(img: &Tensor, p: &ViewParams, cfg: &AugmentConfig, threshold: f64) -> Tensor {
    apply_view_with(img, p, cfg, threshold, true)
}

/// [`apply_view`], choosing whether the CPU uses the fused per-sample stages.
pub fn apply_view_with(
    img: &Tensor,
    p: &ViewParams,
    cfg: &AugmentConfig,
    threshold: f64,
    fused_cpu: bool,
) -> Tensor {
    let x = resized_crop_flip(img, &p.boxes, &p.flips, cfg.size, cfg.interpolation);
    let k = cfg.blur_kernel();
    if fused_cpu && x.device() == Device::Cpu && x.kind() == Kind::Float && k / 2 < cfg.size {
        let x = x.contiguous();
        let n = x.numel();
        let s = cfg.size as usize;
        // Safety: `x` is a contiguous float32 CPU tensor of `n` elements that nothing
        // else references (a fresh output of the crop), so the slice is its whole,
        // exclusively borrowed storage for the duration of the call.
        let px = unsafe { std::slice::from_raw_parts_mut(x.data_ptr() as *mut f32, n) };
        let threads = tch::get_num_threads().max(1) as usize;
        crate::augment_cpu::colour_stages(px, (s, s), p, k as usize, threshold, threads);
        return x;
    }
    colour_stages(x, p, cfg, threshold)
}

/// The colour stages (jitter, grayscale, blur, solarize) as batched tensor ops on any
/// device: `x` is the resized crops `[B, 3, size, size]`, not yet clamped.
pub fn colour_stages(x: Tensor, p: &ViewParams, cfg: &AugmentConfig, threshold: f64) -> Tensor {
    let mut x = x.clamp(0.0, 1.0);
    // Colour jitter: four stages; at each, every jittered sample applies its own next op
    // (each op runs once per stage on the subset of samples that need it).
    let n = p.jitter.len();
    for stage in 0..4 {
        for op in 0..4 {
            let idx: Vec<i64> = (0..n)
                .filter(|&i| p.jitter[i] && p.order[i][stage] == op)
                .map(|i| i as i64)
                .collect();
            let f: Vec<f64> = idx.iter().map(|&i| p.factors[i as usize][op]).collect();
            x = on_subset(&x, &idx, |s| match op {
                0 => adjust_brightness(s, &f),
                1 => adjust_contrast(s, &f),
                2 => adjust_saturation(s, &f),
                _ => adjust_hue(s, &f),
            });
        }
    }
    let g: Vec<i64> = (0..p.grayscale.len())
        .filter(|&i| p.grayscale[i])
        .map(|i| i as i64)
        .collect();
    x = on_subset(&x, &g, |s| {
        rgb_to_grayscale(s)
            .expand([-1, 3, -1, -1], false)
            .contiguous()
    });
    let bl: Vec<i64> = (0..p.blur.len())
        .filter(|&i| p.blur[i])
        .map(|i| i as i64)
        .collect();
    let sig: Vec<f64> = bl.iter().map(|&i| p.sigma[i as usize]).collect();
    let k = cfg.blur_kernel();
    x = on_subset(&x, &bl, |s| gaussian_blur(s, k, &sig));
    let so: Vec<i64> = (0..p.solarize.len())
        .filter(|&i| p.solarize[i])
        .map(|i| i as i64)
        .collect();
    on_subset(&x, &so, |s| solarize(s, threshold))
}

/// Mean/std normalisation per channel.
pub fn normalize(x: &Tensor, mean: [f64; 3], std: [f64; 3]) -> Tensor {
    let dev = x.device();
    let m = Tensor::from_slice(&mean.map(|v| v as f32))
        .to_device(dev)
        .to_kind(x.kind())
        .view([1, 3, 1, 1]);
    let s = Tensor::from_slice(&std.map(|v| v as f32))
        .to_device(dev)
        .to_kind(x.kind())
        .view([1, 3, 1, 1]);
    (x - m) / s
}

/// The two-view augmentation.
#[derive(Debug, Clone)]
pub struct Augmenter {
    pub cfg: AugmentConfig,
    /// On the CPU, run the colour stages fused per sample (the default; false: the
    /// batched tensor ops every device uses, for comparison).
    pub fused_cpu: bool,
}

impl Augmenter {
    pub fn new(cfg: AugmentConfig) -> Augmenter {
        Augmenter {
            cfg,
            fused_cpu: true,
        }
    }

    /// uint8 canvases `[B, 3, S, S]` on `device` (with each sample's valid region) →
    /// two normalised float views `[B, 3, size, size]`.
    pub fn views(
        &self,
        canvas: &Tensor,
        valid: &[(i32, i32)],
        rng: &mut SplitMix64,
    ) -> (Tensor, Tensor) {
        let (v1, v2, _, _) = self.views_with_params(canvas, valid, rng);
        (v1, v2)
    }

    /// As [`Augmenter::views`], also returning the drawn parameters; views are
    /// normalised.
    pub fn views_with_params(
        &self,
        canvas: &Tensor,
        valid: &[(i32, i32)],
        rng: &mut SplitMix64,
    ) -> (Tensor, Tensor, ViewParams, ViewParams) {
        let mut img = canvas.to_kind(Kind::Float) / 255.0;
        if self.cfg.interpolation == Interpolation::Bicubic {
            img = replicate_beyond_valid(&img, valid);
        }
        let p1 = draw_view(rng, &self.cfg.view1, valid);
        let p2 = draw_view(rng, &self.cfg.view2, valid);
        let (t1, t2) = (
            self.cfg.view1.solarize_threshold,
            self.cfg.view2.solarize_threshold,
        );
        let a = apply_view_with(&img, &p1, &self.cfg, t1, self.fused_cpu);
        let b = apply_view_with(&img, &p2, &self.cfg, t2, self.fused_cpu);
        (
            normalize(&a, self.cfg.mean, self.cfg.std),
            normalize(&b, self.cfg.mean, self.cfg.std),
            p1,
            p2,
        )
    }

    /// Un-normalised uint8 views, for previews.
    pub fn to_uint8(&self, view: &Tensor) -> Tensor {
        let dev = view.device();
        let m = Tensor::from_slice(&self.cfg.mean.map(|v| v as f32))
            .to_device(dev)
            .view([1, 3, 1, 1]);
        let s = Tensor::from_slice(&self.cfg.std.map(|v| v as f32))
            .to_device(dev)
            .view([1, 3, 1, 1]);
        ((view * s + m) * 255.0)
            .round()
            .clamp(0.0, 255.0)
            .to_kind(Kind::Uint8)
    }
}

/// The device views are made on: CUDA when available.
pub fn default_device() -> Device {
    Device::cuda_if_available()
}
