//! The DiT hyper-parameters, their inference from checkpoint shapes, and the exact key/shape table
//! a checkpoint of a given configuration must have (BFL key names, Musubi loads strictly).

use std::path::Path;

use crate::checkpoint::{Checkpoint, KeySpec};
use crate::error::{Error, Result};

/// FLUX.2 DiT hyper-parameters (BFL `Flux2Params`).
#[derive(Debug, Clone, PartialEq)]
pub struct DitConfig {
    /// Latent channels per token (128: 32 AE channels times a 2x2 patch).
    pub in_channels: usize,
    /// Width of the text-encoder features (three stacked hidden layers).
    pub context_in_dim: usize,
    pub hidden_size: usize,
    pub num_heads: usize,
    /// Number of double-stream blocks.
    pub depth: usize,
    /// Number of single-stream blocks.
    pub depth_single_blocks: usize,
    /// Hidden width of the SwiGLU MLPs (3 x hidden in every real version).
    pub mlp_hidden_size: usize,
    /// RoPE dimensions of the (t, h, w, l) axes; they sum to the head dimension.
    pub axes_dim: [usize; 4],
    pub theta: f64,
    /// True when the model has `guidance_in` (dev).
    pub guidance_embed: bool,
}

/// The config values that shapes cannot tell, read from an optional JSON file next to the weights.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigOverrides {
    axes_dim: Option<[usize; 4]>,
    theta: Option<f64>,
}

impl DitConfig {
    /// A real FLUX.2 configuration (head dim 128, RoPE 4 x 32, theta 2000, MLP ratio 3).
    pub(crate) fn real(
        hidden_size: usize,
        num_heads: usize,
        depth: usize,
        depth_single_blocks: usize,
        context_in_dim: usize,
        guidance_embed: bool,
    ) -> Self {
        Self {
            in_channels: 128,
            context_in_dim,
            hidden_size,
            num_heads,
            depth,
            depth_single_blocks,
            mlp_hidden_size: hidden_size * 3,
            axes_dim: [32; 4],
            theta: 2000.0,
            guidance_embed,
        }
    }

    /// Head dimension.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Checks internal consistency (head dim divides, RoPE axes sum to it, even axes).
    pub fn check(&self, path: &Path) -> Result<()> {
        let fail = |message: String| {
            Err(Error::InvalidConfig {
                path: path.to_path_buf(),
                message,
            })
        };
        if self.num_heads == 0 || self.hidden_size % self.num_heads != 0 {
            return fail(format!(
                "hidden size {} is not divisible into {} heads",
                self.hidden_size, self.num_heads
            ));
        }
        let sum: usize = self.axes_dim.iter().sum();
        if sum != self.head_dim() || self.axes_dim.iter().any(|d| d % 2 != 0) {
            return fail(format!(
                "RoPE axes {:?} must be even and sum to the head dimension {}; put the right \
                 `axes_dim` in {}",
                self.axes_dim,
                self.head_dim(),
                CONFIG_FILE_NAME
            ));
        }
        Ok(())
    }

    /// Infers the configuration from tensor shapes. Axes and theta cannot be seen in shapes: they
    /// default to four equal axes and 2000 (the real values) unless a `flux2_dit_config.json` next to
    /// the weights says otherwise.
    pub fn infer(checkpoint: &Checkpoint) -> Result<Self> {
        let path = checkpoint.path();
        let dim = |key: &str, axis: usize| -> Result<usize> {
            let shape = checkpoint.shape(key)?;
            shape.get(axis).copied().ok_or_else(|| Error::WrongShape {
                path: path.to_path_buf(),
                key: key.to_string(),
                expected: vec![0; axis + 1],
                found: shape.to_vec(),
            })
        };
        if checkpoint.shape("img_in.weight").is_err()
            && checkpoint.keys().any(|k| k.starts_with("x_embedder"))
        {
            return Err(Error::InvalidConfig {
                path: path.to_path_buf(),
                message:
                    "this is a diffusers-format transformer; flux2-tuner loads the original BFL \
                          file (flux2-dev.safetensors, flux-2-klein-*.safetensors)"
                        .into(),
            });
        }
        let hidden_size = dim("img_in.weight", 0)?;
        let in_channels = dim("img_in.weight", 1)?;
        let context_in_dim = dim("txt_in.weight", 1)?;
        let count_blocks = |prefix: &str| {
            let mut count = 0;
            while checkpoint
                .keys()
                .any(|k| k.starts_with(&format!("{prefix}.{count}.")))
            {
                count += 1;
            }
            count
        };
        let depth = count_blocks("double_blocks");
        let depth_single_blocks = count_blocks("single_blocks");
        let head_dim = if depth > 0 {
            dim("double_blocks.0.img_attn.norm.query_norm.scale", 0)?
        } else {
            dim("single_blocks.0.norm.query_norm.scale", 0)?
        };
        if head_dim == 0 || hidden_size % head_dim != 0 {
            return Err(Error::InvalidConfig {
                path: path.to_path_buf(),
                message: format!(
                    "head dimension {head_dim} does not divide hidden size {hidden_size}"
                ),
            });
        }
        let mlp_hidden_size = if depth > 0 {
            dim("double_blocks.0.img_mlp.2.weight", 1)?
        } else {
            dim("single_blocks.0.linear2.weight", 1)? - hidden_size
        };
        let overrides = read_overrides(path)?;
        let quarter = head_dim / 4;
        let config = Self {
            in_channels,
            context_in_dim,
            hidden_size,
            num_heads: hidden_size / head_dim,
            depth,
            depth_single_blocks,
            mlp_hidden_size,
            axes_dim: overrides.axes_dim.unwrap_or([quarter; 4]),
            theta: overrides.theta.unwrap_or(2000.0),
            guidance_embed: checkpoint.shape("guidance_in.in_layer.weight").is_ok(),
        };
        config.check(path)?;
        Ok(config)
    }

    /// Every tensor a BFL checkpoint of this configuration holds, with its shape.
    pub fn expected_keys(&self) -> Vec<KeySpec> {
        let h = self.hidden_size;
        let m = self.mlp_hidden_size;
        let hd = self.head_dim();
        let mut keys = vec![
            KeySpec::new("img_in.weight", &[h, self.in_channels]),
            KeySpec::new("txt_in.weight", &[h, self.context_in_dim]),
            KeySpec::new("time_in.in_layer.weight", &[h, 256]),
            KeySpec::new("time_in.out_layer.weight", &[h, h]),
            KeySpec::new("double_stream_modulation_img.lin.weight", &[6 * h, h]),
            KeySpec::new("double_stream_modulation_txt.lin.weight", &[6 * h, h]),
            KeySpec::new("single_stream_modulation.lin.weight", &[3 * h, h]),
            KeySpec::new("final_layer.adaLN_modulation.1.weight", &[2 * h, h]),
            KeySpec::new("final_layer.linear.weight", &[self.in_channels, h]),
        ];
        if self.guidance_embed {
            keys.push(KeySpec::new("guidance_in.in_layer.weight", &[h, 256]));
            keys.push(KeySpec::new("guidance_in.out_layer.weight", &[h, h]));
        }
        for i in 0..self.depth {
            for stream in ["img", "txt"] {
                let p = format!("double_blocks.{i}.{stream}");
                keys.push(KeySpec::new(format!("{p}_attn.qkv.weight"), &[3 * h, h]));
                keys.push(KeySpec::new(
                    format!("{p}_attn.norm.query_norm.scale"),
                    &[hd],
                ));
                keys.push(KeySpec::new(format!("{p}_attn.norm.key_norm.scale"), &[hd]));
                keys.push(KeySpec::new(format!("{p}_attn.proj.weight"), &[h, h]));
                keys.push(KeySpec::new(format!("{p}_mlp.0.weight"), &[2 * m, h]));
                keys.push(KeySpec::new(format!("{p}_mlp.2.weight"), &[h, m]));
            }
        }
        for i in 0..self.depth_single_blocks {
            let p = format!("single_blocks.{i}");
            keys.push(KeySpec::new(
                format!("{p}.linear1.weight"),
                &[3 * h + 2 * m, h],
            ));
            keys.push(KeySpec::new(format!("{p}.linear2.weight"), &[h, h + m]));
            keys.push(KeySpec::new(format!("{p}.norm.query_norm.scale"), &[hd]));
            keys.push(KeySpec::new(format!("{p}.norm.key_norm.scale"), &[hd]));
        }
        keys
    }

    /// `[out, in]` of every linear layer, by BFL module path (for matching LoRA files).
    pub fn linear_shapes(&self) -> Vec<(String, [usize; 2])> {
        self.expected_keys()
            .into_iter()
            .filter_map(|spec| {
                let path = spec.key.strip_suffix(".weight")?;
                match spec.shape.as_slice() {
                    [out, input] => Some((path.to_string(), [*out, *input])),
                    _ => None,
                }
            })
            .collect()
    }

    /// Total number of parameters.
    pub fn parameter_count(&self) -> usize {
        self.expected_keys()
            .iter()
            .map(|k| k.shape.iter().product::<usize>())
            .sum()
    }
}

/// Name of the optional file, next to the DiT weights, that gives `axes_dim` and `theta`.
pub const CONFIG_FILE_NAME: &str = "flux2_dit_config.json";

fn read_overrides(weights: &Path) -> Result<ConfigOverrides> {
    let Some(directory) = weights.parent() else {
        return Ok(ConfigOverrides::default());
    };
    let file = directory.join(CONFIG_FILE_NAME);
    if !file.exists() {
        return Ok(ConfigOverrides::default());
    }
    let text = std::fs::read_to_string(&file)
        .map_err(|e| Error::io(&file, "cannot read DiT config", e))?;
    serde_json::from_str(&text).map_err(|e| Error::InvalidConfig {
        path: file,
        message: format!("expected {{\"axes_dim\": [a, b, c, d], \"theta\": number}}: {e}"),
    })
}
