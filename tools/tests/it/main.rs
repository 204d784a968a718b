//! End-to-end tests of the `byol-tools` binary on generated folders and on the real
//! Fashion-MNIST IDX files, checked independently with pyarrow + PIL from the venv.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

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

#[test]
fn generated_folder_all_modes_and_broken_files() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixture(tmp.path());
    let out = tmp.path().join("ds");
    let sum = ok_json(&[
        "shard",
        "--src",
        s(&fx.join("src")),
        "--out",
        s(&out),
        "--rows-per-shard",
        "50",
        "--row-group-rows",
        "16",
        "--workers",
        "2",
        "--json",
    ]);
    assert_eq!(sum["rows"], 180);
    assert_eq!(sum["shards"], 4);
    assert_eq!(sum["skipped"], 6);
    assert_eq!(sum["ignored"], 4);
    // 40 small + 10 large baseline JPEGs are kept; everything else is re-encoded.
    assert_eq!(sum["kept_original"], 50);
    assert_eq!(sum["reencoded"], 130);

    let c = py("check_shards.py", &[s(&out), "--fixture", s(&fx)]);
    assert_eq!(c["schema_ok"], true, "{c}");
    assert_eq!(c["shard_rows_ok"], true);
    assert_eq!(c["image_compression"], "UNCOMPRESSED");
    assert_eq!(c["unique_keys"], true);
    assert_eq!(c["classes_ok"], true);
    assert_eq!(c["stored_keys_ok"], true, "{c}");
    assert_eq!(c["skipped_keys_ok"], true, "{c}");
    assert_eq!(c["skip_reason_mismatches"], Value::Array(vec![]), "{c}");
    assert_eq!(c["label_mismatches"], 0);
    assert_eq!(c["ignored"], c["want_ignored"]);
    assert_eq!(c["size_mismatches"], Value::Array(vec![]), "{c}");
    // Pixels: kept JPEGs are exact; re-encoded ones (q90) within 8/255 mean absolute
    // difference of PIL's upright RGB reading of the source.
    let worst = c["worst_mean_abs_diff"].as_object().unwrap();
    assert_eq!(worst.len(), 14, "{c}");
    assert_eq!(worst["jpeg-baseline"].as_f64().unwrap(), 0.0);
    for (kind, d) in worst {
        assert!(d.as_f64().unwrap() < 8.0, "{kind}: {d}");
    }

    let v = ok_json(&["verify", s(&out), "--json"]);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["decoded"], 180);
    let i = ok_json(&["inspect", s(&out), "--json"]);
    let counts: Vec<u64> = i["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["count"].as_u64().unwrap())
        .collect();
    assert_eq!(counts, vec![50, 70, 60]);
    assert_eq!(i["skipped"], 6);
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let reasons: Vec<(String, String)> = manifest["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["key"].as_str().unwrap().into(),
                s["reason"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(reasons.contains(&("cat/empty.jpg".into(), "empty file (0 bytes)".into())));
    assert!(reasons
        .iter()
        .any(|(k, r)| k == "fish/broken_link.jpg" && r.starts_with("unreadable")));
}

#[test]
fn max_side_resizes_with_area_interpolation() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixture(tmp.path());
    let out = tmp.path().join("ds");
    let sum = ok_json(&[
        "shard",
        "--src",
        s(&fx.join("src")),
        "--out",
        s(&out),
        "--max-side",
        "64",
        "--json",
    ]);
    assert_eq!(sum["rows"], 180);
    let c = py(
        "check_shards.py",
        &[s(&out), "--fixture", s(&fx), "--max-side", "64"],
    );
    assert_eq!(c["size_mismatches"], Value::Array(vec![]), "{c}");
    for (kind, d) in c["worst_mean_abs_diff"].as_object().unwrap() {
        assert!(d.as_f64().unwrap() < 8.0, "{kind}: {d}");
    }
    let i = ok_json(&["inspect", s(&out), "--json"]);
    assert!(i["max_side"].as_i64().unwrap() <= 64);
}

#[test]
fn fashion_mnist_idx_labels_and_pixels() {
    let tmp = tempfile::tempdir().unwrap();
    for (split, pre, n) in [("train", "train", 60000), ("test", "t10k", 10000)] {
        let out = tmp.path().join(split);
        let images = format!("{FMNIST}/{pre}-images-idx3-ubyte.gz");
        let labels = format!("{FMNIST}/{pre}-labels-idx1-ubyte.gz");
        let sum = ok_json(&[
            "shard",
            "--layout",
            "idx",
            "--images",
            &images,
            "--labels",
            &labels,
            "--out",
            s(&out),
            "--rows-per-shard",
            "25000",
            "--json",
        ]);
        assert_eq!(sum["rows"], n);
        assert_eq!(sum["classes"], 10);
        let c = py(
            "check_shards.py",
            &[s(&out), "--idx-images", &images, "--idx-labels", &labels],
        );
        assert_eq!(c["rows"], n);
        assert_eq!(c["schema_ok"], true);
        assert_eq!(c["idx_count_ok"], true);
        assert_eq!(c["label_mismatches"], 0);
        assert_eq!(c["pixel_mismatches"], 0);
        let i = ok_json(&["inspect", s(&out), "--json"]);
        for cl in i["classes"].as_array().unwrap() {
            assert_eq!(cl["count"].as_u64().unwrap(), n / 10);
        }
        assert_eq!(ok_json(&["verify", s(&out), "--json"])["ok"], true);
    }
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

#[test]
fn same_input_and_seed_give_byte_identical_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixture(tmp.path());
    let src = fx.join("src");
    let run = |name: &str, seed: &str, workers: &str| {
        let out = tmp.path().join(name);
        ok_json(&[
            "shard",
            "--src",
            s(&src),
            "--out",
            s(&out),
            "--rows-per-shard",
            "40",
            "--seed",
            seed,
            "--workers",
            workers,
            "--json",
        ]);
        files_of(&out)
    };
    let a = run("a", "7", "1");
    let b = run("b", "7", "2");
    let c = run("c", "8", "2");
    assert_eq!(a.len(), 6); // 5 shards + manifest
    assert_eq!(a, b, "same seed, different worker counts");
    assert_ne!(a[0].1, c[0].1, "another seed gives another order");
}

#[test]
fn interrupted_run_resumes_to_the_same_result() {
    let tmp = tempfile::tempdir().unwrap();
    let images = format!("{FMNIST}/train-images-idx3-ubyte.gz");
    let labels = format!("{FMNIST}/train-labels-idx1-ubyte.gz");
    let args = |out: &Path| -> Vec<String> {
        [
            "shard",
            "--layout",
            "idx",
            "--images",
            &images,
            "--labels",
            &labels,
            "--out",
            s(out),
            "--rows-per-shard",
            "1000",
            "--workers",
            "1",
            "--json",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    let full = tmp.path().join("full");
    let a: Vec<String> = args(&full);
    ok_json(&a.iter().map(|x| x.as_str()).collect::<Vec<_>>());

    let cut = tmp.path().join("cut");
    let mut child = Command::new(BIN).args(args(&cut)).spawn().unwrap();
    let third = cut.join("shard-00003.parquet");
    let t0 = std::time::Instant::now();
    while !third.exists() && t0.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    assert!(
        !cut.join("manifest.json").exists(),
        "run finished before it was killed"
    );
    assert!(cut.join(".byol-shard-progress.json").exists());

    // A different setting is refused; the same arguments complete the run.
    let mut other = args(&cut);
    other[10] = "500".into();
    let o = tools(&other.iter().map(|x| x.as_str()).collect::<Vec<_>>());
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("different settings"));

    let b: Vec<String> = args(&cut);
    let sum = ok_json(&b.iter().map(|x| x.as_str()).collect::<Vec<_>>());
    assert!(sum["resumed_shards"].as_u64().unwrap() >= 3, "{sum}");
    assert_eq!(files_of(&full), files_of(&cut));

    // A complete dataset is not overwritten without --force.
    let o = tools(&b.iter().map(|x| x.as_str()).collect::<Vec<_>>());
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    let mut forced = b.clone();
    forced.push("--force".into());
    let sum = ok_json(&forced.iter().map(|x| x.as_str()).collect::<Vec<_>>());
    assert_eq!(sum["resumed_shards"], 0);
    assert_eq!(files_of(&full), files_of(&cut));
}

#[test]
fn missing_or_empty_source_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    let o = tools(&[
        "shard",
        "--src",
        s(&missing),
        "--out",
        s(&tmp.path().join("o")),
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("does not exist") && err.contains("nope"),
        "{err}"
    );

    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(empty.join("classA")).unwrap();
    std::fs::write(empty.join("classA/readme.txt"), b"x").unwrap();
    let o = tools(&[
        "shard",
        "--src",
        s(&empty),
        "--out",
        s(&tmp.path().join("o")),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no images found"));

    let o = tools(&["inspect", s(&tmp.path().join("o"))]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("manifest.json"));
}

/// Copies a few fixture images into a flat folder.
fn flat_folder(fx: &Path, dir: &Path, names: &[&str]) {
    std::fs::create_dir_all(dir).unwrap();
    for n in names {
        std::fs::copy(fx.join("src/cat").join(n), dir.join(n)).unwrap();
    }
}

#[test]
fn flat_layout_with_csv_and_ilsvrc_labels_and_unlabeled_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixture(tmp.path());
    let names = ["rgb_000.jpg", "rgb_001.jpg", "rgb_002.jpg", "rgb_003.jpg"];
    let flat = tmp.path().join("flat");
    flat_folder(&fx, &flat, &names);

    // CSV: one file has no label and is skipped with that reason.
    let csv = tmp.path().join("labels.csv");
    std::fs::write(
        &csv,
        "key,class\nrgb_000.jpg,zebra\nrgb_001.jpg,ant\nrgb_002.jpg,zebra\n",
    )
    .unwrap();
    let out = tmp.path().join("csv");
    let sum = ok_json(&[
        "shard",
        "--layout",
        "flat",
        "--src",
        s(&flat),
        "--labels",
        s(&csv),
        "--out",
        s(&out),
        "--json",
    ]);
    assert_eq!(sum["rows"], 3);
    assert_eq!(sum["skipped"], 1);
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["classes"], serde_json::json!(["ant", "zebra"]));
    assert_eq!(m["totals"]["per_class"], serde_json::json!([1, 2]));
    assert_eq!(m["skipped"][0]["key"], "rgb_003.jpg");
    assert!(m["skipped"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("no label"));

    // ILSVRC ground truth: ids into the synset list, in sorted file order.
    let gt = tmp.path().join("ILSVRC2012_validation_ground_truth.txt");
    std::fs::write(&gt, "2\n1\n2\n3\n").unwrap();
    let syn = tmp.path().join("synsets.txt");
    std::fs::write(&syn, "n02 second class\nn01 first class\nn03 third\n").unwrap();
    let out = tmp.path().join("gt");
    ok_json(&[
        "shard",
        "--layout",
        "flat",
        "--src",
        s(&flat),
        "--labels",
        s(&gt),
        "--synsets",
        s(&syn),
        "--out",
        s(&out),
        "--json",
    ]);
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    // classes sorted by WNID (as an ImageFolder over the train set would index them)
    assert_eq!(m["classes"], serde_json::json!(["n01", "n02", "n03"]));
    // files: 000 → id 2 (n01), 001 → id 1 (n02), 002 → n01, 003 → n03
    assert_eq!(m["totals"]["per_class"], serde_json::json!([2, 1, 1]));

    // No class folders and no labels: every image is unlabeled.
    let out = tmp.path().join("unlabeled");
    let sum = ok_json(&["shard", "--src", s(&flat), "--out", s(&out), "--json"]);
    assert_eq!(sum["classes"], 0);
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["totals"]["unlabeled"], 4);
}

#[test]
fn verify_names_the_shard_and_key_of_a_damaged_row() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixture(tmp.path());
    let out = tmp.path().join("ds");
    ok_json(&[
        "shard",
        "--src",
        s(&fx.join("src")),
        "--out",
        s(&out),
        "--rows-per-shard",
        "100",
        "--json",
    ]);
    // Replace one image with garbage (keeping the Parquet file valid).
    let code = r#"
import sys, pyarrow as pa, pyarrow.parquet as pq
p = sys.argv[1]
t = pq.read_table(p)
imgs = t.column("image").to_pylist()
imgs[5] = b"garbage"
t = t.set_column(2, pa.field("image", pa.binary(), nullable=False), pa.array(imgs, pa.binary()))
pq.write_table(t, p, compression="none")
print(t.column("key")[5].as_py())
"#;
    let o = Command::new(python())
        .args(["-c", code, s(&out.join("shard-00001.parquet"))])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let key = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let o = tools(&["verify", s(&out)]);
    assert_eq!(o.status.code(), Some(1));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("shard-00001.parquet: checksum"), "{text}");
    assert!(
        text.contains(&format!(
            "shard-00001.parquet key {key}: image does not decode"
        )),
        "{text}"
    );
    assert!(!text.contains("shard-00000"), "{text}");
}

// ---- Regression tests: real-world input that was silently wrong ------------------

fn bad_input(args: &[&str]) -> Value {
    py("bad_input.py", args)
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
    let o = Command::new(python())
        .args(["-c", code, s(ds)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: Vec<(String, i64)> = serde_json::from_slice(&o.stdout).unwrap();
    (classes, rows)
}

/// A JPEG stored turned 90° (EXIF orientation 6) whose Exif APP1 segment follows an XMP
/// APP1 segment was stored unrotated (and stretched with --max-side): now every image
/// is stored as PIL's `exif_transpose` shows it, with and without DCT scaling.
#[test]
fn exif_orientation_after_an_xmp_segment_is_applied() {
    let tmp = tempfile::tempdir().unwrap();
    bad_input(&["exif", s(tmp.path())]);
    let src = tmp.path().join("flat");
    for (max_side, large) in [(None, (1000, 600)), (Some("256"), (256, 154))] {
        let out = tmp
            .path()
            .join(format!("ds-{}", max_side.unwrap_or("full")));
        let mut args = vec!["shard", "--src", s(&src), "--out", s(&out), "--json"];
        if let Some(m) = max_side {
            args.extend(["--max-side", m]);
        }
        ok_json(&args);
        let mut check = vec!["check-exif", s(&src), s(&out)];
        if let Some(m) = max_side {
            check.extend(["--max-side", m]);
        }
        let r = bad_input(&check);
        for (key, hw) in [
            ("xmp_first_small.jpg", (64, 40)),
            ("exif_only_small.jpg", (64, 40)),
            ("tiff_orientation_6.tif", (64, 40)),
            ("xmp_first_large.jpg", large),
        ] {
            let v = &r[key];
            let want = serde_json::json!([hw.0, hw.1]);
            assert_eq!(v["stored"], want, "{key} (max side {max_side:?}): {v}");
            assert_eq!(v["decoded"], want, "{key}: {v}");
            assert_eq!(v["expected"], want, "{key}: {v}");
            let d = v["mean_diff"].as_f64().unwrap();
            assert!(
                d < 8.0,
                "{key}: mean difference {d} to PIL's exif_transpose"
            );
        }
    }
}

fn six_jpegs(dir: &Path, names: &[&str]) {
    std::fs::create_dir_all(dir).unwrap();
    let code = r#"
import sys
from PIL import Image
for i, n in enumerate(sys.argv[2:]):
    Image.new("RGB", (32, 24), (40 * i % 256, 90, 160)).save(sys.argv[1] + "/" + n, quality=90)
"#;
    let mut args = vec!["-c", code, s(dir)];
    args.extend(names);
    let o = Command::new(python()).args(&args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// "CSV UTF-8" from a spreadsheet: a byte-order mark, a header, CRLF line ends. The
/// header was taken for data (a class named "class", every label shifted).
#[test]
fn label_csv_with_a_byte_order_mark() {
    let tmp = tempfile::tempdir().unwrap();
    let flat = tmp.path().join("flat");
    let names = ["d1.jpg", "d2.jpg", "d3.jpg", "f1.jpg", "f2.jpg", "f3.jpg"];
    six_jpegs(&flat, &names);
    let csv = tmp.path().join("labels.csv");
    let mut text = b"\xEF\xBB\xBFkey,class\r\n".to_vec();
    for n in names {
        let class = if n.starts_with('d') { "dog" } else { "fish" };
        text.extend_from_slice(format!("{n},{class}\r\n").as_bytes());
    }
    std::fs::write(&csv, text).unwrap();
    let out = tmp.path().join("ds");
    ok_json(&[
        "shard",
        "--src",
        s(&flat),
        "--layout",
        "flat",
        "--labels",
        s(&csv),
        "--out",
        s(&out),
        "--json",
    ]);
    let (classes, rows) = labels_of(&out);
    assert_eq!(classes, ["dog", "fish"]);
    for (k, l) in rows {
        assert_eq!(l, if k.starts_with('d') { 0 } else { 1 }, "{k}");
    }
}

/// RFC 4180 quoting: a file name with a comma, as Python's csv module writes it (only
/// that field quoted) and as R writes it (every field quoted, header included).
#[test]
fn label_csv_with_quoted_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let flat = tmp.path().join("flat");
    six_jpegs(&flat, &["a, b.jpg", "plain.jpg", "q.jpg"]);
    let python_style = "key,class\r\n\"a, b.jpg\",cat\r\nplain.jpg,cat\r\nq.jpg,dog\r\n";
    let r_style =
        "\"key\",\"class\"\n\"a, b.jpg\",\"cat\"\n\"plain.jpg\",\"cat\"\n\"q.jpg\",\"dog\"\n";
    for (name, text) in [("python", python_style), ("r", r_style)] {
        let csv = tmp.path().join(format!("{name}.csv"));
        std::fs::write(&csv, text).unwrap();
        let out = tmp.path().join(format!("ds-{name}"));
        let sum = ok_json(&[
            "shard",
            "--src",
            s(&flat),
            "--layout",
            "flat",
            "--labels",
            s(&csv),
            "--out",
            s(&out),
            "--json",
        ]);
        assert_eq!(sum["rows"], 3, "{name}: {sum}");
        let (classes, rows) = labels_of(&out);
        assert_eq!(classes, ["cat", "dog"], "{name}");
        assert_eq!(
            rows,
            [
                ("a, b.jpg".to_string(), 0),
                ("plain.jpg".to_string(), 0),
                ("q.jpg".to_string(), 1)
            ],
            "{name}"
        );
    }
    // A row with a stray comma is refused, naming the file and line.
    let bad = tmp.path().join("bad.csv");
    std::fs::write(&bad, "key,class\na, b.jpg,cat\n").unwrap();
    let o = tools(&[
        "shard",
        "--src",
        s(&flat),
        "--layout",
        "flat",
        "--labels",
        s(&bad),
        "--out",
        s(&tmp.path().join("x")),
    ]);
    assert_eq!(o.status.code(), Some(2));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("bad.csv:2") && e.contains("expected 2 fields"),
        "{e}"
    );
}

/// Latin-1 file and folder names: two files and two class folders that differ only in
/// a byte that is not UTF-8 were merged (one key, one class). Now each keeps its own
/// key, escaped reversibly, and `verify` passes.
#[test]
fn non_utf8_file_and_folder_names_stay_distinct() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let a = src.join("a");
    six_jpegs(&a, &["x.jpg", "y.jpg"]);
    std::fs::rename(a.join("x.jpg"), a.join(OsStr::from_bytes(b"img_\xE9.jpg"))).unwrap();
    std::fs::rename(a.join("y.jpg"), a.join(OsStr::from_bytes(b"img_\xE8.jpg"))).unwrap();
    for (byte, n) in [(0xE9u8, "p.jpg"), (0xE8, "q.jpg")] {
        let plain = src.join(format!("b{byte}"));
        six_jpegs(&plain, &[n]);
        std::fs::rename(&plain, src.join(OsStr::from_bytes(&[b'b', byte]))).unwrap();
    }
    let out = tmp.path().join("ds");
    let sum = ok_json(&["shard", "--src", s(&src), "--out", s(&out), "--json"]);
    assert_eq!(sum["rows"], 4, "{sum}");
    let (classes, rows) = labels_of(&out);
    assert_eq!(classes, ["a", "b%E8", "b%E9"]);
    let keys: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(
        keys,
        ["a/img_%E8.jpg", "a/img_%E9.jpg", "b%E8/q.jpg", "b%E9/p.jpg"]
    );
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["escaped_keys"].as_array().unwrap().len(), 4, "{m}");
    assert_eq!(
        byol_tools::source::unescape_key("a/img_%E9.jpg"),
        b"a/img_\xE9.jpg".to_vec()
    );
    let o = tools(&["verify", s(&out)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
}

/// `a/loop -> .` made the walk descend to the kernel's link limit (42 rows for 2
/// images). A folder reached again through a link is walked once and listed.
#[test]
fn symlink_to_its_own_folder_is_walked_once() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    six_jpegs(&src.join("a"), &["img1.jpg"]);
    six_jpegs(&src.join("b"), &["img2.jpg"]);
    std::os::unix::fs::symlink(".", src.join("a/loop")).unwrap();
    // A second path to a folder already walked (not a loop) is not walked twice either,
    // and a link from one class folder to another does not move that class's images.
    std::os::unix::fs::symlink("../a", src.join("b/again")).unwrap();
    std::os::unix::fs::symlink("../b", src.join("a/tob")).unwrap();
    let out = tmp.path().join("ds");
    let sum = ok_json(&["shard", "--src", s(&src), "--out", s(&out), "--json"]);
    assert_eq!(sum["rows"], 2, "{sum}");
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let skipped: Vec<String> = m["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            format!(
                "{}: {}",
                v["key"].as_str().unwrap(),
                v["reason"].as_str().unwrap()
            )
        })
        .collect();
    assert!(
        skipped
            .iter()
            .any(|r| r.starts_with("a/loop: ") && r.contains("not walked again")),
        "{skipped:?}"
    );
    assert!(
        skipped
            .iter()
            .any(|r| r.starts_with("b/again: ") && r.contains("not walked again")),
        "{skipped:?}"
    );
    assert!(
        skipped.iter().any(|r| r.starts_with("a/tob: ")),
        "{skipped:?}"
    );
    let (classes, rows) = labels_of(&out);
    assert_eq!(classes, ["a", "b"]);
    assert_eq!(
        rows,
        [("a/img1.jpg".to_string(), 0), ("b/img2.jpg".to_string(), 1)]
    );
}

/// Two 70 KB PNGs declaring 24000×24000 pixels were decoded to 1.7 GB each (3.3 GiB
/// peak with two workers, until the OOM killer came). Now they are skipped by the
/// pixel limit before decoding, and the run's peak RSS stays far below 1 GiB.
#[test]
fn decompression_bombs_are_skipped_with_bounded_memory() {
    let tmp = tempfile::tempdir().unwrap();
    bad_input(&["bombs", s(tmp.path())]);
    let out = tmp.path().join("ds");
    // The venv's Python runs the shard command and reports its children's peak RSS.
    let code = r#"
import resource, subprocess, sys
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(p.stdout.strip().splitlines()[-1] if p.stdout.strip() else "{}")
print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"#;
    let o = Command::new(python())
        .args([
            "-c",
            code,
            BIN,
            "shard",
            "--src",
            s(&tmp.path().join("flat")),
            "--out",
            s(&out),
        ])
        .args(["--max-side", "256", "--workers", "2", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    let mut lines = text.lines();
    let sum: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    let last: Vec<u64> = lines
        .next()
        .unwrap()
        .split(' ')
        .map(|x| x.parse().unwrap())
        .collect();
    assert_eq!(last[0], 0, "exit code; {sum}");
    let peak_mib = last[1] as f64 / 1024.0;
    assert!(peak_mib < 512.0, "peak RSS {peak_mib:.0} MiB");
    assert_eq!(sum["rows"], 4, "{sum}");
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let reasons: Vec<&str> = m["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons.iter().all(|r| r.contains("decode limit")),
        "{reasons:?}"
    );
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
    let o = Command::new(python())
        .args(["-c", code, s(ds)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// A tar of class folders, a tar of class tars (ImageNet train's form) and a tar
/// without folders are sharded in place, giving the rows, labels and bytes the same
/// images give from a folder; broken members (empty, not an image, a path with `..`)
/// are skipped and listed; a truncated archive is an error naming it and the byte
/// where it breaks; the same archive and seed give byte-identical shards.
#[test]
fn tar_sources_give_the_same_rows_as_the_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let src = t.join("src");
    byol_tools::bench::write_synthetic_folder(&src, 24, (32, 40), 90, 3).unwrap();
    let make = r#"
import io, os, sys, tarfile
src, out = sys.argv[1], sys.argv[2]
classes = sorted(os.listdir(src))
def add_bytes(tf, name, data):
    ti = tarfile.TarInfo(name); ti.size = len(data); tf.addfile(ti, io.BytesIO(data))
with tarfile.open(os.path.join(out, "classes.tar"), "w", format=tarfile.GNU_FORMAT) as tf:
    for c in classes:
        for f in sorted(os.listdir(os.path.join(src, c))):
            tf.add(os.path.join(src, c, f), arcname=f"{c}/{f}")
    add_bytes(tf, "class-00/empty.jpg", b"")
    add_bytes(tf, "class-00/notimage.jpg", b"this is text, not a JPEG")
    add_bytes(tf, "../evil.jpg", open(os.path.join(src, classes[0], sorted(os.listdir(os.path.join(src, classes[0])))[0]), "rb").read())
    add_bytes(tf, "class-01/readme.txt", b"ignored")
with tarfile.open(os.path.join(out, "nested.tar"), "w") as outer:
    for c in classes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as inner:
            for f in sorted(os.listdir(os.path.join(src, c))):
                inner.add(os.path.join(src, c, f), arcname=f)
        add_bytes(outer, f"{c}.tar", buf.getvalue())
with tarfile.open(os.path.join(out, "flat.tar"), "w") as tf:
    for c in classes:
        for f in sorted(os.listdir(os.path.join(src, c))):
            tf.add(os.path.join(src, c, f), arcname=f"{c}-{f}")
"#;
    let o = Command::new(python())
        .args(["-c", make, s(&src), s(t)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let folder = t.join("folder-ds");
    ok_json(&["shard", "--src", s(&src), "--out", s(&folder), "--json"]);
    let want = rows_of(&folder);
    assert_eq!(want.len(), 24);

    // A tar of class folders: detected from the extension.
    let ds = t.join("classes-ds");
    let r = ok_json(&[
        "shard",
        "--src",
        s(&t.join("classes.tar")),
        "--out",
        s(&ds),
        "--json",
    ]);
    assert_eq!(rows_of(&ds), want);
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(ds.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["classes"], json_of(&folder)["classes"]);
    let skipped: Vec<(String, String)> = m["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["key"].as_str().unwrap().into(),
                x["reason"].as_str().unwrap().into(),
            )
        })
        .collect();
    let reason = |k: &str| {
        skipped
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, r)| r.clone())
            .unwrap_or_else(|| panic!("{k} not skipped: {skipped:?}"))
    };
    assert!(reason("class-00/empty.jpg").contains("empty"));
    assert!(reason("class-00/notimage.jpg").contains("cannot decode"));
    assert!(reason("../evil.jpg").contains("leaves the archive"));
    assert_eq!(r["ignored"].as_u64(), Some(1), "{r}");

    // A tar of class tars gives the same keys (inner tar stem / member).
    let ds2 = t.join("nested-ds");
    ok_json(&[
        "shard",
        "--src",
        s(&t.join("nested.tar")),
        "--out",
        s(&ds2),
        "--layout",
        "tar",
        "--json",
    ]);
    assert_eq!(rows_of(&ds2), want);

    // Without folders: every image unlabeled, same bytes.
    let ds3 = t.join("flat-ds");
    ok_json(&[
        "shard",
        "--src",
        s(&t.join("flat.tar")),
        "--out",
        s(&ds3),
        "--json",
    ]);
    let flat = rows_of(&ds3);
    assert_eq!(flat.len(), 24);
    assert!(flat.iter().all(|(_, l, _)| *l == -1));
    let mut a: Vec<&String> = flat.iter().map(|r| &r.2).collect();
    let mut b: Vec<&String> = want.iter().map(|r| &r.2).collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);

    // Determinism: the same archive and seed, byte-identical shards.
    let again = t.join("classes-ds2");
    ok_json(&[
        "shard",
        "--src",
        s(&t.join("classes.tar")),
        "--out",
        s(&again),
        "--json",
    ]);
    assert_eq!(files_of(&ds), files_of(&again));

    // A truncated archive: an error naming it and where it breaks; nothing written.
    let whole = std::fs::read(t.join("classes.tar")).unwrap();
    let cut = t.join("cut.tar");
    std::fs::write(&cut, &whole[..whole.len() / 2 + 100]).unwrap();
    let o = tools(&["shard", "--src", s(&cut), "--out", s(&t.join("cut-ds"))]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("cut.tar") && err.contains("truncated"),
        "{err}"
    );
    assert!(!t.join("cut-ds").join("manifest.json").exists());
}

fn json_of(ds: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(ds.join("manifest.json")).unwrap()).unwrap()
}

/// WebDataset shards (a folder of `.tar`s, samples `KEY.jpg` + `KEY.cls` + `KEY.json`)
/// give one row per sample under its key, labelled from `.cls` with `--class-names`,
/// with the same bytes as the folder; a sample without `.cls` or with a `.cls` that is
/// not a label is skipped with the reason.
#[test]
fn webdataset_shards_give_one_labelled_row_per_sample() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let src = t.join("src");
    byol_tools::bench::write_synthetic_folder(&src, 24, (32, 40), 90, 3).unwrap();
    let make = r#"
import io, os, sys, tarfile
src, out = sys.argv[1], sys.argv[2]
os.makedirs(out)
classes = sorted(os.listdir(src))
files = [(ci, os.path.join(src, c, f)) for ci, c in enumerate(classes) for f in sorted(os.listdir(os.path.join(src, c)))]
def add_bytes(tf, name, data):
    ti = tarfile.TarInfo(name); ti.size = len(data); tf.addfile(ti, io.BytesIO(data))
for shard in range(2):
    with tarfile.open(os.path.join(out, f"train-{shard:06d}.tar"), "w") as tf:
        for i, (ci, path) in enumerate(files):
            if i % 2 != shard:
                continue
            add_bytes(tf, f"sample{i:04d}.jpg", open(path, "rb").read())
            add_bytes(tf, f"sample{i:04d}.cls", f"{ci}\n".encode())
            add_bytes(tf, f"sample{i:04d}.json", b"{}")
        if shard == 1:
            add_bytes(tf, "nolabel.jpg", open(files[0][1], "rb").read())
            add_bytes(tf, "badlabel.jpg", open(files[0][1], "rb").read())
            add_bytes(tf, "badlabel.cls", b"cat")
"#;
    let wds = t.join("wds");
    let o = Command::new(python())
        .args(["-c", make, s(&src), s(&wds)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let folder = t.join("folder-ds");
    ok_json(&["shard", "--src", s(&src), "--out", s(&folder), "--json"]);
    let ds = t.join("wds-ds");
    let r = ok_json(&[
        "shard",
        "--layout",
        "webdataset",
        "--src",
        s(&wds),
        "--out",
        s(&ds),
        "--class-names",
        "a,b,c",
        "--json",
    ]);
    assert_eq!(r["ignored"].as_u64(), Some(24), "{r}"); // the .json members
    let m = json_of(&ds);
    assert_eq!(m["classes"], serde_json::json!(["a", "b", "c"]));
    let rows = rows_of(&ds);
    assert_eq!(rows.len(), 24);
    assert!(rows.iter().all(|(k, _, _)| k.starts_with("sample")));
    let mut got: Vec<(i64, String)> = rows.into_iter().map(|(_, l, h)| (l, h)).collect();
    let mut want: Vec<(i64, String)> = rows_of(&folder)
        .into_iter()
        .map(|(_, l, h)| (l, h))
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    let skipped = m["skipped"].to_string();
    assert!(
        skipped.contains("nolabel") && skipped.contains("no .cls label"),
        "{skipped}"
    );
    assert!(
        skipped.contains("badlabel") && skipped.contains("not a label"),
        "{skipped}"
    );
}

/// What a new user's trial found wrong with archives: hidden and link members, a
/// truncated inner tar, a gzip tar named `.tar.gz`, options a layout does not read,
/// bad `--class-names`, an out-of-range `.cls` label, a folder without shards.
#[test]
fn archive_misuse_is_refused_or_listed() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let src = t.join("src");
    byol_tools::bench::write_synthetic_folder(&src, 12, (32, 40), 90, 2).unwrap();
    let make = r#"
import gzip, io, os, shutil, sys, tarfile
src, out = sys.argv[1], sys.argv[2]
classes = sorted(os.listdir(src))
def add_bytes(tf, name, data):
    ti = tarfile.TarInfo(name); ti.size = len(data); tf.addfile(ti, io.BytesIO(data))
one = open(os.path.join(src, classes[0], sorted(os.listdir(os.path.join(src, classes[0])))[0]), "rb").read()
with tarfile.open(os.path.join(out, "odd.tar"), "w") as tf:
    for c in classes:
        for f in sorted(os.listdir(os.path.join(src, c))):
            tf.add(os.path.join(src, c, f), arcname=f"{c}/{f}")
    add_bytes(tf, "class-00/.hidden.jpg", one)
    ti = tarfile.TarInfo("class-00/link.jpg"); ti.type = tarfile.SYMTYPE; ti.linkname = "000000.jpg"; tf.addfile(ti)
# A tar of class tars whose second inner tar is cut inside a member.
with tarfile.open(os.path.join(out, "nested.tar"), "w") as outer:
    for c in classes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as inner:
            for f in sorted(os.listdir(os.path.join(src, c))):
                inner.add(os.path.join(src, c, f), arcname=f)
        data = buf.getvalue()
        if c == classes[1]:
            with tarfile.open(fileobj=io.BytesIO(data)) as inner:
                m = inner.getmembers()[1]
            data = data[: m.offset_data + m.size // 2]
        add_bytes(outer, f"{c}.tar", data)
with open(os.path.join(out, "odd.tar"), "rb") as f, gzip.open(os.path.join(out, "odd.tar.gz"), "wb") as g:
    shutil.copyfileobj(f, g)
with tarfile.open(os.path.join(out, "wds.tar"), "w") as tf:
    add_bytes(tf, "s0.jpg", one); add_bytes(tf, "s0.cls", b"7")
    add_bytes(tf, "s1.jpg", one); add_bytes(tf, "s1.cls", b"1")
os.makedirs(os.path.join(out, "noshards"))
"#;
    let o = Command::new(python())
        .args(["-c", make, s(&src), s(t)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = |args: &[&str]| {
        let o = tools(args);
        assert_eq!(o.status.code(), Some(2), "{args:?} should fail");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };

    // Hidden members are ignored as hidden files are; link members are listed.
    let ds = t.join("odd-ds");
    let r = ok_json(&[
        "shard",
        "--src",
        s(&t.join("odd.tar")),
        "--out",
        s(&ds),
        "--json",
    ]);
    assert_eq!(r["rows"].as_u64(), Some(12), "{r}");
    let skipped = json_of(&ds)["skipped"].to_string();
    assert!(
        skipped.contains("class-00/link.jpg") && skipped.contains("link member"),
        "{skipped}"
    );
    assert!(!skipped.contains("hidden"), "{skipped}");

    // A cut inner tar is an error, as a cut outer tar is.
    let e = err(&[
        "shard",
        "--src",
        s(&t.join("nested.tar")),
        "--out",
        s(&t.join("n-ds")),
    ]);
    assert!(e.contains("inner tar class-01.tar ends inside"), "{e}");
    // Several sources are for archives only; a glob that matches nothing is named.
    let e = err(&[
        "shard",
        "--src",
        s(&src),
        "--src",
        s(&src),
        "--out",
        s(&t.join("two-ds")),
    ]);
    assert!(e.contains("several sources"), "{e}");
    let e = err(&[
        "shard",
        "--src",
        s(&t.join("nothing-*.tar")),
        "--out",
        s(&t.join("g-ds")),
    ]);
    assert!(e.contains("matches no file"), "{e}");
    // Options the layout does not read, and bad class-name lists, are refused; a tar
    // with --labels is a flat labelled archive, whose missing label file is named.
    let e = err(&[
        "shard",
        "--layout",
        "tar",
        "--src",
        s(&t.join("odd.tar")),
        "--labels",
        "x.csv",
        "--out",
        s(&t.join("l-ds")),
    ]);
    assert!(e.contains("--labels"), "{e}");
    let e = err(&[
        "shard",
        "--src",
        s(&t.join("odd.tar")),
        "--labels",
        "x.csv",
        "--out",
        s(&t.join("l-ds")),
    ]);
    assert!(e.contains("x.csv"), "{e}");
    for names in ["a,,b", "a,a"] {
        let e = err(&[
            "shard",
            "--layout",
            "webdataset",
            "--src",
            s(&t.join("wds.tar")),
            "--class-names",
            names,
            "--out",
            s(&t.join("w-ds")),
        ]);
        assert!(e.contains("--class-names"), "{e}");
    }
    // A label beyond --class-names skips that sample, naming it.
    let wds = t.join("w-ds");
    ok_json(&[
        "shard",
        "--layout",
        "webdataset",
        "--src",
        s(&t.join("wds.tar")),
        "--class-names",
        "a,b",
        "--out",
        s(&wds),
        "--json",
    ]);
    let skipped = json_of(&wds)["skipped"].to_string();
    assert!(
        skipped.contains("s0") && skipped.contains("beyond"),
        "{skipped}"
    );
    let e = err(&[
        "shard",
        "--layout",
        "webdataset",
        "--src",
        s(&t.join("noshards")),
        "--out",
        s(&t.join("e-ds")),
    ]);
    assert!(e.contains("holds no WebDataset shards"), "{e}");
}

/// A gzip-compressed tar, several archives (`--src` twice, or a glob) and a flat tar
/// with an ILSVRC ground-truth file and synsets (ImageNet val's form, classes taken from
/// the train set's dataset) give the rows, labels and bytes of the same images sharded
/// from a folder. The temporary tar a gzip archive is decompressed to is gone afterwards;
/// a truncated gzip archive is an error naming it, after which nothing looks complete.
#[test]
fn compressed_split_and_flat_labelled_archives_give_the_folder_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let src = t.join("src");
    byol_tools::bench::write_synthetic_folder(&src, 24, (32, 40), 90, 3).unwrap();
    let make = r#"
import gzip, os, shutil, sys, tarfile
src, out = sys.argv[1], sys.argv[2]
classes = sorted(os.listdir(src))
files = [(c, f) for c in classes for f in sorted(os.listdir(os.path.join(src, c)))]
with tarfile.open(os.path.join(out, "classes.tar.gz"), "w:gz") as tf:
    for c, f in files:
        tf.add(os.path.join(src, c, f), arcname=f"{c}/{f}")
for name, part in [("part-1.tar", classes[:2]), ("part-2.tar", classes[2:])]:
    with tarfile.open(os.path.join(out, name), "w") as tf:
        for c, f in files:
            if c in part:
                tf.add(os.path.join(src, c, f), arcname=f"{c}/{f}")
# ImageNet val's form: flat members, a ground-truth id per member in sorted order, and
# a synset list (line k: the class of id k) in another order than the train classes'.
synsets = [classes[2], classes[0], classes[1]]
flat = sorted((f"val_{c}_{f}", c, f) for c, f in files)
with tarfile.open(os.path.join(out, "val.tar"), "w") as tf:
    for name, c, f in flat:
        tf.add(os.path.join(src, c, f), arcname=name)
with open(os.path.join(out, "gt.txt"), "w") as g:
    g.writelines(f"{synsets.index(c) + 1}\n" for _, c, _ in flat)
with open(os.path.join(out, "synsets.txt"), "w") as g:
    g.writelines(f"{c} description\n" for c in synsets)
data = open(os.path.join(out, "classes.tar.gz"), "rb").read()
open(os.path.join(out, "cut.tar.gz"), "wb").write(data[: len(data) // 2])
# A tar of class folders one of which holds no image (a folder entry and a text file),
# and a tar of class tars one of which is gzip-compressed.
import io
with tarfile.open(os.path.join(out, "emptyclass.tar"), "w") as tf:
    for c, f in files:
        tf.add(os.path.join(src, c, f), arcname=f"{c}/{f}")
    ti = tarfile.TarInfo("class-99"); ti.type = tarfile.DIRTYPE; tf.addfile(ti)
    ti = tarfile.TarInfo("class-99/notes.txt"); ti.size = 3; tf.addfile(ti, io.BytesIO(b"abc"))
with tarfile.open(os.path.join(out, "gzinner.tar"), "w") as outer:
    for c in classes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz" if c == classes[0] else "w") as inner:
            for cc, f in files:
                if cc == c:
                    inner.add(os.path.join(src, c, f), arcname=f)
        ti = tarfile.TarInfo(f"{c}.tar.gz" if c == classes[0] else f"{c}.tar")
        ti.size = len(buf.getvalue()); outer.addfile(ti, io.BytesIO(buf.getvalue()))
# A tar cut exactly after a member's data: no end-of-archive marker.
with tarfile.open(os.path.join(out, "part-1.tar")) as tf:
    m = tf.getmembers()[3]
whole = open(os.path.join(out, "part-1.tar"), "rb").read()
end = (m.offset_data + m.size + 511) // 512 * 512
open(os.path.join(out, "boundary.tar"), "wb").write(whole[:end])
"#;
    let o = Command::new(python())
        .args(["-c", make, s(&src), s(t)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let folder = t.join("folder-ds");
    ok_json(&["shard", "--src", s(&src), "--out", s(&folder), "--json"]);
    let want = rows_of(&folder);
    let temps = || {
        std::fs::read_dir(t)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(".byol-tools-gunzip-")
            })
            .count()
    };

    // A temporary tar that a killed run left beside the output (its process id no
    // longer runs) is removed; an output whose parent does not exist yet works.
    let gz = t.join("gz-ds");
    let stale = t.join(".byol-tools-gunzip-999999999-x.tar");
    std::fs::write(&stale, b"left by a killed run").unwrap();
    ok_json(&[
        "shard",
        "--src",
        s(&t.join("classes.tar.gz")),
        "--out",
        s(&gz),
        "--json",
    ]);
    assert_eq!(rows_of(&gz), want);
    assert_eq!(temps(), 0, "the temporary tar was left behind");
    assert!(!stale.exists(), "the stale temporary tar is still there");
    let deep = t.join("not/yet/there/ds");
    ok_json(&[
        "shard",
        "--src",
        s(&t.join("classes.tar.gz")),
        "--out",
        s(&deep),
        "--json",
    ]);
    assert_eq!(rows_of(&deep), want);

    // An image-less class folder is still a class, as on disk; a compressed inner class
    // tar is skipped with the reason; a tar cut after a member is truncated.
    let ec = t.join("ec-ds");
    ok_json(&[
        "shard",
        "--src",
        s(&t.join("emptyclass.tar")),
        "--out",
        s(&ec),
        "--json",
    ]);
    let classes = json_of(&ec)["classes"].clone();
    assert_eq!(classes.as_array().unwrap().len(), 4, "{classes}");
    assert_eq!(classes[3], "class-99");
    let gi = t.join("gi-ds");
    ok_json(&[
        "shard",
        "--src",
        s(&t.join("gzinner.tar")),
        "--out",
        s(&gi),
        "--json",
    ]);
    let skipped = json_of(&gi)["skipped"].to_string();
    assert!(skipped.contains("compressed inner tar"), "{skipped}");
    let o = tools(&[
        "shard",
        "--src",
        s(&t.join("boundary.tar")),
        "--out",
        s(&t.join("b-ds")),
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("boundary.tar") && err.contains("end-of-archive"),
        "{err}"
    );

    let two = t.join("two-ds");
    ok_json(&[
        "shard",
        "--src",
        s(&t.join("part-1.tar")),
        "--src",
        s(&t.join("part-2.tar")),
        "--out",
        s(&two),
        "--json",
    ]);
    assert_eq!(rows_of(&two), want);
    let globbed = t.join("glob-ds");
    let pattern = t.join("part-*.tar");
    ok_json(&[
        "shard",
        "--src",
        s(&pattern),
        "--out",
        s(&globbed),
        "--json",
    ]);
    assert_eq!(files_of(&globbed), files_of(&two));

    let val = t.join("val-ds");
    ok_json(&[
        "shard",
        "--src",
        s(&t.join("val.tar")),
        "--labels",
        s(&t.join("gt.txt")),
        "--synsets",
        s(&t.join("synsets.txt")),
        "--classes-from",
        s(&folder),
        "--out",
        s(&val),
        "--json",
    ]);
    assert_eq!(json_of(&val)["classes"], json_of(&folder)["classes"]);
    let strip = |rows: Vec<(String, i64, String)>| {
        let mut v: Vec<(i64, String)> = rows.into_iter().map(|(_, l, h)| (l, h)).collect();
        v.sort();
        v
    };
    assert_eq!(strip(rows_of(&val)), strip(want.clone()));

    let o = tools(&[
        "shard",
        "--src",
        s(&t.join("cut.tar.gz")),
        "--out",
        s(&t.join("cut-ds")),
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("cut.tar.gz") && err.contains("gzip"), "{err}");
    assert!(!t.join("cut-ds").join("manifest.json").exists());
    assert_eq!(temps(), 0, "the temporary tar was left behind");
}

/// Sharding from a tar killed mid-run and rerun with the same arguments completes to
/// shards byte-identical to an uninterrupted run.
#[test]
fn an_interrupted_tar_shard_resumes_to_the_same_result() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let src = t.join("src");
    byol_tools::bench::write_synthetic_folder(&src, 600, (96, 128), 90, 4).unwrap();
    let make = r#"
import os, sys, tarfile
src, out = sys.argv[1], sys.argv[2]
with tarfile.open(out, "w") as tf:
    for c in sorted(os.listdir(src)):
        for f in sorted(os.listdir(os.path.join(src, c))):
            tf.add(os.path.join(src, c, f), arcname=f"{c}/{f}")
"#;
    let archive = t.join("a.tar");
    let o = Command::new(python())
        .args(["-c", make, s(&src), s(&archive)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let args = |out: &Path| -> Vec<String> {
        [
            "shard",
            "--src",
            s(&archive),
            "--out",
            s(out),
            "--rows-per-shard",
            "40",
            "--max-side",
            "64",
            "--workers",
            "1",
            "--json",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    let full = t.join("full");
    ok_json(&args(&full).iter().map(|x| x.as_str()).collect::<Vec<_>>());
    let cut = t.join("cut");
    let mut child = Command::new(BIN).args(args(&cut)).spawn().unwrap();
    let third = cut.join("shard-00003.parquet");
    let t0 = std::time::Instant::now();
    while !third.exists() && t0.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !cut.join("manifest.json").exists(),
        "finished before it was killed"
    );
    let sum = ok_json(&args(&cut).iter().map(|x| x.as_str()).collect::<Vec<_>>());
    assert!(sum["resumed_shards"].as_u64().unwrap() >= 3, "{sum}");
    assert_eq!(files_of(&full), files_of(&cut));
}

/// Parquet datasets in the Hugging Face layout, written by pyarrow as the `datasets`
/// library writes them (an `image` struct of `bytes` and `path`, an int64 `label`, the
/// ClassLabel names in the `huggingface` schema metadata), two files in a folder: the
/// same labels, class names and bytes as the images sharded from a folder,
/// deterministically. A plain-binary `image` column without metadata gets the numbers as
/// class names; a null image, bytes that are not an image and a null label are skipped
/// and listed with their keys.
#[test]
fn hugging_face_parquet_gives_the_folder_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let src = t.join("src");
    byol_tools::bench::write_synthetic_folder(&src, 24, (32, 40), 90, 3).unwrap();
    let make = r#"
import json, os, random, sys
import pyarrow as pa, pyarrow.parquet as pq
src, out = sys.argv[1], sys.argv[2]
classes = sorted(os.listdir(src))
rows = [(open(os.path.join(src, c, f), "rb").read(), f"{c}/{f}", i)
        for i, c in enumerate(classes) for f in sorted(os.listdir(os.path.join(src, c)))]
random.Random(0).shuffle(rows)
image_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
meta = {"huggingface": json.dumps({"info": {"features": {
    "image": {"_type": "Image"},
    "label": {"names": classes, "_type": "ClassLabel"}}}})}
schema = pa.schema([("image", image_t), ("label", pa.int64())], metadata=meta)
os.makedirs(os.path.join(out, "hf"))
for k, part in enumerate([rows[:10], rows[10:]]):
    t = pa.table({"image": [{"bytes": b, "path": p} for b, p, _ in part],
                  "label": [l for _, _, l in part]}, schema=schema)
    pq.write_table(t, os.path.join(out, "hf", f"train-{k:05d}-of-00002.parquet"), row_group_size=4)
plain = pa.table({"image": pa.array([b for b, _, _ in rows], pa.binary()),
                  "label": pa.array([l for _, _, l in rows], pa.int32())})
pq.write_table(plain, os.path.join(out, "plain.parquet"), row_group_size=7)
# CIFAR-style names (`img`, `fine_label`) and ClassLabel names in another order.
order = [classes[2], classes[0], classes[1]]
meta2 = {"huggingface": json.dumps({"info": {"features": {
    "img": {"_type": "Image"},
    "fine_label": {"names": order, "_type": "ClassLabel"}}}})}
schema2 = pa.schema([("img", image_t), ("fine_label", pa.int64())], metadata=meta2)
pq.write_table(pa.table({"img": [{"bytes": b, "path": None} for b, _, _ in rows],
                         "fine_label": [order.index(classes[l]) for _, _, l in rows]}, schema=schema2),
               os.path.join(out, "reordered.parquet"))
open(os.path.join(out, "hf", "README.md"), "w").write("A dataset card.\n")
bad = pa.table({"image": [None, {"bytes": b"not an image", "path": "x.jpg"},
                          {"bytes": rows[0][0], "path": None}, {"bytes": rows[0][0], "path": None}],
                "label": pa.array([0, 1, None, 2], pa.int64())}, schema=schema)
pq.write_table(bad, os.path.join(out, "bad.parquet"))
"#;
    let o = Command::new(python())
        .args(["-c", make, s(&src), s(t)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let folder = t.join("folder-ds");
    ok_json(&["shard", "--src", s(&src), "--out", s(&folder), "--json"]);
    let strip = |rows: Vec<(String, i64, String)>| {
        let mut v: Vec<(i64, String)> = rows.into_iter().map(|(_, l, h)| (l, h)).collect();
        v.sort();
        v
    };
    let want = strip(rows_of(&folder));

    // A folder of .parquet files is detected as the parquet layout.
    let hf = t.join("hf-ds");
    let r = ok_json(&[
        "shard",
        "--src",
        s(&t.join("hf")),
        "--out",
        s(&hf),
        "--json",
    ]);
    assert_eq!(r["rows"], 24, "{r}");
    assert_eq!(json_of(&hf)["classes"], json_of(&folder)["classes"]);
    assert_eq!(strip(rows_of(&hf)), want);
    let again = t.join("hf-ds2");
    ok_json(&[
        "shard",
        "--src",
        s(&t.join("hf")),
        "--out",
        s(&again),
        "--json",
    ]);
    assert_eq!(files_of(&hf), files_of(&again));

    let plain = t.join("plain-ds");
    ok_json(&[
        "shard",
        "--src",
        s(&t.join("plain.parquet")),
        "--out",
        s(&plain),
        "--json",
    ]);
    assert_eq!(
        json_of(&plain)["classes"],
        serde_json::json!(["0", "1", "2"])
    );
    assert_eq!(strip(rows_of(&plain)), want);

    let bad = t.join("bad-ds");
    let r = ok_json(&[
        "shard",
        "--src",
        s(&t.join("bad.parquet")),
        "--out",
        s(&bad),
        "--json",
    ]);
    // A null label is an unlabeled row (Hugging Face test splits), not a skip.
    assert_eq!(
        (r["rows"].as_u64(), r["skipped"].as_u64()),
        (Some(2), Some(2)),
        "{r}"
    );
    assert_eq!(json_of(&bad)["totals"]["unlabeled"], 1);
    let skipped = json_of(&bad)["skipped"].to_string();
    for (key, why) in [
        ("bad.parquet/000000000", "no image bytes"),
        ("bad.parquet/000000001", "cannot decode"),
    ] {
        assert!(
            skipped.contains(key) && skipped.contains(why),
            "{key}: {skipped}"
        );
    }

    // Columns named by the metadata (`img`, `fine_label`), and --classes-from renumbers
    // the ClassLabel names to the folder dataset's classes.
    let re = t.join("re-ds");
    ok_json(&[
        "shard",
        "--src",
        s(&t.join("reordered.parquet")),
        "--classes-from",
        s(&folder),
        "--out",
        s(&re),
        "--json",
    ]);
    assert_eq!(json_of(&re)["classes"], json_of(&folder)["classes"]);
    assert_eq!(strip(rows_of(&re)), want);

    // Shards are not a source: a byol dataset folder, or one of its files.
    for src in [folder.clone(), folder.join("shard-00000.parquet")] {
        let o = tools(&["shard", "--src", s(&src), "--out", s(&t.join("again-ds"))]);
        assert_eq!(o.status.code(), Some(2));
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("already sharded"), "{e}");
    }
}
