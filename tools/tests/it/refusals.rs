//! Input that is refused with a message naming what is wrong (exit code 2).

use super::*;

#[test]
fn missing_or_empty_source_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    let err = assert_refused(
        &[
            "shard",
            "--src",
            s(&missing),
            "--out",
            s(&tmp.path().join("o")),
        ],
        "does not exist",
    );
    assert!(err.contains("nope"), "{err}");

    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(empty.join("classA")).unwrap();
    std::fs::write(empty.join("classA/readme.txt"), b"x").unwrap();
    assert_refused(
        &[
            "shard",
            "--src",
            s(&empty),
            "--out",
            s(&tmp.path().join("o")),
        ],
        "no images found",
    );

    assert_refused(&["inspect", s(&tmp.path().join("o"))], "manifest.json");
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
    py_code(make, &[s(&src), s(t)]);

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
    assert_refused(
        &[
            "shard",
            "--src",
            s(&t.join("nested.tar")),
            "--out",
            s(&t.join("n-ds")),
        ],
        "inner tar class-01.tar ends inside",
    );
    // Several sources are for archives only; a glob that matches nothing is named.
    assert_refused(
        &[
            "shard",
            "--src",
            s(&src),
            "--src",
            s(&src),
            "--out",
            s(&t.join("two-ds")),
        ],
        "several sources",
    );
    assert_refused(
        &[
            "shard",
            "--src",
            s(&t.join("nothing-*.tar")),
            "--out",
            s(&t.join("g-ds")),
        ],
        "matches no file",
    );
    // Options the layout does not read, and bad class-name lists, are refused; a tar
    // with --labels is a flat labelled archive, whose missing label file is named.
    assert_refused(
        &[
            "shard",
            "--layout",
            "tar",
            "--src",
            s(&t.join("odd.tar")),
            "--labels",
            "x.csv",
            "--out",
            s(&t.join("l-ds")),
        ],
        "--labels",
    );
    assert_refused(
        &[
            "shard",
            "--src",
            s(&t.join("odd.tar")),
            "--labels",
            "x.csv",
            "--out",
            s(&t.join("l-ds")),
        ],
        "x.csv",
    );
    for names in ["a,,b", "a,a"] {
        assert_refused(
            &[
                "shard",
                "--layout",
                "webdataset",
                "--src",
                s(&t.join("wds.tar")),
                "--class-names",
                names,
                "--out",
                s(&t.join("w-ds")),
            ],
            "--class-names",
        );
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
    assert_refused(
        &[
            "shard",
            "--layout",
            "webdataset",
            "--src",
            s(&t.join("noshards")),
            "--out",
            s(&t.join("e-ds")),
        ],
        "holds no WebDataset shards",
    );
}

#[test]
fn an_output_inside_or_over_an_input_is_refused_naming_both() {
    let tmp = tempfile::tempdir().unwrap();
    let photos = tmp.path().join("photos");
    std::fs::create_dir_all(photos.join("cat")).unwrap();
    let labels = tmp.path().join("labels.csv");
    std::fs::write(&labels, "key,class\n").unwrap();
    let err = assert_refused(
        &[
            "shard",
            "--src",
            s(&photos),
            "--out",
            s(&photos.join("shards")),
        ],
        "lies inside --src",
    );
    assert!(err.contains("photos"), "{err}");
    assert_refused(
        &["shard", "--src", s(&photos), "--out", s(tmp.path())],
        "is a folder that holds --src",
    );
    assert_refused(
        &[
            "shard",
            "--layout",
            "flat",
            "--src",
            s(&photos),
            "--labels",
            s(&labels),
            "--out",
            s(&labels),
        ],
        "is the same path as --labels",
    );
    assert_eq!(std::fs::read_to_string(&labels).unwrap(), "key,class\n");
}
