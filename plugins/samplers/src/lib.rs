//! # Samplers — `gumbel`, `argmax`, `uniform`, `top_k`, `top_p`
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
        return Err(Error::msg(format!(
            "inverse_cdf: {} uniforms for {m} rows",
            u.len()
        )));
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
    let idx3 = blk_u32
        .reshape((m, 1, 1))?
        .broadcast_as((m, 1, BLOCK))?
        .contiguous()?;
    let inner = p3.gather(&idx3, 1)?.reshape((m, BLOCK))?;
    let inner_cdf = inner.cumsum(1)?;
    let k = count(&inner_cdf, &(target - before)?, BLOCK - 1)?;
    let ids = ((blk * BLOCK as f64)? + k)?.clamp(0f32, (v - 1) as f32)?;
    Ok(ids.squeeze(1)?.to_dtype(DType::U32)?)
}

/// Inclusive prefix sums along the last dimension of `(M, V)`, in two levels of 64 (block sums,
/// then within blocks) so no `V×V` triangular matrix is formed.
pub fn block_cumsum(x: &Tensor) -> Result<Tensor> {
    let (m, v) = x.dims2()?;
    let nb = v.div_ceil(BLOCK);
    let xp = if nb * BLOCK != v {
        x.pad_with_zeros(1, 0, nb * BLOCK - v)?
    } else {
        x.clone()
    };
    let x3 = xp.reshape((m, nb, BLOCK))?;
    let inner = x3.cumsum(2)?; // (M, nb, 64)
    let block_sums = x3.sum(2)?; // (M, nb)
    let before = (block_sums.cumsum(1)? - &block_sums)?; // exclusive prefix of blocks
    let out = inner
        .broadcast_add(&before.unsqueeze(2)?)?
        .reshape((m, nb * BLOCK))?;
    Ok(out.narrow(1, 0, v)?)
}

/// Sorts each row's logits in descending order: `(sorted logits, token ids)`.
fn sort_desc(logits: &Tensor) -> Result<(Tensor, Tensor)> {
    let idx = logits.arg_sort_last_dim(false)?;
    Ok((logits.gather(&idx, 1)?, idx))
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
        Ok(Self {
            temperature: cfg.temperature,
        })
    }
}

impl Sampler for Gumbel {
    fn sample(&self, logits: &Tensor, rng: &mut dyn RngCore) -> Result<Tensor> {
        let logits = logits.detach().to_dtype(DType::F32)?;
        // τ = 1 (the paper's) divides by one: skip the pass.
        let logits = if self.temperature == 1.0 {
            logits
        } else {
            (logits / self.temperature)?
        };
        let probs = candle_nn::ops::softmax_last_dim(&logits)?;
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

/// Softmax sampling restricted to the `k` most likely tokens (an extra, not in the paper).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopKConfig {
    pub k: usize,
    pub temperature: f64,
}

impl Default for TopKConfig {
    fn default() -> Self {
        Self {
            k: 50,
            temperature: 1.0,
        }
    }
}

#[derive(Clone, Debug)]
pub struct TopK {
    k: usize,
    temperature: f64,
}

impl TopK {
    pub fn new(cfg: TopKConfig) -> Result<Self> {
        if cfg.k == 0 || !(cfg.temperature > 0.0) {
            return Err(Error::config(format!(
                "sampler.top_k needs k ≥ 1 and temperature > 0, got k = {}, temperature = {}",
                cfg.k, cfg.temperature
            )));
        }
        Ok(Self {
            k: cfg.k,
            temperature: cfg.temperature,
        })
    }
}

impl Sampler for TopK {
    fn sample(&self, logits: &Tensor, rng: &mut dyn RngCore) -> Result<Tensor> {
        let logits = logits.detach().to_dtype(DType::F32)?;
        let (m, v) = logits.dims2()?;
        let k = self.k.min(v);
        let (sorted, idx) = sort_desc(&logits)?;
        let top = sorted.narrow(1, 0, k)?.contiguous()?;
        let probs = candle_nn::ops::softmax_last_dim(&(top / self.temperature)?)?;
        let pos = inverse_cdf(&probs, &uniforms(m, rng))?; // position among the top k
        let ids = idx
            .narrow(1, 0, k)?
            .contiguous()?
            .gather(&pos.unsqueeze(1)?, 1)?;
        Ok(ids.squeeze(1)?)
    }
}

/// Nucleus sampling: the smallest set of most likely tokens whose mass reaches `p` (an extra).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopPConfig {
    pub p: f64,
    pub temperature: f64,
}

impl Default for TopPConfig {
    fn default() -> Self {
        Self {
            p: 0.9,
            temperature: 1.0,
        }
    }
}

#[derive(Clone, Debug)]
pub struct TopP {
    p: f64,
    temperature: f64,
}

impl TopP {
    pub fn new(cfg: TopPConfig) -> Result<Self> {
        if !(cfg.p > 0.0 && cfg.p <= 1.0 && cfg.temperature > 0.0) {
            return Err(Error::config(format!(
                "sampler.top_p needs 0 < p ≤ 1 and temperature > 0, got p = {}, temperature = {}",
                cfg.p, cfg.temperature
            )));
        }
        Ok(Self {
            p: cfg.p,
            temperature: cfg.temperature,
        })
    }
}

impl Sampler for TopP {
    fn sample(&self, logits: &Tensor, rng: &mut dyn RngCore) -> Result<Tensor> {
        let logits = logits.detach().to_dtype(DType::F32)?;
        let m = logits.dim(0)?;
        let (sorted, idx) = sort_desc(&(logits / self.temperature)?)?;
        let probs = candle_nn::ops::softmax_last_dim(&sorted)?;
        // Keep a token when the mass strictly before it is below p (the first one always stays).
        let before = (block_cumsum(&probs)? - &probs)?;
        let keep = before.lt(self.p as f32)?.to_dtype(DType::F32)?;
        let pos = inverse_cdf(&(probs * keep)?, &uniforms(m, rng))?;
        Ok(idx.gather(&pos.unsqueeze(1)?, 1)?.squeeze(1)?)
    }
}

cim_api::register_sampler! {
    name: "top_k",
    about: "softmax sampling among the k most likely tokens (extra; default k = 50)",
    config: TopKConfig,
    default: TopKConfig::default(),
    tiny: TopKConfig { k: 5, temperature: 1.0 },
    build: |cfg: TopKConfig, _ctx: &BuildCtx| TopK::new(cfg),
}

cim_api::register_sampler! {
    name: "top_p",
    about: "nucleus sampling: most likely tokens up to mass p (extra; default p = 0.9)",
    config: TopPConfig,
    default: TopPConfig::default(),
    tiny: TopPConfig::default(),
    build: |cfg: TopPConfig, _ctx: &BuildCtx| TopP::new(cfg),
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
        for n in ["gumbel", "argmax", "uniform", "top_k", "top_p"] {
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
                assert!(
                    (freq - p).abs() < 4.5 * se + 1e-9,
                    "τ={tau} token {i}: {freq} vs {p}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn block_cumsum_equals_a_plain_prefix_sum() -> Result<()> {
        let x = cim_api::testing::uniform((3, 150), 9)?;
        let ours = block_cumsum(&x)?.to_vec2::<f32>()?;
        let rows = x.to_vec2::<f32>()?;
        for (r, o) in rows.iter().zip(&ours) {
            let mut acc = 0f32;
            for (v, got) in r.iter().zip(o) {
                acc += v;
                assert!((acc - got).abs() < 1e-4, "{acc} vs {got}");
            }
        }
        Ok(())
    }

    #[test]
    fn top_k_never_leaves_the_top_k_and_top_p_keeps_the_nucleus() -> Result<()> {
        // Row logits: token i has logit (i·13 mod 100)/10, so the order is a fixed permutation.
        let v = 100;
        let row: Vec<f32> = (0..v).map(|i| ((i * 13) % v) as f32 / 10.0).collect();
        let mut order: Vec<usize> = (0..v).collect();
        order.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap());
        let logits = Tensor::from_vec(row.repeat(5000), (5000, v), &Device::Cpu)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let k = 7;
        let ids = TopK::new(TopKConfig {
            k,
            temperature: 1.0,
        })?
        .sample(&logits, &mut rng)?
        .to_vec1::<u32>()?;
        let allowed: std::collections::BTreeSet<u32> =
            order[..k].iter().map(|&i| i as u32).collect();
        assert!(ids.iter().all(|i| allowed.contains(i)));
        // The most likely token is drawn with its renormalised top-k probability.
        let z: f64 = order[..k].iter().map(|&i| (row[i] as f64).exp()).sum();
        let p0 = (row[order[0]] as f64).exp() / z;
        let f0 = ids.iter().filter(|&&i| i as usize == order[0]).count() as f64 / 5000.0;
        assert!((f0 - p0).abs() < 0.03, "{f0} vs {p0}");
        // Nucleus: compute the set by hand.
        let p = 0.5;
        let zall: f64 = row.iter().map(|&x| (x as f64).exp()).sum();
        let mut mass = 0.0;
        let mut nucleus = std::collections::BTreeSet::new();
        for &i in &order {
            if mass >= p {
                break;
            }
            nucleus.insert(i as u32);
            mass += (row[i] as f64).exp() / zall;
        }
        let ids = TopP::new(TopPConfig {
            p,
            temperature: 1.0,
        })?
        .sample(&logits, &mut rng)?
        .to_vec1::<u32>()?;
        assert!(
            ids.iter().all(|i| nucleus.contains(i)),
            "nucleus {nucleus:?}"
        );
        assert_eq!(
            ids.iter().collect::<std::collections::BTreeSet<_>>().len(),
            nucleus.len()
        );
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
