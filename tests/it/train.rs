//! `byol train` end to end on generated shards: learning, exact resume, signals, errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use super::BIN;

const TINY: &str = r#"
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
fn dataset(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    byol_tools::bench::write_synthetic_folder(&src, 128, (32, 32), 90, 4).unwrap();
    let source = byol_tools::source::scan(
        &src,
        &byol_tools::source::Layout::ImageFolder,
        &Default::default(),
    )
    .unwrap();
    let out = dir.join("ds");
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

fn train(dir: &Path, data: &Path, run: &str, extra: &[&str]) -> Output {
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

fn summary(o: &Output) -> Value {
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
    let child = Command::new(BIN)
        .args([
            "train",
            "--data",
            data.to_str().unwrap(),
            "--out",
            run.to_str().unwrap(),
            "--json",
            "--config",
        ])
        .arg(tmp.path().join("tiny.toml"))
        .args(["--set", "train.epochs=100"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while losses_len(&run) < 3 && t0.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
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

/// The first `n` Fashion-MNIST images of `prefix` (`train` or `t10k`) written as raw IDX
/// files and sharded.
fn fmnist_subset(dir: &Path, prefix: &str, n: usize) -> PathBuf {
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

/// A short BYOL run with the Fashion-MNIST preset on 20,000 images (batch 256, 8 epochs,
/// 624 steps, about 3 minutes): the linear probe on its encoder beats the same probe on
/// a randomly initialised encoder of the same shape by more than 3 points. Measured with
/// training seeds 1 and 2: 80.6 % vs 72.3 % and 80.6 % vs 75.7 %. Shorter runs are not
/// enough: with 4,096 images at batch 64 for 10 epochs (session 2's version of this
/// test) seeds 1 and 2 ended below random init (68.1 %, 72.4 %) and seed 0 moved
/// between 75.2 % and 78.6 % with float rounding in the augmentation.
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
}
