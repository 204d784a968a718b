//! Runs in the tools ML engineers watch: TensorBoard event files read back with
//! TensorBoard's own reader (`.venv-tracking`, made by `scripts/setup_tracking`).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use super::train::{dataset, summary, train};

/// The python of `.venv-tracking` (TensorBoard, MLflow).
pub fn tracking_python() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-tracking/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup_tracking (make test does)",
        p.display()
    );
    p
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts/fixtures")
        .join(name)
}

/// What TensorBoard reads from `RUN/tb`.
fn read_tb(run: &Path) -> Value {
    let o = Command::new(tracking_python())
        .arg(fixture("read_tensorboard.py"))
        .arg(run.join("tb"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// A run interrupted after rows it had not checkpointed, then resumed: TensorBoard shows
/// every number of `metrics.jsonl` under its name, one value per step (the interrupted
/// attempt's later rows superseded), the augmentation preview decodes, and the config
/// is there as text.
#[test]
fn tensorboard_reads_every_metrics_row_once_per_step_after_a_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    summary(&train(tmp.path(), &data, "tb", &["--max-steps", "6"]));
    let run = tmp.path().join("tb");
    // A crash after step 6's row, before its checkpoint: the resume starts from step 4.
    std::fs::remove_dir_all(run.join("checkpoints/step-000000006")).unwrap();
    summary(&train(
        tmp.path(),
        &data,
        "tb",
        &["--resume", "--max-steps", "8"],
    ));

    let tb = read_tb(&run);
    let rows: Vec<Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut checked = 0;
    for tag in [
        "loss",
        "lr",
        "tau",
        "images_per_s",
        "stall",
        "collapse",
        "probe_acc",
    ] {
        let want: Vec<(u64, f64)> = rows
            .iter()
            .filter_map(|r| Some((r["step"].as_u64()?, r[tag].as_f64()?)))
            .collect();
        let got: Vec<(u64, f64)> = tb["scalars"][tag]
            .as_array()
            .unwrap_or_else(|| panic!("no scalar {tag}: {}", tb["scalars"]))
            .iter()
            .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap()))
            .collect();
        assert_eq!(
            got.iter().map(|p| p.0).collect::<Vec<_>>(),
            (1..=8).collect::<Vec<_>>(),
            "{tag}: one value per step"
        );
        assert_eq!(want.len(), got.len(), "{tag}");
        for ((s, w), (_, g)) in want.iter().zip(&got) {
            // TensorBoard's scalars are float32.
            assert!(
                (w - g).abs() <= 1e-6 * w.abs().max(1e-3),
                "{tag} at {s}: {w} vs {g}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 7 * 8);
    let images = tb["images"].as_object().unwrap();
    let (_, shots) = images.iter().next().expect("the augmentation preview");
    let shot = &shots[0];
    assert_eq!(shot["step"], 0);
    // 8 rows of 16-pixel views: canvas, view 1, view 2.
    assert_eq!(shot["decoded"], serde_json::json!([48, 128]), "{shot}");
    let texts = tb["texts"]["config"].as_array().unwrap();
    assert!(texts
        .iter()
        .any(|t| t[0] == 0 && t[1].as_str().unwrap().contains("[train]")));
    assert!(
        texts.iter().any(|t| t[0] == 4),
        "the resumed attempt's config: {texts:?}"
    );
}
