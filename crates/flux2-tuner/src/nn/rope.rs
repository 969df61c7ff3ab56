//! Rotary position embedding over several axes, rotating interleaved pairs `(x[2i], x[2i+1])`
//! (BFL `EmbedND`, `rope`, `apply_rope`). Angles are computed in f64 as Musubi and diffusers do,
//! then rounded to f32.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Cos and sin tables, each `[b, l, head_dim / 2]` in f32.
#[derive(Debug, Clone)]
pub struct RopeTables {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl RopeTables {
    /// Builds the tables for integer position ids `[b, l, axes]`.
    ///
    /// For axis `a` of width `d_a`, frequency `j < d_a / 2`: `omega = theta^(-2j / d_a)` and the
    /// angle is `position * omega`. The axes' frequencies are laid side by side in axis order.
    pub fn new(position_ids: &Tensor, axes_dim: &[usize], theta: f64) -> Result<Self> {
        let (batch, length, axes) = position_ids.dims3()?;
        if axes != axes_dim.len() {
            return Err(Error::Shape(format!(
                "position ids have {axes} axes but the model has {} RoPE axes",
                axes_dim.len()
            )));
        }
        let ids: Vec<i64> = position_ids
            .to_dtype(DType::I64)?
            .flatten_all()?
            .to_vec1()?;
        let omegas: Vec<(usize, f64)> = axes_dim
            .iter()
            .enumerate()
            .flat_map(|(axis, &width)| {
                (0..width / 2).map(move |j| (axis, theta.powf(-((2 * j) as f64) / width as f64)))
            })
            .collect();
        let half = omegas.len();
        let mut cos = Vec::with_capacity(batch * length * half);
        let mut sin = Vec::with_capacity(batch * length * half);
        for token in ids.chunks_exact(axes) {
            for &(axis, omega) in &omegas {
                let angle = token[axis] as f64 * omega;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let device = position_ids.device();
        Ok(Self {
            cos: Tensor::from_vec(cos, (batch, length, half), device)?,
            sin: Tensor::from_vec(sin, (batch, length, half), device)?,
        })
    }

    /// Concatenates two tables along the sequence axis (text first, then image).
    pub fn cat(first: &Self, second: &Self) -> Result<Self> {
        Ok(Self {
            cos: Tensor::cat(&[&first.cos, &second.cos], 1)?,
            sin: Tensor::cat(&[&first.sin, &second.sin], 1)?,
        })
    }

    /// Rotates `x` `[b, heads, l, head_dim]` in f32 and returns it in `x`'s dtype.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        if crate::nn::grad_mode::enabled() {
            let x32 = x.to_dtype(DType::F32)?;
            return Ok(
                crate::nn::trainable::apply_rope(&x32, &self.cos, &self.sin)?.to_dtype(dtype)?,
            );
        }
        let x32 = x.to_dtype(DType::F32)?.contiguous()?;
        let rotated = candle_nn::rotary_emb::rope_i(&x32, &self.cos, &self.sin)?;
        Ok(rotated.to_dtype(dtype)?)
    }
}

/// Position ids on a device from host values `[b, l, axes]`.
pub fn position_ids_tensor(
    values: Vec<i64>,
    batch: usize,
    length: usize,
    device: &Device,
) -> Result<Tensor> {
    Ok(Tensor::from_vec(values, (batch, length, 4), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rotation of one pair by the angle `position * theta^0 = position`.
    #[test]
    fn rotates_interleaved_pairs() -> Result<()> {
        let device = Device::Cpu;
        let ids = Tensor::new(&[[[0i64, 0, 0, 1]]], &device)?; // l-axis position 1
        let tables = RopeTables::new(&ids, &[2, 2, 2, 2], 10.0)?;
        let x = Tensor::new(&[1f32, 0., 1., 0., 1., 0., 1., 0.], &device)?.reshape((1, 1, 1, 8))?;
        let y: Vec<f32> = tables.apply(&x)?.flatten_all()?.to_vec1()?;
        // The first three axes sit at position 0 (identity); the last is rotated by 1 radian.
        assert_eq!(&y[..6], &[1., 0., 1., 0., 1., 0.]);
        assert!((y[6] - 1f32.cos()).abs() < 1e-6 && (y[7] - 1f32.sin()).abs() < 1e-6);
        Ok(())
    }
}
