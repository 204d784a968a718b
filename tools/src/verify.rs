//! `byol-tools verify`: re-read every shard, check checksums, schema, row counts,
//! labels, unique keys, and that every image decodes to its recorded size.

use byol_format::shards::DEFAULT_MAX_DECODE_FAILURE_RATE;
use std::collections::HashSet;
use std::path::Path;

use byol_format::progress::{Mode, Progress};
use serde::{Deserialize, Serialize};

use arrow_array::{Array, BinaryArray, Int32Array, StringArray};

use crate::read::{for_each_row_group, Rows};
use byol_format::image::decode_bgr;
use byol_format::shards::{file_checksum, FormatError, Manifest, ShardInfo};

/// One problem found: the shard, the row's key when it is one row's, what is wrong.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Problem {
    pub shard: String,
    /// The row's key, when the problem is one row's.
    pub key: Option<String>,
    pub problem: String,
}

/// The `--json` report of `verify`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifyReport {
    pub command: String,
    pub dir: String,
    pub ok: bool,
    pub shards: usize,
    pub rows: u64,
    pub decoded: u64,
    /// Images that do not decode (or not to their recorded size).
    pub decode_failures: u64,
    /// `decode_failures / decoded`: what `byol train` compares with
    /// `data.max_decode_failure_rate`.
    pub decode_failure_rate: f64,
    /// Whether the rate is above the default ceiling
    /// ([`byol_format::shards::DEFAULT_MAX_DECODE_FAILURE_RATE`]): `byol train` would
    /// stop on this dataset unless the ceiling is raised.
    pub training_would_stop: bool,
    pub problems: Vec<Problem>,
    pub seconds: f64,
}

impl VerifyReport {
    /// The human-readable report: one line per problem, then the verdict.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for p in &self.problems {
            let key = p.key.as_ref().map(|k| format!(" key {k}"));
            s += &format!("{}{}: {}\n", p.shard, key.unwrap_or_default(), p.problem);
        }
        if self.decode_failures > 0 {
            s += &format!(
                "{} of {} images do not decode ({:.2} %): {} data.max_decode_failure_rate's default ({} %){}\n",
                self.decode_failures,
                self.decoded,
                100.0 * self.decode_failure_rate,
                if self.training_would_stop { "above" } else { "within" },
                100.0 * DEFAULT_MAX_DECODE_FAILURE_RATE,
                if self.training_would_stop {
                    ": byol train would stop on this dataset"
                } else {
                    ": byol train replaces them in their batches"
                }
            );
        }
        s += &format!(
            "{}: {} shard(s), {} rows, {} images decoded, {} problem(s), {:.1} s\n",
            if self.ok { "OK" } else { "FAILED" },
            self.shards,
            self.rows,
            self.decoded,
            self.problems.len(),
            self.seconds
        );
        s
    }
}

/// Checks `dir`; `workers` threads decode images.
///
/// # Errors
/// The dataset's manifest cannot be loaded (problems in shards are reported, not returned as errors).
pub fn verify(dir: &Path, workers: usize, progress: bool) -> Result<VerifyReport, FormatError> {
    let t0 = std::time::Instant::now();
    let m = Manifest::load(dir)?;
    let mut c = Checker {
        bar: Progress::new(Mode::detect(progress), "verify", m.totals.rows, "images", 0),
        problems: Vec::new(),
        keys: HashSet::new(),
        decoded: 0,
        decode_failures: 0,
        nclasses: m.classes.len() as i32,
        workers: workers.max(1),
    };
    let mut rows_seen = 0u64;
    for s in &m.shards {
        rows_seen += c.shard(dir, s);
    }
    c.bar.finish();
    let mut problems = c.problems;
    if rows_seen != m.totals.rows {
        problems.push(Problem {
            shard: "manifest.json".into(),
            key: None,
            problem: format!("{rows_seen} rows in shards, totals say {}", m.totals.rows),
        });
    }
    let rate = c.decode_failures as f64 / c.decoded.max(1) as f64;
    Ok(VerifyReport {
        command: "verify".into(),
        dir: dir.display().to_string(),
        ok: problems.is_empty(),
        shards: m.shards.len(),
        rows: rows_seen,
        decoded: c.decoded,
        decode_failures: c.decode_failures,
        decode_failure_rate: rate,
        training_would_stop: rate > DEFAULT_MAX_DECODE_FAILURE_RATE,
        problems,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// What the checks found so far, across shards.
struct Checker {
    bar: Progress,
    problems: Vec<Problem>,
    /// Every key seen (a key seen again is a duplicate).
    keys: HashSet<String>,
    decoded: u64,
    decode_failures: u64,
    nclasses: i32,
    workers: usize,
}

/// A problem of the shard `file` as a whole.
fn shard_problem(file: &str, problem: String) -> Problem {
    Problem {
        shard: file.to_string(),
        key: None,
        problem,
    }
}

impl Checker {
    /// Checks one shard: size, checksum, every row group, row count. Returns the rows
    /// read.
    fn shard(&mut self, dir: &Path, s: &ShardInfo) -> u64 {
        let path = dir.join(&s.file);
        match std::fs::metadata(&path) {
            Err(e) => {
                let p = shard_problem(&s.file, format!("cannot read: {e}"));
                self.problems.push(p);
                return 0;
            }
            Ok(md) if md.len() != s.bytes => self.problems.push(shard_problem(
                &s.file,
                format!("size {} bytes, manifest says {}", md.len(), s.bytes),
            )),
            Ok(_) => {}
        }
        match file_checksum(&path) {
            Ok(c) if c != s.checksum => self.problems.push(shard_problem(
                &s.file,
                format!("checksum {c}, manifest says {}", s.checksum),
            )),
            Err(e) => self
                .problems
                .push(shard_problem(&s.file, format!("cannot read: {e}"))),
            Ok(_) => {}
        }
        let mut rows_here = 0u64;
        let res = for_each_row_group(&path, true, |rows| {
            rows_here += self.row_group(&s.file, &rows);
            Ok(())
        });
        if let Err(e) = res {
            let p = shard_problem(&s.file, byol_format::error_chain(&e));
            self.problems.push(p);
        }
        if rows_here != s.rows {
            self.problems.push(shard_problem(
                &s.file,
                format!("{rows_here} rows, manifest says {}", s.rows),
            ));
        }
        rows_here
    }

    /// Checks one row group of shard `file`: every image decodes to its recorded size,
    /// labels are in range, keys are unique. Returns the rows counted (0 when the
    /// columns have unexpected types).
    fn row_group(&mut self, file: &str, rows: &Rows) -> u64 {
        let (Some(k), Some(l), Some(im), Some(h), Some(w)) = (
            rows.keys(),
            rows.labels(),
            rows.images(),
            rows.heights(),
            rows.widths(),
        ) else {
            let p = shard_problem(file, "columns have unexpected types".into());
            self.problems.push(p);
            return 0;
        };
        let n = rows.len();
        let mut found = decode_all(file, k, im, (h, w), self.workers);
        self.decoded += n as u64;
        self.decode_failures += found.iter().filter(|p| p.key.is_some()).count() as u64;
        let nclasses = self.nclasses;
        for i in 0..n {
            let key = k.value(i);
            let label = l.value(i);
            let row = |problem: String| Problem {
                shard: file.to_string(),
                key: Some(key.to_string()),
                problem,
            };
            if label < -1 || label >= nclasses.max(0) && label != -1 {
                found.push(row(format!("label {label} outside -1..{nclasses}")));
            }
            if !self.keys.insert(key.to_string()) {
                found.push(row("duplicate key".into()));
            }
        }
        self.problems.append(&mut found);
        self.bar.inc(n as u64);
        n as u64
    }
}

/// Decodes every image of a row group in parallel (worker t takes every `workers`-th
/// row from row t): the rows that do not decode, or decode to another size than the
/// recorded (height, width).
fn decode_all(
    file: &str,
    keys: &StringArray,
    images: &BinaryArray,
    (heights, widths): (&Int32Array, &Int32Array),
    workers: usize,
) -> Vec<Problem> {
    let n = images.len();
    std::thread::scope(|sc| {
        let handles: Vec<_> = (0..workers)
            .map(|t| {
                sc.spawn(move || {
                    let mut out = Vec::new();
                    for i in (t..n).step_by(workers) {
                        let recorded = (heights.value(i), widths.value(i));
                        if let Some(problem) = decode_problem(images.value(i), recorded) {
                            out.push(Problem {
                                shard: file.to_string(),
                                key: Some(keys.value(i).to_string()),
                                problem,
                            });
                        }
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                h.join()
                    .unwrap_or_else(|_| vec![shard_problem(file, "decoder panicked".into())])
            })
            .collect()
    })
}

/// Why `bytes` is not an image of the `recorded` (height, width), if it is not.
fn decode_problem(bytes: &[u8], recorded: (i32, i32)) -> Option<String> {
    use opencv::core::MatTraitConst;
    match decode_bgr(bytes, 1) {
        Err(e) => Some(format!("image does not decode: {e}")),
        Ok(img) => {
            let (dh, dw) = (img.rows(), img.cols());
            ((dh, dw) != recorded).then(|| {
                format!(
                    "decodes to {dh}x{dw}, recorded {}x{}",
                    recorded.0, recorded.1
                )
            })
        }
    }
}
