//! `cim-run fit-kmeans`: fits a `patch_kmeans` tokenizer codebook on a dataset.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use rand::{Rng, SeedableRng};

use cim_api::{Error, Result};

use crate::checkpoint::save_safetensors;
use crate::config::{DataConfig, DataSource};

/// Options of `fit-kmeans` (also its command-line arguments).
#[derive(Clone, Debug)]
pub struct FitKmeans {
    /// Dataset kind.
    pub source: DataSource,
    pub path: Option<PathBuf>,
    /// CIFAR-10 split.
    pub split: crate::config::Split,
    /// Images are resized to this square side first (use the tokenizer view size).
    pub size: u32,
    pub patch: usize,
    pub vocab: usize,
    pub samples: usize,
    pub iters: usize,
    pub seed: u64,
    /// Output safetensors file (holds `codebook`).
    pub out: PathBuf,
}

/// Samples `samples` random `patch×patch` crops (any offset) of randomly chosen images, fits the
/// codebook and writes it atomically. Returns the inertia per iteration.
pub fn fit_kmeans(o: &FitKmeans) -> Result<Vec<f64>> {
    let cfg = DataConfig {
        source: o.source,
        path: o.path.clone(),
        split: o.split,
        ..DataConfig::default()
    };
    let data = crate::data::open(&cfg)?;
    let p = o.patch as u32;
    if p == 0 || p > o.size {
        return Err(Error::config(format!(
            "--patch {p} must be in 1..={}",
            o.size
        )));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(o.seed);
    let d = 3 * o.patch * o.patch;
    let mut rows = Vec::with_capacity(o.samples * d);
    let per_image = 16;
    while rows.len() < o.samples * d {
        let img = data.get(rng.gen_range(0..data.len()))?;
        let img = if img.dimensions() == (o.size, o.size) {
            img
        } else {
            image::imageops::resize(&img, o.size, o.size, FilterType::Lanczos3)
        };
        for _ in 0..per_image {
            let (x0, y0) = (rng.gen_range(0..=o.size - p), rng.gen_range(0..=o.size - p));
            for c in 0..3 {
                for y in 0..p {
                    for x in 0..p {
                        rows.push(img.get_pixel(x0 + x, y0 + y)[c] as f32 / 255.0);
                    }
                }
            }
        }
    }
    rows.truncate(o.samples * d);
    let x = Tensor::from_vec(rows, (o.samples, d), &Device::Cpu)?;
    let (codebook, history) = cim_plugin_patch_kmeans::fit_kmeans(&x, o.vocab, o.iters, o.seed)?;
    if let Some(dir) = o.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    save_safetensors(&o.out, &HashMap::from([("codebook".to_string(), codebook)]))?;
    Ok(history)
}
