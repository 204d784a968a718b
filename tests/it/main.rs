//! End-to-end tests of the `byol` binary.

use std::process::Command;

mod finetune;
mod mishaps;
mod step_loop;
mod tracking;
mod train;

const BIN: &str = env!("CARGO_BIN_EXE_byol");

/// The binary finds libtorch through its RPATH and ONNX Runtime through the path
/// baked in at build time: no LD_LIBRARY_PATH, no venv on PATH.
#[test]
fn info_runs_without_library_environment() {
    let o = Command::new(BIN)
        .args(["info", "--json"])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .expect("run byol");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["torch_check"].as_f64(), Some(285.0));
    assert!(
        v["ort_library"]
            .as_str()
            .unwrap_or("")
            .contains("libonnxruntime.so"),
        "{v}"
    );
    assert!(
        v["ort_build"]
            .as_str()
            .unwrap_or("")
            .contains("ORT Build Info"),
        "{v}"
    );
}

#[test]
fn missing_onnx_runtime_is_a_clear_error() {
    let o = Command::new(BIN)
        .args(["info", "--ort-lib", "/nonexistent/libonnxruntime.so"])
        .output()
        .expect("run byol");
    assert_eq!(o.status.code(), Some(1));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("ONNX Runtime library not found"), "{text}");
    assert!(text.contains("/nonexistent/libonnxruntime.so"), "{text}");

    let o = Command::new(BIN)
        .args(["info"])
        .env("BYOL_ORT_DYLIB", "/also/missing.so")
        .output()
        .expect("run byol");
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stdout).contains("$BYOL_ORT_DYLIB=/also/missing.so"));
}
