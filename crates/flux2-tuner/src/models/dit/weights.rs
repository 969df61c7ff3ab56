//! Loading DiT tensors from a validated checkpoint in the compute dtype.

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::nn::Linear;

/// A checkpoint plus the device and dtype its tensors are loaded as.
pub struct DitWeights<'a> {
    pub checkpoint: &'a Checkpoint,
    pub device: Device,
    pub dtype: DType,
}

impl DitWeights<'_> {
    /// Loads `key` in the compute dtype.
    pub fn tensor(&self, key: &str) -> Result<Tensor> {
        self.checkpoint.load(key, self.dtype, &self.device)
    }

    /// A bias-free linear layer `{prefix}.weight`.
    pub fn linear(&self, prefix: &str) -> Result<Linear> {
        Ok(Linear::new(self.tensor(&format!("{prefix}.weight"))?))
    }
}
