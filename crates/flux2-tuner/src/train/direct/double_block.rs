//! A double-stream block (`models::dit::blocks::DoubleStreamBlock`) in the direct backward: the
//! forward keeps what its backward needs (a tape), the backward returns the input gradients of
//! both streams and adds the LoRA gradients.
//!
//! Per stream: `m0 = modulate0(x)`, `qkv = qkv(m0)`, joint attention over `[txt; img]`,
//! `x1 = x + gate0 proj(attn)`, `m1 = modulate1(x1)`, `h = mlp.0(m1)`, `a = swiglu(h)`,
//! `y = x1 + gate1 mlp.2(a)`.

use super::attention::{self, AttentionSaved};
use super::context::{norm_scales, Modulation, StepContext, Stream, NORM_EPS};
use super::linear::{self, BackwardInput, Gradients, LinearSaved};
use super::matrix::round_in_place;
use super::rows::{
    gated, gated_add, modulate_backward, modulate_forward, swiglu_backward_rows,
    swiglu_forward_rows, written_rows, RowStatistics, SwigluColumns,
};
use crate::error::{Error, Result};
use crate::models::dit::blocks::{DoubleStreamBlock, SelfAttention, SwiGluMlp};
use crate::nn::host::zeroed_f32;

/// One stream's saved activations.
struct StreamTape {
    x: Vec<f32>,
    statistics_0: Vec<RowStatistics>,
    modulated_0: Vec<f32>,
    qkv: Vec<f32>,
    qkv_saved: LinearSaved,
    attended: Vec<f32>,
    proj_saved: LinearSaved,
    x1: Vec<f32>,
    statistics_1: Vec<RowStatistics>,
    modulated_1: Vec<f32>,
    mlp_in: Vec<f32>,
    mlp_0_saved: LinearSaved,
    activated: Vec<f32>,
    mlp_2_saved: LinearSaved,
}

pub(super) struct DoubleTape {
    img: StreamTape,
    txt: StreamTape,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention output, joint `[b * L, hidden]`.
    out: Vec<f32>,
    attention: AttentionSaved,
}

/// The parts of a stream before the attention.
struct StreamInputs<'a> {
    attention: &'a SelfAttention,
    mlp: &'a SwiGluMlp,
    modulation: &'a [Modulation; 2],
    stream: Stream,
}

fn stream_inputs<'a>(
    block: &'a DoubleStreamBlock,
    context: &'a StepContext,
    image: bool,
) -> StreamInputs<'a> {
    if image {
        StreamInputs {
            attention: &block.img_attn,
            mlp: &block.img_mlp,
            modulation: &context.img_mod,
            stream: context.image,
        }
    } else {
        StreamInputs {
            attention: &block.txt_attn,
            mlp: &block.txt_mlp,
            modulation: &context.txt_mod,
            stream: context.text,
        }
    }
}

/// Runs the block on `img` `[b * n, hidden]` and `txt` `[b * l, hidden]`; returns the outputs and
/// the tape.
pub(super) fn forward(
    block: &DoubleStreamBlock,
    context: &StepContext,
    gradients: &Gradients,
    img: Vec<f32>,
    txt: Vec<f32>,
) -> Result<(Vec<f32>, Vec<f32>, DoubleTape)> {
    let hidden = context.hidden;
    let joint = context.batch * context.heads * context.joint_length() * context.head_dim;
    let (mut q, mut k, mut v) = (zeroed_f32(joint), zeroed_f32(joint), zeroed_f32(joint));
    let mut before = Vec::with_capacity(2);
    for (image, x) in [(true, img), (false, txt)] {
        let inputs = stream_inputs(block, context, image);
        let rows = context.batch * inputs.stream.length;
        let modulation = &inputs.modulation[0];
        let (modulated_0, statistics_0) = modulate_forward(
            &x,
            hidden,
            inputs.stream.length,
            &modulation.shift,
            &modulation.scale,
            NORM_EPS,
        );
        let (qkv, qkv_saved) = linear::forward(
            &inputs.attention.qkv,
            gradients,
            &modulated_0,
            rows,
            context.batch,
        )?;
        let scales = norm_scales(&inputs.attention.norm)?;
        context
            .qk_norm_rope(inputs.stream, 3 * hidden, &scales)
            .forward(&qkv, &mut q, &mut k, &mut v);
        before.push((x, statistics_0, modulated_0, qkv, qkv_saved));
    }
    if context.round_products {
        for values in [&mut q, &mut k, &mut v] {
            round_in_place(values);
        }
    }
    let mut out = zeroed_f32(context.joint_rows() * hidden);
    let attention = attention::forward(
        context.attention(hidden),
        &q,
        &k,
        &v,
        &mut out,
        context.keep_probabilities,
    );

    let mut outputs = Vec::with_capacity(2);
    let mut tapes = Vec::with_capacity(2);
    for (image, (x, statistics_0, modulated_0, qkv, qkv_saved)) in
        [true, false].into_iter().zip(before)
    {
        let inputs = stream_inputs(block, context, image);
        let length = inputs.stream.length;
        let rows = context.batch * length;
        let [attention_mod, mlp_mod] = inputs.modulation;
        let attended = context.gather(inputs.stream, &out, hidden);
        let (projected, proj_saved) = linear::forward(
            &inputs.attention.proj,
            gradients,
            &attended,
            rows,
            context.batch,
        )?;
        let x1 = gated_add(&x, &attention_mod.gate, &projected, hidden, length);
        let (modulated_1, statistics_1) = modulate_forward(
            &x1,
            hidden,
            length,
            &mlp_mod.shift,
            &mlp_mod.scale,
            NORM_EPS,
        );
        let (mlp_in, mlp_0_saved) = linear::forward(
            &inputs.mlp.layer_0,
            gradients,
            &modulated_1,
            rows,
            context.batch,
        )?;
        let width = mlp_in.len() / rows.max(1) / 2;
        let columns = SwigluColumns {
            column: 0,
            width,
            stride: 2 * width,
        };
        let activated = written_rows(rows, width, |first_row, block| {
            swiglu_forward_rows(&mlp_in, columns, width, 0, first_row, block)
        });
        let (mlp_out, mlp_2_saved) = linear::forward(
            &inputs.mlp.layer_2,
            gradients,
            &activated,
            rows,
            context.batch,
        )?;
        outputs.push(gated_add(&x1, &mlp_mod.gate, &mlp_out, hidden, length));
        tapes.push(StreamTape {
            x,
            statistics_0,
            modulated_0,
            qkv,
            qkv_saved,
            attended,
            proj_saved,
            x1,
            statistics_1,
            modulated_1,
            mlp_in,
            mlp_0_saved,
            activated,
            mlp_2_saved,
        });
    }
    let (Some(txt), Some(img), Some(txt_out), Some(img_out)) =
        (tapes.pop(), tapes.pop(), outputs.pop(), outputs.pop())
    else {
        return Err(Error::Shape("double block: a stream is missing".into()));
    };
    let tape = DoubleTape {
        img,
        txt,
        q,
        k,
        v,
        out,
        attention,
    };
    Ok((img_out, txt_out, tape))
}

/// The backward of one stream from its output gradient to the attention output: returns the
/// gradient of the residual input so far (`dx`, without the q/k/v path) and of the attention
/// output rows.
fn stream_backward_to_attention(
    inputs: &StreamInputs,
    context: &StepContext,
    tape: &StreamTape,
    gradients: &mut Gradients,
    d_out: &[f32],
) -> Result<(Vec<f32>, Vec<f32>)> {
    let hidden = context.hidden;
    let length = inputs.stream.length;
    let rows = context.batch * length;
    let [attention_mod, mlp_mod] = inputs.modulation;
    let width = tape.activated.len() / rows.max(1);
    let d_mlp_out = gated(d_out, &mlp_mod.gate, hidden, length);
    let d_activated = linear::backward(
        &inputs.mlp.layer_2,
        gradients,
        BackwardInput {
            x: &tape.activated,
            saved: &tape.mlp_2_saved,
            dy: &d_mlp_out,
            rows,
        },
    )?;
    let columns = SwigluColumns {
        column: 0,
        width,
        stride: 2 * width,
    };
    let d_mlp_in = written_rows(rows, 2 * width, |first_row, block| {
        swiglu_backward_rows(
            &tape.mlp_in,
            columns,
            &d_activated,
            width,
            0,
            first_row,
            block,
        )
    });
    let d_modulated_1 = linear::backward(
        &inputs.mlp.layer_0,
        gradients,
        BackwardInput {
            x: &tape.modulated_1,
            saved: &tape.mlp_0_saved,
            dy: &d_mlp_in,
            rows,
        },
    )?;
    let mut d_x1 = d_out.to_vec();
    modulate_backward(
        &d_modulated_1,
        &tape.x1,
        &tape.statistics_1,
        hidden,
        length,
        &mlp_mod.scale,
        &mut d_x1,
    );
    let d_projected = gated(&d_x1, &attention_mod.gate, hidden, length);
    let d_attended = linear::backward(
        &inputs.attention.proj,
        gradients,
        BackwardInput {
            x: &tape.attended,
            saved: &tape.proj_saved,
            dy: &d_projected,
            rows,
        },
    )?;
    Ok((d_x1, d_attended))
}

/// The input gradients `(d_img, d_txt)` from the output gradients; `None` when
/// `input_gradients` is false (the first block: nothing before it is trained).
pub(super) fn backward(
    block: &DoubleStreamBlock,
    context: &StepContext,
    tape: &DoubleTape,
    gradients: &mut Gradients,
    d_img: &[f32],
    d_txt: &[f32],
    input_gradients: bool,
) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
    let hidden = context.hidden;
    let mut d_out = zeroed_f32(context.joint_rows() * hidden);
    let mut residuals = Vec::with_capacity(2);
    for (image, stream_tape, d_stream) in [(true, &tape.img, d_img), (false, &tape.txt, d_txt)] {
        let inputs = stream_inputs(block, context, image);
        let (d_x, d_attended) =
            stream_backward_to_attention(&inputs, context, stream_tape, gradients, d_stream)?;
        context.scatter(inputs.stream, &d_attended, &mut d_out, hidden);
        residuals.push(d_x);
    }
    let (dq, dk, dv) = attention::backward(
        context.attention(hidden),
        &tape.q,
        &tape.k,
        &tape.v,
        &tape.out,
        &tape.attention,
        &d_out,
    );
    let mut input_grads = Vec::with_capacity(2);
    for ((image, stream_tape), mut d_x) in [(true, &tape.img), (false, &tape.txt)]
        .into_iter()
        .zip(residuals)
    {
        let inputs = stream_inputs(block, context, image);
        let length = inputs.stream.length;
        let rows = context.batch * length;
        let scales = norm_scales(&inputs.attention.norm)?;
        let qk_norm_rope = context.qk_norm_rope(inputs.stream, 3 * hidden, &scales);
        let d_qkv = written_rows(rows, 3 * hidden, |first_row, block| {
            qk_norm_rope.backward_rows(&stream_tape.qkv, &dq, &dk, &dv, first_row, block)
        });
        if input_gradients {
            let d_modulated_0 = linear::backward(
                &inputs.attention.qkv,
                gradients,
                BackwardInput {
                    x: &stream_tape.modulated_0,
                    saved: &stream_tape.qkv_saved,
                    dy: &d_qkv,
                    rows,
                },
            )?;
            let modulation = &inputs.modulation[0];
            modulate_backward(
                &d_modulated_0,
                &stream_tape.x,
                &stream_tape.statistics_0,
                hidden,
                length,
                &modulation.scale,
                &mut d_x,
            );
            input_grads.push(d_x);
        } else {
            linear::adapters_backward(
                &inputs.attention.qkv,
                gradients,
                BackwardInput {
                    x: &stream_tape.modulated_0,
                    saved: &stream_tape.qkv_saved,
                    dy: &d_qkv,
                    rows,
                },
                None,
            )?;
        }
    }
    if !input_gradients {
        return Ok(None);
    }
    let d_txt = input_grads.pop();
    let d_img = input_grads.pop();
    Ok(d_img.zip(d_txt))
}
