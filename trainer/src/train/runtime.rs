//! [`Runtime`]: where and how a command computes — device, precision, libtorch threads,
//! rank and world size — decided once, from the config and the environment (torchrun's
//! variables). `byol train`, `bench train`, `eval`, `export` and `info` all ask it.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tch::Device;

use byol_dist::{Backend, DistEnv, ProcessGroup};

use crate::amp::{choose_precision, Hardware, PrecisionChoice};
use crate::config::TrainSection;
use crate::error::Result;
use crate::runtime::resolve_device;

/// The device, precision, threads and place in a distributed job of one process.
#[derive(Debug)]
pub struct Runtime {
    /// This rank's device: `train.device`, and with CUDA the GPU `LOCAL_RANK`.
    pub device: Device,
    /// `train.precision` resolved on this hardware, and why.
    pub precision: PrecisionChoice,
    /// The CPU flags that matter for the choice (`avx2 avx512f avx512_bf16 …`).
    pub cpu: String,
    /// libtorch's intra-op threads (after `train.torch_threads`).
    pub threads: i32,
    /// torchrun's variables when this process is one rank of a job.
    pub env: Option<DistEnv>,
}

impl Runtime {
    /// One process, whatever the environment says (`bench`, `eval`, `export`, `info`).
    ///
    /// # Errors
    /// `train.device = "cuda"` without CUDA.
    pub fn local(t: &TrainSection) -> Result<Runtime> {
        Runtime::new(t, None)
    }

    /// This process's place from torchrun's environment (`RANK`, `WORLD_SIZE`, …; one
    /// process when unset), then as [`Runtime::local`].
    ///
    /// # Errors
    /// An inconsistent torchrun environment, or a device that is not available.
    pub fn from_env(t: &TrainSection) -> Result<Runtime> {
        Runtime::new(t, DistEnv::from_env()?)
    }

    fn new(t: &TrainSection, env: Option<DistEnv>) -> Result<Runtime> {
        if t.torch_threads > 0 {
            tch::set_num_threads(t.torch_threads);
        }
        let device = resolve_device(t.device, env.as_ref().map_or(0, |e| e.local_rank))?;
        let hw = Hardware::detect(device);
        Ok(Runtime {
            device,
            precision: choose_precision(t.precision, &hw),
            cpu: hw.cpu_summary(),
            threads: tch::get_num_threads(),
            env,
        })
    }

    /// This process's rank (0 for one process).
    pub fn rank(&self) -> usize {
        self.env.as_ref().map_or(0, |e| e.rank)
    }

    /// Processes in the job (1 for one process).
    pub fn world(&self) -> usize {
        self.env.as_ref().map_or(1, |e| e.world)
    }

    /// Whether this process writes files and reports (rank 0): the one place that asks.
    pub fn is_writer(&self) -> bool {
        self.rank() == 0
    }

    /// Says the precision and why on stderr (rank 0), with a loud warning where bf16 is
    /// emulated.
    pub fn announce_precision(&self, command: &str) {
        if !self.is_writer() {
            return;
        }
        let c = &self.precision;
        eprintln!("byol {command}: precision {} ({})", c.name, c.reason);
        self.warn_precision();
    }

    /// The precision's warning alone (emulated bf16), on stderr.
    pub fn warn_precision(&self) {
        if let Some(w) = &self.precision.warning {
            tracing::warn!("{w}");
            eprintln!("byol: WARNING: {w}");
        }
    }

    /// Joins the job's c10d process group (Gloo on the CPU, NCCL on CUDA when built in)
    /// with `timeout` for the rendezvous and every collective, and makes a panic abort
    /// this worker. `None` for one process.
    ///
    /// # Errors
    /// The rendezvous failed or timed out.
    pub fn join(&self, timeout: Duration) -> Result<Option<Arc<ProcessGroup>>> {
        let Some(env) = &self.env else {
            return Ok(None);
        };
        let mut backend = Backend::for_device(self.device);
        if backend == Backend::Nccl && !byol_dist::has_nccl() {
            // Gloo moves CUDA tensors through host memory: correct, slower.
            eprintln!(
                "byol: WARNING: this build has no NCCL (it is compiled in with BYOL_NCCL=1, as `make device` builds; see dist/build.rs); using Gloo for CUDA tensors"
            );
            backend = Backend::Gloo;
        }
        let g = ProcessGroup::new(env, backend, timeout)?;
        byol_dist::abort_on_panic(env.rank);
        if env.rank == 0 {
            eprintln!(
                "byol train: rank 0 of {}: c10d {} process group at {}:{} (collective timeout {:.0} s)",
                env.world,
                backend.name(),
                env.master_addr,
                env.master_port,
                timeout.as_secs_f64()
            );
        }
        Ok(Some(Arc::new(g)))
    }
}

/// What `byol info` reports.
#[derive(Debug, Clone, Serialize)]
pub struct RuntimeInfo {
    pub torch_threads: i32,
    pub cuda_available: bool,
    pub cuda_devices: usize,
    pub cudnn_available: bool,
    /// Result of a small computation on the default device, as a libtorch smoke test.
    pub torch_check: f64,
    pub ort_library: Option<String>,
    pub ort_error: Option<String>,
    pub ort_build: Option<String>,
    /// The CPU flags that matter for precision (`avx2 avx512f avx512_bf16 …`).
    pub cpu: String,
    /// What `train.precision = "auto"` picks on the default device, and why.
    pub auto_precision: String,
    pub auto_precision_reason: String,
    /// The c10d backends this build has for distributed training (`gloo`, and `nccl`
    /// when built with `BYOL_NCCL=1`).
    pub c10d_backends: Vec<String>,
}

/// Probes libtorch and ONNX Runtime.
pub fn probe(ort_lib: Option<&std::path::Path>) -> RuntimeInfo {
    use tch::{Cuda, Kind, Tensor};
    // The defaults (`auto` device and precision) as `byol train` would resolve them.
    let rt = Runtime::local(&TrainSection::default()).expect("the auto device always resolves");
    let cuda = Cuda::is_available();
    let device = rt.device;
    // sum of squares 0..9 = 285
    let t = Tensor::arange(10, (Kind::Float, device));
    let check = (&t * &t).sum(Kind::Float).double_value(&[]);
    let (ort_library, ort_error, ort_build) = match crate::runtime::init_ort(ort_lib) {
        Ok(p) => (
            Some(p.display().to_string()),
            None,
            Some(ort::info().to_string()),
        ),
        Err(e) => (None, Some(byol_format::error_chain(&e)), None),
    };
    let choice = rt.precision;
    RuntimeInfo {
        cpu: rt.cpu,
        auto_precision: choice.name.into(),
        auto_precision_reason: choice.reason,
        torch_threads: tch::get_num_threads(),
        cuda_available: cuda,
        cuda_devices: Cuda::device_count() as usize,
        cudnn_available: Cuda::cudnn_is_available(),
        torch_check: check,
        ort_library,
        ort_error,
        ort_build,
        c10d_backends: if byol_dist::has_nccl() {
            vec!["gloo".into(), "nccl".into()]
        } else {
            vec!["gloo".into()]
        },
    }
}
