//! LoRA dropout replay for the block-wise backward paths (`train::step`'s checkpointed autograd
//! and `train::direct` with checkpointing): a block recomputed in the backward must draw the
//! dropout masks of its forward.

use crate::models::dit::Flux2Dit;

/// The LoRA dropout generator states at the start of each block's forward, so that the block's
/// recompute in the backward draws the same masks (its gradients then belong to the forward that
/// gave the loss). Only block linears carry LoRA (`NetworkConfig::targets`).
pub(crate) struct DropoutReplay {
    dropout: Option<std::sync::Arc<crate::nn::lora_dropout::LoraDropout>>,
    states: Vec<(u64, Option<f64>)>,
}

impl DropoutReplay {
    /// Finds the generator the network shares between the block adapters (none when no dropout
    /// is set).
    pub(crate) fn new(dit: &Flux2Dit) -> Self {
        let dropout = dit
            .block_linears()
            .flat_map(|linear| &linear.adapters)
            .find_map(|adapter| adapter.dropout.clone())
            .filter(|dropout| dropout.is_active());
        Self {
            dropout,
            states: Vec::new(),
        }
    }

    pub(crate) fn state(&self) -> Option<(u64, Option<f64>)> {
        self.dropout.as_ref().map(|dropout| dropout.rng_state())
    }

    /// Before a block's forward.
    pub(crate) fn record(&mut self) {
        if let Some(state) = self.state() {
            self.states.push(state);
        }
    }

    /// Before the recompute of the last recorded block not yet replayed (blocks run backwards).
    pub(crate) fn replay_last(&mut self) {
        if let (Some(dropout), Some(state)) = (&self.dropout, self.states.pop()) {
            dropout.set_rng_state(state);
        }
    }

    /// After the backward: the state the forward ended in, as after a full backward (which draws
    /// nothing), so a resumed run stays exact.
    pub(crate) fn restore(&self, state: Option<(u64, Option<f64>)>) {
        if let (Some(dropout), Some(state)) = (&self.dropout, state) {
            dropout.set_rng_state(state);
        }
    }
}
