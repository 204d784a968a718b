//! What both command-line programs (`byol-tools` and `byol`) share: stdout that tolerates
//! a closed pipe, the `--json`-or-text summary, logging set-up, and the error exit.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result};

/// Writes `text` to stdout; a closed pipe (`| head`) is not an error.
///
/// # Errors
/// Writing to stdout fails for another reason than a closed pipe.
pub fn out(text: &str) -> Result<()> {
    let mut o = std::io::stdout().lock();
    match o.write_all(text.as_bytes()).and_then(|_| o.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("writing to stdout"),
    }
}

/// `v` as one JSON line on stdout.
///
/// # Errors
/// As [`out`], or `v` does not serialise.
pub fn json_line<T: serde::Serialize>(v: &T) -> Result<()> {
    out(&format!("{}\n", serde_json::to_string(v)?))
}

/// A command's summary: one JSON line with `--json`, else the text `text` builds.
///
/// # Errors
/// As [`json_line`] / [`out`].
pub fn emit<T: serde::Serialize>(json: bool, r: &T, text: impl FnOnce() -> String) -> Result<()> {
    if json {
        json_line(r)
    } else {
        out(&text())
    }
}

/// Logs to stderr, filtered by the environment variable `var` (default: errors only).
pub fn init_logging(var: &str) {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env(var)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .init();
}

/// The process's exit: the command's code, or exit code 2 after printing the error and
/// its causes on one line (`prog: error: a: b: c`).
pub fn exit(prog: &str, r: Result<ExitCode>) -> ExitCode {
    match r {
        Ok(code) => code,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("{prog}: error: {}", chain.join(": "));
            ExitCode::from(2)
        }
    }
}
