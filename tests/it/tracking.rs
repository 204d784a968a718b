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

/// Runs fixture `script` with `.venv-tracking`'s python; its JSON output.
fn tracking_fixture(script: &str, args: &[&str]) -> Value {
    let o = Command::new(tracking_python())
        .arg(fixture(script))
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// A `[[step, value], …]` list as pairs (`what` names it when it is missing).
fn pairs(v: &Value, what: &str) -> Vec<(u64, f64)> {
    v.as_array()
        .unwrap_or_else(|| panic!("no {what} in the tracker's answer"))
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap()))
        .collect()
}

/// What TensorBoard reads from `RUN/tb`.
fn read_tb(run: &Path) -> Value {
    tracking_fixture("read_tensorboard.py", &[run.join("tb").to_str().unwrap()])
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
        let got = pairs(&tb["scalars"][tag], tag);
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

/// A real `mlflow server` on loopback (SQLite backend, artifact serving on), from the
/// pinned `.venv-tracking`; killed when dropped.
struct MlflowServer {
    child: std::process::Child,
    port: u16,
    dir: PathBuf,
}

impl MlflowServer {
    fn start(dir: &Path, port: u16) -> MlflowServer {
        let mlflow = tracking_python().with_file_name("mlflow");
        std::fs::create_dir_all(dir).unwrap();
        let child = Command::new(mlflow)
            .args(["server", "--host", "127.0.0.1", "--port", &port.to_string()])
            .arg("--backend-store-uri")
            .arg(format!("sqlite:///{}/mlflow.db", dir.display()))
            .arg("--artifacts-destination")
            .arg(dir.join("artifacts"))
            .args(["--workers", "1"])
            .stdout(std::process::Stdio::null())
            .stderr(
                std::fs::File::create(dir.join(format!("server-{}.log", std::process::id())))
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        let s = MlflowServer {
            child,
            port,
            dir: dir.to_path_buf(),
        };
        s.wait_ready();
        s
    }

    fn uri(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn wait_ready(&self) {
        let t0 = std::time::Instant::now();
        loop {
            use std::io::{Read, Write};
            if let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = c.write_all(b"GET /health HTTP/1.0\r\n\r\n");
                let mut r = String::new();
                let _ = c.read_to_string(&mut r);
                if r.starts_with("HTTP/1.") && r.contains(" 200 ") {
                    return;
                }
            }
            assert!(
                t0.elapsed().as_secs() < 180,
                "mlflow server did not start; see {}",
                self.dir.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
    }

    fn stop(&mut self) {
        // The server's workers are its children: end the whole group.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Drop for MlflowServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_mlflow(uri: &str, run: &Path) -> Value {
    let link: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("mlflow.json")).unwrap()).unwrap();
    tracking_fixture("read_mlflow.py", &[uri, link["run_id"].as_str().unwrap()])
}

/// Every number of every metrics row, by key: [(step, value)].
fn metrics_by_key(run: &Path) -> std::collections::BTreeMap<String, Vec<(u64, f64)>> {
    let mut m = std::collections::BTreeMap::new();
    for l in std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
    {
        let v: Value = serde_json::from_str(l).unwrap();
        let step = v["step"].as_u64().unwrap();
        for (k, x) in v.as_object().unwrap() {
            if k != "step" && k != "epoch" {
                if let Some(x) = x.as_f64() {
                    m.entry(k.clone()).or_insert_with(Vec::new).push((step, x));
                }
            }
        }
    }
    m
}

fn assert_every_metric_step(got: &Value, run: &Path) {
    let want = metrics_by_key(run);
    assert!(!want.is_empty());
    for (k, rows) in &want {
        let have = pairs(&got["metrics"][k], k);
        assert_eq!(
            have.iter().map(|p| p.0).collect::<Vec<_>>(),
            rows.iter().map(|p| p.0).collect::<Vec<_>>(),
            "{k}: every step"
        );
        for ((s, w), (_, g)) in rows.iter().zip(&have) {
            assert!(
                (w - g).abs() <= 1e-9 * w.abs().max(1.0),
                "{k} at {s}: {w} vs {g}"
            );
        }
    }
}

/// With `--mlflow`, a run logs its config as parameters, every metric at every step,
/// tags and, at its end, its files as artifacts; `--resume` continues the same MLflow
/// run; the server stopped mid-run and started again loses nothing and does not stop
/// training; a server that never answers costs a warning and nothing else.
#[test]
fn mlflow_receives_params_metrics_tags_and_artifacts_through_restarts_and_outages() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let port = byol_dist::launch::free_port().unwrap();
    let mut server = MlflowServer::start(&tmp.path().join("mlflow"), port);
    let uri = server.uri();

    // Tracked, then resumed into the same MLflow run.
    summary(&train(
        tmp.path(),
        &data,
        "m",
        &["--max-steps", "4", "--mlflow", &uri],
    ));
    let run = tmp.path().join("m");
    let first: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("mlflow.json")).unwrap()).unwrap();
    summary(&train(
        tmp.path(),
        &data,
        "m",
        &["--resume", "--max-steps", "8", "--mlflow", &uri],
    ));
    let again: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("mlflow.json")).unwrap()).unwrap();
    assert_eq!(
        first["run_id"], again["run_id"],
        "the resume continues the MLflow run"
    );
    let got = read_mlflow(&uri, &run);
    assert_eq!(got["status"], "FINISHED");
    assert_eq!(got["params"]["optim.base_lr"], "1.0", "{}", got["params"]);
    assert_eq!(got["params"]["train.batch"], "16");
    for tag in [
        "byol.version",
        "byol.device",
        "byol.precision",
        "byol.world_size",
        "byol.cpu",
    ] {
        assert!(got["tags"][tag].is_string(), "{tag}: {}", got["tags"]);
    }
    assert_every_metric_step(&got, &run);
    let arts = got["artifacts"].to_string();
    for f in ["config.toml", "metrics.jsonl", "curves.png", "data.json"] {
        assert!(arts.contains(f), "{f}: {arts}");
    }

    // The server stopped after a few rows and started again while training goes on.
    let cfg = tmp.path().join("tiny.toml");
    let out = tmp.path().join("down");
    let child = Command::new(super::BIN)
        .args([
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ])
        .args(["--out", out.to_str().unwrap(), "--mlflow", &uri, "--json"])
        .args(["--set", "train.epochs=6"])
        .env("BYOL_MLFLOW_FINISH_S", "180")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |t| t.lines().count()) < 4 {
        assert!(t0.elapsed().as_secs() < 120, "no rows");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    server.stop();
    std::thread::sleep(std::time::Duration::from_secs(2));
    let server = MlflowServer::start(&tmp.path().join("mlflow"), port);
    let o = child.wait_with_output().unwrap();
    let s = summary(&o);
    assert_eq!(s["steps"], 48, "training went on: {s}");
    let got = read_mlflow(&server.uri(), &out);
    assert_eq!(got["status"], "FINISHED");
    assert_every_metric_step(&got, &out);

    // Never reachable: a warning naming the server; the run and its folder complete.
    let dead = format!(
        "http://127.0.0.1:{}",
        byol_dist::launch::free_port().unwrap()
    );
    let o = Command::new(super::BIN)
        .args([
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ])
        .args([
            "--out",
            tmp.path().join("never").to_str().unwrap(),
            "--json",
        ])
        .args(["--max-steps", "4"])
        .env("MLFLOW_TRACKING_URI", &dead)
        .env("BYOL_MLFLOW_FINISH_S", "2")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(summary(&o)["steps"], 4);
    assert!(e.contains(&dead) && e.contains("training goes on"), "{e}");
    assert_eq!(metrics_by_key(&tmp.path().join("never"))["loss"].len(), 4);
}
