//! # Masking — `random`
//!
//! Paper §2.3, Eq. (1) and footnote 3: "we randomly mask k embeddings … Typically, we set k equal to
//! 100 ∼ 120 given the input sequence length n of 196". Table 9: "100 to 120, Random Masking".
//! k is drawn uniformly per image from the configured range, then k distinct positions uniformly.

use rand::{Rng, RngCore};
use serde::{Deserialize, Serialize};

use cim_api::{BuildCtx, Error, Mask, Masking, Result, TokenGrid};

/// How the range is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RangeMode {
    /// `count = [lo, hi]` positions (inclusive).
    Count,
    /// `ratio = [lo, hi]` fractions of the grid, rounded to counts.
    Ratio,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RandomMaskingConfig {
    pub mode: RangeMode,
    pub count: [usize; 2],
    pub ratio: [f64; 2],
}

impl Default for RandomMaskingConfig {
    fn default() -> Self {
        Self {
            mode: RangeMode::Count,
            count: [100, 120],
            ratio: [0.5, 0.6],
        }
    }
}

#[derive(Clone, Debug)]
pub struct RandomMasking {
    cfg: RandomMaskingConfig,
}

impl RandomMasking {
    pub fn new(cfg: RandomMaskingConfig) -> Result<Self> {
        let [a, b] = cfg.ratio;
        if cfg.mode == RangeMode::Ratio && !(0.0 < a && a <= b && b < 1.0) {
            return Err(Error::config(format!(
                "masking.random.ratio must satisfy 0 < lo ≤ hi < 1, got [{a}, {b}]"
            )));
        }
        if cfg.mode == RangeMode::Count && !(0 < cfg.count[0] && cfg.count[0] <= cfg.count[1]) {
            return Err(Error::config(format!(
                "masking.random.count must satisfy 0 < lo ≤ hi, got {:?}",
                cfg.count
            )));
        }
        Ok(Self { cfg })
    }

    /// The inclusive count range for a grid of `n` positions.
    pub fn count_range(&self, n: usize) -> Result<(usize, usize)> {
        let (lo, hi) = match self.cfg.mode {
            RangeMode::Count => (self.cfg.count[0], self.cfg.count[1]),
            RangeMode::Ratio => (
                ((self.cfg.ratio[0] * n as f64).round() as usize).max(1),
                (self.cfg.ratio[1] * n as f64).round() as usize,
            ),
        };
        if hi >= n {
            return Err(Error::config(format!(
                "masking.random: up to {hi} masked positions do not fit a grid of {n} \
                 (set masking.random.count below {n}, or mode = \"ratio\")"
            )));
        }
        Ok((lo, hi.max(lo)))
    }
}

impl Masking for RandomMasking {
    fn sample(&self, batch: usize, grid: TokenGrid, rng: &mut dyn RngCore) -> Result<Mask> {
        let n = grid.len();
        let (lo, hi) = self.count_range(n)?;
        let mut flags = vec![false; batch * n];
        let mut perm: Vec<usize> = (0..n).collect();
        for b in 0..batch {
            let k = rng.gen_range(lo..=hi);
            // Partial Fisher–Yates: the first k entries are a uniform k-subset.
            for i in 0..k {
                let j = rng.gen_range(i..n);
                perm.swap(i, j);
            }
            for &p in &perm[..k] {
                flags[b * n + p] = true;
            }
        }
        Mask::new(batch, grid, flags)
    }
}

cim_api::register_masking! {
    name: "random",
    about: "k uniformly random positions per image, k uniform in a count or ratio range (paper: 100–120 of 196)",
    config: RandomMaskingConfig,
    default: RandomMaskingConfig::default(),
    tiny: RandomMaskingConfig { mode: RangeMode::Ratio, ..RandomMaskingConfig::default() },
    build: |cfg: RandomMaskingConfig, _ctx: &BuildCtx| RandomMasking::new(cfg),
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn conformance() -> Result<()> {
        cim_api::testing::check_masking("random")
    }

    #[test]
    fn counts_cover_the_configured_range_uniformly() -> Result<()> {
        let m = RandomMasking::new(RandomMaskingConfig::default())?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mask = m.sample(4200, TokenGrid::new(14, 14), &mut rng)?;
        let mut hist = [0usize; 21];
        for k in mask.counts() {
            assert!((100..=120).contains(&k), "k = {k}");
            hist[k - 100] += 1;
        }
        // 200 expected per value (sd ≈ 14).
        for h in hist {
            assert!((140..=260).contains(&h), "{hist:?}");
        }
        // Every position is masked about equally often: 4200 · 110/196 ≈ 2357.
        let mut per_pos = [0usize; 196];
        for b in 0..4200 {
            for (p, c) in per_pos.iter_mut().enumerate() {
                *c += mask.is_masked(b, p) as usize;
            }
        }
        for c in per_pos {
            assert!((2150..=2570).contains(&c), "position count {c}");
        }
        Ok(())
    }

    #[test]
    fn ratio_mode_and_bad_ranges() -> Result<()> {
        let cfg = RandomMaskingConfig { mode: RangeMode::Ratio, ..Default::default() };
        let m = RandomMasking::new(cfg)?;
        assert_eq!(m.count_range(64)?, (32, 38));
        let too_many = RandomMasking::new(RandomMaskingConfig::default())?;
        let err = too_many.count_range(64).unwrap_err().to_string();
        assert!(err.contains("grid of 64"), "{err}");
        Ok(())
    }
}
