//! Augmentation parameters drawn on the host: per-sample crop boxes, flips, colour
//! factors and blur sigmas, drawn from a caller-owned [`SplitMix64`]. Pure Rust: both
//! the tensor path ([`super::tensor`]) and the fused CPU path ([`super::cpu`]) read them.

use serde::{Deserialize, Serialize};

pub use byol_format::rng::SplitMix64;

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
pub(crate) fn axis_coords(
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
