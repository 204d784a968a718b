//! byol-trainer: the libtorch side of byol.

pub mod runtime;
