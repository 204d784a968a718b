//! Interrupted runs: killed mid-run and rerun, they complete to the bytes of an
//! uninterrupted run.

use super::*;

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
    let other: Vec<&str> = other.iter().map(|x| x.as_str()).collect();
    assert_refused(&other, "different settings");

    let b: Vec<String> = args(&cut);
    let sum = ok_json(&b.iter().map(|x| x.as_str()).collect::<Vec<_>>());
    assert!(sum["resumed_shards"].as_u64().unwrap() >= 3, "{sum}");
    assert_eq!(files_of(&full), files_of(&cut));

    // A complete dataset is not overwritten without --force.
    assert_refused(&b.iter().map(|x| x.as_str()).collect::<Vec<_>>(), "--force");
    let mut forced = b.clone();
    forced.push("--force".into());
    let sum = ok_json(&forced.iter().map(|x| x.as_str()).collect::<Vec<_>>());
    assert_eq!(sum["resumed_shards"], 0);
    assert_eq!(files_of(&full), files_of(&cut));
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
    py_code(make, &[s(&src), s(&archive)]);
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
