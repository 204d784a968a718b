//! BYOL's view operations as batched tch ops on float images in [0, 1], following
//! `torchvision.transforms.v2.functional` (values clamped after each step, as torchvision
//! does); the parameters come from [`super::params`].

use tch::{Kind, Tensor};

use super::params::{
    axis_coords, gaussian_kernel1d, AugmentConfig, CropBox, Interpolation, ViewParams,
};

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
