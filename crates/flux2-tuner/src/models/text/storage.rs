//! Where and in what form the text encoder's weights are kept, and how they are turned into
//! compute tensors when used: plain (compute dtype on the compute device), `fp8_text_encoder`
//! (projection weights stored as F8E4M3 and dequantised on use, Musubi's plain cast without
//! scaling), and layer streaming (weights kept in host memory and copied to the device one layer
//! at a time, so the GPU holds one decoder layer instead of the whole stack).

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::{Checkpoint, StorageDtype};
use crate::error::Result;

/// How the text encoder is stored and run.
#[derive(Debug, Clone)]
pub struct WeightPlacement {
    /// Device the forward pass runs on.
    pub device: Device,
    /// Activation dtype (F32 or BF16).
    pub dtype: DType,
    /// Store the linear projections as F8E4M3 (`--fp8_text_encoder`).
    pub fp8: bool,
    /// Keep decoder weights and the embedding in host memory and copy them to `device` when used.
    pub stream_layers: bool,
}

impl WeightPlacement {
    /// Plain storage: everything in `dtype` on `device`.
    pub fn new(device: Device, dtype: DType) -> Self {
        Self {
            device,
            dtype,
            fp8: false,
            stream_layers: false,
        }
    }

    /// The device weights live on between uses.
    pub fn storage_device(&self) -> Device {
        if self.stream_layers {
            Device::Cpu
        } else {
            self.device.clone()
        }
    }
}

/// One weight in its storage form.
#[derive(Debug, Clone)]
pub struct StoredWeight {
    tensor: Tensor,
}

impl StoredWeight {
    /// Loads `key`; `quantise` marks the tensors that `fp8` stores as F8E4M3 (linear weights).
    pub fn load(
        checkpoint: &Checkpoint,
        key: &str,
        placement: &WeightPlacement,
        quantise: bool,
    ) -> Result<Self> {
        let storage_device = placement.storage_device();
        let tensor = if quantise && placement.fp8 {
            let stored_as_fp8 = checkpoint
                .entry(key)
                .is_some_and(|(_, entry)| entry.dtype == StorageDtype::F8E4M3);
            let host = if stored_as_fp8 {
                checkpoint.load(key, DType::F8E4M3, &Device::Cpu)?
            } else {
                // Round to nearest on the host (candle's F32 -> F8E4M3 cast), as torch's `.to()`.
                checkpoint
                    .load(key, DType::F32, &Device::Cpu)?
                    .to_dtype(DType::F8E4M3)?
            };
            host.to_device(&storage_device)?
        } else {
            checkpoint.load(key, placement.dtype, &storage_device)?
        };
        Ok(Self { tensor })
    }

    /// Wraps a tensor that is already in its storage form.
    pub fn from_tensor(tensor: Tensor) -> Self {
        Self { tensor }
    }

    /// The stored tensor (F8E4M3 or the compute dtype; host or device).
    pub fn stored(&self) -> &Tensor {
        &self.tensor
    }

    /// The weight on the compute device in the compute dtype.
    pub fn get(&self, placement: &WeightPlacement) -> Result<Tensor> {
        // Copy first (the fp8 form is the smaller one to move), then dequantise on the device.
        let tensor = self.tensor.to_device(&placement.device)?;
        if tensor.dtype() == placement.dtype {
            return Ok(tensor);
        }
        // candle converts F8E4M3 through F32 on every backend.
        Ok(tensor.to_dtype(DType::F32)?.to_dtype(placement.dtype)?)
    }

    /// Bytes held by the stored form.
    pub fn bytes(&self) -> usize {
        self.tensor.elem_count() * self.tensor.dtype().size_in_bytes()
    }
}
