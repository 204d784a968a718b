//! Sources from folders and IDX files: every kind of image, flat folders with label
//! files, Fashion-MNIST, and the determinism of the row order.

use super::*;

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
