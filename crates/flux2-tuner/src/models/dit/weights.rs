//! Loading DiT tensors from a validated checkpoint in the compute dtype; with fp8 on, each block
//! linear (Musubi's fp8 targets) is quantised as soon as it is read, so the full-precision copy of
//! the model never exists (Musubi `load_safetensors_with_fp8_optimization` does the same per key).

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::nn::Linear;
use crate::quant::{is_fp8_target, Fp8Mode};

/// A checkpoint plus the device and dtype its tensors are loaded as.
pub struct DitWeights<'a> {
    pub checkpoint: &'a Checkpoint,
    pub device: Device,
    pub dtype: DType,
    /// How the fp8 targets (`double_blocks`/`single_blocks` linears) are stored.
    pub fp8: Fp8Mode,
}

impl DitWeights<'_> {
    /// Loads `key` in the compute dtype.
    pub fn tensor(&self, key: &str) -> Result<Tensor> {
        self.checkpoint.load(key, self.dtype, &self.device)
    }

    /// A bias-free linear layer `{prefix}.weight`, quantised right away when it is an fp8 target.
    pub fn linear(&self, prefix: &str) -> Result<Linear> {
        let key = format!("{prefix}.weight");
        let mut linear = Linear::new(self.tensor(&key)?);
        if self.fp8 != Fp8Mode::Off && is_fp8_target(&key) {
            linear.quantize(self.fp8)?;
        }
        Ok(linear)
    }
}
