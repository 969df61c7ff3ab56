//! A bias-free linear layer (FLUX.2 has no biases) that can carry LoRA adapters, applied either
//! unmerged (extra low-rank matmuls) or merged into the weight.

use candle_core::{DType, Tensor};

use crate::error::Result;

/// A low-rank update `scale * up @ down` attached to a [`Linear`].
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// `[rank, in]`
    pub down: Tensor,
    /// `[out, rank]`
    pub up: Tensor,
    /// `multiplier * alpha / rank`.
    pub scale: f64,
}

impl LoraAdapter {
    /// The dense update `scale * up @ down`, `[out, in]`, in f32.
    pub fn delta_weight(&self) -> Result<Tensor> {
        let up = self.up.to_dtype(DType::F32)?;
        let down = self.down.to_dtype(DType::F32)?;
        Ok((up.matmul(&down)? * self.scale)?)
    }
}

/// `y = x W^T (+ LoRA)`; the weight is `[out, in]` as stored in the checkpoint.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub adapters: Vec<LoraAdapter>,
}

impl Linear {
    pub fn new(weight: Tensor) -> Self {
        Self {
            weight,
            adapters: Vec::new(),
        }
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
        let mut y = x2.matmul(&self.weight.t()?)?;
        for adapter in &self.adapters {
            let xa = x2.to_dtype(adapter.down.dtype())?;
            let update = xa.matmul(&adapter.down.t()?)?.matmul(&adapter.up.t()?)?;
            let dtype = y.dtype();
            y = (y + (update * adapter.scale)?.to_dtype(dtype)?)?;
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
        let dtype = self.weight.dtype();
        let mut weight = self.weight.to_dtype(DType::F32)?;
        for adapter in self.adapters.drain(..) {
            weight = (weight + adapter.delta_weight()?)?;
        }
        self.weight = weight.to_dtype(dtype)?;
        Ok(())
    }
}
