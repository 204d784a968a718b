//! `verify` on a damaged dataset.

use super::*;

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
    let stdout = py_code(code, &[s(&out.join("shard-00001.parquet"))]);
    let key = String::from_utf8_lossy(&stdout).trim().to_string();
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
    // The figure byol train compares with data.max_decode_failure_rate.
    assert!(
        text.contains("1 of ") && text.contains("images do not decode") && text.contains("within"),
        "{text}"
    );
    let o = tools(&["verify", s(&out), "--json"]);
    let v: Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(v["decode_failures"], 1, "{v}");
    assert_eq!(v["training_would_stop"], false, "{v}");
}
