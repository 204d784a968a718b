//! The trainer's pieces against PyTorch/torchvision (golden files from the venv).

mod cuda;
mod distributed;
mod finetune;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use byol_trainer::byol::Network;
use byol_trainer::byol::{byol_loss, ema_update, lr_at, tau_at, Optimizer, OptimizerKind};
use byol_trainer::model::{Arch, EncoderConfig, HeadConfig, ResNet};
use tch::{nn, Device, Kind, Tensor};

fn golden() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let o = Command::new(root.join(".venv/bin/python"))
        .arg(root.join("scripts/fixtures/trainer_golden.py"))
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let p = tmp.path().to_path_buf();
    (tmp, p)
}

fn st(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// A test encoder: torchvision's `arch` at `width`, with the CIFAR stem or not (the
/// stem's max-pool as its default).
fn encoder(arch: Arch, cifar_stem: bool, width: f64) -> EncoderConfig {
    EncoderConfig {
        arch,
        cifar_stem,
        stem_pool: None,
        width,
    }
}

/// The small BYOL pair the step tests train: a ResNet-18 with the CIFAR stem at
/// `width`, heads of `head`; online with its predictor, target a copy of it.
fn tiny_byol(device: Device, width: f64, head: &HeadConfig) -> (Network, Network) {
    let enc = encoder(Arch::Resnet18, true, width);
    let online = Network::new(device, &enc, head, Some(head));
    let target = Network::new(device, &enc, head, None);
    byol_trainer::byol::copy_into(&target.vs, &online.vs);
    (online, target)
}

fn r18() -> EncoderConfig {
    encoder(Arch::Resnet18, false, 1.0)
}

#[test]
fn resnet_keys_match_torchvision_and_its_weights_load() {
    let (_t, d) = golden();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let net = ResNet::new(&vs.root(), &r18());
    let ours: BTreeSet<String> = vs.variables().into_keys().collect();
    let theirs: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(d.join("resnet18_keys.json")).unwrap())
            .unwrap();
    assert_eq!(ours, theirs.iter().cloned().collect::<BTreeSet<_>>());
    // 20 convolutions (3 in downsample paths) and 20 BatchNorms of 4 tensors each.
    assert_eq!(ours.len(), 100);
    vs.load(d.join("resnet18.safetensors")).unwrap();
    let io = st(&d.join("resnet18_io.safetensors"));
    let y = tch::no_grad(|| net.forward_t(&io["x"], false));
    let e = max_diff(&y, &io["y"]);
    assert!(
        e < 1e-4,
        "eval-mode features differ from torchvision by {e}"
    );
}

/// The full key list of ResNet-50 (pinned: a change in names breaks checkpoints).
#[test]
fn resnet50_and_heads_key_list_is_pinned() {
    let vs = nn::VarStore::new(Device::Cpu);
    let enc = encoder(Arch::Resnet50, false, 1.0);
    let net = ResNet::new(&(vs.root() / "encoder"), &enc);
    assert_eq!(net.out_dim(), 2048);
    let keys: BTreeSet<String> = vs.variables().into_keys().collect();
    // torchvision ResNet-50: 53 conv/bn pairs → 53 conv weights + 53×4 BN tensors.
    assert_eq!(keys.len(), 53 + 53 * 4);
    for k in [
        "encoder.conv1.weight",
        "encoder.bn1.running_var",
        "encoder.layer1.0.downsample.0.weight",
        "encoder.layer1.0.downsample.1.bias",
        "encoder.layer3.5.conv3.weight",
        "encoder.layer4.2.bn3.running_mean",
    ] {
        assert!(keys.contains(k), "{k}");
    }
    let n = Network::new(
        Device::Cpu,
        &encoder(Arch::Resnet18, true, 0.25),
        &Default::default(),
        Some(&Default::default()),
    );
    let keys: BTreeSet<String> = n.vs.variables().into_keys().collect();
    for k in [
        "projector.0.weight",
        "projector.0.bias",
        "projector.1.running_mean",
        "projector.3.weight",
        "predictor.3.weight",
    ] {
        assert!(keys.contains(k), "{k}");
    }
    assert!(
        !keys.contains("projector.3.bias"),
        "no bias on the last layer"
    );
}

#[test]
fn loss_matches_pytorch() {
    let (_t, d) = golden();
    let l = st(&d.join("loss.safetensors"));
    let ours = byol_loss(&l["p1"], &l["p2"], &l["z1"], &l["z2"]);
    let e = (ours.double_value(&[]) - l["loss"].double_value(&[0])).abs();
    assert!(e < 1e-5, "{e}");
}

/// Steps an optimizer of `kind` (trust `eta`) over the reference's two parameters and
/// gradients, one step per `lrs` entry, and checks each step against `want`'s `w{k}`,
/// `b{k}` within 1e-6. Returns the optimizer.
fn optimizer_matches(kind: OptimizerKind, eta: Option<f64>, lrs: &[f64], want: &str) -> Optimizer {
    let (_t, d) = golden();
    let g = st(&d.join("lars.safetensors"));
    let want = st(&d.join(want));
    let p: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("lars.json")).unwrap()).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let w = vs.root().var_copy("w", &g["w0"]);
    let b = vs.root().var_copy("b", &g["b0"]);
    let mut opt = Optimizer::new(
        kind,
        p["momentum"].as_f64().unwrap(),
        p["wd"].as_f64().unwrap(),
        eta.unwrap_or_else(|| p["eta"].as_f64().unwrap()),
    );
    let lrs: Vec<f64> = if lrs.is_empty() {
        p["lrs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    } else {
        lrs.to_vec()
    };
    for (step, lr) in lrs.iter().enumerate() {
        byol_trainer::byol::zero_grad(&vs);
        // d/dw of sum(w·g) is g: the gradients of the reference.
        let loss = (&w * &g[&format!("g{}w", step + 1)]).sum(Kind::Float)
            + (&b * &g[&format!("g{}b", step + 1)]).sum(Kind::Float);
        loss.backward();
        opt.step(&vs, *lr);
        let ew = max_diff(&w, &want[&format!("w{}", step + 1)]);
        let eb = max_diff(&b, &want[&format!("b{}", step + 1)]);
        assert!(
            ew < 1e-6 && eb < 1e-6,
            "{kind:?} step {step}: w {ew} b {eb}"
        );
    }
    opt
}

#[test]
fn lars_steps_match_the_reference() {
    // The reference's learning rates (lars.json), its expected weights in lars.safetensors.
    optimizer_matches(OptimizerKind::Lars, None, &[], "lars.safetensors");
}

#[test]
fn schedules_at_known_steps() {
    assert!((tau_at(0.99, 0, 100) - 0.99).abs() < 1e-12);
    assert!((tau_at(0.99, 50, 100) - 0.995).abs() < 1e-12);
    assert!((tau_at(0.99, 100, 100) - 1.0).abs() < 1e-12);
    assert_eq!(lr_at(1.0, 0, 10, 110), 0.0);
    assert!((lr_at(1.0, 5, 10, 110) - 0.5).abs() < 1e-12);
    assert!((lr_at(1.0, 10, 10, 110) - 1.0).abs() < 1e-12);
    assert!((lr_at(1.0, 60, 10, 110) - 0.5).abs() < 1e-12);
    assert!(lr_at(1.0, 110, 10, 110).abs() < 1e-12);
}

#[test]
fn ema_moves_the_target_towards_the_online_network_by_name() {
    let on = nn::VarStore::new(Device::Cpu);
    let ta = nn::VarStore::new(Device::Cpu);
    let _a =
        (on.root() / "layer").var_copy("weight", &Tensor::ones([3], (Kind::Float, Device::Cpu)));
    let t =
        (ta.root() / "layer").var_copy("weight", &Tensor::zeros([3], (Kind::Float, Device::Cpu)));
    ema_update(&ta, &on, 0.9);
    assert!(max_diff(&t, &Tensor::from_slice(&[0.1f32, 0.1, 0.1])) < 1e-7);
    ema_update(&ta, &on, 0.5);
    assert!(max_diff(&t, &Tensor::from_slice(&[0.55f32, 0.55, 0.55])) < 1e-7);
}

/// Well-separated Gaussian clusters: both probes are (nearly) perfect; with the labels
/// shuffled they fall to chance.
#[test]
fn linear_probe_and_knn_on_synthetic_features() {
    use byol_trainer::eval::{knn, linear_probe};
    tch::manual_seed(7);
    let classes = 4i64;
    let make = |n: i64| {
        let y = Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(classes);
        let centers =
            Tensor::eye(classes, (Kind::Float, Device::Cpu)).pad([0, 12], "constant", None) * 4.0;
        let x =
            centers.index_select(0, &y) + Tensor::randn([n, 16], (Kind::Float, Device::Cpu)) * 0.5;
        (x, y)
    };
    let (xtr, ytr) = make(400);
    let (xte, yte) = make(200);
    let (top1, top5) = linear_probe(&xtr, &ytr, &xte, &yte, classes);
    assert!(top1 > 0.98, "linear top-1 {top1}");
    assert_eq!(top5, 1.0);
    let k = knn(&xtr, &ytr, &xte, &yte, classes, &[20, 200], 0.07);
    assert!(k[0] > 0.98 && k[1] > 0.98, "{k:?}");
    // Labels unrelated to the features: chance level (0.25 ± noise).
    let shuffled = ytr.index_select(0, &Tensor::randperm(400, (Kind::Int64, Device::Cpu)));
    let (chance, _) = linear_probe(&xtr, &shuffled, &xte, &yte, classes);
    assert!(chance < 0.45, "{chance}");
}

#[test]
fn adamw_steps_match_torch() {
    let opt = optimizer_matches(
        OptimizerKind::Adamw,
        Some(0.0),
        &[0.5, 0.3],
        "adamw.safetensors",
    );
    // The state round-trips (step count included).
    let mut other = Optimizer::new(OptimizerKind::Adamw, 0.9, 0.0, 0.0);
    other.load_state(opt.state(), Device::Cpu);
    assert_eq!(other.t, 2);
    assert_eq!(other.second.len(), 2);
}

/// bf16 autocast through libtorch's own switches: inside the region convolutions and
/// linear layers produce bfloat16, the state is restored after it, and one training step
/// under autocast stays close to the float32 step (loss within 2 %, updated weights
/// within bf16 rounding) while the weights stay float32.
#[test]
fn bf16_autocast_step_is_close_to_float32() {
    use byol_trainer::amp;
    use byol_trainer::byol::{copy_into, train_step, StepSettings};
    let head = HeadConfig {
        hidden: 64,
        out: 32,
    };
    // One set of starting weights, copied into each build: tests run in parallel and
    // share libtorch's global generator, so re-seeding would not give equal builds.
    let (start, _) = tiny_byol(Device::Cpu, 0.125, &head);
    let build = || {
        let (mut online, target) = tiny_byol(Device::Cpu, 0.125, &head);
        online.vs.copy(&start.vs).unwrap();
        copy_into(&target.vs, &online.vs);
        (online, target)
    };
    let x = Tensor::randn([16, 3, 16, 16], (Kind::Float, Device::Cpu));
    let x2 = x.flip([3]) * 0.9;

    assert!(!amp::is_enabled(Device::Cpu));
    let (on, _) = build();
    let (y, z, _) = amp::autocast(Device::Cpu, Some(Kind::BFloat16), || {
        assert!(amp::is_enabled(Device::Cpu));
        on.forward(&x, true)
    });
    assert_eq!(y.kind(), Kind::BFloat16);
    assert_eq!(z.kind(), Kind::BFloat16);
    assert!(!amp::is_enabled(Device::Cpu), "autocast left on");
    assert_eq!(on.forward(&x, true).0.kind(), Kind::Float);

    let step = |amp: Option<Kind>| {
        let (online, target) = build();
        let mut opt = Optimizer::new(OptimizerKind::Lars, 0.9, 1e-5, 1e-3);
        let s = StepSettings {
            lr: 1.0,
            tau: 0.99,
            amp,
        };
        let (loss, z1, y1) = train_step(&online, &target, &mut opt, &x, &x2, s);
        assert_eq!(
            (loss.kind(), z1.kind(), y1.kind()),
            (Kind::Float, Kind::Float, Kind::Float)
        );
        let w = online.vs.variables()["encoder.layer1.0.conv1.weight"].copy();
        assert_eq!(w.kind(), Kind::Float);
        (loss.double_value(&[]), w)
    };
    let (l32, w32) = step(None);
    let (l16, w16) = step(Some(Kind::BFloat16));
    assert!(l32.is_finite() && l32 > 0.1, "{l32}");
    assert!(
        (l16 - l32).abs() < 0.02 * l32,
        "bf16 loss {l16} vs fp32 {l32}"
    );
    let rel = max_diff(&w16, &w32) / w32.abs().max().double_value(&[]);
    assert!(
        rel < 2e-2,
        "weights after one step differ by {rel} (relative)"
    );
    assert!(
        max_diff(&w16, &w32) > 0.0,
        "autocast changed nothing: is it on?"
    );
}

/// The ONNX export of a ResNet-50 layout (ImageNet stem with max-pool, bottlenecks with
/// the stride on conv2, downsample shortcuts) with non-trivial BatchNorm statistics runs
/// in ONNX Runtime like libtorch's eval-mode encoder.
#[test]
fn resnet50_onnx_export_matches_libtorch() {
    use byol_trainer::config::TrainConfig;
    use byol_trainer::export::{export, OnnxEncoder};
    let mut cfg = TrainConfig::default();
    cfg.model.encoder = encoder(Arch::Resnet50, false, 0.125);
    cfg.augment.size = 64;
    tch::manual_seed(5);
    let net = Network::new(
        Device::Cpu,
        &cfg.model.encoder,
        &cfg.model.projector,
        Some(&cfg.model.predictor),
    );
    // Train-mode passes move the BatchNorm running statistics away from 0/1.
    for _ in 0..3 {
        let x = Tensor::rand([8, 3, 64, 64], (Kind::Float, Device::Cpu)) * 2.0 - 0.3;
        let _ = tch::no_grad(|| net.encoder.forward_t(&x, true));
    }
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("r50.onnx");
    let info = export(&net.vs, &cfg, &path, &[]).unwrap();
    assert_eq!((info.dim, info.size, info.convs), (256, 64, 53));
    let pixels = Tensor::rand([4, 3, 64, 64], (Kind::Float, Device::Cpu));
    let mean = Tensor::from_slice(&cfg.augment.mean.map(|v| v as f32)).view([1, 3, 1, 1]);
    let std = Tensor::from_slice(&cfg.augment.std.map(|v| v as f32)).view([1, 3, 1, 1]);
    let want = tch::no_grad(|| net.encoder.forward_t(&((&pixels - mean) / std), false));
    let mut enc = OnnxEncoder::load(&path, None, 1).unwrap();
    assert_eq!((enc.size, enc.dim), (64, 256));
    let got = enc.embed(&pixels).unwrap();
    let scale = want.abs().max().double_value(&[]).max(1.0);
    let d = max_diff(&got, &want);
    assert!(d < 1e-4 * scale, "max |diff| {d} (scale {scale})");
    assert!(want.abs().max().double_value(&[]) > 0.0);
}
