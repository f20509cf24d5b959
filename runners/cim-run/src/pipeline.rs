//! Assembling a CiM model from the registry, and the forward half of one training step
//! (DESIGN.md stages 1–9; the paper's Figure 1b, top to bottom).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;

use cim_api::config::select;
use cim_api::pixels::normalize;
use cim_api::registry::{BuildCtx, Entry, Kind, Variant};
use cim_api::{
    Enhancer, Error, Generator, Losses, Mask, Masking, Objective, ObjectiveBatch, ParamStore,
    Result, Sampler, TokenGrid, Tokenizer,
};

use crate::config::{DataConfig, Resolved};
use crate::data::Batch;

/// Seed of a randomly initialised tokenizer: a constant, so every run (whatever `run.seed`) sees the
/// same frozen tokenizer until real weights are loaded.
pub const RANDOM_TOKENIZER_SEED: u64 = 0xD417_E0D5;

/// The six components of a CiM run and where their parameters live.
pub struct Cim {
    pub tokenizer: Box<dyn Tokenizer>,
    pub masking: Box<dyn Masking>,
    pub generator: Box<dyn Generator>,
    pub sampler: Box<dyn Sampler>,
    pub enhancer: Box<dyn Enhancer>,
    pub objective: Box<dyn Objective>,
    /// Trainable parameters: `generator.*`, `enhancer.*`, `objective.*`.
    pub params: ParamStore,
    /// The frozen tokenizer's tensors (never seen by the optimizer).
    pub frozen: ParamStore,
    /// Non-trainable state saved with the weights (BatchNorm running statistics).
    pub buffers: ParamStore,
    pub grid: TokenGrid,
    pub names: BTreeMap<&'static str, String>,
    pub data: DataConfig,
    pub device: Device,
}

fn build<K: Kind + ?Sized>(res: &Resolved, ctx: &BuildCtx) -> Result<Box<K>>
where
    Entry<K>: cim_api::inventory::Collect,
{
    let sel = select::<K>(&res.figment)?;
    (sel.entry.build)(&sel.params, Variant::Default, ctx)
        .map_err(|e| Error::msg(format!("building {} `{}`: {e}", K::KIND, sel.entry.name)))
}

/// Resolves `run.device`.
pub fn device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(Device::cuda_if_available(0)?),
        s => match s.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => Device::new_cuda(n).map_err(|e| {
                Error::config(format!(
                    "run.device = \"{s}\": {e} (this binary needs `--features cuda` and a GPU; use \"cpu\" or \"auto\")"
                ))
            }),
            None => Err(Error::config(format!(
                "run.device must be \"auto\", \"cpu\" or \"cuda:N\", got \"{s}\""
            ))),
        },
    }
}

impl Cim {
    /// Builds every component through the registry, in dependency order: tokenizer (vocabulary,
    /// grid) → masking → enhancer (feature layout) → generator → sampler → objective.
    pub fn build(res: &Resolved) -> Result<Self> {
        let device = device(&res.cfg.run.device)?;
        let data = res.cfg.data.clone();
        let params = ParamStore::trainable(res.cfg.run.seed);
        let frozen = ParamStore::frozen(RANDOM_TOKENIZER_SEED);
        let buffers = ParamStore::frozen(res.cfg.run.seed);
        let mut ctx = BuildCtx {
            device: device.clone(),
            dtype: DType::F32,
            image_size: data.image_size,
            tokenizer_size: data.tokenizer_size,
            seed: res.cfg.run.seed,
            vocab_size: None,
            token_grid: None,
            enhancer: None,
            vb: frozen.var_builder(DType::F32, &device).pp("tokenizer"),
            buffers: buffers.clone(),
            enhancer_vb: None,
        };
        let tokenizer = build::<dyn Tokenizer>(res, &ctx)?;
        let grid = tokenizer
            .grid((data.tokenizer_size, data.tokenizer_size))
            .map_err(|e| {
                Error::config(format!(
                    "data.tokenizer_size = {}: {e}",
                    data.tokenizer_size
                ))
            })?;
        ctx.vocab_size = Some(tokenizer.vocab_size());
        ctx.token_grid = Some(grid);
        let vb = params.var_builder(DType::F32, &device);
        let masking = build::<dyn Masking>(res, &ctx.with_vb(vb.pp("masking")))?;
        let enhancer = build::<dyn Enhancer>(res, &ctx.with_vb(vb.pp("enhancer")))?;
        ctx.enhancer = Some(enhancer.info());
        ctx.enhancer_vb = Some(vb.pp("enhancer"));
        let generator = build::<dyn Generator>(res, &ctx.with_vb(vb.pp("generator")))?;
        let sampler = build::<dyn Sampler>(res, &ctx.with_vb(vb.pp("sampler")))?;
        let objective = build::<dyn Objective>(res, &ctx.with_vb(vb.pp("objective")))?;
        let names = res
            .components
            .iter()
            .map(|(k, (n, _))| (*k, n.clone()))
            .collect();
        Ok(Self {
            tokenizer,
            masking,
            generator,
            sampler,
            enhancer,
            objective,
            params,
            frozen,
            buffers,
            grid,
            names,
            data,
            device,
        })
    }
}

/// Paper Eq. (2), `replace(g, m, x_sampling)`: the golden ids with the sampled ones written at the
/// masked positions, and REVDET's label per position — 1 where the token changed. A sampled token
/// equal to the golden one counts as not replaced.
pub fn replace_tokens(golden: &[u32], masked: &[u32], sampled: &[u32]) -> (Vec<u32>, Vec<f32>) {
    let mut ids = golden.to_vec();
    let mut replaced = vec![0f32; golden.len()];
    for (&p, &s) in masked.iter().zip(sampled) {
        let p = p as usize;
        replaced[p] = (s != golden[p]) as u8 as f32;
        ids[p] = s;
    }
    (ids, replaced)
}

/// The RNG streams of a step, seeded once per run and carried across steps.
pub struct StepRngs {
    pub mask: StdRng,
    pub sample: StdRng,
}

/// Everything one forward pass produced.
pub struct StepOutput {
    /// `MIM + w · objective`, the scalar to differentiate.
    pub total: Tensor,
    pub mim: Tensor,
    pub objective: Tensor,
    /// Scalar losses and diagnostics.
    pub losses: Losses,
    pub mask: Mask,
    /// `(B, 3, H, W)` corrupted images in `[0, 1]`, as the enhancer saw them (before normalisation).
    pub corrupted: Tensor,
    pub prediction: Option<Tensor>,
    pub target: Option<Tensor>,
    /// Wall time of each forward phase in ms (host-side; meaningful on CPU, and on CUDA only
    /// where a phase ends with a host read).
    pub phase_ms: Vec<(&'static str, f64)>,
}

/// Wall-clock laps of named phases.
pub struct PhaseClock {
    last: std::time::Instant,
    pub phases: Vec<(&'static str, f64)>,
}

impl PhaseClock {
    pub fn start() -> Self {
        Self {
            last: std::time::Instant::now(),
            phases: vec![],
        }
    }
    pub fn lap(&mut self, name: &'static str) {
        let now = std::time::Instant::now();
        self.phases
            .push((name, (now - self.last).as_secs_f64() * 1e3));
        self.last = now;
    }
}

impl Cim {
    /// Stages 1–9 of DESIGN.md. Gradients flow into the generator only through the MIM loss and
    /// into the enhancer/objective only through the objective loss: sampled ids and decoded
    /// images are detached.
    pub fn forward(&self, batch: &Batch, rngs: &mut StepRngs) -> Result<StepOutput> {
        let (mean, std) = (self.data.mean, self.data.std);
        let mut clock = PhaseClock::start();
        // 1. Golden tokens from the frozen tokenizer.
        let golden = self.tokenizer.encode(&batch.tok_view)?; // (B, gh, gw)
        let b = golden.dim(0)?;
        clock.lap("tok_encode");
        // 2. Mask.
        let mask = self.masking.sample(b, self.grid, &mut rngs.mask)?;
        // 3. Generator: MIM on the masked positions.
        let image_n = normalize(&batch.image, mean, std)?;
        let logits = self.generator.forward(&image_n, &mask)?; // (M, V)
        let golden_flat = golden.flatten_all()?;
        let at_mask = mask.indices_tensor(&self.device)?;
        let golden_m = golden_flat.index_select(&at_mask, 0)?;
        let mim = self.generator.mim_loss(&logits, &golden_m)?;
        clock.lap("gen_fwd");
        // 4. Sample replacements (no gradient).
        let sampled = self.sampler.sample(&logits.detach(), &mut rngs.sample)?;
        // 5. Replace golden tokens at masked positions; `replaced` is REVDET's label.
        let golden_ids: Vec<u32> = golden_flat.to_vec1()?;
        let distinct = golden_ids
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        let (ids, replaced) =
            replace_tokens(&golden_ids, &mask.flat_indices(), &sampled.to_vec1()?);
        let n_replaced: f32 = replaced.iter().sum();
        let corrupted_ids = Tensor::from_vec(ids, golden.shape(), &self.device)?;
        let replaced = Tensor::from_vec(replaced, (b, self.grid.len()), &self.device)?;
        // 6. Render the corrupted image (no gradient).
        let small = self.tokenizer.decode(&corrupted_ids)?.detach();
        // 7. To the enhancer's size.
        let s = self.data.image_size;
        let corrupted = if small.dims()[2..] == [s, s] {
            small
        } else {
            small.upsample_bilinear2d(s, s, false)?
        };
        clock.lap("sample_decode");
        // 8. Enhancer.
        let features = self
            .enhancer
            .forward_t(&normalize(&corrupted, mean, std)?, true)?;
        // 9. Objective.
        let out = self.objective.forward(
            &features,
            &ObjectiveBatch {
                original: &batch.image,
                corrupted: &corrupted,
                mask: &mask,
                replaced: &replaced,
            },
        )?;
        let total = (&mim + (&out.loss * self.objective.weight())?)?;
        clock.lap("enh_fwd");

        let mut losses = Losses::default();
        let scalar =
            |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64) };
        losses.insert("loss", scalar(&total)?);
        losses.insert("loss_mim", scalar(&mim)?);
        losses.insert(
            format!("loss_{}", self.names["objective"]),
            scalar(&out.loss)?,
        );
        let acc = logits
            .argmax(1)?
            .eq(&golden_m)?
            .to_dtype(DType::F32)?
            .mean_all()?;
        losses.insert("mim_acc", scalar(&acc)?);
        let m = mask.total().max(1) as f64;
        losses.insert("mask_frac", m / (b * self.grid.len()) as f64);
        losses.insert("replaced_frac", n_replaced as f64 / m);
        // Distinct golden tokens in the batch: a collapsed tokenizer shows up here first.
        losses.insert("golden_distinct", distinct as f64);
        Ok(StepOutput {
            total,
            mim,
            objective: out.loss,
            losses,
            mask,
            corrupted,
            prediction: out.prediction,
            target: out.target,
            phase_ms: clock.phases,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaced_means_changed_not_merely_masked() {
        // Positions 1, 2, 4 masked; position 2's sample equals its golden token.
        let (ids, replaced) = replace_tokens(&[10, 11, 12, 13, 14], &[1, 2, 4], &[7, 12, 9]);
        assert_eq!(ids, vec![10, 7, 12, 13, 9]);
        assert_eq!(replaced, vec![0.0, 1.0, 0.0, 0.0, 1.0]);
    }
}
