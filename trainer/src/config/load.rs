//! Loading a config: TOML text, `--set` overrides, and every value's range checked.

use super::TrainConfig;
#[cfg(test)]
use super::{DeviceChoice, EncoderConfig, OptimizerKind, Precision};

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
        self.check_model_and_optim()?;
        self.check_train()?;
        self.check_data_and_augment()?;
        self.check_finetune()
    }

    fn check_finetune(&self) -> Result<(), ConfigError> {
        let Some(f) = &self.finetune else {
            return Ok(());
        };
        check(f.batch >= 1, "finetune.batch", f.batch, "at least 1")?;
        check(
            f.epochs >= 1 || f.total_steps >= 1,
            "finetune.epochs",
            f.epochs,
            "at least 1 (or finetune.total_steps > 0)",
        )?;
        check(
            within(f.lr, 0.0, 1e6) && f.lr > 0.0,
            "finetune.lr",
            f.lr,
            "a positive number",
        )?;
        check(
            within(f.momentum, 0.0, 1.0) && f.momentum < 1.0,
            "finetune.momentum",
            f.momentum,
            "a number in [0, 1)",
        )?;
        check(
            !f.nesterov || f.momentum > 0.0,
            "finetune.nesterov",
            f.nesterov,
            "false when finetune.momentum is 0 (Nesterov needs momentum)",
        )?;
        check(
            within(f.weight_decay, 0.0, 1.0),
            "finetune.weight_decay",
            f.weight_decay,
            "a number in [0, 1]",
        )?;
        let [lo, hi] = f.crop_scale;
        check(
            within(lo, 0.0, 1.0) && within(hi, 0.0, 1.0) && lo > 0.0 && lo <= hi,
            "finetune.crop_scale",
            format!("{:?}", f.crop_scale),
            "[min, max] with 0 < min ≤ max ≤ 1",
        )?;
        let [lo, hi] = f.crop_ratio;
        check(
            lo.is_finite() && hi.is_finite() && lo > 0.0 && lo <= hi,
            "finetune.crop_ratio",
            format!("{:?}", f.crop_ratio),
            "[min, max] with 0 < min ≤ max",
        )?;
        check(
            within(f.flip_p, 0.0, 1.0),
            "finetune.flip_p",
            f.flip_p,
            "a probability in [0, 1]",
        )
    }

    fn check_model_and_optim(&self) -> Result<(), ConfigError> {
        let (m, o) = (&self.model, &self.optim);
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
        Ok(())
    }

    fn check_train(&self) -> Result<(), ConfigError> {
        let t = &self.train;
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
        Ok(())
    }

    fn check_data_and_augment(&self) -> Result<(), ConfigError> {
        let (d, a) = (&self.data, &self.augment);
        check(d.canvas >= 1, "data.canvas", d.canvas, "at least 1 pixel")?;
        check(
            d.window >= 1,
            "data.window",
            d.window,
            "at least 1 row group",
        )?;
        check(
            within(d.max_decode_failure_rate, 0.0, 1.0),
            "data.max_decode_failure_rate",
            d.max_decode_failure_rate,
            "a share in [0, 1]",
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
            // torchvision's ColorJitter ranges: hue in [0, 0.5], the others ≥ 0.
            check(
                within(v.hue, 0.0, 0.5)
                    && [v.brightness, v.contrast, v.saturation]
                        .iter()
                        .all(|&f| within(f, 0.0, f64::MAX)),
                key,
                format!(
                    "brightness {}, contrast {}, saturation {}, hue {}",
                    v.brightness, v.contrast, v.saturation, v.hue
                ),
                "jitter strengths must be ≥ 0, hue at most 0.5 (torchvision's ColorJitter)",
            )?;
        }
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// The dotted keys whose values differ between two configs (`resolved.*` excluded:
    /// values byol derives, not settings), each with both values.
    pub fn differences(&self, other: &TrainConfig) -> Vec<ConfigDifference> {
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
        let mut bm: std::collections::BTreeMap<_, _> = b.into_iter().collect();
        let absent = serde_json::Value::Null;
        let mut out: Vec<ConfigDifference> = a
            .into_iter()
            .filter(|(k, _)| !k.starts_with("resolved."))
            .filter_map(|(k, v)| {
                let w = bm.remove(&k).unwrap_or(absent.clone());
                (w != v).then(|| ConfigDifference {
                    key: k,
                    old: v.to_string(),
                    new: w.to_string(),
                })
            })
            .collect();
        out.extend(
            bm.into_iter()
                .filter(|(k, _)| !k.starts_with("resolved."))
                .map(|(k, w)| ConfigDifference {
                    key: k,
                    old: absent.to_string(),
                    new: w.to_string(),
                }),
        );
        out
    }
}

/// One key whose value differs between two configs ([`TrainConfig::differences`]): the
/// values as JSON (`null`: the key is absent from that config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigDifference {
    pub key: String,
    pub old: String,
    pub new: String,
}

impl std::fmt::Display for ConfigDifference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} → {}", self.key, self.old, self.new)
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
        // Regression: a hue above torchvision's 0.5 gave wrong CPU views silently.
        let e = refused("", &["augment.view2.hue=0.7"]);
        assert!(e.contains("augment.view2") && e.contains("hue 0.7"), "{e}");
        let e = refused("", &["augment.view1.brightness=-0.1"]);
        assert!(e.contains("brightness -0.1"), "{e}");
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
