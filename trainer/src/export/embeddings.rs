//! `byol embed`: every image of a shard folder through an exported encoder, into a
//! Parquet file (row, key, label, embedding).

use std::path::Path;

use crate::error::{Context, Result};
use tch::Kind;

use super::onnx_runtime::OnnxEncoder;

/// What `byol embed` wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EmbedReport {
    pub command: String,
    pub model: String,
    pub data: String,
    pub out: String,
    pub rows: u64,
    pub dim: i64,
    /// Rows of the dataset with no embedding (their image failed to decode), with keys.
    pub missing: u64,
    pub missing_keys: Vec<String>,
    pub seconds: f64,
    pub images_per_s: f64,
}

/// Embeds every image of the shard folder `data` with the ONNX encoder `model` and writes
/// `out` (Parquet: `row` UInt64, `key` Utf8, `label` Int32, `embedding`
/// FixedSizeList<Float32, D>), through a temporary name.
///
/// # Shapes
/// Writes one `D`-float embedding per decoded image.
///
/// # Errors
/// The model or the shards cannot be loaded, the model has no canvas and none is given, or the Parquet file cannot be written (it is then left unwritten).
pub fn embed(
    model: &Path,
    data: &Path,
    out: &Path,
    decode: byol_pipeline::loader::DecodeFn,
    batch: usize,
    canvas: Option<usize>,
    ort_lib: Option<&Path>,
) -> Result<EmbedReport> {
    use arrow_array::{
        builder::{FixedSizeListBuilder, Float32Builder},
        Array, ArrayRef, Int32Array, RecordBatch, StringArray, UInt64Array,
    };
    use arrow_schema::{DataType, Field, Schema};
    use std::sync::Arc;

    let t0 = std::time::Instant::now();
    let mut enc = OnnxEncoder::load(model, ort_lib, 0)?;
    let canvas = canvas.or(enc.canvas).with_context(|| {
        format!(
            "{} has no byol.canvas metadata; pass --canvas",
            model.display()
        )
    })?;
    let ds = byol_pipeline::Dataset::open(data)
        .with_context(|| format!("opening {}", data.display()))?;
    let mut keys: Vec<String> = Vec::with_capacity(ds.rows() as usize);
    for i in 0..ds.groups().len() {
        let g = ds.load_group(i)?;
        keys.extend((0..g.keys.len()).map(|r| g.keys.value(r).to_string()));
    }
    let total = ds.rows();
    let lc = byol_pipeline::LoaderConfig {
        batch,
        canvas,
        drop_last: false,
        pin_memory: false,
        ..byol_pipeline::LoaderConfig::default()
    };
    let loader = byol_pipeline::Loader::new(ds, lc, decode)?;
    let dim = enc.dim as i32;
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    let schema = Arc::new(Schema::new(vec![
        Field::new("row", DataType::UInt64, false),
        Field::new("key", DataType::Utf8, false),
        Field::new("label", DataType::Int32, false),
        Field::new(
            "embedding",
            DataType::FixedSizeList(item.clone(), dim),
            false,
        ),
    ]));
    let mut bar = byol_format::progress::Progress::new(
        byol_format::progress::Mode::detect(true),
        "embed",
        total,
        "images",
        0,
    );
    let mut seen = vec![false; total as usize];
    let mut written = 0u64;
    let mut write_all = |tmp: &Path| -> Result<()> {
        let file =
            std::fs::File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut writer = parquet::arrow::ArrowWriter::try_new(file, schema.clone(), None)?;
        for b in loader.start(byol_pipeline::Cursor::default()) {
            let b = b?;
            let x = crate::eval::centred_inputs(&b, enc.size).to_kind(Kind::Float) / 255.0;
            let e = enc.embed(&x)?;
            let values = Vec::<f32>::try_from(e.flatten(0, -1))?;
            // A sample whose image failed to decode is a replacement (a copy of another
            // row, or a blank canvas): it gets no row; its own row is reported missing.
            let keep: Vec<usize> = (0..b.len())
                .filter(|&i| !b.replaced_mask()[i])
                .filter(|&i| !std::mem::replace(&mut seen[b.rows()[i] as usize], true))
                .collect();
            let mut list =
                FixedSizeListBuilder::new(Float32Builder::new(), dim).with_field(item.clone());
            for &i in &keep {
                let d = dim as usize;
                list.values().append_slice(&values[i * d..(i + 1) * d]);
                list.append(true);
            }
            let cols: Vec<ArrayRef> = vec![
                Arc::new(UInt64Array::from_iter_values(
                    keep.iter().map(|&i| b.rows()[i]),
                )),
                Arc::new(StringArray::from_iter_values(
                    keep.iter().map(|&i| keys[b.rows()[i] as usize].as_str()),
                )),
                Arc::new(Int32Array::from_iter_values(
                    keep.iter().map(|&i| b.labels()[i] as i32),
                )),
                Arc::new(list.finish()),
            ];
            debug_assert!(cols.iter().all(|c| c.len() == keep.len()));
            writer.write(&RecordBatch::try_new(schema.clone(), cols)?)?;
            written += keep.len() as u64;
            bar.set_position(written);
        }
        writer.close()?;
        Ok(())
    };
    byol_format::fs::write_atomic_with(out, |tmp| {
        write_all(tmp).with_context(|| format!("embedding {}", data.display()))
    })?;
    bar.finish();
    let missing_keys: Vec<String> = seen
        .iter()
        .enumerate()
        .filter(|(_, &s)| !s)
        .map(|(r, _)| keys[r].clone())
        .collect();
    let secs = t0.elapsed().as_secs_f64();
    Ok(EmbedReport {
        command: "embed".into(),
        model: model.display().to_string(),
        data: data.display().to_string(),
        out: out.display().to_string(),
        rows: written,
        dim: enc.dim,
        missing: missing_keys.len() as u64,
        missing_keys: missing_keys.into_iter().take(100).collect(),
        seconds: secs,
        images_per_s: written as f64 / secs.max(1e-9),
    })
}
