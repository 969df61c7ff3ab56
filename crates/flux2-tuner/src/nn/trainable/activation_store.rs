//! Where block-level gradient checkpointing keeps the block inputs it saves: on the compute device
//! (PyTorch checkpointing, `--gradient_checkpointing`) or in host memory (Musubi
//! `--gradient_checkpointing_cpu_offload`, `create_cpu_offloading_wrapper`: the block-boundary
//! activations are moved to the CPU after each block and back to the device for the recompute).
//! The store counts the bytes it holds on each side, so the saving can be checked and planned; on
//! a CPU-only machine the move is a no-op but the accounting is the same.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::error::Result;

/// Bytes held now and at most.
#[derive(Debug, Default)]
struct Counter {
    held: AtomicUsize,
    peak: AtomicUsize,
}

impl Counter {
    fn add(&self, bytes: usize) {
        let held = self.held.fetch_add(bytes, Ordering::SeqCst) + bytes;
        self.peak.fetch_max(held, Ordering::SeqCst);
    }

    fn remove(&self, bytes: usize) {
        self.held.fetch_sub(bytes, Ordering::SeqCst);
    }
}

/// Saves tensors on the device or in host memory and counts what it holds.
#[derive(Debug, Clone, Default)]
pub struct ActivationStore {
    offload: bool,
    device: Arc<Counter>,
    host: Arc<Counter>,
}

/// A saved tensor; dropping it releases its bytes from the store's count.
#[derive(Debug)]
pub struct Stored {
    tensor: Tensor,
    /// Where the tensor is computed with (and restored to).
    origin: Device,
    bytes: usize,
    counter: Option<Arc<Counter>>,
}

impl Drop for Stored {
    fn drop(&mut self) {
        if let Some(counter) = &self.counter {
            counter.remove(self.bytes);
        }
    }
}

impl Stored {
    /// `tensor` kept where it is, counted by no store (plain [`checkpointed`](super::checkpointed)).
    pub fn untracked(tensor: &Tensor) -> Self {
        Self {
            tensor: tensor.detach(),
            origin: tensor.device().clone(),
            bytes: byte_size(tensor),
            counter: None,
        }
    }

    /// The tensor on the device it came from (a copy back when it was offloaded).
    pub fn restore(&self) -> Result<Tensor> {
        Ok(self.tensor.to_device(&self.origin)?)
    }

    /// Size of the saved data.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The held tensor (in host memory when offloaded).
    pub fn held(&self) -> &Tensor {
        &self.tensor
    }
}

fn byte_size(tensor: &Tensor) -> usize {
    tensor.elem_count() * tensor.dtype().size_in_bytes()
}

impl ActivationStore {
    /// Keeps saved tensors on their device (plain gradient checkpointing).
    pub fn on_device() -> Self {
        Self::default()
    }

    /// Moves saved tensors to host memory (`--gradient_checkpointing_cpu_offload`).
    pub fn offloading() -> Self {
        Self {
            offload: true,
            ..Self::default()
        }
    }

    /// Whether saved tensors go to host memory.
    pub fn offloads(&self) -> bool {
        self.offload
    }

    /// Saves a detached `tensor`: a host copy when offloading (on the CPU the same storage), the
    /// tensor itself otherwise.
    pub fn save(&self, tensor: &Tensor) -> Result<Stored> {
        let bytes = byte_size(tensor);
        let (held, counter) = if self.offload {
            (tensor.detach().to_device(&Device::Cpu)?, &self.host)
        } else {
            (tensor.detach(), &self.device)
        };
        counter.add(bytes);
        Ok(Stored {
            tensor: held,
            origin: tensor.device().clone(),
            bytes,
            counter: Some(counter.clone()),
        })
    }

    /// `stored`'s tensor on `device` (the device it is computed on).
    pub fn restore(&self, stored: &Stored, device: &Device) -> Result<Tensor> {
        Ok(stored.tensor.to_device(device)?)
    }

    /// Bytes of saved tensors on the compute device now.
    pub fn device_bytes(&self) -> usize {
        self.device.held.load(Ordering::SeqCst)
    }

    /// The most bytes of saved tensors held on the compute device at once.
    pub fn peak_device_bytes(&self) -> usize {
        self.device.peak.load(Ordering::SeqCst)
    }

    /// Bytes of saved tensors in host memory now.
    pub fn host_bytes(&self) -> usize {
        self.host.held.load(Ordering::SeqCst)
    }

    /// The most bytes of saved tensors held in host memory at once.
    pub fn peak_host_bytes(&self) -> usize {
        self.host.peak.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::trainable::test_support::random;
    use candle_core::DType;

    #[test]
    fn counts_bytes_on_the_side_it_saves_to() -> Result<()> {
        let a = random(&[3, 5], 1, DType::F32)?;
        let b = random(&[2, 4], 2, DType::BF16)?;
        for store in [ActivationStore::on_device(), ActivationStore::offloading()] {
            let saved_a = store.save(&a)?;
            let saved_b = store.save(&b)?;
            let (held, other) = if store.offloads() {
                (store.host_bytes(), store.device_bytes())
            } else {
                (store.device_bytes(), store.host_bytes())
            };
            assert_eq!(held, 15 * 4 + 8 * 2);
            assert_eq!(other, 0);
            assert!(saved_a.held().device().is_cpu());
            let restored = store.restore(&saved_b, &Device::Cpu)?;
            assert_eq!(
                restored.to_dtype(DType::F32)?.to_vec2::<f32>()?,
                b.to_dtype(DType::F32)?.to_vec2::<f32>()?
            );
            assert_eq!(saved_a.restore()?.to_vec2::<f32>()?, a.to_vec2::<f32>()?);
            drop(saved_a);
            let peak = store.peak_device_bytes() + store.peak_host_bytes();
            assert_eq!(peak, 76);
            assert_eq!(store.device_bytes() + store.host_bytes(), 16);
            drop(saved_b);
            assert_eq!(store.device_bytes() + store.host_bytes(), 0);
        }
        Ok(())
    }
}
