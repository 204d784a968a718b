//! End-to-end tests of the `byol-tools` binary on generated folders, archives and
//! Parquet files and on the real Fashion-MNIST IDX files, checked independently with
//! pyarrow + PIL from the venv. One binary; the tests are grouped by topic in the
//! modules below, the helpers they share are here.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

mod archives;
mod parquet;
mod refusals;
mod regressions;
mod resume;
mod sources;
mod verify;

const BIN: &str = env!("CARGO_BIN_EXE_byol-tools");

const FMNIST: &str = "/usr/share/datasets/fashion-mnist";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn python() -> PathBuf {
    root().join(".venv/bin/python")
}

fn tools(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run byol-tools")
}

fn ok_json(args: &[&str]) -> Value {
    let o = tools(args);
    assert!(
        o.status.success(),
        "byol-tools {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let text = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(text.lines().last().unwrap_or("")).expect("json summary")
}

/// Runs byol-tools with `args` and expects it to refuse them: exit code 2 (an error) and
/// `text` in stderr. Returns stderr for further checks.
#[track_caller]
fn assert_refused(args: &[&str], text: &str) -> String {
    let o = tools(args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(
        o.status.code(),
        Some(2),
        "byol-tools {args:?} should fail with exit code 2; stderr: {err}"
    );
    assert!(
        err.contains(text),
        "byol-tools {args:?}: stderr lacks {text:?}: {err}"
    );
    err
}

/// Runs inline Python `code` (`python -c`) with the venv's python and `args`, failing
/// the test with its stderr when it fails; its stdout.
fn py_code(code: &str, args: &[&str]) -> Vec<u8> {
    let o = Command::new(python())
        .args(["-c", code])
        .args(args)
        .output()
        .expect("run venv python");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o.stdout
}

fn py(script: &str, args: &[&str]) -> Value {
    let o = Command::new(python())
        .arg(root().join("scripts/fixtures").join(script))
        .args(args)
        .output()
        .expect("run venv python");
    assert!(
        o.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let text = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(text.lines().last().unwrap_or("null")).unwrap_or(Value::Null)
}

/// Generated source folder (180 good images in 14 kinds, 6 broken, 4 ignored).
fn fixture(dir: &Path) -> PathBuf {
    let fx = dir.join("fx");
    py("make_source_images.py", &[fx.to_str().unwrap()]);
    fx
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn files_of(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

fn json_of(ds: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(ds.join("manifest.json")).unwrap()).unwrap()
}

/// Classes and (key → label) of a shard folder, read back with pyarrow.
fn labels_of(ds: &Path) -> (Vec<String>, Vec<(String, i64)>) {
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(ds.join("manifest.json")).unwrap()).unwrap();
    let classes = m["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    let code = r#"
import sys, os, json, pyarrow.parquet as pq
d = sys.argv[1]
rows = []
for f in sorted(os.listdir(d)):
    if f.endswith(".parquet"):
        t = pq.read_table(os.path.join(d, f), columns=["key", "label"])
        rows += list(zip(t["key"].to_pylist(), t["label"].to_pylist()))
print(json.dumps(sorted(rows)))
"#;
    let rows: Vec<(String, i64)> = serde_json::from_slice(&py_code(code, &[s(ds)])).unwrap();
    (classes, rows)
}

/// (key, label, SHA-1 of the stored image) of every row of a shard folder, sorted.
fn rows_of(ds: &Path) -> Vec<(String, i64, String)> {
    let code = r#"
import sys, os, json, hashlib, pyarrow.parquet as pq
d = sys.argv[1]
rows = []
for f in sorted(os.listdir(d)):
    if f.endswith(".parquet"):
        t = pq.read_table(os.path.join(d, f), columns=["key", "label", "image"])
        for k, l, b in zip(t["key"].to_pylist(), t["label"].to_pylist(), t["image"].to_pylist()):
            rows.append((k, l, hashlib.sha1(b).hexdigest()))
print(json.dumps(sorted(rows)))
"#;
    serde_json::from_slice(&py_code(code, &[s(ds)])).unwrap()
}
