//! Users' mishaps with run folders and outputs, each named after the fault it guards
//! against: outputs over inputs, torn and edited run files, resumes without a checkpoint.

use std::path::Path;
use std::process::{Command, Output};

use super::train::{dataset, summary, train};
use super::BIN;

fn byol(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn refused(o: &Output) -> String {
    assert!(!o.status.success(), "exit 0; expected a refusal");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn an_output_named_as_an_input_is_refused_and_the_input_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let data = d.join("data");
    std::fs::create_dir(&data).unwrap();
    let shard = data.join("shard-00000.parquet");
    std::fs::write(&shard, b"the dataset").unwrap();
    let model = d.join("encoder.onnx");
    std::fs::write(&model, b"the encoder").unwrap();
    let run = d.join("run");
    std::fs::create_dir(&run).unwrap();

    for (args, flags) in [
        (
            vec![
                "embed",
                "--model",
                s(&model),
                "--data",
                s(&data),
                "--out",
                s(&model),
            ],
            ("--out", "--model"),
        ),
        (
            vec![
                "embed",
                "--model",
                s(&model),
                "--data",
                s(&data),
                "--out",
                s(&shard),
            ],
            ("--out", "--data"),
        ),
        (
            vec![
                "predict",
                "--model",
                s(&model),
                "--data",
                s(&data),
                "--out",
                s(d),
            ],
            ("--out", "is a folder that holds"),
        ),
        (
            vec![
                "export",
                "--run",
                s(&run),
                "--out",
                &format!("{}/x.onnx", s(&run)),
            ],
            ("--out", "--run"),
        ),
        (
            vec!["train", "--data", s(&data), "--out", s(&data)],
            ("--out", "--data"),
        ),
        (
            vec!["preview", "--data", s(&data), "--out", s(&shard)],
            ("--out", "--data"),
        ),
        (
            vec![
                "finetune",
                "--run",
                s(&run),
                "--train",
                s(&data),
                "--test",
                s(&data),
                "--out",
                &format!("{}/ft", s(&run)),
            ],
            ("--out", "--run"),
        ),
    ] {
        let e = refused(&byol(&args));
        assert!(e.contains(flags.0) && e.contains(flags.1), "{args:?}: {e}");
    }
    // Through a link and a `..` too.
    std::os::unix::fs::symlink(&model, d.join("link.onnx")).unwrap();
    let dotted = format!("{}/../encoder.onnx", s(&data));
    for out in [s(&d.join("link.onnx")), dotted.as_str()] {
        let e = refused(&byol(&[
            "embed",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--out",
            out,
        ]));
        assert!(e.contains("--model"), "{e}");
    }
    assert_eq!(std::fs::read(&model).unwrap(), b"the encoder");
    assert_eq!(std::fs::read(&shard).unwrap(), b"the dataset");
}

fn steps(run: &Path) -> Vec<u64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}"));
            v["step"].as_u64().unwrap()
        })
        .collect()
}

#[test]
fn a_torn_last_metrics_line_is_cut_on_resume() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    summary(&train(tmp.path(), &data, "r", &["--max-steps", "4"]));
    let run = tmp.path().join("r");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(run.join("metrics.jsonl"))
        .unwrap();
    write!(f, "{{\"step\":5,\"epoch\":0,\"lo").unwrap();
    drop(f);
    let o = train(tmp.path(), &data, "r", &["--resume", "--max-steps", "6"]);
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    summary(&o);
    assert!(e.contains("incomplete last line"), "{e}");
    assert_eq!(steps(&run), vec![1, 2, 3, 4, 5, 6]);
}

#[test]
fn a_run_config_edited_between_runs_is_refused_on_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    summary(&train(tmp.path(), &data, "e", &["--max-steps", "2"]));
    let cfg = tmp.path().join("e/config.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("epochs = 3"), "{text}");
    std::fs::write(&cfg, text.replace("epochs = 3", "epochs = 4")).unwrap();
    let e = refused(&train(tmp.path(), &data, "e", &["--resume"]));
    assert!(e.contains("train.epochs 3 → 4"), "{e}");
    assert!(e.contains("step-000000002"), "{e}");
    // Put back, the run continues; a resumable key may still change by hand.
    std::fs::write(&cfg, text.replace("log_every = 1", "log_every = 2")).unwrap();
    summary(&train(
        tmp.path(),
        &data,
        "e",
        &["--resume", "--max-steps", "4"],
    ));
}

#[test]
fn resume_without_a_checkpoint_is_refused_and_keeps_the_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    summary(&train(tmp.path(), &data, "n", &["--max-steps", "2"]));
    let run = tmp.path().join("n");
    std::fs::remove_dir_all(run.join("checkpoints")).unwrap();
    let before = std::fs::read(run.join("metrics.jsonl")).unwrap();
    let e = refused(&train(tmp.path(), &data, "n", &["--resume"]));
    assert!(
        e.contains("holds no checkpoint") && e.contains("--resume auto"),
        "{e}"
    );
    assert!(e.contains(s(&run)), "{e}");
    assert_eq!(std::fs::read(run.join("metrics.jsonl")).unwrap(), before);
    // --resume auto starts it again.
    let cfg = tmp.path().join("tiny.toml");
    let o = byol(&[
        "train",
        "--resume",
        "auto",
        "--config",
        s(&cfg),
        "--data",
        s(&data),
        "--out",
        s(&run),
        "--max-steps",
        "1",
        "--json",
    ]);
    assert_eq!(summary(&o)["steps"], 1);
}

/// Two ranks, the kNN monitor (rank 0 alone) on a held-out set, a collective timeout
/// shorter than the monitor: the other rank waits for it on the store, the run finishes.
#[test]
fn a_rank0_knn_monitor_longer_than_the_collective_timeout_does_not_kill_the_run() {
    use super::train::fmnist_subset;
    let tmp = tempfile::tempdir().unwrap();
    let data = fmnist_subset(tmp.path(), "train", 1024);
    let val = fmnist_subset(tmp.path(), "t10k", 10_000);
    let cfg = tmp.path().join("tiny.toml");
    std::fs::write(&cfg, super::train::TINY).unwrap();
    let run = tmp.path().join("k");
    let timeout = 1.0;
    let o = byol(&[
        "train",
        "--nproc-per-node",
        "2",
        "--config",
        s(&cfg),
        "--data",
        s(&data),
        "--val",
        s(&val),
        "--out",
        s(&run),
        "--set",
        "train.epochs=1",
        "--set",
        &format!("train.collective_timeout_s={timeout}"),
        "--set",
        "train.knn_every_epochs=1",
        "--set",
        "train.knn_bank=1024",
        "--set",
        "train.knn_queries=10000",
        "--set",
        "train.checkpoint_every=1000",
        "--json",
    ]);
    let out = summary(&o);
    // The premise: rank 0's monitor outlasted the timeout.
    let monitor = out["monitor_seconds"].as_f64().unwrap();
    assert!(monitor > timeout, "the monitor took {monitor:.1} s: {out}");
    assert_eq!(out["world_size"], 2);
    let knn_rows = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("knn_top1"))
        .count();
    assert!(knn_rows >= 1);
}

/// A dataset in which no image decodes trained on blank canvases with exit 0. Now the
/// loop stops once the failures pass `data.max_decode_failure_rate`, naming the count
/// and the first keys; with the ceiling raised it trains (counted, no crash: the probe
/// gets no label from a replacement).
#[test]
fn a_dataset_in_which_no_image_decodes_stops_training_naming_the_first_keys() {
    use super::train::{damage_rows, dataset_of};
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset_of(tmp.path(), "src12", "ds12", 12, 2);
    damage_rows(&data, "all");
    let o = train(
        tmp.path(),
        &data,
        "all-bad",
        &["--set", "train.batch=4", "--set", "train.epochs=1"],
    );
    let e = refused(&o);
    assert!(
        e.contains("12 of the 12 samples decoded so far failed")
            && e.contains("data.max_decode_failure_rate")
            && e.contains("byol-tools verify"),
        "{e}"
    );
    assert!(
        e.contains(".parquet") && e.contains("First: class-0"),
        "names the keys and shards: {e}"
    );
    let t = summary(&train(
        tmp.path(),
        &data,
        "all-bad-allowed",
        &[
            "--set",
            "train.batch=4",
            "--set",
            "train.epochs=1",
            "--set",
            "data.max_decode_failure_rate=1.0",
        ],
    ));
    assert_eq!(
        (t["steps"].as_u64(), t["decode_failures"].as_u64()),
        (Some(3), Some(12)),
        "{t}"
    );
}

/// Most images of a dataset fail (its first shard of two damaged, half the rows): the
/// loop stops after 100 samples, before an epoch of blank canvases.
#[test]
fn a_dataset_where_most_images_fail_stops_after_a_hundred_samples() {
    use super::train::damage_rows;
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    damage_rows(&data, "first-shard");
    let e = refused(&train(
        tmp.path(),
        &data,
        "most-bad",
        &["--set", "train.epochs=1"],
    ));
    assert!(e.contains("samples decoded so far failed"), "{e}");
}

/// `byol export --format hf --out DIR` replaced a folder that held other files (the
/// bundle is written as a folder, which replaces the old one). Now a folder holding
/// anything but an earlier bundle's files, or a file, is refused and kept; a new folder
/// and an earlier bundle are written.
#[test]
fn an_hf_bundle_over_a_folder_of_other_files_is_refused_and_the_files_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    summary(&train(tmp.path(), &data, "h", &["--max-steps", "2"]));
    let run = tmp.path().join("h");
    let export = |out: &Path| {
        byol(&[
            "export",
            "--run",
            s(&run),
            "--format",
            "hf",
            "--out",
            s(out),
            "--json",
        ])
    };
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("data.txt"), b"precious").unwrap();
    let e = refused(&export(&other));
    assert!(
        e.contains("data.txt") && e.contains("new or empty folder"),
        "{e}"
    );
    assert_eq!(std::fs::read(other.join("data.txt")).unwrap(), b"precious");
    let file = tmp.path().join("copy.toml");
    std::fs::write(&file, b"x").unwrap();
    assert!(refused(&export(&file)).contains("is a file"));
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
    let bundle = tmp.path().join("bundle");
    for _ in 0..2 {
        summary(&export(&bundle));
    }
    assert!(bundle.join("model.safetensors").is_file());
}
