//! Which labelled rows a fine-tuning run trains on: a class-balanced subset drawn from
//! a seed (`--label-fraction`, `--labels-per-class`), a keys file (`--label-keys`: one key
//! per line, as SimCLR's 1 % / 10 % ImageNet lists are), or every labelled row. The
//! chosen keys are written to `FT/label_keys.txt`, which `--label-keys` takes back.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use byol_format::rng::SplitMix64;

use crate::bail;
use crate::error::{Context, Result};

/// `FT/label_keys.txt`: the subset's keys, one per line, in row order.
pub fn keys_path(run: &Path) -> PathBuf {
    run.join("label_keys.txt")
}

/// How the labelled subset is chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum LabelChoice {
    /// Every labelled row.
    All,
    /// `round(fraction × rows of the class)` rows of each class (at least 1).
    Fraction(f64),
    /// `n` rows of each class (all of a class that has fewer).
    PerClass(usize),
    /// The keys listed in a file, one per line.
    KeysFile(PathBuf),
}

/// The chosen rows.
#[derive(Debug, Clone)]
pub struct LabelSubset {
    /// Global row ids, sorted.
    pub rows: Vec<u64>,
    /// Rows chosen of each class.
    pub per_class: Vec<u64>,
    /// How they were chosen, in words (recorded as `finetune.subset`).
    pub description: String,
}

/// Chooses the subset of the rows `keys`/`labels` (global row order; label -1:
/// unlabeled, never chosen) over `classes` classes.
///
/// Balanced choices draw each class's rows with a generator seeded by (`seed`, class),
/// so the subset depends only on the seed and the dataset.
///
/// # Errors
/// A fraction outside (0, 1], zero per class, a keys file that cannot be read, names a
/// key the shards do not hold (naming the line), names an unlabeled row, or a subset
/// with no row.
pub fn choose(
    keys: &[String],
    labels: &[i32],
    classes: usize,
    choice: &LabelChoice,
    seed: u64,
) -> Result<LabelSubset> {
    let mut by_class: Vec<Vec<u64>> = vec![Vec::new(); classes];
    for (row, &l) in labels.iter().enumerate() {
        if l >= 0 && (l as usize) < classes {
            by_class[l as usize].push(row as u64);
        }
    }
    let (mut rows, description) = match choice {
        LabelChoice::All => (
            by_class.iter().flatten().copied().collect::<Vec<u64>>(),
            "every labelled row".to_string(),
        ),
        LabelChoice::Fraction(f) => {
            if !(f.is_finite() && *f > 0.0 && *f <= 1.0) {
                bail!("--label-fraction {f}: expected a number in (0, 1], for example 0.01");
            }
            let take = |n: usize| ((f * n as f64).round() as usize).clamp(1, n.max(1));
            (
                balanced(&by_class, take, seed),
                format!("{} % of each class's labelled rows, seed {seed}", 100.0 * f),
            )
        }
        LabelChoice::PerClass(n) => {
            if *n == 0 {
                bail!("--labels-per-class 0: expected at least 1");
            }
            (
                balanced(&by_class, |have| (*n).min(have), seed),
                format!("{n} labelled rows of each class, seed {seed}"),
            )
        }
        LabelChoice::KeysFile(file) => (
            rows_of_keys(keys, labels, file)?,
            format!("the keys listed in {}", file.display()),
        ),
    };
    rows.sort_unstable();
    rows.dedup();
    if rows.is_empty() {
        bail!("the labelled subset ({description}) has no row: the training shards hold no labelled row");
    }
    let mut per_class = vec![0u64; classes];
    for &r in &rows {
        per_class[labels[r as usize] as usize] += 1;
    }
    Ok(LabelSubset {
        rows,
        per_class,
        description,
    })
}

/// `take(n)` rows of each class (of its `n`), drawn with a generator seeded by (seed, class).
fn balanced(by_class: &[Vec<u64>], take: impl Fn(usize) -> usize, seed: u64) -> Vec<u64> {
    let mut out = Vec::new();
    for (c, rows) in by_class.iter().enumerate() {
        if rows.is_empty() {
            continue;
        }
        let mut r = rows.clone();
        SplitMix64::new(seed ^ 0x6C61_6265_6C73_0000 ^ (c as u64).wrapping_mul(0x9E37_79B9))
            .shuffle(&mut r);
        r.truncate(take(rows.len()));
        out.extend(r);
    }
    out
}

/// The rows whose keys `file` lists (one per line; blank lines and `#` comments
/// skipped). A line matches a key exactly, or else a key's file name (its last `/` part)
/// when only one key has that name (SimCLR's lists name `n01440764_10026.JPEG` where
/// the shards hold `n01440764/n01440764_10026.JPEG`).
fn rows_of_keys(keys: &[String], labels: &[i32], file: &Path) -> Result<Vec<u64>> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading --label-keys {}", file.display()))?;
    let exact: HashMap<&str, u64> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.as_str(), i as u64))
        .collect();
    // File name → row, or None when several keys share it.
    let mut by_name: HashMap<&str, Option<u64>> = HashMap::new();
    for (i, k) in keys.iter().enumerate() {
        let name = k.rsplit('/').next().unwrap_or(k);
        by_name
            .entry(name)
            .and_modify(|v| *v = None)
            .or_insert(Some(i as u64));
    }
    let mut rows = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let key = line.trim();
        if key.is_empty() || key.starts_with('#') {
            continue;
        }
        let row = match exact.get(key) {
            Some(&r) => r,
            None => match by_name.get(key) {
                Some(Some(r)) => *r,
                Some(None) => bail!(
                    "{}:{}: {key:?} names several images of the training shards; give the whole key",
                    file.display(),
                    n + 1
                ),
                None => bail!(
                    "{}:{}: {key:?} is not a key of the training shards",
                    file.display(),
                    n + 1
                ),
            },
        };
        if labels[row as usize] < 0 {
            bail!(
                "{}:{}: {key:?} is an unlabeled row of the training shards",
                file.display(),
                n + 1
            );
        }
        rows.push(row);
    }
    Ok(rows)
}

/// Writes the subset's keys (row order) to `FT/label_keys.txt` atomically.
///
/// # Errors
/// The file cannot be written.
pub fn write_keys(run: &Path, keys: &[String], rows: &[u64]) -> Result<()> {
    let mut text = String::with_capacity(rows.len() * 24);
    for &r in rows {
        text.push_str(&keys[r as usize]);
        text.push('\n');
    }
    crate::run::write_atomic(&keys_path(run), text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> (Vec<String>, Vec<i32>) {
        // 3 classes of 100, 40 and 7 rows, interleaved, and 5 unlabeled rows.
        let mut keys = Vec::new();
        let mut labels = Vec::new();
        for i in 0..152 {
            let l = match i % 10 {
                _ if i >= 147 => -1,
                0..=5 => 0,
                6..=8 => 1,
                _ => 2,
            };
            keys.push(format!("class{}/img_{i}.png", l.max(0)));
            labels.push(l);
        }
        (keys, labels)
    }

    #[test]
    fn a_fraction_is_balanced_deterministic_and_never_unlabeled() {
        let (keys, labels) = data();
        let counts: Vec<usize> = (0..3)
            .map(|c| labels.iter().filter(|&&l| l == c).count())
            .collect();
        let a = choose(&keys, &labels, 3, &LabelChoice::Fraction(0.1), 7).unwrap();
        let want: Vec<u64> = counts
            .iter()
            .map(|&n| ((0.1 * n as f64).round() as u64).max(1))
            .collect();
        assert_eq!(a.per_class, want);
        assert!(a.rows.iter().all(|&r| labels[r as usize] >= 0));
        let b = choose(&keys, &labels, 3, &LabelChoice::Fraction(0.1), 7).unwrap();
        assert_eq!(a.rows, b.rows);
        let c = choose(&keys, &labels, 3, &LabelChoice::Fraction(0.1), 8).unwrap();
        assert_ne!(a.rows, c.rows);
        let p = choose(&keys, &labels, 3, &LabelChoice::PerClass(10), 7).unwrap();
        assert_eq!(p.per_class, vec![10, 10, counts[2].min(10) as u64]);
    }

    #[test]
    fn the_keys_file_gives_the_same_subset_back() {
        let (keys, labels) = data();
        let tmp = tempfile::tempdir().unwrap();
        let a = choose(&keys, &labels, 3, &LabelChoice::PerClass(4), 3).unwrap();
        write_keys(tmp.path(), &keys, &a.rows).unwrap();
        let file = keys_path(tmp.path());
        let b = choose(&keys, &labels, 3, &LabelChoice::KeysFile(file.clone()), 0).unwrap();
        assert_eq!(a.rows, b.rows);
        // File names alone (SimCLR's lists), comments and blank lines.
        let names: String = a
            .rows
            .iter()
            .map(|&r| format!("{}\n\n", keys[r as usize].rsplit('/').next().unwrap()))
            .collect();
        std::fs::write(&file, format!("# subset\n{names}")).unwrap();
        let c = choose(&keys, &labels, 3, &LabelChoice::KeysFile(file.clone()), 0).unwrap();
        assert_eq!(a.rows, c.rows);
    }

    #[test]
    fn a_keys_file_naming_a_missing_or_unlabeled_key_is_refused_with_its_line() {
        let (keys, labels) = data();
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("keys.txt");
        std::fs::write(&file, "class0/img_0.png\nnot/there.png\n").unwrap();
        let e = choose(&keys, &labels, 3, &LabelChoice::KeysFile(file.clone()), 0).unwrap_err();
        assert!(
            format!("{e:#}").contains("keys.txt:2: \"not/there.png\""),
            "{e:#}"
        );
        std::fs::write(&file, "class0/img_150.png\n").unwrap();
        let e = choose(&keys, &labels, 3, &LabelChoice::KeysFile(file), 0).unwrap_err();
        assert!(format!("{e:#}").contains("unlabeled"), "{e:#}");
        let e = choose(&keys, &labels, 3, &LabelChoice::Fraction(1.5), 0).unwrap_err();
        assert!(format!("{e:#}").contains("--label-fraction 1.5"), "{e:#}");
    }
}
