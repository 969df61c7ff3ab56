//! LoRA files applied to the DiT, unmerged (extra low-rank matmuls) or merged into the weights.
//!
//! Formats read (peers-and-users.md §3): Musubi/kohya (`lora_unet_*.lora_down/lora_up/alpha`),
//! BFL-named ComfyUI/ai-toolkit (`diffusion_model.<path>.lora_A/lora_B`), diffusers/PEFT
//! (`transformer.<diffusers path>.lora_A/lora_B`, split q/k/v fused exactly at rank 3r), and
//! LyCORIS LoHa (`hada_w1_a` ...) and LoKr (`lokr_w1` ...), which are always merged.

pub mod names;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::nn::{Linear, LoraAdapter};
use names::NameResolver;

/// Prefix Musubi puts on every DiT module name.
pub const MUSUBI_PREFIX: &str = "lora_unet_";

/// The Musubi module name of a BFL module path: `double_blocks.0.img_attn.qkv` becomes
/// `lora_unet_double_blocks_0_img_attn_qkv`.
pub fn musubi_module_name(module_path: &str) -> String {
    format!("{MUSUBI_PREFIX}{}", module_path.replace('.', "_"))
}

/// The update one file makes to one BFL module.
#[derive(Debug, Clone)]
pub enum ModuleUpdate {
    /// `factor * up @ down` (factor = alpha / rank); applied unmerged or merged.
    LowRank {
        down: Tensor,
        up: Tensor,
        factor: f64,
    },
    /// A dense `[out, in]` update (LoHa, LoKr), always merged.
    Dense(Tensor),
}

/// Which keys of a LoRA file to use (`--include_patterns` / `--exclude_patterns`).
#[derive(Debug, Clone, Default)]
pub struct KeyFilter {
    pub include: Option<regex::Regex>,
    pub exclude: Option<regex::Regex>,
}

impl KeyFilter {
    fn keeps(&self, key: &str) -> bool {
        self.include.as_ref().is_none_or(|r| r.is_match(key))
            && self.exclude.as_ref().is_none_or(|r| !r.is_match(key))
    }
}

/// One split q/k/v low-rank part: `(down, up, alpha / rank)`.
type LowRankPart = (Tensor, Tensor, f64);

/// The raw tensors of one module in a file, by their suffix (`lora_down.weight`, `hada_w1_a`, ...).
type Parts = BTreeMap<&'static str, Tensor>;

const SUFFIXES: [(&str, &str); 14] = [
    (".lora_down.weight", "down"),
    (".lora_A.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_B.weight", "up"),
    (".alpha", "alpha"),
    (".hada_w1_a", "hada_w1_a"),
    (".hada_w1_b", "hada_w1_b"),
    (".hada_w2_a", "hada_w2_a"),
    (".hada_w2_b", "hada_w2_b"),
    (".lokr_w1", "lokr_w1"),
    (".lokr_w1_a", "lokr_w1_a"),
    (".lokr_w1_b", "lokr_w1_b"),
    (".lokr_w2", "lokr_w2"),
    (".lokr_w2_a", "lokr_w2_a"),
];

/// A LoRA file resolved against a model: updates by BFL module path.
#[derive(Debug, Clone)]
pub struct LoraFile {
    pub path: PathBuf,
    pub updates: BTreeMap<String, ModuleUpdate>,
}

impl LoraFile {
    /// Reads a LoRA file of any supported format and maps it onto `module_paths` (the model's BFL
    /// linear paths). A module that matches nothing, or whose shapes do not fit, is an error: the
    /// file was made for another model or version.
    pub fn load(
        path: &Path,
        module_shapes: &[(String, [usize; 2])],
        filter: &KeyFilter,
        device: &Device,
    ) -> Result<Self> {
        let checkpoint = Checkpoint::open(path)?;
        let invalid = |module: &str, message: String| Error::InvalidLora {
            path: path.to_path_buf(),
            module: module.to_string(),
            message,
        };
        let mut modules: BTreeMap<String, Parts> = BTreeMap::new();
        for key in checkpoint.keys() {
            if !filter.keeps(key) {
                continue;
            }
            let Some((module, part)) = SUFFIXES
                .iter()
                .find_map(|(suffix, part)| key.strip_suffix(suffix).map(|m| (m, *part)))
            else {
                if key.ends_with(".lokr_w2_b") {
                    let module = key.trim_end_matches(".lokr_w2_b");
                    let tensor = checkpoint.load(key, DType::F32, device)?;
                    modules
                        .entry(module.to_string())
                        .or_default()
                        .insert("lokr_w2_b", tensor);
                    continue;
                }
                return Err(invalid(
                    key,
                    "not a LoRA key this program understands (expected lora_down/lora_up/alpha, \
                     lora_A/lora_B, LoHa hada_* or LoKr lokr_*; DoRA and full-weight diffs are not \
                     supported)"
                        .into(),
                ));
            };
            let tensor = checkpoint.load(key, DType::F32, device)?;
            modules
                .entry(module.to_string())
                .or_default()
                .insert(part, tensor);
        }
        let paths: Vec<String> = module_shapes.iter().map(|(p, _)| p.clone()).collect();
        let shapes: BTreeMap<&str, [usize; 2]> = module_shapes
            .iter()
            .map(|(p, s)| (p.as_str(), *s))
            .collect();
        let resolver = NameResolver::new(&paths);
        // Split q/k/v parts are gathered per fused module before combining.
        let mut split_parts: BTreeMap<String, [Option<LowRankPart>; 3]> = BTreeMap::new();
        let mut updates = BTreeMap::new();
        for (name, parts) in &modules {
            let target = resolver.resolve(name).ok_or_else(|| {
                invalid(
                    name,
                    "matches no layer of this model (a LoRA for another model?)".into(),
                )
            })?;
            let [out_features, in_features] = shapes[target.module.as_str()];
            let part_rows = if target.part.is_some() {
                out_features / 3
            } else {
                out_features
            };
            let update = module_update(parts).map_err(|m| invalid(name, m))?;
            let (rows, cols) = match &update {
                ModuleUpdate::LowRank { down, up, .. } => (up.dims()[0], down.dims()[1]),
                ModuleUpdate::Dense(delta) => (delta.dims()[0], delta.dims()[1]),
            };
            if rows != part_rows || cols != in_features {
                return Err(invalid(
                    name,
                    format!(
                        "its update is [{rows}, {cols}] but the layer {} needs [{part_rows}, \
                         {in_features}] (a LoRA for another model version?)",
                        target.module
                    ),
                ));
            }
            let update = if target.swap_halves {
                swap_row_halves(update)?
            } else {
                update
            };
            match (target.part, update) {
                (Some(part), ModuleUpdate::LowRank { down, up, factor }) => {
                    split_parts.entry(target.module.clone()).or_default()[part] =
                        Some((down, up, factor));
                }
                (Some(_), ModuleUpdate::Dense(_)) => {
                    return Err(invalid(
                        name,
                        "LyCORIS updates on split q/k/v are not supported".into(),
                    ))
                }
                (None, update) => {
                    updates.insert(target.module.clone(), update);
                }
            }
        }
        for (module, parts) in split_parts {
            let [out_features, in_features] = shapes[module.as_str()];
            updates.insert(
                module,
                fuse_split_qkv(&parts, out_features / 3, in_features, device)?,
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            updates,
        })
    }

    /// Applies the updates with `multiplier`: low-rank ones as adapters (merged into the weights
    /// when `merge` is set), dense ones always merged.
    pub fn apply(
        &self,
        linears: Vec<(String, &mut Linear)>,
        multiplier: f64,
        merge: bool,
    ) -> Result<usize> {
        let mut by_path: BTreeMap<String, &mut Linear> = linears.into_iter().collect();
        for (module, update) in &self.updates {
            let linear = by_path.get_mut(module).ok_or_else(|| Error::InvalidLora {
                path: self.path.clone(),
                module: module.clone(),
                message: "matches no layer of this model".into(),
            })?;
            match update {
                ModuleUpdate::LowRank { down, up, factor } => {
                    linear.adapters.push(LoraAdapter {
                        down: down.clone(),
                        up: up.clone(),
                        scale: multiplier * factor,
                        dropout: None,
                    });
                    if merge {
                        linear.merge_adapters()?;
                    }
                }
                ModuleUpdate::Dense(delta) => {
                    let dtype = linear.weight.dtype();
                    let merged = (linear.weight.to_dtype(DType::F32)? + (delta * multiplier)?)?;
                    linear.weight = merged.to_dtype(dtype)?;
                }
            }
        }
        Ok(self.updates.len())
    }
}

fn scalar(tensor: &Tensor) -> Result<f64> {
    Ok(tensor
        .flatten_all()?
        .to_vec1::<f32>()?
        .first()
        .copied()
        .unwrap_or(0.0) as f64)
}

/// Builds the update of one module from its parts.
fn module_update(parts: &Parts) -> std::result::Result<ModuleUpdate, String> {
    let alpha = parts
        .get("alpha")
        .map(scalar)
        .transpose()
        .map_err(|e| e.to_string())?;
    let err = |e: crate::error::Error| e.to_string();
    if let (Some(down), Some(up)) = (parts.get("down"), parts.get("up")) {
        if down.rank() != 2 || up.rank() != 2 || up.dims()[1] != down.dims()[0] {
            return Err(format!(
                "down {:?} and up {:?} do not form [rank, in] and [out, rank]",
                down.dims(),
                up.dims()
            ));
        }
        let rank = down.dims()[0] as f64;
        return Ok(ModuleUpdate::LowRank {
            down: down.clone(),
            up: up.clone(),
            factor: alpha.unwrap_or(rank) / rank,
        });
    }
    let product = |a: &str, b: &str| -> Option<std::result::Result<Tensor, String>> {
        let (a, b) = (parts.get(a)?, parts.get(b)?);
        Some(a.matmul(b).map_err(|e| e.to_string()))
    };
    if let (Some(w1), Some(w2)) = (
        product("hada_w1_a", "hada_w1_b"),
        product("hada_w2_a", "hada_w2_b"),
    ) {
        // LoHa: (w1a w1b) * (w2a w2b) * alpha / rank (rank = columns of w1a).
        let rank = parts["hada_w1_a"].dims()[1] as f64;
        let delta = (w1? * w2?).map_err(|e| e.to_string())?;
        let delta = (delta * (alpha.unwrap_or(rank) / rank)).map_err(|e| e.to_string())?;
        return Ok(ModuleUpdate::Dense(delta));
    }
    let w1 = match (parts.get("lokr_w1"), product("lokr_w1_a", "lokr_w1_b")) {
        (Some(w), _) => Some(w.clone()),
        (None, Some(p)) => Some(p?),
        _ => None,
    };
    let w2 = match (parts.get("lokr_w2"), product("lokr_w2_a", "lokr_w2_b")) {
        (Some(w), _) => Some(w.clone()),
        (None, Some(p)) => Some(p?),
        _ => None,
    };
    if let (Some(w1), Some(w2)) = (w1, w2) {
        // LoKr: kron(w1, w2); the alpha / rank factor applies only when a factor is decomposed.
        let rank = parts
            .get("lokr_w2_a")
            .or(parts.get("lokr_w1_a"))
            .map(|t| t.dims()[1] as f64);
        let factor = match rank {
            Some(rank) => alpha.unwrap_or(rank) / rank,
            None => 1.0,
        };
        let delta = (kronecker(&w1, &w2).map_err(err)? * factor).map_err(|e| e.to_string())?;
        return Ok(ModuleUpdate::Dense(delta));
    }
    Err(format!(
        "incomplete module: has only {:?}",
        parts.keys().collect::<Vec<_>>()
    ))
}

/// Kronecker product of two matrices.
fn kronecker(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (ar, ac) = a.dims2()?;
    let (br, bc) = b.dims2()?;
    // out[i*br + k, j*bc + l] = a[i, j] * b[k, l]
    let a4 = a.reshape((ar, 1, ac, 1))?;
    let b4 = b.reshape((1, br, 1, bc))?;
    Ok(a4.broadcast_mul(&b4)?.reshape((ar * br, ac * bc))?)
}

/// diffusers keeps the final-layer modulation halves as (scale, shift): swap the output rows.
fn swap_row_halves(update: ModuleUpdate) -> Result<ModuleUpdate> {
    let swap = |t: &Tensor| -> Result<Tensor> {
        let half = t.dims()[0] / 2;
        Ok(Tensor::cat(
            &[t.narrow(0, half, half)?, t.narrow(0, 0, half)?],
            0,
        )?)
    };
    Ok(match update {
        ModuleUpdate::LowRank { down, up, factor } => ModuleUpdate::LowRank {
            down,
            up: swap(&up)?,
            factor,
        },
        ModuleUpdate::Dense(delta) => ModuleUpdate::Dense(swap(&delta)?),
    })
}

/// Combines split q/k/v low-rank updates into one exact update of the fused qkv weight: the
/// down matrices are stacked and up is block-diagonal (rank = sum of the parts' ranks); each
/// part's alpha/rank factor is folded into its block. Missing parts contribute nothing.
fn fuse_split_qkv(
    parts: &[Option<LowRankPart>; 3],
    part_rows: usize,
    in_features: usize,
    device: &Device,
) -> Result<ModuleUpdate> {
    let total_rank: usize = parts.iter().flatten().map(|(d, _, _)| d.dims()[0]).sum();
    let mut downs = Vec::new();
    let mut up_rows = Vec::new();
    let mut column = 0;
    for part in parts {
        match part {
            Some((down, up, factor)) => {
                let rank = down.dims()[0];
                downs.push(down.clone());
                let scaled = (up * *factor)?;
                let left = Tensor::zeros((part_rows, column), DType::F32, device)?;
                let right =
                    Tensor::zeros((part_rows, total_rank - column - rank), DType::F32, device)?;
                up_rows.push(Tensor::cat(&[&left, &scaled, &right], 1)?);
                column += rank;
            }
            None => up_rows.push(Tensor::zeros((part_rows, total_rank), DType::F32, device)?),
        }
    }
    let down = Tensor::cat(&downs, 0)?;
    debug_assert_eq!(down.dims(), &[total_rank, in_features]);
    Ok(ModuleUpdate::LowRank {
        down,
        up: Tensor::cat(&up_rows, 0)?,
        factor: 1.0,
    })
}

/// Shapes `[out, in]` of the model's linears by BFL path, for [`LoraFile::load`].
pub fn linear_shapes(linears: &[(String, &mut Linear)]) -> Vec<(String, [usize; 2])> {
    linears
        .iter()
        .map(|(path, linear)| (path.clone(), [linear.out_features(), linear.in_features()]))
        .collect()
}
