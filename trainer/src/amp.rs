//! Mixed precision (autocast) with a chosen dtype.
//!
//! tch's `tch::autocast` only switches libtorch's legacy CUDA autocast on, whose dtype is
//! float16 (which would also need loss scaling). BYOL's recipe on current GPUs is
//! bfloat16 autocast, which needs no loss scaling, so this module calls libtorch's own
//! `at::autocast` functions (exported by `libtorch_cpu`, declared here by their C++
//! symbol names; every argument is an integer-sized enum or a bool, which the C++ ABI
//! passes like C). Autocast works on CUDA and on the CPU (where libtorch runs
//! convolutions and matrix products in bf16 with oneDNN), so the CPU tests exercise
//! the same path.

use tch::{Device, Kind};

use crate::config::Precision;

mod ffi {
    #[link(name = "torch_cpu")]
    extern "C" {
        #[link_name = "_ZN2at8autocast20set_autocast_enabledEN3c1010DeviceTypeEb"]
        pub fn set_autocast_enabled(device: i8, enabled: bool);
        #[link_name = "_ZN2at8autocast19is_autocast_enabledEN3c1010DeviceTypeE"]
        pub fn is_autocast_enabled(device: i8) -> bool;
        #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
        pub fn set_autocast_dtype(device: i8, dtype: i8);
        #[link_name = "_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE"]
        pub fn get_autocast_dtype(device: i8) -> i8;
        #[link_name = "_ZN2at8autocast17increment_nestingEv"]
        pub fn increment_nesting() -> i32;
        #[link_name = "_ZN2at8autocast17decrement_nestingEv"]
        pub fn decrement_nesting() -> i32;
        #[link_name = "_ZN2at8autocast11clear_cacheEv"]
        pub fn clear_cache();
    }
}

/// c10::DeviceType values.
fn device_type(d: Device) -> Option<i8> {
    match d {
        Device::Cpu => Some(0),
        Device::Cuda(_) => Some(1),
        _ => None,
    }
}

/// c10::ScalarType values of the two autocast dtypes.
fn scalar_type(k: Kind) -> Option<i8> {
    match k {
        Kind::Half => Some(5),
        Kind::BFloat16 => Some(15),
        _ => None,
    }
}

/// Runs `f` with autocast to `dtype` on `device` (`None`, or a dtype/device autocast does
/// not support: plain float32). The previous autocast state is restored afterwards and
/// the cast-weight cache is cleared when the outermost region ends, so weights updated
/// by the optimizer are cast afresh in the next step.
pub fn autocast<T>(device: Device, dtype: Option<Kind>, f: impl FnOnce() -> T) -> T {
    let (Some(dev), Some(st)) = (device_type(device), dtype.and_then(scalar_type)) else {
        return f();
    };
    // Restores the previous state even if `f` panics.
    struct Restore {
        dev: i8,
        enabled: bool,
        dtype: i8,
    }
    impl Drop for Restore {
        fn drop(&mut self) {
            unsafe {
                if ffi::decrement_nesting() == 0 {
                    ffi::clear_cache();
                }
                ffi::set_autocast_enabled(self.dev, self.enabled);
                ffi::set_autocast_dtype(self.dev, self.dtype);
            }
        }
    }
    let _restore = unsafe {
        let r = Restore {
            dev,
            enabled: ffi::is_autocast_enabled(dev),
            dtype: ffi::get_autocast_dtype(dev),
        };
        ffi::set_autocast_dtype(dev, st);
        ffi::set_autocast_enabled(dev, true);
        ffi::increment_nesting();
        r
    };
    f()
}

/// Whether autocast is on for `device` right now (for tests and logs).
pub fn is_enabled(device: Device) -> bool {
    device_type(device).is_some_and(|d| unsafe { ffi::is_autocast_enabled(d) })
}

/// What decides whether bf16 is native: the device, the CPU's feature flags and oneDNN's
/// ISA cap. Filled by [`Hardware::detect`]; tests build it by hand.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Hardware {
    /// Training on a CUDA device.
    pub cuda: bool,
    /// Its compute capability (major, minor), when the CUDA runtime reports it.
    pub cuda_capability: Option<(i32, i32)>,
    /// The CPU's feature flags as Linux's `/proc/cpuinfo` spells them (`avx2`,
    /// `avx512_bf16`, `amx_bf16`, …).
    pub cpu_flags: Vec<String>,
    /// `$ONEDNN_MAX_CPU_ISA`, which caps the instructions oneDNN (libtorch's CPU
    /// convolutions and matrix products) may use.
    pub onednn_max_isa: Option<String>,
}

/// oneDNN ISA names (`ONEDNN_MAX_CPU_ISA`) at or above which bf16 is computed natively
/// (from oneDNN's `dnnl_cpu_isa_t` list: avx512_core_bf16 and every ISA above it).
const ONEDNN_BF16_ISAS: &[&str] = &[
    "avx512_core_bf16",
    "avx10_1_512",
    "avx512_core_fp16",
    "avx10_1_512_amx",
    "avx512_core_amx",
    "avx10_1_512_amx_fp16",
    "avx512_core_amx_fp16",
    "all",
    "default",
];

/// CPU flags that mean native bf16 arithmetic: AVX-512 BF16 (`vdpbf16ps`) or AMX BF16
/// tiles.
const CPU_BF16_FLAGS: &[&str] = &["avx512_bf16", "amx_bf16"];

impl Hardware {
    /// The machine this process runs on, training on `device`.
    pub fn detect(device: Device) -> Hardware {
        let cpu_flags = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("flags"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, f)| f.split_whitespace().map(str::to_string).collect())
            })
            .unwrap_or_default();
        Hardware {
            cuda: device.is_cuda(),
            cuda_capability: match device {
                Device::Cuda(i) => cuda_capability(i),
                _ => None,
            },
            cpu_flags,
            onednn_max_isa: std::env::var("ONEDNN_MAX_CPU_ISA")
                .ok()
                .filter(|s| !s.is_empty()),
        }
    }

    /// The CPU flags among [`CPU_BF16_FLAGS`] that this CPU has.
    fn bf16_flags(&self) -> Vec<&str> {
        CPU_BF16_FLAGS
            .iter()
            .copied()
            .filter(|f| self.cpu_flags.iter().any(|c| c == f))
            .collect()
    }

    /// The CPU model's short description: the bf16/AVX flags that matter here.
    pub fn cpu_summary(&self) -> String {
        let keep = ["avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"];
        let v: Vec<&str> = keep
            .iter()
            .copied()
            .filter(|f| self.cpu_flags.iter().any(|c| c == f))
            .collect();
        if v.is_empty() {
            "no AVX2/AVX-512 flags".into()
        } else {
            v.join(" ")
        }
    }
}

/// The compute capability of CUDA device `index`, asked of the CUDA runtime that libtorch
/// loaded (`cudaDeviceGetAttribute`, looked up at run time so CPU builds link nothing
/// of CUDA). `None` when the runtime is not loaded or answers an error.
fn cuda_capability(index: usize) -> Option<(i32, i32)> {
    type GetAttr = unsafe extern "C" fn(*mut i32, i32, i32) -> i32;
    // cudaDevAttrComputeCapabilityMajor / Minor (CUDA runtime API, driver_types.h).
    const MAJOR: i32 = 75;
    const MINOR: i32 = 76;
    // Safety: dlsym with a NUL-terminated name; the symbol, when present, is the CUDA
    // runtime's `cudaError_t cudaDeviceGetAttribute(int*, cudaDeviceAttr, int)`.
    unsafe {
        let sym = libc::dlsym(libc::RTLD_DEFAULT, c"cudaDeviceGetAttribute".as_ptr());
        if sym.is_null() {
            return None;
        }
        let f: GetAttr = std::mem::transmute(sym);
        let (mut major, mut minor) = (0i32, 0i32);
        if f(&mut major, MAJOR, index as i32) != 0 || f(&mut minor, MINOR, index as i32) != 0 {
            return None;
        }
        Some((major, minor))
    }
}

/// The precision a run uses and why.
#[derive(Debug, Clone, PartialEq)]
pub struct PrecisionChoice {
    /// The autocast dtype (`None`: float32 throughout).
    pub dtype: Option<Kind>,
    /// `"bf16"` or `"fp32"`.
    pub name: &'static str,
    /// One sentence for the log, `RUN/config.toml` and the summaries.
    pub reason: String,
    /// Set when an explicit `bf16` runs on hardware that only emulates it.
    pub warning: Option<String>,
}

/// Measured on a 2-core AVX2 CPU without AVX-512 (`byol bench train --config
/// configs/fmnist.toml` and a 1024×1024 matmul in the venv's torch): bf16 training
/// 12.5 images/s vs float32 113, a bf16 matmul 0.7 vs 65 GFLOP/s.
pub const EMULATED_BF16_SLOWDOWN: &str = "about 9x slower training than float32 (an AVX2 \
     CPU measured 12.5 vs 113 images/s for configs/fmnist.toml; a bf16 matmul 90x slower)";

/// Whether `hw` computes bf16 natively, and why (or why not).
pub fn native_bf16(hw: &Hardware) -> (bool, String) {
    if hw.cuda {
        return match hw.cuda_capability {
            Some((major, minor)) if major >= 8 => (
                true,
                format!("CUDA device of compute capability {major}.{minor} (bf16 tensor cores from 8.0)"),
            ),
            Some((major, minor)) => (
                false,
                format!("CUDA device of compute capability {major}.{minor} has no bf16 tensor cores (8.0 and later do)"),
            ),
            // Unknown: float32 is right everywhere, bf16 only from 8.0.
            None => (
                false,
                "CUDA device whose compute capability the CUDA runtime did not report, so bf16 is not assumed".into(),
            ),
        };
    }
    let flags = hw.bf16_flags();
    if flags.is_empty() {
        return (
            false,
            format!(
                "this CPU has no AVX-512 BF16 or AMX ({}), so bf16 would be emulated",
                hw.cpu_summary()
            ),
        );
    }
    if let Some(isa) = &hw.onednn_max_isa {
        if !ONEDNN_BF16_ISAS.contains(&isa.to_ascii_lowercase().as_str()) {
            return (
                false,
                format!(
                    "ONEDNN_MAX_CPU_ISA={isa} keeps oneDNN below avx512_core_bf16, so bf16 would be emulated"
                ),
            );
        }
    }
    (
        true,
        format!("this CPU computes bf16 natively ({})", flags.join(", ")),
    )
}

/// The precision for a config's `train.precision` (`auto`, `fp32` or `bf16`) on `hw`:
/// `auto` is bf16 autocast where bf16 is native (CUDA from compute capability 8.0, CPUs
/// with AVX-512 BF16 or AMX) and float32 elsewhere; an explicit `bf16` on hardware
/// that emulates it still runs, with a warning.
///
pub fn choose_precision(p: Precision, hw: &Hardware) -> PrecisionChoice {
    let (native, why) = native_bf16(hw);
    let bf16 = |reason: String, warning| PrecisionChoice {
        dtype: Some(Kind::BFloat16),
        name: "bf16",
        reason,
        warning,
    };
    let fp32 = |reason: String| PrecisionChoice {
        dtype: None,
        name: "fp32",
        reason,
        warning: None,
    };
    match p {
        Precision::Fp32 => fp32("train.precision = \"fp32\"".into()),
        Precision::Bf16 if native => bf16(format!("train.precision = \"bf16\"; {why}"), None),
        Precision::Bf16 => bf16(
            format!("train.precision = \"bf16\" although {why}"),
            Some(format!(
                "train.precision = \"bf16\" but {why}: expect {EMULATED_BF16_SLOWDOWN}; \
                 use \"auto\" or \"fp32\""
            )),
        ),
        Precision::Auto if native => bf16(format!("auto: {why}"), None),
        Precision::Auto => fp32(format!("auto: {why}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(flags: &[&str]) -> Hardware {
        Hardware {
            cpu_flags: flags.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    const AVX2: &[&str] = &["fpu", "sse4_2", "fma", "avx", "avx2"];
    const AVX512_NO_BF16: &[&str] = &["avx", "avx2", "avx512f", "avx512bw", "avx512_vnni"];
    const AVX512_BF16: &[&str] = &["avx", "avx2", "avx512f", "avx512bw", "avx512_bf16"];
    const AMX: &[&str] = &["avx2", "avx512f", "amx_tile", "amx_bf16", "amx_int8"];

    #[test]
    fn auto_is_bf16_only_where_bf16_is_native() {
        let c = |flags| choose_precision(Precision::Auto, &cpu(flags));
        assert_eq!(c(AVX2).name, "fp32");
        assert_eq!(c(AVX512_NO_BF16).name, "fp32");
        assert_eq!(c(&[]).name, "fp32");
        assert_eq!(c(AVX512_BF16).name, "bf16");
        assert_eq!(c(AMX).name, "bf16");
        assert!(
            c(AVX2).reason.contains("no AVX-512 BF16"),
            "{}",
            c(AVX2).reason
        );
        assert!(c(AMX).reason.contains("amx_bf16"));
        for f in [AVX2, AVX512_NO_BF16, AVX512_BF16, AMX] {
            assert!(c(f).warning.is_none());
        }
    }

    #[test]
    fn onednn_isa_cap_below_bf16_means_emulated() {
        let mut hw = cpu(AVX512_BF16);
        hw.onednn_max_isa = Some("AVX2".into());
        assert_eq!(choose_precision(Precision::Auto, &hw).name, "fp32");
        hw.onednn_max_isa = Some("AVX512_CORE_BF16".into());
        assert_eq!(choose_precision(Precision::Auto, &hw).name, "bf16");
        hw.onednn_max_isa = Some("AVX512_CORE_AMX".into());
        assert_eq!(choose_precision(Precision::Auto, &hw).name, "bf16");
    }

    #[test]
    fn cuda_from_compute_capability_8() {
        let gpu = |cap| Hardware {
            cuda: true,
            cuda_capability: cap,
            cpu_flags: AVX2.iter().map(|s| s.to_string()).collect(),
            onednn_max_isa: None,
        };
        assert_eq!(
            choose_precision(Precision::Auto, &gpu(Some((9, 0)))).name,
            "bf16"
        );
        assert_eq!(
            choose_precision(Precision::Auto, &gpu(Some((8, 0)))).name,
            "bf16"
        );
        assert_eq!(
            choose_precision(Precision::Auto, &gpu(Some((7, 5)))).name,
            "fp32"
        );
        assert_eq!(choose_precision(Precision::Auto, &gpu(None)).name, "fp32");
        assert!(choose_precision(Precision::Bf16, &gpu(Some((7, 0))))
            .warning
            .is_some());
    }

    #[test]
    fn explicit_bf16_on_emulating_cpu_runs_with_a_warning() {
        let c = choose_precision(Precision::Bf16, &cpu(AVX2));
        assert_eq!(c.dtype, Some(Kind::BFloat16));
        let w = c.warning.unwrap();
        assert!(w.contains("9x slower"), "{w}");
        assert!(choose_precision(Precision::Bf16, &cpu(AVX512_BF16))
            .warning
            .is_none());
        let f = choose_precision(Precision::Fp32, &cpu(AMX));
        assert_eq!((f.dtype, f.name), (None, "fp32"));
        let refused = crate::config::TrainConfig::from_toml("[train]\nprecision = \"fp16\"", &[]);
        assert!(refused.is_err());
    }
}
