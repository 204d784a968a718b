//! The exported graph: the online encoder in inference form, every convolution with its
//! BatchNorm folded in (`W·γ/√(σ²+ε)`, `β − μ·γ/√(σ²+ε)`), written as an ONNX model.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{Context, Result};
use tch::{Kind, Tensor};

use super::proto::{
    attribute, graph, model, node, operator_set_id, string_entry, tensor, value_info, Pb,
};
use crate::config::{EncoderConfig, TrainConfig};

fn attr_ints(name: &str, v: &[i64]) -> Pb {
    let mut a = Pb::default();
    a.str(attribute::NAME, name);
    for &x in v {
        a.int(attribute::INTS, x);
    }
    a.int(attribute::TYPE, attribute::TYPE_INTS);
    a
}

fn attr_int(name: &str, v: i64) -> Pb {
    let mut a = Pb::default();
    a.str(attribute::NAME, name)
        .int(attribute::I, v)
        .int(attribute::TYPE, attribute::TYPE_INT);
    a
}

/// `ValueInfoProto` of a float tensor; `None` dimensions are the symbolic batch size.
fn value_info(name: &str, dims: &[Option<i64>]) -> Pb {
    let mut shape = Pb::default();
    for d in dims {
        let mut dim = Pb::default();
        match d {
            Some(v) => dim.int(value_info::DIM_VALUE, *v),
            None => dim.str(value_info::DIM_PARAM, "batch"),
        };
        shape.msg(value_info::DIM, &dim);
    }
    let mut tt = Pb::default();
    tt.int(value_info::ELEM_TYPE, tensor::FLOAT)
        .msg(value_info::SHAPE, &shape);
    let mut ty = Pb::default();
    ty.msg(value_info::TENSOR_TYPE, &tt);
    let mut vi = Pb::default();
    vi.str(value_info::NAME, name).msg(value_info::TYPE, &ty);
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
            tp.int(tensor::DIMS, d);
        }
        tp.int(tensor::DATA_TYPE, tensor::FLOAT)
            .str(tensor::NAME, name);
        let raw: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        tp.bytes(tensor::RAW_DATA, &raw);
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
            n.str(node::INPUT, i);
        }
        n.str(node::OUTPUT, &output)
            .str(node::NAME, &format!("{op}_{}", self.count))
            .str(node::OP_TYPE, op);
        for a in attrs {
            n.msg(node::ATTRIBUTE, a);
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
    /// Outputs of the classifier's `logits` (absent for an encoder).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub classes: Option<i64>,
    pub convs: usize,
    pub bytes: u64,
}

/// Writes the encoder among `vs`'s variables (`encoder.*`, eval mode) as ONNX to `path`
/// (atomically); with a linear head (`fc.*`: a fine-tuned classifier) the model has a
/// second output `logits` `[N, K]` and the class names in its metadata
/// (`byol.classes`, a JSON list).
///
/// # Errors
/// The network is not a ResNet encoder of the expected layout (a variable is missing), or the file cannot be written.
pub fn export(
    vs: &tch::nn::VarStore,
    cfg: &TrainConfig,
    path: &Path,
    meta: &[(&str, String)],
) -> Result<ExportInfo> {
    let vars: HashMap<String, Tensor> = vs.variables();
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
    let (_, stem_stride, _) = enc.stem_conv();
    let x = conv_bn(&mut g, &x, "encoder.conv1", "encoder.bn1", stem_stride)?;
    let mut x = g.node("Relu", &[&x], &[], None);
    if enc.stem_pool() {
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
    let (stages, bottleneck) = enc.stages();
    for (stage, &blocks) in stages.iter().enumerate() {
        for b in 0..blocks {
            let p = format!("encoder.layer{}.{b}", stage + 1);
            let stride = EncoderConfig::block_stride(stage, b);
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
            // The block has a projection shortcut when it changes the stride or the
            // channels (as `model::Block` builds it).
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
        }
    }
    let x = g.node("GlobalAveragePool", &[&x], &[], None);
    let emb = g.node("Flatten", &[&x], &[attr_int("axis", 1)], Some("embedding"));
    let classes = match (vars.get("fc.weight"), vars.get("fc.bias")) {
        (Some(_), Some(_)) => {
            let w = g.init("fc.weight", &get("fc.weight")?);
            let b = g.init("fc.bias", &get("fc.bias")?);
            // Gemm: logits = embedding · Wᵀ + b (transB = 1).
            g.node(
                "Gemm",
                &[&emb, &w, &b],
                &[attr_int("transB", 1)],
                Some("logits"),
            );
            Some(get("fc.weight")?.size()[0])
        }
        _ => None,
    };

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
    let model = model_proto(&g, (size, dim, classes), &entries);
    byol_format::fs::write_atomic(path, &model.0)?;
    Ok(ExportInfo {
        path: path.display().to_string(),
        size,
        dim,
        classes,
        convs,
        bytes: model.0.len() as u64,
    })
}

/// The `ModelProto` of graph `g` (IR 8, opset 17): input `pixels` `[N, 3, size, size]`,
/// output `embedding` `[N, dim]` (and `logits` `[N, classes]` for a classifier), and
/// `entries` as its metadata.
fn model_proto(
    g: &Graph,
    (size, dim, classes): (i64, i64, Option<i64>),
    entries: &[(&str, String)],
) -> Pb {
    let mut gp = Pb::default();
    for n in &g.nodes {
        gp.msg(graph::NODE, n);
    }
    gp.str(graph::NAME, "byol_encoder");
    for i in &g.inits {
        gp.msg(graph::INITIALIZER, i);
    }
    gp.msg(
        graph::INPUT,
        &value_info("pixels", &[None, Some(3), Some(size), Some(size)]),
    );
    gp.msg(graph::OUTPUT, &value_info("embedding", &[None, Some(dim)]));
    if let Some(k) = classes {
        gp.msg(graph::OUTPUT, &value_info("logits", &[None, Some(k)]));
    }

    let mut model = Pb::default();
    model.int(model::IR_VERSION, 8);
    model
        .str(model::PRODUCER_NAME, "byol")
        .str(model::PRODUCER_VERSION, env!("CARGO_PKG_VERSION"));
    let mut opset = Pb::default();
    opset.int(operator_set_id::VERSION, 17);
    model.msg(model::OPSET_IMPORT, &opset);
    model.msg(model::GRAPH, &gp);
    for (k, v) in entries {
        let mut e = Pb::default();
        e.str(string_entry::KEY, k).str(string_entry::VALUE, v);
        model.msg(model::METADATA_PROPS, &e);
    }

    model
}
