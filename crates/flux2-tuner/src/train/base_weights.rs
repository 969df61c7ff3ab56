//! `--base_weights` / `--base_weights_multiplier` (Musubi): LoRA files merged into the DiT's
//! weights before training starts, so the new LoRA trains on top of them. Any LoRA format that
//! `generate` reads is accepted; the merge happens in full precision, before any fp8 quantisation.

use std::path::PathBuf;

use candle_core::Device;

use crate::error::{Error, Result};
use crate::lora::{linear_shapes, KeyFilter, LoraFile};
use crate::models::dit::Flux2Dit;

/// Each file with its multiplier: `multipliers` may be empty (all 1.0), hold one value per file,
/// or anything else is an error naming the flags.
pub fn pair_multipliers(files: &[PathBuf], multipliers: &[f64]) -> Result<Vec<(PathBuf, f64)>> {
    if !multipliers.is_empty() && multipliers.len() != files.len() {
        return Err(Error::InvalidArgument {
            name: "--base_weights_multiplier".into(),
            message: format!(
                "{} values for {} --base_weights files; give one per file or none (1.0 each)",
                multipliers.len(),
                files.len()
            ),
        });
    }
    Ok(files
        .iter()
        .enumerate()
        .map(|(index, file)| (file.clone(), multipliers.get(index).copied().unwrap_or(1.0)))
        .collect())
}

/// Merges every `(file, multiplier)` into `dit`'s weights (which live on `device`).
pub fn merge_base_weights(
    dit: &mut Flux2Dit,
    files: &[(PathBuf, f64)],
    device: &Device,
) -> Result<()> {
    for (path, multiplier) in files {
        let shapes = linear_shapes(&dit.linears_mut());
        let lora = LoraFile::load(path, &shapes, &KeyFilter::default(), device)?;
        lora.apply(dit.linears_mut(), *multiplier, true)?;
    }
    Ok(())
}
