//! LoRA files in Musubi's format (`lora_unet_<module path with _>.{lora_down.weight,
//! lora_up.weight,alpha}`), applied to the DiT unmerged or merged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::nn::{Linear, LoraAdapter};

/// Prefix Musubi puts on every DiT module name.
pub const MUSUBI_PREFIX: &str = "lora_unet_";

/// The Musubi module name of a BFL module path: `double_blocks.0.img_attn.qkv` becomes
/// `lora_unet_double_blocks_0_img_attn_qkv`.
pub fn musubi_module_name(module_path: &str) -> String {
    format!("{MUSUBI_PREFIX}{}", module_path.replace('.', "_"))
}

/// One module's low-rank pair as stored.
#[derive(Debug, Clone)]
pub struct LoraModule {
    pub down: Tensor,
    pub up: Tensor,
    pub alpha: f64,
}

impl LoraModule {
    pub fn rank(&self) -> usize {
        self.down.dims()[0]
    }
}

/// A loaded LoRA file: modules by Musubi name.
#[derive(Debug, Clone)]
pub struct LoraWeights {
    pub path: PathBuf,
    pub modules: BTreeMap<String, LoraModule>,
}

impl LoraWeights {
    /// Reads a Musubi-format LoRA file; weights are kept in f32.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let checkpoint = Checkpoint::open(path)?;
        let invalid = |module: &str, message: String| Error::InvalidLora {
            path: path.to_path_buf(),
            module: module.to_string(),
            message,
        };
        let mut parts: BTreeMap<String, (Option<Tensor>, Option<Tensor>, Option<f64>)> =
            BTreeMap::new();
        for key in checkpoint.keys() {
            let (module, part) = if let Some(m) = key.strip_suffix(".lora_down.weight") {
                (m, 0)
            } else if let Some(m) = key.strip_suffix(".lora_up.weight") {
                (m, 1)
            } else if let Some(m) = key.strip_suffix(".alpha") {
                (m, 2)
            } else {
                return Err(invalid(
                    key,
                    "not a Musubi LoRA key (expected `<module>.lora_down.weight`, \
                     `<module>.lora_up.weight` or `<module>.alpha`)"
                        .into(),
                ));
            };
            let slot = parts.entry(module.to_string()).or_default();
            let tensor = checkpoint.load(key, DType::F32, device)?;
            match part {
                0 => slot.0 = Some(tensor),
                1 => slot.1 = Some(tensor),
                _ => {
                    slot.2 = Some(
                        tensor
                            .flatten_all()?
                            .to_vec1::<f32>()?
                            .first()
                            .copied()
                            .unwrap_or(0.0) as f64,
                    )
                }
            }
        }
        let mut modules = BTreeMap::new();
        for (name, (down, up, alpha)) in parts {
            let down = down.ok_or_else(|| invalid(&name, "has no lora_down.weight".into()))?;
            let up = up.ok_or_else(|| invalid(&name, "has no lora_up.weight".into()))?;
            if down.rank() != 2 || up.rank() != 2 || up.dims()[1] != down.dims()[0] {
                return Err(invalid(
                    &name,
                    format!(
                        "lora_down {:?} and lora_up {:?} do not form [rank, in] and [out, rank]",
                        down.dims(),
                        up.dims()
                    ),
                ));
            }
            let rank = down.dims()[0];
            modules.insert(
                name,
                LoraModule {
                    down,
                    up,
                    alpha: alpha.unwrap_or(rank as f64),
                },
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            modules,
        })
    }

    /// Attaches every module to the linear of the same name with scale `multiplier * alpha / rank`
    /// (unmerged). Modules that match no linear, or whose shapes differ, are errors: such a file was
    /// made for another model.
    pub fn attach(&self, linears: Vec<(String, &mut Linear)>, multiplier: f64) -> Result<usize> {
        let mut by_name: BTreeMap<String, &mut Linear> = linears
            .into_iter()
            .map(|(path, linear)| (musubi_module_name(&path), linear))
            .collect();
        for (name, module) in &self.modules {
            let linear = by_name.get_mut(name).ok_or_else(|| Error::InvalidLora {
                path: self.path.clone(),
                module: name.clone(),
                message: "matches no layer of this model (a LoRA for another model?)".into(),
            })?;
            let (out_features, in_features) = (linear.out_features(), linear.in_features());
            if module.down.dims()[1] != in_features || module.up.dims()[0] != out_features {
                return Err(Error::InvalidLora {
                    path: self.path.clone(),
                    module: name.clone(),
                    message: format!(
                        "lora_down {:?} / lora_up {:?} do not fit the layer's weight [{out_features}, \
                         {in_features}] (a LoRA for another model version?)",
                        module.down.dims(),
                        module.up.dims()
                    ),
                });
            }
            linear.adapters.push(LoraAdapter {
                down: module.down.clone(),
                up: module.up.clone(),
                scale: multiplier * module.alpha / module.rank() as f64,
            });
        }
        Ok(self.modules.len())
    }
}

/// Merges every attached adapter into its weight.
pub fn merge_all(linears: Vec<(String, &mut Linear)>) -> Result<()> {
    for (_, linear) in linears {
        linear.merge_adapters()?;
    }
    Ok(())
}
