//! `byol train` end to end on generated shards: learning, exact resume, signals, errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use super::BIN;

pub const TINY: &str = r#"
[model.encoder]
arch = "resnet18"
cifar_stem = true
width = 0.125
[model.projector]
hidden = 64
out = 32
[model.predictor]
hidden = 64
out = 32
[optim]
base_lr = 1.0
warmup_epochs = 1.0
[train]
batch = 16
epochs = 3
seed = 1
device = "cpu"
log_every = 1
checkpoint_every = 4
keep = 2
torch_threads = 1
[data]
canvas = 32
decode_threads = 1
[augment]
size = 16
"#;

/// 128 generated 32×32 JPEGs in 4 classes, sharded.
pub fn dataset(dir: &Path) -> PathBuf {
    dataset_of(dir, "src", "ds", 128, 4)
}

/// `n` generated 32×32 JPEGs in `classes` classes in `dir/src_name`, sharded into
/// `dir/out_name`; writes `dir/tiny.toml`.
pub fn dataset_of(dir: &Path, src_name: &str, out_name: &str, n: usize, classes: usize) -> PathBuf {
    let src = dir.join(src_name);
    byol_tools::bench::write_synthetic_folder(&src, n, (32, 32), 90, classes).unwrap();
    let source = byol_tools::source::scan(
        &src,
        &byol_tools::source::Layout::ImageFolder,
        &Default::default(),
    )
    .unwrap();
    let out = dir.join(out_name);
    let opts = byol_tools::shard::ShardOptions {
        max_side: None,
        quality: 90,
        rows_per_shard: Some(64),
        shard_bytes: None,
        row_group_rows: 16,
        workers: 1,
        seed: 0,
        force: true,
        progress: false,
    };
    byol_tools::shard::shard(&source, "src", &out, &opts).unwrap();
    std::fs::write(dir.join("tiny.toml"), TINY).unwrap();
    out
}

pub fn train(dir: &Path, data: &Path, run: &str, extra: &[&str]) -> Output {
    let mut args = vec!["train", "--data", data.to_str().unwrap(), "--out"];
    let run = dir.join(run);
    args.push(run.to_str().unwrap());
    let cfg = dir.join("tiny.toml");
    if !extra.contains(&"--resume") {
        args.extend(["--config", cfg.to_str().unwrap()]);
    }
    args.extend(extra);
    args.push("--json");
    Command::new(BIN).args(&args).output().unwrap()
}

pub fn summary(o: &Output) -> Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn losses(run: &Path) -> Vec<(u64, f64, Option<f64>)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["step"].as_u64().unwrap(),
                v["loss"].as_f64().unwrap(),
                v["probe_acc"].as_f64(),
            )
        })
        .collect()
}

#[test]
fn interrupted_and_resumed_run_repeats_the_uninterrupted_losses() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let a = summary(&train(tmp.path(), &data, "a", &["--max-steps", "13"]));
    assert_eq!(a["steps"], 13);
    let b1 = summary(&train(tmp.path(), &data, "b", &["--max-steps", "6"]));
    assert_eq!(b1["steps"], 6);
    let b2 = summary(&train(
        tmp.path(),
        &data,
        "b",
        &["--resume", "--max-steps", "13"],
    ));
    assert_eq!(b2["steps"], 13);
    assert_eq!(a["last_loss"], b2["last_loss"]);
    let la = losses(&tmp.path().join("a"));
    let lb = losses(&tmp.path().join("b"));
    assert_eq!(la.len(), 13);
    assert!(
        la.iter().all(|r| r.2.is_some()),
        "the online probe reports accuracy"
    );
    assert_eq!(la, lb, "loss (and online-probe) sequences differ");
    // Old checkpoints are pruned to `keep`.
    let n = std::fs::read_dir(tmp.path().join("b/checkpoints"))
        .unwrap()
        .count();
    assert!(n <= 2, "{n} checkpoints kept");
}

#[test]
fn a_short_run_lowers_the_loss_without_collapse() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let s = summary(&train(tmp.path(), &data, "r", &[]));
    assert_eq!(s["steps"], 24); // 3 epochs × 8 batches
    let rows: Vec<Value> = std::fs::read_to_string(tmp.path().join("r/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mean =
        |r: &[Value]| r.iter().map(|v| v["loss"].as_f64().unwrap()).sum::<f64>() / r.len() as f64;
    let (first, last) = (mean(&rows[..4]), mean(&rows[rows.len() - 4..]));
    assert!(last < first - 0.2, "loss {first:.3} -> {last:.3}");
    for r in &rows {
        assert!(r["collapse"].as_f64().unwrap() > 0.05, "{r}");
        assert!(r["tau"].as_f64().unwrap() >= 0.99);
    }
    // lr warms up over the first epoch (8 steps) to 1.0 × 16/256.
    assert!((rows[7]["lr"].as_f64().unwrap() - 0.0625 * 7.0 / 8.0).abs() < 1e-9);
    let cfg = std::fs::read_to_string(tmp.path().join("r/config.toml")).unwrap();
    assert!(cfg.contains("width = 0.125"));
}

#[test]
fn sigint_finishes_the_step_and_leaves_a_resumable_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let run = tmp.path().join("s");
    let child = long_training(tmp.path(), &data, &run, 3);
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    let s = summary(&o);
    assert_eq!(s["stopped_by_signal"], true);
    let step = s["steps"].as_u64().unwrap();
    assert!((3..800).contains(&step));
    assert!(s["checkpoint"]
        .as_str()
        .unwrap()
        .ends_with(&format!("step-{step:09}")));
    let r = summary(&train(
        tmp.path(),
        &data,
        "s",
        &["--resume", "--max-steps", &(step + 2).to_string()],
    ));
    assert_eq!(r["steps"].as_u64().unwrap(), step + 2);
}

/// A 100-epoch training of the tiny config into `run`, returned once `rows` metrics rows
/// are written (stdout piped for the summary).
fn long_training(dir: &Path, data: &Path, run: &Path, rows: usize) -> std::process::Child {
    let child = Command::new(BIN)
        .args([
            "train",
            "--data",
            data.to_str().unwrap(),
            "--out",
            run.to_str().unwrap(),
        ])
        .arg("--config")
        .arg(dir.join("tiny.toml"))
        .args(["--set", "train.epochs=100", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while losses_len(run) < rows && t0.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child
}

fn losses_len(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

#[test]
fn incompatible_resume_and_diverging_loss_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    summary(&train(tmp.path(), &data, "c", &["--max-steps", "2"]));
    let o = train(
        tmp.path(),
        &data,
        "c",
        &["--resume", "--set", "optim.base_lr=0.5"],
    );
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("optim.base_lr"), "{e}");
    // Changing the logging interval is allowed.
    summary(&train(
        tmp.path(),
        &data,
        "c",
        &["--resume", "--set", "train.log_every=2", "--max-steps", "3"],
    ));
    // A new run over an existing one is refused.
    let o = train(tmp.path(), &data, "c", &[]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"));

    let o = train(
        tmp.path(),
        &data,
        "nan",
        &[
            "--set",
            "optim.kind=\"sgd\"",
            "--set",
            "optim.base_lr=1e30",
            "--set",
            "optim.warmup_epochs=0.0",
            "--set",
            "train.checkpoint_every=1",
        ],
    );
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("loss is") && e.contains("last good checkpoint"),
        "{e}"
    );
}

#[test]
fn eval_writes_the_report_schema() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    summary(&train(tmp.path(), &data, "e", &["--max-steps", "4"]));
    let run = tmp.path().join("e");
    let o = Command::new(BIN)
        .args([
            "eval",
            "--run",
            run.to_str().unwrap(),
            "--train",
            data.to_str().unwrap(),
            "--test",
            data.to_str().unwrap(),
            "--json",
        ])
        .output()
        .unwrap();
    let v = summary(&o);
    let file: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("eval.json")).unwrap()).unwrap();
    assert_eq!(v["step"], 4);
    assert_eq!(file["train_rows"], 128);
    for set in ["byol", "random_init", "raw_pixels"] {
        for k in ["linear_top1", "linear_top5", "knn20_top1", "knn200_top1"] {
            let x = file[set][k].as_f64().unwrap_or(-1.0);
            assert!((0.0..=1.0).contains(&x), "{set}.{k} = {x}");
        }
    }
    assert!(run.join("curves.png").exists());
}

/// `byol export` writes an ONNX encoder that ONNX Runtime runs like libtorch (checked by
/// the command itself) and like an independent PyTorch build of the same checkpoint (the
/// fixture script); `byol embed` writes one row per image whose embedding matches the
/// image embedded independently (PIL decode, PyTorch resize, onnxruntime in Python).
#[test]
fn export_and_embed_agree_with_pytorch_and_onnxruntime() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    summary(&train(tmp.path(), &data, "x", &["--max-steps", "6"]));
    let run = tmp.path().join("x");
    let onnx = tmp.path().join("enc.onnx");
    let o = Command::new(BIN)
        .args(["export", "--run", run.to_str().unwrap(), "--out"])
        .arg(&onnx)
        .args(["--check-data", data.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    let e = summary(&o);
    assert_eq!(e["step"], 6);
    assert_eq!(e["dim"], 64); // 512 × width 0.125
    assert_eq!(e["size"], 16);
    assert_eq!(e["convs"], 20); // stem + 16 in blocks + 3 downsample
    assert_eq!(e["check_images"], 128);
    let diff = e["max_abs_diff"].as_f64().unwrap();
    assert!(
        diff < 1e-4 * e["max_abs_value"].as_f64().unwrap().max(1.0),
        "{e}"
    );
    assert!(onnx.exists() && !tmp.path().join("enc.onnx.partial").exists());

    let emb = tmp.path().join("emb.parquet");
    let o = Command::new(BIN)
        .args(["embed", "--model"])
        .arg(&onnx)
        .args(["--data", data.to_str().unwrap(), "--batch", "24", "--out"])
        .arg(&emb)
        .arg("--json")
        .output()
        .unwrap();
    let m = summary(&o);
    assert_eq!(
        (m["rows"].as_u64(), m["missing"].as_u64()),
        (Some(128), Some(0))
    );

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ckpt = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|d| d.unwrap().path())
        .max()
        .unwrap();
    let o = Command::new(root.join(".venv/bin/python"))
        .arg(root.join("scripts/fixtures/check_onnx.py"))
        .args(["--onnx", onnx.to_str().unwrap(), "--checkpoint"])
        .arg(&ckpt)
        .args(["--config", run.join("config.toml").to_str().unwrap()])
        .args([
            "--data",
            data.to_str().unwrap(),
            "--embeddings",
            emb.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let c = summary(&o);
    assert_eq!(c["checker"], "ok", "{c}");
    assert_eq!(c["metadata"]["byol.step"], "6");
    let d = c["torch_vs_ort_max_abs_diff"].as_f64().unwrap();
    assert!(
        d < 1e-4 * c["torch_max_abs"].as_f64().unwrap().max(1.0),
        "{c}"
    );
    assert_eq!(c["embed_rows"], 128);
    assert_eq!(c["embed_unique_keys"], 128);
    assert_eq!(c["keys_missing_from_embeddings"], 0);
    assert!(c["embed_cosine_min"].as_f64().unwrap() > 0.999, "{c}");
    assert_eq!(c["embed_nearest_is_same_key"].as_f64(), Some(1.0), "{c}");

    // A model that is not there, and a run without checkpoints: clear errors naming them.
    let o = Command::new(BIN)
        .args(["embed", "--model", "/nonexistent/enc.onnx", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/enc.onnx"));
    std::fs::create_dir_all(tmp.path().join("empty/checkpoints")).unwrap();
    std::fs::copy(
        run.join("config.toml"),
        tmp.path().join("empty/config.toml"),
    )
    .unwrap();
    let o = Command::new(BIN)
        .args(["export", "--run"])
        .arg(tmp.path().join("empty"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("has no checkpoint"));
}

/// `byol export --format torchvision` writes the encoder under torchvision's names: a
/// width-1 ResNet-18 with the ImageNet stem loads into `torchvision.models.resnet18()`
/// with only `fc.*` missing, and its eval-mode features on real images equal byol's
/// (the ONNX export of the same checkpoint in onnxruntime) within 1e-4 relative
/// (`scripts/fixtures/check_torchvision.py`). A CIFAR-stem encoder is written too, with
/// what differs from the stock model said. An `--out` naming a folder is refused, the
/// folder kept (regression: the atomic rename once replaced a run folder by the file).
#[test]
fn torchvision_weights_load_into_torchvision_with_the_same_features() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let wide = [
        "--max-steps",
        "2",
        "--set",
        "model.encoder.width=1.0",
        "--set",
        "model.encoder.cifar_stem=false",
        "--set",
        "augment.size=32",
    ];
    summary(&train(tmp.path(), &data, "r18", &wide));
    let run = tmp.path().join("r18");
    let export = |format: &str, out: &Path| {
        let o = Command::new(BIN)
            .args(["export", "--run", run.to_str().unwrap(), "--format", format])
            .arg("--out")
            .arg(out)
            .arg("--json")
            .output()
            .unwrap();
        summary(&o)
    };
    let onnx = tmp.path().join("r18.onnx");
    let st = tmp.path().join("r18.safetensors");
    export("onnx", &onnx);
    let e = export("torchvision", &st);
    assert_eq!(e["arch"], "resnet18");
    assert_eq!(e["loads_into_stock_model"], true, "{e}");
    // torchvision's resnet18 state_dict has 122 entries, 2 of them fc.
    assert_eq!(e["tensors"], 120, "{e}");

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let o = Command::new(root.join(".venv/bin/python"))
        .arg(root.join("scripts/fixtures/check_torchvision.py"))
        .args([
            "--weights",
            st.to_str().unwrap(),
            "--onnx",
            onnx.to_str().unwrap(),
        ])
        .args(["--config", run.join("config.toml").to_str().unwrap()])
        .args(["--data", data.to_str().unwrap()])
        .output()
        .unwrap();
    let c = summary(&o);
    assert_eq!(
        c["missing"],
        serde_json::json!(["fc.bias", "fc.weight"]),
        "{c}"
    );
    assert_eq!(c["unexpected"], serde_json::json!([]), "{c}");
    assert_eq!(c["images"], 64);
    let d = c["max_abs_diff"].as_f64().unwrap();
    assert!(d < 1e-4 * c["max_abs"].as_f64().unwrap().max(1.0), "{c}");

    // The timm / Hugging Face bundle: loads in timm from the file and from the folder
    // (config.json), with the same features as byol's encoder.
    let bundle = tmp.path().join("r18-hf");
    let h = export("hf", &bundle);
    assert_eq!(
        (h["arch"].as_str(), h["num_classes"].as_u64()),
        (Some("resnet18"), Some(0))
    );
    assert_eq!(h["timm_builds_it"], true, "{h}");
    let card = std::fs::read_to_string(bundle.join("README.md")).unwrap();
    assert!(
        card.starts_with("---\nlibrary_name: timm\n") && card.contains("[train]"),
        "{card}"
    );
    let o = Command::new(root.join(".venv/bin/python"))
        .arg(root.join("scripts/fixtures/check_timm.py"))
        .args([
            "--dir",
            bundle.to_str().unwrap(),
            "--onnx",
            onnx.to_str().unwrap(),
        ])
        .args(["--config", run.join("config.toml").to_str().unwrap()])
        .args(["--data", data.to_str().unwrap()])
        .output()
        .unwrap();
    let t = summary(&o);
    for way in ["file", "local_dir"] {
        let r = &t[way];
        assert_eq!(
            (r["num_features"].as_u64(), r["num_classes"].as_u64()),
            (Some(512), Some(0)),
            "{t}"
        );
        assert_eq!(r["mean"], t["config_mean"], "{t}");
        let d = r["max_abs_diff"].as_f64().unwrap();
        assert!(
            d < 1e-4 * r["max_abs"].as_f64().unwrap().max(1.0),
            "{way}: {t}"
        );
    }

    // An --out that names a folder (here the run itself) is refused and the folder kept,
    // in both formats; so is an --out in a folder that does not exist.
    let other = tmp.path().join("a-folder");
    std::fs::create_dir(&other).unwrap();
    for format in ["torchvision", "onnx"] {
        for (out, says) in [
            (&run, "is the same path as --run"),
            (&other, "a folder is there"),
        ] {
            let o = Command::new(BIN)
                .args([
                    "export",
                    "--run",
                    run.to_str().unwrap(),
                    "--format",
                    format,
                    "--out",
                ])
                .arg(out)
                .output()
                .unwrap();
            assert_eq!(o.status.code(), Some(2), "{format}");
            let e = String::from_utf8_lossy(&o.stderr);
            assert!(e.contains(says), "{format}: {e}");
        }
        assert!(run.join("config.toml").exists() && run.join("checkpoints").is_dir());
        assert!(other.is_dir());
    }
    let o = Command::new(BIN)
        .args([
            "export",
            "--run",
            run.to_str().unwrap(),
            "--format",
            "torchvision",
            "--out",
        ])
        .arg(tmp.path().join("nodir/enc.safetensors"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no folder"));

    // The tiny CIFAR-stem encoder at width 0.125: written, with the differences said.
    summary(&train(tmp.path(), &data, "tiny", &["--max-steps", "1"]));
    let o = Command::new(BIN)
        .args(["export", "--format", "torchvision", "--run"])
        .arg(tmp.path().join("tiny"))
        .arg("--out")
        .arg(tmp.path().join("tiny.safetensors"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&summary_text(&o)).into_owned();
    assert!(text.contains("3x3 stride-1 stem"), "{text}");
    assert!(text.contains("0.125x torchvision's width"), "{text}");
}

fn summary_text(o: &Output) -> Vec<u8> {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o.stdout.clone()
}

/// The first `n` Fashion-MNIST images of `prefix` (`train` or `t10k`) written as raw IDX
/// files and sharded.
pub fn fmnist_subset(dir: &Path, prefix: &str, n: usize) -> PathBuf {
    use byol_tools::idx::read_idx_u8;
    let root = Path::new("/usr/share/datasets/fashion-mnist");
    let imgs = read_idx_u8(&root.join(format!("{prefix}-images-idx3-ubyte.gz"))).unwrap();
    let labs = read_idx_u8(&root.join(format!("{prefix}-labels-idx1-ubyte.gz"))).unwrap();
    let write = |name: &str, magic: u8, dims: &[usize], data: &[u8]| {
        let mut b = vec![0u8, 0, 8, magic];
        for d in dims {
            b.extend_from_slice(&(*d as u32).to_be_bytes());
        }
        b.extend_from_slice(data);
        let p = dir.join(name);
        std::fs::write(&p, b).unwrap();
        p
    };
    let images = write(
        &format!("{prefix}-images"),
        3,
        &[n, 28, 28],
        &imgs.data[..n * 784],
    );
    let labels = write(&format!("{prefix}-labels"), 1, &[n], &labs.data[..n]);
    let source = byol_tools::source::scan(
        dir,
        &byol_tools::source::Layout::Idx {
            images,
            labels: Some(labels),
        },
        &Default::default(),
    )
    .unwrap();
    let out = dir.join(prefix);
    let opts = byol_tools::shard::ShardOptions {
        max_side: None,
        quality: 90,
        rows_per_shard: None,
        shard_bytes: None,
        row_group_rows: 256,
        workers: 1,
        seed: 0,
        force: true,
        progress: false,
    };
    byol_tools::shard::shard(&source, prefix, &out, &opts).unwrap();
    out
}

/// A short BYOL run of the Fashion-MNIST preset on 20,000 images (batch 256, 8 epochs,
/// 624 steps, float32 on every machine so that every machine runs the same recipe): the
/// linear probe on its encoder beats the same probe on a randomly initialised encoder of
/// the same shape by more than 3 points.
///
/// Cost: 270 s on a 2-core AVX512-BF16 EPYC (570 images/s in float32); on a 2-core AVX2
/// CPU without native bf16 (113 images/s) about 24 minutes. Measured (linear top-1 vs
/// random init): seed 2 in float32 80.7 vs 75.7 % (256 s); in bf16 seeds 1 and 2 80.6 vs
/// 72.3 % and 80.6 vs 75.7 %.
///
/// Nothing cheaper was reliable across seeds 0–2 on this data: BYOL's encoder first moves
/// away from the (good, 64–79 %) random features and needs about 160,000 images of
/// training (not a number of steps or epochs) to pass them again for every seed. Tried on
/// the EPYC, float32, 1,000 test images, each line `seed: BYOL vs random`:
/// - 6 epochs: seed 1 77.3 vs 72.3, seed 2 77.2 vs 75.7 (+1.5, under the margin);
/// - 4 epochs (seed 1, random 72.3): the preset 68.3; base lr 1.0 70.7, 0.6 64.5, 0.3
///   64.5; warm-up 0.25 epoch 70.7 (with lr 1.0 67.2); τ_base 0.96 and lr 1.0 70.7;
///   AdamW lr 1e-3 60.3; milder crops (0.5–1) and blur 68.0; 5 epochs, warm-up 0.25: 66.7;
/// - 3 epochs with τ_base 0.9: seed 0 78.8 vs 73.2, seed 1 66.4 vs 72.3, seed 2 71.8
///   vs 75.7 (with lr 1.0, seed 1: 71.0);
/// - 10,000 images × 8 epochs (312 steps): seed 1 67.8 vs 72.8, seed 2 68.8 vs 76.2;
/// - cheaper models: 20-px views, 8 epochs (1.8× cheaper): seed 1 74.7 vs 77.7;
///   `stem_pool` (2.7× cheaper), 10 epochs: seed 1 81.5 vs 77.9, seed 2 79.5 vs 77.7
///   (+1.8); width 0.125 (1.5× cheaper), 5 or 8 epochs: seed 2 67.5 / 72.2 vs 70.4;
///   16-px views, 8 or 10 epochs: seed 1 80.0 vs 76.2, seed 2 74.0 vs 75.5;
/// - batch 128, 2 epochs: seed 1 56.1 vs 72.3; 4 epochs: seed 2 76.0 vs 75.7.
///
/// Then the semi-supervised question on the same encoder: fine-tuned on 10 labels per
/// class (100 images; `configs/finetune-fmnist.toml` at batch 25, 40 epochs = 160 steps,
/// about 10 s each on the AVX2 CPU), it beats the same network trained from scratch on
/// the same labels and steps, for fine-tuning seeds 0 and 1, by more than 2 points on
/// average. Measured on a 2-core AVX2 EPYC (fp32), test top-1 BYOL vs scratch: seed 0
/// 69.5 vs 66.4, seed 1 71.4 vs 67.5, seed 2 66.1 vs 61.3. Less reliable recipes, same
/// machine, seeds 0–2: batch 50 (80 steps) +3.3/+2.2/+3.4; lr 0.03 +1.1/+3.9/+1.5; lr
/// 0.01 0.0/−2.9/−0.2; lr 0.3 diverges for some seeds; 5 labels per class
/// +3.0/+0.4/+1.1; 100 epochs at batch 50 +3.2/+0.5/+1.4.
#[test]
fn a_short_fmnist_run_beats_random_init() {
    let tmp = tempfile::tempdir().unwrap();
    let train_ds = fmnist_subset(tmp.path(), "train", 20000);
    let test_ds = fmnist_subset(tmp.path(), "t10k", 1000);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let run = tmp.path().join("run");
    let o = Command::new(BIN)
        .args(["train", "--config"])
        .arg(root.join("configs/fmnist.toml"))
        .args([
            "--data",
            train_ds.to_str().unwrap(),
            "--out",
            run.to_str().unwrap(),
        ])
        .args(["--set", "train.batch=256", "--set", "train.epochs=8"])
        .args(["--set", "train.precision=\"fp32\""])
        .args(["--set", "train.device=\"cpu\"", "--json"])
        .output()
        .unwrap();
    let s = summary(&o);
    assert_eq!(s["steps"], 8 * (20000 / 256));
    let o = Command::new(BIN)
        .args(["eval", "--run", run.to_str().unwrap(), "--train"])
        .arg(&train_ds)
        .args(["--test", test_ds.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    let e = summary(&o);
    let byol = e["byol"]["linear_top1"].as_f64().unwrap();
    let random = e["random_init"]["linear_top1"].as_f64().unwrap();
    eprintln!("BYOL linear {byol:.4}, random init {random:.4}");
    assert!(
        byol > random + 0.03,
        "BYOL {byol} vs random init {random}: {e}"
    );

    let mut margins = Vec::new();
    for seed in [0, 1] {
        let mut top1 = Vec::new();
        for init in ["byol", "random"] {
            let out = tmp.path().join(format!("ft-{init}-{seed}"));
            let o = Command::new(BIN)
                .args(["finetune", "--run", run.to_str().unwrap(), "--train"])
                .arg(&train_ds)
                .args(["--test", test_ds.to_str().unwrap(), "--out"])
                .arg(&out)
                .args(["--init", init, "--labels-per-class", "10", "--config"])
                .arg(root.join("configs/finetune-fmnist.toml"))
                .args(["--set", "finetune.batch=25", "--set", "finetune.epochs=40"])
                .args(["--set", &format!("train.seed={seed}"), "--json"])
                .output()
                .unwrap();
            let f = summary(&o);
            assert_eq!(f["labels"], 100);
            top1.push(f["test_top1"].as_f64().unwrap());
        }
        eprintln!(
            "seed {seed}: fine-tuned BYOL {:.4}, from scratch {:.4}",
            top1[0], top1[1]
        );
        assert!(
            top1[0] > top1[1],
            "seed {seed}: BYOL {} vs scratch {}",
            top1[0],
            top1[1]
        );
        margins.push(top1[0] - top1[1]);
    }
    let mean = margins.iter().sum::<f64>() / margins.len() as f64;
    assert!(
        mean > 0.02,
        "fine-tuned BYOL beats scratch by {mean:.4} on average: {margins:?}"
    );
}

fn config_of(run: &Path) -> toml::Table {
    toml::from_str(&std::fs::read_to_string(run.join("config.toml")).unwrap()).unwrap()
}

/// `--time-budget` calibrates, then fixes the run's length in its config: the
/// budgeted run equals a plain run of that many steps (the calibration leaves no trace in
/// the trajectory), `--resume` keeps the length, and the τ schedule ends at that step.
/// With stderr not a terminal, plain progress lines appear.
#[test]
fn time_budget_fixes_the_run_length_and_resume_keeps_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let cfg = tmp.path().join("tiny.toml");
    let run_b = tmp.path().join("budget");
    let o = Command::new(BIN)
        .args(["train", "--data", data.to_str().unwrap(), "--out"])
        .arg(&run_b)
        .arg("--config")
        .arg(&cfg)
        .args(["--set", "train.epochs=1000", "--time-budget", "14s"])
        .args(["--max-steps", "5", "--json"])
        .env("BYOL_PROGRESS_SECS", "0.05")
        .output()
        .unwrap();
    let s1 = summary(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("byol train: precision "), "{err}");
    assert!(err.contains("byol train: time budget: calibrated"), "{err}");
    assert!(
        err.lines()
            .any(|l| l.starts_with("train: ") && l.contains("/") && l.contains("steps")),
        "no plain progress line: {err}"
    );
    let n = s1["total_steps"].as_u64().unwrap();
    assert!(n > 5 && n < 8 * 1000, "{n} steps chosen");
    assert_eq!(s1["steps"], 5);
    assert_eq!(s1["time_budget_s"], 14.0);
    let c = config_of(&run_b);
    assert_eq!(c["train"]["total_steps"].as_integer(), Some(n as i64));
    let resolved = &c["resolved"];
    assert_eq!(resolved["time_budget_s"].as_float(), Some(14.0));
    assert!(resolved["calibrated_images_per_s"].as_float().unwrap() > 0.0);
    assert!(["bf16", "fp32"].contains(&resolved["precision"].as_str().unwrap()));

    // A resumed run keeps its length; a new budget on resume is refused.
    let o = train(
        tmp.path(),
        &data,
        "budget",
        &["--resume", "--time-budget", "1m"],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--time-budget"));
    let s2 = summary(&train(tmp.path(), &data, "budget", &["--resume"]));
    assert_eq!(
        (s2["steps"].as_u64(), s2["total_steps"].as_u64()),
        (Some(n), Some(n))
    );

    // The same length without a budget: the same losses.
    summary(&train(
        tmp.path(),
        &data,
        "plain",
        &[
            "--set",
            "train.epochs=1000",
            "--set",
            &format!("train.total_steps={n}"),
        ],
    ));
    let (lb, lp) = (losses(&run_b), losses(&tmp.path().join("plain")));
    assert_eq!(lb.len() as u64, n);
    assert_eq!(
        lb, lp,
        "the budgeted run differs from a plain run of {n} steps"
    );
    // τ's cosine schedule spans the chosen length: it reaches 1 at the end.
    let last: Value = serde_json::from_str(
        std::fs::read_to_string(run_b.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    let tau_last = last["tau"].as_f64().unwrap();
    let expect =
        1.0 - 0.01 * ((std::f64::consts::PI * (n - 1) as f64 / n as f64).cos() + 1.0) / 2.0;
    assert!(
        (tau_last - expect).abs() < 1e-9,
        "tau {tau_last} vs {expect}"
    );
}

/// `make demo` must not evaluate a run that a signal (or an error) stopped: Ctrl-C
/// reaches the whole process group, training checkpoints and exits 0, and the script
/// then stops with a message saying how to continue.
#[test]
fn demo_refuses_to_evaluate_after_an_interrupted_training() {
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    // The demo's data folder: train and test shards.
    let demo_data = tmp.path().join("demo-data");
    std::fs::create_dir_all(&demo_data).unwrap();
    std::os::unix::fs::symlink(&data, demo_data.join("train")).unwrap();
    std::os::unix::fs::symlink(&data, demo_data.join("test")).unwrap();
    let run = tmp.path().join("demo-run");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let child = Command::new("bash")
        .arg(root.join("scripts/demo"))
        .env("BYOL_BIN", BIN)
        .env(
            "BYOL_TOOLS_BIN",
            env!("CARGO_BIN_EXE_byol").replace("/byol", "/byol-tools"),
        )
        .env("DEMO_DATA", &demo_data)
        .env("DEMO_RUN", &run)
        .env("DEMO_CONFIG", tmp.path().join("tiny.toml"))
        .env("DEMO_MINUTES", "2")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while losses_len(&run) < 2 && t0.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Ctrl-C on a terminal: SIGINT to the foreground process group.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(
        err.contains("nothing evaluated") && err.contains("make demo"),
        "{err}"
    );
    assert!(!run.join("eval.json").exists());
    assert!(run.join("train-summary.json").exists());
}

/// The precision is chosen by the hardware: with oneDNN capped below AVX-512 BF16
/// (as on an AVX2-only CPU) `auto` is float32 and an explicit bf16 warns of the
/// emulation's slow-down; `bench train` reports what it used.
#[test]
fn precision_follows_the_hardware_and_explicit_emulated_bf16_warns() {
    let o = Command::new(BIN)
        .args(["info", "--json"])
        .env("ONEDNN_MAX_CPU_ISA", "AVX2")
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["auto_precision"], "fp32", "{v}");
    assert!(v["auto_precision_reason"]
        .as_str()
        .unwrap()
        .contains("emulated"));

    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("tiny.toml"), TINY).unwrap();
    let bench = |precision: &str| {
        Command::new(BIN)
            .args(["bench", "train", "--config"])
            .arg(tmp.path().join("tiny.toml"))
            .args(["--synthetic", "--steps", "1", "--no-reference", "--json"])
            .args(["--set", &format!("train.precision=\"{precision}\"")])
            .env("ONEDNN_MAX_CPU_ISA", "AVX2")
            .output()
            .unwrap()
    };
    let o = bench("bf16");
    let s = summary(&o);
    assert_eq!(s["precision"], "bf16");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("WARNING") && err.contains("slower"), "{err}");
    let o = bench("auto");
    assert_eq!(summary(&o)["precision"], "fp32");
    assert!(!String::from_utf8_lossy(&o.stderr).contains("WARNING"));
}

// ---- Regression tests: runs put together with the wrong data or twice ------------

/// `--resume --data OTHER` on a 24-image dataset reported "done" at step 4 of 2. A run
/// records its data's fingerprint and refuses other data, naming both; held-out data
/// with other classes is refused for `--val` and `byol eval`.
#[test]
fn resuming_on_other_data_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset_of(tmp.path(), "src96", "ds96", 96, 4);
    let other = dataset_of(tmp.path(), "src24", "ds24", 24, 4);
    let three = dataset_of(tmp.path(), "src3", "ds3", 24, 3);
    summary(&train(
        tmp.path(),
        &data,
        "r",
        &["--set", "train.epochs=2", "--max-steps", "4"],
    ));
    let o = train(tmp.path(), &other, "r", &["--resume"]);
    assert_eq!(o.status.code(), Some(2));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("ds96") && e.contains("ds24") && e.contains("--resume"),
        "{e}"
    );
    // The same data resumes.
    summary(&train(
        tmp.path(),
        &data,
        "r",
        &["--resume", "--max-steps", "5"],
    ));
    // Held-out data with other classes.
    let o = train(
        tmp.path(),
        &data,
        "v",
        &["--val", three.to_str().unwrap(), "--max-steps", "1"],
    );
    assert_eq!(o.status.code(), Some(2));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("different classes") && e.contains("ds3"), "{e}");
    let o = Command::new(BIN)
        .args(["eval", "--run", tmp.path().join("r").to_str().unwrap()])
        .args([
            "--train",
            data.to_str().unwrap(),
            "--test",
            three.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("different classes"));
}

/// With `--batch 1`, a damaged image had no good sample to be replaced by, so its blank
/// stand-in got an embedding row under the damaged key and the report said 0 missing.
/// A replacement never carries the identity of the image it replaces.
#[test]
fn a_batch_in_which_no_image_decodes_gets_no_embedding() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset_of(tmp.path(), "src12", "ds12", 12, 2);
    summary(&train(
        tmp.path(),
        &data,
        "x",
        &["--set", "train.batch=4", "--max-steps", "2"],
    ));
    let onnx = tmp.path().join("enc.onnx");
    summary(
        &Command::new(BIN)
            .args([
                "export",
                "--run",
                tmp.path().join("x").to_str().unwrap(),
                "--out",
            ])
            .arg(&onnx)
            .arg("--json")
            .output()
            .unwrap(),
    );
    let damaged = damage_rows(&data, "3");
    for batch in ["1", "5"] {
        let emb = tmp.path().join(format!("emb{batch}.parquet"));
        let o = Command::new(BIN)
            .args(["embed", "--model"])
            .arg(&onnx)
            .args(["--data", data.to_str().unwrap(), "--batch", batch, "--out"])
            .arg(&emb)
            .arg("--json")
            .output()
            .unwrap();
        let m = summary(&o);
        assert_eq!(
            (m["rows"].as_u64(), m["missing"].as_u64()),
            (Some(11), Some(1)),
            "batch {batch}: {m}"
        );
        assert_eq!(
            m["missing_keys"],
            serde_json::json!([damaged]),
            "batch {batch}"
        );
    }
}

/// Replaces stored images of a shard folder with bytes that do not decode (`which`: a
/// row index of the first shard, "first-shard" or "all"; the Parquet files stay valid);
/// returns the first damaged key.
pub fn damage_rows(data: &Path, which: &str) -> String {
    let code = r#"
import sys, os, pyarrow as pa, pyarrow.parquet as pq
d, which = sys.argv[1], sys.argv[2]
keys = []
for f in sorted(f for f in os.listdir(d) if f.endswith(".parquet")):
    p = os.path.join(d, f)
    t = pq.read_table(p)
    imgs = t.column("image").to_pylist()
    rows = range(len(imgs)) if which in ("all", "first-shard") else [int(which)]
    for r in rows:
        imgs[r] = b"not an image any more"
        keys.append(t.column("key")[r].as_py())
    t = t.set_column(2, pa.field("image", pa.binary(), nullable=False), pa.array(imgs, pa.binary()))
    pq.write_table(t, p, compression="none", row_group_size=16)
    if which != "all":
        break
print(keys[0])
"#;
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let o = Command::new(py)
        .args(["-c", code, data.to_str().unwrap(), which])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// A second `byol train --out RUN` while another one writes RUN ran to the end beside
/// it (checkpoints of both, interleaved metrics). Now it refuses at once, naming the
/// process that holds the folder; the lock goes with the holder.
#[test]
fn a_second_training_into_the_same_run_folder_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let run = tmp.path().join("busy");
    let child = long_training(tmp.path(), &data, &run, 1);
    let pid = child.id();
    let o = train(tmp.path(), &data, "busy", &["--resume"]);
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let first = summary(&child.wait_with_output().unwrap());
    assert_eq!(o.status.code(), Some(2));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("in use by another `byol train`") && e.contains(&format!("pid {pid}")),
        "{e}"
    );
    // The holder is gone: the folder is free again.
    let next = first["steps"].as_u64().unwrap() + 1;
    summary(&train(
        tmp.path(),
        &data,
        "busy",
        &["--resume", "--max-steps", &next.to_string()],
    ));
}

/// A `byol train --nproc-per-node 2` of the tiny config (100 epochs) into `run`,
/// returned once `rows` metrics rows are written; `extra` are more arguments.
fn launched(
    dir: &Path,
    data: &Path,
    run: &Path,
    rows: usize,
    extra: &[&str],
) -> std::process::Child {
    let child = Command::new(BIN)
        .args(["train", "--nproc-per-node", "2", "--data"])
        .arg(data)
        .arg("--out")
        .arg(run)
        .arg("--config")
        .arg(dir.join("tiny.toml"))
        .args(["--set", "train.epochs=100", "--json"])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while losses_len(run) < rows && t0.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child
}

/// The child processes of `pid` (a launcher's workers), from `/proc`.
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.map(|t| {
                std::fs::read_to_string(t.unwrap().path().join("children")).unwrap_or_default()
            })
            .collect::<String>()
        })
        .unwrap_or_default()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect()
}

/// Two local workers over Gloo on Fashion-MNIST shards: SIGINT to the launcher stops both
/// after the same step
/// with one checkpoint (exit 0); the run resumes at world size 1, and again at world size
/// 2 under torchrun with `--resume auto`.
#[test]
fn nproc_per_node_stops_on_sigint_and_resumes_at_other_world_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fmnist_subset(tmp.path(), "train", 512);
    std::fs::write(tmp.path().join("tiny.toml"), TINY).unwrap();
    let run = tmp.path().join("d");
    let child = launched(tmp.path(), &data, &run, 3, &[]);
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    let s = summary(&o);
    assert_eq!(
        (s["world_size"].as_u64(), s["stopped_by_signal"].as_bool()),
        (Some(2), Some(true))
    );
    let step = s["steps"].as_u64().unwrap();
    assert!(s["checkpoint"]
        .as_str()
        .unwrap()
        .ends_with(&format!("step-{step:09}")));
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(run.join(format!("checkpoints/step-{step:09}/state.json")))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(state["world"], 2);
    assert_eq!(state["ranks"].as_array().unwrap().len(), 2);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("[rank 0] byol train: precision"),
        "worker output is prefixed:\n{stderr}"
    );
    assert!(
        !stderr.contains("[rank 1] byol train: precision"),
        "rank 0 alone reports:\n{stderr}"
    );
    // Rank 0 alone writes the metrics: one row per step.
    let steps: Vec<u64> = losses(&run).iter().map(|r| r.0).collect();
    assert_eq!(steps, (1..=step).collect::<Vec<_>>());

    // A resume that trains nothing (already past --max-steps) at another world size
    // leaves the world-2 checkpoint as it was.
    let ckpt_state = run.join(format!("checkpoints/step-{step:09}/state.json"));
    let before = std::fs::read(&ckpt_state).unwrap();
    let o = train(tmp.path(), &data, "d", &["--resume", "--max-steps", "1"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("nothing to train"));
    assert_eq!(summary(&o)["steps"].as_u64(), Some(step));
    assert_eq!(std::fs::read(&ckpt_state).unwrap(), before);

    let one = summary(&train(
        tmp.path(),
        &data,
        "d",
        &["--resume", "--max-steps", &(step + 2).to_string()],
    ));
    assert_eq!(
        (one["steps"].as_u64(), one["world_size"].as_u64()),
        (Some(step + 2), Some(1))
    );

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let o = Command::new(root.join(".venv/bin/torchrun"))
        .args([
            "--nproc-per-node",
            "2",
            "--no-python",
            BIN,
            "train",
            "--resume",
            "auto",
            "--data",
        ])
        .arg(&data)
        .arg("--out")
        .arg(&run)
        .arg("--config")
        .arg(tmp.path().join("tiny.toml"))
        .args([
            "--set",
            "train.epochs=100",
            "--max-steps",
            &(step + 4).to_string(),
            "--json",
        ])
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    let t = summary(&o);
    assert_eq!(
        (t["steps"].as_u64(), t["world_size"].as_u64()),
        (Some(step + 4), Some(2))
    );
}

/// A worker killed mid-run: the launcher names it, stops the other (which fails its
/// next collective, naming the rank that vanished) and exits non-zero. A global batch
/// that the world size does not divide is refused.
#[test]
fn a_killed_worker_fails_the_launch_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let run = tmp.path().join("k");
    let mut child = launched(
        tmp.path(),
        &data,
        &run,
        3,
        &["--set", "train.collective_timeout_s=30"],
    );
    let workers = children_of(child.id());
    let rank1 = workers
        .iter()
        .copied()
        .find(|p| {
            std::fs::read(format!("/proc/{p}/environ"))
                .map(|e| e.split(|&b| b == 0).any(|v| v == b"RANK=1"))
                .unwrap_or(false)
        })
        .expect("rank 1's worker");
    unsafe { libc::kill(rank1 as i32, libc::SIGKILL) };
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed().as_secs() < 90, "the launcher did not stop");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(
        err.contains(&format!(
            "worker rank 1 (pid {rank1}) was killed by signal 9"
        )),
        "{err}"
    );

    let o = Command::new(BIN)
        .args(["train", "--nproc-per-node", "2", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(tmp.path().join("odd"))
        .arg("--config")
        .arg(tmp.path().join("tiny.toml"))
        .args(["--set", "train.batch=15"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    // The launcher exits with the code of the worker that failed first, whether or not
    // the other reached the same error before it was stopped.
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("must be divisible by the world size 2"),
        "{err}"
    );
}

/// A restart with `--resume auto` after a worker died continues from the last
/// checkpoint, and the metrics rows the failed attempt wrote after it are dropped (one
/// row per step, no repeats); a launcher killed with SIGKILL takes its workers down
/// (`PR_SET_PDEATHSIG`), which stop after the same step with a checkpoint.
#[test]
fn restarts_drop_stale_metrics_and_workers_follow_their_launcher() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let run = tmp.path().join("r");
    // Killed after more rows than checkpoints (checkpoint_every 4, a row per step).
    let mut child = launched(
        tmp.path(),
        &data,
        &run,
        6,
        &["--set", "train.collective_timeout_s=30"],
    );
    let pids = children_of(child.id());
    assert_eq!(pids.len(), 2);
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
    let t0 = std::time::Instant::now();
    while pids
        .iter()
        .any(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
        && t0.elapsed().as_secs() < 60
    {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        pids.iter().all(
            |p| !std::path::Path::new(&format!("/proc/{p}/cmdline")).exists()
                || std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .map_or(true, |s| s.contains(") Z "))
        ),
        "workers outlived their launcher"
    );
    let last_row = losses(&run).last().unwrap().0;
    let ckpts: Vec<u64> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| {
            e.unwrap().file_name().to_string_lossy()["step-".len()..]
                .parse()
                .unwrap()
        })
        .collect();
    assert!(
        ckpts.contains(&last_row),
        "no checkpoint at the last step {last_row}: {ckpts:?}"
    );

    // Rows after the checkpoint a restart resumes from are dropped.
    let kept = *ckpts.iter().filter(|&&c| c < last_row).max().unwrap_or(&0);
    std::fs::remove_dir_all(run.join(format!("checkpoints/step-{last_row:09}"))).unwrap();
    let o = Command::new(BIN)
        .args([
            "train",
            "--nproc-per-node",
            "2",
            "--resume",
            "auto",
            "--data",
        ])
        .arg(&data)
        .arg("--out")
        .arg(&run)
        .arg("--config")
        .arg(tmp.path().join("tiny.toml"))
        .args([
            "--set",
            "train.epochs=100",
            "--max-steps",
            &(last_row + 2).to_string(),
            "--json",
        ])
        .output()
        .unwrap();
    let s = summary(&o);
    assert_eq!(s["steps"].as_u64(), Some(last_row + 2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(&format!("after step {kept}")),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let steps: Vec<u64> = losses(&run).iter().map(|r| r.0).collect();
    assert_eq!(steps, (1..=last_row + 2).collect::<Vec<_>>());
}
