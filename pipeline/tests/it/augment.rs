//! The augmentation against torchvision (golden files from the venv), its statistics,
//! its valid-region guarantee and its determinism.

use std::path::Path;
use std::process::Command;

use byol_pipeline::augment::*;
use tch::{Device, Kind, Tensor};

use super::{python, root};

fn golden(dir: &Path) -> serde_json::Value {
    let o = Command::new(python())
        .arg(root().join("scripts/fixtures/augment_golden.py"))
        .arg(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_str(&std::fs::read_to_string(dir.join("params.json")).unwrap()).unwrap()
}

fn npy(dir: &Path, name: &str) -> Tensor {
    Tensor::read_npy(dir.join(format!("{name}.npy"))).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn device() -> Device {
    Device::cuda_if_available()
}

#[test]
fn each_op_with_fixed_parameters_matches_torchvision() {
    let tmp = tempfile::tempdir().unwrap();
    let p = golden(tmp.path());
    let d = tmp.path();
    let dev = device();
    let img = npy(d, "input").to_device(dev);
    let boxes: Vec<CropBox> = p["boxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let v: Vec<i64> = b
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect();
            CropBox {
                top: v[0],
                left: v[1],
                height: v[2],
                width: v[3],
            }
        })
        .collect();
    let flips: Vec<bool> = p["flips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_bool().unwrap())
        .collect();
    let size = p["size"].as_i64().unwrap();
    let cpu = |t: Tensor| t.to_device(Device::Cpu);

    let bil = cpu(resized_crop_flip(
        &img,
        &boxes,
        &flips,
        size,
        Interpolation::Bilinear,
    ));
    let e = max_diff(&bil, &npy(d, "crop_bilinear"));
    assert!(e < 1e-5, "bilinear resized crop: max |diff| {e}");
    // Bicubic: identical inside the crop; at crop borders torchvision clamps to the
    // crop while grid_sample reads the neighbouring canvas pixels.
    let bic = cpu(resized_crop_flip(
        &img,
        &boxes,
        &flips,
        size,
        Interpolation::Bicubic,
    ));
    let want = npy(d, "crop_bicubic");
    let inner = |t: &Tensor| t.narrow(2, 2, size - 4).narrow(3, 2, size - 4);
    let e = max_diff(&inner(&bic.narrow(0, 0, 1)), &inner(&want.narrow(0, 0, 1)));
    assert!(e < 1e-4, "bicubic, full-canvas crop: {e}");
    let e = (&bic - &want).abs().mean(Kind::Float).double_value(&[]);
    assert!(e < 0.02, "bicubic mean |diff| {e}");

    let cases: [(&str, Tensor, f64); 8] = [
        (
            "brightness",
            adjust_brightness(&img, &floats(&p["brightness"])),
            1e-6,
        ),
        (
            "contrast",
            adjust_contrast(&img, &floats(&p["contrast"])),
            1e-6,
        ),
        (
            "saturation",
            adjust_saturation(&img, &floats(&p["saturation"])),
            1e-6,
        ),
        ("hue", adjust_hue(&img, &floats(&p["hue"])), 1e-5),
        (
            "grayscale",
            rgb_to_grayscale(&img).expand([-1, 3, -1, -1], false),
            1e-6,
        ),
        (
            "blur",
            gaussian_blur(&img, p["kernel"].as_i64().unwrap(), &floats(&p["sigmas"])),
            1e-5,
        ),
        ("solarize", solarize(&img, 0.5), 0.0),
        (
            "normalize",
            normalize(&img, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            1e-5,
        ),
    ];
    for (name, got, tol) in cases {
        let e = max_diff(&cpu(got), &npy(d, name));
        assert!(e <= tol, "{name}: max |diff| {e} > {tol}");
    }
}

fn valid_sizes(n: usize, s: i32) -> Vec<(i32, i32)> {
    (0..n)
        .map(|i| (s - (i as i32 * 7) % (s / 2), s - (i as i32 * 13) % (s / 2)))
        .collect()
}

#[test]
fn probabilities_and_ranges_hold_per_sample() {
    let n = 4000;
    let valid = valid_sizes(n, 64);
    let mut rng = SplitMix64::new(42);
    let v1 = ViewConfig::default();
    let v2 = ViewConfig::byol_view2();
    let a = draw_view(&mut rng, &v1, &valid);
    let b = draw_view(&mut rng, &v2, &valid);
    let frac = |v: &[bool]| v.iter().filter(|&&x| x).count() as f64 / v.len() as f64;
    let near = |x: f64, p: f64| (x - p).abs() < 4.0 * (p * (1.0 - p) / n as f64).sqrt() + 1e-9;
    for (p, v) in [(&a, &v1), (&b, &v2)] {
        assert!(near(frac(&p.flips), v.flip_p), "flip {}", frac(&p.flips));
        assert!(
            near(frac(&p.jitter), v.jitter_p),
            "jitter {}",
            frac(&p.jitter)
        );
        assert!(near(frac(&p.grayscale), v.grayscale_p));
        assert!(
            near(frac(&p.blur), v.blur_p),
            "blur {} vs {}",
            frac(&p.blur),
            v.blur_p
        );
        assert!(
            near(frac(&p.solarize), v.solarize_p),
            "solarize {}",
            frac(&p.solarize)
        );
        let mut orders = std::collections::HashSet::new();
        for (i, f) in p.factors.iter().enumerate() {
            assert!((0.6..=1.4).contains(&f[0]) && (0.6..=1.4).contains(&f[1]));
            assert!((0.8..=1.2).contains(&f[2]) && (-0.1..=0.1).contains(&f[3]));
            assert!((0.1..=2.0).contains(&p.sigma[i]));
            orders.insert(p.order[i]);
        }
        assert_eq!(orders.len(), 24, "all 24 jitter orders occur");
        // Parameters vary per sample: spread close to a uniform's.
        let hue: Vec<f64> = p.factors.iter().map(|f| f[3]).collect();
        let mean = hue.iter().sum::<f64>() / n as f64;
        let var = hue.iter().map(|h| (h - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(
            (var.sqrt() - 0.2 / 12f64.sqrt()).abs() < 0.005,
            "hue std {}",
            var.sqrt()
        );
        // Crops: inside the valid region; area and aspect in range (fallbacks aside).
        let mut in_range = 0;
        for (bx, &(h, w)) in p.boxes.iter().zip(&valid) {
            assert!(bx.top >= 0 && bx.left >= 0 && bx.height > 0 && bx.width > 0);
            assert!(bx.top + bx.height <= h as i64 && bx.left + bx.width <= w as i64);
            let area = (bx.height * bx.width) as f64 / (h * w) as f64;
            let ratio = bx.width as f64 / bx.height as f64;
            if (0.07..=1.0).contains(&area) && (0.70..=1.45).contains(&ratio) {
                in_range += 1;
            }
        }
        assert!(in_range as f64 / n as f64 > 0.99);
    }
}

#[test]
fn crops_never_read_outside_the_valid_region() {
    let dev = device();
    let n = 256;
    let s = 48i64;
    let valid = valid_sizes(n, s as i32);
    // Valid region 0.25, everything else 1.0.
    let mut mask = vec![1.0f32; n * (s * s) as usize];
    for (i, &(h, w)) in valid.iter().enumerate() {
        for y in 0..h as usize {
            for x in 0..w as usize {
                mask[i * (s * s) as usize + y * s as usize + x] = 0.25;
            }
        }
    }
    let img = Tensor::from_slice(&mask)
        .view([n as i64, 1, s, s])
        .expand([n as i64, 3, s, s], false)
        .contiguous()
        .to_device(dev);
    let mut rng = SplitMix64::new(3);
    for interp in [Interpolation::Bilinear, Interpolation::Bicubic] {
        let p = draw_view(&mut rng, &ViewConfig::default(), &valid);
        let src = match interp {
            Interpolation::Bicubic => replicate_beyond_valid(&img, &valid),
            Interpolation::Bilinear => img.shallow_clone(),
        };
        let out = resized_crop_flip(&src, &p.boxes, &p.flips, 32, interp);
        let e = (out - 0.25).abs().max().double_value(&[]);
        assert!(e < 1e-5, "{interp:?}: read outside the valid region ({e})");
    }
}

#[test]
fn same_seed_same_views_and_the_state_restores() {
    let dev = device();
    let n = 8;
    let canvas = (Tensor::rand([n, 3, 40, 40], (Kind::Float, Device::Cpu)) * 255.0)
        .to_kind(Kind::Uint8)
        .to_device(dev);
    let valid = valid_sizes(n as usize, 40);
    let aug = Augmenter::new(AugmentConfig {
        size: 24,
        ..AugmentConfig::default()
    });
    let mut r1 = SplitMix64::new(9);
    let mut r2 = SplitMix64::new(9);
    let (a1, b1) = aug.views(&canvas, &valid, &mut r1);
    let (a2, b2) = aug.views(&canvas, &valid, &mut r2);
    assert_eq!(max_diff(&a1, &a2), 0.0);
    assert_eq!(max_diff(&b1, &b2), 0.0);
    assert_eq!(a1.size(), vec![n, 3, 24, 24]);
    // The two views differ, and samples differ from each other.
    assert!(max_diff(&a1, &b1) > 0.1);
    let saved = r1.state();
    let (c1, _) = aug.views(&canvas, &valid, &mut r1);
    let mut restored = SplitMix64::new(saved);
    let (c2, _) = aug.views(&canvas, &valid, &mut restored);
    assert_eq!(max_diff(&c1, &c2), 0.0);
    assert!(max_diff(&c1, &a1) > 0.1);
    let mut r3 = SplitMix64::new(10);
    let (a3, _) = aug.views(&canvas, &valid, &mut r3);
    assert!(max_diff(&a1, &a3) > 0.1);
}

/// One canvas repeated: per-sample parameters make every view different.
#[test]
fn parameters_are_drawn_per_sample_not_per_batch() {
    let n = 16;
    let one =
        (Tensor::rand([1, 3, 32, 32], (Kind::Float, Device::Cpu)) * 255.0).to_kind(Kind::Uint8);
    let canvas = one
        .expand([n, 3, 32, 32], false)
        .contiguous()
        .to_device(device());
    let valid = vec![(32, 32); n as usize];
    let aug = Augmenter::new(AugmentConfig {
        size: 32,
        ..AugmentConfig::default()
    });
    let (a, _) = aug.views(&canvas, &valid, &mut SplitMix64::new(1));
    let flat = a.view([n, -1]);
    for i in 1..n {
        assert!(
            max_diff(&flat.get(0), &flat.get(i)) > 0.05,
            "sample {i} equals sample 0"
        );
    }
}

/// A view whose samples take every op: jitter always, grayscale, blur and solarize often.
fn every_op_view() -> ViewConfig {
    ViewConfig {
        jitter_p: 1.0,
        grayscale_p: 0.3,
        blur_p: 1.0,
        solarize_p: 0.5,
        ..ViewConfig::default()
    }
}

/// Views cut and processed per sample straight from the uint8 canvas (the CPU's
/// default) give the batched tensor path's values, bilinear and bicubic (whose taps
/// past the valid region read its edge): both views with every op,
/// order and subset, and fine-tuning's crop-and-flip, at 224 px from 256-px canvases and
/// at small sizes, with valid regions of every shape. Tolerance 2e-5 after
/// normalisation, i.e. 4.5e-6 in [0, 1] units (measured: at most 8.1e-6 after
/// normalisation, the float32 rounding of a different order of additions).
#[test]
fn fused_views_from_the_uint8_canvas_match_the_tensor_path() {
    let all = every_op_view();
    let cases = [
        (224, 256, 6, ViewConfig::default(), ViewConfig::byol_view2()),
        (64, 80, 24, all.clone(), ViewConfig::byol_view2()),
        (28, 28, 24, all, ViewConfig::default()),
    ];
    let cases = cases
        .into_iter()
        .flat_map(|c| [Interpolation::Bilinear, Interpolation::Bicubic].map(|i| (i, c.clone())));
    for (case, (interpolation, (size, canvas, n, v1, v2))) in cases.enumerate() {
        let cfg = AugmentConfig {
            size,
            interpolation,
            view1: v1,
            view2: v2,
            ..AugmentConfig::default()
        };
        // Deterministic input (libtorch's global generator is shared by parallel tests):
        // a rounding difference that moves a value across the solarize threshold would
        // show as a difference of about 1, so the same values must be tested every time.
        let mut g = SplitMix64::new(100 + case as u64);
        let px: Vec<u8> = (0..n * 3 * canvas * canvas)
            .map(|_| g.below(256) as u8)
            .collect();
        let img = Tensor::from_slice(&px).view([n, 3, canvas, canvas]);
        let valid: Vec<(i32, i32)> = (0..n as i32)
            .map(|i| {
                let short = canvas as i32 - (3 * i) % (canvas as i32 / 2);
                if i % 2 == 0 {
                    (short, canvas as i32)
                } else {
                    (canvas as i32, short)
                }
            })
            .collect();
        let mut fused = Augmenter::new(cfg.clone());
        let mut tensor = Augmenter::new(cfg);
        tensor.fused_cpu = false;
        let seed = 7 + case as u64;
        let (a1, a2, p1, _) = fused.views_with_params(&img, &valid, &mut SplitMix64::new(seed));
        let (b1, b2, q1, _) = tensor.views_with_params(&img, &valid, &mut SplitMix64::new(seed));
        assert_eq!(p1, q1, "the same parameters are drawn");
        assert!(p1.jitter.iter().any(|&j| j) && p1.blur.iter().any(|&b| b));
        assert_eq!(a1.size(), vec![n, 3, size, size]);
        for (what, a, b) in [("view 1", &a1, &b1), ("view 2", &a2, &b2)] {
            let d = max_diff(a, b);
            assert!(d < 2e-5, "case {case} {what}: max |fused − tensor| = {d}");
        }
        let c = fused.crop_flip(
            &img,
            &valid,
            ([0.08, 1.0], [0.75, 4.0 / 3.0], 0.5),
            &mut SplitMix64::new(seed),
        );
        fused.fused_cpu = false;
        let d = fused.crop_flip(
            &img,
            &valid,
            ([0.08, 1.0], [0.75, 4.0 / 3.0], 0.5),
            &mut SplitMix64::new(seed),
        );
        let e = max_diff(&c, &d);
        assert!(
            e < 2e-5,
            "case {case} crop_flip: max |fused − tensor| = {e}"
        );
    }
}

/// The CPU's fused per-sample colour stages give the batched tensor path's values (the
/// tensor ops are the ones checked against torchvision above), for every op, order and
/// subset, at the ImageNet-style and the Fashion-MNIST-style size.
#[test]
fn fused_cpu_stages_match_the_tensor_path() {
    let all = every_op_view();
    let cases = [
        (
            64,
            80,
            AugmentConfig::default().view1,
            ViewConfig::byol_view2(),
        ),
        (64, 80, all.clone(), ViewConfig::byol_view2()),
        (28, 28, all, ViewConfig::default()),
    ];
    let n = 24;
    for (case, (size, canvas, v1, v2)) in cases.into_iter().enumerate() {
        let cfg = AugmentConfig {
            size,
            view1: v1,
            view2: v2,
            ..AugmentConfig::default()
        };
        let img = Tensor::rand([n, 3, canvas, canvas], (Kind::Float, Device::Cpu));
        let valid: Vec<(i32, i32)> = (0..n as i32)
            .map(|i| (canvas as i32 - i, canvas as i32))
            .collect();
        let mut rng = SplitMix64::new(case as u64);
        for view in [&cfg.view1, &cfg.view2] {
            let p = draw_view(&mut rng, view, &valid);
            assert!(p.jitter.iter().any(|&j| j));
            let fused = apply_view_with(&img, &p, &cfg, 0.5, true);
            let tensor = apply_view_with(&img, &p, &cfg, 0.5, false);
            assert_eq!(fused.size(), vec![n, 3, size, size]);
            let d = max_diff(&fused, &tensor);
            assert!(d < 1e-5, "case {case}: max |fused − tensor| = {d}");
            // Not trivially equal to the input crop: the stages did something.
            let crop = resized_crop_flip(&img, &p.boxes, &p.flips, size, cfg.interpolation);
            assert!(max_diff(&fused, &crop) > 0.1);
        }
    }
}
