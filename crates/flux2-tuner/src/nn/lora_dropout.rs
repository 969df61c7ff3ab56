//! LoRA dropouts during training (Musubi `networks/lora.py` `LoRAModule.forward`):
//! `network_dropout` on the down-projection outputs, `rank_dropout` (a mask per sample and rank,
//! the scale compensated by `1 / (1 - p)`) and `module_dropout` (the whole update skipped with
//! probability `p`). Masks come from a seeded generator whose state is saved with the training
//! state, so a resumed run draws the same masks.

use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::util::rng::SeededRng;

/// The dropout settings of a LoRA network and their random source.
#[derive(Debug)]
pub struct LoraDropout {
    pub network: Option<f64>,
    pub rank: Option<f64>,
    pub module: Option<f64>,
    rng: Mutex<SeededRng>,
}

impl LoraDropout {
    pub fn new(
        network: Option<f64>,
        rank: Option<f64>,
        module: Option<f64>,
        seed: u64,
    ) -> Result<Self> {
        for (name, p) in [
            ("--network_dropout", network),
            ("rank_dropout", rank),
            ("module_dropout", module),
        ] {
            if let Some(p) = p {
                if !(0.0..1.0).contains(&p) {
                    return Err(Error::InvalidArgument {
                        name: name.into(),
                        message: format!("{p} is not a probability in [0, 1)"),
                    });
                }
            }
        }
        Ok(Self {
            network,
            rank,
            module,
            rng: Mutex::new(SeededRng::new(seed)),
        })
    }

    /// True when any dropout is set.
    pub fn is_active(&self) -> bool {
        self.network.is_some() || self.rank.is_some() || self.module.is_some()
    }

    fn with_rng<T>(&self, f: impl FnOnce(&mut SeededRng) -> T) -> T {
        let mut guard = self
            .rng
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut guard)
    }

    /// The generator state (for the training state).
    pub fn rng_state(&self) -> (u64, Option<f64>) {
        self.with_rng(|rng| rng.state())
    }

    /// Restores a saved generator state.
    pub fn set_rng_state(&self, state: (u64, Option<f64>)) {
        self.with_rng(|rng| *rng = SeededRng::from_state(state.0, state.1));
    }

    /// Whether this call skips the module.
    pub fn skip_module(&self) -> bool {
        self.module
            .is_some_and(|p| self.with_rng(|rng| rng.uniform()) < p)
    }

    /// A `[rows, columns]` mask of kept (1) and dropped (0) entries, kept with probability `1 - p`.
    pub fn mask(&self, rows: usize, columns: usize, p: f64, device: &Device) -> Result<Tensor> {
        let values: Vec<f32> = self.with_rng(|rng| {
            (0..rows * columns)
                .map(|_| if rng.uniform() < p { 0.0 } else { 1.0 })
                .collect()
        });
        Ok(Tensor::from_vec(values, (rows, columns), device)?)
    }

    /// Applies network and rank dropout to the down-projection output `[batch * length, rank]`;
    /// returns it and the factor the scale is multiplied by.
    pub fn apply(&self, down: &Tensor, batch: usize) -> Result<(Tensor, f64)> {
        let (rows, rank) = down.dims2()?;
        let mut down = down.clone();
        if let Some(p) = self.network {
            let mask = self
                .mask(rows, rank, p, down.device())?
                .to_dtype(down.dtype())?;
            down = ((down * mask)? / (1.0 - p))?;
        }
        let mut factor = 1.0;
        if let Some(p) = self.rank {
            // One mask per sample and rank, shared by every token of the sample.
            let length = rows / batch.max(1);
            let mask = self
                .mask(batch, rank, p, down.device())?
                .to_dtype(DType::F32)?
                .unsqueeze(1)?
                .broadcast_as((batch, length, rank))?
                .reshape((rows, rank))?
                .to_dtype(down.dtype())?;
            down = (down * mask)?;
            factor = 1.0 / (1.0 - p);
        }
        Ok((down, factor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_dropout_masks_whole_ranks_per_sample() -> Result<()> {
        let dropout = LoraDropout::new(None, Some(0.5), None, 3)?;
        let down = Tensor::ones((2 * 5, 8), DType::F32, &Device::Cpu)?;
        let (masked, factor) = dropout.apply(&down, 2)?;
        assert_eq!(factor, 2.0);
        let values: Vec<Vec<f32>> = masked.to_vec2()?;
        for sample in 0..2 {
            for token in 1..5 {
                assert_eq!(
                    values[sample * 5 + token],
                    values[sample * 5],
                    "tokens of a sample share the mask"
                );
            }
        }
        let kept: f32 = values.iter().flatten().sum();
        assert!(kept > 0.0 && kept < 80.0);
        assert!(LoraDropout::new(Some(1.5), None, None, 0).is_err());
        Ok(())
    }

    #[test]
    fn network_dropout_keeps_the_expectation() -> Result<()> {
        let dropout = LoraDropout::new(Some(0.25), None, None, 4)?;
        let down = Tensor::ones((200, 50), DType::F32, &Device::Cpu)?;
        let (masked, factor) = dropout.apply(&down, 1)?;
        assert_eq!(factor, 1.0);
        let mean = masked.mean_all()?.to_scalar::<f32>()?;
        assert!((mean - 1.0).abs() < 0.05, "{mean}");
        Ok(())
    }
}
