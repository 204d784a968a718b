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
    /// A value outside its range.
    #[error("{key} = {value}: {expected}")]
    Range {
        key: &'static str,
        value: String,
        expected: &'static str,
    },
}

/// Refuses `value` of `key` unless `ok`.
fn check(
    ok: bool,
    key: &'static str,
    value: impl std::fmt::Display,
    expected: &'static str,
) -> Result<(), ConfigError> {
    if ok {
        return Ok(());
    }
    Err(ConfigError::Range {
        key,
        value: value.to_string(),
        expected,
    })
}

/// `x` is a finite number in `[lo, hi]`.
fn within(x: f64, lo: f64, hi: f64) -> bool {
    x.is_finite() && (lo..=hi).contains(&x)
}

/// `key=value` overrides applied to a TOML table (dotted keys; values in TOML syntax,
/// bare words taken as strings).
fn apply_sets(v: &mut toml::Table, sets: &[String]) -> Result<(), ConfigError> {
    for s in sets {
        let (k, val) = s
            .split_once('=')
            .ok_or_else(|| ConfigError::BadSet(s.clone()))?;
        let parsed: toml::Value = toml::from_str::<toml::Table>(&format!("x = {val}"))
            .ok()
            .and_then(|t| t.get("x").cloned())
            .unwrap_or_else(|| toml::Value::String(val.to_string()));
        let parts: Vec<&str> = k.trim().split('.').collect();
        let mut cur = &mut *v;
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
    Ok(())
}

impl TrainConfig {
    /// Parses TOML text, applies `key=value` overrides (dotted keys; values in TOML
    /// syntax, bare words taken as strings) and checks every value ([`Self::validate`]).
    ///
    /// # Errors
    /// [`ConfigError`]: invalid TOML or an unknown/mistyped key (with its line and column
    /// when there are no overrides), a malformed override, or a value out of range.
    pub fn from_toml(text: &str, sets: &[String]) -> Result<TrainConfig, ConfigError> {
        let c: TrainConfig = if sets.is_empty() {
            toml::from_str(text).map_err(ConfigError::Parse)?
        } else {
            let mut v: toml::Table = toml::from_str(text).map_err(ConfigError::Parse)?;
            apply_sets(&mut v, sets)?;
            v.try_into()
                .map_err(|source: toml::de::Error| ConfigError::AfterSets {
                    sets: sets.to_vec(),
                    source,
                })?
        };
        c.validate()?;
        Ok(c)
    }

    /// This config with `key=value` overrides applied (as [`Self::from_toml`] does),
    /// checked.
    ///
    /// # Errors
    /// As [`Self::from_toml`].
    pub fn with_sets(&self, sets: &[String]) -> Result<TrainConfig, ConfigError> {
        if sets.is_empty() {
            return Ok(self.clone());
        }
        let mut v = toml::Table::try_from(self)
            .map_err(|e| ConfigError::Parse(<toml::de::Error as serde::de::Error>::custom(e)))?;
        apply_sets(&mut v, sets)?;
        let c: TrainConfig =
            v.try_into()
                .map_err(|source: toml::de::Error| ConfigError::AfterSets {
                    sets: sets.to_vec(),
                    source,
                })?;
        c.validate()?;
        Ok(c)
    }

    /// The run's length in steps at `steps_per_epoch`: `train.total_steps` when set,
    /// else `train.epochs` epochs.
    pub fn total_steps(&self, steps_per_epoch: u64) -> u64 {
        match self.train.total_steps {
            0 => steps_per_epoch * self.train.epochs,
            n => n,
        }
    }

    /// Checks every value's range; the error names the key, its value and the range.
    ///
    /// # Errors
    /// [`ConfigError::Range`] for the first value out of range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let (m, o, t, d, a) = (
            &self.model,
            &self.optim,
            &self.train,
            &self.data,
            &self.augment,
        );
        let w = m.encoder.width;
        check(
            within(w, 1e-3, 64.0),
            "model.encoder.width",
            w,
            "a number in (0, 64]",
        )?;
        for (key, h) in [
            ("model.projector", &m.projector),
            ("model.predictor", &m.predictor),
        ] {
            check(
                h.hidden >= 1 && h.out >= 1,
                key,
                format!("{{ hidden = {}, out = {} }}", h.hidden, h.out),
                "hidden and out must be at least 1",
            )?;
        }
        check(
            o.base_lr.is_finite() && o.base_lr > 0.0,
            "optim.base_lr",
            o.base_lr,
            "a positive number",
        )?;
        check(
            within(o.weight_decay, 0.0, f64::MAX),
            "optim.weight_decay",
            o.weight_decay,
            "a number ≥ 0",
        )?;
        check(
            within(o.momentum, 0.0, 1.0) && o.momentum < 1.0,
            "optim.momentum",
            o.momentum,
            "a number in [0, 1)",
        )?;
        check(
            within(o.trust, 0.0, 1e3),
            "optim.trust",
            o.trust,
            "a number ≥ 0",
        )?;
        check(
            within(o.warmup_epochs, 0.0, 1e6),
            "optim.warmup_epochs",
            o.warmup_epochs,
            "a number of epochs ≥ 0",
        )?;
        check(
            within(o.beta2, 0.0, 1.0) && o.beta2 < 1.0,
            "optim.beta2",
            o.beta2,
            "a number in [0, 1)",
        )?;
        check(
            within(o.eps, 0.0, 1.0) && o.eps > 0.0,
            "optim.eps",
            o.eps,
            "a positive number",
        )?;
        check(t.batch >= 1, "train.batch", t.batch, "at least 1")?;
        check(
            t.epochs >= 1 || t.total_steps >= 1,
            "train.epochs",
            t.epochs,
            "at least 1 (or train.total_steps > 0)",
        )?;
        check(
            within(t.tau_base, 0.0, 1.0),
            "train.tau_base",
            t.tau_base,
            "a number in [0, 1]",
        )?;
        check(t.keep >= 1, "train.keep", t.keep, "at least 1 checkpoint")?;
        check(
            t.torch_threads >= 0,
            "train.torch_threads",
            t.torch_threads,
            "0 (libtorch's default) or more",
        )?;
        check(
            within(t.collapse_threshold, 0.0, 1e6),
            "train.collapse_threshold",
            t.collapse_threshold,
            "a number ≥ 0",
        )?;
        check(
            t.knn_bank >= 1,
            "train.knn_bank",
            t.knn_bank,
            "at least 1 image",
        )?;
        check(
            t.knn_queries >= 1,
            "train.knn_queries",
            t.knn_queries,
            "at least 1 image",
        )?;
        check(
            within(t.collective_timeout_s, 0.0, 1e9) && t.collective_timeout_s > 0.0,
            "train.collective_timeout_s",
            t.collective_timeout_s,
            "a positive number of seconds",
        )?;
        check(d.canvas >= 1, "data.canvas", d.canvas, "at least 1 pixel")?;
        check(
            d.window >= 1,
            "data.window",
            d.window,
            "at least 1 row group",
        )?;
        check(a.size >= 1, "augment.size", a.size, "at least 1 pixel")?;
        check(
            a.blur_kernel_224 >= 1,
            "augment.blur_kernel_224",
            a.blur_kernel_224,
            "at least 1 pixel",
        )?;
        check(
            a.std.iter().all(|&s| s.is_finite() && s > 0.0),
            "augment.std",
            format!("{:?}", a.std),
            "positive numbers",
        )?;
        for (key, v) in [("augment.view1", &a.view1), ("augment.view2", &a.view2)] {
            let ps = [v.flip_p, v.jitter_p, v.grayscale_p, v.blur_p, v.solarize_p];
            check(
                ps.iter().all(|&p| within(p, 0.0, 1.0)),
                key,
                format!(
                    "flip_p {}, jitter_p {}, grayscale_p {}, blur_p {}, solarize_p {}",
                    ps[0], ps[1], ps[2], ps[3], ps[4]
                ),
                "probabilities must be in [0, 1]",
            )?;
            let [lo, hi] = v.crop_scale;
            check(
                within(lo, 0.0, 1.0) && within(hi, 0.0, 1.0) && lo > 0.0 && lo <= hi,
                key,
                format!("crop_scale {:?}", v.crop_scale),
                "crop_scale must be [min, max] with 0 < min ≤ max ≤ 1",
            )?;
            let [lo, hi] = v.crop_ratio;
            check(
                lo.is_finite() && hi.is_finite() && lo > 0.0 && lo <= hi,
                key,
                format!("crop_ratio {:?}", v.crop_ratio),
                "crop_ratio must be [min, max] with 0 < min ≤ max",
            )?;
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(text: &str, sets: &[&str]) -> String {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let e = TrainConfig::from_toml(text, &sets).expect_err("refused");
        byol_format::error_chain(&e)
    }

    #[test]
    fn values_out_of_range_are_refused_at_load_with_their_key() {
        let e = refused("[train]\nbatch = 0\n", &[]);
        assert!(e.contains("train.batch = 0"), "{e}");
        let e = refused("", &["optim.momentum=1.5"]);
        assert!(
            e.contains("optim.momentum = 1.5") && e.contains("[0, 1)"),
            "{e}"
        );
        let e = refused("", &["train.collective_timeout_s=0"]);
        assert!(e.contains("train.collective_timeout_s"), "{e}");
        let e = refused("[augment.view2]\nsolarize_p = 2.0\n", &[]);
        assert!(
            e.contains("augment.view2") && e.contains("solarize_p 2"),
            "{e}"
        );
        let e = refused("", &["augment.view1.crop_scale=[0.9, 0.2]"]);
        assert!(e.contains("crop_scale"), "{e}");
        // Defaults and the shipped presets load.
        TrainConfig::from_toml("", &[]).expect("defaults are valid");
        for f in ["fmnist", "imagenet-resnet50", "imagenet100-resnet18"] {
            let p = format!("{}/../configs/{f}.toml", env!("CARGO_MANIFEST_DIR"));
            let text = std::fs::read_to_string(&p).expect("preset");
            TrainConfig::from_toml(&text, &[]).unwrap_or_else(|e| panic!("{p}: {e}"));
        }
    }

    #[test]
    fn device_precision_and_optimizer_are_checked_when_the_config_loads() {
        for (key, bad) in [
            ("train.device", "\"tpu\""),
            ("train.precision", "\"fp16\""),
            ("optim.kind", "\"adam\""),
        ] {
            let e = refused("", &[&format!("{key}={bad}")]);
            assert!(e.contains("unknown variant"), "{key}: {e}");
        }
        let c = TrainConfig::from_toml("[train]\ndevice = \"cpu\"\nprecision = \"bf16\"\n", &[])
            .expect("valid");
        assert_eq!(
            (c.train.device, c.train.precision),
            (DeviceChoice::Cpu, Precision::Bf16)
        );
    }

    #[test]
    fn sets_apply_to_a_loaded_config_as_to_its_text() {
        let text = "[optim]\nbase_lr = 0.5\n";
        let sets = vec![
            "train.log_every=3".to_string(),
            "optim.kind=sgd".to_string(),
        ];
        let from_text = TrainConfig::from_toml(text, &sets).expect("valid");
        let loaded = TrainConfig::from_toml(text, &[]).expect("valid");
        assert_eq!(loaded.with_sets(&sets).expect("valid"), from_text);
        assert_eq!(from_text.train.log_every, 3);
        assert_eq!(from_text.optim.kind, OptimizerKind::Sgd);
    }

    #[test]
    fn encoder_topology_is_torchvision_s() {
        let e = EncoderConfig::default();
        assert_eq!((e.stem_conv(), e.stem_pool()), ((7, 2, 3), true));
        let c = EncoderConfig {
            cifar_stem: true,
            ..EncoderConfig::default()
        };
        assert_eq!((c.stem_conv(), c.stem_pool()), ((3, 1, 1), false));
        assert_eq!(c.stages(), ([3, 4, 6, 3], true));
        let strides: Vec<i64> = (0..4).map(|s| EncoderConfig::block_stride(s, 0)).collect();
        assert_eq!(strides, [1, 2, 2, 2]);
        assert_eq!(EncoderConfig::block_stride(2, 1), 1);
    }
}
