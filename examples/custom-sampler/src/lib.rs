//! # A sampler plugin that lives outside cim's own plugins
//!
//! `epsilon_greedy` replaces a masked token by the generator's most likely token, except with
//! probability ε, where it draws uniformly from the vocabulary. It is a worked example for the
//! book's "Write your own plugin" chapter: a config struct, a component, one `register_sampler!`.

use cim_api::prelude::*;

// ANCHOR: config
/// Parameters under `[sampler.epsilon_greedy]`; unknown keys are rejected.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpsilonGreedyConfig {
    /// Probability of a uniform draw instead of the argmax.
    pub epsilon: f64,
}

impl Default for EpsilonGreedyConfig {
    fn default() -> Self {
        Self { epsilon: 0.1 }
    }
}
// ANCHOR_END: config

// ANCHOR: component
pub struct EpsilonGreedy {
    epsilon: f64,
}

impl EpsilonGreedy {
    pub fn new(cfg: EpsilonGreedyConfig) -> Result<Self> {
        if !(0.0..=1.0).contains(&cfg.epsilon) {
            return Err(Error::config(format!(
                "sampler.epsilon_greedy.epsilon must be in [0, 1], got {}",
                cfg.epsilon
            )));
        }
        Ok(Self {
            epsilon: cfg.epsilon,
        })
    }
}

impl Sampler for EpsilonGreedy {
    fn sample(&self, logits: &Tensor, rng: &mut dyn RngCore) -> Result<Tensor> {
        let (m, v) = logits.dims2()?;
        let best: Vec<u32> = logits.detach().argmax(D::Minus1)?.to_vec1()?;
        let ids: Vec<u32> = best
            .into_iter()
            .map(|b| {
                if rng.gen_bool(self.epsilon) {
                    rng.gen_range(0..v as u32)
                } else {
                    b
                }
            })
            .collect();
        Ok(Tensor::from_vec(ids, m, &Device::Cpu)?.to_device(logits.device())?)
    }
}
// ANCHOR_END: component

// ANCHOR: register
cim_api::register_sampler! {
    name: "epsilon_greedy",
    about: "argmax, or with probability ε a uniform token (example plugin)",
    config: EpsilonGreedyConfig,
    default: EpsilonGreedyConfig::default(),
    tiny: EpsilonGreedyConfig::default(),
    build: |cfg: EpsilonGreedyConfig, _ctx: &BuildCtx| EpsilonGreedy::new(cfg),
}
// ANCHOR_END: register

// ANCHOR: tests
#[cfg(test)]
mod tests {
    use super::*;
    use cim_api::rand::SeedableRng;

    #[test]
    fn conformance() -> Result<()> {
        cim_api::testing::check_sampler("epsilon_greedy")
    }

    #[test]
    fn epsilon_sets_the_share_of_uniform_draws() -> Result<()> {
        // Token 3 is the argmax of every row; with ε = 0.2 over 8 tokens, a row differs from it
        // with probability 0.2 · 7/8 = 0.175.
        let mut row = [0f32; 8];
        row[3] = 5.0;
        let logits = Tensor::from_vec(row.repeat(20_000), (20_000, 8), &Device::Cpu)?;
        let s = EpsilonGreedy::new(EpsilonGreedyConfig { epsilon: 0.2 })?;
        let mut rng = cim_api::rand::rngs::StdRng::seed_from_u64(0);
        let ids: Vec<u32> = s.sample(&logits, &mut rng)?.to_vec1()?;
        let off = ids.iter().filter(|&&i| i != 3).count() as f64 / ids.len() as f64;
        assert!((off - 0.175).abs() < 0.01, "{off}");
        assert!(EpsilonGreedy::new(EpsilonGreedyConfig { epsilon: 1.5 }).is_err());
        Ok(())
    }
}
// ANCHOR_END: tests
