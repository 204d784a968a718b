//! BYOL's two views, made on the device (GPU when present, CPU otherwise) with tch.
//!
//! Every probability and parameter is drawn per sample from a generator the caller
//! owns ([`SplitMix64`], whose whole state is one `u64` that checkpoints store). The
//! operations follow `torchvision.transforms.v2.functional` on float images in [0, 1]
//! (values clamped after each step, as torchvision does):
//!
//! 1. random resized crop inside each sample's valid region (torchvision's
//!    `RandomResizedCrop.get_params`: 10 tries, then the centre-crop fallback) and
//!    horizontal flip, `grid_sample`'s sampling (bilinear by default, bicubic
//!    selectable; no antialiasing, i.e. `antialias=False`): one batched op on a GPU,
//!    per sample from the uint8 canvas on the CPU;
//! 2. colour jitter with probability p: brightness, contrast, saturation, hue, factors
//!    and the order of the four drawn per sample;
//! 3. grayscale with probability p;
//! 4. Gaussian blur with probability p, σ ~ U(σ_min, σ_max) per sample, separable,
//!    kernel 23 at 224 px scaled with the output size, reflect padding;
//! 5. solarize (x ≥ threshold → 1 − x) with probability p;
//! 6. normalisation by mean and std.
//!
//! Modules: [`params`] draws every per-sample parameter (pure Rust); [`tensor`] applies
//! them as batched tch ops on any device; [`cpu`] makes each sample's views fused on
//! the CPU, straight from its uint8 canvas (bilinear or bicubic), or runs the colour
//! stages alone on float crops ([`apply_view`]). [`Augmenter`] chooses between the paths.

pub mod cpu;
pub mod params;
pub mod tensor;

pub use params::*;
pub use tensor::*;

use tch::{Device, Kind, Tensor};

/// The two-view augmentation.
#[derive(Debug, Clone)]
pub struct Augmenter {
    pub cfg: AugmentConfig,
    /// On the CPU, make each view per sample from the uint8 canvas, crop included
    /// ([`cpu::views_from_canvas`], the default); false: the batched tensor ops every
    /// device uses, for comparison.
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
    ///
    /// # Shapes
    /// `canvas`: `[B, 3, S, S]` uint8 → two `[B, 3, size, size]` float views.
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
        let p1 = draw_view(rng, &self.cfg.view1, valid);
        let p2 = draw_view(rng, &self.cfg.view2, valid);
        let (t1, t2) = (
            self.cfg.view1.solarize_threshold,
            self.cfg.view2.solarize_threshold,
        );
        if self.fuses(canvas) {
            let mut v = self.fused_views(canvas, valid, &[(&p1, t1), (&p2, t2)]);
            let b = v.pop().expect("two views");
            let a = v.pop().expect("two views");
            return (a, b, p1, p2);
        }
        let mut img = canvas.to_kind(Kind::Float) / 255.0;
        if self.cfg.interpolation == Interpolation::Bicubic {
            img = replicate_beyond_valid(&img, valid);
        }
        let a = apply_view_with(&img, &p1, &self.cfg, t1, self.fused_cpu);
        let b = apply_view_with(&img, &p2, &self.cfg, t2, self.fused_cpu);
        (
            normalize(&a, self.cfg.mean, self.cfg.std),
            normalize(&b, self.cfg.mean, self.cfg.std),
            p1,
            p2,
        )
    }

    /// One normalised view per sample with only a random resized crop (inside each
    /// sample's valid region, torchvision's `RandomResizedCrop.get_params`) and a
    /// horizontal flip with probability `flip_p`: the augmentation of supervised
    /// fine-tuning (BYOL paper, appendix C.2).
    ///
    /// # Shapes
    /// `canvas`: `[B, 3, S, S]` uint8 → `[B, 3, size, size]` float view.
    pub fn crop_flip(
        &self,
        canvas: &Tensor,
        valid: &[(i32, i32)],
        (scale, ratio, flip_p): ([f64; 2], [f64; 2], f64),
        rng: &mut SplitMix64,
    ) -> Tensor {
        let view = ViewConfig {
            crop_scale: scale,
            crop_ratio: ratio,
            flip_p,
            jitter_p: 0.0,
            grayscale_p: 0.0,
            blur_p: 0.0,
            solarize_p: 0.0,
            ..ViewConfig::default()
        };
        let p = draw_view(rng, &view, valid);
        if self.fuses(canvas) {
            return self.fused_views(canvas, valid, &[(&p, 1.0)]).remove(0);
        }
        let mut img = canvas.to_kind(Kind::Float) / 255.0;
        if self.cfg.interpolation == Interpolation::Bicubic {
            img = replicate_beyond_valid(&img, valid);
        }
        let x = resized_crop_flip(
            &img,
            &p.boxes,
            &p.flips,
            self.cfg.size,
            self.cfg.interpolation,
        );
        // Clamped as a uint8 image's crop is (bicubic overshoots), as the BYOL views are.
        normalize(&x.clamp(0.0, 1.0), self.cfg.mean, self.cfg.std)
    }

    /// Whether views of `canvas` are made by [`cpu::views_from_canvas`]: a uint8 canvas
    /// on the CPU and a blur kernel whose reflect padding fits the view.
    fn fuses(&self, canvas: &Tensor) -> bool {
        self.fused_cpu
            && canvas.device() == Device::Cpu
            && canvas.kind() == Kind::Uint8
            && self.cfg.blur_kernel() / 2 < self.cfg.size
    }

    /// Normalised views `[B, 3, size, size]` of a CPU uint8 canvas `[B, 3, S, S]`, one per
    /// (parameters, solarize threshold), fused per sample ([`cpu::views_from_canvas`]).
    fn fused_views(
        &self,
        canvas: &Tensor,
        valid: &[(i32, i32)],
        views: &[(&ViewParams, f64)],
    ) -> Vec<Tensor> {
        let canvas = canvas.contiguous();
        let sz = canvas.size();
        let (b, s) = (sz[0], sz[3] as usize);
        assert_eq!((sz[1], sz[2]), (3, sz[3]), "canvases are [B, 3, S, S]");
        let size = self.cfg.size;
        let outs: Vec<Tensor> = views
            .iter()
            .map(|_| {
                let t = Tensor::empty([b, 3, size, size], (Kind::Float, Device::Cpu));
                advise_huge_pages(t.data_ptr() as *mut u8, 4 * t.numel());
                t
            })
            .collect();
        if b == 0 || size == 0 {
            // No storage to hand out as slices (an empty tensor's data pointer is null).
            return outs;
        }
        // Safety: `canvas` is a contiguous uint8 CPU tensor, read only; each output is a
        // fresh contiguous float32 CPU tensor nothing else references; all outlive the
        // call, and the slices cover exactly their storage.
        let input =
            unsafe { std::slice::from_raw_parts(canvas.data_ptr() as *const u8, canvas.numel()) };
        let mut slots: Vec<cpu::ViewOut> = views
            .iter()
            .zip(&outs)
            .map(|(&(params, threshold), o)| cpu::ViewOut {
                params,
                threshold,
                out: unsafe { std::slice::from_raw_parts_mut(o.data_ptr() as *mut f32, o.numel()) },
            })
            .collect();
        let threads = tch::get_num_threads().max(1) as usize;
        cpu::views_from_canvas((input, valid), s, &mut slots, &self.cfg, threads);
        outs
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

/// Asks the kernel for transparent huge pages under a fresh, untouched buffer of `len`
/// bytes (Linux with THP in `madvise` mode, Debian's default): a batch of views (38 MB
/// at batch 64 and 224 px, a fresh mapping each batch) is then faulted in 2 MiB at a
/// time instead of 4 KiB. Advice only: without THP nothing changes.
fn advise_huge_pages(ptr: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = (ptr as usize).next_multiple_of(HUGE);
        let end = (ptr as usize + len) / HUGE * HUGE;
        if end > start {
            // Safety: the range lies inside an allocation this caller owns; madvise only
            // advises the kernel and never changes the memory's contents or validity.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, len);
}

/// The device views are made on: CUDA when available.
pub fn default_device() -> Device {
    Device::cuda_if_available()
}

/// Applies drawn parameters: `img` float `[B, 3, S, S]` in [0, 1] → view `[B, 3, size, size]`
/// in [0, 1] (before normalisation). For bicubic sampling `img` should have gone
/// through [`replicate_beyond_valid`].
///
/// On the CPU the colour stages run fused per sample ([`cpu`]); elsewhere,
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
    if fused_cpu
        && x.device() == Device::Cpu
        && x.kind() == Kind::Float
        && k / 2 < cfg.size
        && x.numel() > 0
    {
        let x = x.contiguous();
        let n = x.numel();
        let s = cfg.size as usize;
        // Safety: `x` is a contiguous float32 CPU tensor of `n` elements that nothing
        // else references (a fresh output of the crop), so the slice is its whole,
        // exclusively borrowed storage for the duration of the call.
        let px = unsafe { std::slice::from_raw_parts_mut(x.data_ptr() as *mut f32, n) };
        let threads = tch::get_num_threads().max(1) as usize;
        cpu::colour_stages(px, (s, s), p, k as usize, threshold, threads);
        return x;
    }
    colour_stages(x, p, cfg, threshold)
}
