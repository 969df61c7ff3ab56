//! The FLUX.2 autoencoder as Musubi and BFL use it: deterministic encode (the distribution mean),
//! 2x2 patchify to 128 channels and BatchNorm with the stored running statistics; decode is the
//! exact inverse followed by the decoder.

use candle_core::{DType, Device, Tensor};

use super::config::{is_harmless_extra, AeConfig};
use super::decoder::Decoder;
use super::encoder::Encoder;
use super::latents::{patchify, unpatchify};
use super::layers::AeWeights;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};

/// The latent BatchNorm's running statistics (`bn.running_mean`, `bn.running_var`), in f32.
struct LatentNorm {
    running_mean: Tensor,
    /// `sqrt(running_var + eps)`, shaped [1, c, 1, 1].
    std: Tensor,
}

pub struct AutoEncoder {
    config: AeConfig,
    encoder: Encoder,
    decoder: Decoder,
    bn: LatentNorm,
    dtype: DType,
    device: Device,
}

/// Checks a checkpoint against the key/shape table of its inferred configuration.
pub fn check_ae_checkpoint(checkpoint: &Checkpoint) -> Result<AeConfig> {
    let config = AeConfig::infer(checkpoint)?;
    checkpoint.validate(&config.expected_keys(), is_harmless_extra)?;
    Ok(config)
}

impl AutoEncoder {
    /// Loads an `ae.safetensors` (BFL keys) strictly, computing in `dtype` (f32 or bf16).
    pub fn load(checkpoint: &Checkpoint, dtype: DType, device: &Device) -> Result<Self> {
        let config = check_ae_checkpoint(checkpoint)?;
        let weights = AeWeights {
            checkpoint,
            device: device.clone(),
            dtype,
            num_groups: config.num_groups,
            group_norm_eps: config.group_norm_eps,
        };
        let channels = config.latent_channels();
        let running_mean = weights
            .tensor_f32("bn.running_mean")?
            .reshape((1, channels, 1, 1))?;
        let std = (weights.tensor_f32("bn.running_var")? + config.batch_norm_eps)?
            .sqrt()?
            .reshape((1, channels, 1, 1))?;
        Ok(Self {
            encoder: Encoder::load(&weights, &config)?,
            decoder: Decoder::load(&weights, &config)?,
            bn: LatentNorm { running_mean, std },
            config,
            dtype,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &AeConfig {
        &self.config
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The encoder's moments [b, 2z, H/8, W/8] (mean then log-variance), in f32.
    pub fn moments(&self, image: &Tensor) -> Result<Tensor> {
        let (_, channels, height, width) = image.dims4()?;
        let multiple = self.config.pixels_per_latent();
        if channels != self.config.in_channels || height % multiple != 0 || width % multiple != 0 {
            return Err(Error::InvalidArgument {
                name: "image".into(),
                message: format!(
                    "the AE encodes [b, {}, H, W] images with H and W multiples of {multiple}, got \
                     {:?}",
                    self.config.in_channels,
                    image.dims()
                ),
            });
        }
        let image = image.to_device(&self.device)?.to_dtype(self.dtype)?;
        Ok(self.encoder.forward(&image)?.to_dtype(DType::F32)?)
    }

    /// Image [b, 3, H, W] in [-1, 1] to normalised latents [b, 128, H/16, W/16] in f32: the
    /// distribution mean (no sampling), patchified, then `(z - mean) / sqrt(var + 1e-4)`.
    pub fn encode(&self, image: &Tensor) -> Result<Tensor> {
        let moments = self.moments(image)?;
        let mean = moments.narrow(1, 0, self.config.z_channels)?;
        self.normalise(&mean)
    }

    /// The distribution mean [b, z, h, w] to normalised latents (patchify, then BatchNorm).
    pub fn normalise(&self, mean: &Tensor) -> Result<Tensor> {
        let patched = patchify(&mean.to_dtype(DType::F32)?)?;
        Ok(patched
            .broadcast_sub(&self.bn.running_mean)?
            .broadcast_div(&self.bn.std)?)
    }

    /// Normalised latents [b, 128, h, w] to an image [b, 3, 16h, 16w] in f32, unclamped.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let (_, channels, _, _) = latents.dims4()?;
        if channels != self.config.latent_channels() {
            return Err(Error::InvalidArgument {
                name: "latents".into(),
                message: format!(
                    "the AE decodes [b, {}, h, w] latents, got {:?}",
                    self.config.latent_channels(),
                    latents.dims()
                ),
            });
        }
        let latents = latents.to_device(&self.device)?.to_dtype(DType::F32)?;
        let z = latents
            .broadcast_mul(&self.bn.std)?
            .broadcast_add(&self.bn.running_mean)?;
        let z = unpatchify(&z)?.to_dtype(self.dtype)?;
        Ok(self.decoder.forward(&z)?.to_dtype(DType::F32)?)
    }
}
