//! # `patch_kmeans` — a k-means tokenizer of image patches
//!
//! A second, CPU-cheap tokenizer. Each non-overlapping `p×p` RGB patch of the tokenizer view is
//! mapped to its nearest centroid in a codebook of `vocab_size` patches (squared Euclidean distance
//! in `[0, 1]` pixel space); decoding paints every position with its centroid. It is a vector
//! quantiser "trained" by k-means (Lloyd's algorithm) — the tokenizer family of iGPT (Chen et al.,
//! 2020, which clusters single colours) extended to patches.
//!
//! Why it exists: cim's tests and CPU presets need a tokenizer whose reconstructions actually carry
//! the image, or the enhancer has nothing to learn from. A randomly initialised DALL-E dVAE does not
//! (its argmax collapses onto a few dozen tokens and its decoder renders noise), and a trained one
//! cannot be downloaded here. The embedded codebook (512 centroids of 4×4 patches) was fitted on
//! CIFAR-10's training images with
//! `cim-run fit-kmeans --data cifar10 --path data/cifar10 --patch 4 --vocab 512 --samples 200000 --iters 30 --seed 0 --out plugins/patch-kmeans/assets/cifar10_p4_v512.safetensors`.
//!
//! - encode: `(B, 3, h, w)` in `[0, 1]` → `(B, h/p, w/p)` u32
//! - decode: ids → `(B, 3, h, w)` centroid mosaic in `[0, 1]`
//! - weights: a safetensors file with one tensor `codebook` of shape `(vocab_size, 3·p·p)`, each
//!   row laid out channel-major (`c, y, x`) like a patch-embedding kernel.

use candle_core::{DType, Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use cim_api::{BuildCtx, Error, Result, TokenGrid, Tokenizer};

/// The embedded default codebook (see the module docs for the command that made it).
pub const EMBEDDED_CODEBOOK: &[u8] = include_bytes!("../assets/cifar10_p4_v512.safetensors");

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchKmeansConfig {
    pub patch: usize,
    pub vocab_size: usize,
    /// A safetensors file holding `codebook` (local path or `hub:OWNER/REPO[@REV]/FILE`); unset
    /// uses the embedded CIFAR-10 codebook.
    pub weights: Option<String>,
}

impl Default for PatchKmeansConfig {
    fn default() -> Self {
        Self {
            patch: 4,
            vocab_size: 512,
            weights: None,
        }
    }
}

/// `(B, C, h, w)` → `(B·(h/p)·(w/p), C·p·p)`, rows in row-major grid order.
pub fn patchify(x: &Tensor, p: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (gh, gw) = (h / p, w / p);
    Ok(x.reshape((b, c, gh, p, gw, p))?
        .permute((0, 2, 4, 1, 3, 5))?
        .contiguous()?
        .reshape((b * gh * gw, c * p * p))?)
}

/// Inverse of [`patchify`].
pub fn unpatchify(
    rows: &Tensor,
    b: usize,
    c: usize,
    gh: usize,
    gw: usize,
    p: usize,
) -> Result<Tensor> {
    Ok(rows
        .reshape((b, gh, gw, c, p, p))?
        .permute((0, 3, 1, 4, 2, 5))?
        .contiguous()?
        .reshape((b, c, gh * p, gw * p))?)
}

/// Index of the nearest codebook row for every row (shared with the other quantising tokenizer).
pub use cim_ops::nearest;

#[derive(Clone, Debug)]
pub struct PatchKmeans {
    codebook: Tensor,
    patch: usize,
}

impl PatchKmeans {
    pub fn new(cfg: &PatchKmeansConfig, device: &Device) -> Result<Self> {
        let (tensors, source) = match &cfg.weights {
            Some(spec) => {
                let p = cim_api::weights::resolve(spec, "tokenizer.patch_kmeans.weights")?;
                (
                    candle_core::safetensors::load(&p, &Device::Cpu).map_err(|e| {
                        Error::msg(format!(
                            "tokenizer.patch_kmeans.weights = {}: {e}",
                            p.display()
                        ))
                    })?,
                    p.display().to_string(),
                )
            }
            None => (
                candle_core::safetensors::load_buffer(EMBEDDED_CODEBOOK, &Device::Cpu)?,
                "the embedded CIFAR-10 codebook".to_string(),
            ),
        };
        let codebook = tensors
            .get("codebook")
            .ok_or_else(|| Error::msg(format!("{source} has no tensor `codebook`")))?
            .to_dtype(DType::F32)?;
        let want = (cfg.vocab_size, 3 * cfg.patch * cfg.patch);
        if codebook.dims2()? != want {
            return Err(Error::config(format!(
                "{source}: `codebook` is {:?}, tokenizer.patch_kmeans asks for vocab_size {} and patch {} = {want:?} \
                 (fit one with `cim-run fit-kmeans`)",
                codebook.dims(),
                cfg.vocab_size,
                cfg.patch
            )));
        }
        Ok(Self {
            codebook: codebook.to_device(device)?,
            patch: cfg.patch,
        })
    }

    pub fn codebook(&self) -> &Tensor {
        &self.codebook
    }
}

impl Tokenizer for PatchKmeans {
    fn vocab_size(&self) -> usize {
        self.codebook.dim(0).expect("codebook is 2-D")
    }
    fn grid(&self, (h, w): (usize, usize)) -> Result<TokenGrid> {
        let p = self.patch;
        if h % p != 0 || w % p != 0 {
            return Err(Error::config(format!(
                "patch_kmeans with {p}-px patches: the tokenizer view {h}×{w} must be a multiple of {p}"
            )));
        }
        Ok(TokenGrid::new(h / p, w / p))
    }
    fn encode(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = pixels.dims4()?;
        let g = self.grid((h, w))?;
        let ids = nearest(
            &patchify(&pixels.detach().to_dtype(DType::F32)?, self.patch)?,
            &self.codebook,
        )?;
        Ok(ids.reshape((b, g.h, g.w))?)
    }
    fn decode(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, gh, gw) = ids.dims3()?;
        let rows = self.codebook.index_select(&ids.flatten_all()?, 0)?;
        Ok(unpatchify(&rows, b, 3, gh, gw, self.patch)?.clamp(0f32, 1f32)?)
    }
}

/// Lloyd's k-means on the rows of `data` `(n, d)`: initial centroids are `k` distinct random rows;
/// a centroid that loses all its points is re-seeded with a random row. Returns `(codebook, inertia
/// per iteration)` (mean squared distance to the nearest centroid).
pub fn fit_kmeans(data: &Tensor, k: usize, iters: usize, seed: u64) -> Result<(Tensor, Vec<f64>)> {
    let (n, d) = data.dims2()?;
    if n < k {
        return Err(Error::msg(format!(
            "k-means needs at least {k} samples, got {n}"
        )));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng);
    let init: Vec<u32> = order[..k].iter().map(|&i| i as u32).collect();
    let mut codebook = data.index_select(&Tensor::new(init.as_slice(), data.device())?, 0)?;
    let host: Vec<f32> = data.flatten_all()?.to_vec1()?;
    let mut history = vec![];
    for _ in 0..iters {
        let assign: Vec<u32> = nearest(data, &codebook)?.to_vec1()?;
        let cb: Vec<f32> = codebook.flatten_all()?.to_vec1()?;
        let mut sums = vec![0f64; k * d];
        let mut counts = vec![0usize; k];
        let mut inertia = 0f64;
        for (i, &a) in assign.iter().enumerate() {
            let a = a as usize;
            counts[a] += 1;
            for j in 0..d {
                let v = host[i * d + j] as f64;
                sums[a * d + j] += v;
                let diff = v - cb[a * d + j] as f64;
                inertia += diff * diff;
            }
        }
        history.push(inertia / n as f64);
        let mut next = vec![0f32; k * d];
        for c in 0..k {
            if counts[c] == 0 {
                let r = order[rand::Rng::gen_range(&mut rng, 0..n)];
                next[c * d..(c + 1) * d].copy_from_slice(&host[r * d..(r + 1) * d]);
            } else {
                for j in 0..d {
                    next[c * d + j] = (sums[c * d + j] / counts[c] as f64) as f32;
                }
            }
        }
        codebook = Tensor::from_vec(next, (k, d), data.device())?;
    }
    Ok((codebook, history))
}

fn build(cfg: PatchKmeansConfig, ctx: &BuildCtx) -> Result<PatchKmeans> {
    PatchKmeans::new(&cfg, &ctx.device)
}

cim_api::register_tokenizer! {
    name: "patch_kmeans",
    about: "k-means codebook of 4×4 RGB patches (embedded, fitted on CIFAR-10); CPU-cheap, faithful reconstructions",
    config: PatchKmeansConfig,
    default: PatchKmeansConfig::default(),
    tiny: PatchKmeansConfig::default(),
    build: build,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conformance() -> Result<()> {
        cim_api::testing::check_tokenizer("patch_kmeans")
    }

    #[test]
    fn patchify_round_trips() -> Result<()> {
        let x = cim_api::testing::uniform((2, 3, 8, 12), 0)?;
        let rows = patchify(&x, 4)?;
        assert_eq!(rows.dims(), [2 * 2 * 3, 48]);
        let back = unpatchify(&rows, 2, 3, 2, 3, 4)?;
        assert_eq!(
            back.flatten_all()?.to_vec1::<f32>()?,
            x.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }

    #[test]
    fn kmeans_recovers_separated_clusters_and_tokenizer_reconstructs_them() -> Result<()> {
        // 3 clusters of 4×4 patches of flat colours; k-means with k = 3 finds them (inertia → noise
        // level) and encoding + decoding an image of those colours reproduces it within the noise.
        let colours = [[0.1f32, 0.2, 0.9], [0.8, 0.8, 0.1], [0.5, 0.0, 0.5]];
        let mut rows = vec![];
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        for i in 0..300 {
            let c = colours[i % 3];
            for ch in 0..3 {
                for _ in 0..16 {
                    rows.push(c[ch] + rand::Rng::gen_range(&mut rng, -0.01f32..0.01));
                }
            }
        }
        let data = Tensor::from_vec(rows, (300, 48), &Device::Cpu)?;
        let (cb, hist) = fit_kmeans(&data, 3, 10, 1)?;
        assert!(*hist.last().unwrap() < 48.0 * 1e-4, "{hist:?}");
        let tok = PatchKmeans {
            codebook: cb,
            patch: 4,
        };
        let img = unpatchify(&data.narrow(0, 0, 4)?, 1, 3, 2, 2, 4)?;
        let rec = tok.decode(&tok.encode(&img)?)?;
        let err = (rec - img)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 0.02, "{err}");
        Ok(())
    }

    #[test]
    fn embedded_codebook_reconstructs_cifar_like_images_better_than_their_mean() -> Result<()> {
        // Quantisation error on smooth random images (low-frequency noise upsampled from 8×8) is
        // well below their variance: the codebook carries the image.
        let tok = PatchKmeans::new(&PatchKmeansConfig::default(), &Device::Cpu)?;
        let coarse = cim_api::testing::uniform((4, 3, 8, 8), 3)?;
        let img = coarse.upsample_nearest2d(32, 32)?;
        let rec = tok.decode(&tok.encode(&img)?)?;
        let mse = (&rec - &img)?.sqr()?.mean_all()?.to_scalar::<f32>()?;
        let var = img
            .broadcast_sub(&img.mean_all()?)?
            .sqr()?
            .mean_all()?
            .to_scalar::<f32>()?;
        assert!(mse < 0.25 * var, "mse {mse} vs variance {var}");
        let bad = PatchKmeansConfig {
            vocab_size: 100,
            ..Default::default()
        };
        let e = PatchKmeans::new(&bad, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("vocab_size 100") && e.contains("[512, 48]"),
            "{e}"
        );
        Ok(())
    }
}
