//! The trainer library's error: [`Error`], with its cause chain kept as `#[source]`s
//! (`byol` prints the chain on one line: `a: b: c`).
//!
//! Refusals and invalid input carry their whole explanation ([`Error::Invalid`]); every
//! other variant wraps the failing library's error, and [`Context`] adds what was being
//! done (the file, the run, the step) in front of it.

use std::fmt::Display;

/// An error of `byol-trainer`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A refusal or invalid input; the text says what and how to fix it.
    #[error("{0}")]
    Invalid(String),
    /// What was being done when `source` failed (a file, a run, a step).
    #[error("{context}")]
    Context {
        context: String,
        #[source]
        source: Box<Error>,
    },
    #[error(transparent)]
    File(#[from] byol_format::fs::FileError),
    /// An I/O error; only made by [`Context`], so it always comes with the file it
    /// concerns (there is no `From<std::io::Error>`: a bare `?` does not compile).
    #[error(transparent)]
    Io(std::io::Error),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Pipeline(#[from] byol_pipeline::PipelineError),
    /// A distributed-training failure (environment, rendezvous, a collective).
    #[error(transparent)]
    Dist(#[from] byol_dist::DistError),
    #[error(transparent)]
    Format(#[from] byol_format::shards::FormatError),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    OnnxRuntime(#[from] ort::Error),
    #[error(transparent)]
    OnnxRuntimeLoad(#[from] ort::LoadDynamicError),
    #[error(transparent)]
    Runtime(#[from] crate::runtime::RuntimeError),
    #[error(transparent)]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error(transparent)]
    Arrow(#[from] arrow_schema::ArrowError),
    #[error(transparent)]
    Plot(#[from] crate::plot::PlotError),
}

impl From<ort::Error<ort::session::builder::SessionBuilder>> for Error {
    fn from(e: ort::Error<ort::session::builder::SessionBuilder>) -> Error {
        Error::OnnxRuntime(e.into())
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds what was being done to an error (or turns a `None` into [`Error::Invalid`]).
pub trait Context<T>: Sized {
    /// # Errors
    /// The error, inside an [`Error::Context`] saying `context`.
    fn context(self, context: impl Display) -> Result<T> {
        self.with_context(|| context)
    }
    /// # Errors
    /// As [`Context::context`], the text made only on error.
    fn with_context<C: Display>(self, f: impl FnOnce() -> C) -> Result<T>;
}

/// `source` inside an [`Error::Context`] saying `context`.
fn wrap(context: impl Display, source: Error) -> Error {
    Error::Context {
        context: context.to_string(),
        source: Box::new(source),
    }
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn with_context<C: Display>(self, f: impl FnOnce() -> C) -> Result<T> {
        self.map_err(|e| wrap(f(), e.into()))
    }
}

impl<T> Context<T> for std::result::Result<T, std::io::Error> {
    fn with_context<C: Display>(self, f: impl FnOnce() -> C) -> Result<T> {
        self.map_err(|e| wrap(f(), Error::Io(e)))
    }
}

impl<T> Context<T> for Option<T> {
    fn with_context<C: Display>(self, f: impl FnOnce() -> C) -> Result<T> {
        self.ok_or_else(|| Error::Invalid(f().to_string()))
    }
}

/// Returns early with [`Error::Invalid`] made by `format!`.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::error::Error::Invalid(format!($($arg)*)))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_keeps_the_cause_as_source() {
        let r: std::result::Result<(), std::io::Error> = Err(std::io::Error::other("disk full"));
        let e = r.context("writing RUN/config.toml").unwrap_err();
        assert_eq!(e.to_string(), "writing RUN/config.toml");
        let src = std::error::Error::source(&e).unwrap();
        assert!(src.to_string().contains("disk full"), "{src}");
    }
}
