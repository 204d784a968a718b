//! `byol finetune`'s step against PyTorch, and its label subsets.

use std::collections::HashMap;

use byol_trainer::byol::{Optimizer, OptimizerKind};
use byol_trainer::classifier::Classifier;
use byol_trainer::finetune::finetune_step;
use byol_trainer::model::Arch;
use tch::{Device, Kind, Tensor};

use super::{encoder, golden, max_diff, st};

/// Our name of a torchvision `state_dict` key (the encoder's tensors under `encoder.`).
fn ours(k: &str) -> String {
    if k.starts_with("fc.") {
        k.to_string()
    } else {
        format!("encoder.{k}")
    }
}

/// Two steps of a torchvision ResNet-18 with a 5-class head from the same weights and
/// batch as PyTorch's (train mode, cross-entropy, SGD with Nesterov momentum): losses
/// within 1e-5 relative, every gradient of the first step within 1e-4 of its largest
/// value, every weight and BatchNorm statistic after the second step within 1e-3 of
/// max(1, its largest value). float32 at lr 0.1: the second loss differs by about 3e-6
/// relative and a few BatchNorm biases by 1.5e-4; without the Nesterov term the weights
/// would differ by about lr·μ·|g|, orders of magnitude more.
#[test]
fn a_finetuning_step_matches_pytorch() {
    let (_t, d) = golden();
    let g = st(&d.join("finetune.safetensors"));
    let net = Classifier::new(Device::Cpu, &encoder(Arch::Resnet18, false, 1.0), 5, 0);
    let vars = net.vs.variables();
    tch::no_grad(|| {
        for (k, v) in &g {
            if let Some(name) = k.strip_prefix("init.") {
                let mut dst = vars[&ours(name)].shallow_clone();
                dst.copy_(v);
            }
        }
    });
    let mut opt = Optimizer::new(OptimizerKind::Sgd, 0.9, 0.0, 0.0);
    opt.nesterov = true;
    let (x, y) = (&g["x"], &g["y"].to_kind(Kind::Int64));
    let mut grads: HashMap<String, Tensor> = HashMap::new();
    for step in 0..2 {
        let (loss, _) = finetune_step(&net, &mut opt, (x, y), (0.1, None, false), None).unwrap();
        let want = g[&format!("loss{step}")].double_value(&[0]);
        let got = loss.double_value(&[]);
        assert!(
            (got - want).abs() < 1e-5 * want.abs().max(1.0),
            "step {step}: loss {got} vs PyTorch {want}"
        );
        if step == 0 {
            grads = vars
                .iter()
                .filter(|(_, v)| v.grad().defined())
                .map(|(k, v)| (k.clone(), v.grad().copy()))
                .collect();
        }
    }
    let mut compared = 0;
    for (k, want) in &g {
        if let Some(name) = k.strip_prefix("grad.") {
            let got = &grads[&ours(name)];
            let scale = want.abs().max().double_value(&[]).max(1e-6);
            let e = max_diff(got, want) / scale;
            assert!(e < 1e-4, "gradient of {name}: relative error {e}");
            compared += 1;
        }
        if let Some(name) = k.strip_prefix("after.") {
            let scale = want.abs().max().double_value(&[]).max(1.0);
            let e = max_diff(&vars[&ours(name)], want) / scale;
            assert!(e < 1e-3, "{name} after two steps: relative error {e}");
        }
    }
    assert_eq!(compared, 62, "every parameter's gradient compared");
}
