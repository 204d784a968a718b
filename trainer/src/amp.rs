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

/// The precision a config asks for on `device`: `fp32`, `bf16`, or `auto` (bf16 on
/// CUDA, float32 on the CPU).
pub fn precision(name: &str, device: Device) -> Result<Option<Kind>, String> {
    match name {
        "fp32" => Ok(None),
        "bf16" => Ok(Some(Kind::BFloat16)),
        "auto" => Ok(device.is_cuda().then_some(Kind::BFloat16)),
        other => Err(format!(
            "unknown train.precision {other:?} (auto, fp32 or bf16)"
        )),
    }
}
