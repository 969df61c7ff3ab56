//! The trainable LoRA network, as Musubi's `networks.lora_flux_2` (training-and-data.md §4):
//! every Linear inside the double and single blocks, `lora_down` initialised Kaiming-uniform
//! (a = sqrt(5), i.e. U(±1/sqrt(in))), `lora_up` zero, scale `alpha / rank`, saved with Musubi keys.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};

use crate::checkpoint::{save_safetensors, Checkpoint};
use crate::error::{Error, Result};
use crate::lora::musubi_module_name;
use crate::models::dit::{DitConfig, Flux2Dit};
use crate::nn::lora_dropout::LoraDropout;
use crate::nn::LoraAdapter;
use crate::util::rng::SeededRng;

/// Musubi's default exclude pattern (left over from FLUX.1; matches nothing in FLUX.2 blocks).
const DEFAULT_EXCLUDE: &str = r".*(img_mod\.lin|txt_mod\.lin|modulation\.lin).*";
/// Always appended by Musubi, even when the user gives exclude patterns.
const NORM_EXCLUDE: &str = r".*(norm).*";

/// `--network_dim`, `--network_alpha`, `--network_dropout` and `--network_args`.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    pub dim: usize,
    pub alpha: f64,
    /// Dropout on the `down(x)` activations.
    pub dropout: Option<f64>,
    /// Drops ranks per sample (scale compensated by 1/(1-p)).
    pub rank_dropout: Option<f64>,
    /// Skips a whole module with this probability.
    pub module_dropout: Option<f64>,
    pub include_patterns: Vec<String>,
    /// Replaces Musubi's default exclude (the norm exclude is always added).
    pub exclude_patterns: Option<Vec<String>>,
    /// LoRA+: `lora_up` learns at `lr * ratio`.
    pub loraplus_lr_ratio: Option<f64>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            dim: 4,
            alpha: 1.0,
            dropout: None,
            rank_dropout: None,
            module_dropout: None,
            include_patterns: Vec::new(),
            exclude_patterns: None,
            loraplus_lr_ratio: None,
        }
    }
}

/// Splits a Python list literal of strings (`['a', r"b"]`) as Musubi's `ast.literal_eval` reads it.
fn python_string_list(value: &str) -> Result<Vec<String>> {
    let bad = || Error::InvalidArgument {
        name: "--network_args".into(),
        message: format!("`{value}` is not a list of strings such as ['.*single.*']"),
    };
    let inner = value
        .trim()
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .ok_or_else(bad)?;
    let mut items = Vec::new();
    let mut rest = inner.trim();
    while !rest.is_empty() {
        rest = rest.strip_prefix('r').unwrap_or(rest);
        let quote = rest
            .chars()
            .next()
            .filter(|c| *c == '\'' || *c == '"')
            .ok_or_else(bad)?;
        let end = rest[1..].find(quote).ok_or_else(bad)? + 1;
        items.push(rest[1..end].to_string());
        rest = rest[end + 1..].trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
    Ok(items)
}

impl NetworkConfig {
    /// Applies Musubi `key=value` network arguments.
    pub fn apply_args(&mut self, args: &[String]) -> Result<()> {
        for arg in args {
            let (key, value) = arg.split_once('=').ok_or_else(|| Error::InvalidArgument {
                name: "--network_args".into(),
                message: format!("`{arg}` is not key=value"),
            })?;
            let (key, value) = (key.trim(), value.trim());
            let number = || -> Result<f64> {
                value.parse().map_err(|_| Error::InvalidArgument {
                    name: format!("--network_args {key}"),
                    message: format!("`{value}` is not a number"),
                })
            };
            match key {
                "rank_dropout" => self.rank_dropout = Some(number()?),
                "module_dropout" => self.module_dropout = Some(number()?),
                "loraplus_lr_ratio" => self.loraplus_lr_ratio = Some(number()?),
                "include_patterns" => self.include_patterns = python_string_list(value)?,
                "exclude_patterns" => self.exclude_patterns = Some(python_string_list(value)?),
                "verbose" => {}
                "conv_dim" | "conv_alpha" => {
                    return Err(Error::InvalidArgument {
                        name: format!("--network_args {key}"),
                        message: "FLUX.2 blocks have no convolutions".into(),
                    })
                }
                other => {
                    return Err(Error::InvalidArgument {
                        name: "--network_args".into(),
                        message: format!(
                            "unknown key `{other}`; known: rank_dropout, module_dropout, loraplus_lr_ratio, \
                             include_patterns, exclude_patterns, verbose"
                        ),
                    })
                }
            }
        }
        Ok(())
    }

    /// Whether a BFL module path is trained: inside a block, and not excluded unless included
    /// (patterns match the whole path, as Python's `re.fullmatch`).
    pub fn targets(&self, path: &str) -> Result<bool> {
        if !(path.starts_with("double_blocks.") || path.starts_with("single_blocks.")) {
            return Ok(false);
        }
        let full = |pattern: &str| -> Result<bool> {
            let regex = regex::Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
                Error::InvalidArgument {
                    name: "--network_args patterns".into(),
                    message: format!("`{pattern}`: {e}"),
                }
            })?;
            Ok(regex.is_match(path))
        };
        let mut excludes: Vec<String> = self
            .exclude_patterns
            .clone()
            .unwrap_or_else(|| vec![DEFAULT_EXCLUDE.to_string()]);
        excludes.push(NORM_EXCLUDE.to_string());
        for pattern in &excludes {
            if full(pattern)? {
                for include in &self.include_patterns {
                    if full(include)? {
                        return Ok(true);
                    }
                }
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// One trained module.
#[derive(Debug, Clone)]
pub struct LoraModule {
    /// BFL module path (`double_blocks.0.img_attn.qkv`).
    pub path: String,
    /// `[rank, in]`, f32.
    pub down: Var,
    /// `[out, rank]`, f32.
    pub up: Var,
    pub alpha: f64,
}

impl LoraModule {
    pub fn rank(&self) -> usize {
        self.down.dims()[0]
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank() as f64
    }
}

/// The LoRA network being trained.
#[derive(Debug, Clone)]
pub struct LoraNetwork {
    pub config: NetworkConfig,
    pub modules: Vec<LoraModule>,
    /// The dropouts of the config with their random source (active only while training).
    pub dropout: Option<std::sync::Arc<LoraDropout>>,
}

impl LoraNetwork {
    /// Creates the network for a DiT configuration, initialised as Musubi.
    pub fn new(
        dit: &DitConfig,
        config: NetworkConfig,
        rng: &mut SeededRng,
        device: &Device,
    ) -> Result<Self> {
        if config.dim == 0 {
            return Err(Error::InvalidArgument {
                name: "--network_dim".into(),
                message: "must be at least 1".into(),
            });
        }
        // Musubi: alpha None or 0 means alpha = rank.
        let alpha = if config.alpha == 0.0 {
            config.dim as f64
        } else {
            config.alpha
        };
        let mut modules = Vec::new();
        for (path, [out_features, in_features]) in dit.linear_shapes() {
            if !config.targets(&path)? {
                continue;
            }
            let bound = 1.0 / (in_features as f64).sqrt();
            let values: Vec<f32> = (0..config.dim * in_features)
                .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
                .collect();
            let down = Var::from_tensor(&Tensor::from_vec(
                values,
                (config.dim, in_features),
                device,
            )?)?;
            let up = Var::zeros((out_features, config.dim), DType::F32, device)?;
            modules.push(LoraModule {
                path,
                down,
                up,
                alpha,
            });
        }
        if modules.is_empty() {
            return Err(Error::InvalidArgument {
                name: "--network_args".into(),
                message: "the include/exclude patterns leave no module to train".into(),
            });
        }
        let dropout = if config.dropout.is_some()
            || config.rank_dropout.is_some()
            || config.module_dropout.is_some()
        {
            Some(std::sync::Arc::new(LoraDropout::new(
                config.dropout,
                config.rank_dropout,
                config.module_dropout,
                rng.next_u64(),
            )?))
        } else {
            None
        };
        Ok(Self {
            config,
            modules,
            dropout,
        })
    }

    /// Loads the values of a Musubi LoRA file into the matching modules (`--network_weights`,
    /// continuing from a LoRA). Shapes must match; modules missing from the file keep their
    /// initial values (Musubi loads non-strictly), extra modules in the file are an error.
    pub fn load_weights(&mut self, path: &Path) -> Result<usize> {
        let checkpoint = Checkpoint::open(path)?;
        let mut loaded = 0;
        let device = self
            .modules
            .first()
            .map(|m| m.down.device().clone())
            .unwrap_or(Device::Cpu);
        let known: std::collections::HashSet<String> = self
            .modules
            .iter()
            .map(|m| musubi_module_name(&m.path))
            .collect();
        if let Some(extra) = checkpoint
            .keys()
            .find(|k| !known.contains(k.split('.').next().unwrap_or_default()))
        {
            return Err(Error::InvalidLora {
                path: path.to_path_buf(),
                module: extra.to_string(),
                message: "is not a module of this network (another model version, or other include/exclude patterns?)".into(),
            });
        }
        for module in &mut self.modules {
            let name = musubi_module_name(&module.path);
            let down_key = format!("{name}.lora_down.weight");
            if checkpoint.entry(&down_key).is_none() {
                continue;
            }
            let down = checkpoint.load(&down_key, DType::F32, &device)?;
            let up = checkpoint.load(&format!("{name}.lora_up.weight"), DType::F32, &device)?;
            if down.dims() != module.down.dims() || up.dims() != module.up.dims() {
                return Err(Error::InvalidLora {
                    path: path.to_path_buf(),
                    module: name,
                    message: format!(
                        "down {:?} / up {:?} differ from this network's {:?} / {:?} (another --network_dim?)",
                        down.dims(),
                        up.dims(),
                        module.down.dims(),
                        module.up.dims()
                    ),
                });
            }
            module.down.set(&down)?;
            module.up.set(&up)?;
            if let Ok(alpha) = checkpoint.load(&format!("{name}.alpha"), DType::F32, &device) {
                module.alpha = alpha
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .first()
                    .copied()
                    .unwrap_or(0.0) as f64;
            }
            loaded += 1;
        }
        Ok(loaded)
    }

    /// Attaches every module to the DiT as an unmerged adapter with `multiplier`; gradients flow to
    /// the modules' `Var`s. Previous adapters are removed first.
    pub fn attach(&self, dit: &mut Flux2Dit, multiplier: f64) -> Result<()> {
        let mut linears: HashMap<String, &mut crate::nn::Linear> =
            dit.linears_mut().into_iter().collect();
        for linear in linears.values_mut() {
            linear.adapters.clear();
        }
        for module in &self.modules {
            let linear = linears
                .get_mut(&module.path)
                .ok_or_else(|| Error::InvalidArgument {
                    name: "LoRA network".into(),
                    message: format!("module {} is not in the model", module.path),
                })?;
            linear.adapters.push(LoraAdapter {
                down: module.down.as_tensor().clone(),
                up: module.up.as_tensor().clone(),
                scale: multiplier * module.scale(),
                dropout: self.dropout.clone(),
            });
        }
        Ok(())
    }

    /// Every trainable tensor with its learning-rate factor (LoRA+ puts `lora_up` at `ratio`).
    pub fn parameters(&self) -> Vec<(Var, f64)> {
        let up_factor = self.config.loraplus_lr_ratio.unwrap_or(1.0);
        self.modules
            .iter()
            .flat_map(|m| [(m.down.clone(), 1.0), (m.up.clone(), up_factor)])
            .collect()
    }

    /// The tensors as saved: Musubi keys, every tensor (alpha included) in `dtype`.
    pub fn tensors(&self, dtype: DType) -> Result<Vec<(String, Tensor)>> {
        let mut tensors = Vec::with_capacity(self.modules.len() * 3);
        for module in &self.modules {
            let name = musubi_module_name(&module.path);
            let device = module.down.device();
            tensors.push((
                format!("{name}.lora_down.weight"),
                module.down.as_tensor().to_dtype(dtype)?,
            ));
            tensors.push((
                format!("{name}.lora_up.weight"),
                module.up.as_tensor().to_dtype(dtype)?,
            ));
            tensors.push((
                format!("{name}.alpha"),
                Tensor::new(module.alpha as f32, device)?.to_dtype(dtype)?,
            ));
        }
        Ok(tensors)
    }

    /// Saves the network atomically with the given metadata.
    pub fn save(&self, path: &Path, dtype: DType, metadata: HashMap<String, String>) -> Result<()> {
        save_safetensors(path, &self.tensors(dtype)?, Some(metadata))
    }
}

/// Runs `f` with every adapter's tensors swapped for detached views of the same storage and
/// without dropouts, then puts the originals back (even when `f` fails). The LoRA `Var`s would
/// otherwise make candle record a graph through every LoRA matmul and keep its activations alive
/// (sampling and validation run the DiT with the LoRA attached but need no gradients).
pub fn with_detached_adapters<T>(dit: &mut Flux2Dit, f: impl FnOnce(&Flux2Dit) -> T) -> T {
    let mut saved: HashMap<String, Vec<LoraAdapter>> = HashMap::new();
    for (name, linear) in dit.linears_mut() {
        if linear.adapters.is_empty() {
            continue;
        }
        let detached = linear
            .adapters
            .iter()
            .map(|adapter| LoraAdapter {
                down: adapter.down.detach(),
                up: adapter.up.detach(),
                scale: adapter.scale,
                dropout: None,
            })
            .collect();
        saved.insert(name, std::mem::replace(&mut linear.adapters, detached));
    }
    let result = f(dit);
    for (name, linear) in dit.linears_mut() {
        if let Some(adapters) = saved.remove(&name) {
            linear.adapters = adapters;
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> DitConfig {
        DitConfig {
            in_channels: 128,
            context_in_dim: 16,
            hidden_size: 16,
            num_heads: 2,
            depth: 2,
            depth_single_blocks: 3,
            mlp_hidden_size: 48,
            axes_dim: [2, 2, 2, 2],
            theta: 2000.0,
            guidance_embed: false,
        }
    }

    /// 8 linears per double block and 2 per single block, as Musubi's module count table.
    #[test]
    fn targets_and_initialisation_follow_musubi() {
        let mut rng = SeededRng::new(1);
        let network =
            LoraNetwork::new(&tiny(), NetworkConfig::default(), &mut rng, &Device::Cpu).unwrap();
        assert_eq!(network.modules.len(), 2 * 8 + 3 * 2);
        for module in &network.modules {
            assert!(!module.path.contains("modulation") && !module.path.contains("final"));
            let up = module
                .up
                .as_tensor()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(up, 0.0);
            let bound = 1.0 / (module.down.dims()[1] as f32).sqrt();
            let down = module
                .down
                .as_tensor()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(down <= bound && down > 0.5 * bound);
            assert_eq!(module.scale(), 0.25, "alpha 1 / rank 4");
        }
    }

    #[test]
    fn patterns_exclude_and_rescue() {
        let mut config = NetworkConfig::default();
        config
            .apply_args(&[
                "exclude_patterns=[r'.*']".into(),
                "include_patterns=['.*single_blocks.*linear1']".into(),
            ])
            .unwrap();
        let mut rng = SeededRng::new(1);
        let network = LoraNetwork::new(&tiny(), config, &mut rng, &Device::Cpu).unwrap();
        let paths: Vec<&str> = network.modules.iter().map(|m| m.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "single_blocks.0.linear1",
                "single_blocks.1.linear1",
                "single_blocks.2.linear1"
            ]
        );
        let mut bad = NetworkConfig::default();
        assert!(bad
            .apply_args(&["rank_dropout=high".into()])
            .unwrap_err()
            .to_string()
            .contains("high"));
        assert!(bad
            .apply_args(&["frobnicate=1".into()])
            .unwrap_err()
            .to_string()
            .contains("frobnicate"));
    }
}
