//! byol-trainer: the libtorch side of byol: ResNet encoders, BYOL (online/target
//! networks, loss, EMA, LARS, schedules), the training loop with checkpoints, and the
//! native runtimes.

pub mod amp;
pub mod bench;
pub mod byol;
pub mod config;
pub mod eval;
pub mod model;
pub mod onnx;
pub mod plot;
pub mod runtime;
pub mod train;
