//! `byol embed` and `byol predict`: every image of a shard folder through an exported
//! model, into a Parquet file (row, key, label, then the embedding, or a classifier's
//! top-k classes with their probabilities).

use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::{FixedSizeListBuilder, Float32Builder, Int32Builder, StringBuilder};
use arrow_array::{Array, ArrayRef, Int32Array, RecordBatch, StringArray, UInt64Array};
use arrow_schema::{DataType, Field, Schema};
use tch::{Kind, Tensor};

use crate::error::{Context, Result};

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
    /// `byol predict`: classes ranked per image (absent for embeddings).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    /// Rows of the dataset with no embedding (their image failed to decode), with keys.
    pub missing: u64,
    pub missing_keys: Vec<String>,
    pub seconds: f64,
    pub images_per_s: f64,
}

/// What a row holds besides `row`, `key` and `label`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// `embedding` FixedSizeList<Float32, D>.
    Embeddings,
    /// A classifier's `k` most probable classes (softmax of the logits), most probable
    /// first: `predicted` Utf8 (the first's name), `top_classes` FixedSizeList<Utf8, k>,
    /// `top_indices` FixedSizeList<Int32, k>, `top_probabilities`
    /// FixedSizeList<Float32, k>.
    TopK(usize),
}

/// Embeds every image of the shard folder `data` with the ONNX model `model` and writes
/// `out` (Parquet: `row` UInt64, `key` Utf8, `label` Int32, then the columns of
/// `output`), through a temporary name.
///
/// # Shapes
/// Writes one `D`-float embedding (or `k` classes) per decoded image.
///
/// # Errors
/// The model or the shards cannot be loaded, the model has no canvas and none is given,
/// top-k of a model without `logits`, or the Parquet file cannot be written (it is then
/// left unwritten).
pub fn embed(
    (model, data, out): (&Path, &Path, &Path),
    decode: byol_pipeline::loader::DecodeFn,
    (batch, canvas): (usize, Option<usize>),
    ort_lib: Option<&Path>,
    output: Output,
) -> Result<EmbedReport> {
    let t0 = std::time::Instant::now();
    let mut enc = OnnxEncoder::load(model, ort_lib, 0)?;
    let top_k = match output {
        Output::Embeddings => None,
        Output::TopK(k) => {
            let Some(classes) = enc.classes.as_ref() else {
                crate::bail!(
                    "{} is an encoder (no logits output); predictions need a classifier exported from a `byol finetune` run",
                    model.display()
                );
            };
            Some(k.clamp(1, classes.len().max(1)))
        }
    };
    let canvas = canvas.or(enc.canvas).with_context(|| {
        format!(
            "{} has no byol.canvas metadata; pass --canvas",
            model.display()
        )
    })?;
    let ds = byol_pipeline::Dataset::open(data)
        .with_context(|| format!("opening {}", data.display()))?;
    let (keys, _) = ds.keys_and_labels()?;
    let total = ds.rows();
    let lc = byol_pipeline::LoaderConfig {
        batch,
        canvas,
        drop_last: false,
        pin_memory: false,
        ..byol_pipeline::LoaderConfig::default()
    };
    let loader = byol_pipeline::Loader::new(ds, lc, decode)?;
    let columns = Columns {
        top_k,
        dim: enc.dim as i32,
        classes: enc.classes.clone().unwrap_or_default(),
    };
    let schema = Arc::new(Schema::new(columns.fields()));
    let mut bar = byol_format::progress::Progress::new(
        byol_format::progress::Mode::detect(true),
        if top_k.is_some() { "predict" } else { "embed" },
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
            let (e, logits) = enc.run(&x)?;
            // A sample whose image failed to decode is a replacement (a copy of another
            // row, or a blank canvas): it gets no row; its own row is reported missing.
            let keep: Vec<usize> = (0..b.len())
                .filter(|&i| !b.replaced_mask()[i])
                .filter(|&i| !std::mem::replace(&mut seen[b.rows()[i] as usize], true))
                .collect();
            let mut cols: Vec<ArrayRef> = vec![
                Arc::new(UInt64Array::from_iter_values(
                    keep.iter().map(|&i| b.rows()[i]),
                )),
                Arc::new(StringArray::from_iter_values(
                    keep.iter().map(|&i| keys[b.rows()[i] as usize].as_str()),
                )),
                Arc::new(Int32Array::from_iter_values(
                    keep.iter().map(|&i| b.labels()[i] as i32),
                )),
            ];
            cols.extend(columns.results(&e, logits.as_ref(), &keep)?);
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
        command: if top_k.is_some() { "predict" } else { "embed" }.into(),
        model: model.display().to_string(),
        data: data.display().to_string(),
        out: out.display().to_string(),
        rows: written,
        dim: enc.dim,
        top_k,
        missing: missing_keys.len() as u64,
        missing_keys: missing_keys.into_iter().take(100).collect(),
        seconds: secs,
        images_per_s: written as f64 / secs.max(1e-9),
    })
}

/// The columns after `row`, `key` and `label` (see [`Output`]).
struct Columns {
    top_k: Option<usize>,
    dim: i32,
    classes: Vec<String>,
}

/// A list item field of `ty`.
fn item(ty: DataType) -> Arc<Field> {
    Arc::new(Field::new("item", ty, false))
}

impl Columns {
    fn fields(&self) -> Vec<Field> {
        let mut fields = vec![
            Field::new("row", DataType::UInt64, false),
            Field::new("key", DataType::Utf8, false),
            Field::new("label", DataType::Int32, false),
        ];
        let list = |name: &str, ty: DataType, n: i32| {
            Field::new(name, DataType::FixedSizeList(item(ty), n), false)
        };
        match self.top_k {
            None => fields.push(list("embedding", DataType::Float32, self.dim)),
            Some(k) => fields.extend([
                Field::new("predicted", DataType::Utf8, false),
                list("top_classes", DataType::Utf8, k as i32),
                list("top_indices", DataType::Int32, k as i32),
                list("top_probabilities", DataType::Float32, k as i32),
            ]),
        }
        fields
    }

    /// The rows `keep` of a batch's embeddings `e` (`[N, D]`) or, for top-k, its
    /// `logits` (`[N, K]`).
    fn results(
        &self,
        e: &Tensor,
        logits: Option<&Tensor>,
        keep: &[usize],
    ) -> Result<Vec<ArrayRef>> {
        let (Some(k), Some(logits)) = (self.top_k, logits) else {
            let values = Vec::<f32>::try_from(e.flatten(0, -1))?;
            let d = self.dim as usize;
            let mut list = FixedSizeListBuilder::new(Float32Builder::new(), self.dim)
                .with_field(item(DataType::Float32));
            for &i in keep {
                list.values().append_slice(&values[i * d..(i + 1) * d]);
                list.append(true);
            }
            return Ok(vec![Arc::new(list.finish())]);
        };
        let (p, idx) = logits.softmax(1, Kind::Float).topk(k as i64, 1, true, true);
        let p = Vec::<f32>::try_from(p.flatten(0, -1))?;
        let idx = Vec::<i64>::try_from(idx.flatten(0, -1))?;
        let k32 = k as i32;
        let mut names =
            FixedSizeListBuilder::new(StringBuilder::new(), k32).with_field(item(DataType::Utf8));
        let mut ids =
            FixedSizeListBuilder::new(Int32Builder::new(), k32).with_field(item(DataType::Int32));
        let mut probs = FixedSizeListBuilder::new(Float32Builder::new(), k32)
            .with_field(item(DataType::Float32));
        let name = |c: i64| self.classes.get(c as usize).map_or("", String::as_str);
        for &i in keep {
            for &c in &idx[i * k..(i + 1) * k] {
                names.values().append_value(name(c));
                ids.values().append_value(c as i32);
            }
            probs.values().append_slice(&p[i * k..(i + 1) * k]);
            names.append(true);
            ids.append(true);
            probs.append(true);
        }
        let predicted = StringArray::from_iter_values(keep.iter().map(|&i| name(idx[i * k])));
        Ok(vec![
            Arc::new(predicted),
            Arc::new(names.finish()),
            Arc::new(ids.finish()),
            Arc::new(probs.finish()),
        ])
    }
}
