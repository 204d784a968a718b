//! The C functions of `src/c10d.cpp`. Tensors cross as tch's `C_tensor` pointers, which
//! are libtorch `at::Tensor*`.

use std::os::raw::{c_char, c_int};

/// Opaque `Group` of c10d.cpp (store + backend).
#[repr(C)]
pub struct Group {
    _private: [u8; 0],
}

/// A libtorch `at::Tensor*` as tch holds it.
pub type CTensor = *mut torch_sys::C_tensor;

unsafe extern "C" {
    pub fn byol_c10d_free_string(s: *mut c_char);
    pub fn byol_c10d_has_nccl() -> c_int;
    #[allow(clippy::too_many_arguments)]
    pub fn byol_c10d_new_group(
        host: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        is_server: c_int,
        prefix: *const c_char,
        timeout_ms: i64,
        backend: c_int,
        gloo_iface: *const c_char,
        gloo_host: *const c_char,
        err: *mut *mut c_char,
    ) -> *mut Group;
    pub fn byol_c10d_free_group(g: *mut Group);
    pub fn byol_c10d_wait_seconds(g: *mut Group) -> f64;
    pub fn byol_c10d_all_reduce_sum(
        g: *mut Group,
        ts: *const CTensor,
        n: usize,
        err: *mut *mut c_char,
    ) -> c_int;
    pub fn byol_c10d_broadcast(
        g: *mut Group,
        t: CTensor,
        root: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    pub fn byol_c10d_all_gather(
        g: *mut Group,
        t: CTensor,
        out: *mut CTensor,
        err: *mut *mut c_char,
    ) -> c_int;
    pub fn byol_c10d_barrier(g: *mut Group, err: *mut *mut c_char) -> c_int;
    pub fn byol_c10d_store_set(
        g: *mut Group,
        key: *const c_char,
        value: *const u8,
        len: usize,
        err: *mut *mut c_char,
    ) -> c_int;
    pub fn byol_c10d_store_try_get(
        g: *mut Group,
        key: *const c_char,
        found: *mut c_int,
        value: *mut *mut u8,
        len: *mut usize,
        err: *mut *mut c_char,
    ) -> c_int;
    #[allow(clippy::too_many_arguments)]
    pub fn byol_c10d_sync_batch_norm(
        g: *mut Group,
        x: CTensor,
        weight: CTensor,
        bias: CTensor,
        running_mean: CTensor,
        running_var: CTensor,
        momentum: f64,
        eps: f64,
        err: *mut *mut c_char,
    ) -> CTensor;
}

/// Takes ownership of a message from c10d.cpp.
///
/// # Safety
/// `p` is null or a string c10d.cpp allocated and nobody else frees.
pub unsafe fn take_message(p: *mut c_char) -> String {
    if p.is_null() {
        return "unknown error".into();
    }
    // SAFETY: a NUL-terminated string from `dup` in c10d.cpp.
    let s = unsafe { std::ffi::CStr::from_ptr(p) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: allocated with malloc by c10d.cpp, freed once here.
    unsafe { byol_c10d_free_string(p) };
    s
}
