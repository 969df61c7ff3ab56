//! `flux2-tuner generate`: Musubi's `flux_2_generate_image.py` with its flag names.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use flux2_tuner::checkpoint::{save_safetensors, Checkpoint};
use flux2_tuner::image_io::write_png;
use flux2_tuner::lora::KeyFilter;
use flux2_tuner::models::ModelVersion;
use flux2_tuner::quant::Fp8Mode;
use flux2_tuner::sample::generate::{
    decode_image, generate, load_dit, preflight, GenerateObserver, GeneratorConfig, LoraSpec,
};
use flux2_tuner::sample::{parse_prompt_file, parse_prompt_line, ImageRequest};

use crate::device::{parse_device, AttentionMode};
use crate::progress::StepProgress;

/// Arguments of `generate` (Musubi's names; `--help` lists what each does here).
#[derive(Debug, clap::Args)]
#[command(rename_all = "snake_case")]
pub struct GenerateArgs {
    /// FLUX.2 version: dev, klein-4b, klein-base-4b, klein-9b, klein-base-9b. Checked against the
    /// DiT weights. Sets the defaults of --infer_steps and guidance.
    #[arg(long, default_value = "dev")]
    pub model_version: String,
    /// DiT file (BFL format), or the first shard of a split checkpoint.
    #[arg(long)]
    pub dit: Option<PathBuf>,
    /// Autoencoder file (ae.safetensors, BFL format).
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// Text encoder weights (Mistral-3 for dev, Qwen3 for klein): a file or the first shard.
    #[arg(long)]
    pub text_encoder: Option<PathBuf>,
    /// tokenizer.json (or its folder); by default looked for next to the text encoder and in a
    /// sibling `tokenizer/` folder.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Prompt.
    #[arg(long)]
    pub prompt: Option<String>,
    /// Negative prompt (klein-base classifier-free guidance only). Default: empty, as BFL and
    /// diffusers (Musubi uses a single space).
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Output size: HEIGHT WIDTH, multiples of 16.
    #[arg(long, num_args = 2, value_names = ["HEIGHT", "WIDTH"], default_values_t = [1024, 1024])]
    pub image_size: Vec<usize>,
    /// Sampling steps. Default per version: 4 for klein distilled, 50 otherwise.
    #[arg(long)]
    pub infer_steps: Option<usize>,
    /// Classifier-free guidance scale (klein-base). Default 4.0.
    #[arg(long)]
    pub guidance_scale: Option<f64>,
    /// Embedded guidance (dev). Default 4.0.
    #[arg(long)]
    pub embedded_cfg_scale: Option<f64>,
    /// Fixed flow shift instead of the FLUX.2 resolution-dependent schedule.
    #[arg(long)]
    pub flow_shift: Option<f64>,
    /// Seed of the initial noise (SplitMix64 + Box-Muller: the same image on every machine).
    /// Default: random.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Reference (control) image(s) for editing; several may be given.
    #[arg(long, num_args = 1..)]
    pub control_image_path: Vec<PathBuf>,
    /// Use control images at their own size (cropped to multiples of 16) instead of capping their
    /// area at 2024² (one image) or 1024² (several), aspect ratio kept.
    #[arg(long)]
    pub no_resize_control: bool,
    /// LoRA file(s): Musubi, ComfyUI/ai-toolkit, diffusers/PEFT, LyCORIS LoHa/LoKr.
    #[arg(long, num_args = 1..)]
    pub lora_weight: Vec<PathBuf>,
    /// One multiplier per LoRA (missing ones are 1.0).
    #[arg(long, num_args = 1..)]
    pub lora_multiplier: Vec<f64>,
    /// One regex per LoRA: keep only the keys it matches.
    #[arg(long, num_args = 1..)]
    pub include_patterns: Vec<String>,
    /// One regex per LoRA: drop the keys it matches.
    #[arg(long, num_args = 1..)]
    pub exclude_patterns: Vec<String>,
    /// Keep LoRAs as extra low-rank matmuls instead of merging them into the weights.
    #[arg(long)]
    pub lora_unmerged: bool,
    /// Accepted for Musubi compatibility: LyCORIS files are recognised by their keys.
    #[arg(long)]
    pub lycoris: bool,
    /// Write the DiT with the LoRAs merged (original format) to this file and skip generation.
    #[arg(long)]
    pub save_merged_model: Option<PathBuf>,
    /// Output folder.
    #[arg(long)]
    pub save_path: Option<PathBuf>,
    /// images, latent (saved for --latent_path), or both (latent_images is Musubi's name).
    #[arg(long, default_value = "images")]
    pub output_type: String,
    /// Do not store the generation parameters in the outputs.
    #[arg(long)]
    pub no_metadata: bool,
    /// Decode saved latent files instead of generating.
    #[arg(long, num_args = 1..)]
    pub latent_path: Vec<PathBuf>,
    /// One prompt per line with Musubi's inline options (--w --h --s --d --g --n --fs --ci).
    #[arg(long)]
    pub from_file: Option<PathBuf>,
    /// Read prompt lines (with inline options) from standard input until end of input.
    #[arg(long)]
    pub interactive: bool,
    /// Compute the DiT in float32 instead of bfloat16.
    #[arg(long)]
    pub dit_f32: bool,
    /// Store the DiT's block linears as F8E4M3 (plain cast), dequantised on use.
    #[arg(long)]
    pub fp8: bool,
    /// Store the DiT's block linears as F8E4M3 with Musubi's block-wise scale (one per 64 input
    /// values), dequantised on use; more accurate than --fp8.
    #[arg(long)]
    pub fp8_scaled: bool,
    /// Store the text encoder's linears as F8E4M3.
    #[arg(long)]
    pub fp8_text_encoder: bool,
    /// cpu or cuda (cuda needs a build with `--features cuda`). Default: cuda when available.
    #[arg(long)]
    pub device: Option<String>,
    /// Attention: torch / sdpa (composed matmuls and softmax) or flash (the fused CUDA kernel for
    /// bf16; composed on the CPU); xformers and sageattn are not available.
    #[arg(long, default_value = "torch")]
    pub attn_mode: String,
    /// Keep the Linear weights of N DiT blocks in host memory and copy each to the device just
    /// before use, the next one while the current one computes. Musubi's split: one double block
    /// counts as two single blocks, double = round(N / (1 + r/2)) with r = singles / doubles, at
    /// most n - 2 of each type. Maxima: dev 29, klein-4B 13, klein-9B 16.
    #[arg(long, default_value_t = 0)]
    pub blocks_to_swap: usize,
    /// Refused: candle has no pinned host memory; the swap copies from pageable memory.
    #[arg(long)]
    pub use_pinned_memory_for_block_swap: bool,
    /// Musubi's numpy memmap switch; loading here is always memory-mapped.
    #[arg(long)]
    pub disable_numpy_memmap: bool,
    /// torch.compile (not applicable here: refused with an explanation).
    #[arg(long)]
    pub compile: bool,
    // Memory plan (issue 9; `plan.rs`).
    /// Print the expected peak device memory of this command line, broken down, and exit
    /// without loading anything (same as `flux2-tuner plan generate ...`).
    #[arg(long)]
    pub dry_run: bool,
    /// Device memory to fit, in GiB, for --dry_run (default: asked from the CUDA device).
    #[arg(long)]
    pub vram_gb: Option<f64>,
}

/// What to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutputType {
    Images,
    Latent,
    Both,
}

fn output_type(value: &str) -> Result<OutputType> {
    Ok(match value {
        "images" => OutputType::Images,
        "latent" => OutputType::Latent,
        "both" | "latent_images" => OutputType::Both,
        other => {
            bail!("--output_type: `{other}` is not one of images, latent, both (latent_images)")
        }
    })
}

fn required<'a>(value: &'a Option<PathBuf>, flag: &str) -> Result<&'a PathBuf> {
    value
        .as_ref()
        .with_context(|| format!("{flag} is required"))
}

/// Refuses flags this build cannot honour, with the reason.
fn refuse_unsupported(args: &GenerateArgs) -> Result<()> {
    if args.compile {
        bail!("--compile: torch.compile does not exist in this program; remove the flag");
    }
    flux2_tuner::offload::refuse_block_swap_variants(args.use_pinned_memory_for_block_swap, false)?;
    if (args.fp8 || args.fp8_scaled) && args.save_merged_model.is_some() {
        bail!("--save_merged_model writes the merged model in its original dtype: leave out --fp8 / --fp8_scaled");
    }
    AttentionMode::parse(&args.attn_mode)?;
    Ok(())
}

/// Per-LoRA key filters: the i-th pattern belongs to the i-th LoRA.
fn lora_specs(args: &GenerateArgs) -> Result<Vec<LoraSpec>> {
    for (flag, count) in [
        ("--lora_multiplier", args.lora_multiplier.len()),
        ("--include_patterns", args.include_patterns.len()),
        ("--exclude_patterns", args.exclude_patterns.len()),
    ] {
        if count > args.lora_weight.len() {
            bail!(
                "{flag}: {count} values for {} --lora_weight files",
                args.lora_weight.len()
            );
        }
    }
    let regex = |flag: &str, pattern: Option<&String>| -> Result<Option<regex::Regex>> {
        pattern
            .map(|p| {
                regex::Regex::new(p).with_context(|| format!("{flag}: `{p}` is not a valid regex"))
            })
            .transpose()
    };
    args.lora_weight
        .iter()
        .enumerate()
        .map(|(i, path)| {
            Ok(LoraSpec {
                path: path.clone(),
                multiplier: args.lora_multiplier.get(i).copied().unwrap_or(1.0),
                filter: KeyFilter {
                    include: regex("--include_patterns", args.include_patterns.get(i))?,
                    exclude: regex("--exclude_patterns", args.exclude_patterns.get(i))?,
                },
            })
        })
        .collect()
}

/// The requests of this run: one from the flags, or one per line of --from_file / stdin.
fn requests(args: &GenerateArgs, version: ModelVersion) -> Result<Vec<ImageRequest>> {
    let info = version.info();
    let guidance = match info.guidance {
        flux2_tuner::models::GuidanceMode::Embedded => {
            args.embedded_cfg_scale.unwrap_or(info.default_guidance)
        }
        flux2_tuner::models::GuidanceMode::ClassifierFree => {
            args.guidance_scale.unwrap_or(info.default_guidance)
        }
        flux2_tuner::models::GuidanceMode::None => 1.0,
    };
    let defaults = ImageRequest {
        prompt: args.prompt.clone().unwrap_or_default(),
        negative_prompt: args.negative_prompt.clone(),
        height: args.image_size[0],
        width: args.image_size[1],
        steps: args.infer_steps.unwrap_or(info.default_steps),
        guidance,
        seed: args.seed.unwrap_or_else(random_seed),
        flow_shift: args.flow_shift,
        control_images: args.control_image_path.clone(),
    };
    let requests = if let Some(file) = &args.from_file {
        if args.interactive {
            bail!("--from_file and --interactive cannot be combined");
        }
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read --from_file {}", file.display()))?;
        parse_prompt_file(&text, &defaults)?
    } else if args.interactive {
        let mut requests = Vec::new();
        for line in std::io::stdin().lines() {
            let line = line.context("reading prompts from standard input")?;
            if !line.trim().is_empty() {
                requests.push(parse_prompt_line(&line, &defaults)?);
            }
        }
        requests
    } else {
        if args.prompt.is_none() {
            bail!("--prompt is required (or --from_file, --interactive, --latent_path)");
        }
        vec![defaults]
    };
    if requests.is_empty() {
        bail!("no prompts to generate");
    }
    for request in &requests {
        request.check()?;
        for path in &request.control_images {
            if !path.exists() {
                bail!("control image {} does not exist", path.display());
            }
        }
    }
    Ok(requests)
}

fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    flux2_tuner::util::rng::SeededRng::new(nanos ^ u64::from(std::process::id())).next_u64() >> 32
}

/// The parameters stored with each output.
fn parameters(
    request: &ImageRequest,
    version: ModelVersion,
    loras: &[LoraSpec],
) -> Vec<(String, String)> {
    let lora_text: Vec<String> = loras
        .iter()
        .map(|l| format!("{}:{}", l.path.display(), l.multiplier))
        .collect();
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
        "loras": lora_text,
        "control_images": request.control_images.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
    });
    let summary = format!(
        "{}\nNegative prompt: {}\nSteps: {}, Guidance: {}, Seed: {}, Size: {}x{}, Model: FLUX.2 {}{}",
        request.prompt,
        request.negative_prompt.as_deref().unwrap_or(""),
        request.steps,
        request.guidance,
        request.seed,
        request.width,
        request.height,
        version.name(),
        if lora_text.is_empty() { String::new() } else { format!(", LoRAs: {}", lora_text.join(" ")) }
    );
    vec![
        ("parameters".into(), summary),
        ("flux2_tuner".into(), json.to_string()),
    ]
}

/// Saves a latent as Musubi does: key `latent` `[128, h, w]` plus string metadata.
fn save_latent(
    path: &Path,
    latents: &Tensor,
    request: &ImageRequest,
    version: ModelVersion,
    metadata: bool,
) -> Result<()> {
    let mut info = std::collections::HashMap::new();
    if metadata {
        for (key, value) in [
            ("seeds", request.seed.to_string()),
            ("prompt", request.prompt.clone()),
            ("height", request.height.to_string()),
            ("width", request.width.to_string()),
            ("infer_steps", request.steps.to_string()),
            ("embedded_cfg_scale", request.guidance.to_string()),
            ("guidance_scale", request.guidance.to_string()),
            ("model_version", version.name().to_string()),
        ] {
            info.insert(key.to_string(), value);
        }
    }
    let latent = latents.squeeze(0)?.to_dtype(DType::F32)?;
    save_safetensors(path, &[("latent".into(), latent)], Some(info))?;
    Ok(())
}

/// The checks that read no file, shared by a run, `--dry_run` and `plan generate`, so that a plan
/// refuses what a run refuses.
pub fn check_flags(args: &GenerateArgs) -> Result<()> {
    refuse_unsupported(args)?;
    let _: ModelVersion = args.model_version.parse()?;
    output_type(&args.output_type)?;
    lora_specs(args)?;
    Ok(())
}

pub fn run(args: &GenerateArgs) -> Result<()> {
    check_flags(args)?;
    let version: ModelVersion = args.model_version.parse()?;
    let output = output_type(&args.output_type)?;
    if args.dry_run {
        return crate::plan::dry_run_generate(args);
    }
    let device = parse_device(args.device.as_deref())?;
    AttentionMode::parse(&args.attn_mode)?.apply(&device);
    if args.lycoris {
        eprintln!("note: --lycoris is not needed: LoHa/LoKr files are recognised by their keys");
    }
    if !args.latent_path.is_empty() {
        return decode_latent_files(args, &device);
    }
    let loras = lora_specs(args)?;
    let config = GeneratorConfig {
        version,
        dit: required(&args.dit, "--dit")?.clone(),
        ae: args.vae.clone().unwrap_or_default(),
        text_encoder: args.text_encoder.clone().unwrap_or_default(),
        tokenizer: args.tokenizer.clone(),
        device: device.clone(),
        dit_dtype: if args.dit_f32 {
            DType::F32
        } else {
            DType::BF16
        },
        text_encoder_dtype: DType::BF16,
        fp8_text_encoder: args.fp8_text_encoder,
        loras: loras.clone(),
        merge_loras: !args.lora_unmerged,
        no_resize_control: args.no_resize_control,
        // As Musubi: --fp8_scaled wins over --fp8.
        fp8: if args.fp8_scaled {
            Fp8Mode::Scaled
        } else if args.fp8 {
            Fp8Mode::Plain
        } else {
            Fp8Mode::Off
        },
        blocks_to_swap: args.blocks_to_swap,
    };
    if let Some(target) = &args.save_merged_model {
        let mut observer = StepProgress::new();
        let loras = preflight(&config, false, false)?;
        let mut dit = load_dit(&config, &loras, &mut observer)?;
        save_safetensors(target, &dit.state_dict(), None)?;
        eprintln!(
            "saved the merged DiT to {} (no images generated)",
            target.display()
        );
        return Ok(());
    }
    required(&args.vae, "--vae")?;
    required(&args.text_encoder, "--text_encoder")?;
    let save_path = required(&args.save_path, "--save_path")?;
    let requests = requests(args, version)?;

    let start = Instant::now();
    let mut observer = StepProgress::new();
    let generated = generate(
        &config,
        &requests,
        output != OutputType::Latent,
        &mut observer,
    )?;
    let total_steps = observer.finish();
    std::fs::create_dir_all(save_path)
        .with_context(|| format!("cannot create {}", save_path.display()))?;
    for item in &generated {
        let stem = format!(
            "{}_{}",
            flux2_tuner::util::time::file_stamp(),
            item.request.seed
        );
        if output != OutputType::Images {
            let path = save_path.join(format!("{stem}_latent.safetensors"));
            save_latent(
                &path,
                &item.latents,
                &item.request,
                version,
                !args.no_metadata,
            )?;
            eprintln!("saved {}", path.display());
        }
        if let Some(image) = &item.image {
            let path = save_path.join(format!("{stem}.png"));
            let text = if args.no_metadata {
                Vec::new()
            } else {
                parameters(&item.request, version, &loras)
            };
            write_png(&path, image, &text)?;
            eprintln!("saved {}", path.display());
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "generated {} image(s) in {seconds:.1} s, {:.3} s per step ({total_steps} steps)",
        generated.len(),
        observer.sampling_seconds() / total_steps.max(1) as f64
    );
    Ok(())
}

/// `--latent_path`: decode saved latents with the AE and save PNGs.
fn decode_latent_files(args: &GenerateArgs, device: &candle_core::Device) -> Result<()> {
    let save_path = required(&args.save_path, "--save_path")?;
    let vae = required(&args.vae, "--vae")?;
    let ae =
        flux2_tuner::models::ae::AutoEncoder::load(&Checkpoint::open(vae)?, DType::F32, device)?;
    std::fs::create_dir_all(save_path)
        .with_context(|| format!("cannot create {}", save_path.display()))?;
    for path in &args.latent_path {
        let checkpoint = Checkpoint::open(path)?;
        let mut latent = checkpoint
            .load("latent", DType::F32, device)
            .with_context(|| format!("{} is not a latent file from generate", path.display()))?;
        while latent.rank() > 4 {
            latent = latent.squeeze(0)?;
        }
        if latent.rank() == 3 {
            latent = latent.unsqueeze(0)?;
        }
        let image = decode_image(&ae, &latent)?;
        let seed = checkpoint
            .metadata()
            .get("seeds")
            .cloned()
            .unwrap_or_else(|| "0".into());
        let mut text: Vec<(String, String)> = checkpoint
            .metadata()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if args.no_metadata {
            text.clear();
        }
        let out = save_path.join(format!(
            "{}_{seed}.png",
            flux2_tuner::util::time::file_stamp()
        ));
        write_png(&out, &image, &text)?;
        eprintln!("saved {}", out.display());
    }
    Ok(())
}

impl GenerateObserver for StepProgress {
    fn phase(&mut self, message: &str) {
        self.set_phase(message);
    }

    fn step(&mut self, image: usize, images: usize, step: usize, steps: usize) {
        self.advance(image, images, step, steps);
    }
}
