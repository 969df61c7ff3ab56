//! `train`'s sampling flags (`--sample_prompts`, `--sample_every_n_steps`,
//! `--sample_every_n_epochs`, `--sample_at_first`, `--text_encoder`, `--fp8_text_encoder`,
//! `--vae`, `--vae_dtype`) checked and turned into the library's `SampleOptions`.

use anyhow::{bail, Context, Result};
use flux2_tuner::models::{ModelVersion, TextEncoderKind};
use flux2_tuner::train::samples::SampleOptions;

use crate::cache_latents::parse_vae_dtype;
use crate::train::TrainArgs;

/// `None` when no sample is asked for; errors for incomplete or contradictory flags.
pub fn sample_options(args: &TrainArgs, version: ModelVersion) -> Result<Option<SampleOptions>> {
    let vae_dtype = parse_vae_dtype(args.vae_dtype.as_deref())?;
    let events = args.sample_at_first
        || args.sample_every_n_steps.is_some()
        || args.sample_every_n_epochs.is_some();
    for (flag, value) in [
        ("--sample_every_n_steps", args.sample_every_n_steps),
        ("--sample_every_n_epochs", args.sample_every_n_epochs),
    ] {
        if value == Some(0) {
            bail!("{flag} 0: give a positive count, or leave the flag out");
        }
    }
    let Some(prompts) = &args.sample_prompts else {
        if events {
            bail!(
                "--sample_at_first / --sample_every_n_steps / --sample_every_n_epochs need \
                 --sample_prompts (the prompt file)"
            );
        }
        if args.fp8_text_encoder {
            eprintln!("note: --fp8_text_encoder has no effect without --sample_prompts");
        }
        return Ok(None);
    };
    if args.fp8_text_encoder && version.info().text_encoder == TextEncoderKind::Mistral3 {
        bail!(
            "--fp8_text_encoder: fp8 is available for the Qwen3 text encoder (klein) only, not for \
             {version}'s Mistral-3 (as Musubi)"
        );
    }
    let text_encoder = args
        .text_encoder
        .clone()
        .context("--sample_prompts needs --text_encoder (to encode the sample prompts)")?;
    let vae = args
        .vae
        .clone()
        .context("--sample_prompts needs --vae (to decode the sample images)")?;
    if !prompts.is_file() {
        bail!("--sample_prompts {}: no such file", prompts.display());
    }
    if !events {
        eprintln!(
            "note: --sample_prompts without --sample_at_first, --sample_every_n_steps or \
             --sample_every_n_epochs writes no samples"
        );
    }
    Ok(Some(SampleOptions {
        prompts: prompts.clone(),
        every_n_steps: args.sample_every_n_steps,
        every_n_epochs: args.sample_every_n_epochs,
        at_first: args.sample_at_first,
        text_encoder,
        fp8_text_encoder: args.fp8_text_encoder,
        vae,
        vae_dtype,
    }))
}
