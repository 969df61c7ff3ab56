//! bitsandbytes' block-wise dynamic 8-bit quantisation of optimiser states
//! (`functional.create_dynamic_map`, `quantize_blockwise` / `dequantize_blockwise` with the
//! blocksize of 256 its 8-bit optimisers use): each block of 256 values is scaled by its
//! absolute maximum and each scaled value stored as the index of the nearest entry of a
//! 256-entry map.

use candle_core::{DType, Device, Tensor, D};

use crate::error::Result;

/// Values per quantisation block (bitsandbytes `Optimizer2State.init_state`).
pub const BLOCK_SIZE: usize = 256;

/// `torch.linspace(start, end, steps, dtype=float32)` on the CPU: an f32 step, each value
/// `start + step·i` rounded once to f32 (the compiled kernel fuses the multiply-add), the second
/// half counted back from `end`.
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                (start as f64 + step as f64 * i as f64) as f32
            } else {
                (end as f64 - step as f64 * (steps - i - 1) as f64) as f32
            }
        })
        .collect()
}

/// `create_dynamic_map(signed)` with 7 exponent bits over 8 bits: for exponents 10^-6..10^0 the
/// midpoints of an f32 linspace over [0.1, 1] (mirrored for the signed map), plus 0 and 1,
/// sorted. The signed map quantises the first moment, the unsigned one the second.
pub fn dynamic_map(signed: bool) -> Vec<f32> {
    let exponent_bits = 7;
    let mut values: Vec<f32> = Vec::with_capacity(256);
    for i in 0..exponent_bits {
        let items = if signed {
            (1usize << i) + 1
        } else {
            (1usize << (i + 1)) + 1
        };
        let boundaries = linspace_f32(0.1, 1.0, items);
        // Python's `10 ** k` times an f32 tensor: an f32 product.
        let scale: f32 = format!("1e{}", i - (exponent_bits - 1))
            .parse()
            .unwrap_or(1.0);
        for pair in boundaries.windows(2) {
            let mean = (pair[0] + pair[1]) / 2.0;
            values.push(scale * mean);
            if signed {
                values.push(-scale * mean);
            }
        }
    }
    values.push(0.0);
    values.push(1.0);
    let mut map = values;
    map.resize(256, 0.0);
    map.sort_by(f32::total_cmp);
    map
}

/// A quantisation map on a device, with the decision boundaries between its entries.
pub struct QuantizationMap {
    /// The 256 values, sorted.
    pub values: Tensor,
    /// `(values[i] + values[i+1]) / 2` for i < 255, padded with +inf to 256 entries.
    boundaries: Tensor,
}

impl QuantizationMap {
    pub fn new(map: &[f32], device: &Device) -> Result<Self> {
        let mut boundaries: Vec<f32> = map.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        boundaries.push(f32::INFINITY);
        Ok(Self {
            values: Tensor::from_slice(map, map.len(), device)?,
            boundaries: Tensor::from_slice(&boundaries, boundaries.len(), device)?,
        })
    }
}

/// One 8-bit state: codes in the parameter's shape and one absmax per block.
#[derive(Clone)]
pub struct QuantizedState {
    pub codes: Tensor,
    pub absmax: Tensor,
}

/// Number of blocks for `elements` values.
pub fn block_count(elements: usize) -> usize {
    elements.div_ceil(BLOCK_SIZE)
}

/// `values` (flat, f32) zero-padded to whole blocks and shaped `[blocks, 256]`.
fn as_blocks(values: &Tensor) -> Result<Tensor> {
    let elements = values.elem_count();
    let blocks = block_count(elements);
    let padding = blocks * BLOCK_SIZE - elements;
    let flat = values.flatten_all()?;
    let padded = if padding > 0 {
        Tensor::cat(
            &[&flat, &Tensor::zeros(padding, DType::F32, values.device())?],
            0,
        )?
    } else {
        flat
    };
    Ok(padded.reshape((blocks, BLOCK_SIZE))?)
}

impl QuantizedState {
    /// The all-zero state of a parameter of `shape` (codes 0 with absmax 0 decode to 0).
    pub fn zeros(shape: &[usize], device: &Device) -> Result<Self> {
        let elements: usize = shape.iter().product();
        Ok(Self {
            codes: Tensor::zeros(shape, DType::U8, device)?,
            absmax: Tensor::zeros(block_count(elements), DType::F32, device)?,
        })
    }

    /// `map[code] * absmax[block]` in the parameter's shape.
    pub fn dequantize(&self, map: &QuantizationMap) -> Result<Tensor> {
        let shape = self.codes.dims().to_vec();
        let elements = self.codes.elem_count();
        let codes = self.codes.flatten_all()?.to_dtype(DType::U32)?;
        let values = map.values.index_select(&codes, 0)?;
        let scaled = as_blocks(&values)?.broadcast_mul(&self.absmax.unsqueeze(1)?)?;
        Ok(scaled
            .flatten_all()?
            .narrow(0, 0, elements)?
            .reshape(shape)?)
    }

    /// Quantises `values` (f32) as bitsandbytes' pure-PyTorch reference kernel: per block the
    /// absmax, each value divided by it, to the nearest map entry (the lower one on a tie).
    /// (Its CUDA kernel and native CPU library search the map approximately instead.)
    pub fn quantize(values: &Tensor, map: &QuantizationMap) -> Result<Self> {
        let shape = values.dims().to_vec();
        let elements = values.elem_count();
        let blocks = as_blocks(values)?;
        let absmax = blocks.abs()?.max(D::Minus1)?;
        // An all-zero block keeps absmax 1 (its values quantise to the 0 entry either way).
        let absmax = (&absmax + absmax.eq(0f32)?.to_dtype(DType::F32)?)?;
        let scaled = blocks
            .broadcast_div(&absmax.unsqueeze(1)?)?
            .clamp(-1f32, 1f32)?
            .flatten_all()?
            .narrow(0, 0, elements)?;
        // Binary search for the number of boundaries below each value.
        let mut code = Tensor::zeros(elements, DType::F32, values.device())?;
        for bit in (0..8).rev() {
            let stride = (1u32 << bit) as f64;
            let index = code.affine(1.0, stride - 1.0)?.to_dtype(DType::U32)?;
            let boundary = map.boundaries.index_select(&index, 0)?;
            let above = boundary.lt(&scaled)?.to_dtype(DType::F32)?;
            code = (code + above.affine(stride, 0.0)?)?;
        }
        Ok(Self {
            codes: code.to_dtype(DType::U8)?.reshape(shape)?,
            absmax,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_have_256_sorted_entries_from_minus_one_or_zero_to_one() {
        let signed = dynamic_map(true);
        let unsigned = dynamic_map(false);
        assert_eq!(signed.len(), 256);
        assert!(
            (signed[0] as f64 + 0.99296875).abs() < 1e-7,
            "{}",
            signed[0]
        );
        assert_eq!(signed[255], 1.0);
        assert_eq!(unsigned[0], 0.0);
        assert_eq!(unsigned[255], 1.0);
        assert!(signed.windows(2).all(|w| w[0] <= w[1]));
        // The smallest non-zero magnitude is 10^-6 times the first midpoint (0.55).
        assert!(signed.iter().any(|v| (*v - 5.5e-7).abs() < 1e-12));
    }

    #[test]
    fn quantisation_rounds_to_the_nearest_entry_per_block() {
        let device = Device::Cpu;
        let map = dynamic_map(true);
        let quantization = QuantizationMap::new(&map, &device).unwrap();
        // Two blocks: the second block has a different absmax.
        let mut values: Vec<f32> = (0..300).map(|i| ((i as f32) * 0.37).sin()).collect();
        values[280] = 8.0;
        let tensor = Tensor::from_slice(&values, 300, &device).unwrap();
        let state = QuantizedState::quantize(&tensor, &quantization).unwrap();
        let absmax = state.absmax.to_vec1::<f32>().unwrap();
        assert_eq!(absmax.len(), 2);
        assert_eq!(absmax[1], 8.0);
        let codes = state.codes.to_vec1::<u8>().unwrap();
        for (i, value) in values.iter().enumerate() {
            let scaled = value / absmax[i / 256];
            let nearest = map
                .iter()
                .map(|m| (m - scaled).abs())
                .fold(f32::INFINITY, f32::min);
            assert_eq!(
                (map[codes[i] as usize] - scaled).abs(),
                nearest,
                "value {i}"
            );
        }
        let decoded = state
            .dequantize(&quantization)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(decoded[280], 8.0);
    }
}
