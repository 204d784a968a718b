//! Parquet datasets in the Hugging Face layout.

use super::*;

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
    py_code(make, &[s(&src), s(t)]);
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
        let out = t.join("again-ds");
        assert_refused(
            &["shard", "--src", s(&src), "--out", s(&out)],
            "already sharded",
        );
    }
}

/// Parquet files in every codec in common use (polars writes zstd by default) were
/// skipped whole or refused; two folders that both hold `0000.parquet` gave the same
/// keys. Now a folder of snappy, zstd, Brotli, LZ4, gzip and uncompressed files stores
/// every image, the keys name each file relative to the sources' common folder, and a
/// file whose data cannot be read stops the command naming it.
#[test]
fn parquet_in_every_common_codec_is_read_and_keys_stay_unique() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let src = t.join("src");
    byol_tools::bench::write_synthetic_folder(&src, 12, (32, 40), 90, 2).unwrap();
    let make = r#"
import os, sys
import pyarrow as pa, pyarrow.parquet as pq
src, out = sys.argv[1], sys.argv[2]
rows = [open(os.path.join(src, c, f), "rb").read()
        for c in sorted(os.listdir(src)) for f in sorted(os.listdir(os.path.join(src, c)))]
codecs = ["snappy", "zstd", "brotli", "lz4", "gzip", "none"]
os.makedirs(os.path.join(out, "codecs"))
for k, codec in enumerate(codecs):
    t = pa.table({"image": pa.array(rows[2 * k: 2 * k + 2], pa.binary()),
                  "label": pa.array([0, 1], pa.int64())})
    pq.write_table(t, os.path.join(out, "codecs", f"{codec}.parquet"), compression=codec)
for part in ("a", "b"):
    os.makedirs(os.path.join(out, "parts", part))
    t = pa.table({"image": pa.array(rows[:3], pa.binary()), "label": pa.array([0, 1, 0], pa.int64())})
    pq.write_table(t, os.path.join(out, "parts", part, "0000.parquet"), compression="zstd")
"#;
    py_code(make, &[s(&src), s(t)]);

    let ds = t.join("codecs-ds");
    let r = ok_json(&[
        "shard",
        "--src",
        s(&t.join("codecs")),
        "--out",
        s(&ds),
        "--json",
    ]);
    assert_eq!(
        (r["rows"].as_u64(), r["skipped"].as_u64()),
        (Some(12), Some(0)),
        "{r}"
    );

    let ds = t.join("parts-ds");
    let r = ok_json(&[
        "shard",
        "--src",
        s(&t.join("parts/a")),
        "--src",
        s(&t.join("parts/b")),
        "--out",
        s(&ds),
        "--json",
    ]);
    assert_eq!(r["rows"], 6, "{r}");
    let mut keys: Vec<String> = rows_of(&ds).into_iter().map(|(k, _, _)| k).collect();
    keys.sort();
    assert_eq!(keys[0], "a/0000.parquet/000000000", "{keys:?}");
    assert_eq!(keys[5], "b/0000.parquet/000000002", "{keys:?}");

    // A file whose first page header is damaged: the command fails naming it.
    let bad = t.join("bad");
    std::fs::create_dir(&bad).unwrap();
    let mut bytes = std::fs::read(t.join("codecs/zstd.parquet")).unwrap();
    for b in &mut bytes[4..24] {
        *b ^= 0x5a;
    }
    std::fs::write(bad.join("zstd.parquet"), &bytes).unwrap();
    let o = tools(&["shard", "--src", s(&bad), "--out", s(&t.join("bad-ds"))]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("zstd.parquet"), "{e}");
}
