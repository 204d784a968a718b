//! Tar archives (class folders, class tars, flat, gzip, split, labelled) and WebDataset
//! shards, read in place.

use super::*;

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
    py_code(make, &[s(&src), s(t)]);

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
    let err = assert_refused(
        &["shard", "--src", s(&cut), "--out", s(&t.join("cut-ds"))],
        "truncated",
    );
    assert!(err.contains("cut.tar"), "{err}");
    assert!(!t.join("cut-ds").join("manifest.json").exists());
}

/// WebDataset shards (a folder of `.tar`s, samples `KEY.jpg` + `KEY.cls` + `KEY.json`)
/// give one row per sample under `SHARD/KEY`, labelled from `.cls` with `--class-names`,
/// with the same bytes as the folder; a sample without `.cls` is stored unlabeled, one
/// with a `.cls` that is not a label is skipped with the reason.
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
    py_code(make, &[s(&src), s(&wds)]);
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
    assert_eq!(rows.len(), 25);
    assert!(rows
        .iter()
        .all(|(k, _, _)| k.starts_with("train-000000.tar/sample")
            || k.starts_with("train-000001.tar/sample")
            || k == "train-000001.tar/nolabel"));
    let unlabeled: Vec<&String> = rows.iter().filter(|r| r.1 < 0).map(|r| &r.0).collect();
    assert_eq!(unlabeled, ["train-000001.tar/nolabel"]);
    let mut got: Vec<(i64, String)> = rows
        .into_iter()
        .filter(|r| r.1 >= 0)
        .map(|(_, l, h)| (l, h))
        .collect();
    let mut want: Vec<(i64, String)> = rows_of(&folder)
        .into_iter()
        .map(|(_, l, h)| (l, h))
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    let skipped = m["skipped"].to_string();
    assert!(!skipped.contains("nolabel"), "{skipped}");
    assert!(
        skipped.contains("train-000001.tar/badlabel") && skipped.contains("not a label"),
        "{skipped}"
    );
}

/// WebDataset shards lost samples: the same keys in two shards (a restarted writer) kept
/// only one shard's, a sample without `.cls` was dropped, an empty image member was not
/// listed with its shard and name, and shards given without `--layout webdataset` were
/// read as plain tars (their keys' folders becoming classes). Now every sample is
/// stored under `SHARD/KEY`, unlabeled when it has no `.cls`, the empty member is
/// listed, and the shards are recognised — a folder of them or one `.tar`.
#[test]
fn webdataset_shards_that_lost_samples_keep_every_one() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let src = t.join("src");
    byol_tools::bench::write_synthetic_folder(&src, 4, (32, 40), 90, 1).unwrap();
    let make = r#"
import io, os, sys, tarfile
src, out = sys.argv[1], sys.argv[2]
os.makedirs(os.path.join(out, "shards"))
c = sorted(os.listdir(src))[0]
imgs = [open(os.path.join(src, c, f), "rb").read() for f in sorted(os.listdir(os.path.join(src, c)))]
def add(tf, name, data):
    ti = tarfile.TarInfo(name); ti.size = len(data); tf.addfile(ti, io.BytesIO(data))
for shard in range(2):  # the same keys in both: a writer restarted from 0
    with tarfile.open(os.path.join(out, "shards", f"part-{shard}.tar"), "w") as tf:
        for i, b in enumerate(imgs[:3]):
            add(tf, f"dir/{i:06d}.jpg", b)
            add(tf, f"dir/{i:06d}.cls", f"{i % 2}".encode())
        add(tf, "dir/unlabeled.jpg", imgs[3])
        if shard == 1:
            add(tf, "dir/empty.jpg", b"")
            add(tf, "dir/empty.cls", b"0")
"#;
    py_code(make, &[s(&src), s(t)]);
    let shards = t.join("shards");
    for (name, srcs, rows) in [
        ("folder", vec![s(&shards)], 8),
        ("one", vec![s(&shards.join("part-1.tar"))], 4),
    ] {
        let ds = t.join(format!("{name}-ds"));
        let mut args = vec![
            "shard",
            "--out",
            s(&ds),
            "--class-names",
            "even,odd",
            "--json",
        ];
        for src in srcs {
            args.extend(["--src", src]);
        }
        let r = ok_json(&args);
        assert_eq!(r["rows"].as_u64(), Some(rows), "{name}: {r}");
        let m = json_of(&ds);
        assert_eq!(m["classes"], serde_json::json!(["even", "odd"]), "{name}");
        let keys: Vec<(String, i64)> = rows_of(&ds).into_iter().map(|(k, l, _)| (k, l)).collect();
        assert!(
            keys.contains(&("part-1.tar/dir/000000".to_string(), 0))
                && keys.contains(&("part-1.tar/dir/unlabeled".to_string(), -1)),
            "{name}: {keys:?}"
        );
        let skipped = m["skipped"].to_string();
        assert!(
            skipped.contains("part-1.tar/dir/empty.jpg") && skipped.contains("empty image member"),
            "{name}: {skipped}"
        );
    }
    let both = rows_of(&t.join("folder-ds"));
    assert!(both.iter().any(|r| r.0 == "part-0.tar/dir/000001"));
    assert!(both.iter().any(|r| r.0 == "part-1.tar/dir/000001"));
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
    py_code(make, &[s(&src), s(t)]);
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
    let err = assert_refused(
        &[
            "shard",
            "--src",
            s(&t.join("boundary.tar")),
            "--out",
            s(&t.join("b-ds")),
        ],
        "end-of-archive",
    );
    assert!(err.contains("boundary.tar"), "{err}");

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
    // Several archives: keys start with the archive's name.
    let unprefixed = |rows: Vec<(String, i64, String)>| -> Vec<(String, i64, String)> {
        rows.into_iter()
            .map(|(k, l, h)| {
                let (archive, member) = k.split_once('/').unwrap();
                assert!(archive.starts_with("part-"), "{k}");
                (member.to_string(), l, h)
            })
            .collect()
    };
    assert_eq!(unprefixed(rows_of(&two)), want);
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

    let err = assert_refused(
        &[
            "shard",
            "--src",
            s(&t.join("cut.tar.gz")),
            "--out",
            s(&t.join("cut-ds")),
        ],
        "cut.tar.gz",
    );
    assert!(err.contains("gzip"), "{err}");
    assert!(!t.join("cut-ds").join("manifest.json").exists());
    assert_eq!(temps(), 0, "the temporary tar was left behind");
}
