//! The generation pipeline shared by `generate` and by sample images during training: encode the
//! prompts (text encoder loaded, used, freed), encode the control images with the AE, load the DiT
//! with its LoRAs, sample every image, decode. Phases run one model at a time, so peak memory is
//! the largest model, not the sum (as Musubi).

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::image_io::{image_to_tensor, read_rgb, resize_lanczos, tensor_to_image, RgbImage};
use crate::lora::{KeyFilter, LoraFile};
use crate::models::ae::{check_ae_checkpoint, AutoEncoder};
use crate::models::dit::tokens::{
    image_position_ids, pack_latents, reference_time_coordinate, text_position_ids, unpack_tokens,
};
use crate::models::dit::{check_dit_checkpoint, DitConfig, Flux2Dit};
use crate::models::text::encoder::{TextEncoder, TextEncoderCheckpoint, TextEncoderOptions};
use crate::models::text::tokenizer::locate_tokenizer;
use crate::models::{GuidanceMode, ModelVersion};
use crate::sample::request::ImageRequest;
use crate::sample::schedule::{flux2_schedule, shifted_schedule};
use crate::sample::{denoise, DenoiseInputs, Guidance};
use crate::util::rng::SeededRng;

/// Latent channels of every FLUX.2 version (32 AE channels x 2 x 2).
pub const LATENT_CHANNELS: usize = 128;
/// Pixels per latent cell along each side.
pub const PIXELS_PER_LATENT: usize = 16;

/// One LoRA to apply.
#[derive(Debug, Clone)]
pub struct LoraSpec {
    pub path: PathBuf,
    pub multiplier: f64,
    pub filter: KeyFilter,
}

/// The models and how to run them.
#[derive(Debug, Clone)]
pub struct GeneratorConfig {
    pub version: ModelVersion,
    pub dit: PathBuf,
    pub ae: PathBuf,
    pub text_encoder: PathBuf,
    pub tokenizer: Option<PathBuf>,
    pub device: Device,
    /// DiT compute dtype (bf16 as Musubi; f32 for exact comparisons).
    pub dit_dtype: DType,
    pub text_encoder_dtype: DType,
    pub fp8_text_encoder: bool,
    pub loras: Vec<LoraSpec>,
    /// Merge LoRAs into the weights (fast) instead of running them as extra matmuls.
    pub merge_loras: bool,
    /// Use control images at their own size instead of capping their area.
    pub no_resize_control: bool,
    /// F8E4M3 block linears (`--fp8` / `--fp8_scaled`), quantised after the LoRAs are merged.
    pub fp8: crate::quant::Fp8Mode,
    /// `--blocks_to_swap N` (Musubi's split between double and single blocks; 0: off).
    pub blocks_to_swap: usize,
}

/// Progress reports of a run.
pub trait GenerateObserver {
    /// A phase starts (loading a model, decoding, ...).
    fn phase(&mut self, _message: &str) {}
    /// Sampling step `step` (0-based) of `steps` of image `image` of `images` is done.
    fn step(&mut self, _image: usize, _images: usize, _step: usize, _steps: usize) {}
}

/// An observer that reports nothing.
pub struct Silent;
impl GenerateObserver for Silent {}

/// Text conditioning of one request: `[1, 512, context]` and, for CFG, the negative one.
#[derive(Debug, Clone)]
pub struct Conditioning {
    pub positive: Tensor,
    pub negative: Option<Tensor>,
}

/// The negative prompt used when none is given (BFL and diffusers; Musubi uses `" "`).
pub const DEFAULT_NEGATIVE_PROMPT: &str = "";

/// Encodes every request's prompt (and negative prompt for CFG versions) with the text encoder,
/// which is freed on return.
pub fn encode_prompts(
    config: &GeneratorConfig,
    requests: &[ImageRequest],
    observer: &mut dyn GenerateObserver,
) -> Result<Vec<Conditioning>> {
    let info = config.version.info();
    observer.phase(&format!(
        "loading text encoder {}",
        config.text_encoder.display()
    ));
    let mut options = TextEncoderOptions::new(
        info.text_encoder,
        config.device.clone(),
        config.text_encoder_dtype,
    );
    options.tokenizer = config.tokenizer.clone();
    options.placement.fp8 = config.fp8_text_encoder;
    let encoder = TextEncoder::load(&config.text_encoder, info.text_encoder, &options)?;
    observer.phase("encoding prompts");
    let cfg = info.guidance == GuidanceMode::ClassifierFree;
    requests
        .iter()
        .map(|request| {
            let positive = encoder.encode(&[request.prompt.as_str()])?;
            let negative = if cfg {
                let text = request
                    .negative_prompt
                    .as_deref()
                    .unwrap_or(DEFAULT_NEGATIVE_PROMPT);
                Some(encoder.encode(&[text])?)
            } else {
                None
            };
            Ok(Conditioning { positive, negative })
        })
        .collect()
}

/// Reads the LoRA files against the DiT's layer shapes (errors for files of another model).
pub fn load_loras(config: &GeneratorConfig, dit: &DitConfig) -> Result<Vec<(LoraFile, f64)>> {
    let shapes = dit.linear_shapes();
    config
        .loras
        .iter()
        .map(|lora| {
            Ok((
                LoraFile::load(&lora.path, &shapes, &lora.filter, &config.device)?,
                lora.multiplier,
            ))
        })
        .collect()
}

/// Checks every input before any model runs: the DiT's keys, shapes and version, the LoRAs
/// against it, and (when `text` / `ae` are set) the text encoder with its tokenizer and the AE.
/// Reads headers, LoRA tensors and the tokenizer only.
pub fn preflight(config: &GeneratorConfig, text: bool, ae: bool) -> Result<Vec<(LoraFile, f64)>> {
    let dit = check_dit_checkpoint(&Checkpoint::open(&config.dit)?, Some(config.version))?;
    crate::offload::split_blocks_to_swap(
        config.blocks_to_swap,
        dit.depth,
        dit.depth_single_blocks,
    )?;
    let loras = load_loras(config, &dit)?;
    if text {
        let kind = config.version.info().text_encoder;
        let text = TextEncoderCheckpoint::open(&config.text_encoder, kind)?;
        let layers = config.version.info().text_encoder_layers.len();
        if layers * text.config.hidden_size != dit.context_in_dim {
            return Err(Error::WrongModelVersion {
                path: config.text_encoder.clone(),
                expected: format!("a text encoder for {}", config.version),
                reason: format!(
                    "its hidden size {} gives {}-wide conditioning, but the DiT {} takes {}",
                    text.config.hidden_size,
                    layers * text.config.hidden_size,
                    config.dit.display(),
                    dit.context_in_dim
                ),
            });
        }
        locate_tokenizer(&config.text_encoder, config.tokenizer.as_deref())?;
    }
    if ae {
        check_ae_checkpoint(&Checkpoint::open(&config.ae)?)?;
    }
    Ok(loras)
}

/// Loads the DiT and applies the LoRAs (merged, or as adapters when `merge_loras` is off).
pub fn load_dit(
    config: &GeneratorConfig,
    loras: &[(LoraFile, f64)],
    observer: &mut dyn GenerateObserver,
) -> Result<Flux2Dit> {
    observer.phase(&format!("loading DiT {}", config.dit.display()));
    let checkpoint = Checkpoint::open(&config.dit)?;
    if config.blocks_to_swap > 0 {
        return crate::offload::generation::load_swapped_dit(config, &checkpoint, loras, observer);
    }
    load_dit_with_loras(config, &checkpoint, &config.device, loras, observer)
}

/// Loads the DiT onto `device` and applies `loras` (read for `device`), with the fp8 rule shared
/// by the plain and the block-swap paths: with `--fp8` / `--fp8_scaled` each block linear is
/// quantised as it is read, unless LoRAs are merged into the full-precision weights first (as
/// Musubi); then it happens after merging.
pub fn load_dit_with_loras(
    config: &GeneratorConfig,
    checkpoint: &Checkpoint,
    device: &Device,
    loras: &[(LoraFile, f64)],
    observer: &mut dyn GenerateObserver,
) -> Result<Flux2Dit> {
    let mut apply_loras = |dit: &mut Flux2Dit| -> Result<()> {
        for (file, multiplier) in loras {
            observer.phase(&format!(
                "applying LoRA {} x {multiplier}",
                file.path.display()
            ));
            file.apply(dit.linears_mut(), *multiplier, config.merge_loras)?;
        }
        Ok(())
    };
    if config.merge_loras && !loras.is_empty() {
        return Flux2Dit::load_merged_with_fp8(
            checkpoint,
            Some(config.version),
            config.dit_dtype,
            device,
            config.fp8,
            Some(&mut apply_loras),
        );
    }
    // Unmerged LoRAs sit beside the (possibly fp8) weights: quantise while reading.
    let mut dit = Flux2Dit::load_with_fp8(
        checkpoint,
        Some(config.version),
        config.dit_dtype,
        device,
        config.fp8,
    )?;
    apply_loras(&mut dit)?;
    Ok(dit)
}

/// Loads the AE (f32, as Musubi does for both directions).
pub fn load_ae(config: &GeneratorConfig) -> Result<AutoEncoder> {
    let checkpoint = Checkpoint::open(&config.ae)?;
    AutoEncoder::load(&checkpoint, DType::F32, &config.device)
}

/// BFL's control-image preparation (`default_prep`): images with a side under 64 pixels or an
/// aspect ratio over 8 are refused; an area over the cap (2024² for one image, 1024² for several)
/// is scaled down keeping the aspect ratio (Lanczos, sizes truncated); then the centre is cropped
/// to multiples of 16. Musubi instead resizes large images to a square of the cap, which breaks
/// the aspect ratio and, at 2024, the 16-pixel grid; we do not copy that.
pub fn prepare_control_image(
    path: &std::path::Path,
    count: usize,
    no_resize: bool,
) -> Result<RgbImage> {
    let image = read_rgb(path)?;
    let (width, height) = (image.width() as f64, image.height() as f64);
    if width.min(height) < 64.0 || width.max(height) / width.min(height) > 8.0 {
        return Err(Error::Image {
            path: path.to_path_buf(),
            message: format!(
                "control image is {width}x{height}; it needs sides of at least 64 pixels and an aspect \
                 ratio of at most 8"
            ),
        });
    }
    let cap = if count > 1 {
        1024.0 * 1024.0
    } else {
        2024.0 * 2024.0
    };
    let image = if !no_resize && width * height > cap {
        let scale = (cap / (width * height)).sqrt();
        resize_lanczos(&image, (width * scale) as u32, (height * scale) as u32)
    } else {
        image
    };
    let (w, h) = (image.width(), image.height());
    let (crop_w, crop_h) = (w - w % 16, h - h % 16);
    Ok(
        image::imageops::crop_imm(&image, (w - crop_w) / 2, (h - crop_h) / 2, crop_w, crop_h)
            .to_image(),
    )
}

/// Packed reference tokens `[1, r, 128]` and ids `[1, r, 4]` of a request's control images.
pub fn encode_controls(
    ae: &AutoEncoder,
    request: &ImageRequest,
    no_resize: bool,
    device: &Device,
) -> Result<Option<(Tensor, Tensor)>> {
    if request.control_images.is_empty() {
        return Ok(None);
    }
    let count = request.control_images.len();
    let mut tokens = Vec::new();
    let mut ids = Vec::new();
    for (index, path) in request.control_images.iter().enumerate() {
        let image = prepare_control_image(path, count, no_resize)?;
        let latents = ae.encode(&image_to_tensor(&image, device)?)?;
        let (_, _, height, width) = latents.dims4()?;
        tokens.push(pack_latents(&latents)?);
        ids.push(image_position_ids(
            1,
            height,
            width,
            reference_time_coordinate(index),
            device,
        )?);
    }
    Ok(Some((Tensor::cat(&tokens, 1)?, Tensor::cat(&ids, 1)?)))
}

/// The initial noise of a request: `[1, 128, h/16, w/16]` standard normals from
/// [`SeededRng`] (SplitMix64 + Box-Muller), reproducible on every device and machine.
pub fn initial_noise(request: &ImageRequest, device: &Device) -> Result<Tensor> {
    let (height, width) = (
        request.height / PIXELS_PER_LATENT,
        request.width / PIXELS_PER_LATENT,
    );
    let values = SeededRng::new(request.seed).normal_vec(LATENT_CHANNELS * height * width);
    Ok(Tensor::from_vec(
        values,
        (1, LATENT_CHANNELS, height, width),
        device,
    )?)
}

/// The sigma schedule of a request.
pub fn sigmas(request: &ImageRequest) -> Vec<f32> {
    let tokens = (request.height / PIXELS_PER_LATENT) * (request.width / PIXELS_PER_LATENT);
    match request.flow_shift {
        Some(shift) => shifted_schedule(request.steps, shift),
        None => flux2_schedule(request.steps, tokens),
    }
}

/// Samples one request with a loaded DiT; returns latents `[1, 128, h/16, w/16]` (f32).
pub fn sample_latents(
    dit: &Flux2Dit,
    version: ModelVersion,
    conditioning: &Conditioning,
    controls: Option<&(Tensor, Tensor)>,
    request: &ImageRequest,
    mut on_step: impl FnMut(usize, usize),
) -> Result<Tensor> {
    request.check()?;
    let device = conditioning.positive.device().clone();
    let (height, width) = (
        request.height / PIXELS_PER_LATENT,
        request.width / PIXELS_PER_LATENT,
    );
    let noise = pack_latents(&initial_noise(request, &device)?)?;
    let image_ids = image_position_ids(1, height, width, 0, &device)?;
    let text_ids = text_position_ids(1, conditioning.positive.dim(1)?, &device)?;
    let negative_ids;
    let guidance = match version.info().guidance {
        GuidanceMode::Embedded => Guidance::Embedded(request.guidance as f32),
        GuidanceMode::None => Guidance::Distilled,
        GuidanceMode::ClassifierFree => {
            let negative =
                conditioning
                    .negative
                    .as_ref()
                    .ok_or_else(|| Error::InvalidArgument {
                        name: "negative prompt".into(),
                        message: "classifier-free guidance needs a negative conditioning".into(),
                    })?;
            negative_ids = text_position_ids(1, negative.dim(1)?, &device)?;
            Guidance::ClassifierFree {
                scale: request.guidance as f32,
                negative_text: negative,
                negative_text_ids: &negative_ids,
            }
        }
    };
    let sigmas = sigmas(request);
    let tokens = denoise(
        dit,
        &DenoiseInputs {
            noise: &noise,
            image_ids: &image_ids,
            reference_tokens: controls.map(|(t, _)| t),
            reference_ids: controls.map(|(_, i)| i),
            text: &conditioning.positive,
            text_ids: &text_ids,
            sigmas: &sigmas,
            guidance,
        },
        |report| {
            on_step(report.step, report.steps);
            Ok(())
        },
    )?;
    unpack_tokens(&tokens, height, width)
}

/// Decodes latents `[1, 128, h, w]` to an RGB image.
pub fn decode_image(ae: &AutoEncoder, latents: &Tensor) -> Result<RgbImage> {
    tensor_to_image(&ae.decode(&latents.to_dtype(DType::F32)?)?)
}

/// A generated image and its latents.
pub struct Generated {
    pub request: ImageRequest,
    pub latents: Tensor,
    pub image: Option<RgbImage>,
}

/// The whole pipeline for several requests: text, controls, DiT sampling, decoding (skipped when
/// `decode` is false).
pub fn generate(
    config: &GeneratorConfig,
    requests: &[ImageRequest],
    decode: bool,
    observer: &mut dyn GenerateObserver,
) -> Result<Vec<Generated>> {
    for request in requests {
        request.check()?;
    }
    let needs_ae = decode || requests.iter().any(|r| !r.control_images.is_empty());
    let loras = preflight(config, true, needs_ae)?;
    let conditioning = encode_prompts(config, requests, observer)?;
    let ae = if needs_ae {
        observer.phase(&format!("loading AE {}", config.ae.display()));
        Some(load_ae(config)?)
    } else {
        None
    };
    let mut controls = Vec::with_capacity(requests.len());
    for request in requests {
        controls.push(match &ae {
            Some(ae) => encode_controls(ae, request, config.no_resize_control, &config.device)?,
            None => None,
        });
    }
    let dit = load_dit(config, &loras, observer)?;
    observer.phase("sampling");
    let images = requests.len();
    let mut latents = Vec::with_capacity(images);
    for (index, request) in requests.iter().enumerate() {
        latents.push(sample_latents(
            &dit,
            config.version,
            &conditioning[index],
            controls[index].as_ref(),
            request,
            |step, steps| observer.step(index, images, step, steps),
        )?);
    }
    drop(dit);
    let mut out = Vec::with_capacity(images);
    for (request, latents) in requests.iter().zip(latents) {
        let image = match (&ae, decode) {
            (Some(ae), true) => {
                observer.phase("decoding");
                Some(decode_image(ae, &latents)?)
            }
            _ => None,
        };
        out.push(Generated {
            request: request.clone(),
            latents,
            image,
        });
    }
    Ok(out)
}
