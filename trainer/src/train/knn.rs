//! The kNN monitor: weighted kNN (k = 20) top-1 of held-out images against a bank of
//! training images, on the online encoder's features, every `train.knn_every_epochs`.

use std::path::PathBuf;
use std::time::Instant;

use tch::{Device, Tensor};

use byol_pipeline::loader::DecodeFn;

use crate::byol::Network;
use crate::config::TrainConfig;
use crate::error::Result;

/// Where the kNN monitor's images come from: the training shards (bank) and the
/// held-out shards (queries).
pub struct KnnSource {
    pub data: PathBuf,
    pub val: PathBuf,
    pub decode: DecodeFn,
}

/// The kNN monitor's images: the first `knn_bank` training images and the first
/// `knn_queries` held-out ones (inputs and labels), decoded once per run.
struct KnnSet {
    bank: (Tensor, Tensor),
    queries: (Tensor, Tensor),
    classes: i64,
}

impl KnnSet {
    fn load(cfg: &TrainConfig, src: &KnnSource) -> Result<KnnSet> {
        use crate::eval::load_inputs;
        let (canvas, size) = (cfg.data.canvas, cfg.augment.size);
        let bank = load_inputs(
            &src.data,
            canvas,
            size,
            src.decode,
            Some(cfg.train.knn_bank),
        )?;
        let queries = load_inputs(
            &src.val,
            canvas,
            size,
            src.decode,
            Some(cfg.train.knn_queries),
        )?;
        let classes = bank
            .1
            .max()
            .int64_value(&[])
            .max(queries.1.max().int64_value(&[]))
            + 1;
        Ok(KnnSet {
            bank,
            queries,
            classes,
        })
    }

    /// kNN (k = 20) top-1 of the queries against the bank, with the online encoder in
    /// eval mode.
    fn top1(&self, online: &Network, cfg: &TrainConfig, device: Device) -> f64 {
        use crate::eval::{features, knn};
        let fb = features(&online.encoder, &self.bank.0, cfg, device);
        let fq = features(&online.encoder, &self.queries.0, cfg, device);
        knn(
            &fb,
            &self.bank.1,
            &fq,
            &self.queries.1,
            self.classes,
            &[20],
            0.07,
        )[0]
    }
}

/// The kNN monitor: its images, decoded on first use, and the seconds it has taken
/// (excluded from `train_images_per_s`).
#[derive(Default)]
pub struct KnnMonitor {
    set: Option<KnnSet>,
    pub seconds: f64,
    /// Of `seconds`, what the time-budget calibration spent.
    pub calibration_seconds: f64,
}

impl KnnMonitor {
    /// Decodes the images (once); its time counts as calibration.
    pub fn load(&mut self, cfg: &TrainConfig, src: &KnnSource) -> Result<()> {
        let t = Instant::now();
        if self.set.is_none() {
            self.set = Some(KnnSet::load(cfg, src)?);
        }
        let s = t.elapsed().as_secs_f64();
        self.seconds += s;
        self.calibration_seconds += s;
        Ok(())
    }

    /// kNN (k = 20) top-1 of `online` (eval mode), decoding the images on first use.
    ///
    /// # Errors
    /// The images cannot be read or decoded.
    pub fn top1(
        &mut self,
        online: &Network,
        cfg: &TrainConfig,
        src: &KnnSource,
        device: Device,
    ) -> Result<f64> {
        let t = Instant::now();
        if self.set.is_none() {
            self.set = Some(KnnSet::load(cfg, src)?);
        }
        let acc = self
            .set
            .as_ref()
            .expect("loaded above")
            .top1(online, cfg, device);
        self.seconds += t.elapsed().as_secs_f64();
        Ok(acc)
    }
}
