//! # Samplers — `gumbel`, `argmax`, `uniform`
//!
//! Paper §2.3, Eq. (2): replacement tokens are drawn from the generator's output distribution,
//! "sample from softmax with a temperature of 1 at all the masked positions". Table 7 compares
//! this with argmax and uniform sampling.
//!
//! - input: logits `(M, V)` (detached), a seeded RNG
//! - output: `(M,)` u32 token ids
//!
//! `gumbel` draws exactly from `softmax(logits / τ)` — the distribution the Gumbel-max trick
//! samples — by inverse-CDF sampling with ONE uniform number per row, evaluated on the logits'
//! device in two levels (blocks of 64 tokens, then within the block) so no `V×V` cumsum matrix is
//! ever formed. The RNG stays on the host, so a seed gives the same tokens on every device.

use candle_core::{DType, Device, Tensor, D};
use rand::{Rng, RngCore};
use serde::{Deserialize, Serialize};

use cim_api::{BuildCtx, Error, Result, Sampler};

const BLOCK: usize = 64;

/// Draws one index per row of `probs` `(M, V)` (rows need not be normalised) given one uniform
/// `u ∈ [0, 1)` per row: the smallest `j` with `cdf[j] > u · total`.
pub fn inverse_cdf(probs: &Tensor, u: &[f32]) -> Result<Tensor> {
    let (m, v) = probs.dims2()?;
    if u.len() != m {
        return Err(Error::msg(format!("inverse_cdf: {} uniforms for {m} rows", u.len())));
    }
    let dev = probs.device();
    let probs = probs.to_dtype(DType::F32)?;
    let nb = v.div_ceil(BLOCK);
    let probs = if nb * BLOCK != v {
        probs.pad_with_zeros(1, 0, nb * BLOCK - v)?
    } else {
        probs
    };
    let p3 = probs.reshape((m, nb, BLOCK))?;
    let block_sums = p3.sum(2)?; // (M, nb)
    let block_cdf = block_sums.cumsum(1)?;
    let total = block_cdf.narrow(1, nb - 1, 1)?; // (M, 1)
    let u = Tensor::from_slice(u, (m, 1), dev)?;
    let target = (u * &total)?;
    let count = |cdf: &Tensor, t: &Tensor, max: usize| -> Result<Tensor> {
        Ok(cdf
            .broadcast_le(t)?
            .to_dtype(DType::F32)?
            .sum_keepdim(1)?
            .clamp(0f32, max as f32)?)
    };
    let blk = count(&block_cdf, &target, nb - 1)?; // (M, 1) f32
    let blk_u32 = blk.to_dtype(DType::U32)?;
    let before = (block_cdf.gather(&blk_u32, 1)? - block_sums.gather(&blk_u32, 1)?)?;
    let idx3 = blk_u32.reshape((m, 1, 1))?.broadcast_as((m, 1, BLOCK))?.contiguous()?;
    let inner = p3.gather(&idx3, 1)?.reshape((m, BLOCK))?;
    let inner_cdf = inner.cumsum(1)?;
    let k = count(&inner_cdf, &(target - before)?, BLOCK - 1)?;
    let ids = ((blk * BLOCK as f64)? + k)?.clamp(0f32, (v - 1) as f32)?;
    Ok(ids.squeeze(1)?.to_dtype(DType::U32)?)
}

fn uniforms(m: usize, rng: &mut dyn RngCore) -> Vec<f32> {
    (0..m).map(|_| rng.gen::<f32>()).collect()
}

/// Softmax sampling with temperature τ (the paper's choice, τ = 1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GumbelConfig {
    /// τ > 0; the paper uses 1. Lower is greedier (`argmax` is the limit τ → 0).
    pub temperature: f64,
}

impl Default for GumbelConfig {
    fn default() -> Self {
        Self { temperature: 1.0 }
    }
}

#[derive(Clone, Debug)]
pub struct Gumbel {
    temperature: f64,
}

impl Gumbel {
    pub fn new(cfg: GumbelConfig) -> Result<Self> {
        if !(cfg.temperature > 0.0 && cfg.temperature.is_finite()) {
            return Err(Error::config(format!(
                "sampler.gumbel.temperature must be > 0, got {} (use sampler `argmax` for greedy)",
                cfg.temperature
            )));
        }
        Ok(Self { temperature: cfg.temperature })
    }
}

impl Sampler for Gumbel {
    fn sample(&self, logits: &Tensor, rng: &mut dyn RngCore) -> Result<Tensor> {
        let logits = logits.detach().to_dtype(DType::F32)?;
        let probs = candle_nn::ops::softmax_last_dim(&(logits / self.temperature)?)?;
        let u = uniforms(probs.dim(0)?, rng);
        inverse_cdf(&probs, &u)
    }
}

/// The most likely token (Table 7's "argmax"); ignores the RNG.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArgmaxConfig {}

#[derive(Clone, Debug)]
pub struct Argmax;

impl Sampler for Argmax {
    fn sample(&self, logits: &Tensor, _rng: &mut dyn RngCore) -> Result<Tensor> {
        Ok(logits.detach().argmax(D::Minus1)?)
    }
}

/// Uniform over the whole vocabulary, ignoring the logits (Table 7's "uniform").
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UniformConfig {}

#[derive(Clone, Debug)]
pub struct Uniform;

impl Sampler for Uniform {
    fn sample(&self, logits: &Tensor, rng: &mut dyn RngCore) -> Result<Tensor> {
        let (m, v) = logits.dims2()?;
        let ids: Vec<u32> = (0..m).map(|_| rng.gen_range(0..v as u32)).collect();
        Ok(Tensor::from_vec(ids, m, &Device::Cpu)?.to_device(logits.device())?)
    }
}

cim_api::register_sampler! {
    name: "gumbel",
    about: "sample from softmax(logits / τ) (paper: τ = 1)",
    config: GumbelConfig,
    default: GumbelConfig::default(),
    tiny: GumbelConfig::default(),
    build: |cfg: GumbelConfig, _ctx: &BuildCtx| Gumbel::new(cfg),
}

cim_api::register_sampler! {
    name: "argmax",
    about: "the generator's most likely token (paper Table 7)",
    config: ArgmaxConfig,
    default: ArgmaxConfig::default(),
    tiny: ArgmaxConfig::default(),
    build: |_cfg: ArgmaxConfig, _ctx: &BuildCtx| Ok::<_, Error>(Argmax),
}

cim_api::register_sampler! {
    name: "uniform",
    about: "uniform over the vocabulary, ignoring the generator (paper Table 7)",
    config: UniformConfig,
    default: UniformConfig::default(),
    tiny: UniformConfig::default(),
    build: |_cfg: UniformConfig, _ctx: &BuildCtx| Ok::<_, Error>(Uniform),
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn conformance() -> Result<()> {
        for n in ["gumbel", "argmax", "uniform"] {
            cim_api::testing::check_sampler(n)?;
        }
        Ok(())
    }

    #[test]
    fn inverse_cdf_picks_the_expected_bucket() -> Result<()> {
        // 130 tokens (3 blocks, the last one padded); mass only on tokens 5, 64 and 129.
        let mut p = vec![0f32; 130];
        p[5] = 0.25;
        p[64] = 0.25;
        p[129] = 0.5;
        let probs = Tensor::from_vec(p.repeat(4), (4, 130), &Device::Cpu)?;
        let ids = inverse_cdf(&probs, &[0.0, 0.3, 0.6, 0.999])?.to_vec1::<u32>()?;
        assert_eq!(ids, vec![5, 64, 129, 129]);
        Ok(())
    }

    #[test]
    fn gumbel_frequencies_match_softmax() -> Result<()> {
        // 20,000 draws over a 100-token vocabulary (2 blocks); every empirical frequency is within
        // 4.5 standard errors of softmax(logits / τ), for τ = 1 and τ = 2.
        let v = 100;
        let logits: Vec<f32> = (0..v).map(|i| ((i * 37) % 11) as f32 * 0.4 - 2.0).collect();
        let rows = 20_000;
        let l = Tensor::from_vec(logits.repeat(rows), (rows, v), &Device::Cpu)?;
        for tau in [1.0f64, 2.0] {
            let s = Gumbel::new(GumbelConfig { temperature: tau })?;
            let mut rng = rand::rngs::StdRng::seed_from_u64(11);
            let ids = s.sample(&l, &mut rng)?.to_vec1::<u32>()?;
            let mut counts = vec![0usize; v];
            for i in ids {
                counts[i as usize] += 1;
            }
            let z: f64 = logits.iter().map(|&x| (x as f64 / tau).exp()).sum();
            for (i, &c) in counts.iter().enumerate() {
                let p = (logits[i] as f64 / tau).exp() / z;
                let freq = c as f64 / rows as f64;
                let se = (p * (1.0 - p) / rows as f64).sqrt();
                assert!((freq - p).abs() < 4.5 * se + 1e-9, "τ={tau} token {i}: {freq} vs {p}");
            }
        }
        Ok(())
    }

    #[test]
    fn argmax_is_deterministic_and_uniform_covers_vocab() -> Result<()> {
        let l = Tensor::new(&[[0.0f32, 3.0, 1.0], [5.0, 0.0, 1.0]], &Device::Cpu)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        assert_eq!(Argmax.sample(&l, &mut rng)?.to_vec1::<u32>()?, vec![1, 0]);
        let big = Tensor::zeros((30_000, 10), DType::F32, &Device::Cpu)?;
        let ids = Uniform.sample(&big, &mut rng)?.to_vec1::<u32>()?;
        let mut counts = [0usize; 10];
        for i in ids {
            counts[i as usize] += 1;
        }
        for c in counts {
            // 3000 expected per token, sd ≈ 52.
            assert!((c as i64 - 3000).abs() < 250, "{counts:?}");
        }
        Ok(())
    }
}
