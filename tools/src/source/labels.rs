//! Label files of the `flat` layout: a `key,class` CSV, or an ILSVRC2012 ground truth
//! (one 1-based class id per line) with its synset list.

use std::path::Path;

use super::{io_err, SourceError};

/// One data row of a `key,class` label file.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelRow {
    /// 1-based line of the row in the file.
    pub line: u64,
    pub key: String,
    pub class: String,
}

/// Label file contents: `key,class` rows (the first row possibly a header; see
/// [`read_csv_labels`]), or the i-th sorted file → class name.
pub(super) enum LabelFile {
    Csv(Vec<LabelRow>),
    /// The class of the i-th file in sorted order, and every class (the synsets).
    Ordered(Vec<String>, Vec<String>),
}

/// Reads a `key,class` CSV as spreadsheets, Python's `csv` module, R and pandas write
/// it: RFC 4180 quoting, a UTF-8 byte-order mark or none, CRLF or LF line ends,
/// surrounding spaces trimmed, blank lines skipped (the `csv` crate). Every row must
/// have two fields. The first row is returned like the others: whether it is a header
/// is decided by the caller, which knows the image names.
///
/// # Errors
/// Unreadable file, malformed CSV, a row without exactly two fields or with an empty
/// field: each names the file and line.
pub fn read_csv_labels(path: &Path) -> Result<Vec<LabelRow>, SourceError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let body = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let bad = |line: u64, msg: String| SourceError::Labels {
        path: path.to_path_buf(),
        line: line as usize,
        msg,
    };
    let mut rd = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(body);
    let mut rows = Vec::new();
    for rec in rd.records() {
        let rec = rec.map_err(|e| {
            let line = e.position().map(|p| p.line()).unwrap_or(0);
            bad(line, format!("not valid CSV: {e}"))
        })?;
        let line = rec.position().map(|p| p.line()).unwrap_or(0);
        if rec.iter().all(str::is_empty) {
            continue;
        }
        if rec.len() != 2 {
            return Err(bad(
                line,
                format!(
                    "expected 2 fields `key,class`, got {}: {:?} (quote a field that holds a comma)",
                    rec.len(),
                    rec.iter().collect::<Vec<_>>()
                ),
            ));
        }
        let (k, c) = (&rec[0], &rec[1]);
        if k.is_empty() || c.is_empty() {
            return Err(bad(line, format!("empty key or class: {k:?},{c:?}")));
        }
        rows.push(LabelRow {
            line,
            key: k.to_string(),
            class: c.to_string(),
        });
    }
    Ok(rows)
}

/// Reads `path`: a CSV when its first line holds a comma, else ILSVRC ground truth
/// mapped through `synsets` (line k: the WNID of class id k).
///
/// # Errors
/// An unreadable file; ground truth without `synsets`; a line that is not a class id or
/// one outside the synset list (naming the file and line); CSV errors as
/// [`read_csv_labels`].
pub(super) fn read_labels(path: &Path, synsets: Option<&Path>) -> Result<LabelFile, SourceError> {
    let text = String::from_utf8_lossy(&std::fs::read(path).map_err(io_err(path))?).into_owned();
    let lines: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim_start_matches('\u{feff}').trim()))
        .filter(|(_, l)| !l.is_empty())
        .collect();
    let first = lines.first().map(|(_, l)| *l).unwrap_or("");
    if first.contains(',') {
        return Ok(LabelFile::Csv(read_csv_labels(path)?));
    }
    // ILSVRC2012 ground truth: 1-based class ids, one per line.
    let Some(syn_path) = synsets else {
        return Err(SourceError::Invalid(format!(
            "{} is not a `key,class` CSV; an ILSVRC-style ground-truth file (class ids) needs --synsets",
            path.display()
        )));
    };
    let syn_text = std::fs::read_to_string(syn_path).map_err(io_err(syn_path))?;
    let wnids: Vec<String> = syn_text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    let mut labels = Vec::with_capacity(lines.len());
    for (n, l) in &lines {
        let id: usize = l.parse().map_err(|_| SourceError::Labels {
            path: path.to_path_buf(),
            line: *n,
            msg: format!("expected a class id, got {l:?}"),
        })?;
        if id == 0 || id > wnids.len() {
            return Err(SourceError::Labels {
                path: path.to_path_buf(),
                line: *n,
                msg: format!(
                    "class id {id} outside 1..={} ({})",
                    wnids.len(),
                    syn_path.display()
                ),
            });
        }
        labels.push(wnids[id - 1].clone());
    }
    Ok(LabelFile::Ordered(labels, wnids))
}
