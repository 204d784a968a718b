//! `byol-tools inspect`: what a dataset holds.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::read::{for_each_row_group, ReadError};
use byol_format::shards::{FormatError, Manifest};

/// Upper bounds (inclusive) of the longer-side histogram buckets; the last bucket is open.
pub const SIDE_BUCKETS: &[i32] = &[32, 64, 128, 256, 384, 512, 1024];

/// Rows of one class.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassCount {
    pub index: usize,
    pub name: String,
    pub count: u64,
}

/// One shard's rows and size.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardLine {
    pub file: String,
    pub rows: u64,
    pub bytes: u64,
}

/// The `--json` report of `inspect`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Inspect {
    pub command: String,
    pub dir: String,
    pub rows: u64,
    pub bytes: u64,
    pub image_bytes: u64,
    pub mean_image_bytes: f64,
    pub classes: Vec<ClassCount>,
    pub unlabeled: u64,
    pub shards: Vec<ShardLine>,
    /// Longer side of the stored images: bucket label ("≤256", ">1024") → count.
    pub longer_side_histogram: Vec<(String, u64)>,
    pub min_side: i32,
    pub max_side: i32,
    pub skipped: u64,
    /// Skipped files per reason (first word group of the reason).
    pub skipped_reasons: BTreeMap<String, u64>,
    pub ignored: u64,
    pub kept_original: u64,
    pub reencoded: u64,
}

/// Why a dataset cannot be inspected.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error(transparent)]
    Read(#[from] ReadError),
}

/// Short form of a skip reason for grouping ("truncated JPEG: …" → "truncated JPEG").
pub fn reason_kind(reason: &str) -> String {
    reason
        .split(':')
        .next()
        .unwrap_or(reason)
        .trim()
        .to_string()
}

/// # Errors
/// The manifest or a shard's metadata cannot be read.
pub fn inspect(dir: &Path) -> Result<Inspect, InspectError> {
    let m = Manifest::load(dir)?;
    let mut hist = vec![0u64; SIDE_BUCKETS.len() + 1];
    let (mut min_side, mut max_side) = (i32::MAX, 0);
    for s in &m.shards {
        for_each_row_group(&dir.join(&s.file), false, |rows| {
            if let (Some(h), Some(w)) = (rows.heights(), rows.widths()) {
                for (h, w) in h.values().iter().zip(w.values().iter()) {
                    let longer = *h.max(w);
                    min_side = min_side.min(*h.min(w));
                    max_side = max_side.max(longer);
                    let b = SIDE_BUCKETS
                        .iter()
                        .position(|&u| longer <= u)
                        .unwrap_or(SIDE_BUCKETS.len());
                    hist[b] += 1;
                }
            }
            Ok(())
        })?;
    }
    let labels: Vec<String> = SIDE_BUCKETS
        .iter()
        .map(|u| format!("<={u}"))
        .chain(std::iter::once(format!(
            ">{}",
            SIDE_BUCKETS.last().copied().unwrap_or(0)
        )))
        .collect();
    let mut reasons = BTreeMap::new();
    for s in &m.skipped {
        *reasons.entry(reason_kind(&s.reason)).or_insert(0) += 1;
    }
    Ok(Inspect {
        command: "inspect".into(),
        dir: dir.display().to_string(),
        rows: m.totals.rows,
        bytes: m.totals.bytes,
        image_bytes: m.totals.image_bytes,
        mean_image_bytes: m.totals.image_bytes as f64 / (m.totals.rows.max(1)) as f64,
        classes: m
            .classes
            .iter()
            .enumerate()
            .map(|(i, n)| ClassCount {
                index: i,
                name: n.clone(),
                count: m.totals.per_class.get(i).copied().unwrap_or(0),
            })
            .collect(),
        unlabeled: m.totals.unlabeled,
        shards: m
            .shards
            .iter()
            .map(|s| ShardLine {
                file: s.file.clone(),
                rows: s.rows,
                bytes: s.bytes,
            })
            .collect(),
        longer_side_histogram: labels.into_iter().zip(hist).collect(),
        min_side: if min_side == i32::MAX { 0 } else { min_side },
        max_side,
        skipped: m.totals.skipped,
        skipped_reasons: reasons,
        ignored: m.totals.ignored,
        kept_original: m.totals.kept_original,
        reencoded: m.totals.reencoded,
    })
}

fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

impl Inspect {
    /// The human-readable report.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "dataset   {}", self.dir);
        let _ = writeln!(
            s,
            "images    {} in {} shard(s), {} ({} of images, {:.0} B/image)",
            self.rows,
            self.shards.len(),
            human_bytes(self.bytes),
            human_bytes(self.image_bytes),
            self.mean_image_bytes
        );
        let _ = writeln!(
            s,
            "stored    {} kept as-is, {} re-encoded; {} skipped, {} ignored",
            self.kept_original, self.reencoded, self.skipped, self.ignored
        );
        for (r, c) in &self.skipped_reasons {
            let _ = writeln!(s, "  skipped {c:>6}  {r}");
        }
        let _ = writeln!(s, "classes   {}", self.classes.len());
        for c in &self.classes {
            let _ = writeln!(s, "  {:>4}  {:<24} {:>8}", c.index, c.name, c.count);
        }
        if self.unlabeled > 0 {
            let _ = writeln!(s, "  unlabeled {:>21}", self.unlabeled);
        }
        let _ = writeln!(
            s,
            "longer side (px), min side {} max side {}",
            self.min_side, self.max_side
        );
        let peak = self
            .longer_side_histogram
            .iter()
            .map(|(_, c)| *c)
            .max()
            .unwrap_or(1)
            .max(1);
        for (label, c) in &self.longer_side_histogram {
            let bar = "#".repeat(((*c as f64 / peak as f64) * 40.0).round() as usize);
            let _ = writeln!(s, "  {label:>6} {c:>8} {bar}");
        }
        let _ = writeln!(s, "shards");
        for sh in &self.shards {
            let _ = writeln!(
                s,
                "  {}  {:>8} rows  {:>10}",
                sh.file,
                sh.rows,
                human_bytes(sh.bytes)
            );
        }
        s
    }
}
