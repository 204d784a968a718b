//! Compiles `src/c10d.cpp` against the headers of the torch wheel that tch links
//! (`LIBTORCH_USE_PYTORCH=1`: the venv's `torch/include`), with Gloo's headers from
//! Debian's `libgloo-dev` (the Gloo code itself is inside `libtorch_cpu.so`).
//!
//! NCCL (`ProcessGroupNCCL`) is compiled in only on request, `BYOL_NCCL=1` (what `make
//! device` builds for GPU machines), because it makes the binary load
//! `libtorch_cuda.so` at start-up on every machine. It needs the wheel's
//! `libtorch_cuda.so` and `nvidia/nccl/include`, and CUDA headers that the torch wheel
//! does not ship complete: nvcc's `crt/` and CCCL's `nv/target`, from the PyPI packages
//! `nvidia-cuda-crt` and `nvidia-cuda-cccl` (which `scripts/device_prepare` installs into
//! the venv) or from a CUDA toolkit (`CUDA_HOME`).

include!("../scripts/build_rpath.rs");

use std::path::{Path, PathBuf};
use std::process::Command;

fn python() -> String {
    if let Ok(p) = std::env::var("PYTHON") {
        return p;
    }
    if let Ok(v) = std::env::var("BYOL_VENV") {
        let p = Path::new(&v).join("bin/python");
        if p.exists() {
            return p.display().to_string();
        }
    }
    "python3".into()
}

/// (torch package folder, `_GLIBCXX_USE_CXX11_ABI`) from the Python that has the wheel.
fn torch_wheel() -> (PathBuf, String) {
    let out = Command::new(python())
        .args([
            "-c",
            "import os, torch; print(os.path.dirname(torch.__file__)); print(int(torch._C._GLIBCXX_USE_CXX11_ABI))",
        ])
        .output()
        .expect("running python to find torch (run scripts/setup, or set PYTHON)");
    assert!(
        out.status.success(),
        "python could not import torch: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut lines = text.lines();
    let dir = PathBuf::from(lines.next().expect("torch folder").trim());
    let abi = lines.next().unwrap_or("1").trim().to_string();
    (dir, abi)
}

fn main() {
    emit_rpath();
    println!("cargo:rerun-if-changed=src/c10d.cpp");
    println!("cargo:rerun-if-env-changed=PYTHON");
    println!("cargo:rerun-if-env-changed=BYOL_VENV");
    println!("cargo:rerun-if-env-changed=BYOL_NCCL");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let (torch, abi) = torch_wheel();
    let include = torch.join("include");
    let lib = torch.join("lib");
    let gloo = Path::new("/usr/include/gloo/allreduce.h");
    assert!(
        gloo.exists(),
        "Gloo's headers are missing ({}); `make setup` installs Debian's libgloo-dev",
        gloo.display()
    );
    let mut b = cc::Build::new();
    b.cpp(true)
        .std("c++17")
        .file("src/c10d.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .define("USE_C10D_GLOO", None)
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-missing-field-initializers")
        .flag_if_supported("-Wno-deprecated-declarations")
        .warnings(false);
    let site = torch.parent().expect("site-packages");
    let nccl_inc = site.join("nvidia/nccl/include");
    // The wheel's CUDA headers lack nvcc's `crt/` and CCCL's `nv/`: see the module docs.
    let mut cuda_dirs: Vec<PathBuf> = ["nvidia/cu13/include", "nvidia/cuda_runtime/include"]
        .iter()
        .map(|p| site.join(p))
        .collect();
    if let Ok(h) = std::env::var("CUDA_HOME") {
        cuda_dirs.insert(0, Path::new(&h).join("include"));
    }
    cuda_dirs.push(PathBuf::from("/usr/local/cuda/include"));
    let cuda_inc = cuda_dirs.into_iter().find(|p| {
        p.join("cuda_runtime_api.h").exists()
            && p.join("crt/host_config.h").exists()
            && p.join("nv/target").exists()
    });
    let nccl = std::env::var("BYOL_NCCL").is_ok_and(|v| v == "1");
    if nccl {
        let missing: Vec<String> = [
            (
                lib.join("libtorch_cuda.so").exists(),
                "the wheel's libtorch_cuda.so (a CUDA build of torch)".to_string(),
            ),
            (
                nccl_inc.join("nccl.h").exists(),
                format!("{}/nccl.h", nccl_inc.display()),
            ),
            (
                cuda_inc.is_some(),
                "CUDA headers with crt/host_config.h and nv/target (pip install nvidia-cuda-crt nvidia-cuda-cccl in the versions of torch's CUDA, or set CUDA_HOME)".to_string(),
            ),
        ]
        .into_iter()
        .filter(|(ok, _)| !ok)
        .map(|(_, what)| what)
        .collect();
        assert!(
            missing.is_empty(),
            "BYOL_NCCL=1 but NCCL cannot be compiled in; missing: {}",
            missing.join("; ")
        );
    }
    if nccl {
        b.define("BYOL_WITH_NCCL", None)
            .define("USE_C10D_NCCL", None)
            .include(&nccl_inc)
            .include(cuda_inc.expect("checked"));
    }
    b.compile("byol_c10d");
    println!("cargo:rustc-link-search=native={}", lib.display());
    if nccl {
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
    }
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}
