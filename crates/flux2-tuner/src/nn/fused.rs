//! Fused elementwise kernels for inference on the CPU: each replaces a chain of candle ops (every
//! one a full pass over the activations, with dtype round trips) by one pass over rows, in f32,
//! rounding to the activation dtype where the op chain rounds. They record no gradient: callers use
//! them only for tensors that track none ([`crate::nn::host::is_plain_cpu`]) and keep the op chains
//! otherwise.
//!
//! - [`modulate`]: `(1 + scale) * LayerNorm(x) + shift` (norm.rs `modulate`);
//! - [`gated_add`]: `x + gate * y` (blocks.rs `ModulationParams::gated_add`);
//! - [`qk_norm_rope`]: split of fused `qkv` rows into heads, RMSNorm of q and k, RoPE (blocks.rs
//!   `split_qkv`);
//! - [`swiglu`]: `silu(a) * b` of the two halves of the last axis.

use candle_core::{CpuStorage, DType, Tensor};
use half::bf16;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::nn::host::{lane_sum, vectorised, with_data};
use crate::nn::softmax::exp;

/// An activation element type: f32 or bf16.
pub trait Element: candle_core::WithDType + Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(value: f32) -> Self;
    fn slice(storage: &CpuStorage) -> Option<&[Self]>;
}

impl Element for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        value
    }
    fn slice(storage: &CpuStorage) -> Option<&[Self]> {
        match storage {
            CpuStorage::F32(values) => Some(values),
            _ => None,
        }
    }
}

/// f32 to bf16 rounding to nearest even, as `half::bf16::from_f32` but without branches (so that
/// loops over it vectorise). NaN becomes the canonical quiet NaN.
#[inline(always)]
pub fn round_to_bf16(value: f32) -> bf16 {
    let bits = value.to_bits();
    let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1));
    let result = if value.is_nan() {
        0x7FC0
    } else {
        (rounded >> 16) as u16
    };
    bf16::from_bits(result)
}

/// `length` bf16 zeros (see [`crate::nn::host::filled`]; `vec![bf16::ZERO; length]` would also
/// write them one by one on one core).
pub fn zeroed_bf16(length: usize) -> Vec<bf16> {
    crate::nn::host::filled(length, bf16::ZERO)
}

/// `values` rounded to bf16 (to nearest even).
pub fn rounded_to_bf16(values: &[f32]) -> Vec<bf16> {
    // `round_to_bf16` is `#[inline(always)]`, so the loop vectorises.
    crate::nn::host::mapped(values, round_to_bf16)
}

impl Element for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        round_to_bf16(value)
    }
    fn slice(storage: &CpuStorage) -> Option<&[Self]> {
        match storage {
            CpuStorage::BF16(values) => Some(values),
            _ => None,
        }
    }
}

/// Rows handed to one parallel task (enough work to amortise the hand-off).
const ROWS_PER_TASK: usize = 16;

/// Calls `f` with the elements of a contiguous tensor of element type `T`.
fn with_values<T: Element, R>(tensor: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let tensor = tensor.contiguous()?;
    with_data(&tensor, |storage, offset| {
        let values = T::slice(storage).ok_or_else(|| {
            Error::Shape(format!(
                "fused kernel: expected {:?} data, found {:?}",
                <T as candle_core::WithDType>::DTYPE,
                tensor.dtype()
            ))
        })?;
        f(&values[offset..offset + tensor.elem_count()])
    })
}

/// A `[b, 1, c]` (or `[b, c]`) f32 per-sample vector as host values, with its batch size.
fn per_sample(vector: &Tensor, channels: usize) -> Result<Vec<f32>> {
    let values: Vec<f32> = vector.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    if values.is_empty() || values.len() % channels != 0 {
        return Err(Error::Shape(format!(
            "fused kernel: modulation of {} values for {channels} channels",
            values.len()
        )));
    }
    Ok(values)
}

/// Shape `[b, rows, c]` of `x` as (batch, rows per sample, channels).
fn sample_rows(x: &Tensor) -> Result<(usize, usize, usize)> {
    let dims = x.dims();
    let channels = *dims
        .last()
        .ok_or_else(|| Error::Shape("fused kernel: scalar input".into()))?;
    let batch = dims.first().copied().unwrap_or(1).max(1);
    let rows = x.elem_count() / channels.max(1) / batch;
    Ok((batch, rows, channels))
}

fn modulate_typed<T: Element>(
    x: &Tensor,
    shift: &[f32],
    scale: &[f32],
    eps: f32,
) -> Result<Tensor> {
    let (batch, rows, channels) = sample_rows(x)?;
    if shift.len() != batch * channels || scale.len() != batch * channels {
        return Err(Error::Shape(
            "modulate: shift/scale do not match x's batch and channels".into(),
        ));
    }
    let mut out = crate::nn::host::filled(x.elem_count(), T::from_f32(0.0));
    with_values::<T, _>(x, |values| {
        out.par_chunks_mut(channels * ROWS_PER_TASK)
            .zip(values.par_chunks(channels * ROWS_PER_TASK))
            .enumerate()
            .for_each(|(task, (out_rows, in_rows))| {
                vectorised(
                    #[inline(always)]
                    || {
                        let mut row32 = vec![0f32; channels];
                        for (index, (out_row, in_row)) in out_rows
                            .chunks_exact_mut(channels)
                            .zip(in_rows.chunks_exact(channels))
                            .enumerate()
                        {
                            let sample = (task * ROWS_PER_TASK + index) / rows;
                            let (shift, scale) = (
                                &shift[sample * channels..(sample + 1) * channels],
                                &scale[sample * channels..(sample + 1) * channels],
                            );
                            for (a, b) in row32.iter_mut().zip(in_row) {
                                *a = b.to_f32();
                            }
                            let mean = lane_sum(&row32, |v| v) / channels as f32;
                            let variance =
                                lane_sum(&row32, |v| (v - mean) * (v - mean)) / channels as f32;
                            let inverse = 1.0 / (variance + eps).sqrt();
                            for c in 0..channels {
                                let normalised = (row32[c] - mean) * inverse;
                                out_row[c] = T::from_f32(normalised * (1.0 + scale[c]) + shift[c]);
                            }
                        }
                    },
                )
            });
        Ok(())
    })?;
    Ok(Tensor::from_vec(out, x.shape(), x.device())?)
}

/// `(1 + scale) * LayerNorm(x) + shift` in f32, rounded once to `x`'s dtype.
///
/// # Shapes
/// `x`: `[b, l, c]`; `shift`, `scale`: `[b, 1, c]`.
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    let channels = x.dim(candle_core::D::Minus1)?;
    let (shift, scale) = (per_sample(shift, channels)?, per_sample(scale, channels)?);
    match x.dtype() {
        DType::BF16 => modulate_typed::<bf16>(x, &shift, &scale, eps as f32),
        _ => modulate_typed::<f32>(&x.to_dtype(DType::F32)?, &shift, &scale, eps as f32),
    }
}

fn gated_add_typed<T: Element>(x: &Tensor, gate: &[f32], y: &Tensor) -> Result<Tensor> {
    let (batch, rows, channels) = sample_rows(x)?;
    if gate.len() != batch * channels || y.dims() != x.dims() {
        return Err(Error::Shape(format!(
            "gated_add: x {:?}, y {:?} and gate do not agree",
            x.dims(),
            y.dims()
        )));
    }
    let y = y.to_dtype(<T as candle_core::WithDType>::DTYPE)?;
    let mut out = crate::nn::host::filled(x.elem_count(), T::from_f32(0.0));
    with_values::<T, _>(x, |xs| {
        with_values::<T, _>(&y, |ys| {
            out.par_chunks_mut(channels * ROWS_PER_TASK)
                .zip(xs.par_chunks(channels * ROWS_PER_TASK))
                .zip(ys.par_chunks(channels * ROWS_PER_TASK))
                .enumerate()
                .for_each(|(task, ((out_rows, x_rows), y_rows))| {
                    vectorised(
                        #[inline(always)]
                        || {
                            for (index, ((o, a), b)) in out_rows
                                .chunks_exact_mut(channels)
                                .zip(x_rows.chunks_exact(channels))
                                .zip(y_rows.chunks_exact(channels))
                                .enumerate()
                            {
                                let sample = (task * ROWS_PER_TASK + index) / rows;
                                let gate = &gate[sample * channels..(sample + 1) * channels];
                                for c in 0..channels {
                                    o[c] = T::from_f32(a[c].to_f32() + gate[c] * b[c].to_f32());
                                }
                            }
                        },
                    )
                });
            Ok(())
        })
    })?;
    Ok(Tensor::from_vec(out, x.shape(), x.device())?)
}

/// `x + gate * y` in f32, rounded once to `x`'s dtype (`y` of any float dtype).
///
/// # Shapes
/// `x`, `y`: `[b, l, c]`; `gate`: `[b, 1, c]`.
pub fn gated_add(x: &Tensor, gate: &Tensor, y: &Tensor) -> Result<Tensor> {
    let gate = per_sample(gate, x.dim(candle_core::D::Minus1)?)?;
    match x.dtype() {
        DType::BF16 => gated_add_typed::<bf16>(x, &gate, y),
        _ => gated_add_typed::<f32>(&x.to_dtype(DType::F32)?, &gate, y),
    }
}

/// The q, k, v of one attention input, each `[b, heads, l, d]`.
pub type QueryKeyValue = (Tensor, Tensor, Tensor);

/// Everything [`qk_norm_rope`] needs besides the projections.
pub struct QkNormRope<'a> {
    pub heads: usize,
    /// RMSNorm scales of q and k, `[d]`.
    pub query_scale: &'a Tensor,
    pub key_scale: &'a Tensor,
    pub eps: f64,
    /// RoPE tables `[b, L, d / 2]` (f32) and the position of this input's first token in them.
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    pub table_offset: usize,
}

/// RMSNorm of one head vector (normalise in f32, round, multiply by the scale, round: BFL's
/// order), then the rotation of its interleaved pairs in f32, rounded once more. `normalised` is
/// scratch of the head's length.
#[inline(always)]
fn norm_rope_head<T: Element>(
    input: &[T],
    scale: &[f32],
    eps: f32,
    cos: &[f32],
    sin: &[f32],
    normalised: &mut [f32],
    out: &mut [T],
) {
    for (n, v) in normalised.iter_mut().zip(input) {
        *n = v.to_f32();
    }
    let mean_square = lane_sum(normalised, |v| v * v) / input.len() as f32;
    let inverse = 1.0 / (mean_square + eps).sqrt();
    for (n, s) in normalised.iter_mut().zip(scale) {
        let rounded = T::from_f32(*n * inverse).to_f32();
        *n = T::from_f32(rounded * s).to_f32();
    }
    let pairs = normalised.chunks_exact(2).zip(out.chunks_exact_mut(2));
    for ((pair, rotated), (c, s)) in pairs.zip(cos.iter().zip(sin)) {
        rotated[0] = T::from_f32(pair[0] * c - pair[1] * s);
        rotated[1] = T::from_f32(pair[0] * s + pair[1] * c);
    }
}

fn qk_norm_rope_typed<T: Element>(
    projected: &Tensor,
    column: usize,
    parameters: &QkNormRope,
) -> Result<QueryKeyValue> {
    let (batch, length, width) = projected.dims3()?;
    let heads = parameters.heads;
    let head_dim = parameters.query_scale.dim(0)?;
    let half = head_dim / 2;
    let (table_batch, table_length, table_half) = parameters.cos.dims3()?;
    if column + 3 * heads * head_dim > width
        || table_half != half
        || (table_batch != batch && table_batch != 1)
        || parameters.table_offset + length > table_length
    {
        return Err(Error::Shape(format!(
            "qk_norm_rope: projections {:?} from column {column}, {heads} heads of {head_dim}, RoPE \
             tables {:?} from token {}",
            projected.dims(),
            parameters.cos.dims(),
            parameters.table_offset
        )));
    }
    let cos: Vec<f32> = parameters
        .cos
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let sin: Vec<f32> = parameters
        .sin
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    // The scales rounded to the activation dtype (as the op chain multiplies them), held in f32.
    let scale_values = |scale: &Tensor| -> Result<Vec<f32>> {
        let rounded = scale.to_dtype(<T as candle_core::WithDType>::DTYPE)?;
        Ok(rounded.to_dtype(DType::F32)?.to_vec1()?)
    };
    let (query_scale, key_scale) = (
        scale_values(parameters.query_scale)?,
        scale_values(parameters.key_scale)?,
    );
    let eps = parameters.eps as f32;
    let per_output = batch * heads * length * head_dim;
    let zero = T::from_f32(0.0);
    let (mut q, mut k, mut v) = (
        crate::nn::host::filled(per_output, zero),
        crate::nn::host::filled(per_output, zero),
        crate::nn::host::filled(per_output, zero),
    );
    with_values::<T, _>(projected, |values| {
        // One task per (sample, head): it owns the `[l, d]` slab of that head in q, k and v.
        let slab = length * head_dim;
        q.par_chunks_mut(slab)
            .zip(k.par_chunks_mut(slab))
            .zip(v.par_chunks_mut(slab))
            .enumerate()
            .for_each(|(bh, ((q_slab, k_slab), v_slab))| {
                vectorised(
                    #[inline(always)]
                    || {
                        let (sample, head) = (bh / heads, bh % heads);
                        let table_sample = if table_batch == 1 { 0 } else { sample };
                        let mut normalised = vec![0f32; head_dim];
                        for token in 0..length {
                            let row = &values[(sample * length + token) * width + column..];
                            let table =
                                ((table_sample * table_length) + parameters.table_offset + token)
                                    * half;
                            let (cos, sin) = (&cos[table..table + half], &sin[table..table + half]);
                            let out = token * head_dim..(token + 1) * head_dim;
                            let part = |which: usize| {
                                &row[(which * heads + head) * head_dim..][..head_dim]
                            };
                            norm_rope_head(
                                part(0),
                                &query_scale,
                                eps,
                                cos,
                                sin,
                                &mut normalised,
                                &mut q_slab[out.clone()],
                            );
                            norm_rope_head(
                                part(1),
                                &key_scale,
                                eps,
                                cos,
                                sin,
                                &mut normalised,
                                &mut k_slab[out.clone()],
                            );
                            v_slab[out].copy_from_slice(part(2));
                        }
                    },
                )
            });
        Ok(())
    })?;
    let shape = (batch, heads, length, head_dim);
    let device = projected.device();
    Ok((
        Tensor::from_vec(q, shape, device)?,
        Tensor::from_vec(k, shape, device)?,
        Tensor::from_vec(v, shape, device)?,
    ))
}

/// Splits fused projections into q, k, v `[b, heads, l, d]`, normalises q and k (RMSNorm with
/// their scales) and rotates them (RoPE on interleaved pairs), in `projected`'s dtype.
///
/// `projected` is `[b, l, width]`; the `3 * heads * d` columns from `column` on are laid out
/// `(3, heads, d)`.
pub fn qk_norm_rope(
    projected: &Tensor,
    column: usize,
    parameters: &QkNormRope,
) -> Result<QueryKeyValue> {
    match projected.dtype() {
        DType::BF16 => qk_norm_rope_typed::<bf16>(projected, column, parameters),
        DType::F32 => qk_norm_rope_typed::<f32>(projected, column, parameters),
        other => Err(Error::Shape(format!(
            "qk_norm_rope: unsupported dtype {other:?}"
        ))),
    }
}

fn swiglu_typed<T: Element>(x: &Tensor, column: usize, width: usize) -> Result<Tensor> {
    let dims = x.dims();
    let row_width = *dims.last().unwrap_or(&0);
    let half = width / 2;
    if width % 2 != 0 || column + width > row_width {
        return Err(Error::Shape(format!(
            "swiglu: {width} columns from {column} in rows of {row_width}"
        )));
    }
    let rows = x.elem_count() / row_width.max(1);
    let mut out = crate::nn::host::filled(rows * half, T::from_f32(0.0));
    with_values::<T, _>(x, |values| {
        out.par_chunks_mut(half * ROWS_PER_TASK)
            .zip(values.par_chunks(row_width * ROWS_PER_TASK))
            .for_each(|(out_rows, in_rows)| {
                vectorised(
                    #[inline(always)]
                    || {
                        for (o, row) in out_rows
                            .chunks_exact_mut(half)
                            .zip(in_rows.chunks_exact(row_width))
                        {
                            let (gate, value) = row[column..column + width].split_at(half);
                            for c in 0..half {
                                let a = gate[c].to_f32();
                                o[c] = T::from_f32(a / (1.0 + exp(-a)) * value[c].to_f32());
                            }
                        }
                    },
                )
            });
        Ok(())
    })?;
    let mut out_dims = dims.to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = half;
    }
    Ok(Tensor::from_vec(out, out_dims, x.device())?)
}

/// `silu(a) * b` where `a` and `b` are the two halves of the `width` columns of `x`'s last axis
/// starting at `column`; in f32, rounded once to `x`'s dtype.
pub fn swiglu(x: &Tensor, column: usize, width: usize) -> Result<Tensor> {
    match x.dtype() {
        DType::BF16 => swiglu_typed::<bf16>(x, column, width),
        DType::F32 => swiglu_typed::<f32>(x, column, width),
        other => Err(Error::Shape(format!("swiglu: unsupported dtype {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::norm::{layer_norm, rms_norm};
    use crate::nn::rope::RopeTables;
    use candle_core::{Device, D};

    fn random(shape: &[usize], seed: u64) -> Result<Tensor> {
        let mut rng = crate::util::rng::SeededRng::new(seed);
        let count: usize = shape.iter().product();
        let values: Vec<f32> = (0..count).map(|_| rng.normal() as f32).collect();
        Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
    }

    fn max_difference(a: &Tensor, b: &Tensor) -> Result<f32> {
        Ok((a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar()?)
    }

    #[test]
    fn zeroed_bf16_buffers_hold_zeros() {
        let zeros = zeroed_bf16(1000);
        assert_eq!(zeros.len(), 1000);
        assert!(zeros.iter().all(|v| v.to_bits() == 0));
    }

    /// Each kernel against the candle op chain it replaces, batch 2 (per-sample modulation).
    #[test]
    fn kernels_match_their_op_chains() -> Result<()> {
        let x = random(&[2, 5, 24], 1)?;
        let (shift, scale, gate) = (
            random(&[2, 1, 24], 2)?,
            random(&[2, 1, 24], 3)?,
            random(&[2, 1, 24], 4)?,
        );
        let chain = layer_norm(&x, 1e-6)?
            .broadcast_mul(&(&scale + 1.0)?)?
            .broadcast_add(&shift)?;
        assert!(max_difference(&modulate(&x, &shift, &scale, 1e-6)?, &chain)? < 1e-5);

        let y = random(&[2, 5, 24], 5)?;
        let chain = (&x + y.broadcast_mul(&gate)?)?;
        assert!(max_difference(&gated_add(&x, &gate, &y)?, &chain)? < 1e-6);

        let wide = random(&[2, 5, 30], 6)?;
        let (a, b) = (
            wide.narrow(D::Minus1, 10, 10)?,
            wide.narrow(D::Minus1, 20, 10)?,
        );
        let chain = (candle_nn::ops::silu(&a)? * b)?;
        assert!(max_difference(&swiglu(&wide, 10, 20)?, &chain)? < 1e-6);

        // 2 heads of 8 after 4 leading columns; RoPE rows from token 3 of a 9-token table.
        let (heads, head_dim) = (2, 8);
        let projected = random(&[2, 5, 4 + 3 * heads * head_dim], 7)?;
        let (query_scale, key_scale) = (random(&[head_dim], 8)?, random(&[head_dim], 9)?);
        let ids: Vec<i64> = (0..2 * 9)
            .flat_map(|t| [0, t % 9, 2 * (t % 9), 1])
            .collect();
        let ids = Tensor::from_vec(ids, (2, 9, 4), &Device::Cpu)?;
        let tables = RopeTables::new(&ids, &[2, 2, 2, 2], 10.0)?;
        let parameters = QkNormRope {
            heads,
            query_scale: &query_scale,
            key_scale: &key_scale,
            eps: 1e-6,
            cos: &tables.cos,
            sin: &tables.sin,
            table_offset: 3,
        };
        for dtype in [DType::F32, DType::BF16] {
            let projected = projected.to_dtype(dtype)?;
            let (q, k, v) = qk_norm_rope(&projected, 4, &parameters)?;
            let qkv = projected
                .narrow(D::Minus1, 4, 3 * heads * head_dim)?
                .reshape((2, 5, 3, heads, head_dim))?
                .permute((2, 0, 3, 1, 4))?;
            let rows = RopeTables {
                cos: tables.cos.narrow(1, 3, 5)?.contiguous()?,
                sin: tables.sin.narrow(1, 3, 5)?.contiguous()?,
            };
            let q_chain = rows.apply(&rms_norm(&qkv.get(0)?, &query_scale, 1e-6)?)?;
            let k_chain = rows.apply(&rms_norm(&qkv.get(1)?, &key_scale, 1e-6)?)?;
            // Same roundings in the same order: equal up to f32 summation order.
            let tolerance = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
            assert!(max_difference(&q, &q_chain)? < tolerance, "{dtype:?} q");
            assert!(max_difference(&k, &k_chain)? < tolerance, "{dtype:?} k");
            assert_eq!(max_difference(&v, &qkv.get(2)?)?, 0.0);
        }
        Ok(())
    }

    #[test]
    fn bf16_rounding_is_to_nearest_even() {
        for value in [
            1.0f32,
            // Ties between two bf16 values (rounded to the even one).
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            -3.3e-5,
            3.395e38,
            f32::INFINITY,
            0.0,
        ] {
            assert_eq!(
                round_to_bf16(value).to_bits(),
                bf16::from_f32(value).to_bits(),
                "{value}"
            );
        }
        assert!(round_to_bf16(f32::NAN).is_nan());
    }
}
