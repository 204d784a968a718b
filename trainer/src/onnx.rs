//! ONNX export of a trained encoder, and inference through ONNX Runtime.
//!
//! The exported graph is the online encoder in inference form: input `pixels`
//! (`[N, 3, S, S]` float32 in [0, 1], the un-augmented image resized to the training size
//! S), the training normalisation (Sub/Div), every convolution with its BatchNorm folded
//! in (`W·γ/√(σ²+ε)`, `β − μ·γ/√(σ²+ε)`), ReLU, the stem max-pool when the encoder has one,
//! residual Adds, GlobalAveragePool and Flatten; output `embedding` (`[N, D]`). The
//! file is written with a small protobuf writer (ONNX IR 8, opset 17); metadata keys
//! `byol.*` record the run, step, canvas and size.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::{Kind, Tensor};

use crate::byol::Network;
use crate::config::TrainConfig;

/// A protobuf message being written (wire format: varint keys, varints, length-delimited).
#[derive(Default)]
struct Pb(Vec<u8>);

impl Pb {
    fn varint(&mut self, mut v: u64) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                self.0.push(b);
                return;
            }
            self.0.push(b | 0x80);
        }
    }
    fn key(&mut self, field: u32, wire: u32) {
        self.varint(((field << 3) | wire) as u64);
    }
    fn int(&mut self, field: u32, v: i64) -> &mut Pb {
        self.key(field, 0);
        self.varint(v as u64);
        self
    }
    fn bytes(&mut self, field: u32, b: &[u8]) -> &mut Pb {
        self.key(field, 2);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
        self
    }
    fn str(&mut self, field: u32, s: &str) -> &mut Pb {
        self.bytes(field, s.as_bytes())
    }
    fn msg(&mut self, field: u32, m: &Pb) -> &mut Pb {
        self.bytes(field, &m.0)
    }
}

// ONNX field numbers (onnx.proto).
const FLOAT: i64 = 1; // TensorProto.DataType.FLOAT
const ATTR_INT: i64 = 2;
const ATTR_INTS: i64 = 7;

fn attr_ints(name: &str, v: &[i64]) -> Pb {
    let mut a = Pb::default();
    a.str(1, name);
    for &x in v {
        a.int(8, x);
    }
    a.int(20, ATTR_INTS);
    a
}

fn attr_int(name: &str, v: i64) -> Pb {
    let mut a = Pb::default();
    a.str(1, name).int(3, v).int(20, ATTR_INT);
    a
}

/// `ValueInfoProto` of a float tensor; `None` dimensions are the symbolic batch size.
fn value_info(name: &str, dims: &[Option<i64>]) -> Pb {
    let mut shape = Pb::default();
    for d in dims {
        let mut dim = Pb::default();
        match d {
            Some(v) => dim.int(1, *v),
            None => dim.str(2, "batch"),
        };
        shape.msg(1, &dim);
    }
    let mut tt = Pb::default();
    tt.int(1, FLOAT).msg(2, &shape);
    let mut ty = Pb::default();
    ty.msg(1, &tt);
    let mut vi = Pb::default();
    vi.str(1, name).msg(2, &ty);
    vi
}

struct Graph {
    nodes: Vec<Pb>,
    inits: Vec<Pb>,
    count: usize,
}

impl Graph {
    /// Adds a float32 initializer.
    fn init(&mut self, name: &str, t: &Tensor) -> String {
        let t = t
            .to_kind(Kind::Float)
            .contiguous()
            .to_device(tch::Device::Cpu);
        let data = Vec::<f32>::try_from(t.flatten(0, -1)).unwrap_or_default();
        let mut tp = Pb::default();
        for d in t.size() {
            tp.int(1, d);
        }
        tp.int(2, FLOAT).str(8, name);
        let raw: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        tp.bytes(9, &raw);
        self.inits.push(tp);
        name.to_string()
    }

    /// Adds a node; returns its output name.
    fn node(&mut self, op: &str, inputs: &[&str], attrs: &[Pb], out: Option<&str>) -> String {
        self.count += 1;
        let output = out
            .map(str::to_string)
            .unwrap_or_else(|| format!("{}_{}", op.to_lowercase(), self.count));
        let mut n = Pb::default();
        for i in inputs {
            n.str(1, i);
        }
        n.str(2, &output)
            .str(3, &format!("{op}_{}", self.count))
            .str(4, op);
        for a in attrs {
            n.msg(5, a);
        }
        self.nodes.push(n);
        output
    }
}

/// What `export` wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportInfo {
    pub path: String,
    pub size: i64,
    pub dim: i64,
    pub convs: usize,
    pub bytes: u64,
}

/// Writes the online encoder of `net` (eval mode) as ONNX to `path` (atomically).
pub fn export(
    net: &Network,
    cfg: &TrainConfig,
    path: &Path,
    meta: &[(&str, String)],
) -> Result<ExportInfo> {
    let vars: HashMap<String, Tensor> = net.vs.variables();
    let get = |k: &str| -> Result<Tensor> {
        vars.get(k)
            .map(|t| t.detach().to_kind(Kind::Float).to_device(tch::Device::Cpu))
            .with_context(|| format!("the network has no variable {k}"))
    };
    let mut g = Graph {
        nodes: Vec::new(),
        inits: Vec::new(),
        count: 0,
    };
    let mut convs = 0;
    // A convolution with the BatchNorm that follows it folded in.
    let mut conv_bn =
        |g: &mut Graph, x: &str, conv: &str, bn: &str, stride: i64| -> Result<String> {
            let w = get(&format!("{conv}.weight"))?;
            let gamma = get(&format!("{bn}.weight"))?;
            let beta = get(&format!("{bn}.bias"))?;
            let mean = get(&format!("{bn}.running_mean"))?;
            let var = get(&format!("{bn}.running_var"))?;
            let scale = &gamma / (var + 1e-5).sqrt();
            let wf = &w * scale.view([-1, 1, 1, 1]);
            let bf = beta - mean * &scale;
            let k = w.size()[2];
            let wn = g.init(&format!("{conv}.weight"), &wf);
            let bname = g.init(&format!("{conv}.bias"), &bf);
            convs += 1;
            Ok(g.node(
                "Conv",
                &[x, &wn, &bname],
                &[
                    attr_ints("kernel_shape", &[k, k]),
                    attr_ints("strides", &[stride, stride]),
                    attr_ints("pads", &[k / 2, k / 2, k / 2, k / 2]),
                ],
                None,
            ))
        };

    let size = cfg.augment.size;
    let mean = Tensor::from_slice(&cfg.augment.mean.map(|v| v as f32)).view([1, 3, 1, 1]);
    let std = Tensor::from_slice(&cfg.augment.std.map(|v| v as f32)).view([1, 3, 1, 1]);
    let mean = g.init("normalize.mean", &mean);
    let std = g.init("normalize.std", &std);
    let x = g.node("Sub", &["pixels", &mean], &[], None);
    let x = g.node("Div", &[&x, &std], &[], None);

    let enc = &cfg.model.encoder;
    let stem_stride = if enc.cifar_stem { 1 } else { 2 };
    let x = conv_bn(&mut g, &x, "encoder.conv1", "encoder.bn1", stem_stride)?;
    let mut x = g.node("Relu", &[&x], &[], None);
    if enc.stem_pool.unwrap_or(!enc.cifar_stem) {
        x = g.node(
            "MaxPool",
            &[&x],
            &[
                attr_ints("kernel_shape", &[3, 3]),
                attr_ints("strides", &[2, 2]),
                attr_ints("pads", &[1, 1, 1, 1]),
            ],
            None,
        );
    }
    let mut dim = 0;
    for layer in 1..=4 {
        let mut b = 0;
        while vars.contains_key(&format!("encoder.layer{layer}.{b}.conv1.weight")) {
            let p = format!("encoder.layer{layer}.{b}");
            let stride = if b == 0 && layer > 1 { 2 } else { 1 };
            let bottleneck = vars.contains_key(&format!("{p}.conv3.weight"));
            let y = if bottleneck {
                let y = conv_bn(&mut g, &x, &format!("{p}.conv1"), &format!("{p}.bn1"), 1)?;
                let y = g.node("Relu", &[&y], &[], None);
                let y = conv_bn(
                    &mut g,
                    &y,
                    &format!("{p}.conv2"),
                    &format!("{p}.bn2"),
                    stride,
                )?;
                let y = g.node("Relu", &[&y], &[], None);
                conv_bn(&mut g, &y, &format!("{p}.conv3"), &format!("{p}.bn3"), 1)?
            } else {
                let y = conv_bn(
                    &mut g,
                    &x,
                    &format!("{p}.conv1"),
                    &format!("{p}.bn1"),
                    stride,
                )?;
                let y = g.node("Relu", &[&y], &[], None);
                conv_bn(&mut g, &y, &format!("{p}.conv2"), &format!("{p}.bn2"), 1)?
            };
            let last = if bottleneck { "conv3" } else { "conv2" };
            dim = get(&format!("{p}.{last}.weight"))?.size()[0];
            let shortcut = if vars.contains_key(&format!("{p}.downsample.0.weight")) {
                conv_bn(
                    &mut g,
                    &x,
                    &format!("{p}.downsample.0"),
                    &format!("{p}.downsample.1"),
                    stride,
                )?
            } else {
                x.clone()
            };
            let s = g.node("Add", &[&y, &shortcut], &[], None);
            x = g.node("Relu", &[&s], &[], None);
            b += 1;
        }
        if b == 0 {
            bail!("the network has no encoder.layer{layer}: not a ResNet encoder");
        }
    }
    let x = g.node("GlobalAveragePool", &[&x], &[], None);
    g.node("Flatten", &[&x], &[attr_int("axis", 1)], Some("embedding"));

    let mut graph = Pb::default();
    for n in &g.nodes {
        graph.msg(1, n);
    }
    graph.str(2, "byol_encoder");
    for i in &g.inits {
        graph.msg(5, i);
    }
    graph.msg(
        11,
        &value_info("pixels", &[None, Some(3), Some(size), Some(size)]),
    );
    graph.msg(12, &value_info("embedding", &[None, Some(dim)]));

    let mut model = Pb::default();
    model.int(1, 8); // IR version 8
    model.str(2, "byol").str(3, env!("CARGO_PKG_VERSION"));
    let mut opset = Pb::default();
    opset.int(2, 17);
    model.msg(8, &opset);
    model.msg(7, &graph);
    let mut entries: Vec<(&str, String)> = vec![
        ("byol.size", size.to_string()),
        ("byol.canvas", cfg.data.canvas.to_string()),
        ("byol.dim", dim.to_string()),
        (
            "byol.input",
            "pixels: float32 [N,3,size,size] in [0,1], RGB".into(),
        ),
    ];
    entries.extend(meta.iter().cloned());
    for (k, v) in entries {
        let mut e = Pb::default();
        e.str(1, k).str(2, &v);
        model.msg(14, &e);
    }

    let tmp = path.with_extension("onnx.tmp");
    std::fs::write(&tmp, &model.0).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(ExportInfo {
        path: path.display().to_string(),
        size,
        dim,
        convs,
        bytes: model.0.len() as u64,
    })
}

/// An exported encoder loaded in ONNX Runtime.
pub struct OnnxEncoder {
    _env: ort::environment::Environment,
    session: ort::session::Session,
    /// Input side S (`pixels` is `[N, 3, S, S]`).
    pub size: i64,
    /// Output dimension.
    pub dim: i64,
    /// `byol.canvas` from the model's metadata (decode canvas used in training).
    pub canvas: Option<usize>,
}

impl OnnxEncoder {
    /// Loads `path` with the ONNX Runtime library found by [`crate::runtime::ort_library`].
    pub fn load(path: &Path, ort_lib: Option<&Path>, threads: usize) -> Result<OnnxEncoder> {
        let lib = crate::runtime::ort_library(ort_lib)?;
        let env = ort::init_from(&lib)
            .with_context(|| format!("loading ONNX Runtime from {}", lib.display()))?
            .with_name("byol")
            .build()?;
        let mut builder = ort::session::Session::builder(&env)?;
        if threads > 0 {
            builder = builder
                .with_intra_threads(threads)
                .map_err(|e| anyhow::anyhow!("ONNX Runtime session options: {e}"))?;
        }
        let session = builder
            .commit_from_file(path)
            .with_context(|| format!("loading {}", path.display()))?;
        let shape = |outlets: &[ort::value::Outlet], name: &str| -> Result<Vec<i64>> {
            let o = outlets
                .iter()
                .find(|o| o.name() == name)
                .with_context(|| format!("{}: no {name:?} in the model", path.display()))?;
            Ok(o.dtype()
                .tensor_shape()
                .with_context(|| format!("{}: {name:?} is not a tensor", path.display()))?
                .to_vec())
        };
        let ins = shape(session.inputs(), "pixels")?;
        let outs = shape(session.outputs(), "embedding")?;
        if ins.len() != 4 || ins[1] != 3 || ins[2] <= 0 || ins[2] != ins[3] || outs.len() != 2 {
            bail!(
                "{}: expected pixels [N,3,S,S] and embedding [N,D], found {ins:?} and {outs:?}",
                path.display()
            );
        }
        let canvas = session
            .metadata()
            .ok()
            .and_then(|m| m.custom("byol.canvas"))
            .and_then(|v| v.parse().ok());
        Ok(OnnxEncoder {
            _env: env,
            size: ins[2],
            dim: outs[1],
            canvas,
            session,
        })
    }

    /// Embeddings of `x` (`[N, 3, S, S]`, float in [0, 1]) as `[N, D]` float32 (CPU).
    pub fn embed(&mut self, x: &Tensor) -> Result<Tensor> {
        let x = x
            .to_kind(Kind::Float)
            .contiguous()
            .to_device(tch::Device::Cpu);
        let shape = x.size();
        let data = Vec::<f32>::try_from(x.flatten(0, -1))?;
        let input = ort::value::Tensor::from_array((shape.clone(), data))?;
        let out = self.session.run(ort::inputs!["pixels" => input])?;
        let (s, v) = out["embedding"].try_extract_tensor::<f32>()?;
        let dims: Vec<i64> = s.to_vec();
        Ok(Tensor::from_slice(v).view(dims.as_slice()))
    }
}

/// What `byol export` did: the file and the ONNX Runtime check against libtorch.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportReport {
    pub command: String,
    pub run: String,
    pub checkpoint: String,
    pub step: u64,
    #[serde(flatten)]
    pub file: ExportInfo,
    /// Images compared (`--check-data` images, or random ones).
    pub check_images: usize,
    pub check_source: String,
    /// max |ONNX Runtime − libtorch| over all embedding values, and max |libtorch|.
    pub max_abs_diff: f64,
    pub max_abs_value: f64,
    /// Smallest cosine similarity between an ONNX Runtime embedding and libtorch's.
    pub min_cosine: f64,
    pub libtorch_ms_per_image: f64,
    pub ort_ms_per_image: f64,
    pub ort_library: String,
}

/// Tolerance of the export check: |ORT − libtorch| ≤ `EXPORT_TOL`·max(1, max |libtorch|).
pub const EXPORT_TOL: f64 = 1e-3;

/// Exports the online encoder `t` (loaded from `run`) to `out`, then loads the file in
/// ONNX Runtime and compares its embeddings with libtorch's on `check` inputs
/// (`[N,3,S,S]` uint8; random images when `None`). The file is renamed into place only
/// when the check passes.
pub fn export_run(
    run: &Path,
    t: &crate::eval::TrainedOnline,
    out: &Path,
    check: Option<(Tensor, String)>,
    ort_lib: Option<&Path>,
) -> Result<ExportReport> {
    let size = t.cfg.augment.size;
    let tmp = out.with_extension("onnx.partial");
    let meta = [
        ("byol.run", run.display().to_string()),
        ("byol.checkpoint", t.checkpoint.display().to_string()),
        ("byol.step", t.step.to_string()),
    ];
    let mut info = export(&t.net, &t.cfg, &tmp, &meta)?;
    let (x, source) = check.unwrap_or_else(|| {
        tch::manual_seed(0);
        (
            Tensor::randint(256, [64, 3, size, size], (Kind::Uint8, tch::Device::Cpu)),
            "random images".into(),
        )
    });
    let n = x.size()[0] as usize;
    let t0 = std::time::Instant::now();
    let reference = crate::eval::features(&t.net, &x, &t.cfg, t.device);
    let torch_s = t0.elapsed().as_secs_f64();
    let mut enc = OnnxEncoder::load(&tmp, ort_lib, 0)?;
    let t1 = std::time::Instant::now();
    let mut chunks = Vec::new();
    for c in x.split(256, 0) {
        chunks.push(enc.embed(&(c.to_kind(Kind::Float) / 255.0))?);
    }
    let ort_s = t1.elapsed().as_secs_f64();
    let got = Tensor::cat(&chunks, 0);
    let diff = (&got - &reference).abs().max().double_value(&[]);
    let scale = reference.abs().max().double_value(&[]);
    let cos = Tensor::cosine_similarity(&got, &reference, 1, 1e-8)
        .min()
        .double_value(&[]);
    if diff.is_nan() || diff > EXPORT_TOL * scale.max(1.0) {
        let _ = std::fs::remove_file(&tmp);
        bail!(
            "ONNX Runtime disagrees with libtorch on {n} {source}: max |diff| {diff:.3e} \
             (max |value| {scale:.3e}, tolerance {EXPORT_TOL:.0e} relative); {} not written",
            out.display()
        );
    }
    std::fs::rename(&tmp, out).with_context(|| format!("renaming to {}", out.display()))?;
    info.path = out.display().to_string();
    Ok(ExportReport {
        command: "export".into(),
        run: run.display().to_string(),
        checkpoint: t.checkpoint.display().to_string(),
        step: t.step,
        file: info,
        check_images: n,
        check_source: source,
        max_abs_diff: diff,
        max_abs_value: scale,
        min_cosine: cos,
        libtorch_ms_per_image: 1e3 * torch_s / n as f64,
        ort_ms_per_image: 1e3 * ort_s / n as f64,
        ort_library: crate::runtime::ort_library(ort_lib)?.display().to_string(),
    })
}

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
    let tmp = out.with_extension("parquet.partial");
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, schema.clone(), None)?;
    let mut bar = byol_tools::progress::Progress::new(
        byol_tools::progress::Mode::detect(true),
        "embed",
        total,
        "images",
        0,
    );
    let mut seen = vec![false; total as usize];
    let mut written = 0u64;
    let write_all = || -> Result<()> {
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
    if let Err(e) = write_all() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("embedding {}", data.display())));
    }
    bar.finish();
    std::fs::rename(&tmp, out).with_context(|| format!("renaming to {}", out.display()))?;
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
