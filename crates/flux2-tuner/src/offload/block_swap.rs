//! The block-swap schedule (Musubi `ModelOffloader`, training-and-data.md §6.2): the Linear
//! weights of the swapped blocks live in host memory and are copied to the compute device just
//! before the block runs, double-buffered: when block `i` is handed out, the copy of the block
//! needed after it starts on a worker thread, so it overlaps block `i`'s compute. At most two
//! swapped blocks are resident: the one computing and the one being prefetched.
//!
//! The order of use is predicted from a cycle:
//! - inference (gradient mode off): the swapped blocks in forward order, wrapping around to the
//!   first for the next forward (Musubi's `forward_only` mode);
//! - training (gradient mode on): forward order, then reverse order for the block-wise backward,
//!   which recomputes each block (so the weights come back in reverse), then around again.
//!
//! A request that does not match the prediction (another caller, a mode switch) drops the
//! prefetched copy and uploads synchronously: slower, never wrong.
//!
//! On the CPU the "device" copy is a fresh copy of the host tensor (new storage), so the same code
//! path runs in tests, and [`SwapLedger`] records every upload, use and release and the peak
//! number of resident swapped blocks.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::offload::split::SwapSplit;

/// Which list a block belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockKind {
    Double,
    Single,
}

/// A block of the DiT: its list and index in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockId {
    pub kind: BlockKind,
    pub index: usize,
}

impl BlockId {
    pub fn double(index: usize) -> Self {
        Self {
            kind: BlockKind::Double,
            index,
        }
    }

    pub fn single(index: usize) -> Self {
        Self {
            kind: BlockKind::Single,
            index,
        }
    }
}

/// What happened to a swapped block, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwapEvent {
    /// Its weights started to be copied to the device (prefetch or synchronous).
    Upload(BlockId),
    /// It was handed to the model to compute.
    Use(BlockId),
    /// Its device copy was dropped.
    Release(BlockId),
}

/// The Linear weights of one block, in the block's fixed Linear order: the weight and, for F8E4M3
/// weights, the block-wise scale.
pub type BlockWeights = Vec<(Tensor, Option<Tensor>)>;

/// Event log and resident counter shared by the schedule and the device copies.
#[derive(Debug, Default)]
pub struct SwapLedger {
    events: Mutex<Vec<SwapEvent>>,
    resident: AtomicUsize,
    peak: AtomicUsize,
}

impl SwapLedger {
    fn log(&self, event: SwapEvent) {
        lock(&self.events).push(event);
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<SwapEvent> {
        lock(&self.events).clone()
    }

    /// The uploads so far, in order.
    pub fn uploads(&self) -> Vec<BlockId> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                SwapEvent::Upload(id) => Some(id),
                _ => None,
            })
            .collect()
    }

    /// Forgets the events (the peak is kept).
    pub fn clear_events(&self) {
        lock(&self.events).clear();
    }

    /// Swapped blocks with a device copy right now.
    pub fn resident(&self) -> usize {
        self.resident.load(Ordering::SeqCst)
    }

    /// The most swapped blocks that had a device copy at the same time.
    pub fn peak_resident(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere cannot leave these values inconsistent: keep going.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Device memory held for one block: counted from the moment its copy starts until dropped.
#[derive(Debug)]
struct Reservation {
    id: BlockId,
    ledger: Arc<SwapLedger>,
}

impl Reservation {
    fn new(id: BlockId, ledger: &Arc<SwapLedger>) -> Self {
        ledger.log(SwapEvent::Upload(id));
        let now = ledger.resident.fetch_add(1, Ordering::SeqCst) + 1;
        ledger.peak.fetch_max(now, Ordering::SeqCst);
        Self {
            id,
            ledger: ledger.clone(),
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.ledger.resident.fetch_sub(1, Ordering::SeqCst);
        self.ledger.log(SwapEvent::Release(self.id));
    }
}

/// A block's weights on the compute device; dropping it frees them (and logs the release).
#[derive(Debug)]
pub struct UploadedWeights {
    pub weights: BlockWeights,
    _reservation: Reservation,
}

/// Copies one tensor to `device`; on the CPU a real copy into fresh storage, so that tests see
/// the same data flow as a GPU.
fn upload_tensor(tensor: &Tensor, device: &Device) -> Result<Tensor> {
    Ok(if device.is_cpu() {
        tensor.copy()?
    } else {
        tensor.to_device(device)?
    })
}

fn upload(
    weights: BlockWeights,
    device: &Device,
    reservation: Reservation,
) -> Result<UploadedWeights> {
    let weights = weights
        .iter()
        .map(|(weight, scale)| {
            Ok((
                upload_tensor(weight, device)?,
                scale
                    .as_ref()
                    .map(|s| upload_tensor(s, device))
                    .transpose()?,
            ))
        })
        .collect::<Result<_>>()?;
    Ok(UploadedWeights {
        weights,
        _reservation: reservation,
    })
}

/// A copy running on its worker thread.
struct Pending {
    id: BlockId,
    handle: JoinHandle<Result<UploadedWeights>>,
}

impl Pending {
    fn wait(self) -> Result<UploadedWeights> {
        self.handle.join().map_err(|_| {
            Error::BlockSwap(format!(
                "the copy of {:?} block {} to the device panicked",
                self.id.kind, self.id.index
            ))
        })?
    }
}

#[derive(Default)]
struct ScheduleState {
    pending: Option<Pending>,
    /// Position in the training / inference cycle of the last block handed out.
    training_position: Option<usize>,
    inference_position: Option<usize>,
}

/// The swapped blocks of a model and their copy schedule.
pub struct BlockSwap {
    split: SwapSplit,
    /// Swapped blocks in forward order: the last `split.double` double blocks, then the last
    /// `split.single` single blocks (Musubi swaps the tail of each list).
    forward_order: Vec<BlockId>,
    device: Device,
    ledger: Arc<SwapLedger>,
    state: Mutex<ScheduleState>,
}

impl std::fmt::Debug for BlockSwap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockSwap")
            .field("split", &self.split)
            .field("forward_order", &self.forward_order)
            .field("device", &self.device)
            .finish()
    }
}

impl BlockSwap {
    /// Swaps the last `split.double` of `double_blocks` and the last `split.single` of
    /// `single_blocks`, copying to `device` on use.
    pub fn new(
        split: SwapSplit,
        double_blocks: usize,
        single_blocks: usize,
        device: &Device,
    ) -> Result<Self> {
        if split.double > double_blocks || split.single > single_blocks {
            return Err(Error::InvalidArgument {
                name: "--blocks_to_swap".into(),
                message: format!(
                    "cannot swap {} double and {} single blocks of a model with {double_blocks} \
                     and {single_blocks}",
                    split.double, split.single
                ),
            });
        }
        let forward_order = (double_blocks - split.double..double_blocks)
            .map(BlockId::double)
            .chain((single_blocks - split.single..single_blocks).map(BlockId::single))
            .collect();
        Ok(Self {
            split,
            forward_order,
            device: device.clone(),
            ledger: Arc::default(),
            state: Mutex::default(),
        })
    }

    pub fn split(&self) -> SwapSplit {
        self.split
    }

    /// The compute device the weights are copied to.
    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn ledger(&self) -> &Arc<SwapLedger> {
        &self.ledger
    }

    /// True when `id`'s Linear weights live in host memory.
    pub fn is_swapped(&self, id: BlockId) -> bool {
        self.forward_order.contains(&id)
    }

    /// Swapped blocks in forward order.
    pub fn forward_order(&self) -> &[BlockId] {
        &self.forward_order
    }

    /// The predicted order of use, repeated: forward only, or forward then backward.
    fn cycle(&self, training: bool) -> Vec<BlockId> {
        let mut cycle = self.forward_order.clone();
        if training {
            cycle.extend(self.forward_order.iter().rev());
        }
        cycle
    }

    /// Hands out `id`'s weights on the device (waiting for its prefetch, or copying now when it
    /// was not predicted) and starts copying the block predicted to come next. `host_weights`
    /// returns a block's host weights.
    pub fn acquire(
        &self,
        id: BlockId,
        host_weights: impl Fn(BlockId) -> Result<BlockWeights>,
    ) -> Result<UploadedWeights> {
        let training = crate::nn::grad_mode::enabled();
        let cycle = self.cycle(training);
        let mut state = lock(&self.state);
        let previous = if training {
            state.training_position
        } else {
            state.inference_position
        };
        let start = previous.map_or(0, |p| p + 1);
        let position = (0..cycle.len())
            .map(|k| (start + k) % cycle.len())
            .find(|&j| cycle[j] == id)
            .ok_or_else(|| {
                Error::BlockSwap(format!("{:?} block {} is not swapped", id.kind, id.index))
            })?;
        if training {
            state.training_position = Some(position);
        } else {
            state.inference_position = Some(position);
        }
        let uploaded = match state.pending.take() {
            Some(pending) if pending.id == id => pending.wait()?,
            other => {
                // A wrong prediction: free its copy first so that at most two stay resident.
                if let Some(pending) = other {
                    drop(pending.wait());
                }
                let reservation = Reservation::new(id, &self.ledger);
                upload(host_weights(id)?, &self.device, reservation)?
            }
        };
        let next = cycle[(position + 1) % cycle.len()];
        let next_weights = host_weights(next)?;
        let reservation = Reservation::new(next, &self.ledger);
        let device = self.device.clone();
        let handle = std::thread::Builder::new()
            .name("block-swap-copy".into())
            .spawn(move || upload(next_weights, &device, reservation))
            .map_err(|e| Error::BlockSwap(format!("cannot start the copy thread: {e}")))?;
        state.pending = Some(Pending { id: next, handle });
        self.ledger.log(SwapEvent::Use(id));
        Ok(uploaded)
    }

    /// Drops the prefetched copy (for example before the model is saved or dropped).
    pub fn release_prefetch(&self) -> Result<()> {
        if let Some(pending) = lock(&self.state).pending.take() {
            pending.wait()?;
        }
        Ok(())
    }
}

impl Drop for BlockSwap {
    fn drop(&mut self) {
        if let Some(pending) = lock(&self.state).pending.take() {
            // Join the worker so that no copy outlives the schedule.
            drop(pending.wait());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn weights_of(id: BlockId) -> Result<BlockWeights> {
        let value = match id.kind {
            BlockKind::Double => id.index as f32,
            BlockKind::Single => 100.0 + id.index as f32,
        };
        Ok(vec![(
            Tensor::full(value, (2, 3), &Device::Cpu)?.to_dtype(DType::F32)?,
            None,
        )])
    }

    /// Forward (inference) order: ascending, the next block copied while the current one is
    /// in use, wrapping to the first; never more than two resident.
    #[test]
    fn inference_order_prefetches_one_ahead() -> Result<()> {
        let swap = BlockSwap::new(
            SwapSplit {
                double: 1,
                single: 2,
            },
            3,
            4,
            &Device::Cpu,
        )?;
        let order = swap.forward_order().to_vec();
        assert_eq!(
            order,
            vec![BlockId::double(2), BlockId::single(2), BlockId::single(3)]
        );
        for _ in 0..2 {
            for &id in &order {
                let uploaded = swap.acquire(id, weights_of)?;
                // A real, equal copy.
                let expected = weights_of(id)?[0].0.to_vec2::<f32>()?;
                assert_eq!(uploaded.weights[0].0.to_vec2::<f32>()?, expected);
                assert_eq!(swap.ledger().resident(), 2);
            }
        }
        use SwapEvent::*;
        let (d2, s2, s3) = (order[0], order[1], order[2]);
        assert_eq!(
            swap.ledger().events(),
            vec![
                Upload(d2),
                Upload(s2),
                Use(d2),
                Release(d2),
                Upload(s3),
                Use(s2),
                Release(s2),
                Upload(d2),
                Use(s3),
                Release(s3),
                Upload(s2),
                Use(d2),
                Release(d2),
                Upload(s3),
                Use(s2),
                Release(s2),
                Upload(d2),
                Use(s3),
                Release(s3),
            ]
        );
        assert_eq!(swap.ledger().peak_resident(), 2);
        swap.release_prefetch()?;
        assert_eq!(swap.ledger().resident(), 0);
        Ok(())
    }

    /// Training order: forward ascending, backward descending, one ahead.
    #[test]
    fn training_order_is_forward_then_reverse() -> Result<()> {
        let _grad = crate::nn::grad_mode::GradGuard::enable();
        let swap = BlockSwap::new(
            SwapSplit {
                double: 2,
                single: 1,
            },
            2,
            3,
            &Device::Cpu,
        )?;
        let order = swap.forward_order().to_vec();
        for &id in order.iter().chain(order.iter().rev()) {
            drop(swap.acquire(id, weights_of)?);
        }
        let (d0, d1, s2) = (BlockId::double(0), BlockId::double(1), BlockId::single(2));
        assert_eq!(order, vec![d0, d1, s2]);
        // Each upload after the first is the prefetch of the block after the one in use.
        assert_eq!(swap.ledger().uploads(), vec![d0, d1, s2, s2, d1, d0, d0]);
        assert_eq!(swap.ledger().peak_resident(), 2);
        Ok(())
    }

    /// An unpredicted request drops the prefetch and copies synchronously.
    #[test]
    fn unpredicted_request_is_served() -> Result<()> {
        let swap = BlockSwap::new(
            SwapSplit {
                double: 0,
                single: 3,
            },
            2,
            3,
            &Device::Cpu,
        )?;
        let first = swap.acquire(BlockId::single(0), weights_of)?;
        drop(first);
        // Skips single 1, which was prefetched.
        let third = swap.acquire(BlockId::single(2), weights_of)?;
        assert_eq!(third.weights[0].0.to_vec2::<f32>()?[0][0], 102.0);
        drop(third);
        use SwapEvent::*;
        let (s0, s1, s2) = (BlockId::single(0), BlockId::single(1), BlockId::single(2));
        assert_eq!(
            swap.ledger().events(),
            vec![
                Upload(s0),
                Upload(s1),
                Use(s0),
                Release(s0),
                Release(s1),
                Upload(s2),
                Upload(s0),
                Use(s2),
                Release(s2)
            ]
        );
        assert!(swap.acquire(BlockId::double(0), weights_of).is_err());
        Ok(())
    }
}
