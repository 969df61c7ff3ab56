//! The empty-prompt embedding that caption dropout (`train --caption_dropout_rate`) trains on, as
//! sd-scripts' caption dropout does with `""`. Musubi has no caption dropout; this file is ours.
//!
//! `cache-text-encoder-outputs` encodes `""` once and writes it into every cache directory as
//! `empty_prompt.{arch}_te.safetensors` (key `ctx_vec_{dtype}` `[512, D]`, metadata `caption1` = "",
//! the text-cache layout). The `.` before the architecture keeps the name out of every cache
//! listing (ours and Musubi's match `*_{arch}_te.safetensors` and `*_{arch}.safetensors`), so no
//! image can collide with it and stale-cache cleaning never removes it.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::cache::{strip_dtype_suffix, write_text_cache};
use super::config::DatasetConfig;
use super::observer::CacheObserver;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::models::text::encoder::{TextEncoder, TextEncoderOptions};

use super::cache_text::TextCacheOptions;

/// `{cache_directory}/empty_prompt.{arch}_te.safetensors`.
pub fn empty_prompt_cache_path(cache_directory: &Path, architecture: &str) -> PathBuf {
    cache_directory.join(format!("empty_prompt.{architecture}_te.safetensors"))
}

/// True when `path` holds a `ctx_vec` encoded from the empty prompt.
fn is_up_to_date(path: &Path) -> bool {
    let Ok(checkpoint) = Checkpoint::open(path) else {
        return false;
    };
    checkpoint
        .keys()
        .any(|k| strip_dtype_suffix(k) == "ctx_vec")
        && checkpoint.metadata().get("caption1").map(String::as_str) == Some("")
}

/// Loads the version's text encoder as `cache-text-encoder-outputs` does.
pub(crate) fn load_text_encoder(options: &TextCacheOptions) -> Result<TextEncoder> {
    let info = options.version.info();
    let mut encoder_options =
        TextEncoderOptions::new(info.text_encoder, options.device.clone(), options.dtype);
    encoder_options.tokenizer = options.tokenizer.clone();
    encoder_options.placement.fp8 = options.fp8;
    TextEncoder::load(&options.text_encoder, info.text_encoder, &encoder_options)
}

/// Writes the empty-prompt embedding into the cache directory of every dataset of `config`
/// (skipped where `skip_existing` finds it up to date). `encoder` is the job's encoder, loaded
/// here when it is still `None` and something needs encoding.
pub fn write_empty_prompt_caches(
    config: &DatasetConfig,
    options: &TextCacheOptions,
    encoder: &mut Option<TextEncoder>,
    observer: &mut dyn CacheObserver,
) -> Result<()> {
    let architecture = options.version.info().cache_architecture;
    let mut directories: Vec<&Path> = Vec::new();
    for spec in &config.datasets {
        let directory = spec.cache_directory.as_path();
        if directories.contains(&directory) {
            continue;
        }
        directories.push(directory);
    }
    let todo: Vec<PathBuf> = directories
        .iter()
        .map(|d| empty_prompt_cache_path(d, architecture))
        .filter(|path| !(options.skip_existing && is_up_to_date(path)))
        .collect();
    if todo.is_empty() {
        return Ok(());
    }
    if encoder.is_none() {
        observer.phase(&format!(
            "loading text encoder {}",
            options.text_encoder.display()
        ));
        *encoder = Some(load_text_encoder(options)?);
    }
    let Some(text_encoder) = encoder.as_ref() else {
        return Ok(());
    };
    observer.phase("encoding the empty prompt (for --caption_dropout_rate)");
    let ctx = text_encoder
        .encode(&[""])?
        .to_dtype(options.dtype)?
        .to_device(&Device::Cpu)?
        .get(0)?;
    for path in todo {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::io(parent, "cannot create the cache directory", e))?;
        }
        write_text_cache(&path, &ctx, architecture, "")?;
    }
    Ok(())
}

/// Reads the empty-prompt embedding of a cache directory as `dtype` on `device`; a missing file
/// is an error that names the command writing it.
pub fn load_empty_prompt(
    cache_directory: &Path,
    architecture: &str,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let path = empty_prompt_cache_path(cache_directory, architecture);
    if !path.is_file() {
        return Err(Error::InvalidArgument {
            name: "--caption_dropout_rate".into(),
            message: format!(
                "{} is missing: caption dropout trains on the empty-prompt embedding, which \
                 `flux2-tuner cache-text-encoder-outputs` writes into each cache directory; run it \
                 again for this dataset",
                path.display()
            ),
        });
    }
    let checkpoint = Checkpoint::open(&path)?;
    let key = checkpoint
        .keys()
        .find(|k| strip_dtype_suffix(k) == "ctx_vec")
        .ok_or_else(|| Error::InvalidSafetensors {
            path: path.clone(),
            reason: "no `ctx_vec_{dtype}` tensor".into(),
        })?
        .to_string();
    let ctx_vec = checkpoint.load(&key, dtype, device)?;
    if ctx_vec.rank() != 2 || ctx_vec.dim(0)? != 512 {
        return Err(Error::WrongShape {
            path,
            key,
            expected: vec![512, ctx_vec.dims().last().copied().unwrap_or(0)],
            found: ctx_vec.dims().to_vec(),
        });
    }
    Ok(ctx_vec)
}
