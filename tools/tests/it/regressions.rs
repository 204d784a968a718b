//! Regression tests: real-world input that was silently wrong.

use super::*;

fn bad_input(args: &[&str]) -> Value {
    py("bad_input.py", args)
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

/// An Exif block with one bad pointer (a dangling GPS IFD or IFD1 offset, an odd
/// next-IFD value) was dropped whole, so a photo whose orientation tag is intact was
/// stored sideways. Now each of these, the mirrored orientations and an invalid value
/// are stored as PIL's `exif_transpose` shows them.
#[test]
fn an_exif_block_with_one_bad_pointer_keeps_its_orientation() {
    let tmp = tempfile::tempdir().unwrap();
    let pil = bad_input(&["exif-broken", s(tmp.path())]);
    let src = tmp.path().join("flat");
    let out = tmp.path().join("ds");
    ok_json(&["shard", "--src", s(&src), "--out", s(&out), "--json"]);
    let r = bad_input(&["check-exif", s(&src), s(&out)]);
    let cases = pil.as_object().unwrap();
    assert_eq!(cases.len(), 8);
    for (key, orientation) in cases {
        let v = &r[key];
        // Orientations 5–8 swap height and width; 9 is invalid (stored as is).
        let turned = (5..=8).contains(&orientation.as_u64().unwrap());
        let want = if turned { [40, 64] } else { [64, 40] };
        assert_eq!(v["expected"], serde_json::json!(want), "{key}: {v}");
        assert_eq!(v["stored"], v["expected"], "{key}: {v}");
        let d = v["mean_diff"].as_f64().unwrap();
        assert!(
            d < 8.0,
            "{key}: mean difference {d} to PIL's exif_transpose"
        );
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
    let e = assert_refused(
        &[
            "shard",
            "--src",
            s(&flat),
            "--layout",
            "flat",
            "--labels",
            s(&bad),
            "--out",
            s(&tmp.path().join("x")),
        ],
        "bad.csv:2",
    );
    assert!(e.contains("expected 2 fields"), "{e}");
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
