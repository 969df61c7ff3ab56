//! A single-stream block (`models::dit::blocks::SingleStreamBlock`) in the direct backward:
//! `m = modulate(x)`, `p = linear1(m)` = `[q | k | v | mlp_in]`, joint attention,
//! `j = [attention | swiglu(mlp_in)]`, `y = x + gate linear2(j)`.

use super::attention::{self, AttentionSaved};
use super::context::{norm_scales, StepContext, NORM_EPS};
use super::linear::{self, BackwardInput, Gradients, LinearSaved};
use super::matrix::round_in_place;
use super::rows::{
    gated, gated_add, modulate_backward, modulate_forward, swiglu_backward_rows,
    swiglu_forward_rows, written_rows, RowStatistics, SwigluColumns,
};
use crate::error::Result;
use crate::models::dit::blocks::SingleStreamBlock;
use crate::nn::host::zeroed_f32;

pub(super) struct SingleTape {
    x: Vec<f32>,
    statistics: Vec<RowStatistics>,
    modulated: Vec<f32>,
    /// `linear1`'s output `[rows, 3 hidden + 2 mlp]`.
    projected: Vec<f32>,
    linear1_saved: LinearSaved,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attention: AttentionSaved,
    /// `linear2`'s input `[rows, hidden + mlp]`: the attention output, then the SwiGLU.
    joined: Vec<f32>,
    linear2_saved: LinearSaved,
}

struct Widths {
    projected: usize,
    mlp: usize,
    joined: usize,
}

fn widths(context: &StepContext, projected_width: usize) -> Widths {
    let mlp = (projected_width - 3 * context.hidden) / 2;
    Widths {
        projected: projected_width,
        mlp,
        joined: context.hidden + mlp,
    }
}

fn swiglu_columns(context: &StepContext, widths: &Widths) -> SwigluColumns {
    SwigluColumns {
        column: 3 * context.hidden,
        width: widths.mlp,
        stride: widths.projected,
    }
}

/// Runs the block on the joint `x` `[b * L, hidden]`; returns the output and the tape.
pub(super) fn forward(
    block: &SingleStreamBlock,
    context: &StepContext,
    gradients: &Gradients,
    x: Vec<f32>,
) -> Result<(Vec<f32>, SingleTape)> {
    let hidden = context.hidden;
    let rows = context.joint_rows();
    let length = context.joint_length();
    let modulation = &context.single_mod;
    let (modulated, statistics) = modulate_forward(
        &x,
        hidden,
        length,
        &modulation.shift,
        &modulation.scale,
        NORM_EPS,
    );
    let (projected, linear1_saved) =
        linear::forward(&block.linear1, gradients, &modulated, rows, context.batch)?;
    let widths = widths(context, block.linear1.out_features());
    let scales = norm_scales(&block.norm)?;
    let size = context.batch * context.heads * length * context.head_dim;
    let (mut q, mut k, mut v) = (zeroed_f32(size), zeroed_f32(size), zeroed_f32(size));
    let joint = super::context::Stream { length, offset: 0 };
    context
        .qk_norm_rope(joint, widths.projected, &scales)
        .forward(&projected, &mut q, &mut k, &mut v);
    if context.round_products {
        for values in [&mut q, &mut k, &mut v] {
            round_in_place(values);
        }
    }
    // `[attention | swiglu(mlp_in)]`: the SwiGLU columns are written in the pass that zeroes
    // each block of rows, then the attention writes the others.
    let mut joined = written_rows(rows, widths.joined, |first_row, block| {
        swiglu_forward_rows(
            &projected,
            swiglu_columns(context, &widths),
            widths.joined,
            hidden,
            first_row,
            block,
        )
    });
    let attention = attention::forward(
        context.attention(widths.joined),
        &q,
        &k,
        &v,
        &mut joined,
        context.keep_probabilities,
    );
    let (out, linear2_saved) =
        linear::forward(&block.linear2, gradients, &joined, rows, context.batch)?;
    let y = gated_add(&x, &modulation.gate, &out, hidden, length);
    Ok((
        y,
        SingleTape {
            x,
            statistics,
            modulated,
            projected,
            linear1_saved,
            q,
            k,
            v,
            attention,
            joined,
            linear2_saved,
        },
    ))
}

/// The input gradient from the output gradient `d_y`; adds the LoRA gradients.
pub(super) fn backward(
    block: &SingleStreamBlock,
    context: &StepContext,
    tape: &SingleTape,
    gradients: &mut Gradients,
    d_y: &[f32],
) -> Result<Vec<f32>> {
    let hidden = context.hidden;
    let rows = context.joint_rows();
    let length = context.joint_length();
    let modulation = &context.single_mod;
    let widths = widths(context, block.linear1.out_features());
    let d_out = gated(d_y, &modulation.gate, hidden, length);
    let d_joined = linear::backward(
        &block.linear2,
        gradients,
        BackwardInput {
            x: &tape.joined,
            saved: &tape.linear2_saved,
            dy: &d_out,
            rows,
        },
    )?;
    let (dq, dk, dv) = attention::backward(
        context.attention(widths.joined),
        &tape.q,
        &tape.k,
        &tape.v,
        &tape.joined,
        &tape.attention,
        &d_joined,
    );
    let scales = norm_scales(&block.norm)?;
    let joint = super::context::Stream { length, offset: 0 };
    let qk_norm_rope = context.qk_norm_rope(joint, widths.projected, &scales);
    // One pass over the projections' gradient: each block of rows gets its q, k, v columns and
    // its SwiGLU columns while in cache.
    let d_projected = written_rows(rows, widths.projected, |first_row, d_rows| {
        qk_norm_rope.backward_rows(&tape.projected, &dq, &dk, &dv, first_row, d_rows);
        swiglu_backward_rows(
            &tape.projected,
            swiglu_columns(context, &widths),
            &d_joined,
            widths.joined,
            hidden,
            first_row,
            d_rows,
        );
    });
    let d_modulated = linear::backward(
        &block.linear1,
        gradients,
        BackwardInput {
            x: &tape.modulated,
            saved: &tape.linear1_saved,
            dy: &d_projected,
            rows,
        },
    )?;
    let mut d_x = d_y.to_vec();
    modulate_backward(
        &d_modulated,
        &tape.x,
        &tape.statistics,
        hidden,
        length,
        &modulation.scale,
        &mut d_x,
    );
    Ok(d_x)
}
