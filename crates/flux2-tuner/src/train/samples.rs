//! Sample images during training (Musubi `trainer_base.sample_images` /
//! `sample_image_inference`, FLUX.2's `process_sample_prompts` / `do_inference`), made with the
//! same pipeline functions as `generate` (`preflight`, `encode_prompts`, `encode_controls`,
//! `sample_latents`, `decode_image`), so a sample equals `generate` run with the LoRA saved at
//! that step (unmerged, multiplier 1) and the same prompt, seed, size and steps.
//!
//! - Before training: the prompt file is read and checked, then the text encoder is loaded once,
//!   encodes every prompt (and the negative prompt for klein-base's CFG) and is freed, before the
//!   DiT is loaded, as Musubi. Control images are encoded once with the AE then.
//! - The AE is loaded (in `--vae_dtype`) at each sampling event and freed after it, so training
//!   between events needs no more memory than without samples; reading it is fast next to
//!   sampling.
//! - When: `--sample_at_first` before the first step of the run (named `e000000` as in Musubi; a
//!   resumed run samples its starting step, named by that step, since the resumed LoRA is what
//!   the user wants to see), `--sample_every_n_steps` after each N-th optimiser step (`{step:06}`),
//!   `--sample_every_n_epochs` at the end of each N-th epoch (`e{epoch:06}`), including a last
//!   epoch cut short by `--max_train_steps`. Unlike Musubi, an epoch end does not sample again
//!   because its step count is a multiple of `--sample_every_n_steps`.
//! - The LoRA stays attached unmerged at multiplier 1, but its tensors are swapped for detached
//!   views during sampling (so no autograd graph is kept across the denoising steps) and put back
//!   afterwards. The noise comes from each prompt's own seeded generator, so the training random
//!   state is not touched and a run's losses are the same with and without samples.
//! - Output: `{output_dir}/sample/{output_name}_{e%06d | %06d}_{idx:02d}_{YYYYmmddHHMMSS}[_{seed}].png`
//!   (UTC time; the seed only when the file gave it), with the generation parameters in PNG text
//!   chunks as `generate` writes them.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::image_io::write_png;
use crate::models::ae::AutoEncoder;
use crate::models::dit::Flux2Dit;
use crate::models::version::TextEncoderKind;
use crate::models::ModelVersion;
use crate::quant::Fp8Mode;
use crate::sample::generate::{
    decode_image, encode_controls, encode_prompts, preflight, sample_latents, Conditioning,
    GeneratorConfig, Silent,
};
use crate::sample::request::ImageRequest;
use crate::train::network::with_detached_adapters;
use crate::train::sample_prompts::{load_sample_prompts, SamplePrompt};
use crate::train::trainer::{TrainObserver, TrainOptions};

/// The sampling flags (`--sample_prompts` and friends, with the models they need).
#[derive(Debug, Clone)]
pub struct SampleOptions {
    /// `.txt`, `.toml` or `.json` prompt file.
    pub prompts: PathBuf,
    pub every_n_steps: Option<usize>,
    pub every_n_epochs: Option<usize>,
    pub at_first: bool,
    /// Mistral-3 (dev) or Qwen3 (klein) weights.
    pub text_encoder: PathBuf,
    /// F8E4M3 text-encoder linears (Qwen3 only, as Musubi).
    pub fp8_text_encoder: bool,
    /// The AE, for control images and decoding.
    pub vae: PathBuf,
    /// `--vae_dtype` (f32 by default for FLUX.2, as Musubi).
    pub vae_dtype: DType,
}

impl SampleOptions {
    /// Whether any event asks for samples.
    pub fn any_event(&self) -> bool {
        self.at_first
            || self.every_n_steps.is_some_and(|n| n > 0)
            || self.every_n_epochs.is_some_and(|n| n > 0)
    }
}

/// A prompt with its text conditioning and encoded control images.
struct PreparedSample {
    prompt: SamplePrompt,
    conditioning: Conditioning,
    controls: Option<(Tensor, Tensor)>,
}

/// When a sampling event happens; gives the `{e%06d | %06d}` part of the name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleEvent {
    /// `--sample_at_first` (epoch 0, or the resumed step).
    First {
        step: usize,
    },
    Step(usize),
    Epoch {
        epoch: usize,
        step: usize,
    },
}

impl SampleEvent {
    fn label(self) -> String {
        match self {
            SampleEvent::First { step: 0 } => format!("e{:06}", 0),
            SampleEvent::First { step } | SampleEvent::Step(step) => format!("{step:06}"),
            SampleEvent::Epoch { epoch, .. } => format!("e{epoch:06}"),
        }
    }

    fn step(self) -> usize {
        match self {
            SampleEvent::First { step } | SampleEvent::Step(step) => step,
            SampleEvent::Epoch { step, .. } => step,
        }
    }
}

/// Everything needed to write samples during a run.
pub struct TrainingSamples {
    options: SampleOptions,
    config: GeneratorConfig,
    directory: PathBuf,
    output_name: String,
    samples: Vec<PreparedSample>,
}

impl TrainingSamples {
    /// Reads and checks the prompts and models, encodes the prompts (text encoder loaded and
    /// freed) and the control images. `None` when the run samples nothing.
    pub fn prepare(options: &TrainOptions) -> Result<Option<Self>> {
        let Some(sample) = options.samples.as_ref().filter(|s| s.any_event()) else {
            return Ok(None);
        };
        let info = options.version.info();
        if sample.fp8_text_encoder && info.text_encoder == TextEncoderKind::Mistral3 {
            return Err(Error::InvalidArgument {
                name: "--fp8_text_encoder".into(),
                message: format!(
                    "fp8 is available for the Qwen3 text encoder (klein) only, not for {}'s \
                     Mistral-3 (as Musubi)",
                    options.version
                ),
            });
        }
        let prompts = load_sample_prompts(&sample.prompts, options.seed)?;
        let config = GeneratorConfig {
            version: options.version,
            dit: options.dit.clone(),
            ae: sample.vae.clone(),
            text_encoder: sample.text_encoder.clone(),
            tokenizer: None,
            device: options.device.clone(),
            dit_dtype: options.dit_dtype,
            text_encoder_dtype: DType::BF16,
            fp8_text_encoder: sample.fp8_text_encoder,
            loras: Vec::new(),
            merge_loras: false,
            no_resize_control: false,
            fp8: Fp8Mode::Off,
            // The training DiT is used as loaded; this config never loads one.
            blocks_to_swap: 0,
        };
        // Headers, shapes and the tokenizer first, so a wrong file fails before any model loads.
        preflight(&config, true, true)?;
        let requests: Vec<ImageRequest> = prompts.iter().map(|p| p.request.clone()).collect();
        let conditioning = encode_prompts(&config, &requests, &mut Silent)?;
        let mut controls = Vec::with_capacity(prompts.len());
        if requests.iter().any(|r| !r.control_images.is_empty()) {
            let ae = load_ae(sample, &options.device)?;
            for request in &requests {
                controls.push(encode_controls(&ae, request, false, &options.device)?);
            }
        } else {
            controls.resize(prompts.len(), None);
        }
        let samples = prompts
            .into_iter()
            .zip(conditioning)
            .zip(controls)
            .map(|((prompt, conditioning), controls)| PreparedSample {
                prompt,
                conditioning,
                controls,
            })
            .collect();
        Ok(Some(Self {
            options: sample.clone(),
            config,
            directory: options.output_dir.join("sample"),
            output_name: options.output_name.clone(),
            samples,
        }))
    }

    /// `--sample_at_first`: before the first step this run makes.
    pub fn at_first(
        &self,
        dit: &mut Flux2Dit,
        step: usize,
        observer: &mut dyn TrainObserver,
    ) -> Result<()> {
        if self.options.at_first {
            self.write(dit, SampleEvent::First { step }, observer)?;
        }
        Ok(())
    }

    /// `--sample_every_n_steps`: after optimiser step `step` (1-based).
    pub fn after_step(
        &self,
        dit: &mut Flux2Dit,
        step: usize,
        observer: &mut dyn TrainObserver,
    ) -> Result<()> {
        if self
            .options
            .every_n_steps
            .is_some_and(|n| n > 0 && step % n == 0)
        {
            self.write(dit, SampleEvent::Step(step), observer)?;
        }
        Ok(())
    }

    /// `--sample_every_n_epochs`: at the end of epoch `epoch` (1-based).
    pub fn after_epoch(
        &self,
        dit: &mut Flux2Dit,
        epoch: usize,
        step: usize,
        observer: &mut dyn TrainObserver,
    ) -> Result<()> {
        if self
            .options
            .every_n_epochs
            .is_some_and(|n| n > 0 && epoch % n == 0)
        {
            self.write(dit, SampleEvent::Epoch { epoch, step }, observer)?;
        }
        Ok(())
    }

    /// Samples every prompt with the DiT as it is (LoRA attached) and writes the PNGs.
    pub fn write(
        &self,
        dit: &mut Flux2Dit,
        event: SampleEvent,
        observer: &mut dyn TrainObserver,
    ) -> Result<()> {
        with_detached_adapters(dit, |dit| self.write_all(dit, event, observer))
    }

    fn write_all(
        &self,
        dit: &Flux2Dit,
        event: SampleEvent,
        observer: &mut dyn TrainObserver,
    ) -> Result<()> {
        std::fs::create_dir_all(&self.directory)
            .map_err(|e| Error::io(&self.directory, "cannot create the sample folder", e))?;
        let ae = load_ae(&self.options, &self.config.device)?;
        for sample in &self.samples {
            let request = &sample.prompt.request;
            let latents = sample_latents(
                dit,
                self.config.version,
                &sample.conditioning,
                sample.controls.as_ref(),
                request,
                |_, _| {},
            )?;
            let image = decode_image(&ae, &latents)?;
            let seed = if sample.prompt.seed_given {
                format!("_{}", request.seed)
            } else {
                String::new()
            };
            let path = self.directory.join(format!(
                "{}_{}_{:02}_{}{seed}.png",
                self.output_name,
                event.label(),
                sample.prompt.index,
                timestamp()
            ));
            write_png(
                &path,
                &image,
                &parameters(request, self.config.version, &self.output_name, event),
            )?;
            observer.sampled(&path);
        }
        Ok(())
    }
}

fn load_ae(options: &SampleOptions, device: &Device) -> Result<AutoEncoder> {
    AutoEncoder::load(&Checkpoint::open(&options.vae)?, options.vae_dtype, device)
}

/// `YYYYmmddHHMMSS` (UTC; Musubi uses local time).
fn timestamp() -> String {
    let (year, month, day, hour, minute, second, _) = crate::util::time::utc_now();
    format!("{year:04}{month:02}{day:02}{hour:02}{minute:02}{second:02}")
}

/// The PNG text chunks, as `generate` writes them (`parameters` summary and `flux2_tuner` JSON),
/// with the LoRA named by the run and its step.
pub fn parameters(
    request: &ImageRequest,
    version: ModelVersion,
    output_name: &str,
    event: SampleEvent,
) -> Vec<(String, String)> {
    let lora = format!("{output_name}@step{}:1", event.step());
    let epoch = match event {
        SampleEvent::Epoch { epoch, .. } => Some(epoch),
        _ => None,
    };
    let json = serde_json::json!({
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "seed": request.seed,
        "infer_steps": request.steps,
        "guidance": request.guidance,
        "height": request.height,
        "width": request.width,
        "flow_shift": request.flow_shift,
        "model_version": version.name(),
        "loras": [lora],
        "control_images": request
            .control_images
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>(),
        "training_step": event.step(),
        "training_epoch": epoch,
    });
    let summary = format!(
        "{}\nNegative prompt: {}\nSteps: {}, Guidance: {}, Seed: {}, Size: {}x{}, Model: FLUX.2 {}, LoRAs: {lora}",
        request.prompt,
        request.negative_prompt.as_deref().unwrap_or(""),
        request.steps,
        request.guidance,
        request.seed,
        request.width,
        request.height,
        version.name(),
    );
    vec![
        ("parameters".into(), summary),
        ("flux2_tuner".into(), json.to_string()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_labels_follow_musubi() {
        assert_eq!(SampleEvent::First { step: 0 }.label(), "e000000");
        assert_eq!(SampleEvent::First { step: 12 }.label(), "000012");
        assert_eq!(SampleEvent::Step(4).label(), "000004");
        assert_eq!(SampleEvent::Epoch { epoch: 3, step: 9 }.label(), "e000003");
    }

    #[test]
    fn timestamps_have_fourteen_digits() {
        let stamp = timestamp();
        assert_eq!(stamp.len(), 14);
        assert!(stamp.bytes().all(|b| b.is_ascii_digit()));
    }

    #[test]
    fn parameters_name_the_run_and_step() {
        let request = ImageRequest {
            prompt: "a cat".into(),
            negative_prompt: Some(" ".into()),
            height: 64,
            width: 48,
            steps: 3,
            guidance: 2.5,
            seed: 7,
            flow_shift: None,
            control_images: vec![],
        };
        let chunks = parameters(
            &request,
            ModelVersion::KleinBase4b,
            "run",
            SampleEvent::Epoch { epoch: 2, step: 8 },
        );
        let json: serde_json::Value = serde_json::from_str(&chunks[1].1).unwrap();
        assert_eq!(json["seed"], 7);
        assert_eq!(json["width"], 48);
        assert_eq!(json["training_step"], 8);
        assert_eq!(json["training_epoch"], 2);
        assert_eq!(json["loras"][0], "run@step8:1");
        assert!(chunks[0].1.starts_with(
            "a cat\nNegative prompt:  \nSteps: 3, Guidance: 2.5, Seed: 7, Size: 48x64"
        ));
    }
}
