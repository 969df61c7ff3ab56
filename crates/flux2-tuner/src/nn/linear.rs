//! A bias-free linear layer (FLUX.2 has no biases) that can carry LoRA adapters, applied either
//! unmerged (extra low-rank matmuls) or merged into the weight.

use candle_core::{DType, Tensor, WithDType};
use half::bf16;

use crate::error::Result;
use crate::nn::amx::{self, PackedB};
use crate::nn::fused::round_to_bf16;
use crate::nn::host::{is_plain_cpu, with_data};
use crate::nn::matrix::{product, Matrix};

/// A low-rank update `scale * up @ down` attached to a [`Linear`].
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// `[rank, in]`
    pub down: Tensor,
    /// `[out, rank]`
    pub up: Tensor,
    /// `multiplier * alpha / rank`.
    pub scale: f64,
    /// Dropouts applied while training (gradient mode on).
    pub dropout: Option<std::sync::Arc<crate::nn::lora_dropout::LoraDropout>>,
}

impl LoraAdapter {
    /// The dense update `scale * up @ down`, `[out, in]`, in f32.
    pub fn delta_weight(&self) -> Result<Tensor> {
        let up = self.up.to_dtype(DType::F32)?;
        let down = self.down.to_dtype(DType::F32)?;
        Ok((up.matmul(&down)? * self.scale)?)
    }
}

/// `product(x, W, rows, in, out)` on the host values of a plain CPU `x` `[rows, in]` and weight
/// `W` `[out, in]` of element type `T`, as a `[rows, out]` tensor; `None` where they are not
/// plain CPU tensors of `T` or `product` returns `None`.
fn host_product<T: WithDType, U: WithDType>(
    x: &Tensor,
    weight: &Tensor,
    product: impl FnOnce(&[T], &[T], usize, usize, usize) -> Option<Vec<U>>,
) -> Result<Option<Tensor>> {
    if x.dtype() != T::DTYPE || weight.dtype() != T::DTYPE || !is_plain_cpu(&[x, weight]) {
        return Ok(None);
    }
    let (rows, in_features) = x.dims2()?;
    let out_features = weight.dim(0)?;
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    let y = with_data(&x, |xs, x_offset| {
        with_data(&weight, |ws, w_offset| {
            let (xs, ws) = (
                &xs.as_slice::<T>()?[x_offset..],
                &ws.as_slice::<T>()?[w_offset..],
            );
            Ok(product(xs, ws, rows, in_features, out_features))
        })
    })?;
    y.map(|y| Tensor::from_vec(y, (rows, out_features), x.device()))
        .transpose()
        .map_err(Into::into)
}

/// `x W^T` on AMX tiles for bf16 inference (`x` `[rows, in]`, `W` `[out, in]`), or `None` where it
/// does not apply (other dtype or device, a gradient to record, no AMX).
///
/// `W^T` is repacked into tile layout for the call (a transient copy the size of the weight,
/// made by 16 x 16 AVX-512 transposes in parallel; no packed copy is kept with the model), so
/// that output rows come out contiguous.
fn amx_product(x: &Tensor, weight: &Tensor) -> Result<Option<Tensor>> {
    if !amx::available() {
        return Ok(None);
    }
    host_product::<bf16, bf16>(x, weight, |xs, ws, rows, in_features, out_features| {
        // W^T as the right operand: element (i, o) = W[o, i].
        let packed = PackedB::new(ws, in_features, out_features, 1, in_features);
        amx::product(xs, rows, in_features, &packed, out_features, round_to_bf16)
    })
}

/// `x W^T` for f32 inference on the CPU (`x` `[rows, in]`, `W` `[out, in]`) through
/// [`crate::nn::matrix::product`], whose output is written once (candle's matmul zeroes its
/// output first: 2 % of an f32 forward), or `None` where it does not apply.
fn f32_product(x: &Tensor, weight: &Tensor) -> Result<Option<Tensor>> {
    host_product::<f32, f32>(x, weight, |xs, ws, rows, in_features, out_features| {
        Some(product(
            Matrix::rows(xs, rows, in_features),
            Matrix::rows(ws, out_features, in_features).t(),
            1.0,
        ))
    })
}

#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]` in the compute dtype, or F8E4M3 when quantised.
    pub weight: Tensor,
    /// Musubi's block-wise scales `[out, in / 64, 1]` of an F8E4M3 weight (`--fp8_scaled`).
    pub weight_scale: Option<Tensor>,
    pub adapters: Vec<LoraAdapter>,
}

impl Linear {
    pub fn new(weight: Tensor) -> Self {
        Self {
            weight,
            weight_scale: None,
            adapters: Vec::new(),
        }
    }

    /// Stores the weight as F8E4M3 (scaled block-wise or plainly cast), dequantised on use.
    pub fn quantize(&mut self, mode: crate::quant::Fp8Mode) -> Result<()> {
        if mode == crate::quant::Fp8Mode::Off || self.weight.dtype() == DType::F8E4M3 {
            return Ok(());
        }
        let quantized = crate::quant::quantize(&self.weight, mode)?;
        self.weight = quantized.values;
        self.weight_scale = quantized.scale;
        Ok(())
    }

    /// The weight in `dtype` (dequantised when stored as F8E4M3).
    pub fn dense_weight(&self, dtype: DType) -> Result<Tensor> {
        if self.weight.dtype() != DType::F8E4M3 {
            return Ok(self.weight.clone());
        }
        crate::quant::Fp8Weight {
            values: self.weight.clone(),
            scale: self.weight_scale.clone(),
        }
        .dequantize(dtype)
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// # Shapes
    /// `x`: `[..., in]` in the weight's dtype; returns `[..., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_features = self.in_features();
        let rows = x.elem_count() / in_features.max(1);
        // Flattening to 2-D lets the GEMM run as one call instead of a batched broadcast.
        let x2 = x.reshape((rows, in_features))?;
        let mut y = if crate::nn::grad_mode::enabled() {
            // The base weight is frozen: its gradient is never computed. A scaled F8E4M3 weight
            // stays fp8 in the graph and is dequantised again for the backward.
            match &self.weight_scale {
                Some(scale) if self.weight.dtype() == DType::F8E4M3 => {
                    crate::nn::trainable::fp8_frozen_linear(&x2, &self.weight, scale)?
                }
                _ => {
                    let weight = self.dense_weight(x2.dtype())?;
                    if x2.dtype() == DType::F32
                        && weight.dtype() == DType::BF16
                        && x2.device().is_cpu()
                    {
                        // bf16 mixed precision on the CPU (see `Flux2Dit::activation_dtype`).
                        crate::nn::trainable::bf16_weight_linear(&x2, &weight)?
                    } else {
                        crate::nn::trainable::frozen_linear(&x2, &weight.to_dtype(x2.dtype())?)?
                    }
                }
            }
        } else {
            let weight = self.dense_weight(x2.dtype())?;
            match amx_product(&x2, &weight)? {
                Some(y) => y,
                None => match f32_product(&x2, &weight)? {
                    Some(y) => y,
                    None => x2.matmul(&weight.t()?)?,
                },
            }
        };
        let training = crate::nn::grad_mode::enabled();
        for adapter in &self.adapters {
            let dropout = adapter
                .dropout
                .as_ref()
                .filter(|d| training && d.is_active());
            if dropout.is_some_and(|d| d.skip_module()) {
                continue;
            }
            let xa = x2.to_dtype(adapter.down.dtype())?;
            let mut down = xa.matmul(&adapter.down.t()?)?;
            let mut scale = adapter.scale;
            if let Some(dropout) = dropout {
                let batch = if dims.len() > 2 { dims[0] } else { 1 };
                let (dropped, factor) = dropout.apply(&down, batch)?;
                down = dropped;
                scale *= factor;
            }
            let update = down.matmul(&adapter.up.t()?)?;
            let dtype = y.dtype();
            y = (y + (update * scale)?.to_dtype(dtype)?)?;
        }
        let mut out_dims = dims;
        if let Some(last) = out_dims.last_mut() {
            *last = self.out_features();
        }
        Ok(y.reshape(out_dims)?)
    }

    /// Folds every adapter into the weight (computed in f32, stored in the weight's dtype).
    pub fn merge_adapters(&mut self) -> Result<()> {
        if self.adapters.is_empty() {
            return Ok(());
        }
        if self.weight.dtype() == DType::F8E4M3 {
            // Quantised weights keep their adapters unmerged (merging would need a requantisation).
            return Ok(());
        }
        let dtype = self.weight.dtype();
        let mut weight = self.weight.to_dtype(DType::F32)?;
        for adapter in self.adapters.drain(..) {
            weight = (weight + adapter.delta_weight()?)?;
        }
        self.weight = weight.to_dtype(dtype)?;
        Ok(())
    }
}
