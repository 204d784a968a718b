//! The streaming loader: reader → decode workers → batch assembly, joined by bounded
//! crossbeam channels, writing into a fixed pool of preallocated uint8 batch slots.
//!
//! ```text
//! reader thread ──jobs (bounded)──▶ decode threads ──done (bounded)──▶ assembler ──batches (bounded)──▶ consumer
//!   ▲ takes a free slot per batch        write pixels straight into the slot       ▲ in order            │
//!   └──────────────── free slots (one per slot: the pool) ◀──── a Batch returns its slot when dropped ──┘
//! ```
//!
//! The reader walks the planner's order for this rank from the cursor, loads row
//! groups from the mapped shards (a few at a time, see [`crate::plan`]) and hands each
//! sample's bytes to the decoders with the address of its place in the slot. Decoders
//! write pixels in place; the assembler counts completions and hands batches to the
//! consumer strictly in order. A sample that fails to decode is counted, logged with
//! its shard and key, and replaced by another sample of the same batch (the nearest
//! earlier one that decoded, else the nearest later one), so batches stay full and the
//! result does not depend on thread timing.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{bounded, select, Receiver, Sender};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::dataset::{Dataset, LoadedGroup};
use crate::plan::{per_rank, resumed_order, Cursor, GroupSpan, PlanConfig, Planned, Split};
use crate::PipelineError;
use byol_format::image_error::ImageError;

/// Decodes one sample into its canvas place: `(bytes, stored h, stored w, canvas, out)`
/// → valid `(h, w)`. The OpenCV decoder is [`crate::decode::decode_to_canvas`].
pub type DecodeFn = fn(&[u8], i32, i32, usize, &mut [u8]) -> Result<(i32, i32), ImageError>;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoaderConfig {
    /// Samples per batch.
    pub batch: usize,
    /// Side of the square canvas each image is decoded into.
    pub canvas: usize,
    pub seed: u64,
    pub rank: usize,
    pub world: usize,
    /// Row groups shuffled together (and held in memory by the reader).
    pub window: usize,
    /// Decode threads.
    pub decode_threads: usize,
    /// Batch slots in the pool (batches in flight plus those the consumer holds).
    pub slots: usize,
    /// Drop the last, partial batch of an epoch.
    pub drop_last: bool,
    /// Pin slot memory when CUDA is available.
    pub pin_memory: bool,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        let cores = byol_format::cores();
        LoaderConfig {
            batch: 256,
            canvas: 256,
            seed: 0,
            rank: 0,
            world: 1,
            window: 8,
            decode_threads: cores,
            slots: 4,
            drop_last: true,
            pin_memory: true,
        }
    }
}

/// Time and count counters shared by the stages (nanoseconds).
#[derive(Debug, Default)]
pub struct Stats {
    pub read_busy_ns: AtomicU64,
    pub read_wait_ns: AtomicU64,
    pub decode_busy_ns: AtomicU64,
    pub decode_wait_ns: AtomicU64,
    pub consumer_wait_ns: AtomicU64,
    pub images: AtomicU64,
    pub batches: AtomicU64,
    pub failures: AtomicU64,
    pub groups_loaded: AtomicU64,
    /// The first [`FIRST_FAILURES`] samples that failed to decode: `KEY in SHARD: REASON`.
    pub first_failures: std::sync::Mutex<Vec<String>>,
}

/// How many failed samples [`Stats::first_failures`] keeps.
pub const FIRST_FAILURES: usize = 5;

/// A snapshot of [`Stats`] (seconds).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StatsSnapshot {
    pub read_busy_s: f64,
    pub read_wait_s: f64,
    pub decode_busy_s: f64,
    pub decode_wait_s: f64,
    /// Time the consumer spent waiting in `next()`: the data stall.
    pub consumer_wait_s: f64,
    pub images: u64,
    pub batches: u64,
    pub decode_failures: u64,
    pub groups_loaded: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let s = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64 * 1e-9;
        StatsSnapshot {
            read_busy_s: s(&self.read_busy_ns),
            read_wait_s: s(&self.read_wait_ns),
            decode_busy_s: s(&self.decode_busy_ns),
            decode_wait_s: s(&self.decode_wait_ns),
            consumer_wait_s: s(&self.consumer_wait_ns),
            images: self.images.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            decode_failures: self.failures.load(Ordering::Relaxed),
            groups_loaded: self.groups_loaded.load(Ordering::Relaxed),
        }
    }
}

fn add_since(a: &AtomicU64, t: Instant) {
    a.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
}

/// Per-sample facts of a batch (preallocated with the slot).
#[derive(Debug, Clone, Default)]
struct SlotMeta {
    labels: Vec<i64>,
    rows: Vec<u64>,
    stored: Vec<(i32, i32)>,
    valid: Vec<(i32, i32)>,
    failed: Vec<bool>,
}

/// One preallocated batch buffer.
struct SlotBuf {
    id: usize,
    images: Tensor,
    ptr: usize,
    meta: SlotMeta,
    /// An asynchronous device copy may still read this slot.
    needs_sync: Option<i64>,
}

// Safety: the tensor is only touched by one owner at a time (the slot moves between
// threads through channels); the raw address is used for disjoint per-sample writes
// while the assembler owns the slot and does not touch those bytes.
unsafe impl Send for SlotBuf {}

/// The loader: an opened dataset, its slot pool and counters.
pub struct Loader {
    ds: Arc<Dataset>,
    cfg: LoaderConfig,
    /// The row groups as the planner sees them: the dataset's, or (with a subset) each
    /// group's subset rows numbered contiguously (see [`Loader::with_rows`]).
    spans: Vec<GroupSpan>,
    /// The global row ids of a subset, sorted: planned row `i` is `subset[i]`.
    subset: Option<Arc<[u64]>>,
    decode: DecodeFn,
    free_tx: Sender<SlotBuf>,
    free_rx: Receiver<SlotBuf>,
    stats: Arc<Stats>,
    pinned: bool,
}

impl Loader {
    /// # Errors
    /// [`PipelineError::Config`] for invalid settings (batch 0, a canvas too small, more ranks than rows).
    pub fn new(ds: Dataset, cfg: LoaderConfig, decode: DecodeFn) -> Result<Loader, PipelineError> {
        if cfg.batch == 0 || cfg.canvas == 0 || cfg.world == 0 || cfg.rank >= cfg.world {
            return Err(PipelineError::Config(format!(
                "batch {} canvas {} rank {} world {}: batch and canvas must be positive and rank < world",
                cfg.batch, cfg.canvas, cfg.rank, cfg.world
            )));
        }
        let slots = cfg.slots.max(2);
        let (free_tx, free_rx) = bounded(slots);
        let pinned = cfg.pin_memory && tch::Cuda::is_available();
        let s = cfg.canvas as i64;
        for id in 0..slots {
            let mut images = Tensor::zeros([cfg.batch as i64, 3, s, s], (Kind::Uint8, Device::Cpu));
            if pinned {
                images = images.pin_memory(Device::Cuda(0));
            }
            let ptr = images.data_ptr() as usize;
            let b = cfg.batch;
            let meta = SlotMeta {
                labels: vec![0; b],
                rows: vec![0; b],
                stored: vec![(0, 0); b],
                valid: vec![(0, 0); b],
                failed: vec![false; b],
            };
            free_tx
                .send(SlotBuf {
                    id,
                    images,
                    ptr,
                    meta,
                    needs_sync: None,
                })
                .map_err(|_| PipelineError::Stopped("slot pool".into()))?;
        }
        let spans = ds.spans();
        Ok(Loader {
            ds: Arc::new(ds),
            cfg,
            spans,
            subset: None,
            decode,
            free_tx,
            free_rx,
            stats: Arc::new(Stats::default()),
            pinned,
        })
    }

    pub fn dataset(&self) -> &Dataset {
        &self.ds
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// The first samples that failed to decode (at most [`FIRST_FAILURES`]), each as
    /// `KEY in SHARD: REASON`.
    pub fn first_failures(&self) -> Vec<String> {
        self.stats
            .first_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether slots are in pinned (page-locked) memory.
    pub fn pinned(&self) -> bool {
        self.pinned
    }

    /// Restricts every epoch to the rows `rows` (global row ids: row groups in manifest
    /// order, rows in file order; duplicates ignored): rows outside it are never read
    /// into a batch or decoded. The epoch order, the ranks' parts and the cursor are
    /// those of the planner over the subset alone ([`crate::plan`]), so a subset run
    /// resumes exactly like a whole-dataset one.
    ///
    /// # Errors
    /// [`PipelineError::Config`]: a row id beyond the dataset, or an empty subset.
    pub fn with_rows(mut self, mut rows: Vec<u64>) -> Result<Loader, PipelineError> {
        rows.sort_unstable();
        rows.dedup();
        let total = self.ds.rows();
        match rows.last() {
            None => return Err(PipelineError::Config("an empty subset of rows".into())),
            Some(&last) if last >= total => {
                return Err(PipelineError::Config(format!(
                    "row {last} of a subset is beyond the dataset's {total} rows"
                )))
            }
            Some(_) => {}
        }
        let mut spans = Vec::with_capacity(self.spans.len());
        let mut i = 0usize;
        for sp in self.ds.spans() {
            let first = i;
            while i < rows.len() && rows[i] < sp.first_row + sp.rows {
                i += 1;
            }
            spans.push(GroupSpan {
                first_row: first as u64,
                rows: (i - first) as u64,
            });
        }
        self.spans = spans;
        self.subset = Some(rows.into());
        Ok(self)
    }

    /// Rows an epoch plans over: the dataset's, or the subset's.
    pub fn rows(&self) -> u64 {
        match &self.subset {
            Some(s) => s.len() as u64,
            None => self.ds.rows(),
        }
    }

    /// Samples this rank sees per epoch.
    pub fn samples_per_epoch(&self) -> u64 {
        per_rank(self.rows(), self.cfg.world)
    }

    /// Batches this rank sees per epoch.
    pub fn batches_per_epoch(&self) -> u64 {
        let n = self.samples_per_epoch();
        let b = self.cfg.batch as u64;
        if self.cfg.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    fn plan(&self) -> PlanConfig {
        PlanConfig {
            seed: self.cfg.seed,
            rank: self.cfg.rank,
            world: self.cfg.world,
            window: self.cfg.window,
        }
    }

    /// The global row ids this rank reads in `epoch`, in order (no decoding).
    pub fn order(&self, epoch: u64) -> Vec<u64> {
        self.order_resumed(epoch, &[])
    }

    /// The global row ids this rank reads in `epoch` after `splits` (see
    /// [`crate::plan::resumed_order`]), in order.
    pub fn order_resumed(&self, epoch: u64, splits: &[Split]) -> Vec<u64> {
        self.planned(epoch, splits).iter().map(|p| p.row).collect()
    }

    /// The planner's order (see [`crate::plan::resumed_order`]) with a subset's rows
    /// mapped back to global row ids.
    fn planned(&self, epoch: u64, splits: &[Split]) -> Vec<Planned> {
        let mut order = resumed_order(&self.spans, &self.plan(), epoch, splits);
        if let Some(subset) = &self.subset {
            for p in &mut order {
                p.row = subset[p.row as usize];
            }
        }
        order
    }

    /// Starts streaming from `cursor` to the end of its epoch.
    pub fn start(&self, cursor: Cursor) -> Epoch {
        self.start_resumed(cursor, &[])
    }

    /// Starts streaming from `cursor` in an epoch that earlier world sizes began
    /// (`splits`, see [`crate::plan::resumed_order`]; empty: [`Loader::start`]).
    pub fn start_resumed(&self, cursor: Cursor, splits: &[Split]) -> Epoch {
        let order = self.planned(cursor.epoch, splits);
        let b = self.cfg.batch;
        let start = (cursor.consumed as usize).min(order.len());
        let remaining = order.len() - start;
        let nbatches = if self.cfg.drop_last {
            remaining / b
        } else {
            remaining.div_ceil(b)
        };
        let workers = self.cfg.decode_threads.max(1);
        let (job_tx, job_rx) = bounded::<Job>(4 * workers);
        let (msg_tx, msg_rx) = bounded::<Msg>(4 * workers + 4);
        let (out_tx, out_rx) = bounded::<Result<Ready, PipelineError>>(self.cfg.slots.max(2));
        let (stop_tx, stop_rx) = bounded::<()>(0);
        let mut threads = Vec::new();

        // Reader.
        {
            let ds = self.ds.clone();
            let stats = self.stats.clone();
            let free_rx = self.free_rx.clone();
            let free_tx = self.free_tx.clone();
            let msg_tx = msg_tx.clone();
            let canvas = self.cfg.canvas;
            let window = self.cfg.window.max(1);
            threads.push(spawn("byol-reader", move || {
                reader(ReaderCtx {
                    ds,
                    stats,
                    order,
                    start,
                    nbatches,
                    batch: b,
                    canvas,
                    window,
                    free_rx,
                    free_tx,
                    stop_rx,
                    job_tx,
                    msg_tx,
                })
            }));
        }
        // Decoders.
        for t in 0..workers {
            let job_rx = job_rx.clone();
            let msg_tx = msg_tx.clone();
            let stats = self.stats.clone();
            let ds = self.ds.clone();
            let decode = self.decode;
            let canvas = self.cfg.canvas;
            threads.push(spawn(&format!("byol-decode-{t}"), move || {
                decoder(job_rx, msg_tx, stats, ds, decode, canvas)
            }));
        }
        drop(job_rx);
        drop(msg_tx);
        // Assembler.
        {
            let stats = self.stats.clone();
            let canvas = self.cfg.canvas;
            let free_tx = self.free_tx.clone();
            threads.push(spawn("byol-assemble", move || {
                let mut inflight = HashMap::new();
                assembler(&msg_rx, out_tx, stats, canvas, &mut inflight);
                // Slots of batches that will never complete go back to the pool,
                // including those still on their way (until the other stages stop).
                for (_, f) in inflight.drain() {
                    let _ = free_tx.try_send(f.slot);
                }
                for msg in msg_rx.iter() {
                    if let Msg::Start { slot, .. } = msg {
                        let _ = free_tx.try_send(slot);
                    }
                }
            }));
        }
        Epoch {
            out_rx,
            free_tx: self.free_tx.clone(),
            _stop: stop_tx,
            threads,
            stats: self.stats.clone(),
            cursor,
            batch: b,
            total: (start + remaining.min(nbatches * b)) as u64,
            delivered: 0,
            nbatches,
            finished: false,
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    // Spawning only fails when the OS is out of threads; then nothing can run.
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .unwrap_or_else(|e| panic!("cannot start thread {name}: {e}"))
}

struct Job {
    batch: usize,
    index: usize,
    group: Arc<LoadedGroup>,
    row_in_group: usize,
    dst: usize,
}

enum Msg {
    Start {
        batch: usize,
        len: usize,
        slot: SlotBuf,
    },
    Done(Done),
    Fatal(PipelineError),
}

struct Done {
    batch: usize,
    index: usize,
    label: i64,
    row: u64,
    stored: (i32, i32),
    valid: Option<(i32, i32)>,
}

struct ReaderCtx {
    ds: Arc<Dataset>,
    stats: Arc<Stats>,
    order: Vec<crate::plan::Planned>,
    start: usize,
    nbatches: usize,
    batch: usize,
    canvas: usize,
    window: usize,
    free_rx: Receiver<SlotBuf>,
    free_tx: Sender<SlotBuf>,
    stop_rx: Receiver<()>,
    job_tx: Sender<Job>,
    msg_tx: Sender<Msg>,
}

fn reader(c: ReaderCtx) {
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| reader_loop(&c)));
    let err = match res {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e,
        Err(p) => PipelineError::Panic(format!("reader: {}", panic_text(&p))),
    };
    let _ = c.msg_tx.send(Msg::Fatal(err));
}

fn reader_loop(c: &ReaderCtx) -> Result<(), PipelineError> {
    let mut cache: HashMap<u32, Arc<LoadedGroup>> = HashMap::new();
    let mut lru: VecDeque<u32> = VecDeque::new();
    let per = 3 * c.canvas * c.canvas;
    for bi in 0..c.nbatches {
        let t = Instant::now();
        let mut slot = select! {
            recv(c.free_rx) -> s => match s { Ok(s) => s, Err(_) => return Ok(()) },
            recv(c.stop_rx) -> _ => return Ok(()),
        };
        if let Some(dev) = slot.needs_sync.take() {
            // An asynchronous copy from this slot may be in flight: wait for the device
            // (on this thread, not the trainer's) before overwriting it.
            tch::Cuda::synchronize(dev);
        }
        add_since(&c.stats.read_wait_ns, t);
        let lo = c.start + bi * c.batch;
        let hi = (lo + c.batch).min(c.order.len());
        let ptr = slot.ptr;
        let len = hi - lo;
        slot.meta.failed.iter_mut().for_each(|f| *f = false);
        if let Err(crossbeam_channel::SendError(Msg::Start { slot, .. })) =
            c.msg_tx.send(Msg::Start {
                batch: bi,
                len,
                slot,
            })
        {
            let _ = c.free_tx.try_send(slot);
            return Ok(());
        }
        for (i, p) in c.order[lo..hi].iter().enumerate() {
            let t = Instant::now();
            let group = match cache.get(&p.group) {
                Some(g) => g.clone(),
                None => {
                    let g = Arc::new(c.ds.load_group(p.group as usize)?);
                    c.stats.groups_loaded.fetch_add(1, Ordering::Relaxed);
                    cache.insert(p.group, g.clone());
                    lru.push_back(p.group);
                    while lru.len() > c.window {
                        if let Some(old) = lru.pop_front() {
                            cache.remove(&old);
                        }
                    }
                    g
                }
            };
            let row_in_group = (p.row - group.info.span.first_row) as usize;
            add_since(&c.stats.read_busy_ns, t);
            let t = Instant::now();
            let job = Job {
                batch: bi,
                index: i,
                group,
                row_in_group,
                dst: ptr + i * per,
            };
            let sent = select! {
                send(c.job_tx, job) -> r => r.is_ok(),
                recv(c.stop_rx) -> _ => false,
            };
            add_since(&c.stats.read_wait_ns, t);
            if !sent {
                return Ok(());
            }
        }
    }
    Ok(())
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

fn decoder(
    job_rx: Receiver<Job>,
    msg_tx: Sender<Msg>,
    stats: Arc<Stats>,
    ds: Arc<Dataset>,
    decode: DecodeFn,
    canvas: usize,
) {
    let per = 3 * canvas * canvas;
    loop {
        let t = Instant::now();
        let Ok(job) = job_rx.recv() else { return };
        add_since(&stats.decode_wait_ns, t);
        let t = Instant::now();
        let g = &job.group;
        let r = job.row_in_group;
        let stored = (g.heights.value(r), g.widths.value(r));
        let bytes = g.images.value(r);
        // Safety: `dst` is this sample's own region of a slot owned by the assembler,
        // which does not touch it until this job's `Done` arrives.
        let out = unsafe { std::slice::from_raw_parts_mut(job.dst as *mut u8, per) };
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            decode(bytes, stored.0, stored.1, canvas, out)
        }));
        let valid = match res {
            Ok(Ok(v)) => Some(v),
            Ok(Err(reason)) => {
                stats.failures.fetch_add(1, Ordering::Relaxed);
                let mut first = stats
                    .first_failures
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if first.len() < FIRST_FAILURES {
                    first.push(format!(
                        "{} in {}: {reason}",
                        g.keys.value(r),
                        ds.shard_path(g.info.shard).display()
                    ));
                }
                drop(first);
                tracing::warn!(
                    shard = %ds.shard_path(g.info.shard).display(),
                    key = g.keys.value(r),
                    %reason,
                    "sample failed to decode; replaced by another sample of its batch"
                );
                None
            }
            Err(p) => {
                let e = PipelineError::Panic(format!(
                    "decoding {} in {}: {}",
                    g.keys.value(r),
                    ds.shard_path(g.info.shard).display(),
                    panic_text(&p)
                ));
                let _ = msg_tx.send(Msg::Fatal(e));
                return;
            }
        };
        add_since(&stats.decode_busy_ns, t);
        stats.images.fetch_add(1, Ordering::Relaxed);
        let done = Done {
            batch: job.batch,
            index: job.index,
            label: g.labels.value(r) as i64,
            row: g.info.span.first_row + r as u64,
            stored,
            valid,
        };
        if msg_tx.send(Msg::Done(done)).is_err() {
            return;
        }
    }
}

struct InFlight {
    len: usize,
    done: usize,
    slot: SlotBuf,
}

/// A completed batch on its way to the consumer.
struct Ready {
    slot: SlotBuf,
    len: usize,
    failed: usize,
}

fn assembler(
    msg_rx: &Receiver<Msg>,
    out_tx: Sender<Result<Ready, PipelineError>>,
    stats: Arc<Stats>,
    canvas: usize,
    inflight: &mut HashMap<usize, InFlight>,
) {
    let per = 3 * canvas * canvas;
    let mut next = 0usize;
    for msg in msg_rx.iter() {
        match msg {
            Msg::Start { batch, len, slot } => {
                inflight.insert(batch, InFlight { len, done: 0, slot });
            }
            Msg::Done(d) => {
                let Some(f) = inflight.get_mut(&d.batch) else {
                    let _ = out_tx.send(Err(PipelineError::Panic(
                        "sample for an unknown batch".into(),
                    )));
                    return;
                };
                let m = &mut f.slot.meta;
                m.labels[d.index] = d.label;
                m.rows[d.index] = d.row;
                m.stored[d.index] = d.stored;
                m.valid[d.index] = d.valid.unwrap_or((0, 0));
                m.failed[d.index] = d.valid.is_none();
                f.done += 1;
            }
            Msg::Fatal(e) => {
                let _ = out_tx.send(Err(e));
                return;
            }
        }
        while inflight.get(&next).is_some_and(|f| f.done == f.len) {
            let Some(mut f) = inflight.remove(&next) else {
                break;
            };
            let failed = replace_failed(&mut f, per);
            stats.batches.fetch_add(1, Ordering::Relaxed);
            let ready = Ready {
                slot: f.slot,
                len: f.len,
                failed,
            };
            if let Err(crossbeam_channel::SendError(Ok(r))) = out_tx.send(Ok(ready)) {
                inflight.insert(
                    usize::MAX,
                    InFlight {
                        len: 0,
                        done: 0,
                        slot: r.slot,
                    },
                );
                return;
            }
            next += 1;
        }
    }
}

/// Fills each failed sample with the nearest earlier good sample of the batch (else
/// the nearest later one). Returns how many were replaced.
fn replace_failed(f: &mut InFlight, per: usize) -> usize {
    let m = &mut f.slot.meta;
    let bad: Vec<usize> = (0..f.len).filter(|&i| m.failed[i]).collect();
    if bad.is_empty() {
        return 0;
    }
    for &i in &bad {
        let src = (0..i).rev().chain(i + 1..f.len).find(|&j| !m.failed[j]);
        match src {
            Some(j) => {
                // Safety: both regions lie inside this slot, which the assembler owns
                // now that every decoder is done with it; i != j so they do not overlap.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        (f.slot.ptr + j * per) as *const u8,
                        (f.slot.ptr + i * per) as *mut u8,
                        per,
                    );
                }
                m.labels[i] = m.labels[j];
                m.rows[i] = m.rows[j];
                m.stored[i] = m.stored[j];
                m.valid[i] = m.valid[j];
            }
            None => {
                // Nothing in the batch decoded: leave a blank canvas with a 1×1 valid region
                // (marked in `failed`, so no consumer takes it for its row).
                unsafe { std::ptr::write_bytes((f.slot.ptr + i * per) as *mut u8, 0, per) };
                m.valid[i] = (1, 1);
                m.labels[i] = -1;
            }
        }
    }
    bad.len()
}

/// One epoch's stream of batches. Dropping it stops every thread promptly.
pub struct Epoch {
    out_rx: Receiver<Result<Ready, PipelineError>>,
    free_tx: Sender<SlotBuf>,
    _stop: Sender<()>,
    threads: Vec<JoinHandle<()>>,
    stats: Arc<Stats>,
    cursor: Cursor,
    batch: usize,
    /// The cursor's `consumed` after the last batch of this epoch.
    total: u64,
    delivered: usize,
    nbatches: usize,
    finished: bool,
}

impl Epoch {
    /// Batches this epoch will deliver from its starting cursor.
    pub fn len(&self) -> usize {
        self.nbatches
    }

    pub fn is_empty(&self) -> bool {
        self.nbatches == 0
    }

    /// The cursor's `consumed` once the epoch is complete.
    pub fn end_consumed(&self) -> u64 {
        self.total
    }
}

impl Iterator for Epoch {
    type Item = Result<Batch, PipelineError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished || self.delivered >= self.nbatches {
            self.finished = true;
            return None;
        }
        let t = Instant::now();
        let r = self.out_rx.recv();
        add_since(&self.stats.consumer_wait_ns, t);
        match r {
            Ok(Ok(ready)) => {
                let consumed =
                    self.cursor.consumed + (self.delivered * self.batch + ready.len) as u64;
                let index = self.delivered;
                self.delivered += 1;
                Some(Ok(Batch {
                    index,
                    cursor: Cursor {
                        epoch: self.cursor.epoch,
                        consumed,
                    },
                    len: ready.len,
                    failed: ready.failed,
                    slot: Some(ready.slot),
                    free_tx: self.free_tx.clone(),
                }))
            }
            Ok(Err(e)) => {
                self.finished = true;
                Some(Err(e))
            }
            Err(_) => {
                self.finished = true;
                Some(Err(PipelineError::Stopped(format!(
                    "pipeline stopped after {} of {} batches",
                    self.delivered, self.nbatches
                ))))
            }
        }
    }
}

impl Drop for Epoch {
    fn drop(&mut self) {
        // Dropping the stop sender makes the reader stop taking slots; decoders finish
        // the few queued jobs and the assembler closes the stream. Batches delivered
        // but never consumed go back to the pool.
        let (stop, _) = bounded(0);
        self._stop = stop;
        while let Ok(r) = self.out_rx.recv() {
            if let Ok(ready) = r {
                let _ = self.free_tx.try_send(ready.slot);
            }
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A batch of decoded canvases. Holds its slot until dropped.
pub struct Batch {
    /// Batch number within this epoch stream (0 = first after the starting cursor).
    pub index: usize,
    /// The cursor after this batch: resuming from it continues with the next batch.
    pub cursor: Cursor,
    len: usize,
    failed: usize,
    slot: Option<SlotBuf>,
    free_tx: Sender<SlotBuf>,
}

impl Batch {
    fn slot(&self) -> &SlotBuf {
        // Present from construction until drop.
        self.slot
            .as_ref()
            .unwrap_or_else(|| unreachable!("batch without slot"))
    }

    /// Samples in this batch (the batch size, or fewer for a last partial batch).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Samples that failed to decode and were replaced.
    pub fn replaced(&self) -> usize {
        self.failed
    }

    /// Per sample, whether it is a replacement: its own image failed to decode, and its
    /// canvas (and label, row and sizes) are a copy of another sample of the batch, or
    /// a blank canvas when nothing in the batch decoded. A replacement never stands for
    /// its row: evaluation and embedding skip it; training counts it.
    pub fn replaced_mask(&self) -> &[bool] {
        &self.slot().meta.failed[..self.len]
    }

    /// Canvases, uint8 `[len, 3, S, S]` (RGB), on the CPU, pinned when CUDA is present.
    /// A view of the slot: do not keep it after the batch is dropped.
    pub fn images(&self) -> Tensor {
        let t = &self.slot().images;
        if self.len == t.size()[0] as usize {
            t.shallow_clone()
        } else {
            t.narrow(0, 0, self.len as i64)
        }
    }

    /// Copies the canvases to `device`. To CUDA the copy is asynchronous; the slot is
    /// not reused until the device has finished it.
    pub fn to_device(&mut self, device: Device) -> Tensor {
        let t = self.images();
        match device {
            Device::Cuda(i) => {
                let out = t.to_device_(device, Kind::Uint8, true, false);
                if let Some(s) = self.slot.as_mut() {
                    s.needs_sync = Some(i as i64);
                }
                out
            }
            _ => t,
        }
    }

    pub fn labels(&self) -> &[i64] {
        &self.slot().meta.labels[..self.len]
    }

    /// Global row ids (row groups in manifest order); see [`Dataset`].
    pub fn rows(&self) -> &[u64] {
        &self.slot().meta.rows[..self.len]
    }

    /// Stored `(height, width)` of each image.
    pub fn stored_sizes(&self) -> &[(i32, i32)] {
        &self.slot().meta.stored[..self.len]
    }

    /// Valid `(height, width)` region of each canvas (top-left).
    pub fn valid_sizes(&self) -> &[(i32, i32)] {
        &self.slot().meta.valid[..self.len]
    }

    /// Identity of the slot (for tests of the pool).
    pub fn slot_id(&self) -> usize {
        self.slot().id
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        if let Some(s) = self.slot.take() {
            // The pool has room for every slot, so this never blocks; if the loader is
            // gone the slot is simply freed.
            let _ = self.free_tx.try_send(s);
        }
    }
}
