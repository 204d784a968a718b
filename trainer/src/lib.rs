//! byol-trainer: the libtorch side of byol.
//!
//! - [`model`]: torchvision-layout ResNet encoders and the MLP heads;
//! - [`byol`]: online/target networks, the BYOL loss and step, EMA, the optimizer
//!   (LARS, SGD, AdamW) and the schedules;
//! - [`config`]: the run's TOML config; [`amp`]: precision by hardware;
//! - [`train`]: the training loop; [`run`]: the run folder it writes (config,
//!   checkpoints, metrics, curves) and everything that reads one;
//! - [`eval`]: linear probe and kNN on frozen features;
//! - [`export`]: ONNX export, the ONNX Runtime check and `byol embed`;
//! - [`error`]: the library's error type;
//! - [`plot`]: `curves.png`; [`runtime`]: the native libraries; [`bench`]: `byol bench train`.

pub mod amp;
pub mod bench;
pub mod byol;
pub mod classifier;
pub mod config;
pub mod error;
pub mod eval;
pub mod export;
pub mod finetune;
pub mod model;
pub mod plot;
pub mod preview;
pub mod run;
pub mod runtime;
pub mod train;
