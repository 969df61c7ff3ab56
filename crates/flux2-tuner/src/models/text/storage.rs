//! Where and in what form the text encoder's weights are kept, and how they are turned into
//! compute tensors when used: plain (compute dtype on the compute device), `fp8_text_encoder`
//! (projection weights stored as F8E4M3 and dequantised on use, Musubi's plain cast without
//! scaling), and layer streaming (projections read from the memory-mapped file, or from host
//! memory under fp8, and copied to the device one layer at a time, so the GPU holds one decoder
//! layer instead of the whole stack).

use std::sync::Arc;

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

/// What a weight is, which decides how it is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightRole {
    /// A linear projection: F8E4M3 under `fp8`; read from the file on each use when streaming.
    Projection,
    /// A norm scale or the embedding table: always in the compute dtype.
    Dense,
}

/// Where a weight's values are between uses.
#[derive(Clone)]
enum Storage {
    /// A tensor on the storage device (F8E4M3 or the compute dtype).
    Tensor(Tensor),
    /// Nothing held: the tensor is read from the memory-mapped checkpoint when used, so streaming
    /// a bf16 model needs no host copy beyond the page cache.
    Mapped {
        checkpoint: Arc<Checkpoint>,
        key: String,
    },
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Storage::Tensor(tensor) => f.debug_tuple("Tensor").field(tensor).finish(),
            Storage::Mapped { checkpoint, key } => f
                .debug_struct("Mapped")
                .field("file", &checkpoint.path())
                .field("key", key)
                .finish(),
        }
    }
}

/// One weight in its storage form.
#[derive(Debug, Clone)]
pub struct StoredWeight {
    storage: Storage,
}

impl StoredWeight {
    /// Loads `key` as its `role` and `placement` say.
    pub fn load(
        checkpoint: &Arc<Checkpoint>,
        key: &str,
        placement: &WeightPlacement,
        role: WeightRole,
    ) -> Result<Self> {
        let storage_device = placement.storage_device();
        let quantise = role == WeightRole::Projection && placement.fp8;
        if role == WeightRole::Projection && placement.stream_layers && !quantise {
            // Fail now rather than mid-forward if the key is not there.
            checkpoint.shape(key)?;
            return Ok(Self {
                storage: Storage::Mapped {
                    checkpoint: Arc::clone(checkpoint),
                    key: key.to_string(),
                },
            });
        }
        let tensor = if quantise {
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
        Ok(Self {
            storage: Storage::Tensor(tensor),
        })
    }

    /// The tensor held between uses, if any (`None` when read from the file on use).
    pub fn stored(&self) -> Option<&Tensor> {
        match &self.storage {
            Storage::Tensor(tensor) => Some(tensor),
            Storage::Mapped { .. } => None,
        }
    }

    /// The tensor held between uses, or an error naming the key when it is read on use.
    pub fn get_stored(&self) -> Result<&Tensor> {
        match &self.storage {
            Storage::Tensor(tensor) => Ok(tensor),
            Storage::Mapped { key, .. } => Err(crate::error::Error::Shape(format!(
                "`{key}` is read from the file on use and has no stored tensor"
            ))),
        }
    }

    /// The weight on the compute device in the compute dtype.
    pub fn get(&self, placement: &WeightPlacement) -> Result<Tensor> {
        let tensor = match &self.storage {
            Storage::Tensor(tensor) => tensor,
            Storage::Mapped { checkpoint, key } => {
                return checkpoint.load(key, placement.dtype, &placement.device)
            }
        };
        // Copy first (the fp8 form is the smaller one to move), then dequantise on the device.
        let tensor = tensor.to_device(&placement.device)?;
        if tensor.dtype() == placement.dtype {
            return Ok(tensor);
        }
        // candle converts F8E4M3 through F32 on every backend.
        Ok(tensor.to_dtype(DType::F32)?.to_dtype(placement.dtype)?)
    }

    /// Bytes held between uses (nothing for weights read from the file on use).
    pub fn bytes(&self) -> usize {
        self.stored()
            .map_or(0, |t| t.elem_count() * t.dtype().size_in_bytes())
    }
}
