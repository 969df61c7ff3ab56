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

/// The attention implementation, by Musubi's `--attn_mode` names: `torch` and `sdpa` are the
/// composed attention (matmuls and a softmax, on every device), `flash` the fused kernel on CUDA
/// (bf16; the composed attention on the CPU and for other dtypes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionMode {
    Composed,
    Flash,
}

impl AttentionMode {
    pub fn parse(value: &str) -> Result<Self> {
        match value {
            "torch" | "sdpa" => Ok(Self::Composed),
            "flash" => Ok(Self::Flash),
            "xformers" | "sageattn" => {
                bail!("--attn_mode {value}: not available here; use torch or sdpa (the composed attention) or flash (the fused CUDA kernel)")
            }
            other => bail!("--attn_mode: `{other}` is not one of torch, sdpa, flash"),
        }
    }

    /// The training mode from `--attn_mode` and Musubi's training switches `--sdpa` /
    /// `--flash_attn` (which must not contradict each other or `--attn_mode`); default composed.
    pub fn resolve(attn_mode: Option<&str>, sdpa: bool, flash_attn: bool) -> Result<Self> {
        if sdpa && flash_attn {
            bail!("--sdpa and --flash_attn: choose one attention");
        }
        let switch = match (sdpa, flash_attn) {
            (true, _) => Some(("--sdpa", Self::Composed)),
            (_, true) => Some(("--flash_attn", Self::Flash)),
            _ => None,
        };
        match (attn_mode.map(Self::parse).transpose()?, switch) {
            (Some(mode), Some((flag, implied))) if mode != implied => bail!(
                "--attn_mode {} contradicts {flag}: give one of them",
                attn_mode.unwrap_or_default()
            ),
            (Some(mode), _) => Ok(mode),
            (None, Some((_, implied))) => Ok(implied),
            (None, None) => Ok(Self::Composed),
        }
    }

    /// Makes the models use this attention on `device` from now on (process-wide).
    pub fn apply(self, device: &Device) {
        use flux2_tuner::nn::flash::{select, AttentionKernel};
        match self {
            Self::Flash if device.is_cuda() => select(AttentionKernel::Fused),
            Self::Flash => {
                eprintln!("note: --attn_mode flash: the fused kernel runs on CUDA; the CPU uses the composed attention");
                select(AttentionKernel::Composed);
            }
            Self::Composed => select(AttentionKernel::Composed),
        }
    }
}
