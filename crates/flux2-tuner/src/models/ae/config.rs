//! The AE hyper-parameters (BFL `AutoEncoderParams`), their inference from checkpoint shapes, and
//! the exact key/shape table an `ae.safetensors` of a given configuration holds (BFL key names,
//! Musubi loads it strictly).

use std::path::Path;

use crate::checkpoint::{Checkpoint, KeySpec};
use crate::error::{Error, Result};

/// FLUX.2 autoencoder hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct AeConfig {
    /// Image channels in (3).
    pub in_channels: usize,
    /// Image channels out (3).
    pub out_ch: usize,
    /// Base channel count; level `i` has `ch * ch_mult[i]` channels.
    pub ch: usize,
    pub ch_mult: Vec<usize>,
    /// ResnetBlocks per encoder level (the decoder has one more per level).
    pub num_res_blocks: usize,
    /// Latent channels before the 2x2 patchify (32).
    pub z_channels: usize,
    /// GroupNorm groups; shapes cannot tell them (32 unless `flux2_ae_config.json` says otherwise).
    pub num_groups: usize,
    /// GroupNorm epsilon.
    pub group_norm_eps: f64,
    /// Epsilon of the latent BatchNorm (1e-4, not PyTorch's default 1e-5).
    pub batch_norm_eps: f64,
}

/// The config values that shapes cannot tell, read from an optional JSON file next to the weights.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigOverrides {
    num_groups: Option<usize>,
}

/// Name of the optional file, next to the AE weights, that gives `num_groups`.
pub const CONFIG_FILE_NAME: &str = "flux2_ae_config.json";

/// Side of the latent patch folded into channels (2x2 patchify).
pub const PATCH_SIZE: usize = 2;

impl AeConfig {
    /// The real FLUX.2 AE (spec §2.2): ch 128, ch_mult [1, 2, 4, 4], 2 blocks, z 32.
    pub fn real() -> Self {
        Self {
            in_channels: 3,
            out_ch: 3,
            ch: 128,
            ch_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            z_channels: 32,
            num_groups: 32,
            group_norm_eps: 1e-6,
            batch_norm_eps: 1e-4,
        }
    }

    /// Channels of level `level`.
    pub fn level_channels(&self, level: usize) -> usize {
        self.ch * self.ch_mult[level]
    }

    /// Channels of the mid blocks (the deepest level).
    pub fn mid_channels(&self) -> usize {
        self.ch * self.ch_mult.last().copied().unwrap_or(1)
    }

    /// Channels of the normalised latents (z channels times the 2x2 patch).
    pub fn latent_channels(&self) -> usize {
        self.z_channels * PATCH_SIZE * PATCH_SIZE
    }

    /// Pixels per latent cell along one side (8 per downsample level pair times the patch).
    pub fn pixels_per_latent(&self) -> usize {
        (1 << (self.ch_mult.len().saturating_sub(1))) * PATCH_SIZE
    }

    /// Checks that the configuration is usable (every GroupNorm divides into its groups).
    pub fn check(&self, path: &Path) -> Result<()> {
        let fail = |message: String| {
            Err(Error::InvalidConfig {
                path: path.to_path_buf(),
                message,
            })
        };
        if self.ch_mult.is_empty() || self.ch == 0 || self.z_channels == 0 {
            return fail(format!(
                "ch {} with ch_mult {:?} and z_channels {} is not an autoencoder",
                self.ch, self.ch_mult, self.z_channels
            ));
        }
        for level in 0..self.ch_mult.len() {
            let channels = self.level_channels(level);
            if self.num_groups == 0 || channels % self.num_groups != 0 {
                return fail(format!(
                    "level {level} has {channels} channels, not divisible into {} GroupNorm \
                     groups; put the right `num_groups` in {CONFIG_FILE_NAME}",
                    self.num_groups
                ));
            }
        }
        Ok(())
    }

    /// Infers the configuration from tensor shapes (and `flux2_ae_config.json` for the groups).
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
        if checkpoint.shape("encoder.conv_in.weight").is_err()
            && checkpoint
                .keys()
                .any(|k| k.starts_with("encoder.down_blocks"))
        {
            return Err(Error::InvalidConfig {
                path: path.to_path_buf(),
                message: "this is a diffusers-format VAE; flux2-tuner loads the original BFL \
                          `ae.safetensors` (keys `encoder.down.N.block.M...`)"
                    .into(),
            });
        }
        let ch = dim("encoder.conv_in.weight", 0)?;
        let in_channels = dim("encoder.conv_in.weight", 1)?;
        let count = |prefix: &str| {
            let mut n = 0;
            while checkpoint
                .keys()
                .any(|k| k.starts_with(&format!("{prefix}.{n}.")))
            {
                n += 1;
            }
            n
        };
        let levels = count("encoder.down");
        let num_res_blocks = count("encoder.down.0.block");
        if levels == 0 || num_res_blocks == 0 || ch == 0 {
            return Err(Error::InvalidConfig {
                path: path.to_path_buf(),
                message: format!(
                    "found {levels} encoder levels with {num_res_blocks} blocks and {ch} base \
                     channels; expected an LDM autoencoder (`encoder.down.0.block.0.conv1.weight`)"
                ),
            });
        }
        let mut ch_mult = Vec::with_capacity(levels);
        for level in 0..levels {
            let channels = dim(&format!("encoder.down.{level}.block.0.conv1.weight"), 0)?;
            if channels % ch != 0 {
                return Err(Error::InvalidConfig {
                    path: path.to_path_buf(),
                    message: format!(
                        "level {level} has {channels} channels, not a multiple of the base {ch}"
                    ),
                });
            }
            ch_mult.push(channels / ch);
        }
        let overrides = read_overrides(path)?;
        let config = Self {
            in_channels,
            out_ch: dim("decoder.conv_out.weight", 0)?,
            ch,
            ch_mult,
            num_res_blocks,
            z_channels: dim("decoder.conv_in.weight", 1)?,
            num_groups: overrides.num_groups.unwrap_or(32),
            group_norm_eps: 1e-6,
            batch_norm_eps: 1e-4,
        };
        config.check(path)?;
        Ok(config)
    }

    /// Every tensor a BFL `ae.safetensors` of this configuration holds, with its shape
    /// (`bn.num_batches_tracked` excepted: it is optional and unused).
    pub fn expected_keys(&self) -> Vec<KeySpec> {
        let mut keys = Vec::new();
        let z = self.z_channels;
        let levels = self.ch_mult.len();
        // Encoder.
        conv_keys(&mut keys, "encoder.conv_in", self.ch, self.in_channels, 3);
        let mut block_in = self.ch;
        for level in 0..levels {
            let block_out = self.level_channels(level);
            for block in 0..self.num_res_blocks {
                let prefix = format!("encoder.down.{level}.block.{block}");
                resnet_keys(&mut keys, &prefix, block_in, block_out);
                block_in = block_out;
            }
            if level + 1 != levels {
                let prefix = format!("encoder.down.{level}.downsample.conv");
                conv_keys(&mut keys, &prefix, block_in, block_in, 3);
            }
        }
        mid_keys(&mut keys, "encoder.mid", block_in);
        norm_keys(&mut keys, "encoder.norm_out", block_in);
        conv_keys(&mut keys, "encoder.conv_out", 2 * z, block_in, 3);
        conv_keys(&mut keys, "encoder.quant_conv", 2 * z, 2 * z, 1);
        // Decoder.
        let mut block_in = self.mid_channels();
        conv_keys(&mut keys, "decoder.post_quant_conv", z, z, 1);
        conv_keys(&mut keys, "decoder.conv_in", block_in, z, 3);
        mid_keys(&mut keys, "decoder.mid", block_in);
        for level in (0..levels).rev() {
            let block_out = self.level_channels(level);
            for block in 0..=self.num_res_blocks {
                let prefix = format!("decoder.up.{level}.block.{block}");
                resnet_keys(&mut keys, &prefix, block_in, block_out);
                block_in = block_out;
            }
            if level != 0 {
                let prefix = format!("decoder.up.{level}.upsample.conv");
                conv_keys(&mut keys, &prefix, block_in, block_in, 3);
            }
        }
        norm_keys(&mut keys, "decoder.norm_out", block_in);
        conv_keys(&mut keys, "decoder.conv_out", self.out_ch, block_in, 3);
        // Latent BatchNorm (no affine parameters).
        keys.push(KeySpec::new("bn.running_mean", &[self.latent_channels()]));
        keys.push(KeySpec::new("bn.running_var", &[self.latent_channels()]));
        keys
    }

    /// Total number of parameters (running statistics included).
    pub fn parameter_count(&self) -> usize {
        self.expected_keys()
            .iter()
            .map(|k| k.shape.iter().product::<usize>())
            .sum()
    }
}

/// True for keys an AE file may hold beyond [`AeConfig::expected_keys`] without harm.
pub fn is_harmless_extra(key: &str) -> bool {
    key == "bn.num_batches_tracked"
}

fn conv_keys(keys: &mut Vec<KeySpec>, prefix: &str, out: usize, input: usize, kernel: usize) {
    keys.push(KeySpec::new(
        format!("{prefix}.weight"),
        &[out, input, kernel, kernel],
    ));
    keys.push(KeySpec::new(format!("{prefix}.bias"), &[out]));
}

fn norm_keys(keys: &mut Vec<KeySpec>, prefix: &str, channels: usize) {
    keys.push(KeySpec::new(format!("{prefix}.weight"), &[channels]));
    keys.push(KeySpec::new(format!("{prefix}.bias"), &[channels]));
}

fn resnet_keys(keys: &mut Vec<KeySpec>, prefix: &str, input: usize, out: usize) {
    norm_keys(keys, &format!("{prefix}.norm1"), input);
    conv_keys(keys, &format!("{prefix}.conv1"), out, input, 3);
    norm_keys(keys, &format!("{prefix}.norm2"), out);
    conv_keys(keys, &format!("{prefix}.conv2"), out, out, 3);
    if input != out {
        conv_keys(keys, &format!("{prefix}.nin_shortcut"), out, input, 1);
    }
}

fn mid_keys(keys: &mut Vec<KeySpec>, prefix: &str, channels: usize) {
    resnet_keys(keys, &format!("{prefix}.block_1"), channels, channels);
    norm_keys(keys, &format!("{prefix}.attn_1.norm"), channels);
    for projection in ["q", "k", "v", "proj_out"] {
        conv_keys(
            keys,
            &format!("{prefix}.attn_1.{projection}"),
            channels,
            channels,
            1,
        );
    }
    resnet_keys(keys, &format!("{prefix}.block_2"), channels, channels);
}

fn read_overrides(weights: &Path) -> Result<ConfigOverrides> {
    let Some(directory) = weights.parent() else {
        return Ok(ConfigOverrides::default());
    };
    let file = directory.join(CONFIG_FILE_NAME);
    if !file.exists() {
        return Ok(ConfigOverrides::default());
    }
    let text =
        std::fs::read_to_string(&file).map_err(|e| Error::io(&file, "cannot read AE config", e))?;
    serde_json::from_str(&text).map_err(|e| Error::InvalidConfig {
        path: file,
        message: format!("expected {{\"num_groups\": number}}: {e}"),
    })
}
