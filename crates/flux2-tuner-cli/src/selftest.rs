//! `flux2-tuner selftest`: what a new user runs right after installing, with no downloaded
//! weights. It writes tiny random models (DiT, AE, Qwen3 text encoder with a small tokenizer) and a
//! small dataset to a temporary folder, then runs every job through the same code as the real
//! commands (caching, a few training steps, generation with the trained LoRA), checks each stage's
//! output and stops with an error at the first failure.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use flux2_tuner::checkpoint::{save_safetensors, Checkpoint};
use flux2_tuner::models::ae::{write_random_ae, AeConfig};
use flux2_tuner::models::dit::writer::write_random_dit;
use flux2_tuner::models::dit::DitConfig;
use flux2_tuner::models::text::config::TextEncoderConfig;
use flux2_tuner::models::text::qwen3;
use flux2_tuner::models::TextEncoderKind;
use flux2_tuner::util::rng::SeededRng;

/// A small byte-level tokenizer with Qwen3's chat tokens (the one of the golden test models).
const TOKENIZER: &str = include_str!("../../../fixtures/golden/klein/text_encoder/tokenizer.json");
const TOKENIZER_CONFIG: &str =
    include_str!("../../../fixtures/golden/klein/text_encoder/tokenizer_config.json");

/// Arguments of `selftest`.
#[derive(Debug, clap::Args)]
#[command(rename_all = "snake_case")]
pub struct SelftestArgs {
    /// Keep the models and outputs in this folder instead of a temporary one.
    #[arg(long)]
    pub keep_dir: Option<PathBuf>,
}

const TEXT_HIDDEN: usize = 16;

fn write_models(dir: &Path) -> Result<()> {
    let dit = DitConfig {
        in_channels: 128,
        context_in_dim: 3 * TEXT_HIDDEN,
        hidden_size: 64,
        num_heads: 2,
        depth: 1,
        depth_single_blocks: 1,
        mlp_hidden_size: 192,
        axes_dim: [8, 8, 8, 8],
        theta: 2000.0,
        guidance_embed: false,
    };
    write_random_dit(&dit, &dir.join("dit.safetensors"), 1, DType::BF16)?;
    let ae = AeConfig {
        in_channels: 3,
        out_ch: 3,
        ch: 32,
        ch_mult: vec![1, 1, 1, 1],
        num_res_blocks: 1,
        z_channels: 32,
        num_groups: 32,
        group_norm_eps: 1e-6,
        batch_norm_eps: 1e-4,
    };
    write_random_ae(&ae, &dir.join("ae.safetensors"), 2, DType::F32)?;
    let text_dir = dir.join("text_encoder");
    std::fs::create_dir_all(&text_dir)?;
    let text = TextEncoderConfig {
        kind: TextEncoderKind::Qwen3,
        hidden_size: TEXT_HIDDEN,
        intermediate_size: 32,
        num_hidden_layers: 28,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        head_dim: 8,
        rms_norm_eps: 1e-6,
        rope_theta: 1e6,
        vocab_size: 384,
    };
    let mut rng = SeededRng::new(3);
    let tensors = qwen3::expected_keys(&text)
        .into_iter()
        .map(|spec| {
            let count: usize = spec.shape.iter().product();
            let values: Vec<f32> = if spec.key.ends_with("norm.weight") {
                vec![1.0; count]
            } else {
                rng.normal_vec(count)
                    .into_iter()
                    .map(|v| v * 0.05)
                    .collect()
            };
            Ok((
                spec.key,
                Tensor::from_vec(values, spec.shape.as_slice(), &Device::Cpu)?
                    .to_dtype(DType::BF16)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    save_safetensors(&text_dir.join("model.safetensors"), &tensors, None)?;
    let config = serde_json::json!({
        "model_type": "qwen3",
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "head_dim": text.head_dim,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_theta": text.rope_theta,
        "vocab_size": text.vocab_size,
        "tie_word_embeddings": true,
    });
    std::fs::write(text_dir.join("config.json"), config.to_string())?;
    std::fs::write(text_dir.join("tokenizer.json"), TOKENIZER)?;
    std::fs::write(text_dir.join("tokenizer_config.json"), TOKENIZER_CONFIG)?;
    Ok(())
}

fn write_dataset(dir: &Path) -> Result<PathBuf> {
    let images = dir.join("dataset");
    std::fs::create_dir_all(&images)?;
    for (index, (width, height)) in [(64u32, 64u32), (80, 48)].into_iter().enumerate() {
        let pixels: Vec<u8> = (0..width * height)
            .flat_map(|p| {
                let (x, y) = (p % width, p / width);
                [(x * 3) as u8, (y * 5) as u8, (index * 120) as u8]
            })
            .collect();
        let image = flux2_tuner::image_io::RgbImage::from_raw(width, height, pixels)
            .context("image buffer")?;
        flux2_tuner::image_io::write_png(&images.join(format!("sample{index}.png")), &image, &[])?;
        std::fs::write(
            images.join(format!("sample{index}.txt")),
            format!("a test pattern {index}"),
        )?;
    }
    let config = dir.join("dataset.toml");
    std::fs::write(
        &config,
        format!(
            "[general]\nresolution = [64, 64]\ncaption_extension = \".txt\"\nbatch_size = 1\nenable_bucket = true\n\n\
             [[datasets]]\nimage_directory = \"{}\"\ncache_directory = \"{}\"\n",
            images.display(),
            dir.join("cache").display()
        ),
    )?;
    Ok(config)
}

/// Runs one command line through the same parser and code as the real program.
fn run_command(words: &[String]) -> Result<()> {
    let mut all = vec!["flux2-tuner".to_string()];
    all.extend(words.iter().cloned());
    let cli = crate::cli::Cli::try_parse_from(&all)
        .with_context(|| format!("parsing {}", words.join(" ")))?;
    crate::commands::run(cli)
}

fn stage(number: usize, name: &str, work: impl FnOnce() -> Result<String>) -> Result<()> {
    let start = Instant::now();
    eprintln!("selftest [{number}/6] {name} ...");
    let detail = work().with_context(|| format!("selftest stage {number} ({name}) failed"))?;
    eprintln!(
        "selftest [{number}/6] {name}: ok in {:.1} s ({detail})",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

pub fn run(args: &SelftestArgs) -> Result<()> {
    let dir = match &args.keep_dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("flux2-tuner-selftest-{}", std::process::id())),
    };
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let version = "klein-4b";
    let (dit, ae, text) = (
        dir.join("dit.safetensors"),
        dir.join("ae.safetensors"),
        dir.join("text_encoder/model.safetensors"),
    );

    stage(1, "write tiny random models", || {
        write_models(&dir)?;
        Ok(format!(
            "DiT, AE and Qwen3 text encoder in {}",
            dir.display()
        ))
    })?;
    let mut dataset = PathBuf::new();
    stage(2, "write a dataset and cache its latents", || {
        dataset = write_dataset(&dir)?;
        run_command(
            &[
                "cache-latents",
                "--model_version",
                version,
                "--dataset_config",
                &path(&dataset),
                "--vae",
                &path(&ae),
                "--device",
                "cpu",
            ]
            .map(String::from),
        )?;
        let caches = std::fs::read_dir(dir.join("cache"))?.count();
        ensure!(caches == 2, "expected 2 latent caches, found {caches}");
        Ok("2 latent caches".into())
    })?;
    stage(3, "cache text-encoder outputs", || {
        run_command(
            &[
                "cache-text-encoder-outputs",
                "--model_version",
                version,
                "--dataset_config",
                &path(&dataset),
                "--text_encoder",
                &path(&text),
                "--device",
                "cpu",
            ]
            .map(String::from),
        )?;
        // Two latent and two text caches, plus the empty-prompt embedding (caption dropout).
        let caches = std::fs::read_dir(dir.join("cache"))?.count();
        ensure!(caches == 5, "expected 5 cache files, found {caches}");
        Ok("2 text caches".into())
    })?;
    let lora = dir.join("output/selftest.safetensors");
    stage(4, "train a LoRA for 4 steps", || {
        run_command(
            &[
                "train",
                "--model_version",
                version,
                "--dit",
                &path(&dit),
                "--dataset_config",
                &path(&dataset),
                "--output_dir",
                &path(&dir.join("output")),
                "--output_name",
                "selftest",
                "--max_train_steps",
                "4",
                "--learning_rate",
                "1e-3",
                "--optimizer_type",
                "AdamW",
                "--timestep_sampling",
                "flux2_shift",
                "--logging_dir",
                &path(&dir.join("logs")),
                "--device",
                "cpu",
            ]
            .map(String::from),
        )?;
        let checkpoint = Checkpoint::open(&lora)?;
        // One double block (8 linears) and one single block (2), three tensors each.
        ensure!(
            checkpoint.len() == 10 * 3,
            "the LoRA should hold 10 modules x 3 tensors, has {}",
            checkpoint.len()
        );
        let log = std::fs::read_to_string(dir.join("logs/selftest.jsonl"))?;
        let losses: Vec<f64> = log
            .lines()
            .filter_map(|l| {
                serde_json::from_str::<serde_json::Value>(l).ok()?["loss/current"].as_f64()
            })
            .collect();
        ensure!(
            losses.len() == 4 && losses.iter().all(|l| l.is_finite()),
            "losses: {losses:?}"
        );
        Ok(format!("losses {losses:.4?}"))
    })?;
    let images = dir.join("images");
    stage(5, "generate an image with the LoRA", || {
        run_command(
            &[
                "generate",
                "--model_version",
                version,
                "--dit",
                &path(&dit),
                "--vae",
                &path(&ae),
                "--text_encoder",
                &path(&text),
                "--prompt",
                "a test pattern",
                "--image_size",
                "64",
                "96",
                "--seed",
                "1",
                "--lora_weight",
                &path(&lora),
                "--save_path",
                &path(&images),
                "--device",
                "cpu",
            ]
            .map(String::from),
        )?;
        let outputs: Vec<PathBuf> = std::fs::read_dir(&images)?
            .filter_map(|e| Some(e.ok()?.path()))
            .collect();
        ensure!(
            outputs.len() == 1,
            "expected one image, found {}",
            outputs.len()
        );
        let text = flux2_tuner::image_io::read_png_text(&outputs[0])?;
        ensure!(
            text.iter().any(|(_, v)| v.contains("a test pattern")),
            "the PNG lacks its parameters"
        );
        Ok(path(&outputs[0]))
    })?;
    stage(6, "edit with a control image", || {
        let control = dir.join("dataset/sample0.png");
        run_command(
            &[
                "generate",
                "--model_version",
                version,
                "--dit",
                &path(&dit),
                "--vae",
                &path(&ae),
                "--text_encoder",
                &path(&text),
                "--prompt",
                "the same, brighter",
                "--image_size",
                "64",
                "64",
                "--seed",
                "2",
                "--control_image_path",
                &path(&control),
                "--save_path",
                &path(&dir.join("edits")),
                "--device",
                "cpu",
            ]
            .map(String::from),
        )?;
        let count = std::fs::read_dir(dir.join("edits"))?.count();
        if count != 1 {
            bail!("expected one edited image, found {count}");
        }
        Ok("1 image".into())
    })?;
    println!(
        "selftest passed: 6 of 6 stages (files in {})",
        dir.display()
    );
    if args.keep_dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}
