//! `byol export --format hf`: a model folder as timm and the Hugging Face Hub lay it out,
//! for the next person to load with `timm.create_model` or push to the Hub.
//!
//! ```text
//! DIR/model.safetensors   the encoder (and a fine-tuned run's `fc`) under timm's names,
//!                         which for ResNet are torchvision's (see [`super::torchvision`])
//! DIR/config.json         what timm's `load_model_config_from_hf` reads: architecture,
//!                         num_classes (0: an encoder; K: a classifier, with label_names),
//!                         num_features, pretrained_cfg (input size, mean, std, …)
//! DIR/README.md           the model card: YAML front matter (library, tags, datasets,
//!                         metrics), the results of eval.json / finetune.json, the training
//!                         config and the commands that made it
//! ```
//! Shapes timm's constructors cannot build (the CIFAR stem, other widths) are said in the
//! card and in `config.json` (`byol_differences`), as the torchvision export says them.

use std::path::Path;

use serde::Serialize;
use serde_json::json;
use tch::Tensor;

use super::torchvision::{differences, torchvision_state_dict};
use crate::error::{Context, Result};
use crate::run::TrainedOnline;

/// What `byol export --format hf` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct HfExport {
    pub command: String,
    pub format: String,
    pub run: String,
    pub checkpoint: String,
    pub step: u64,
    /// The folder written.
    pub dir: String,
    /// timm's architecture name (`resnet18`, `resnet34`, `resnet50`).
    pub arch: String,
    /// 0 for an encoder, K for a fine-tuned classifier.
    pub num_classes: usize,
    pub num_features: i64,
    pub tensors: usize,
    /// Whether timm's constructor of `arch` builds these shapes (the ImageNet stem,
    /// width 1).
    pub timm_builds_it: bool,
    pub differences: Vec<String>,
}

/// The files of a bundle: an existing `--out` folder may hold these only (an earlier
/// bundle, which is replaced).
const BUNDLE_FILES: [&str; 3] = ["model.safetensors", "config.json", "README.md"];

/// Writes the folder `out` (atomically: a temporary folder renamed when complete, which
/// replaces an earlier bundle there).
///
/// # Errors
/// `out` is a file, or a folder holding anything but a bundle's files (it would be
/// replaced: refused, naming what it holds); the folder or one of its files cannot be
/// written.
pub fn export_hf(run: &Path, t: &TrainedOnline, out: &Path) -> Result<HfExport> {
    if out.is_file() {
        crate::bail!(
            "--out {} is a file; the hf bundle is a folder: give a new or empty folder",
            out.display()
        );
    }
    if out.is_dir() {
        let others: Vec<String> = std::fs::read_dir(out)
            .with_context(|| format!("reading {}", out.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !BUNDLE_FILES.contains(&n.as_str()))
            .collect();
        if !others.is_empty() {
            crate::bail!(
                "--out {} holds files that are not an hf bundle's ({}); the bundle would replace the folder: give a new or empty folder",
                out.display(),
                others.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
            );
        }
    }
    let named: Vec<(String, Tensor)> = torchvision_state_dict(t);
    let arch = format!("{:?}", t.cfg.model.encoder.arch).to_lowercase();
    let classes: Vec<String> = t.classes().map(<[String]>::to_vec).unwrap_or_default();
    let num_features = t.net.encoder().out_dim();
    let differences = differences(t);
    let config = hf_config(t, &arch, &classes, num_features, &differences);
    let card = model_card(run, t, &arch, &classes, &differences);
    byol_format::fs::write_atomic_with(out, |tmp| -> Result<()> {
        std::fs::create_dir(tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let st = tmp.join("model.safetensors");
        Tensor::write_safetensors(&named, &st)
            .with_context(|| format!("writing {}", st.display()))?;
        let cfg = tmp.join("config.json");
        std::fs::write(&cfg, serde_json::to_string_pretty(&config)?)
            .with_context(|| format!("writing {}", cfg.display()))?;
        let readme = tmp.join("README.md");
        std::fs::write(&readme, card).with_context(|| format!("writing {}", readme.display()))
    })?;
    Ok(HfExport {
        command: "export".into(),
        format: "hf".into(),
        run: run.display().to_string(),
        checkpoint: t.checkpoint.display().to_string(),
        step: t.step,
        dir: out.display().to_string(),
        arch,
        num_classes: classes.len(),
        num_features,
        tensors: named.len(),
        timm_builds_it: differences.is_empty(),
        differences,
    })
}

/// timm's `config.json` (the layout `timm.models.push_to_hf_hub` writes).
fn hf_config(
    t: &TrainedOnline,
    arch: &str,
    classes: &[String],
    num_features: i64,
    differences: &[String],
) -> serde_json::Value {
    let a = &t.cfg.augment;
    let mut c = json!({
        "architecture": arch,
        "num_classes": classes.len(),
        "num_features": num_features,
        "global_pool": "avg",
        "pretrained_cfg": {
            "tag": "byol",
            "custom_load": false,
            "input_size": [3, a.size, a.size],
            "fixed_input_size": false,
            "interpolation": "bilinear",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": a.mean,
            "std": a.std,
            "num_classes": classes.len(),
            "first_conv": "conv1",
            "classifier": "fc",
        },
    });
    if !classes.is_empty() {
        c["label_names"] = json!(classes);
    }
    if !differences.is_empty() {
        c["byol_differences"] = json!(differences);
    }
    c
}

/// `README.md`: YAML front matter for the Hub, then what the model is, its results, its
/// config and the commands that made it.
fn model_card(
    run: &Path,
    t: &TrainedOnline,
    arch: &str,
    classes: &[String],
    differences: &[String],
) -> String {
    let read = |name: &str| -> Option<serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(run.join(name)).ok()?).ok()
    };
    let data = read("data.json");
    let dataset = data
        .as_ref()
        .and_then(|d| d["path"].as_str())
        .and_then(|p| Path::new(p).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "unknown".into());
    let (task, kind) = if classes.is_empty() {
        ("image-feature-extraction", "encoder")
    } else {
        ("image-classification", "classifier")
    };
    let mut results = Vec::new();
    if let Some(e) = read("eval.json") {
        for (m, label) in [
            ("linear_top1", "linear probe top-1"),
            ("knn20_top1", "kNN (k = 20) top-1"),
        ] {
            if let Some(v) = e["byol"][m].as_f64() {
                results.push((label.to_string(), v));
            }
        }
    }
    if let Some(f) = read("finetune.json") {
        for (m, label) in [
            ("test_top1", "fine-tuned test top-1"),
            ("test_top5", "fine-tuned test top-5"),
        ] {
            if let Some(v) = f[m].as_f64() {
                results.push((label.to_string(), v));
            }
        }
    }
    let mut s = String::from("---\nlibrary_name: timm\n");
    s += &format!("pipeline_tag: {task}\ntags:\n- timm\n- byol\n- self-supervised\n- {task}\n");
    s += &format!("datasets:\n- {dataset}\n");
    if !results.is_empty() {
        s += "metrics:\n- accuracy\n";
    }
    s += "---\n\n";
    s += &format!(
        "# {arch} {kind} trained with BYOL (byol)\n\n\
         The online encoder of run `{}` at step {} (checkpoint `{}`), {}.\n\n",
        run.display(),
        t.step,
        t.checkpoint.display(),
        if classes.is_empty() {
            "without a classifier head (`num_classes` 0)".to_string()
        } else {
            format!(
                "with its fine-tuned head over {} classes: {}",
                classes.len(),
                classes.join(", ")
            )
        }
    );
    s += &format!(
        "```python\nimport timm\nmodel = timm.create_model(\"local-dir:PATH/TO/THIS/FOLDER\", pretrained=True)\n# or: timm.create_model(\"{arch}\", pretrained=True, num_classes={},\n#         pretrained_cfg_overlay=dict(file=\"PATH/TO/THIS/FOLDER/model.safetensors\"))\n```\n\n",
        classes.len()
    );
    s += &format!(
        "Inputs: RGB, {size}×{size}, scaled to [0, 1] and normalised with mean {:?} and std {:?}.\n\n",
        t.cfg.augment.mean,
        t.cfg.augment.std,
        size = t.cfg.augment.size
    );
    if !differences.is_empty() {
        s += &format!(
            "**timm's `{arch}` does not build these shapes as it is**: {}.\n\n",
            differences.join("; ")
        );
    }
    if !results.is_empty() {
        s += "## Results\n\n| metric | % |\n| --- | --- |\n";
        for (label, v) in &results {
            s += &format!("| {label} | {v:.2} |\n");
        }
        s += "\n";
    }
    s += &format!(
        "## How it was made\n\nTrained with the config below (the run's `config.toml`, every value resolved) on `{}` into `{}`, then exported with:\n\n```sh\n{}\n```\n\n",
        data.as_ref()
            .and_then(|d| d["path"].as_str())
            .unwrap_or("DATA"),
        run.display(),
        std::env::args().collect::<Vec<_>>().join(" ")
    );
    s += &format!("## Training config\n\n```toml\n{}```\n", t.cfg.to_toml());
    s
}
