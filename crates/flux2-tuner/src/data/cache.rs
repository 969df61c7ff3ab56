//! Musubi-compatible cache files (`dataset/cache_io.py` `save_latent_cache_flux_2`,
//! `save_text_encoder_output_cache_flux_2`, `dataset/image_video_dataset.py`
//! `get_latent_cache_path` / `get_text_encoder_output_cache_path`):
//! * latents: `{stem}_{WWWW}x{HHHH}_{arch}.safetensors` (original image size), keys
//!   `latents_{h}x{w}_{dtype}` `[128, h, w]` and `latents_control_{i}_{h}x{w}_{dtype}`;
//! * text: `{stem}_{arch}_te.safetensors`, key `ctx_vec_{dtype}` `[512, D]`;
//! * metadata `architecture` (full name), `format_version` = `1.0.1`, plus `width`/`height` or
//!   `caption1`. Files are written atomically; NaN values are stored as 0 as Musubi does.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

use super::mask::loss_mask_key;
use crate::checkpoint::{save_safetensors, Checkpoint};
use crate::error::{Error, Result};

/// Musubi's cache `format_version`.
pub const FORMAT_VERSION: &str = "1.0.1";

/// The full architecture name written into cache metadata (`ARCHITECTURE_FLUX_2_*_FULL`).
pub fn architecture_full_name(architecture: &str) -> &'static str {
    match architecture {
        "f2d" => "flux_2_dev",
        "f2k4b" => "flux_2_klein_4b",
        "f2k9b" => "flux_2_klein_9b",
        _ => "unknown",
    }
}

/// torch's dtype name as Musubi's `dtype_to_str` writes it in keys.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        DType::F8E4M3 => "float8_e4m3fn",
        DType::U8 => "uint8",
        DType::U32 => "uint32",
        DType::I64 => "int64",
        _ => "unknown",
    }
}

/// Musubi's `remove_dtype_suffix`: drops a trailing `_{dtype}` (`float32`, `bfloat16`,
/// `float8_e4m3fn`, ...) from a key.
pub fn strip_dtype_suffix(key: &str) -> &str {
    const SUFFIXES: &[&str] = &[
        "_float8_e4m3fn",
        "_float8_e5m2",
        "_bfloat16",
        "_float16",
        "_float32",
        "_float64",
        "_uint8",
        "_int64",
        "_int32",
    ];
    SUFFIXES
        .iter()
        .find_map(|suffix| key.strip_suffix(suffix))
        .unwrap_or(key)
}

/// `{cache_directory}/{stem}_{W:04}x{H:04}_{arch}.safetensors`.
pub fn latent_cache_path(
    cache_directory: &Path,
    stem: &str,
    original_size: (u32, u32),
    architecture: &str,
) -> PathBuf {
    cache_directory.join(format!(
        "{stem}_{:04}x{:04}_{architecture}.safetensors",
        original_size.0, original_size.1
    ))
}

/// `{cache_directory}/{stem}_{arch}_te.safetensors`.
pub fn text_cache_path(cache_directory: &Path, stem: &str, architecture: &str) -> PathBuf {
    cache_directory.join(format!("{stem}_{architecture}_te.safetensors"))
}

/// `latents_{h}x{w}` (without the dtype suffix) for a bucket of `(width, height)` pixels.
pub fn latent_key_base(bucket: (u32, u32)) -> String {
    format!("latents_{}x{}", bucket.1 / 16, bucket.0 / 16)
}

/// `latents_control_{i}_{h}x{w}` (without the dtype suffix) for a control of `(width, height)`.
pub fn control_key_base(index: usize, size: (u32, u32)) -> String {
    format!("latents_control_{index}_{}x{}", size.1 / 16, size.0 / 16)
}

/// The item key and original `(width, height)` of a latent cache file name, as Musubi's
/// `prepare_for_training` parses it: split on `_`, the last token is the architecture, the one
/// before it `WxH`, the rest joined with `_` is the key. `None` for names that do not fit.
pub fn parse_latent_cache_name(
    file_name: &str,
    architecture: &str,
) -> Option<(String, (u32, u32))> {
    let rest = file_name.strip_suffix(&format!("_{architecture}.safetensors"))?;
    let (key, size) = rest.rsplit_once('_')?;
    let (width, height) = size.split_once('x')?;
    Some((key.to_string(), (width.parse().ok()?, height.parse().ok()?)))
}

/// Cache files of `architecture` in a directory: latents (`*_{arch}.safetensors`) or text
/// (`*_{arch}_te.safetensors`), sorted. Hidden files (our temporaries) are not listed.
pub fn list_cache_files(directory: &Path, architecture: &str, text: bool) -> Result<Vec<PathBuf>> {
    if !directory.is_dir() {
        return Ok(Vec::new());
    }
    let suffix = if text {
        format!("_{architecture}_te.safetensors")
    } else {
        format!("_{architecture}.safetensors")
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(directory)
        .map_err(|e| Error::io(directory, "cannot list the cache directory", e))?
    {
        let entry =
            entry.map_err(|e| Error::io(directory, "cannot list the cache directory", e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && name.ends_with(&suffix) && entry.path().is_file() {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

/// Temporaries of cache files of `architecture` left by killed runs: `checkpoint::write_atomically`
/// writes `.{name}.{pid}.tmp` and renames it, so one of another process is half-written garbage
/// (caching the same directory from two processes at once is not supported).
pub fn list_leftover_temporaries(
    directory: &Path,
    architecture: &str,
    text: bool,
) -> Result<Vec<PathBuf>> {
    if !directory.is_dir() {
        return Ok(Vec::new());
    }
    let suffix = if text {
        format!("_{architecture}_te.safetensors")
    } else {
        format!("_{architecture}.safetensors")
    };
    let own = format!(".{}.tmp", std::process::id());
    let mut files = Vec::new();
    for entry in std::fs::read_dir(directory)
        .map_err(|e| Error::io(directory, "cannot list the cache directory", e))?
    {
        let entry =
            entry.map_err(|e| Error::io(directory, "cannot list the cache directory", e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(inner) = name
            .strip_prefix('.')
            .and_then(|rest| rest.strip_suffix(".tmp"))
        else {
            continue;
        };
        let Some((cache_name, pid)) = inner.rsplit_once('.') else {
            continue;
        };
        if cache_name.ends_with(&suffix)
            && pid.chars().all(|c| c.is_ascii_digit())
            && !name.ends_with(&own)
            && entry.path().is_file()
        {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

/// NaN to 0 (Musubi `save_latent_cache_common` warns and does the same).
fn without_nan(tensor: &Tensor) -> Result<Tensor> {
    let is_nan = tensor.ne(tensor)?;
    Ok(is_nan.where_cond(&tensor.zeros_like()?, tensor)?)
}

/// Writes a latent cache: `latent` `[128, h, w]` and one `[128, hi, wi]` per control, all in the
/// dtype they come in (the key suffix names it), plus the optional `[1, h, w]` f32 loss mask
/// (beyond Musubi, see `data::mask`).
pub fn write_latent_cache(
    path: &Path,
    latent: &Tensor,
    controls: &[Tensor],
    loss_mask: Option<&Tensor>,
    architecture: &str,
    original_size: (u32, u32),
) -> Result<()> {
    let suffix = dtype_name(latent.dtype());
    let (_, height, width) = latent.dims3()?;
    let mut tensors = vec![(
        format!("latents_{height}x{width}_{suffix}"),
        without_nan(latent)?,
    )];
    for (index, control) in controls.iter().enumerate() {
        let (_, height, width) = control.dims3()?;
        tensors.push((
            format!(
                "latents_control_{index}_{height}x{width}_{}",
                dtype_name(control.dtype())
            ),
            without_nan(control)?,
        ));
    }
    if let Some(mask) = loss_mask {
        let (_, height, width) = mask.dims3()?;
        tensors.push((loss_mask_key(height, width), mask.to_dtype(DType::F32)?));
    }
    let metadata = HashMap::from([
        (
            "architecture".to_string(),
            architecture_full_name(architecture).to_string(),
        ),
        ("width".to_string(), original_size.0.to_string()),
        ("height".to_string(), original_size.1.to_string()),
        ("format_version".to_string(), FORMAT_VERSION.to_string()),
    ]);
    save_safetensors(path, &tensors, Some(metadata))
}

/// Writes a text-encoder cache: `ctx_vec` `[512, D]`. Keys of an existing file whose
/// dtype-stripped name differs are kept, and its extra metadata too, as Musubi's
/// `save_text_encoder_output_cache_common` does; an unreadable old file is replaced.
pub fn write_text_cache(
    path: &Path,
    ctx_vec: &Tensor,
    architecture: &str,
    caption: &str,
) -> Result<()> {
    let key = format!("ctx_vec_{}", dtype_name(ctx_vec.dtype()));
    let mut tensors = vec![(key.clone(), without_nan(ctx_vec)?)];
    let mut metadata = HashMap::new();
    if path.is_file() {
        if let Ok(existing) = Checkpoint::open(path) {
            for old in existing.keys() {
                if strip_dtype_suffix(old) != strip_dtype_suffix(&key) {
                    let dtype = existing
                        .entry(old)
                        .and_then(|(_, entry)| entry.dtype.candle())
                        .unwrap_or(DType::F32);
                    tensors.push((
                        old.to_string(),
                        existing.load(old, dtype, &candle_core::Device::Cpu)?,
                    ));
                }
            }
            for (name, value) in existing.metadata() {
                metadata.insert(name.clone(), value.clone());
            }
        }
    }
    metadata.insert(
        "architecture".to_string(),
        architecture_full_name(architecture).to_string(),
    );
    metadata.insert("caption1".to_string(), caption.to_string());
    metadata.insert("format_version".to_string(), FORMAT_VERSION.to_string());
    save_safetensors(path, &tensors, Some(metadata))
}

/// The tensor keys of a cache file with their dtype suffix removed, sorted; `None` when the file
/// cannot be read as safetensors.
pub fn cache_key_bases(path: &Path) -> Option<Vec<String>> {
    let checkpoint = Checkpoint::open(path).ok()?;
    let mut keys: Vec<String> = checkpoint
        .keys()
        .map(|k| strip_dtype_suffix(k).to_string())
        .collect();
    keys.sort();
    Some(keys)
}
