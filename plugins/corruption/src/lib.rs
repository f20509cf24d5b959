//! # Corruptions — `tokens` (CiM) and `random_erasing` (paper Table 8)
//!
//! What the enhancer sees (stages 5–7 of the step; book: architecture).
//!
//! - `tokens`, the default, is CiM itself (paper Eq. 2): the sampled tokens replace the golden ones
//!   at the masked positions, the tokenizer's decoder renders the grid, and the result is resized
//!   to the enhancer's view. A position counts as replaced where the sampled token differs from
//!   the golden one.
//! - `random_erasing` is the baseline of paper Table 8 (Zhong et al., 2020): the pixels under the
//!   masked positions are replaced by uniform random values, the rest of the image is left as it
//!   is, and the generator's tokens are not used. With the `blockwise` masking at 50 % the erased
//!   area is a union of rectangles covering half the image, as in the paper's "50 % random
//!   erasing". Every masked position counts as replaced.
//!
//! - input: [`CorruptionInput`] (the original view, golden tokens, the mask, the sampled tokens,
//!   the tokenizer)
//! - output: [`Corrupted`] (the image in `[0, 1]`, detached; `(B, N)` replaced flags)

use candle_core::{DType, Tensor};
use rand::{Rng, RngCore};
use serde::{Deserialize, Serialize};

use cim_api::{BuildCtx, Corrupted, Corruption, CorruptionInput, Error, Result};

/// Paper Eq. (2), `replace(g, m, x_sampling)`, on the device: the golden ids `(B·N,)` with the
/// sampled ones `(M,)` written at the flat masked positions `(M,)`, and REVDET's label per
/// position, 1 where the token changed (a sampled token equal to the golden one counts as not
/// replaced). Nothing is read back to the host, so the step queues on without waiting.
pub fn replace_tokens(
    golden: &Tensor,
    at_mask: &Tensor,
    sampled: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let ids = golden.scatter(at_mask, &sampled.to_dtype(DType::U32)?, 0)?;
    let replaced = ids.ne(golden)?.to_dtype(DType::F32)?;
    Ok((ids, replaced))
}

/// CiM's corruption has no parameters.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensConfig {}

/// Sampled tokens at the masked positions, rendered by the tokenizer's decoder.
#[derive(Clone, Debug)]
pub struct Tokens;

impl Corruption for Tokens {
    fn corrupt(&self, input: &CorruptionInput<'_>, _rng: &mut dyn RngCore) -> Result<Corrupted> {
        let golden = input.golden;
        let b = golden.dim(0)?;
        let flat = golden.flatten_all()?;
        let n = flat.dim(0)? / b.max(1);
        let (ids, replaced) = replace_tokens(&flat, input.at_mask, input.sampled)?;
        let replaced = replaced.reshape((b, n))?;
        let small = input
            .tokenizer
            .decode(&ids.reshape(golden.shape())?)?
            .detach();
        let (h, w) = (input.image.dim(2)?, input.image.dim(3)?);
        let image = if small.dims()[2..] == [h, w] {
            small
        } else {
            small.upsample_bilinear2d(h, w, false)?
        };
        Ok(Corrupted { image, replaced })
    }
}

/// Random erasing: what fills the erased pixels.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RandomErasingConfig {
    /// `"noise"`: a uniform random value per pixel and channel (Zhong et al.'s default);
    /// `"grey"`: 0.5.
    pub fill: Fill,
}

impl Default for RandomErasingConfig {
    fn default() -> Self {
        Self { fill: Fill::Noise }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fill {
    Noise,
    Grey,
}

/// The masked positions' pixels erased.
#[derive(Clone, Debug)]
pub struct RandomErasing {
    fill: Fill,
}

impl Corruption for RandomErasing {
    fn corrupt(&self, input: &CorruptionInput<'_>, rng: &mut dyn RngCore) -> Result<Corrupted> {
        let image = input.image;
        let (b, c, h, w) = image.dims4()?;
        let grid = input.mask.grid();
        if h % grid.h != 0 || w % grid.w != 0 {
            return Err(Error::config(format!(
                "corruption `random_erasing`: the {h}×{w} view is not a whole number of the \
                 {}×{} token grid's cells",
                grid.h, grid.w
            )));
        }
        let m = input
            .mask
            .to_tensor(DType::F32, image.device())?
            .reshape((b, grid.len()))?;
        let at = m
            .reshape((b, 1, grid.h, grid.w))?
            .upsample_nearest2d(h, w)?
            .broadcast_as((b, c, h, w))?;
        let fill = match self.fill {
            Fill::Grey => Tensor::full(0.5f32, (b, c, h, w), image.device())?,
            Fill::Noise => {
                // From `rng` on the host, so a seed gives the same image on every device.
                let v: Vec<f32> = (0..b * c * h * w).map(|_| rng.gen::<f32>()).collect();
                Tensor::from_vec(v, (b, c, h, w), image.device())?
            }
        };
        let keep = (1.0 - &at)?;
        let erased = ((image.to_dtype(DType::F32)? * keep)? + (fill * at)?)?.detach();
        Ok(Corrupted {
            image: erased,
            replaced: m,
        })
    }
}

cim_api::register_corruption! {
    name: "tokens",
    about: "CiM: sampled tokens at the masked positions, rendered by the tokenizer's decoder (paper Eq. 2)",
    config: TokensConfig,
    default: TokensConfig::default(),
    tiny: TokensConfig::default(),
    build: |_cfg: TokensConfig, _ctx: &BuildCtx| Ok::<_, Error>(Tokens),
}

cim_api::register_corruption! {
    name: "random_erasing",
    about: "the masked positions' pixels replaced by random values; no generator tokens (paper Table 8)",
    config: RandomErasingConfig,
    default: RandomErasingConfig::default(),
    tiny: RandomErasingConfig::default(),
    build: |cfg: RandomErasingConfig, _ctx: &BuildCtx| Ok::<_, Error>(RandomErasing { fill: cfg.fill }),
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use cim_api::{Mask, TokenGrid};
    use rand::SeedableRng;

    /// A tokenizer whose token `t` decodes to a 2×2 block of value `t / 10`.
    struct Blocks;
    impl cim_api::Tokenizer for Blocks {
        fn vocab_size(&self) -> usize {
            10
        }
        fn grid(&self, _: (usize, usize)) -> Result<TokenGrid> {
            Ok(TokenGrid::new(2, 2))
        }
        fn encode(&self, _: &Tensor) -> Result<Tensor> {
            unreachable!("not used")
        }
        fn decode(&self, ids: &Tensor) -> Result<Tensor> {
            let v = (ids.to_dtype(DType::F32)? / 10.0)?;
            let (b, gh, gw) = ids.dims3()?;
            Ok(v.reshape((b, 1, gh, gw))?
                .upsample_nearest2d(2 * gh, 2 * gw)?
                .broadcast_as((b, 3, 2 * gh, 2 * gw))?
                .contiguous()?)
        }
    }

    /// One 4×4 grey image (0.25) on a 2×2 grid, positions 0 and 3 masked.
    struct Parts {
        image: Tensor,
        golden: Tensor,
        mask: Mask,
        at: Tensor,
        sampled: Tensor,
    }

    impl Parts {
        fn new() -> Result<Self> {
            let dev = Device::Cpu;
            let mask = Mask::new(1, TokenGrid::new(2, 2), vec![true, false, false, true])?;
            Ok(Self {
                image: Tensor::full(0.25f32, (1, 3, 4, 4), &dev)?,
                golden: Tensor::new(&[[[1u32, 2], [3, 4]]], &dev)?,
                at: mask.indices_tensor(&dev)?,
                mask,
                // Position 0 gets token 7 (a change), position 3 gets 4 again (no change).
                sampled: Tensor::new(&[7u32, 4], &dev)?,
            })
        }

        fn input(&self) -> CorruptionInput<'_> {
            CorruptionInput {
                image: &self.image,
                golden: &self.golden,
                mask: &self.mask,
                at_mask: &self.at,
                sampled: &self.sampled,
                tokenizer: &Blocks,
            }
        }
    }

    #[test]
    fn tokens_replace_masked_positions_and_flag_only_changes() -> Result<()> {
        let parts = Parts::new()?;
        let input = parts.input();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let c = Tokens.corrupt(&input, &mut rng)?;
        assert_eq!(c.replaced.to_vec2::<f32>()?, vec![vec![1.0, 0.0, 0.0, 0.0]]);
        let px = c.image.get(0)?.get(0)?.to_vec2::<f32>()?;
        assert_eq!(
            (px[0][0], px[0][3], px[3][0], px[3][3]),
            (0.7, 0.2, 0.3, 0.4)
        );
        Ok(())
    }

    #[test]
    fn random_erasing_changes_exactly_the_masked_cells_and_repeats_with_its_seed() -> Result<()> {
        let parts = Parts::new()?;
        let input = parts.input();
        let erase = RandomErasing { fill: Fill::Noise };
        let run = |seed| -> Result<Corrupted> {
            erase.corrupt(&input, &mut rand::rngs::StdRng::seed_from_u64(seed))
        };
        let c = run(3)?;
        assert_eq!(c.replaced.to_vec2::<f32>()?, vec![vec![1.0, 0.0, 0.0, 1.0]]);
        for ch in 0..3 {
            let px = c.image.get(0)?.get(ch)?.to_vec2::<f32>()?;
            // Unmasked cells (top right, bottom left) keep the image; masked ones are noise.
            assert_eq!(
                (px[0][2], px[0][3], px[3][0], px[2][1]),
                (0.25, 0.25, 0.25, 0.25)
            );
            let noise = [px[0][0], px[1][1], px[2][2], px[3][3]];
            assert!(
                noise.iter().all(|v| (0.0..1.0).contains(v) && *v != 0.25),
                "{noise:?}"
            );
        }
        assert_eq!(
            run(3)?.image.flatten_all()?.to_vec1::<f32>()?,
            c.image.flatten_all()?.to_vec1::<f32>()?
        );
        let grey = RandomErasing { fill: Fill::Grey }
            .corrupt(&input, &mut rand::rngs::StdRng::seed_from_u64(0))?;
        assert_eq!(grey.image.get(0)?.get(1)?.to_vec2::<f32>()?[1][0], 0.5);
        Ok(())
    }

    /// Eq. (2) written out on the host: the reference the device version is tested against.
    fn replace_on_host(golden: &[u32], masked: &[u32], sampled: &[u32]) -> (Vec<u32>, Vec<f32>) {
        let mut ids = golden.to_vec();
        let mut replaced = vec![0f32; golden.len()];
        for (&p, &s) in masked.iter().zip(sampled) {
            let p = p as usize;
            replaced[p] = (s != golden[p]) as u8 as f32;
            ids[p] = s;
        }
        (ids, replaced)
    }

    fn replace_u32(golden: &[u32], masked: &[u32], sampled: &[u32]) -> (Vec<u32>, Vec<f32>) {
        let dev = Device::Cpu;
        let t = |v: &[u32]| Tensor::new(v, &dev).unwrap();
        let (ids, replaced) = replace_tokens(&t(golden), &t(masked), &t(sampled)).unwrap();
        (ids.to_vec1().unwrap(), replaced.to_vec1().unwrap())
    }

    #[test]
    fn replaced_means_changed_not_merely_masked() {
        // Positions 1, 2, 4 masked; position 2's sample equals its golden token.
        let (ids, replaced) = replace_u32(&[10, 11, 12, 13, 14], &[1, 2, 4], &[7, 12, 9]);
        assert_eq!(ids, vec![10, 7, 12, 13, 9]);
        assert_eq!(replaced, vec![0.0, 1.0, 0.0, 0.0, 1.0]);
    }

    #[test]
    fn device_replacement_equals_eq2_on_the_host() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (n, vocab) = (4 * 196, 16u32);
        let golden: Vec<u32> = (0..n).map(|_| rng.gen_range(0..vocab)).collect();
        let masked: Vec<u32> = (0..n as u32).filter(|_| rng.gen_bool(0.55)).collect();
        let sampled: Vec<u32> = masked.iter().map(|_| rng.gen_range(0..vocab)).collect();
        let want = replace_on_host(&golden, &masked, &sampled);
        assert_eq!(replace_u32(&golden, &masked, &sampled), want);
        // Some sampled tokens equal their golden one (vocabulary 16): not every masked one counts.
        let n_replaced = want.1.iter().sum::<f32>() as usize;
        assert!(
            n_replaced > 0 && n_replaced < masked.len(),
            "{n_replaced} of {}",
            masked.len()
        );
        // No masked positions: the golden ids, nothing replaced.
        assert_eq!(
            replace_u32(&golden, &[], &[]),
            (golden.clone(), vec![0.0; n])
        );
    }

    #[test]
    fn both_pass_the_conformance_checks() -> Result<()> {
        for name in ["tokens", "random_erasing"] {
            cim_api::testing::check_corruption(name)?;
        }
        Ok(())
    }
}
