//! `--device` and `--attn_mode`.

use anyhow::{bail, Result};
use candle_core::Device;

/// Parses `--device` (`cpu`, `cuda`, `cuda:N`); the default is CUDA when this build has it and a
/// GPU answers, else the CPU.
pub fn parse_device(value: Option<&str>) -> Result<Device> {
    match value {
        None => Ok(Device::cuda_if_available(0).unwrap_or(Device::Cpu)),
        Some("cpu") => Ok(Device::Cpu),
        Some(name) if name == "cuda" || name.starts_with("cuda:") => {
            if !cfg!(feature = "cuda") {
                bail!("--device {name}: this build has no CUDA support; rebuild with `--features cuda`");
            }
            let index = name.strip_prefix("cuda:").unwrap_or("0");
            let index: usize = index
                .parse()
                .map_err(|_| anyhow::anyhow!("--device {name}: bad GPU index"))?;
            Ok(Device::new_cuda(index)?)
        }
        Some(other) => bail!("--device: `{other}` is not cpu, cuda or cuda:N"),
    }
}

/// The attention implementation (one built-in kernel; Musubi's names are accepted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionMode {
    BuiltIn,
}

impl AttentionMode {
    pub fn parse(value: &str) -> Result<Self> {
        match value {
            "torch" | "sdpa" | "flash" => Ok(Self::BuiltIn),
            "xformers" | "sageattn" => {
                bail!("--attn_mode {value}: not available here; use torch, sdpa or flash (the built-in attention)")
            }
            other => bail!("--attn_mode: `{other}` is not one of torch, sdpa, flash"),
        }
    }
}
