//! What every block of one step shares in the direct backward: the sequence layout, the RoPE
//! tables and the shared modulations as host vectors, and the stream <-> joint row copies.

use candle_core::{DType, Tensor};

use super::attention::AttentionShape;
use super::qk_norm_rope::QkNormRope;
use crate::error::Result;
use crate::models::dit::blocks::{ModulationParams, QkNorm};
use crate::models::dit::model::Prepared;

/// RMSNorm epsilon of the q/k norms and LayerNorm epsilon of the modulations (BFL's 1e-6).
pub(super) const NORM_EPS: f32 = 1e-6;

pub(super) fn values(tensor: &Tensor) -> Result<Vec<f32>> {
    Ok(tensor.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

/// One `(shift, scale, gate)` triple, each `[batch, hidden]`.
pub(super) struct Modulation {
    pub shift: Vec<f32>,
    pub scale: Vec<f32>,
    pub gate: Vec<f32>,
}

impl Modulation {
    fn of(params: &ModulationParams) -> Result<Self> {
        Ok(Self {
            shift: values(&params.shift)?,
            scale: values(&params.scale)?,
            gate: values(&params.gate)?,
        })
    }
}

/// A stream (text or image) of the joint sequence.
#[derive(Clone, Copy)]
pub(super) struct Stream {
    /// Tokens per sample.
    pub length: usize,
    /// First token in the joint sequence.
    pub offset: usize,
}

pub(super) struct StepContext {
    pub batch: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub hidden: usize,
    pub text: Stream,
    pub image: Stream,
    /// RoPE tables `[table_batch, joint_length, d / 2]`.
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub table_batch: usize,
    pub img_mod: [Modulation; 2],
    pub txt_mod: [Modulation; 2],
    pub single_mod: Modulation,
    /// bf16 mixed precision: the attention products use bf16 operands.
    pub round_products: bool,
    /// Whether the attention forward keeps its probabilities for the backward (see
    /// [`keeps_probabilities`]).
    pub keep_probabilities: bool,
}

/// At most this many bytes of attention probabilities are kept for the backward at once.
const PROBABILITY_BUDGET: usize = 512 << 20;

/// Whether the attention probabilities of `kept_blocks` blocks at once fit the budget: then the
/// backward reads them instead of recomputing `q k^T` and its exponentials (a fifth of the
/// attention backward; 3-4 % of an f32 step of the mid-size benchmark). Short sequences only:
/// they grow with the square of the tokens (a 1024 x 1024 image of klein-4B would need 1.9 GiB
/// per block). With bf16 products the recompute runs on AMX tiles and costs no more than writing
/// and reading back the probabilities (measured), so they are not kept there.
pub(super) fn keeps_probabilities(
    batch: usize,
    heads: usize,
    length: usize,
    kept_blocks: usize,
) -> bool {
    batch * heads * length * length * 4 * kept_blocks.max(1) <= PROBABILITY_BUDGET
}

impl StepContext {
    /// `kept_blocks`: how many blocks' tapes exist at once (all blocks, or one with
    /// checkpointing).
    pub fn new(
        prepared: &Prepared,
        heads: usize,
        round_products: bool,
        kept_blocks: usize,
    ) -> Result<Self> {
        let (batch, text_length, hidden) = prepared.txt.dims3()?;
        let image_length = prepared.img.dim(1)?;
        let table_batch = prepared.rope.cos.dim(0)?;
        let head_dim = hidden / heads;
        let pair = |mods: &[ModulationParams]| -> Result<[Modulation; 2]> {
            Ok([Modulation::of(&mods[0])?, Modulation::of(&mods[1])?])
        };
        Ok(Self {
            batch,
            heads,
            head_dim,
            hidden,
            text: Stream {
                length: text_length,
                offset: 0,
            },
            image: Stream {
                length: image_length,
                offset: text_length,
            },
            cos: values(&prepared.rope.cos)?,
            sin: values(&prepared.rope.sin)?,
            table_batch,
            img_mod: pair(&prepared.img_mod)?,
            txt_mod: pair(&prepared.txt_mod)?,
            single_mod: Modulation::of(&prepared.single_mod[0])?,
            round_products,
            keep_probabilities: !round_products
                && keeps_probabilities(batch, heads, text_length + image_length, kept_blocks),
        })
    }

    pub fn joint_length(&self) -> usize {
        self.text.length + self.image.length
    }

    /// Rows of the joint sequence over the batch.
    pub fn joint_rows(&self) -> usize {
        self.batch * self.joint_length()
    }

    pub fn attention(&self, out_stride: usize) -> AttentionShape {
        AttentionShape {
            batch: self.batch,
            heads: self.heads,
            length: self.joint_length(),
            head_dim: self.head_dim,
            out_stride,
            round_products: self.round_products,
        }
    }

    /// The q/k norm and RoPE layout of `stream`, whose projections are `width` wide.
    pub fn qk_norm_rope<'a>(
        &'a self,
        stream: Stream,
        width: usize,
        scales: &'a (Vec<f32>, Vec<f32>),
    ) -> QkNormRope<'a> {
        QkNormRope {
            heads: self.heads,
            head_dim: self.head_dim,
            length: stream.length,
            joint_length: self.joint_length(),
            token_offset: stream.offset,
            width,
            column: 0,
            query_scale: &scales.0,
            key_scale: &scales.1,
            eps: NORM_EPS,
            cos: &self.cos,
            sin: &self.sin,
            table_batch: self.table_batch,
        }
    }

    /// Copies `stream`'s rows `[b * length, channels]` into the joint `[b * L, channels]`.
    pub fn scatter(&self, stream: Stream, rows: &[f32], joint: &mut [f32], channels: usize) {
        for sample in 0..self.batch {
            let source = &rows[sample * stream.length * channels..][..stream.length * channels];
            let start = (sample * self.joint_length() + stream.offset) * channels;
            joint[start..start + source.len()].copy_from_slice(source);
        }
    }

    /// `stream`'s rows of the joint `[b * L, channels]`.
    pub fn gather(&self, stream: Stream, joint: &[f32], channels: usize) -> Vec<f32> {
        let mut rows = Vec::with_capacity(self.batch * stream.length * channels);
        for sample in 0..self.batch {
            let start = (sample * self.joint_length() + stream.offset) * channels;
            rows.extend_from_slice(&joint[start..start + stream.length * channels]);
        }
        rows
    }
}

/// The q and k norm scales of a block in f32.
pub(super) fn norm_scales(norm: &QkNorm) -> Result<(Vec<f32>, Vec<f32>)> {
    Ok((values(&norm.query_norm)?, values(&norm.key_norm)?))
}
