//! # Masking — `random`, `blockwise`
//!
//! Paper §2.3, Eq. (1) and footnote 3: "we randomly mask k embeddings … Typically, we set k equal to
//! 100 ∼ 120 given the input sequence length n of 196". Table 9: "100 to 120, Random Masking".
//! k is drawn uniformly per image from the configured range, then k distinct positions uniformly.
//!
//! `blockwise` is BEiT's block-wise masking (Bao et al., 2021, Algorithm 1; Table 4 of the CiM paper
//! compares it with random masking): rectangles of at least `min_block` patches with aspect ratio
//! drawn log-uniformly from `aspect`, added until k patches are masked (at most k; a block that would
//! overshoot is redrawn, and after 10 failed draws the image keeps what it has).

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

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockwiseMaskingConfig {
    pub mode: RangeMode,
    pub count: [usize; 2],
    pub ratio: [f64; 2],
    /// Smallest block, in patches (BEiT: 16).
    pub min_block: usize,
    /// Aspect-ratio range of blocks (BEiT: 0.3 to 1/0.3).
    pub aspect: [f64; 2],
}

impl Default for BlockwiseMaskingConfig {
    fn default() -> Self {
        let r = RandomMaskingConfig::default();
        Self {
            mode: r.mode,
            count: r.count,
            ratio: r.ratio,
            min_block: 16,
            aspect: [0.3, 1.0 / 0.3],
        }
    }
}

#[derive(Clone, Debug)]
pub struct BlockwiseMasking {
    range: RandomMasking,
    min_block: usize,
    aspect: [f64; 2],
}

/// A rectangle `(top, left, h, w)` on the grid.
pub type Block = (usize, usize, usize, usize);

impl BlockwiseMasking {
    pub fn new(cfg: BlockwiseMaskingConfig) -> Result<Self> {
        let [a0, a1] = cfg.aspect;
        if !(a0 > 0.0 && a0 <= a1) || cfg.min_block == 0 {
            return Err(Error::config(format!(
                "masking.blockwise needs min_block ≥ 1 and 0 < aspect[0] ≤ aspect[1], got {} and {:?}",
                cfg.min_block, cfg.aspect
            )));
        }
        let range = RandomMasking::new(RandomMaskingConfig {
            mode: cfg.mode,
            count: cfg.count,
            ratio: cfg.ratio,
        })?;
        Ok(Self {
            range,
            min_block: cfg.min_block,
            aspect: cfg.aspect,
        })
    }

    /// One candidate block of area in `[min_block, max_area]` (before rounding), or `None` when it
    /// does not fit the grid.
    pub fn draw_block(
        &self,
        grid: TokenGrid,
        max_area: usize,
        rng: &mut dyn RngCore,
    ) -> Option<Block> {
        let lo = self.min_block as f64;
        let hi = (max_area as f64).max(lo);
        let area = rng.gen_range(lo..=hi);
        let (l0, l1) = (self.aspect[0].ln(), self.aspect[1].ln());
        let aspect = if l1 > l0 {
            rng.gen_range(l0..l1).exp()
        } else {
            self.aspect[0]
        };
        let h = (area * aspect).sqrt().round() as usize;
        let w = (area / aspect).sqrt().round() as usize;
        if h == 0 || w == 0 || h >= grid.h || w >= grid.w {
            return None;
        }
        let top = rng.gen_range(0..=grid.h - h);
        let left = rng.gen_range(0..=grid.w - w);
        Some((top, left, h, w))
    }

    fn one(&self, grid: TokenGrid, k: usize, flags: &mut [bool], rng: &mut dyn RngCore) {
        let mut count = 0;
        while count < k {
            let max_new = k - count;
            let mut added = 0;
            for _ in 0..10 {
                let Some((top, left, h, w)) = self.draw_block(grid, max_new, rng) else {
                    continue;
                };
                let cells = || {
                    (top..top + h).flat_map(move |y| (left..left + w).map(move |x| y * grid.w + x))
                };
                let new = cells().filter(|&i| !flags[i]).count();
                if new > 0 && new <= max_new {
                    for i in cells() {
                        flags[i] = true;
                    }
                    added = new;
                    break;
                }
            }
            if added == 0 {
                break;
            }
            count += added;
        }
    }
}

impl Masking for BlockwiseMasking {
    fn sample(&self, batch: usize, grid: TokenGrid, rng: &mut dyn RngCore) -> Result<Mask> {
        let n = grid.len();
        let (lo, hi) = self.range.count_range(n)?;
        let mut flags = vec![false; batch * n];
        for b in 0..batch {
            let k = rng.gen_range(lo..=hi);
            self.one(grid, k, &mut flags[b * n..(b + 1) * n], rng);
        }
        Mask::new(batch, grid, flags)
    }
}

cim_api::register_masking! {
    name: "blockwise",
    about: "BEiT's block-wise masking: rectangles of ≥ 16 patches, aspect 0.3–3.3, up to k (paper Table 4)",
    config: BlockwiseMaskingConfig,
    default: BlockwiseMaskingConfig::default(),
    tiny: BlockwiseMaskingConfig { mode: RangeMode::Ratio, min_block: 4, ..BlockwiseMaskingConfig::default() },
    build: |cfg: BlockwiseMaskingConfig, _ctx: &BuildCtx| BlockwiseMasking::new(cfg),
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
        cim_api::testing::check_masking("random")?;
        cim_api::testing::check_masking("blockwise")
    }

    #[test]
    fn blockwise_blocks_respect_size_and_aspect_and_counts_stay_in_range() -> Result<()> {
        let m = BlockwiseMasking::new(BlockwiseMaskingConfig::default())?;
        let grid = TokenGrid::new(14, 14);
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let mut drawn = 0;
        for _ in 0..2000 {
            if let Some((top, left, h, w)) = m.draw_block(grid, 120, &mut rng) {
                drawn += 1;
                assert!(top + h <= 14 && left + w <= 14);
                // Rounding each side of a ≥16-patch block can lose at most one row/column.
                assert!(h * w >= 9, "{h}×{w}");
                let r = h as f64 / w as f64;
                // Aspect within [0.3, 3.33], widened for rounding of small sides.
                assert!((0.3 / 1.6..=3.34 * 1.6).contains(&r), "{h}×{w}");
            }
        }
        assert!(drawn > 1000, "most draws fit a 14×14 grid: {drawn}");
        let mask = m.sample(500, grid, &mut rng)?;
        let counts = mask.counts();
        assert!(
            counts.iter().all(|&k| k <= 120),
            "never more than the drawn k"
        );
        let mean = counts.iter().sum::<usize>() as f64 / counts.len() as f64;
        assert!(
            mean > 95.0,
            "blocks fill close to k ∈ [100, 120]: mean {mean}"
        );
        // Masks are blocky: most masked patches have a masked 4-neighbour (random masking at 55 %
        // gives ~80 %; blocks give more).
        let mut with_neighbour = 0;
        let mut total = 0;
        for b in 0..500 {
            for y in 0..14 {
                for x in 0..14 {
                    if mask.is_masked(b, y * 14 + x) {
                        total += 1;
                        let n = [
                            (y.wrapping_sub(1), x),
                            (y + 1, x),
                            (y, x.wrapping_sub(1)),
                            (y, x + 1),
                        ];
                        if n.iter()
                            .any(|&(yy, xx)| yy < 14 && xx < 14 && mask.is_masked(b, yy * 14 + xx))
                        {
                            with_neighbour += 1;
                        }
                    }
                }
            }
        }
        assert!(
            with_neighbour as f64 / total as f64 > 0.95,
            "{with_neighbour}/{total}"
        );
        Ok(())
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
        let cfg = RandomMaskingConfig {
            mode: RangeMode::Ratio,
            ..Default::default()
        };
        let m = RandomMasking::new(cfg)?;
        assert_eq!(m.count_range(64)?, (32, 38));
        let too_many = RandomMasking::new(RandomMaskingConfig::default())?;
        let err = too_many.count_range(64).unwrap_err().to_string();
        assert!(err.contains("grid of 64"), "{err}");
        Ok(())
    }
}
