//! CUDA against the CPU. These run on a machine with a GPU (`scripts/device_checks`
//! carries this test binary there); on a CPU-only machine each one prints that it was
//! skipped and returns.
//!
//! Tolerances: libtorch runs CUDA convolutions in TF32 by default (10-bit mantissa), so
//! CUDA and CPU agree to about 1e-3 relative per layer, not to float32 rounding.

use byol_pipeline::augment::{AugmentConfig, Augmenter, SplitMix64};
use byol_trainer::amp;
use byol_trainer::byol::{
    channels_last, copy_into, train_step, Network, Optimizer, OptimizerKind, StepSettings,
};
use byol_trainer::model::HeadConfig;
use tch::{Device, Kind, Tensor};

use super::max_diff;

fn cuda() -> Option<Device> {
    if tch::Cuda::is_available() {
        Some(Device::Cuda(0))
    } else {
        eprintln!("no CUDA device: skipped");
        None
    }
}

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let b = b.to_device(a.device());
    max_diff(a, &b) / b.abs().max().double_value(&[]).max(1e-12)
}

const HEAD: HeadConfig = HeadConfig {
    hidden: 128,
    out: 64,
};

/// The starting weights and the two views every run uses. Tests run in parallel and
/// share libtorch's global generator, so runs copy these instead of re-seeding.
struct Start {
    weights: Network,
    x1: Tensor,
    x2: Tensor,
}

fn start() -> Start {
    let x1 = Tensor::randn([32, 3, 32, 32], (Kind::Float, Device::Cpu));
    Start {
        weights: super::tiny_byol(Device::Cpu, 0.25, &HEAD).0,
        x2: x1.flip([3]) * 0.8 + 0.1,
        x1,
    }
}

/// Online and target networks on `dev` with the starting weights.
fn networks(s: &Start, dev: Device, cl: bool) -> (Network, Network) {
    let (mut online, mut target) = super::tiny_byol(dev, 0.25, &HEAD);
    online.vs.copy(&s.weights.vs).unwrap();
    copy_into(&target.vs, &online.vs);
    if cl {
        online.to_channels_last();
        target.to_channels_last();
    }
    (online, target)
}

/// Three LARS steps; returns the losses and the online and target weights of one conv.
fn three_steps(s: &Start, dev: Device, cl: bool, amp: Option<Kind>) -> (Vec<f64>, Tensor, Tensor) {
    let (online, target) = networks(s, dev, cl);
    let mut opt = Optimizer::new(OptimizerKind::Lars, 0.9, 1e-5, 1e-3);
    let layout = |x: &Tensor| {
        let x = x.to_device(dev);
        if cl {
            channels_last(&x)
        } else {
            x
        }
    };
    let (x1, x2) = (layout(&s.x1), layout(&s.x2));
    let st = StepSettings {
        lr: 0.5,
        tau: 0.9,
        amp,
    };
    let losses = (0..3)
        .map(|_| {
            train_step(&online, &target, &mut opt, &x1, &x2, st)
                .0
                .double_value(&[])
        })
        .collect();
    let name = "encoder.layer2.0.conv1.weight";
    let w = online.vs.variables()[name]
        .to_device(Device::Cpu)
        .contiguous();
    let t = target.vs.variables()[name]
        .to_device(Device::Cpu)
        .contiguous();
    (losses, w, t)
}

#[test]
fn cuda_training_steps_match_the_cpu() {
    let Some(dev) = cuda() else { return };
    let s = start();
    let (l_cpu, w_cpu, t_cpu) = three_steps(&s, Device::Cpu, false, None);
    for cl in [false, true] {
        let (l, w, t) = three_steps(&s, dev, cl, None);
        for (a, b) in l.iter().zip(&l_cpu) {
            assert!(
                (a - b).abs() < 1e-2 * b,
                "channels-last {cl}: loss {a} vs CPU {b}"
            );
        }
        assert!(rel(&w, &w_cpu) < 1e-2, "online weights {}", rel(&w, &w_cpu));
        assert!(rel(&t, &t_cpu) < 1e-2, "target weights {}", rel(&t, &t_cpu));
        assert!(
            max_diff(&w, &t) > 0.0,
            "the target did not lag the online network"
        );
    }
}

#[test]
fn cuda_bf16_autocast_runs_in_bf16_and_stays_close_to_float32() {
    let Some(dev) = cuda() else { return };
    let s = start();
    let (online, _) = networks(&s, dev, true);
    let x = channels_last(&Tensor::randn([8, 3, 32, 32], (Kind::Float, dev)));
    let (y, z, _) = amp::autocast(dev, Some(Kind::BFloat16), || {
        assert!(amp::is_enabled(dev));
        online.forward(&x, true)
    });
    assert_eq!((y.kind(), z.kind()), (Kind::BFloat16, Kind::BFloat16));
    assert!(!amp::is_enabled(dev), "autocast left on");

    let (l32, w32, _) = three_steps(&s, dev, true, None);
    let (l16, w16, _) = three_steps(&s, dev, true, Some(Kind::BFloat16));
    for (a, b) in l16.iter().zip(&l32) {
        assert!((a - b).abs() < 0.03 * b, "bf16 loss {a} vs float32 {b}");
    }
    assert!(rel(&w16, &w32) < 3e-2, "weights {}", rel(&w16, &w32));
    assert!(
        max_diff(&w16, &w32) > 0.0,
        "autocast changed nothing: is it on?"
    );
}

#[test]
fn cuda_augmentation_matches_the_cpu() {
    let Some(dev) = cuda() else { return };
    let aug = Augmenter::new(AugmentConfig {
        size: 48,
        ..AugmentConfig::default()
    });
    let canvas =
        (Tensor::rand([16, 3, 64, 64], (Kind::Float, Device::Cpu)) * 255.0).to_kind(Kind::Uint8);
    let valid: Vec<(i32, i32)> = (0..16).map(|i| (64 - 2 * i, 40 + i)).collect();
    let (c1, c2) = aug.views(&canvas, &valid, &mut SplitMix64::new(11));
    let (g1, g2) = aug.views(&canvas.to_device(dev), &valid, &mut SplitMix64::new(11));
    for (g, c) in [(g1, c1), (g2, c2)] {
        let d = (g.to_device(Device::Cpu) - &c).abs();
        // Solarize is a threshold: a pixel that rounds to the other side of it differs
        // a lot, so bound the mean and the share of differing values, not only the max.
        let mean = d.mean(Kind::Float).double_value(&[]);
        let off = d
            .gt(1e-3)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        assert!(mean < 1e-4, "mean |CUDA − CPU| {mean}");
        assert!(off < 1e-4, "share of values off by > 1e-3: {off}");
    }
}
