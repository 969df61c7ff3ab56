//! The cheapest added settings that fit, tried in Musubi's order of cost: gradient checkpointing
//! (training), fp8 base weights, block swap counts from 1 up to the maximum, then activation CPU
//! offload (training) with the swap counts again. Settings already given are kept.

use crate::error::Result;
use crate::quant::Fp8Mode;

use super::phases::plan;
use super::swap::max_blocks_to_swap;
use super::{Job, MemorySettings, Plan, PlanModel};

/// Settings that fit (or, when none does, the most memory-saving ones), the flags to add for them
/// and their plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Suggestion {
    pub settings: MemorySettings,
    pub flags: Vec<String>,
    pub plan: Plan,
    /// False when even the last candidate does not fit.
    pub fits: bool,
}

/// The flags that turn `from` into `to`.
fn added_flags(from: &MemorySettings, to: &MemorySettings, training: bool) -> Vec<String> {
    let mut flags = Vec::new();
    if to.gradient_checkpointing && !from.gradient_checkpointing {
        flags.push("--gradient_checkpointing".to_string());
    }
    if to.fp8 != from.fp8 {
        flags.push(if training {
            "--fp8_base --fp8_scaled".to_string()
        } else {
            "--fp8_scaled".to_string()
        });
    }
    if to.blocks_to_swap != from.blocks_to_swap {
        flags.push(format!("--blocks_to_swap {}", to.blocks_to_swap));
    }
    if to.cpu_offload && !from.cpu_offload {
        flags.push("--gradient_checkpointing_cpu_offload".to_string());
    }
    flags
}

/// The candidates, cheapest first.
fn candidates(model: &PlanModel, start: &MemorySettings, training: bool) -> Vec<MemorySettings> {
    let mut list = vec![start.clone()];
    let mut current = start.clone();
    if training && !current.gradient_checkpointing {
        current.gradient_checkpointing = true;
        list.push(current.clone());
    }
    if current.fp8 != Fp8Mode::Scaled {
        current.fp8 = Fp8Mode::Scaled;
        list.push(current.clone());
    }
    let maximum = max_blocks_to_swap(model.dit.depth, model.dit.depth_single_blocks);
    for swap in current.blocks_to_swap + 1..=maximum {
        list.push(MemorySettings {
            blocks_to_swap: swap,
            ..current.clone()
        });
    }
    if training && !current.cpu_offload {
        current.cpu_offload = true;
        for swap in current.blocks_to_swap..=maximum {
            list.push(MemorySettings {
                blocks_to_swap: swap,
                ..current.clone()
            });
        }
    }
    list
}

/// The first candidate whose peak fits `vram` bytes; when none does, the last (most saving)
/// candidate with `fits` false.
pub fn suggest(
    model: &PlanModel,
    settings: &MemorySettings,
    job: &Job,
    vram: u64,
) -> Result<Suggestion> {
    let training = matches!(job, Job::Training(_));
    let mut last = None;
    for candidate in candidates(model, settings, training) {
        let candidate_plan = plan(model, &candidate, job)?;
        let fits = candidate_plan.fits(vram);
        let suggestion = Suggestion {
            flags: added_flags(settings, &candidate, training),
            settings: candidate,
            plan: candidate_plan,
            fits,
        };
        if fits {
            return Ok(suggestion);
        }
        last = Some(suggestion);
    }
    match last {
        Some(suggestion) => Ok(suggestion),
        // The list always holds the starting settings.
        None => Ok(Suggestion {
            flags: Vec::new(),
            plan: plan(model, settings, job)?,
            settings: settings.clone(),
            fits: false,
        }),
    }
}
