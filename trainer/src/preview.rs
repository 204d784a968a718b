//! The augmentation preview: a grid of samples, each row the decoded canvas, view 1 and
//! view 2 (`byol preview`, and the image a run's TensorBoard log starts with).

use std::path::Path;

use byol_pipeline::augment::{AugmentConfig, Augmenter, SplitMix64};
use byol_pipeline::loader::DecodeFn;
use byol_pipeline::{Cursor, Dataset, Loader, LoaderConfig};
use tch::{Device, Kind, Tensor};

use crate::error::{Context, Result};

/// The first `n` samples of `data` (in the loader's order for `seed`) decoded into
/// `canvas`-pixel canvases and augmented on `device` with `cfg` (generator seeded with
/// `seed`): a `[3, n × size, 3 × size]` `uint8` CPU tensor, one row per sample (the
/// canvas resized to `size`, view 1, view 2).
///
/// # Errors
/// The dataset cannot be read or is empty.
pub fn augmentation_grid(
    data: &Path,
    (n, seed, canvas): (usize, u64, usize),
    cfg: AugmentConfig,
    decode: DecodeFn,
    device: Device,
) -> Result<Tensor> {
    let ds = Dataset::open(data).with_context(|| format!("opening {}", data.display()))?;
    let lc = LoaderConfig {
        batch: n,
        canvas,
        seed,
        drop_last: false,
        slots: 2,
        ..LoaderConfig::default()
    };
    let loader = Loader::new(ds, lc, decode)?;
    let mut epoch = loader.start(Cursor::default());
    let batch = epoch.next().context("the dataset is empty")??;
    let canv = batch.images().to_device(device);
    let aug = Augmenter::new(cfg);
    let mut rng = SplitMix64::new(seed);
    let (v1, v2) = aug.views(&canv, batch.valid_sizes(), &mut rng);
    let size = aug.cfg.size;
    let shown = canv
        .to_kind(Kind::Float)
        .upsample_bilinear2d([size, size], false, None, None)
        .round()
        .clamp(0.0, 255.0)
        .to_kind(Kind::Uint8);
    let row = Tensor::cat(&[shown, aug.to_uint8(&v1), aug.to_uint8(&v2)], 3); // [n,3,size,3*size]
    Ok(row
        .permute([1, 0, 2, 3])
        .reshape([3, -1, 3 * size])
        .to_device(Device::Cpu))
}

/// PNG bytes of a `[3, H, W]` `uint8` grid, with its (height, width).
///
/// # Errors
/// The encoder failed.
pub fn grid_png(grid: &Tensor) -> Result<(Vec<u8>, (u32, u32))> {
    let (h, w) = (grid.size()[1] as u32, grid.size()[2] as u32);
    let hwc = grid.permute([1, 2, 0]).contiguous();
    let mut rgb = vec![0u8; (3 * h * w) as usize];
    let n = rgb.len();
    hwc.copy_data(&mut rgb, n);
    match crate::plot::encode_rgb_png(&rgb, w, h) {
        Ok(png) => Ok((png, (h, w))),
        Err(e) => crate::bail!("encoding the augmentation preview: {e}"),
    }
}
