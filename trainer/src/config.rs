//! The training config: one TOML file holds every hyper-parameter of a run.

use serde::{Deserialize, Serialize};

use byol_pipeline::augment::AugmentConfig;

use crate::byol::OptimizerKind;
use crate::model::{EncoderConfig, HeadConfig};

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
    pub device: String,
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
    pub precision: String,
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
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            batch: 256,
            epochs: 100,
            total_steps: 0,
            seed: 0,
            device: "auto".into(),
            tau_base: 0.99,
            log_every: 10,
            checkpoint_every: 500,
            keep: 3,
            collapse_span: 200,
            collapse_threshold: 0.05,
            torch_threads: 0,
            channels_last: true,
            precision: "auto".into(),
            knn_every_epochs: 1,
            knn_bank: 10000,
            knn_queries: 2000,
            collective_timeout_s: 600.0,
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
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            canvas: 256,
            decode_threads: 0,
            window: 8,
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
    /// What `auto` settings and `--time-budget` resolved to when the run last started
    /// (written by `byol train`; informative only: never compared on `--resume`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolved: Option<Resolved>,
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
    "train.collapse_span",
    "train.collapse_threshold",
    "train.collective_timeout_s",
];

/// Why a config could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not TOML, or not a config: the source names the key and, without `--set`
    /// overrides, the line and column.
    #[error("invalid config")]
    Parse(#[source] toml::de::Error),
    /// The config is valid TOML but a `--set` override made it invalid.
    #[error("invalid config after --set {}", .sets.join(" --set "))]
    AfterSets {
        sets: Vec<String>,
        #[source]
        source: toml::de::Error,
    },
    #[error("--set {0}: expected key=value (for example optim.base_lr=0.3)")]
    BadSet(String),
}

impl TrainConfig {
    /// Parses TOML text, then applies `key=value` overrides (dotted keys; values in TOML
    /// syntax, bare words taken as strings).
    ///
    /// # Errors
    /// [`ConfigError`]: invalid TOML or an unknown/mistyped key (with its line and column
    /// when there are no overrides), or a malformed override.
    pub fn from_toml(text: &str, sets: &[String]) -> Result<TrainConfig, ConfigError> {
        if sets.is_empty() {
            return toml::from_str(text).map_err(ConfigError::Parse);
        }
        let mut v: toml::Table = toml::from_str(text).map_err(ConfigError::Parse)?;
        for s in sets {
            let (k, val) = s
                .split_once('=')
                .ok_or_else(|| ConfigError::BadSet(s.clone()))?;
            let parsed: toml::Value = toml::from_str::<toml::Table>(&format!("x = {val}"))
                .ok()
                .and_then(|t| t.get("x").cloned())
                .unwrap_or_else(|| toml::Value::String(val.to_string()));
            let parts: Vec<&str> = k.trim().split('.').collect();
            let mut cur = &mut v;
            for p in &parts[..parts.len() - 1] {
                let e = cur
                    .entry(p.to_string())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                cur = e
                    .as_table_mut()
                    .ok_or_else(|| ConfigError::BadSet(s.clone()))?;
            }
            cur.insert(parts[parts.len() - 1].to_string(), parsed);
        }
        v.try_into()
            .map_err(|source: toml::de::Error| ConfigError::AfterSets {
                sets: sets.to_vec(),
                source,
            })
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// Dotted keys whose values differ between two configs.
    pub fn differences(&self, other: &TrainConfig) -> Vec<String> {
        fn flat(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, serde_json::Value)>) {
            match v {
                serde_json::Value::Object(m) => {
                    for (k, x) in m {
                        let p = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        flat(&p, x, out);
                    }
                }
                _ => out.push((prefix.to_string(), v.clone())),
            }
        }
        let (mut a, mut b) = (Vec::new(), Vec::new());
        flat("", &serde_json::to_value(self).unwrap_or_default(), &mut a);
        flat("", &serde_json::to_value(other).unwrap_or_default(), &mut b);
        let bm: std::collections::HashMap<_, _> = b.into_iter().collect();
        a.into_iter()
            .filter(|(k, _)| !k.starts_with("resolved."))
            .filter(|(k, v)| bm.get(k) != Some(v))
            .map(|(k, _)| k)
            .collect()
    }
}
