//! The component traits. One CiM step calls them in this order (stages 1–9 of the training step; book: architecture):
//! [`Tokenizer::encode`] → [`Masking::sample`] → [`Generator::forward`] / [`Generator::mim_loss`] →
//! [`Sampler::sample`] → [`Corruption::corrupt`] (CiM's: replace, then [`Tokenizer::decode`]) →
//! [`Enhancer::forward_t`] → [`Objective::forward`].

use candle_core::{DType, Tensor};
use rand::RngCore;

use crate::types::{
    Corrupted, CorruptionInput, EnhancerInfo, Features, Mask, ObjectiveBatch, ObjectiveOutput,
    PrecisionReport, TokenGrid,
};
use crate::Result;

/// A frozen discrete image tokenizer (DALL-E's dVAE in the paper, §2.1).
///
/// Pixels in and out are in `[0, 1]`; any pixel map (DALL-E's `map_pixels`) happens inside.
/// Its parameters come from the build context's frozen store (detached: nothing is trained
/// through it). `grid(size)` fixes the token grid the generator and REVDET are built for, and
/// `decode(encode(x))` renders an image of the same size as `x`.
pub trait Tokenizer: Send + Sync {
    /// Number of distinct visual tokens.
    fn vocab_size(&self) -> usize;
    /// Token grid for a `(height, width)` input, or an error naming the size if it does not fit.
    fn grid(&self, size: (usize, usize)) -> Result<TokenGrid>;
    /// `(B, 3, h, w)` pixels → `(B, gh, gw)` u32 token ids ("golden" tokens). No gradient.
    fn encode(&self, pixels: &Tensor) -> Result<Tensor>;
    /// `(B, gh, gw)` u32 token ids → `(B, 3, h, w)` pixels in `[0, 1]`. No gradient.
    fn decode(&self, ids: &Tensor) -> Result<Tensor>;
    /// The precision the tokenizer settled on and its token agreement with f32, for tokenizers
    /// that run in reduced precision (`None`: f32 only, nothing to report, or not chosen yet).
    fn precision(&self) -> Option<PrecisionReport> {
        None
    }
}

/// Chooses which patches the generator masks (paper Eq. 1: k of n positions). Randomness comes
/// only from `rng`, so a seed gives the same masks on every device.
pub trait Masking: Send + Sync {
    fn sample(&self, batch: usize, grid: TokenGrid, rng: &mut dyn RngCore) -> Result<Mask>;
}

/// The trainable part of the generator: a small BEiT doing masked image modeling (§2.1, §2.3).
///
/// Built after the tokenizer and the enhancer: the build context holds the vocabulary size, the
/// token grid (the generator's patch size is image size / grid side) and the enhancer's
/// [`EnhancerInfo`] (BEiT's width follows `info().dim` by default, paper Table 9). Errors caused
/// by a choice made elsewhere should name the key that fixes them.
pub trait Generator: Send + Sync {
    /// `image`: the normalised enhancer-resolution view `(B, 3, H, W)` whose patch grid equals the
    /// token grid. Returns logits `(M, V)` at the masked positions, rows in
    /// [`Mask::flat_indices`] order.
    fn forward(&self, image: &Tensor, mask: &Mask) -> Result<Tensor>;

    /// The MIM loss: mean cross-entropy of `logits` `(M, V)` against the golden ids `(M,)` u32.
    /// The default composes candle's ops in f32; a generator may override it with a fused kernel
    /// (the BEiT generator uses `cim_ops::cross_entropy`).
    fn mim_loss(&self, logits: &Tensor, golden: &Tensor) -> Result<Tensor> {
        let logits = logits.to_dtype(DType::F32)?;
        Ok(candle_nn::loss::cross_entropy(&logits, golden)?)
    }
}

/// Draws replacement tokens from generator logits (§2.3, Eq. 2). Never receives gradients.
pub trait Sampler: Send + Sync {
    /// `logits` `(M, V)` → `(M,)` u32 token ids, using only `rng` for randomness.
    fn sample(&self, logits: &Tensor, rng: &mut dyn RngCore) -> Result<Tensor>;
}

/// Makes the enhancer's input from the original view, the mask and the sampled tokens (stages
/// 5–7). CiM's own (`tokens`, the default) writes the sampled tokens at the masked positions and
/// renders the grid with the tokenizer's decoder; others corrupt pixels directly (the random
/// erasing of paper Table 8). Never receives gradients; randomness only from `rng`.
pub trait Corruption: Send + Sync {
    /// Returns the corrupted image `(B, 3, H, W)` in `[0, 1]` at the input's size, detached, and
    /// per token position `(B, N)` f32 1 where the image was changed there (REVDET's label).
    fn corrupt(&self, input: &CorruptionInput<'_>, rng: &mut dyn RngCore) -> Result<Corrupted>;
}

/// The network being pre-trained (§2.2): sees only the corrupted image.
///
/// The contract the rest of the pipeline relies on:
/// - [`info`](Self::info) is known right after the build, before any forward:
///   `info().image_size` is the build context's `image_size` (the network is built for it),
///   `info().dim` is the width `D` of every feature vector (it sizes the objective's head and, by
///   default, the generator's width), and `info().stride` is the pixels per feature position.
/// - [`forward_t`](Self::forward_t) returns [`Features`] whose `tokens` are `(B, N, D)`, one row
///   per position of a square grid of side `image_size / stride`, **row-major, with no class
///   token** (a ViT's class token goes to `Features::cls`). RESPIX regresses each position's
///   `stride × stride` pixel patch, so `grid × stride` must equal the image size; REVDET reads
///   one feature per token of the tokenizer's grid.
/// - The enhancer's parameters live under `ctx.vb` (its checkpoint keys). A network whose patch
///   embedding and blocks follow the shared ViT layout sets `info().shareable_blocks`, so a
///   generator may share them (paper Table 5).
pub trait Enhancer: Send + Sync {
    /// Width, stride and input size of the features, known before the first forward.
    fn info(&self) -> EnhancerInfo;
    /// `(B, 3, H, W)` normalised image → per-position features. `train` switches BatchNorm /
    /// dropout-like behaviour where a network has any.
    fn forward_t(&self, image: &Tensor, train: bool) -> Result<Features>;
}

/// The enhancer's pretext task: a head, its targets and its loss (RESPIX, REVDET).
///
/// Built last: its head is sized from the enhancer's [`EnhancerInfo`] in the build context. Its
/// loss is added to the MIM loss with [`weight`](Self::weight).
pub trait Objective: Send + Sync {
    /// Weight of this loss in `total = MIM + weight · objective` (paper Table 9: RESPIX 10, REVDET 1).
    fn weight(&self) -> f64;
    fn forward(&self, features: &Features, batch: &ObjectiveBatch<'_>) -> Result<ObjectiveOutput>;
}
