//! Data-parallel training over libtorch's c10d, the distributed engine PyTorch itself
//! uses: a `TCPStore` rendezvous, `ProcessGroupGloo` on the CPU and `ProcessGroupNCCL` on
//! CUDA (when this build has it, see `build.rs`), the collectives byol needs
//! ([`ProcessGroup::all_reduce_sum`], [`ProcessGroup::broadcast`],
//! [`ProcessGroup::all_gather`], [`ProcessGroup::barrier`]), bucketed gradient averaging
//! ([`ProcessGroup::average_gradients`], DistributedDataParallel's job in PyTorch) and
//! SyncBatchNorm ([`ProcessGroup::sync_batch_norm`]) as a libtorch autograd function.
//!
//! The environment is torchrun's ([`DistEnv`]); [`launch`] starts N local workers with
//! that same environment for users without Python.
//!
//! No other byol crate knows c10d exists: the C++ is in `src/c10d.cpp`, compiled by
//! `build.rs` against the venv's torch wheel.

mod env;
mod ffi;
pub mod launch;

use std::ffi::CString;
use std::os::raw::{c_char, c_int};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tch::{Device, Kind, Tensor};

pub use env::DistEnv;

/// The c10d backend: Gloo (CPU tensors) or NCCL (CUDA tensors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Gloo,
    Nccl,
}

impl Backend {
    /// NCCL for a CUDA device, Gloo otherwise (as `torch.distributed` picks by device).
    pub fn for_device(device: Device) -> Backend {
        if device.is_cuda() {
            Backend::Nccl
        } else {
            Backend::Gloo
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }
}

/// Whether this build has `ProcessGroupNCCL` (see `build.rs`).
pub fn has_nccl() -> bool {
    // SAFETY: a constant-returning C function.
    unsafe { ffi::byol_c10d_has_nccl() != 0 }
}

#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A distributed-environment variable is missing or malformed.
    #[error("{var}={value:?}: {reason}")]
    Env {
        var: &'static str,
        value: String,
        reason: String,
    },
    /// The TCPStore rendezvous or the process group could not be set up.
    #[error(
        "rank {rank} of {world}: c10d {backend} process group via the TCPStore at {addr}:{port} failed: {message}"
    )]
    Rendezvous {
        rank: usize,
        world: usize,
        backend: &'static str,
        addr: String,
        port: u16,
        message: String,
    },
    /// A collective failed (a peer vanished, hung past the timeout, or bad tensors).
    #[error("{op} failed on rank {rank} of {world}: {message}{peers}")]
    Collective {
        op: &'static str,
        rank: usize,
        world: usize,
        message: String,
        /// What the store says about the other ranks (who stopped reporting).
        peers: String,
    },
    #[error("starting worker {rank}: {source}")]
    Spawn {
        rank: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Launch(String),
}

pub type Result<T, E = DistError> = std::result::Result<T, E>;

/// One process's membership of a c10d process group.
///
/// Every rank must issue the same collectives in the same order; a collective that a peer
/// never joins fails after the group's timeout with [`DistError::Collective`], which names
/// the ranks whose last reported step ([`ProcessGroup::report_step`]) is behind.
pub struct ProcessGroup {
    raw: NonNull<ffi::Group>,
    env: DistEnv,
    backend: Backend,
    timeout: Duration,
    step: AtomicU64,
    /// How many [`ProcessGroup::after_rank0_work`] marks this rank has passed.
    solo: AtomicU64,
    /// Nanoseconds spent in [`ProcessGroup::after_rank0_work`] waiting for rank 0.
    solo_wait_ns: AtomicU64,
    /// A diagnosis thread may be using the group (see [`ProcessGroup::peers`]).
    diagnosing: std::sync::atomic::AtomicBool,
}

// SAFETY: c10d process groups and stores are used from one thread at a time by byol
// (the training thread); the C++ objects are themselves thread-safe for that.
unsafe impl Send for ProcessGroup {}
// SAFETY: as above; every method takes `&self` and c10d serialises its work queue.
unsafe impl Sync for ProcessGroup {}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ProcessGroup({}, rank {} of {})",
            self.backend.name(),
            self.env.rank,
            self.env.world
        )
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if self.diagnosing.load(Ordering::SeqCst) {
            // A diagnosis thread may still be blocked on the store: leave the group to
            // it (the process is ending with the error anyway).
            return;
        }
        // SAFETY: created by byol_c10d_new_group, freed once.
        unsafe { ffi::byol_c10d_free_group(self.raw.as_ptr()) }
    }
}

/// The group's pointer, moved to the diagnosis thread.
struct RawGroup(*mut ffi::Group);
// SAFETY: the pointer is only used for store calls, which c10d's TCPStore serialises, and
// the group is not freed while the thread may use it (`diagnosing`).
unsafe impl Send for RawGroup {}

fn store_set(raw: *mut ffi::Group, key: &str, value: &str) -> std::result::Result<(), String> {
    let key = cstring(key);
    let mut err: *mut c_char = ptr::null_mut();
    // SAFETY: valid pointers for the call's duration.
    let rc = unsafe {
        ffi::byol_c10d_store_set(raw, key.as_ptr(), value.as_ptr(), value.len(), &mut err)
    };
    if rc != 0 {
        // SAFETY: set by the failed call.
        return Err(unsafe { ffi::take_message(err) });
    }
    Ok(())
}

/// A store value without waiting (`None`: not set).
fn store_try_get(raw: *mut ffi::Group, key: &str) -> std::result::Result<Option<String>, String> {
    let key = cstring(key);
    let (mut found, mut value, mut len): (c_int, *mut u8, usize) = (0, ptr::null_mut(), 0);
    let mut err: *mut c_char = ptr::null_mut();
    // SAFETY: out-pointers valid for the call.
    let rc = unsafe {
        ffi::byol_c10d_store_try_get(
            raw,
            key.as_ptr(),
            &mut found,
            &mut value,
            &mut len,
            &mut err,
        )
    };
    if rc != 0 {
        // SAFETY: set by the failed call.
        return Err(unsafe { ffi::take_message(err) });
    }
    if found == 0 {
        return Ok(None);
    }
    // SAFETY: `len` bytes malloc'ed by c10d.cpp.
    let bytes = unsafe { std::slice::from_raw_parts(value, len) }.to_vec();
    // SAFETY: allocated with malloc; freed once.
    unsafe { ffi::byol_c10d_free_string(value as *mut c_char) };
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

/// The ranks that did not mark a failure within [`PEER_GRACE`] after this one did, each
/// with the last step it reported; `Err` when the store is unreachable.
fn diagnose(raw: *mut ffi::Group, rank: usize, world: usize, me: u64) -> Result<Vec<String>, ()> {
    store_set(raw, &format!("failed/{rank}"), &me.to_string()).map_err(|_| ())?;
    std::thread::sleep(PEER_GRACE);
    let mut silent = Vec::new();
    for r in (0..world).filter(|&r| r != rank) {
        if store_try_get(raw, &format!("failed/{r}"))
            .map_err(|_| ())?
            .is_some()
        {
            continue; // it saw the failure too
        }
        let last = match store_try_get(raw, &format!("progress/{r}")).map_err(|_| ())? {
            Some(s) => format!("last reported step {s}"),
            None => "never reported a step".into(),
        };
        silent.push(format!("rank {r} ({last})"));
    }
    Ok(silent)
}

fn cstring(s: &str) -> CString {
    CString::new(s.replace('\0', "")).expect("NUL removed")
}

fn ptr_of(t: &Tensor) -> ffi::CTensor {
    t.as_ptr() as ffi::CTensor
}

impl ProcessGroup {
    /// Joins the group `env` describes: rank 0 hosts the TCPStore at `MASTER_ADDR:MASTER_PORT`
    /// unless torchrun's agent hosts it (`TORCHELASTIC_USE_AGENT_STORE=True`, then every
    /// rank is a client, under torchrun's `/worker/attempt_N` prefix). Gloo binds to
    /// `GLOO_SOCKET_IFNAME` when set, to 127.0.0.1 when the master is on loopback, else to
    /// the address of this host's name. `timeout` bounds the rendezvous and every collective.
    ///
    /// # Errors
    /// [`DistError::Rendezvous`]: the store is unreachable or silent within `timeout`
    /// (plus [`JOIN_GRACE`]; on every rank, naming the address and port), the port is
    /// taken, or this build lacks the backend (NCCL).
    pub fn new(env: &DistEnv, backend: Backend, timeout: Duration) -> Result<ProcessGroup> {
        let host = cstring(&env.master_addr);
        let prefix = cstring(&if env.agent_store {
            format!("/worker/attempt_{}/byol/", env.restart_count)
        } else {
            "byol/".to_string()
        });
        let iface = std::env::var("GLOO_SOCKET_IFNAME").unwrap_or_default();
        let loopback = env.master_addr == "localhost" || env.master_addr.starts_with("127.");
        let ghost = if iface.is_empty() && loopback {
            "127.0.0.1"
        } else {
            ""
        };
        let (iface, ghost) = (cstring(&iface), cstring(ghost));
        let (port, rank, world) = (c_int::from(env.master_port), env.rank, env.world);
        let hosts = c_int::from(env.rank == 0 && !env.agent_store);
        let which = match backend {
            Backend::Gloo => 0,
            Backend::Nccl => 1,
        };
        let rendezvous_error = |message: String| DistError::Rendezvous {
            rank: env.rank,
            world: env.world,
            backend: backend.name(),
            addr: env.master_addr.clone(),
            port: env.master_port,
            message,
        };
        // The join runs on its own thread with a deadline: a port where another program
        // listens without answering keeps c10d's client waiting past its own timeout.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut err: *mut c_char = ptr::null_mut();
            // SAFETY: valid C strings owned by this thread for the call's duration; err
            // is an out-pointer.
            let raw = unsafe {
                ffi::byol_c10d_new_group(
                    host.as_ptr(),
                    port,
                    rank as c_int,
                    world as c_int,
                    hosts,
                    prefix.as_ptr(),
                    timeout.as_millis() as i64,
                    which,
                    iface.as_ptr(),
                    ghost.as_ptr(),
                    &mut err,
                )
            };
            let answer = match NonNull::new(raw) {
                Some(raw) => Ok(RawGroup(raw.as_ptr())),
                // SAFETY: set by the failed call.
                None => Err(unsafe { ffi::take_message(err) }),
            };
            if let Err(std::sync::mpsc::SendError(Ok(late))) = tx.send(answer) {
                // Joined after the deadline, when nobody waits for the group any more.
                // SAFETY: created by byol_c10d_new_group, freed once.
                unsafe { ffi::byol_c10d_free_group(late.0) };
            }
        });
        match rx.recv_timeout(timeout + JOIN_GRACE) {
            Ok(Ok(raw)) => Ok(ProcessGroup {
                raw: NonNull::new(raw.0).expect("checked non-null"),
                env: env.clone(),
                backend,
                timeout,
                step: AtomicU64::new(0),
                solo: AtomicU64::new(0),
                solo_wait_ns: AtomicU64::new(0),
                diagnosing: std::sync::atomic::AtomicBool::new(false),
            }),
            Ok(Err(message)) => Err(rendezvous_error(message)),
            Err(_) => Err(rendezvous_error(format!(
                "no rendezvous within {:.0} s (the collective timeout): nothing there answers as a TCPStore; check MASTER_ADDR and MASTER_PORT (another program may be listening on that port) and that rank 0 is running",
                (timeout + JOIN_GRACE).as_secs_f64()
            ))),
        }
    }

    /// Polls the store every 20 ms until `key` is set; why not, when the store stops
    /// answering (`since`: when the wait began, for the message).
    fn wait_for_key(
        &self,
        key: &str,
        since: std::time::Instant,
    ) -> std::result::Result<(), String> {
        loop {
            match store_try_get(self.raw.as_ptr(), key) {
                Ok(Some(_)) => return Ok(()),
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => {
                    return Err(format!(
                        "the TCPStore at {}:{} stopped answering after {:.0} s ({e}): rank 0 ended or its host went away",
                        self.env.master_addr,
                        self.env.master_port,
                        since.elapsed().as_secs_f64()
                    ))
                }
            }
        }
    }

    /// Marks the end of work that rank 0 does alone (writing a checkpoint, the kNN
    /// monitor, evaluation) for the other ranks, which wait for it here on the TCPStore
    /// (polled every 20 ms) instead of in their next collective: however long the work
    /// takes, it never counts against the collective timeout. Every rank calls it at the
    /// same point, in the same order (`what` names the work in errors); a barrier follows
    /// the wait, so that rank 0 (which may host the store) does not end before the others
    /// have seen the mark.
    ///
    /// # Errors
    /// [`DistError::Collective`] when the store becomes unreachable while waiting (rank 0
    /// ended, failing in its work, or its host went away).
    pub fn after_rank0_work(&self, what: &str) -> Result<()> {
        let key = format!("solo/{}", self.solo.fetch_add(1, Ordering::Relaxed));
        let failed = |message: String| DistError::Collective {
            op: "waiting for rank 0",
            rank: self.env.rank,
            world: self.env.world,
            message: format!("{what}: {message}"),
            peers: String::new(),
        };
        let t = std::time::Instant::now();
        if self.env.rank == 0 {
            self.store_set(&key, "done").map_err(failed)?;
        } else {
            self.wait_for_key(&key, t).map_err(failed)?;
        }
        self.comm_wait(t.elapsed());
        // Every rank has seen the mark (rank 0, hosting the store, may not end before).
        self.barrier()
    }

    pub fn rank(&self) -> usize {
        self.env.rank
    }

    pub fn world(&self) -> usize {
        self.env.world
    }

    pub fn env(&self) -> &DistEnv {
        &self.env
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Seconds this process has spent waiting for collectives to complete (the transfer,
    /// and waiting for slower ranks), SyncBatchNorm's included, and for rank 0's work
    /// ([`ProcessGroup::after_rank0_work`]).
    pub fn comm_seconds(&self) -> f64 {
        // SAFETY: reads an atomic of a live group.
        let collectives = unsafe { ffi::byol_c10d_wait_seconds(self.raw.as_ptr()) };
        collectives + self.solo_wait_ns.load(Ordering::Relaxed) as f64 * 1e-9
    }

    /// Counts a wait for rank 0 ([`ProcessGroup::after_rank0_work`]) as communication.
    fn comm_wait(&self, d: Duration) {
        self.solo_wait_ns
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Records this rank's step in the store (`progress/RANK`), so that a failed
    /// collective can say which rank stopped reporting.
    ///
    /// # Errors
    /// The store is unreachable.
    pub fn report_step(&self, step: u64) -> Result<()> {
        self.step.store(step, Ordering::Relaxed);
        self.store_set(&format!("progress/{}", self.env.rank), &step.to_string())
            .map_err(|message| DistError::Collective {
                op: "store set",
                rank: self.env.rank,
                world: self.env.world,
                message,
                peers: String::new(),
            })
    }

    fn store_set(&self, key: &str, value: &str) -> std::result::Result<(), String> {
        store_set(self.raw.as_ptr(), key, value)
    }

    /// After a failed collective: which ranks vanished. Each surviving rank marks its
    /// failure in the store (`failed/RANK`) and, after [`PEER_GRACE`], the ranks that
    /// marked none are named with the last step they reported. The store is asked from
    /// another thread with a deadline ([`PEER_DEADLINE`]): a store whose host is frozen
    /// never answers, and this must not hang the rank that noticed.
    fn peers(&self) -> String {
        let me = self.step.load(Ordering::Relaxed);
        let (rank, world) = (self.env.rank, self.env.world);
        let raw = RawGroup(self.raw.as_ptr());
        let (tx, rx) = std::sync::mpsc::channel();
        // Until the thread answers, the group must outlive it (see Drop).
        self.diagnosing.store(true, Ordering::SeqCst);
        std::thread::spawn(move || {
            let raw = raw;
            let _ = tx.send(diagnose(raw.0, rank, world, me));
        });
        let answer = rx.recv_timeout(PEER_GRACE + PEER_DEADLINE);
        let store = format!("{}:{}", self.env.master_addr, self.env.master_port);
        match answer {
            Ok(Ok(silent)) if silent.is_empty() => {
                self.diagnosing.store(false, Ordering::SeqCst);
                String::new()
            }
            Ok(Ok(silent)) => {
                self.diagnosing.store(false, Ordering::SeqCst);
                format!(
                    "; this rank is at step {me}; {} stopped answering: it died, or hangs",
                    silent.join(", ")
                )
            }
            Ok(Err(())) => {
                self.diagnosing.store(false, Ordering::SeqCst);
                format!(
                    "; the TCPStore at {store} is unreachable too, so its host (rank 0, or torchrun's agent) is gone"
                )
            }
            Err(_) => format!(
                "; the TCPStore at {store} did not answer within {} s either, so its host (rank 0, or torchrun's agent) is gone or frozen",
                PEER_DEADLINE.as_secs()
            ),
        }
    }

    /// The error for a collective that failed outside this API (inside an autograd
    /// backward pass, where libtorch reports it), with what the store says about the
    /// other ranks.
    pub fn collective_error(&self, op: &'static str, message: String) -> DistError {
        DistError::Collective {
            op,
            rank: self.env.rank,
            world: self.env.world,
            message,
            peers: self.peers(),
        }
    }

    fn check(&self, op: &'static str, rc: c_int, err: *mut c_char) -> Result<()> {
        if rc == 0 {
            return Ok(());
        }
        // SAFETY: set by the failed call.
        let message = unsafe { ffi::take_message(err) };
        Err(DistError::Collective {
            op,
            rank: self.env.rank,
            world: self.env.world,
            message,
            peers: self.peers(),
        })
    }

    /// Sums each tensor over all ranks, in place (every rank ends with the same values).
    /// Tensors must be contiguous and on this group's device type.
    ///
    /// # Errors
    /// [`DistError::Collective`] naming the rank that vanished or hung.
    pub fn all_reduce_sum(&self, tensors: &[&Tensor]) -> Result<()> {
        let ptrs: Vec<ffi::CTensor> = tensors.iter().map(|t| ptr_of(t)).collect();
        let mut err: *mut c_char = ptr::null_mut();
        // SAFETY: tensor pointers live for the call (borrowed).
        let rc = unsafe {
            ffi::byol_c10d_all_reduce_sum(self.raw.as_ptr(), ptrs.as_ptr(), ptrs.len(), &mut err)
        };
        self.check("all_reduce", rc, err)
    }

    /// Copies `root`'s `t` into every rank's `t`, in place (`t` contiguous).
    ///
    /// # Errors
    /// [`DistError::Collective`].
    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<()> {
        let mut err: *mut c_char = ptr::null_mut();
        // SAFETY: the tensor lives for the call.
        let rc = unsafe {
            ffi::byol_c10d_broadcast(self.raw.as_ptr(), ptr_of(t), root as c_int, &mut err)
        };
        self.check("broadcast", rc, err)
    }

    /// Every rank's `t`, in rank order (`world` new tensors of `t`'s shape).
    ///
    /// # Errors
    /// [`DistError::Collective`].
    pub fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        let t = t.contiguous();
        let mut out: Vec<ffi::CTensor> = vec![ptr::null_mut(); self.env.world];
        let mut err: *mut c_char = ptr::null_mut();
        // SAFETY: `out` has room for `world` pointers, filled on success.
        let rc = unsafe {
            ffi::byol_c10d_all_gather(self.raw.as_ptr(), ptr_of(&t), out.as_mut_ptr(), &mut err)
        };
        self.check("all_gather", rc, err)?;
        // SAFETY: each is a fresh heap at::Tensor that tch now owns.
        Ok(out
            .into_iter()
            .map(|p| unsafe { Tensor::from_ptr(p) })
            .collect())
    }

    /// Waits until every rank has called it.
    ///
    /// # Errors
    /// [`DistError::Collective`].
    pub fn barrier(&self) -> Result<()> {
        let mut err: *mut c_char = ptr::null_mut();
        // SAFETY: plain call.
        let rc = unsafe { ffi::byol_c10d_barrier(self.raw.as_ptr(), &mut err) };
        self.check("barrier", rc, err)
    }

    /// Broadcasts each tensor from `root` in place, in the given order (non-contiguous
    /// tensors, such as channels-last weights, go through a contiguous copy).
    ///
    /// # Errors
    /// [`DistError::Collective`].
    pub fn broadcast_all(&self, tensors: &[Tensor], root: usize) -> Result<()> {
        tch::no_grad(|| {
            for t in tensors {
                if t.is_contiguous() {
                    self.broadcast(t, root)?;
                } else {
                    let c = t.contiguous();
                    self.broadcast(&c, root)?;
                    t.shallow_clone().copy_(&c);
                }
            }
            Ok(())
        })
    }

    /// Averages gradients over ranks, as DistributedDataParallel does: the gradients, in
    /// the order given (the caller's fixed name order), are flattened into buckets of at
    /// most [`BUCKET_BYTES`], each bucket is summed with one `all_reduce` and divided by
    /// the world size (Gloo has no average), and the values are copied back.
    ///
    /// # Errors
    /// [`DistError::Collective`].
    pub fn average_gradients(&self, grads: &[Tensor]) -> Result<()> {
        let world = self.env.world as f64;
        tch::no_grad(|| {
            let mut start = 0;
            while start < grads.len() {
                let kind = grads[start].kind();
                let mut end = start;
                let mut bytes = 0usize;
                while end < grads.len()
                    && grads[end].kind() == kind
                    && (end == start
                        || bytes + grads[end].numel() * kind.elt_size_in_bytes() <= BUCKET_BYTES)
                {
                    bytes += grads[end].numel() * kind.elt_size_in_bytes();
                    end += 1;
                }
                let bucket = &grads[start..end];
                let mut flat = Tensor::cat(
                    &bucket.iter().map(|g| g.reshape([-1])).collect::<Vec<_>>(),
                    0,
                );
                self.all_reduce_sum(&[&flat])?;
                let _ = flat.f_div_scalar_(world);
                let mut off = 0i64;
                for g in bucket {
                    let n = g.numel() as i64;
                    let part = flat.narrow(0, off, n).view_as(&g.contiguous());
                    g.shallow_clone().copy_(&part);
                    off += n;
                }
                start = end;
            }
            Ok(())
        })
    }

    /// BatchNorm in training mode with statistics over every rank's batch
    /// (`torch.nn.SyncBatchNorm`): each rank's count, mean and biased variance are
    /// gathered and combined into the global mean and variance, the running statistics are
    /// updated with the global values (unbiased variance, `momentum` as in PyTorch), and
    /// the backward pass all-reduces the two per-channel sums `Σ dy` and `Σ dy·(x − μ)` so
    /// that the input gradient is that of the loss summed over ranks. Parameter gradients
    /// stay local (they are averaged with the others by [`ProcessGroup::average_gradients`]).
    /// Statistics are computed in float32 for reduced-precision input (float64 stays
    /// float64); the output has the input's dtype.
    ///
    /// # Shapes
    /// `x`: `[N, C, *]`; `weight`, `bias`, `running_mean`, `running_var`: `[C]`. Returns
    /// `[N, C, *]`.
    ///
    /// # Errors
    /// [`DistError::Collective`] (a peer vanished, or mismatched channel counts).
    pub fn sync_batch_norm(
        &self,
        x: &Tensor,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        running: Option<(&Tensor, &Tensor)>,
        momentum: f64,
        eps: f64,
    ) -> Result<Tensor> {
        let opt = |t: Option<&Tensor>| t.map(ptr_of).unwrap_or(ptr::null_mut());
        let mut err: *mut c_char = ptr::null_mut();
        // SAFETY: every pointer is null or a live tensor for the call's duration.
        let out = unsafe {
            ffi::byol_c10d_sync_batch_norm(
                self.raw.as_ptr(),
                ptr_of(x),
                opt(weight),
                opt(bias),
                opt(running.map(|r| r.0)),
                opt(running.map(|r| r.1)),
                momentum,
                eps,
                &mut err,
            )
        };
        if out.is_null() {
            self.check("sync_batch_norm", 1, err)?;
        }
        // SAFETY: a fresh heap at::Tensor that tch now owns.
        Ok(unsafe { Tensor::from_ptr(out) })
    }

    /// Sums `values` over ranks (one `all_reduce` of a float64 tensor on the CPU, or on
    /// the group's device for NCCL).
    ///
    /// # Errors
    /// [`DistError::Collective`].
    pub fn sum_f64(&self, values: &[f64], device: Device) -> Result<Vec<f64>> {
        let t = Tensor::from_slice(values).to_device(device);
        self.all_reduce_sum(&[&t])?;
        Ok(
            Vec::<f64>::try_from(t.to_kind(Kind::Double).to_device(Device::Cpu))
                .expect("a 1-D float64 tensor"),
        )
    }
}

/// How long a rank whose collective failed waits for the surviving ranks to say so in the
/// store, before naming the silent ones.
pub const PEER_GRACE: Duration = Duration::from_millis(1500);

/// How long, beyond the collective timeout, joining a group may take before a rank gives
/// up ([`ProcessGroup::new`]): c10d's own rendezvous fails within the timeout; this bounds
/// the cases it does not (a port where another program listens without answering).
pub const JOIN_GRACE: Duration = Duration::from_secs(2);

/// How long, beyond [`PEER_GRACE`], the store may take to answer that diagnosis.
pub const PEER_DEADLINE: Duration = Duration::from_secs(5);

/// Largest gradient bucket of [`ProcessGroup::average_gradients`] (DistributedDataParallel's
/// default `bucket_cap_mb` is 25).
pub const BUCKET_BYTES: usize = 25 << 20;

/// Makes any panic abort the process at once after printing its message, so that a
/// launcher (torchrun or `byol train --nproc-per-node`) sees the rank die and tears the
/// group down instead of the others waiting for it.
pub fn abort_on_panic(rank: usize) {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("panic");
        eprintln!("byol: rank {rank}: {msg}; aborting this worker");
        if std::env::var_os("RUST_BACKTRACE").is_some() {
            default(info);
        }
        std::process::abort();
    }));
}
