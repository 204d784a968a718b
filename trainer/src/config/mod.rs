//! The training config: one TOML file holds every hyper-parameter of a run.
//!
//! A leaf module (it imports nothing else of the crate): every other part reads its
//! settings from here. [`TrainConfig::from_toml`] and [`TrainConfig::with_sets`] check
//! every value when the config loads ([`TrainConfig::validate`]), so a bad value is
//! refused with its key before any work starts.

use serde::{Deserialize, Serialize};

use byol_pipeline::augment::AugmentConfig;

/// The torchvision ResNet depths byol builds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Resnet18,
    Resnet34,
    Resnet50,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EncoderConfig {
    pub arch: Arch,
    /// 3×3 stride-1 first convolution and no max-pool (small images).
    pub cifar_stem: bool,
    /// Max-pool (3×3, stride 2) after the stem; default: on for the ImageNet stem, off
    /// for the CIFAR stem. With the CIFAR stem it halves every stage's resolution, so
    /// twice the width costs about the same compute.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stem_pool: Option<bool>,
    /// Channel width multiplier (1.0 = torchvision's widths).
    pub width: f64,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        EncoderConfig {
            arch: Arch::Resnet50,
            cifar_stem: false,
            stem_pool: None,
            width: 1.0,
        }
    }
}

impl EncoderConfig {
    /// Whether the stem has its 3×3 stride-2 max-pool (`stem_pool`, default: on for the
    /// ImageNet stem, off for the CIFAR stem).
    pub fn stem_pool(&self) -> bool {
        self.stem_pool.unwrap_or(!self.cifar_stem)
    }

    /// The first convolution's (kernel, stride, padding): torchvision's 7×7/2 (pad 3),
    /// or 3×3/1 (pad 1) for the CIFAR stem.
    pub fn stem_conv(&self) -> (i64, i64, i64) {
        if self.cifar_stem {
            (3, 1, 1)
        } else {
            (7, 2, 3)
        }
    }

    /// Blocks per stage (torchvision: ResNet-18 `[2, 2, 2, 2]`, ResNet-34 and -50
    /// `[3, 4, 6, 3]`) and whether they are bottlenecks (ResNet-50).
    pub fn stages(&self) -> ([usize; 4], bool) {
        match self.arch {
            Arch::Resnet18 => ([2, 2, 2, 2], false),
            Arch::Resnet34 => ([3, 4, 6, 3], false),
            Arch::Resnet50 => ([3, 4, 6, 3], true),
        }
    }

    /// The stride of block `block` of stage `stage` (both from 0): 2 for the first block
    /// of stages 2–4 (torchvision puts it on the 3×3 convolution), else 1.
    pub fn block_stride(stage: usize, block: usize) -> i64 {
        if block == 0 && stage > 0 {
            2
        } else {
            1
        }
    }

    /// Channels of a stage's base width (64, 128, 256, 512) times `width`, at least 1.
    pub fn channels(&self, base: i64) -> i64 {
        ((base as f64 * self.width).round() as i64).max(1)
    }
}

/// An MLP head's sizes (BYOL's projector and predictor: 4096 hidden, 256 out).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HeadConfig {
    pub hidden: i64,
    pub out: i64,
}

impl Default for HeadConfig {
    fn default() -> Self {
        HeadConfig {
            hidden: 4096,
            out: 256,
        }
    }
}

/// The optimizer of the networks.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Lars,
    Sgd,
    /// Adam with decoupled weight decay (torch.optim.AdamW; β1 = `momentum`).
    Adamw,
}

/// `train.device`: where a run trains.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when available, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

/// `train.precision`: the forward pass's precision.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// bf16 autocast where the hardware computes bf16 natively, float32 elsewhere.
    #[default]
    Auto,
    Fp32,
    Bf16,
}

impl Precision {
    /// The name as the config spells it.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Auto => "auto",
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    pub encoder: EncoderConfig,
    pub projector: HeadConfig,
    pub predictor: HeadConfig,
    /// SyncBatchNorm (statistics over every rank's share of the global batch, as the BYOL
    /// paper trains) in the online and target networks when the world size is above 1;
    /// unset means on. No effect on one process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync_bn: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    pub kind: OptimizerKind,
    /// Learning rate at batch 256 (scaled by batch/256).
    pub base_lr: f64,
    pub weight_decay: f64,
    pub momentum: f64,
    /// LARS trust coefficient η.
    pub trust: f64,
    pub warmup_epochs: f64,
    /// AdamW only: β2 and ε (β1 is `momentum`).
    pub beta2: f64,
    pub eps: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            kind: OptimizerKind::Lars,
            base_lr: 0.2,
            weight_decay: 1.5e-6,
            momentum: 0.9,
            trust: 1e-3,
            warmup_epochs: 10.0,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Images per step (the global batch).
    pub batch: usize,
    /// Epochs of the run (its length when `total_steps` is 0).
    pub epochs: u64,
    /// The run's length in steps when > 0 (it then overrides `epochs`; `byol train
    /// --time-budget` sets it). The learning-rate and τ schedules span these steps.
    pub total_steps: u64,
    pub seed: u64,
    /// `auto` (CUDA when available), `cpu` or `cuda`.
    pub device: DeviceChoice,
    /// τ_base of the target's moving average.
    pub tau_base: f64,
    /// Steps between metrics rows.
    pub log_every: u64,
    /// Steps between checkpoints (one is also written at each epoch end).
    pub checkpoint_every: u64,
    /// Checkpoints kept.
    pub keep: usize,
    /// Steps of a collapse-monitor value below `collapse_threshold` that trigger a warning.
    pub collapse_span: u64,
    pub collapse_threshold: f64,
    /// CPU threads for libtorch (0: libtorch's default).
    pub torch_threads: i32,
    /// Run convolutions in channels-last layout (faster on CPU and on recent GPUs).
    pub channels_last: bool,
    /// Forward-pass precision: `auto` (bf16 autocast where the hardware computes bf16
    /// natively: CUDA from compute capability 8.0, CPUs with AVX-512 BF16 or AMX;
    /// float32 elsewhere), `fp32`, or `bf16` (autocast on either device; a warning where
    /// bf16 is emulated). See `amp::choose_precision`.
    pub precision: Precision,
    /// kNN monitor every N epochs when `--val` is given (0: never).
    pub knn_every_epochs: u64,
    /// Training images in the kNN monitor's bank.
    pub knn_bank: usize,
    /// Held-out images it classifies.
    pub knn_queries: usize,
    /// Distributed training: how long a rank waits for the others at the rendezvous and
    /// in each collective before failing with the name of the rank that stopped
    /// reporting (seconds; torch's default is 30 minutes).
    pub collective_timeout_s: f64,
    /// Write TensorBoard event files (`RUN/tb`): every metrics row's numbers, the
    /// resolved config and the augmentation preview.
    pub tensorboard: bool,
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            batch: 256,
            epochs: 100,
            total_steps: 0,
            seed: 0,
            device: DeviceChoice::Auto,
            tau_base: 0.99,
            log_every: 10,
            checkpoint_every: 500,
            keep: 3,
            collapse_span: 200,
            collapse_threshold: 0.05,
            torch_threads: 0,
            channels_last: true,
            precision: Precision::Auto,
            knn_every_epochs: 1,
            knn_bank: 10000,
            knn_queries: 2000,
            collective_timeout_s: 600.0,
            tensorboard: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// Side of the decode canvas.
    pub canvas: usize,
    /// Decode threads (0: all cores).
    pub decode_threads: usize,
    /// Row groups shuffled together.
    pub window: usize,
    /// The share of decoded samples that may fail (damaged images, replaced in their
    /// batch) before training stops with an error naming the first ones; checked once
    /// 100 samples (or an epoch, if smaller) have been decoded.
    pub max_decode_failure_rate: f64,
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            canvas: 256,
            decode_threads: 0,
            window: 8,
            max_decode_failure_rate: byol_format::shards::DEFAULT_MAX_DECODE_FAILURE_RATE,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub model: ModelConfig,
    pub optim: OptimConfig,
    pub train: TrainSection,
    pub data: DataSection,
    pub augment: AugmentConfig,
    /// A fine-tuned run's recipe and provenance (`byol finetune`); absent in a BYOL run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finetune: Option<FinetuneConfig>,
    /// What `auto` settings and `--time-budget` resolved to when the run last started
    /// (written by `byol train`; informative only: never compared on `--resume`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolved: Option<Resolved>,
}

/// `finetune.init`: where the fine-tuned encoder starts.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum FinetuneInit {
    /// The pretrained run's online encoder.
    #[default]
    Byol,
    /// A random encoder of the same shape, seeded with `train.seed`: the supervised
    /// baseline on the same labels.
    Random,
}

/// `[finetune]`: the semi-supervised recipe of the BYOL paper (appendix C.2, after
/// SimCLR's protocol): cross-entropy on a new linear head, the whole network trained,
/// SGD with Nesterov momentum 0.9, no weight decay or other regularisation, a cosine
/// learning-rate decay without warm-up, random resized crop and horizontal flip only.
/// The paper uses batch 1024 and sweeps the learning rate over {0.005, 0.01, 0.02,
/// 0.05, 0.1} and the epochs over {30, 50} on a held-out split; the defaults are the
/// middle of that sweep (`configs/finetune-imagenet.toml`). The provenance fields
/// (`source_*`, `classes`, `labels`) are written by `byol finetune`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FinetuneConfig {
    pub init: FinetuneInit,
    /// Train the head only (the encoder frozen, its BatchNorm in inference mode): linear
    /// evaluation through the same loop.
    pub linear: bool,
    /// Global batch (split over ranks).
    pub batch: usize,
    pub epochs: u64,
    /// The length in steps when non-zero (instead of `epochs`).
    pub total_steps: u64,
    /// Peak learning rate (not scaled with the batch), decayed by a cosine to 0.
    pub lr: f64,
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    /// Random resized crop: area fraction U(min, max) and log-uniform aspect ratio.
    pub crop_scale: [f64; 2],
    pub crop_ratio: [f64; 2],
    pub flip_p: f64,
    /// The pretrained run and its checkpoint (its online encoder, or only its shape
    /// with `init = "random"`).
    pub source_run: String,
    pub source_checkpoint: String,
    pub source_step: u64,
    /// The head's classes, in label order (the training shards' classes).
    pub classes: Vec<String>,
    /// How the labelled subset was chosen, and its size (rows).
    pub subset: String,
    pub labels: u64,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        FinetuneConfig {
            init: FinetuneInit::Byol,
            linear: false,
            batch: 1024,
            epochs: 30,
            total_steps: 0,
            lr: 0.02,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 0.0,
            crop_scale: [0.08, 1.0],
            crop_ratio: [3.0 / 4.0, 4.0 / 3.0],
            flip_p: 0.5,
            source_run: String::new(),
            source_checkpoint: String::new(),
            source_step: 0,
            classes: Vec::new(),
            subset: String::new(),
            labels: 0,
        }
    }
}

/// The values a run's `auto` settings and time budget resolved to on its machine.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default)]
pub struct Resolved {
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// `bf16` or `fp32`.
    pub precision: String,
    pub precision_reason: String,
    /// The CPU flags that matter for the choice (`avx2 avx512f avx512_bf16 …`).
    pub cpu: String,
    /// Steps per epoch of the run's dataset at its batch size.
    pub steps_per_epoch: u64,
    /// `--time-budget` in seconds, when the run's length was chosen from one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_budget_s: Option<f64>,
    /// Training images/s measured by the calibration before the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calibrated_images_per_s: Option<f64>,
    /// How the run's length was chosen from the budget.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_reason: Option<String>,
}

/// Settings that may change when a run is resumed (they do not alter the result).
pub const RESUMABLE_CHANGES: &[&str] = &[
    "train.log_every",
    "train.checkpoint_every",
    "train.keep",
    "train.torch_threads",
    "train.channels_last",
    "train.precision",
    "train.knn_every_epochs",
    "train.knn_bank",
    "train.knn_queries",
    "data.decode_threads",
    "data.max_decode_failure_rate",
    "train.collapse_span",
    "train.collapse_threshold",
    "train.collective_timeout_s",
    "train.tensorboard",
];

mod load;
pub use load::{ConfigDifference, ConfigError};
