//! Loader tests on generated shards: order, ranks, exact resume, pixels against a PIL
//! reference, corrupt rows, shutdown, slot reuse, panics.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use byol_pipeline::loader::DecodeFn;
use byol_pipeline::{opencv_decoder, Cursor, Dataset, Loader, LoaderConfig, PipelineError, Split};
use byol_tools::shard::{shard, ShardOptions};
use byol_tools::source::{scan, Layout, ScanOptions};

mod augment;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn python() -> PathBuf {
    root().join(".venv/bin/python")
}

fn shard_folder(src: &Path, out: &Path, rows_per_shard: u64, row_group_rows: usize) {
    let source = scan(src, &Layout::ImageFolder, &ScanOptions::default()).expect("scan");
    let opts = ShardOptions {
        max_side: None,
        quality: 90,
        rows_per_shard: Some(rows_per_shard),
        shard_bytes: None,
        row_group_rows,
        workers: 2,
        seed: 1,
        force: true,
        progress: false,
    };
    shard(&source, &src.display().to_string(), out, &opts).expect("shard");
}

/// `n` small generated JPEGs in 3 classes, sharded.
fn small_dataset(dir: &Path, n: usize, rows_per_shard: u64, row_group_rows: usize) -> PathBuf {
    let src = dir.join("src");
    byol_tools::bench::write_synthetic_folder(&src, n, (12, 16), 90, 3).expect("synth");
    let out = dir.join("ds");
    shard_folder(&src, &out, rows_per_shard, row_group_rows);
    out
}

fn cfg(batch: usize, canvas: usize) -> LoaderConfig {
    LoaderConfig {
        batch,
        canvas,
        seed: 5,
        rank: 0,
        world: 1,
        window: 2,
        decode_threads: 2,
        slots: 3,
        drop_last: false,
        pin_memory: false,
    }
}

fn loader(ds: &Path, c: LoaderConfig) -> Loader {
    Loader::new(Dataset::open(ds).expect("open"), c, opencv_decoder()).expect("loader")
}

fn rows_from(l: &Loader, cursor: Cursor) -> Vec<u64> {
    let mut v = Vec::new();
    for b in l.start(cursor) {
        v.extend_from_slice(b.expect("batch").rows());
    }
    v
}

/// What the loader streams from `cursor` in an epoch begun by other world sizes.
fn rows_resumed(l: &Loader, cursor: Cursor, splits: &[Split]) -> Vec<u64> {
    let mut v = Vec::new();
    for b in l.start_resumed(cursor, splits) {
        v.extend_from_slice(b.expect("batch").rows());
    }
    v
}

/// Two ranks stream disjoint halves that together are the epoch; a world-2 run stopped
/// mid-epoch continues at world 2 exactly, or at world 1 (and again at world 3) with
/// each remaining sample streamed once.
#[test]
fn two_ranks_split_the_epoch_and_a_resume_at_another_world_size_covers_the_rest_once() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = small_dataset(tmp.path(), 83, 30, 8);
    let at = |rank, world| {
        let mut c = cfg(4, 16);
        c.rank = rank;
        c.world = world;
        c.drop_last = false;
        loader(&ds, c)
    };
    let epoch = 2;
    let start = Cursor { epoch, consumed: 0 };
    let r0 = rows_from(&at(0, 2), start);
    let r1 = rows_from(&at(1, 2), start);
    assert_eq!((r0.len(), r1.len()), (41, 41));
    let all: HashSet<u64> = r0.iter().chain(&r1).copied().collect();
    assert_eq!(all.len(), 82, "the halves overlap");
    // Stopped after 3 batches of 4 on each rank.
    let c = Cursor {
        epoch,
        consumed: 12,
    };
    assert_eq!(rows_from(&at(0, 2), c), r0[12..]);
    assert_eq!(rows_from(&at(1, 2), c), r1[12..]);
    let seen: Vec<u64> = r0[..12].iter().chain(&r1[..12]).copied().collect();
    let splits = vec![Split {
        world: 2,
        consumed: vec![12, 12],
    }];
    let rest = rows_resumed(&at(0, 1), start, &splits);
    let mut once: Vec<u64> = seen.iter().chain(&rest).copied().collect();
    once.sort();
    once.dedup();
    assert_eq!(once.len(), seen.len() + rest.len(), "a sample seen twice");
    assert_eq!(once.len(), 82, "remaining samples missed");
    // At world 1 that run stops again after 5 samples and continues at world 3.
    let mut splits3 = splits.clone();
    splits3.push(Split {
        world: 1,
        consumed: vec![5],
    });
    let later: Vec<u64> = (0..3)
        .flat_map(|r| rows_resumed(&at(r, 3), start, &splits3))
        .collect();
    let mut all3: Vec<u64> = seen
        .iter()
        .chain(&rest[..5])
        .chain(&later)
        .copied()
        .collect();
    let n = all3.len();
    all3.sort();
    all3.dedup();
    assert_eq!(all3.len(), n, "a sample seen twice");
    // 82 − 24 − 5 = 53 left, cut into 3 parts of 17: 2 dropped, as at an epoch's end.
    assert_eq!(n, 82 - 2);
}

#[test]
fn order_is_deterministic_and_matches_the_plan() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = small_dataset(tmp.path(), 61, 25, 8);
    let a = loader(&ds, cfg(4, 16));
    let b = loader(&ds, cfg(4, 16));
    let ra = rows_from(&a, Cursor::default());
    assert_eq!(ra.len(), 61);
    assert_eq!(ra, rows_from(&b, Cursor::default()));
    assert_eq!(ra, a.order(0));
    assert_eq!(ra.iter().collect::<HashSet<_>>().len(), 61);
    let e1 = rows_from(
        &a,
        Cursor {
            epoch: 1,
            consumed: 0,
        },
    );
    assert_ne!(ra, e1);
    let c = loader(
        &ds,
        LoaderConfig {
            seed: 6,
            ..cfg(4, 16)
        },
    );
    assert_ne!(ra, rows_from(&c, Cursor::default()));
}

#[test]
fn resume_from_every_cursor_gives_the_remaining_sequence_without_decoding_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = small_dataset(tmp.path(), 37, 10, 4);
    let l = loader(&ds, cfg(4, 16));
    let full = rows_from(
        &l,
        Cursor {
            epoch: 2,
            consumed: 0,
        },
    );
    assert_eq!(full.len(), 37);
    for c in 0..=37u64 {
        let before = l.stats().images;
        let mut rows = Vec::new();
        let mut last = None;
        for b in l.start(Cursor {
            epoch: 2,
            consumed: c,
        }) {
            let b = b.unwrap();
            rows.extend_from_slice(b.rows());
            last = Some(b.cursor);
        }
        assert_eq!(rows, full[c as usize..], "cursor {c}");
        // Only the remaining samples were decoded.
        assert_eq!(l.stats().images - before, 37 - c, "cursor {c}");
        if c < 37 {
            assert_eq!(
                last,
                Some(Cursor {
                    epoch: 2,
                    consumed: 37
                })
            );
        }
    }
    // The cursor carried by each batch resumes right after it.
    let mut ep = l.start(Cursor {
        epoch: 2,
        consumed: 0,
    });
    let b3 = ep.nth(2).unwrap().unwrap();
    let cur = b3.cursor;
    drop(b3);
    drop(ep);
    assert_eq!(
        cur,
        Cursor {
            epoch: 2,
            consumed: 12
        }
    );
    assert_eq!(rows_from(&l, cur), full[12..]);
}

#[test]
fn ranks_are_disjoint_equal_and_drop_last_keeps_batches_full() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = small_dataset(tmp.path(), 50, 20, 8);
    let mut seen = HashSet::new();
    for rank in 0..3 {
        let l = loader(
            &ds,
            LoaderConfig {
                rank,
                world: 3,
                drop_last: true,
                ..cfg(4, 16)
            },
        );
        assert_eq!(l.samples_per_epoch(), 16);
        assert_eq!(l.batches_per_epoch(), 4);
        let mut n = 0;
        for b in l.start(Cursor::default()) {
            let b = b.unwrap();
            assert_eq!(b.len(), 4);
            for r in b.rows() {
                assert!(seen.insert(*r));
            }
            n += b.len();
        }
        assert_eq!(n, 16);
    }
}

#[test]
fn decoded_canvases_match_a_pil_reference_with_and_without_dct_scaling() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = tmp.path().join("fx");
    let o = Command::new(python())
        .arg(root().join("scripts/fixtures/make_source_images.py"))
        .arg(&fx)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ds = tmp.path().join("ds");
    shard_folder(&fx.join("src"), &ds, 1000, 64);
    let canvas = 64;
    let l = loader(
        &ds,
        LoaderConfig {
            batch: 16,
            ..cfg(16, canvas)
        },
    );
    let mut keys = Vec::new();
    let mut raw: Vec<u8> = Vec::new();
    let dsx = Dataset::open(&ds).unwrap();
    let mut key_of = std::collections::HashMap::new();
    for g in 0..dsx.groups().len() {
        let lg = dsx.load_group(g).unwrap();
        for i in 0..lg.len() {
            key_of.insert(
                lg.info.span.first_row + i as u64,
                lg.keys.value(i).to_string(),
            );
        }
    }
    for b in l.start(Cursor::default()) {
        let b = b.unwrap();
        assert_eq!(b.replaced(), 0);
        let t = b.images().contiguous();
        let mut buf = vec![0u8; t.numel()];
        t.copy_data_u8(&mut buf, t.numel());
        raw.extend_from_slice(&buf);
        for (r, v) in b.rows().iter().zip(b.valid_sizes()) {
            keys.push(serde_json::json!({"key": key_of[r], "valid": [v.0, v.1]}));
        }
    }
    assert_eq!(keys.len(), 180);
    std::fs::write(tmp.path().join("canvases.u8"), &raw).unwrap();
    let dump = tmp.path().join("dump.json");
    std::fs::write(
        &dump,
        serde_json::json!({"canvas": canvas, "file": "canvases.u8", "rows": keys}).to_string(),
    )
    .unwrap();
    let o = Command::new(python())
        .arg(root().join("scripts/fixtures/canvas_reference.py"))
        .arg(&ds)
        .arg(&dump)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["size_mismatches"], serde_json::json!([]), "{r}");
    assert_eq!(r["outside_nonzero"], 0, "{r}");
    // The 10 large JPEGs (300 px ≥ 2×64) take the DCT path.
    assert_eq!(r["n_dct"], 10, "{r}");
    assert_eq!(r["n_plain"], 170, "{r}");
    // Full-resolution decodes are identical; exact pixel-area shrinking matches to
    // rounding; bilinear enlarging within 1/255 on average (PIL's edge handling).
    assert_eq!(r["worst_same"].as_f64().unwrap(), 0.0, "{r}");
    assert!(r["worst_plain"].as_f64().unwrap() < 1.0, "{r}");
    // libjpeg's 1/2–1/8 scaled IDCT through OpenCV and through PIL's draft mode
    // differ in chroma handling: within 5/255 on average.
    assert!(r["worst_dct"].as_f64().unwrap() < 5.0, "{r}");
}

/// Replaces the images of some rows with garbage (valid Parquet, undecodable image).
fn corrupt_rows(shard: &Path, rows: &[usize]) {
    let code = r#"
import sys, json, pyarrow as pa, pyarrow.parquet as pq
p, rows = sys.argv[1], json.loads(sys.argv[2])
f = pq.ParquetFile(p)
t = f.read()
imgs = t.column("image").to_pylist()
for r in rows:
    imgs[r] = b"\xff\xd8 not really a jpeg"
t = t.set_column(2, pa.field("image", pa.binary(), nullable=False), pa.array(imgs, pa.binary()))
pq.write_table(t, p, compression="none", row_group_size=f.metadata.row_group(0).num_rows)
"#;
    let o = Command::new(python())
        .args(["-c", code])
        .arg(shard)
        .arg(serde_json::to_string(rows).unwrap())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn corrupt_rows_are_counted_and_replaced_so_batches_stay_full() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = small_dataset(tmp.path(), 40, 40, 8);
    corrupt_rows(&ds.join("shard-00000.parquet"), &[3, 17, 30]);
    let l = loader(
        &ds,
        LoaderConfig {
            drop_last: true,
            ..cfg(8, 16)
        },
    );
    let mut replaced = 0;
    let mut rows = Vec::new();
    for b in l.start(Cursor::default()) {
        let b = b.unwrap();
        assert_eq!(b.len(), 8);
        replaced += b.replaced();
        assert!(b.valid_sizes().iter().all(|v| v.0 > 0 && v.1 > 0));
        rows.extend_from_slice(b.rows());
    }
    assert_eq!(replaced, 3);
    assert_eq!(l.stats().decode_failures, 3);
    // Each bad row's place holds a copy of a good sample of its batch.
    let distinct: HashSet<u64> = rows.iter().copied().collect();
    assert_eq!(distinct.len(), 37);
    assert!(!distinct.contains(&3) && !distinct.contains(&17) && !distinct.contains(&30));
}

#[test]
fn dropping_an_epoch_mid_way_stops_promptly_and_keeps_the_pool() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = small_dataset(tmp.path(), 200, 100, 16);
    let l = loader(
        &ds,
        LoaderConfig {
            slots: 2,
            ..cfg(4, 16)
        },
    );
    for _ in 0..5 {
        let mut ep = l.start(Cursor::default());
        let b = ep.next().unwrap().unwrap();
        assert_eq!(b.len(), 4);
        let t = Instant::now();
        drop(ep); // while `b` is still held
        assert!(t.elapsed() < Duration::from_secs(5));
        drop(b);
    }
    // Every slot came back: a whole epoch still runs with the 2-slot pool.
    assert_eq!(rows_from(&l, Cursor::default()).len(), 200);
}

#[test]
fn a_held_batch_keeps_its_slot_and_pixels() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = small_dataset(tmp.path(), 64, 64, 8);
    let l = loader(
        &ds,
        LoaderConfig {
            slots: 3,
            ..cfg(4, 16)
        },
    );
    let mut ep = l.start(Cursor::default());
    let held = ep.next().unwrap().unwrap();
    let before = held.images().sum(tch::Kind::Int64).int64_value(&[]);
    let held_rows = held.rows().to_vec();
    for b in ep.by_ref().take(10) {
        let b = b.unwrap();
        assert_ne!(b.slot_id(), held.slot_id());
    }
    assert_eq!(held.images().sum(tch::Kind::Int64).int64_value(&[]), before);
    assert_eq!(held.rows(), held_rows.as_slice());
}

fn panicking_decoder(
    b: &[u8],
    h: i32,
    w: i32,
    s: usize,
    out: &mut [u8],
) -> Result<(i32, i32), byol_format::image::ImageError> {
    if h > 0 && b.len() % 7 == 3 {
        panic!("decoder bug");
    }
    byol_pipeline::decode::decode_to_canvas(b, h, w, s, out)
}

#[test]
fn a_panicking_worker_is_an_error_not_a_hang() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = small_dataset(tmp.path(), 100, 100, 16);
    let f: DecodeFn = panicking_decoder;
    let l = Loader::new(Dataset::open(&ds).unwrap(), cfg(4, 16), f).unwrap();
    let t = Instant::now();
    let mut err = None;
    for b in l.start(Cursor::default()) {
        if let Err(e) = b {
            err = Some(e);
            break;
        }
    }
    assert!(t.elapsed() < Duration::from_secs(10));
    match err {
        Some(PipelineError::Panic(m)) => assert!(m.contains("decoder bug"), "{m}"),
        other => panic!("expected a panic error, got {other:?}"),
    }
}

/// A loader restricted to a subset streams only the subset's rows, every one once per
/// epoch (two ranks: disjoint halves), decodes nothing else, orders it from the seed, and
/// resumes from a cursor like a whole-dataset loader.
#[test]
fn a_subset_loader_streams_and_decodes_only_its_rows_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = small_dataset(tmp.path(), 37, 10, 4);
    let subset: Vec<u64> = vec![36, 1, 2, 5, 8, 13, 21, 22, 30, 2, 33];
    let mut want: Vec<u64> = subset.clone();
    want.sort_unstable();
    want.dedup();
    let sub = |c: LoaderConfig| loader(&ds, c).with_rows(subset.clone()).expect("subset");
    let l = sub(cfg(3, 16));
    assert_eq!(l.samples_per_epoch(), want.len() as u64);
    let before = l.stats().images;
    let epoch = rows_from(&l, Cursor::default());
    assert_eq!(
        l.stats().images - before,
        want.len() as u64,
        "decoded outside the subset"
    );
    let mut sorted = epoch.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, want);
    assert_eq!(epoch, rows_from(&sub(cfg(3, 16)), Cursor::default()));
    assert_ne!(
        epoch,
        rows_from(
            &l,
            Cursor {
                epoch: 1,
                consumed: 0
            }
        )
    );
    for c in [1u64, 3, 7] {
        let cursor = Cursor {
            epoch: 0,
            consumed: c,
        };
        assert_eq!(rows_from(&l, cursor), epoch[c as usize..], "cursor {c}");
    }
    let mut halves = Vec::new();
    for rank in 0..2 {
        let l = sub(LoaderConfig {
            rank,
            world: 2,
            ..cfg(1, 16)
        });
        halves.extend(rows_from(&l, Cursor::default()));
    }
    halves.sort_unstable();
    halves.dedup();
    assert_eq!(halves.len(), want.len() - want.len() % 2);
    assert!(halves.iter().all(|r| want.contains(r)));
    let beyond = loader(&ds, cfg(3, 16)).with_rows(vec![37]);
    assert!(matches!(beyond, Err(PipelineError::Config(m)) if m.contains("37")));
}
