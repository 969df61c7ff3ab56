//! A block linear with its LoRA adapters in the direct backward: `y = x W^T + sum scale (x D^T)
//! U^T` forward, and backward `dx = dy W + sum scale (dy U) D` with the adapter gradients
//! `dU += scale dy^T (x D^T)`, `dD += scale (dy U)^T x`. The base weight `W` is frozen: nothing
//! weight-sized is computed for it.

use std::collections::HashMap;

use candle_core::{CpuStorage, DType, Storage, TensorId, Var};

use super::matrix::{multiply, FrozenWeight, Matrix};
use crate::error::{Error, Result};
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
        self.values[slot].get_or_insert_with(|| vec![0f32; length])
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

/// What a linear's forward keeps for its backward besides its input: `x D^T` per adapter.
pub(super) struct LinearSaved {
    hidden: Vec<Vec<f32>>,
}

/// `y = x W^T (+ LoRA)` for `x` `[rows, in]`; returns `y` `[rows, out]` and what the backward
/// needs.
pub(super) fn forward(
    linear: &Linear,
    gradients: &Gradients,
    x: &[f32],
    rows: usize,
) -> Result<(Vec<f32>, LinearSaved)> {
    let (in_features, out_features) = (linear.in_features(), linear.out_features());
    let mut y = vec![0f32; rows * out_features];
    with_weight(linear, |weight| {
        weight.forward(x, rows, in_features, &mut y)
    })?;
    let mut hidden = Vec::with_capacity(linear.adapters.len());
    for adapter in adapters(linear, gradients)? {
        let mut h = vec![0f32; rows * adapter.rank];
        let x_matrix = Matrix::rows(x, rows, in_features);
        multiply(
            &mut h,
            adapter.rank,
            x_matrix,
            Matrix::rows(&adapter.down, adapter.rank, in_features).t(),
            1.0,
            false,
        );
        multiply(
            &mut y,
            out_features,
            Matrix::rows(&h, rows, adapter.rank),
            Matrix::rows(&adapter.up, out_features, adapter.rank).t(),
            adapter.scale,
            true,
        );
        hidden.push(h);
    }
    Ok((y, LinearSaved { hidden }))
}

/// Adds the adapters' gradients to `gradients` and, when `dx` is given, writes (or with
/// `accumulate` adds) the input gradient `dy W + LoRA` into it.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    linear: &Linear,
    gradients: &mut Gradients,
    x: &[f32],
    saved: &LinearSaved,
    dy: &[f32],
    rows: usize,
    dx: Option<&mut [f32]>,
    accumulate: bool,
) -> Result<()> {
    let (in_features, out_features) = (linear.in_features(), linear.out_features());
    let adapters = adapters(linear, gradients)?;
    let dy_matrix = Matrix::rows(dy, rows, out_features);
    let x_matrix = Matrix::rows(x, rows, in_features);
    let mut dx = dx;
    if let Some(dx) = dx.as_deref_mut() {
        with_weight(linear, |weight| {
            weight.backward(dy, rows, out_features, dx, accumulate)
        })?;
    }
    for (adapter, h) in adapters.iter().zip(&saved.hidden) {
        let rank = adapter.rank;
        // `dy U`, `[rows, rank]`.
        let mut g = vec![0f32; rows * rank];
        multiply(
            &mut g,
            rank,
            dy_matrix,
            Matrix::rows(&adapter.up, out_features, rank),
            1.0,
            false,
        );
        let g_matrix = Matrix::rows(&g, rows, rank);
        if let Some(slot) = adapter.up_slot {
            let d_up = gradients.buffer(slot, out_features * rank);
            multiply(
                d_up,
                rank,
                dy_matrix.t(),
                Matrix::rows(h, rows, rank),
                adapter.scale,
                true,
            );
        }
        if let Some(slot) = adapter.down_slot {
            let d_down = gradients.buffer(slot, rank * in_features);
            multiply(
                d_down,
                in_features,
                g_matrix.t(),
                x_matrix,
                adapter.scale,
                true,
            );
        }
        if let Some(dx) = dx.as_deref_mut() {
            multiply(
                dx,
                in_features,
                g_matrix,
                Matrix::rows(&adapter.down, rank, in_features),
                adapter.scale,
                true,
            );
        }
    }
    Ok(())
}
