// Shared by the build.rs of every package that links libtorch (included with
// `include!`): embeds an RPATH to the venv's torch/lib so binaries and tests run
// without LD_LIBRARY_PATH, and bakes in the ONNX Runtime library path that
// scripts/setup found (BYOL_ORT_DYLIB), used when no flag or variable names one.

fn torch_lib_dir() -> Option<String> {
    if let Ok(d) = std::env::var("BYOL_TORCH_LIB") {
        if !d.is_empty() {
            return Some(d);
        }
    }
    let py = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string());
    let out = std::process::Command::new(py)
        .args([
            "-c",
            "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn emit_rpath() {
    println!("cargo:rerun-if-env-changed=BYOL_TORCH_LIB");
    println!("cargo:rerun-if-env-changed=BYOL_ORT_DYLIB");
    println!("cargo:rerun-if-env-changed=BYOL_RPATH_EXTRA");
    if let Some(dir) = torch_lib_dir() {
        println!("cargo:rustc-link-arg=-Wl,--disable-new-dtags");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
    // Extra runtime search path (for example a GPU machine's own torch/lib).
    if let Ok(extra) = std::env::var("BYOL_RPATH_EXTRA") {
        if !extra.is_empty() {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{extra}");
        }
    }
    let ort = std::env::var("BYOL_ORT_DYLIB").unwrap_or_default();
    println!("cargo:rustc-env=BYOL_ORT_DYLIB_DEFAULT={ort}");
}
