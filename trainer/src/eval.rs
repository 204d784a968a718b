//! Evaluation of frozen features: a linear probe (softmax regression) and a weighted
//! kNN, for the trained encoder, a randomly initialised one and raw pixels.

use std::path::Path;

use crate::bail;
use crate::error::{Context, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, nn::OptimizerConfig, Device, Kind, Tensor};

use byol_pipeline::augment::{normalize, resized_crop_flip, CropBox};
use byol_pipeline::loader::DecodeFn;
use byol_pipeline::{Cursor, Dataset, Loader, LoaderConfig};

use crate::byol::{channels_last, Network};
use crate::config::TrainConfig;
use crate::model::ResNet;
use crate::run::{load_online, same_classes, TrainedOnline};

/// Accuracies of one feature set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProbeResult {
    pub linear_top1: f64,
    pub linear_top5: f64,
    pub knn20_top1: f64,
    pub knn200_top1: f64,
    pub dim: i64,
}

/// `RUN/eval.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    pub command: String,
    pub run: String,
    pub checkpoint: String,
    pub step: u64,
    /// The labelled shards the probes trained on (every row) and were tested on.
    #[serde(default)]
    pub train: String,
    #[serde(default)]
    pub test: String,
    pub train_rows: i64,
    pub test_rows: i64,
    pub byol: ProbeResult,
    pub random_init: ProbeResult,
    pub raw_pixels: ProbeResult,
    pub seconds: f64,
}

/// Un-augmented model inputs of a whole dataset: the centred square of each valid
/// region resized to `size`, in [0, 1], with labels. Returns (`[N,3,size,size]` uint8, labels).
///
/// # Errors
/// The shards cannot be opened or read (naming the folder).
pub fn load_inputs(
    data: &Path,
    canvas: usize,
    size: i64,
    decode: DecodeFn,
    limit: Option<usize>,
) -> Result<(Tensor, Tensor)> {
    let ds = Dataset::open(data).with_context(|| format!("opening {}", data.display()))?;
    let lc = LoaderConfig {
        batch: 512,
        canvas,
        drop_last: false,
        pin_memory: false,
        ..LoaderConfig::default()
    };
    let loader = Loader::new(ds, lc, decode)?;
    let mut imgs = Vec::new();
    let mut labels = Vec::new();
    for b in loader.start(Cursor::default()) {
        let b = b?;
        // A sample whose image failed to decode is a copy of another one: skip it.
        let keep: Vec<i64> = (0..b.len() as i64)
            .filter(|&i| !b.replaced_mask()[i as usize])
            .collect();
        if keep.is_empty() {
            continue;
        }
        let x = centred_inputs(&b, size);
        imgs.push(if keep.len() == b.len() {
            x
        } else {
            x.index_select(0, &Tensor::from_slice(&keep))
        });
        labels.extend(keep.iter().map(|&i| b.labels()[i as usize]));
        if limit.is_some_and(|l| labels.len() >= l) {
            break;
        }
    }
    if labels.is_empty() {
        bail!("no image of {} could be decoded", data.display());
    }
    if let Some(l) = limit {
        let n = labels.len().min(l);
        labels.truncate(n);
        let x = Tensor::cat(&imgs, 0).narrow(0, 0, n as i64);
        if labels.iter().any(|&v| v < 0) {
            bail!(
                "{} has unlabeled rows; evaluation needs labels",
                data.display()
            );
        }
        return Ok((x, Tensor::from_slice(&labels)));
    }
    if labels.iter().any(|&l| l < 0) {
        bail!(
            "{} has unlabeled rows; evaluation needs labels",
            data.display()
        );
    }
    Ok((Tensor::cat(&imgs, 0), Tensor::from_slice(&labels)))
}

/// The un-augmented model input of each image of a batch: the centred square of its
/// valid region resized (bilinear) to `size`, as `[N, 3, size, size]` uint8.
pub fn centred_inputs(b: &byol_pipeline::loader::Batch, size: i64) -> Tensor {
    let x = b.images().to_kind(Kind::Float) / 255.0;
    let boxes: Vec<CropBox> = b
        .valid_sizes()
        .iter()
        .map(|&(h, w)| {
            let s = h.min(w) as i64;
            CropBox {
                top: (h as i64 - s) / 2,
                left: (w as i64 - s) / 2,
                height: s,
                width: s,
            }
        })
        .collect();
    let flips = vec![false; boxes.len()];
    let y = resized_crop_flip(
        &x,
        &boxes,
        &flips,
        size,
        byol_pipeline::augment::Interpolation::Bilinear,
    );
    (y * 255.0).round().clamp(0.0, 255.0).to_kind(Kind::Uint8)
}

/// Encoder features in eval mode, in chunks.
///
/// # Shapes
/// `x`: `[N, 3, S, S]` uint8 → `[N, D]` float32 embeddings (CPU).
pub fn features(encoder: &ResNet, x: &Tensor, cfg: &TrainConfig, device: Device) -> Tensor {
    inference(x, cfg, device, |xb| encoder.forward_t(xb, false))
}

/// `f` (a network in inference mode) over `x` in chunks of 512 images, each normalised
/// as in training and in the config's memory layout, without gradients.
///
/// # Shapes
/// `x`: `[N, 3, S, S]` uint8 → `[N, …]` float32 (CPU), the rows of `f`'s outputs.
pub fn inference(
    x: &Tensor,
    cfg: &TrainConfig,
    device: Device,
    f: impl Fn(&Tensor) -> Tensor,
) -> Tensor {
    let n = x.size()[0];
    let mut out = Vec::new();
    tch::no_grad(|| {
        let mut i = 0;
        while i < n {
            let len = (n - i).min(512);
            let xb = x.narrow(0, i, len).to_device(device).to_kind(Kind::Float) / 255.0;
            let mut xb = normalize(&xb, cfg.augment.mean, cfg.augment.std);
            if cfg.train.channels_last {
                xb = channels_last(&xb);
            }
            out.push(f(&xb).to_kind(Kind::Float).to_device(Device::Cpu));
            i += len;
        }
    });
    Tensor::cat(&out, 0)
}

/// Raw-pixel features: luminance at (at most) 28×28, in [0, 1].
fn raw_pixels(x: &Tensor) -> Tensor {
    let s = x.size()[2].min(28);
    let xf = x.to_kind(Kind::Float) / 255.0;
    let xf = if x.size()[2] != s {
        xf.upsample_bilinear2d([s, s], false, None, None)
    } else {
        xf
    };
    let g = byol_pipeline::augment::rgb_to_grayscale(&xf);
    g.flatten(1, -1)
}

/// Softmax regression on standardised features, full-batch Adam with a cosine
/// schedule (deterministic). Returns (top-1, top-5) on the test set.
pub fn linear_probe(
    train: &Tensor,
    ytr: &Tensor,
    test: &Tensor,
    yte: &Tensor,
    classes: i64,
) -> (f64, f64) {
    tch::manual_seed(0);
    let mean = train.mean_dim([0i64].as_slice(), true, Kind::Float);
    let std = train.std_dim([0i64].as_slice(), true, false) + 1e-6;
    let tr = (train - &mean) / &std;
    let te = (test - &mean) / &std;
    let d = tr.size()[1];
    let vs = nn::VarStore::new(Device::Cpu);
    let lin = nn::linear(
        vs.root() / "probe",
        d,
        classes,
        nn::LinearConfig {
            ws_init: nn::Init::Const(0.0),
            ..Default::default()
        },
    );
    let mut opt = nn::Adam {
        wd: 0.0,
        ..Default::default()
    }
    .build(&vs, 0.0)
    .expect("adam");
    let iters = 300;
    let lr0 = 0.05;
    for it in 0..iters {
        let lr = lr0 * 0.5 * (1.0 + (std::f64::consts::PI * it as f64 / iters as f64).cos());
        opt.set_lr(lr);
        let logits = tr.apply(&lin);
        let l2: Tensor = lin.ws.pow_tensor_scalar(2).sum(Kind::Float) * 1e-4;
        let loss = logits.cross_entropy_for_logits(ytr) + l2;
        opt.backward_step(&loss);
    }
    let logits = tch::no_grad(|| te.apply(&lin));
    accuracy(&logits, yte)
}

fn accuracy(logits: &Tensor, y: &Tensor) -> (f64, f64) {
    let k = logits.size()[1].min(5);
    let top = logits.topk(k, 1, true, true).1;
    let hit = top.eq_tensor(&y.unsqueeze(1));
    let top1 = hit
        .narrow(1, 0, 1)
        .to_kind(Kind::Float)
        .sum(Kind::Float)
        .double_value(&[]);
    let top5 = hit.to_kind(Kind::Float).sum(Kind::Float).double_value(&[]);
    let n = y.size()[0] as f64;
    (top1 / n, top5 / n)
}

/// Weighted kNN (cosine similarity, weights exp(sim/T)): top-1 for each k.
pub fn knn(
    train: &Tensor,
    ytr: &Tensor,
    test: &Tensor,
    yte: &Tensor,
    classes: i64,
    ks: &[i64],
    temperature: f64,
) -> Vec<f64> {
    let norm = |t: &Tensor| {
        t / t
            .norm_scalaropt_dim(2, [1i64].as_slice(), true)
            .clamp_min(1e-12)
    };
    let tr = norm(train);
    let te = norm(test);
    let kmax = *ks.iter().max().unwrap_or(&1);
    let kmax = kmax.min(tr.size()[0]);
    let n = te.size()[0];
    let mut correct = vec![0f64; ks.len()];
    tch::no_grad(|| {
        let mut i = 0;
        while i < n {
            let len = (n - i).min(1024);
            let sim = te.narrow(0, i, len).matmul(&tr.transpose(0, 1));
            let (vals, idx) = sim.topk(kmax, 1, true, true);
            let nl = ytr.index_select(0, &idx.flatten(0, -1)).view([len, kmax]);
            let w = (vals / temperature).exp();
            for (j, &k) in ks.iter().enumerate() {
                let k = k.min(kmax);
                let scores = Tensor::zeros([len, classes], (Kind::Float, Device::Cpu)).scatter_add(
                    1,
                    &nl.narrow(1, 0, k),
                    &w.narrow(1, 0, k),
                );
                let pred = scores.argmax(1, false);
                correct[j] += pred
                    .eq_tensor(&yte.narrow(0, i, len))
                    .to_kind(Kind::Float)
                    .sum(Kind::Float)
                    .double_value(&[]);
            }
            i += len;
        }
    });
    correct.iter().map(|c| c / n as f64).collect()
}

fn probe(tr: &Tensor, ytr: &Tensor, te: &Tensor, yte: &Tensor, classes: i64) -> ProbeResult {
    let (l1, l5) = linear_probe(tr, ytr, te, yte, classes);
    let k = knn(tr, ytr, te, yte, classes, &[20, 200], 0.07);
    ProbeResult {
        linear_top1: l1,
        linear_top5: l5,
        knn20_top1: k[0],
        knn200_top1: k[1],
        dim: tr.size()[1],
    }
}

/// `byol eval`.
///
/// # Errors
/// The run or its checkpoint cannot be loaded, the datasets cannot be read or have different classes, or `eval.json` cannot be written.
pub fn evaluate(
    run: &Path,
    train: &Path,
    test: &Path,
    checkpoint: Option<&Path>,
    decode: DecodeFn,
) -> Result<EvalReport> {
    let t0 = std::time::Instant::now();
    let TrainedOnline {
        cfg,
        net,
        checkpoint: ckpt,
        step,
        device,
    } = load_online(run, checkpoint)?;
    let train_classes = Dataset::open(train)
        .with_context(|| format!("opening {}", train.display()))?
        .manifest
        .classes;
    let test_classes = Dataset::open(test)
        .with_context(|| format!("opening {}", test.display()))?
        .manifest
        .classes;
    same_classes(train, &train_classes, test, &test_classes)?;
    let classes = train_classes.len() as i64;
    if classes == 0 {
        bail!("{} has no classes", train.display());
    }
    let size = cfg.augment.size;
    // Progress by stage: on slow machines each takes minutes.
    let mut bar = byol_format::progress::Progress::new(
        byol_format::progress::Mode::detect(true),
        "eval",
        7,
        "stages",
        0,
    );
    let stage = |i: u64, what: &str| {
        bar.set_message(what.to_string());
        bar.set_position(i);
    };
    stage(0, "decoding the training images");
    let (xtr, ytr) = load_inputs(train, cfg.data.canvas, size, decode, None)?;
    stage(1, "decoding the test images");
    let (xte, yte) = load_inputs(test, cfg.data.canvas, size, decode, None)?;

    stage(2, "BYOL features");
    let (ftr, fte) = (
        features(net.encoder(), &xtr, &cfg, device),
        features(net.encoder(), &xte, &cfg, device),
    );
    stage(3, "BYOL probes");
    let byol = probe(&ftr, &ytr, &fte, &yte, classes);

    stage(4, "random-init features");
    tch::manual_seed(cfg.train.seed as i64 + 1);
    let mut rnd = Network::new(device, &cfg.model.encoder, &cfg.model.projector, None);
    if cfg.train.channels_last {
        rnd.to_channels_last();
    }
    let (ftr, fte) = (
        features(&rnd.encoder, &xtr, &cfg, device),
        features(&rnd.encoder, &xte, &cfg, device),
    );
    stage(5, "random-init probes");
    let random_init = probe(&ftr, &ytr, &fte, &yte, classes);
    stage(6, "raw-pixel probes");
    let raw = probe(&raw_pixels(&xtr), &ytr, &raw_pixels(&xte), &yte, classes);
    stage(7, "done");
    bar.finish();
    let report = EvalReport {
        command: "eval".into(),
        run: run.display().to_string(),
        checkpoint: ckpt.display().to_string(),
        step,
        train: train.display().to_string(),
        test: test.display().to_string(),
        train_rows: ytr.size()[0],
        test_rows: yte.size()[0],
        byol,
        random_init,
        raw_pixels: raw,
        seconds: t0.elapsed().as_secs_f64(),
    };
    byol_format::fs::write_atomic(
        &run.join("eval.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    if cfg.train.tensorboard {
        crate::run::tensorboard::EventWriter::create(run)?
            .scalars(report.step, &report.scalars())?;
    }
    Ok(report)
}

impl EvalReport {
    /// The report's accuracies as TensorBoard scalars, at the checkpoint's step:
    /// `eval/FEATURES/METRIC` (`eval/byol/linear_top1`, …, in %).
    pub fn scalars(&self) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        for (name, r) in [
            ("byol", &self.byol),
            ("random_init", &self.random_init),
            ("raw_pixels", &self.raw_pixels),
        ] {
            for (metric, v) in [
                ("linear_top1", r.linear_top1),
                ("linear_top5", r.linear_top5),
                ("knn20_top1", r.knn20_top1),
                ("knn200_top1", r.knn200_top1),
            ] {
                out.push((format!("eval/{name}/{metric}"), v));
            }
        }
        out
    }

    pub fn table(&self) -> String {
        let mut s = format!(
            "evaluation of {} (step {}), {} train / {} test images\n{:<14} {:>6} {:>9} {:>9} {:>9} {:>9}\n",
            self.checkpoint, self.step, self.train_rows, self.test_rows, "features", "dim", "linear@1", "linear@5", "kNN20@1", "kNN200@1"
        );
        for (name, r) in [
            ("byol", &self.byol),
            ("random init", &self.random_init),
            ("raw pixels", &self.raw_pixels),
        ] {
            s.push_str(&format!(
                "{:<14} {:>6} {:>8.2}% {:>8.2}% {:>8.2}% {:>8.2}%\n",
                name,
                r.dim,
                100.0 * r.linear_top1,
                100.0 * r.linear_top5,
                100.0 * r.knn20_top1,
                100.0 * r.knn200_top1
            ));
        }
        s
    }
}
