//! Writing files so that nothing half-written is ever left under the final name: write a temporary
//! file next to the target, flush it to disk, then rename it over the target.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use crate::error::{Error, Result};

/// Writes `bytes` produced by `write` to `path` atomically (temp file in the same directory, then
/// rename). A crash at any moment leaves either the old file or the new one.
pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    let directory = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(directory) = directory {
        std::fs::create_dir_all(directory)
            .map_err(|e| Error::io(directory, "cannot create directory", e))?;
    }
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into());
    let temporary: PathBuf =
        path.with_file_name(format!(".{file_name}.{}.tmp", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let file = std::fs::File::create(&temporary)?;
        let mut writer = std::io::BufWriter::new(file);
        write(&mut writer)?;
        writer.flush()?;
        writer.get_ref().sync_all()?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&temporary);
        return Err(Error::io(path, "cannot write file", e));
    }
    std::fs::rename(&temporary, path).map_err(|e| {
        let _ = std::fs::remove_file(&temporary);
        Error::io(path, "cannot move the finished file into place", e)
    })
}

/// Saves tensors (and optional string metadata) as a safetensors file, atomically.
pub fn save_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let views: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, t)| {
            Ok((
                k.clone(),
                t.to_device(&candle_core::Device::Cpu)?.contiguous()?,
            ))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, metadata).map_err(|e| Error::InvalidSafetensors {
        path: path.to_path_buf(),
        reason: format!("cannot serialise: {e}"),
    })?;
    write_atomically(path, |w| w.write_all(&bytes))
}

/// Writes a safetensors file whose tensors (`specs`, all of `dtype`) are zeros without writing the
/// data: the header is written and the file extended, so on most file systems it is sparse and
/// takes no space. For checking real-size layouts without real weights.
pub fn write_zero_checkpoint(
    path: &Path,
    specs: &[crate::checkpoint::KeySpec],
    dtype: crate::checkpoint::StorageDtype,
) -> Result<u64> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for spec in specs {
        let bytes = spec.shape.iter().product::<usize>() * dtype.size();
        header.insert(
            spec.key.clone(),
            serde_json::json!({
                "dtype": dtype.name(),
                "shape": spec.shape,
                "data_offsets": [offset, offset + bytes],
            }),
        );
        offset += bytes;
    }
    let mut text = serde_json::Value::Object(header).to_string();
    // Pad the header so that the data section starts 8-byte aligned.
    while (text.len() + 8) % 8 != 0 {
        text.push(' ');
    }
    let total = 8 + text.len() as u64 + offset as u64;
    write_atomically(path, |w| {
        w.write_all(&(text.len() as u64).to_le_bytes())?;
        w.write_all(text.as_bytes())?;
        w.flush()?;
        w.get_ref().set_len(total)
    })?;
    Ok(total)
}
