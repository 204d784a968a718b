//! `byol finetune` end to end on generated shards: subsets, exact resume, the random
//! baseline, transfer, refusals, and the classifier's export and predictions.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

use super::train::{dataset, dataset_of, fmnist_subset, summary, train};
use super::BIN;

/// `byol finetune` from `run` into `dir/out` with `extra` arguments (`--json` added).
fn finetune(dir: &Path, run: &str, train: &Path, test: &Path, out: &str, extra: &[&str]) -> Output {
    Command::new(BIN)
        .args(["finetune", "--run"])
        .arg(dir.join(run))
        .arg("--train")
        .arg(train)
        .arg("--test")
        .arg(test)
        .arg("--out")
        .arg(dir.join(out))
        .args(extra)
        .arg("--json")
        .output()
        .unwrap()
}

/// The losses of `FT/metrics.jsonl`'s step rows.
fn losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("train_top1").is_some())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

const SMALL: [&str; 8] = [
    "--set",
    "finetune.batch=8",
    "--set",
    "finetune.epochs=3",
    "--set",
    "train.log_every=1",
    "--set",
    "train.checkpoint_every=4",
];

/// A fine-tuning run on 8 labels per class: the subset is balanced and written as a
/// keys file that reproduces it; an interrupted and resumed run repeats the
/// uninterrupted one's losses; the random-init baseline trains on the same labels with
/// the same recipe; the summary says which run and subset it came from.
#[test]
fn finetuning_resumes_exactly_and_the_baseline_uses_the_same_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = dataset(dir);
    let test = dataset_of(dir, "src_test", "test", 32, 4);
    summary(&train(dir, &data, "pre", &["--max-steps", "4"]));
    let sub = ["--labels-per-class", "8"];
    let a = summary(&finetune(
        dir,
        "pre",
        &data,
        &test,
        "a",
        &[&sub[..], &SMALL].concat(),
    ));
    assert_eq!(a["labels"], 32);
    assert_eq!(a["labels_per_class"], serde_json::json!([8, 8]));
    assert_eq!(a["steps"], 12, "3 epochs of 32 rows at batch 8");
    assert_eq!(a["source_run"], dir.join("pre").display().to_string());
    assert!(a["source_checkpoint"]
        .as_str()
        .unwrap()
        .ends_with("step-000000004"));
    assert!(a["test_top1"].as_f64().is_some() && a["test_rows"] == 32);
    let keys = std::fs::read_to_string(dir.join("a/label_keys.txt")).unwrap();
    assert_eq!(keys.lines().count(), 32);
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("a/finetune.json")).unwrap())
            .unwrap();
    assert_eq!(report["test_top1"], a["test_top1"]);

    // Interrupted at step 5, resumed: the same losses and the same test accuracy.
    let b1 = summary(&finetune(
        dir,
        "pre",
        &data,
        &test,
        "b",
        &[&sub[..], &SMALL, &["--max-steps", "5"]].concat(),
    ));
    assert_eq!(b1["steps"], 5);
    assert!(b1["test_top1"].is_null(), "no test before the run ends");
    let b2 = summary(&finetune(dir, "pre", &data, &test, "b", &["--resume"]));
    assert_eq!(b2["steps"], 12);
    assert_eq!(losses(&dir.join("a")), losses(&dir.join("b")));
    assert_eq!(a["test_top1"], b2["test_top1"]);

    // The keys file gives the same subset back; the random baseline the same labels.
    let file = dir.join("a/label_keys.txt");
    let c = summary(&finetune(
        dir,
        "pre",
        &data,
        &test,
        "c",
        &[&["--label-keys", file.to_str().unwrap()][..], &SMALL].concat(),
    ));
    assert_eq!(losses(&dir.join("a")), losses(&dir.join("c")));
    let r = summary(&finetune(
        dir,
        "pre",
        &data,
        &test,
        "r",
        &[
            &["--init", "random", "--label-keys", file.to_str().unwrap()][..],
            &SMALL,
        ]
        .concat(),
    ));
    assert_eq!(r["init"], "random");
    assert_eq!(r["labels"], c["labels"]);
    assert_eq!(
        std::fs::read_to_string(dir.join("r/label_keys.txt")).unwrap(),
        keys
    );
    assert_ne!(
        losses(&dir.join("a")),
        losses(&dir.join("r")),
        "another encoder"
    );

    // --resume without a checkpoint is refused, naming the folder.
    let o = finetune(dir, "pre", &data, &test, "none", &["--resume"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("holds no checkpoint") && err.contains("none"),
        "{err}"
    );
}

/// Transfer: a run pretrained on 32-px colour images in 4 classes fine-tuned on 28-px
/// grayscale Fashion-MNIST in 10 classes (the head has 10 outputs); test shards with
/// other classes than the training shards' are refused naming both lists.
#[test]
fn transfer_onto_other_classes_and_sizes_and_the_class_list_refusal() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = dataset(dir);
    summary(&train(dir, &data, "pre", &["--max-steps", "2"]));
    let fm = dir.join("fm");
    std::fs::create_dir_all(&fm).unwrap();
    let fm_train = fmnist_subset(&fm, "train", 200);
    let fm_test = fmnist_subset(&fm, "t10k", 50);
    let s = summary(&finetune(
        dir,
        "pre",
        &fm_train,
        &fm_test,
        "t",
        &[&["--labels-per-class", "4"][..], &SMALL].concat(),
    ));
    assert_eq!(s["classes"], 10);
    assert_eq!(s["test_rows"], 50);
    let cfg: toml::Table =
        toml::from_str(&std::fs::read_to_string(dir.join("t/config.toml")).unwrap()).unwrap();
    let classes = cfg["finetune"]["classes"].as_array().unwrap();
    assert_eq!(classes.len(), 10, "{cfg}");

    let o = finetune(dir, "pre", &fm_train, &data, "x", &SMALL);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("classes differ"), "{err}");
    assert!(
        err.contains(fm_train.to_str().unwrap()) && err.contains(data.to_str().unwrap()),
        "{err}"
    );
}

/// `byol export --run FT`: an ONNX classifier (embedding and logits, class names in its
/// metadata, checked in ONNX Runtime) and torchvision weights with `fc` that
/// `torchvision.models.resnet18(num_classes=4)` loads with `strict=True`, giving the
/// ONNX file's logits; `byol predict` writes the top classes of every image.
#[test]
fn a_finetuned_classifier_exports_loads_strictly_into_torchvision_and_predicts() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = dataset(dir);
    let wide = [
        "--max-steps",
        "1",
        "--set",
        "model.encoder.width=1.0",
        "--set",
        "model.encoder.cifar_stem=false",
        "--set",
        "augment.size=32",
    ];
    summary(&train(dir, &data, "r18", &wide));
    let ft = [
        "--labels-per-class",
        "4",
        "--set",
        "finetune.batch=8",
        "--set",
        "finetune.total_steps=2",
    ];
    summary(&finetune(dir, "r18", &data, &data, "ft", &ft));
    let export = |format: &str, out: &Path| {
        summary(
            &Command::new(BIN)
                .args(["export", "--run"])
                .arg(dir.join("ft"))
                .args(["--format", format, "--out"])
                .arg(out)
                .arg("--json")
                .output()
                .unwrap(),
        )
    };
    let onnx = dir.join("ft.onnx");
    let st = dir.join("ft.safetensors");
    let e = export("onnx", &onnx);
    assert_eq!(e["classes"], 4, "{e}");
    assert!(
        e["max_abs_diff"].as_f64().unwrap() <= 1e-3 * e["max_abs_value"].as_f64().unwrap().max(1.0)
    );
    let t = export("torchvision", &st);
    assert_eq!(t["tensors"], 122, "{t}");
    assert_eq!(t["classes"].as_array().unwrap().len(), 4);

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let c = summary(
        &Command::new(root.join(".venv/bin/python"))
            .arg(root.join("scripts/fixtures/check_torchvision.py"))
            .args([
                "--weights",
                st.to_str().unwrap(),
                "--onnx",
                onnx.to_str().unwrap(),
            ])
            .args(["--config", dir.join("ft/config.toml").to_str().unwrap()])
            .args(["--data", data.to_str().unwrap()])
            .output()
            .unwrap(),
    );
    assert_eq!(c["strict"], true, "{c}");
    let d = c["logits_max_abs_diff"].as_f64().unwrap();
    assert!(
        d < 1e-4 * c["logits_max_abs"].as_f64().unwrap().max(1.0),
        "{c}"
    );

    let preds = dir.join("preds.parquet");
    let p = summary(
        &Command::new(BIN)
            .args(["predict", "--model", onnx.to_str().unwrap(), "--data"])
            .arg(&data)
            .arg("--out")
            .arg(&preds)
            .args(["--top-k", "3", "--json"])
            .output()
            .unwrap(),
    );
    assert_eq!(p["rows"], 128);
    assert_eq!(p["top_k"], 3);
    let o = Command::new(root.join(".venv/bin/python"))
        .arg("-c")
        .arg(
            "import sys, json, pyarrow.parquet as pq\n\
             t = pq.read_table(sys.argv[1]).to_pylist()\n\
             ok = all(len(r['top_classes']) == 3 and r['predicted'] == r['top_classes'][0] \
             and abs(sum(r['top_probabilities']) - 1) < 1 and r['top_probabilities'] == sorted(r['top_probabilities'], reverse=True) for r in t)\n\
             print(json.dumps({'rows': len(t), 'ok': ok, 'first': t[0]['top_classes']}))",
        )
        .arg(&preds)
        .output()
        .unwrap();
    let v = summary(&o);
    assert_eq!(v["rows"], 128);
    assert_eq!(v["ok"], true, "{v}");

    // An encoder has no logits: predict says so.
    summary(
        &Command::new(BIN)
            .args(["export", "--run"])
            .arg(dir.join("r18"))
            .arg("--out")
            .arg(dir.join("enc.onnx"))
            .arg("--json")
            .output()
            .unwrap(),
    );
    let o = Command::new(BIN)
        .args(["predict", "--model"])
        .arg(dir.join("enc.onnx"))
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(dir.join("p2.parquet"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no logits"));
}

/// `byol finetune --nproc-per-node 2`: two data-parallel ranks (Gloo, SyncBatchNorm)
/// fine-tune on the same subset for the same steps, rank 0 writes the run folder (one
/// metrics row per step) and reports the test accuracy. (Each rank takes its own part
/// of an epoch and its own augmentation generator, so the losses are not one process's;
/// the step's equivalence over ranks is tested for BYOL's step on the same c10d code.)
#[test]
fn two_ranks_finetune_the_same_subset_and_rank_0_writes_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = dataset(dir);
    let test = dataset_of(dir, "src_test", "test", 32, 4);
    summary(&train(dir, &data, "pre", &["--max-steps", "2"]));
    let args = [&["--labels-per-class", "8"][..], &SMALL].concat();
    let one = summary(&finetune(dir, "pre", &data, &test, "one", &args));
    let two = summary(&finetune(
        dir,
        "pre",
        &data,
        &test,
        "two",
        &[&args[..], &["--nproc-per-node", "2"]].concat(),
    ));
    assert_eq!(two["world_size"], 2);
    assert_eq!(two["steps"], one["steps"]);
    assert!(two["test_top1"].as_f64().is_some(), "{two}");
    let (a, b) = (losses(&dir.join("one")), losses(&dir.join("two")));
    assert_eq!(a.len(), b.len(), "one row per step, written once");
    assert!(b.iter().all(|(_, l)| l.is_finite()));
    assert_eq!(
        std::fs::read_to_string(dir.join("one/label_keys.txt")).unwrap(),
        std::fs::read_to_string(dir.join("two/label_keys.txt")).unwrap()
    );
}
