//! `byol-tools verify`: re-read every shard, check checksums, schema, row counts,
//! labels, unique keys, and that every image decodes to its recorded size.

use std::collections::HashSet;
use std::path::Path;

use byol_format::progress::{Mode, Progress};
use serde::{Deserialize, Serialize};

use crate::read::for_each_row_group;
use byol_format::image::decode_bgr;
use byol_format::shards::{file_checksum, FormatError, Manifest};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Problem {
    pub shard: String,
    /// The row's key, when the problem is one row's.
    pub key: Option<String>,
    pub problem: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifyReport {
    pub command: String,
    pub dir: String,
    pub ok: bool,
    pub shards: usize,
    pub rows: u64,
    pub decoded: u64,
    pub problems: Vec<Problem>,
    pub seconds: f64,
}

/// Checks `dir`; `workers` threads decode images.
///
/// # Errors
/// The dataset's manifest cannot be loaded (problems in shards are reported, not returned as errors).
pub fn verify(dir: &Path, workers: usize, progress: bool) -> Result<VerifyReport, FormatError> {
    let t0 = std::time::Instant::now();
    let m = Manifest::load(dir)?;
    let mut bar = Progress::new(Mode::detect(progress), "verify", m.totals.rows, "images", 0);
    let mut problems = Vec::new();
    let mut keys: HashSet<String> = HashSet::new();
    let mut rows_seen = 0u64;
    let mut decoded = 0u64;
    let nclasses = m.classes.len() as i32;
    for s in &m.shards {
        let path = dir.join(&s.file);
        let shard_problem = |p: String| Problem {
            shard: s.file.clone(),
            key: None,
            problem: p,
        };
        match std::fs::metadata(&path) {
            Err(e) => {
                problems.push(shard_problem(format!("cannot read: {e}")));
                continue;
            }
            Ok(md) if md.len() != s.bytes => problems.push(shard_problem(format!(
                "size {} bytes, manifest says {}",
                md.len(),
                s.bytes
            ))),
            Ok(_) => {}
        }
        match file_checksum(&path) {
            Ok(c) if c != s.checksum => problems.push(shard_problem(format!(
                "checksum {c}, manifest says {}",
                s.checksum
            ))),
            Err(e) => problems.push(shard_problem(format!("cannot read: {e}"))),
            Ok(_) => {}
        }
        let mut rows_here = 0u64;
        let res = for_each_row_group(&path, true, |rows| {
            let (Some(k), Some(l), Some(im), Some(h), Some(w)) = (
                rows.keys(),
                rows.labels(),
                rows.images(),
                rows.heights(),
                rows.widths(),
            ) else {
                problems.push(shard_problem("columns have unexpected types".into()));
                return Ok(());
            };
            rows_here += rows.len() as u64;
            // Decode in parallel: each worker takes every `workers`-th row.
            let n = rows.len();
            let nw = workers.max(1);
            let mut found: Vec<Problem> = std::thread::scope(|sc| {
                let handles: Vec<_> = (0..nw)
                    .map(|t| {
                        let file = s.file.clone();
                        sc.spawn(move || {
                            let mut out = Vec::new();
                            for i in (t..n).step_by(nw) {
                                let key = k.value(i).to_string();
                                let row = |p: String| Problem {
                                    shard: file.clone(),
                                    key: Some(key.clone()),
                                    problem: p,
                                };
                                match decode_bgr(im.value(i), 1) {
                                    Err(e) => out.push(row(format!("image does not decode: {e}"))),
                                    Ok(img) => {
                                        use opencv::core::MatTraitConst;
                                        let (dh, dw) = (img.rows(), img.cols());
                                        if (dh, dw) != (h.value(i), w.value(i)) {
                                            out.push(row(format!(
                                                "decodes to {dh}x{dw}, recorded {}x{}",
                                                h.value(i),
                                                w.value(i)
                                            )));
                                        }
                                    }
                                }
                            }
                            out
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .flat_map(|h| {
                        h.join().unwrap_or_else(|_| {
                            vec![Problem {
                                shard: s.file.clone(),
                                key: None,
                                problem: "decoder panicked".into(),
                            }]
                        })
                    })
                    .collect()
            });
            decoded += n as u64;
            for i in 0..n {
                let key = k.value(i);
                let label = l.value(i);
                if label < -1 || label >= nclasses.max(0) && label != -1 {
                    found.push(Problem {
                        shard: s.file.clone(),
                        key: Some(key.to_string()),
                        problem: format!("label {label} outside -1..{nclasses}"),
                    });
                }
                if !keys.insert(key.to_string()) {
                    found.push(Problem {
                        shard: s.file.clone(),
                        key: Some(key.to_string()),
                        problem: "duplicate key".into(),
                    });
                }
            }
            problems.append(&mut found);
            bar.inc(n as u64);
            Ok(())
        });
        if let Err(e) = res {
            problems.push(shard_problem(byol_format::error_chain(&e)));
        }
        if rows_here != s.rows {
            problems.push(shard_problem(format!(
                "{rows_here} rows, manifest says {}",
                s.rows
            )));
        }
        rows_seen += rows_here;
    }
    bar.finish();
    if rows_seen != m.totals.rows {
        problems.push(Problem {
            shard: "manifest.json".into(),
            key: None,
            problem: format!("{rows_seen} rows in shards, totals say {}", m.totals.rows),
        });
    }
    Ok(VerifyReport {
        command: "verify".into(),
        dir: dir.display().to_string(),
        ok: problems.is_empty(),
        shards: m.shards.len(),
        rows: rows_seen,
        decoded,
        problems,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
