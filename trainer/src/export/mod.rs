//! ONNX export of a trained encoder, and inference through ONNX Runtime.
//!
//! The exported graph is the online encoder in inference form: input `pixels`
//! (`[N, 3, S, S]` float32 in [0, 1], the un-augmented image resized to the training size
//! S), the training normalisation (Sub/Div), every convolution with its BatchNorm folded
//! in (`W·γ/√(σ²+ε)`, `β − μ·γ/√(σ²+ε)`), ReLU, the stem max-pool when the encoder has one,
//! residual Adds, GlobalAveragePool and Flatten; output `embedding` (`[N, D]`). The
//! file is written with a small protobuf writer ([`proto`]; ONNX IR 8, opset 17); metadata keys
//! `byol.*` record the run, step, canvas and size.
//!
//! - [`proto`]: the protobuf wire format and ONNX's field numbers;
//! - [`graph`]: the graph with BatchNorm folding ([`export`]);
//! - [`onnx_runtime`]: the encoder in ONNX Runtime ([`OnnxEncoder`]) and the parity check
//!   against libtorch ([`export_run`]);
//! - [`embeddings`]: the embeddings Parquet writer ([`embed`]);
//! - [`torchvision`]: the encoder's weights under torchvision's names, as safetensors
//!   ([`export_torchvision`]).

pub mod embeddings;
pub mod graph;
pub mod hf;
pub mod onnx_runtime;
pub mod proto;
pub mod torchvision;

pub use embeddings::{embed, EmbedReport, Output};
pub use graph::{export, ExportInfo};
pub use hf::{export_hf, HfExport};
pub use onnx_runtime::{export_run, ExportReport, OnnxEncoder, EXPORT_TOL};
pub use torchvision::{export_torchvision, TorchvisionExport};
