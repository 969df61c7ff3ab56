//! Activation bytes of the DiT, counted op by op from what our code allocates (`models::dit::blocks`
//! under `nn::grad_mode`, `nn::trainable`, `nn::attention`, `nn::linear`).
//!
//! Training keeps, per block, every tensor the autograd graph holds until the backward: with
//! activations of `s` bytes (2 for bf16, 4 for f32) and `c` = 4 when a cast to f32 makes a copy
//! (0 for f32 activations), per token:
//! - modulation (`nn::norm::modulate`): f32 copy `c·h`, normalised f32 `4h`, cast back `c/2·h`;
//! - a LoRA linear `in → out` (`nn::linear::Linear::forward`): frozen product `s·out`, f32 input
//!   copy `c·in`, down `4r`, up `4·out`, scaled `4·out`, cast `c/2·out`, sum `s·out`; without LoRA
//!   only the frozen product;
//! - q/k RMSNorm, contiguous v and q/k RoPE: `5s·h` (single blocks also copy the strided q/k/v
//!   slice of `linear1`: `3s·h`);
//! - attention: output `s·h` and its `[b, l, heads·d]` copy `s·h`, f32 logsumexp per head `4·heads`
//!   (the op keeps no score matrix); double blocks concatenate q, k, v of both streams: `3s·h`;
//! - gated residual (unfused under autograd): f32 copies `2c·h`, product and sum `8h`, cast `c/2·h`;
//! - SwiGLU (composed): silu and product `2s·mlp`; single blocks concatenate `[attn | mlp]`:
//!   `s·(h + mlp)`.
//!
//! Inference (no graph) holds the residual stream plus one block's live tensors, and attention's
//! query chunks of at most 2^26 f32 scores (`nn::attention`, candle-op path of CUDA).

use candle_core::DType;

use crate::models::dit::DitConfig;

/// Largest number of score elements of one chunk in the trainable attention.
pub const TRAINING_SCORE_ELEMENTS: u64 = 1 << 22;
/// Largest number of score elements of one chunk in the inference attention (candle-op path).
pub const INFERENCE_SCORE_ELEMENTS: u64 = 1 << 26;

/// Token counts of one DiT call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tokens {
    pub batch: usize,
    /// Image tokens: the noisy latent `(H/16)·(W/16)` plus control-image tokens.
    pub image: usize,
    /// Text tokens (512 for every FLUX.2 text encoder).
    pub text: usize,
}

impl Tokens {
    /// Tokens of the joint sequence.
    pub fn joint(&self) -> usize {
        self.image + self.text
    }

    /// Joint rows over the batch.
    pub fn rows(&self) -> u64 {
        (self.batch * self.joint()) as u64
    }
}

/// Byte sizes of the activation dtype.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    /// Bytes per activation value.
    s: u64,
    /// Bytes of an f32 copy made by a cast (0 when activations already are f32).
    c: u64,
    /// Bytes of the cast back to the activation dtype (0 for f32).
    back: u64,
}

impl Sizes {
    fn of(dtype: DType) -> Self {
        let s = dtype.size_in_bytes() as u64;
        if s == 4 {
            Self { s, c: 0, back: 0 }
        } else {
            Self { s, c: 4, back: s }
        }
    }
}

/// Per-token bytes a linear `input → output` keeps in the graph (LoRA of `rank` or none).
fn linear_per_token(sizes: Sizes, input: u64, output: u64, rank: Option<usize>) -> u64 {
    let frozen = sizes.s * output;
    match rank {
        None => frozen,
        Some(r) => {
            frozen
                + sizes.c * input
                + 4 * r as u64
                + 8 * output
                + sizes.back * output
                + sizes.s * output
        }
    }
}

fn modulate_per_token(sizes: Sizes, h: u64) -> u64 {
    (sizes.c + 4 + sizes.back) * h
}

fn gated_add_per_token(sizes: Sizes, h: u64) -> u64 {
    (2 * sizes.c + 8 + sizes.back) * h
}

/// The rank of each linear of a block, by its module path suffix (`None`: not a LoRA target).
pub type RankOf<'a> = &'a dyn Fn(&str) -> Option<usize>;

/// Bytes one double block keeps for the backward.
pub fn double_block_saved(
    config: &DitConfig,
    tokens: Tokens,
    dtype: DType,
    index: usize,
    rank_of: RankOf,
) -> u64 {
    let sizes = Sizes::of(dtype);
    let (h, m) = (config.hidden_size as u64, config.mlp_hidden_size as u64);
    let heads = config.num_heads as u64;
    let stream = |name: &str| -> u64 {
        let rank = |layer: &str| rank_of(&format!("double_blocks.{index}.{name}_{layer}"));
        modulate_per_token(sizes, h)
            + linear_per_token(sizes, h, 3 * h, rank("attn.qkv"))
            + 5 * sizes.s * h
            + 3 * sizes.s * h
            + 2 * sizes.s * h
            + 4 * heads
            + linear_per_token(sizes, h, h, rank("attn.proj"))
            + gated_add_per_token(sizes, h)
            + modulate_per_token(sizes, h)
            + linear_per_token(sizes, h, 2 * m, rank("mlp.0"))
            + 2 * sizes.s * m
            + linear_per_token(sizes, m, h, rank("mlp.2"))
            + gated_add_per_token(sizes, h)
    };
    let batch = tokens.batch as u64;
    batch * (tokens.image as u64 * stream("img") + tokens.text as u64 * stream("txt"))
}

/// Bytes one single block keeps for the backward.
pub fn single_block_saved(
    config: &DitConfig,
    tokens: Tokens,
    dtype: DType,
    index: usize,
    rank_of: RankOf,
) -> u64 {
    let sizes = Sizes::of(dtype);
    let (h, m) = (config.hidden_size as u64, config.mlp_hidden_size as u64);
    let heads = config.num_heads as u64;
    let rank = |layer: &str| rank_of(&format!("single_blocks.{index}.{layer}"));
    let per_token = modulate_per_token(sizes, h)
        + linear_per_token(sizes, h, 3 * h + 2 * m, rank("linear1"))
        + 3 * sizes.s * h
        + 5 * sizes.s * h
        + 2 * sizes.s * h
        + 4 * heads
        + 2 * sizes.s * m
        + sizes.s * (h + m)
        + linear_per_token(sizes, h + m, h, rank("linear2"))
        + gated_add_per_token(sizes, h);
    tokens.rows() * per_token
}

/// Bytes outside the blocks that the graph keeps: the joint `[txt; img]` concatenation, the final
/// layer's f32 norm, modulation and projection, and the loss terms over the image tokens.
pub fn head_saved(config: &DitConfig, tokens: Tokens, dtype: DType) -> u64 {
    let sizes = Sizes::of(dtype);
    let h = config.hidden_size as u64;
    let channels = config.in_channels as u64;
    let joint = tokens.rows() * (sizes.s * h + (sizes.c + 4 + 4 + 4 + sizes.back) * h);
    let loss = (tokens.batch * tokens.image) as u64 * channels * 4 * 4;
    joint + loss
}

/// The largest transient of one block's backward: the gradient tensors alive at once (three f32
/// gradients the width of the widest layer: candle gives the frozen product, the LoRA branch and
/// its cast each a gradient tensor of their own; eight of the hidden width for the residual and
/// attention inputs) and the
/// trainable attention's per-chunk f32 work (scores, probabilities, their gradients; f32 copies
/// of q, k, v, the output gradient and the q/k/v gradients).
pub fn backward_working_set(config: &DitConfig, tokens: Tokens) -> u64 {
    let h = config.hidden_size as u64;
    let widest = (3 * config.hidden_size + 2 * config.mlp_hidden_size) as u64;
    let rows = tokens.rows();
    let heads = config.num_heads as u64;
    let keys = tokens.joint() as u64;
    let chunk = TRAINING_SCORE_ELEMENTS.min(tokens.batch as u64 * heads * keys * keys);
    rows * (3 * 4 * widest + 8 * 4 * h) + 4 * 4 * chunk
}

/// Peak bytes of one inference block beyond its input: the single block's projections,
/// q/k/v, attention output, SwiGLU and the concatenation in the activation dtype, the f32
/// modulation temporaries, and one query chunk of f32 scores (scores, softmax and probabilities).
/// With `fused_attention` no score chunk exists.
pub fn inference_block_peak(
    config: &DitConfig,
    tokens: Tokens,
    dtype: DType,
    fused_attention: bool,
) -> u64 {
    let s = dtype.size_in_bytes() as u64;
    let (h, m) = (config.hidden_size as u64, config.mlp_hidden_size as u64);
    let rows = tokens.rows();
    let heads = config.num_heads as u64;
    let keys = tokens.joint() as u64;
    let chunk = if fused_attention {
        0
    } else {
        INFERENCE_SCORE_ELEMENTS.min(tokens.batch as u64 * heads * keys * keys)
    };
    let projected = (3 * h + 2 * m) * s;
    let qkv = 3 * h * s;
    let attention = h * s;
    let swiglu = m * s;
    let joined = (h + m) * s;
    let modulation = 2 * 4 * h;
    rows * (projected + qkv + attention + swiglu + joined + modulation) + chunk * (4 + 4 + s)
}
