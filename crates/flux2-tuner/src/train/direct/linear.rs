//! A block linear with its LoRA adapters in the direct backward: `y = x W^T + sum scale (x D^T)
//! U^T` forward, and backward `dx = dy W + sum scale (dy U) D` with the adapter gradients
//! `dU += scale dy^T (x D^T)`, `dD += scale (dy U)^T x`. The base weight `W` is frozen: nothing
//! weight-sized is computed for it.
//!
//! LoRA dropout (`nn::lora_dropout`, as the autograd path's `nn::Linear::forward`, drawing from
//! the same generator in the same order): a skipped module adds nothing; network and rank
//! dropout multiply `x D^T` by a mask `M` (kept entries `1 / (1 - p)` for network dropout) and
//! the scale by `1 / (1 - p_rank)`; the backward then uses `(x D^T) M` and `(dy U) M`.

use crate::nn::host::zeroed_f32;
use std::collections::HashMap;

use std::sync::Arc;

use candle_core::{CpuStorage, DType, Device, Storage, TensorId, Var};

use super::matrix::{multiply, FrozenWeight, Matrix};
use crate::error::{Error, Result};
use crate::nn::lora_dropout::LoraDropout;
use crate::nn::Linear;

/// Where each trained parameter's gradient goes, by the id of its tensor.
pub(super) struct Gradients {
    slots: HashMap<TensorId, usize>,
    values: Vec<Option<Vec<f32>>>,
}

impl Gradients {
    pub fn new(parameters: &[Var]) -> Self {
        Self {
            slots: parameters
                .iter()
                .enumerate()
                .map(|(index, var)| (var.as_tensor().id(), index))
                .collect(),
            values: vec![None; parameters.len()],
        }
    }

    fn slot(&self, id: TensorId) -> Option<usize> {
        self.slots.get(&id).copied()
    }

    /// The accumulator of parameter `slot` (zeros at first).
    fn buffer(&mut self, slot: usize, length: usize) -> &mut [f32] {
        self.values[slot].get_or_insert_with(|| zeroed_f32(length))
    }

    /// Each parameter's gradient, in the order of the parameters (`None` where none was made).
    pub fn into_values(self) -> Vec<Option<Vec<f32>>> {
        self.values
    }
}

/// One adapter's factors in f32 and where their gradients go.
struct Adapter {
    /// `[rank, in]`
    down: Vec<f32>,
    /// `[out, rank]`
    up: Vec<f32>,
    rank: usize,
    scale: f32,
    /// Gradient slots of `down` and `up` (untrained adapters have none).
    down_slot: Option<usize>,
    up_slot: Option<usize>,
    /// Dropouts to draw while training (active ones only).
    dropout: Option<Arc<LoraDropout>>,
}

fn values(tensor: &candle_core::Tensor) -> Result<Vec<f32>> {
    Ok(tensor.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

fn adapters(linear: &Linear, gradients: &Gradients) -> Result<Vec<Adapter>> {
    linear
        .adapters
        .iter()
        .map(|adapter| {
            Ok(Adapter {
                down: values(&adapter.down)?,
                up: values(&adapter.up)?,
                rank: adapter.down.dim(0)?,
                scale: adapter.scale as f32,
                down_slot: gradients.slot(adapter.down.id()),
                up_slot: gradients.slot(adapter.up.id()),
                dropout: adapter.dropout.clone().filter(|d| d.is_active()),
            })
        })
        .collect()
}

/// Calls `f` with the base weight in host memory: f32 and bf16 in place, fp8 (and other
/// dtypes) dequantised or widened to f32 for the call.
fn with_weight<R>(linear: &Linear, f: impl FnOnce(FrozenWeight) -> R) -> Result<R> {
    let widened;
    let weight = match linear.weight.dtype() {
        DType::F32 | DType::BF16 => &linear.weight,
        _ => {
            widened = linear.dense_weight(DType::F32)?.to_dtype(DType::F32)?;
            &widened
        }
    };
    let count = weight.elem_count();
    let (storage, layout) = weight.storage_and_layout();
    let not_host =
        || Error::Shape("direct backward: a block weight is not a contiguous host tensor".into());
    if !layout.is_contiguous() {
        return Err(not_host());
    }
    let start = layout.start_offset();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(values)) => {
            Ok(f(FrozenWeight::F32(&values[start..start + count])))
        }
        Storage::Cpu(CpuStorage::BF16(values)) => {
            Ok(f(FrozenWeight::Bf16(&values[start..start + count])))
        }
        _ => Err(not_host()),
    }
}

/// What one adapter's forward keeps: `h = (x D^T) M`, the dropout mask `M` (none without
/// network or rank dropout) and the scale it was applied with. A skipped module keeps nothing.
struct AdapterSaved {
    hidden: Vec<f32>,
    mask: Option<Vec<f32>>,
    scale: f32,
}

/// What a linear's forward keeps for its backward besides its input.
pub(super) struct LinearSaved {
    adapters: Vec<Option<AdapterSaved>>,
}

/// Draws the dropout of `h` `[rows, rank]` (`batch` samples) as `LoraDropout::apply` does:
/// network mask, then one rank mask per sample. Returns the combined mask (if any) and the scale
/// factor.
fn dropout_mask(
    dropout: &LoraDropout,
    rows: usize,
    rank: usize,
    batch: usize,
) -> Result<(Option<Vec<f32>>, f32)> {
    let mut mask: Option<Vec<f32>> = None;
    if let Some(p) = dropout.network {
        let drawn = values(&dropout.mask(rows, rank, p, &Device::Cpu)?)?;
        let keep = 1.0 / (1.0 - p) as f32;
        mask = Some(drawn.into_iter().map(|m| m * keep).collect());
    }
    let mut factor = 1.0;
    if let Some(p) = dropout.rank {
        let per_sample = values(&dropout.mask(batch, rank, p, &Device::Cpu)?)?;
        let length = rows / batch.max(1);
        let combined = mask.get_or_insert_with(|| vec![1.0; rows * rank]);
        for (row, values) in combined.chunks_exact_mut(rank).enumerate() {
            let sample = (row / length.max(1)).min(batch.saturating_sub(1));
            for (value, keep) in values
                .iter_mut()
                .zip(&per_sample[sample * rank..(sample + 1) * rank])
            {
                *value *= keep;
            }
        }
        factor = 1.0 / (1.0 - p) as f32;
    }
    Ok((mask, factor))
}

fn apply_mask(values: &mut [f32], mask: Option<&Vec<f32>>) {
    if let Some(mask) = mask {
        values.iter_mut().zip(mask).for_each(|(v, m)| *v *= m);
    }
}

/// `y = x W^T (+ LoRA)` for `x` `[rows, in]` (`batch` samples, for rank dropout); returns `y`
/// `[rows, out]` and what the backward needs.
pub(super) fn forward(
    linear: &Linear,
    gradients: &Gradients,
    x: &[f32],
    rows: usize,
    batch: usize,
) -> Result<(Vec<f32>, LinearSaved)> {
    let (in_features, out_features) = (linear.in_features(), linear.out_features());
    let mut y = with_weight(linear, |weight| {
        weight.forward(x, rows, in_features, out_features)
    })?;
    let mut saved = Vec::with_capacity(linear.adapters.len());
    for adapter in adapters(linear, gradients)? {
        if adapter.dropout.as_ref().is_some_and(|d| d.skip_module()) {
            saved.push(None);
            continue;
        }
        let mut h = zeroed_f32(rows * adapter.rank);
        let x_matrix = Matrix::rows(x, rows, in_features);
        multiply(
            &mut h,
            adapter.rank,
            x_matrix,
            Matrix::rows(&adapter.down, adapter.rank, in_features).t(),
            1.0,
            false,
        );
        let (mask, factor) = match &adapter.dropout {
            Some(dropout) => dropout_mask(dropout, rows, adapter.rank, batch)?,
            None => (None, 1.0),
        };
        apply_mask(&mut h, mask.as_ref());
        let scale = adapter.scale * factor;
        multiply(
            &mut y,
            out_features,
            Matrix::rows(&h, rows, adapter.rank),
            Matrix::rows(&adapter.up, out_features, adapter.rank).t(),
            scale,
            true,
        );
        saved.push(Some(AdapterSaved {
            hidden: h,
            mask,
            scale,
        }));
    }
    Ok((y, LinearSaved { adapters: saved }))
}

/// What a linear's backward reads: its input `x` `[rows, in]`, what its forward kept, and the
/// output gradient `dy` `[rows, out]`.
#[derive(Clone, Copy)]
pub(super) struct BackwardInput<'a> {
    pub x: &'a [f32],
    pub saved: &'a LinearSaved,
    pub dy: &'a [f32],
    pub rows: usize,
}

/// Adds the adapters' gradients to `gradients` and returns the input gradient `dy W + LoRA`
/// `[rows, in]`.
pub(super) fn backward(
    linear: &Linear,
    gradients: &mut Gradients,
    input: BackwardInput,
) -> Result<Vec<f32>> {
    let (in_features, out_features) = (linear.in_features(), linear.out_features());
    // The base product writes `dx` once; the adapters add their terms to it.
    let mut dx = with_weight(linear, |weight| {
        weight.backward(input.dy, input.rows, out_features, in_features)
    })?;
    adapters_backward(linear, gradients, input, Some(&mut dx))?;
    Ok(dx)
}

/// Adds the adapters' gradients to `gradients` and, when `dx` is given, their input-gradient
/// terms to it (without `dx`: the first block, whose input gradient nothing uses).
pub(super) fn adapters_backward(
    linear: &Linear,
    gradients: &mut Gradients,
    input: BackwardInput,
    mut dx: Option<&mut [f32]>,
) -> Result<()> {
    let BackwardInput { x, saved, dy, rows } = input;
    let (in_features, out_features) = (linear.in_features(), linear.out_features());
    let adapters = adapters(linear, gradients)?;
    let dy_matrix = Matrix::rows(dy, rows, out_features);
    let x_matrix = Matrix::rows(x, rows, in_features);
    for (adapter, kept) in adapters.iter().zip(&saved.adapters) {
        let Some(kept) = kept else {
            continue;
        };
        let (rank, scale) = (adapter.rank, kept.scale);
        // `(dy U) M`, `[rows, rank]`.
        let mut g = zeroed_f32(rows * rank);
        multiply(
            &mut g,
            rank,
            dy_matrix,
            Matrix::rows(&adapter.up, out_features, rank),
            1.0,
            false,
        );
        apply_mask(&mut g, kept.mask.as_ref());
        let g_matrix = Matrix::rows(&g, rows, rank);
        if let Some(slot) = adapter.up_slot {
            let d_up = gradients.buffer(slot, out_features * rank);
            multiply(
                d_up,
                rank,
                dy_matrix.t(),
                Matrix::rows(&kept.hidden, rows, rank),
                scale,
                true,
            );
        }
        if let Some(slot) = adapter.down_slot {
            let d_down = gradients.buffer(slot, rank * in_features);
            multiply(d_down, in_features, g_matrix.t(), x_matrix, scale, true);
        }
        if let Some(dx) = dx.as_deref_mut() {
            multiply(
                dx,
                in_features,
                g_matrix,
                Matrix::rows(&adapter.down, rank, in_features),
                scale,
                true,
            );
        }
    }
    Ok(())
}
