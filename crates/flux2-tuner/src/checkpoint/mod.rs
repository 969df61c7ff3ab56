//! Checkpoints made of one or several safetensors files: shard discovery (Musubi's
//! `*-0000N-of-0000M.safetensors` rule, or an `*.index.json`), strict key/shape/dtype checks
//! before any compute, and atomic writing.

mod safetensors_file;
mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

pub use safetensors_file::{SafetensorsFile, StorageDtype, TensorEntry};
pub use writer::{save_safetensors, write_atomically, write_zero_checkpoint};

use crate::error::{Error, Result};

/// What a model expects of one tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpec {
    pub key: String,
    pub shape: Vec<usize>,
}

impl KeySpec {
    pub fn new(key: impl Into<String>, shape: &[usize]) -> Self {
        Self {
            key: key.into(),
            shape: shape.to_vec(),
        }
    }
}

/// A set of safetensors files read as one key space (later files win on duplicate keys, as Musubi).
pub struct Checkpoint {
    /// The path the user gave (first shard, single file or index).
    path: PathBuf,
    files: Vec<SafetensorsFile>,
    /// Key to index into `files`.
    index: BTreeMap<String, usize>,
}

/// Splits a shard file name `prefix00001-of-00003.safetensors` into (prefix, count).
fn shard_pattern(file_name: &str) -> Option<(String, usize)> {
    let stem = file_name.strip_suffix(".safetensors")?;
    let (before, count) = stem.rsplit_once("-of-")?;
    if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits = before.bytes().rev().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return None;
    }
    let prefix = &before[..before.len() - digits];
    Some((prefix.to_string(), count.parse().ok()?))
}

/// The files that make up the checkpoint named by `path`, in load order.
pub fn checkpoint_files(path: &Path) -> Result<Vec<PathBuf>> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    if name.ends_with(".index.json") {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(path, "cannot read index file", e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::InvalidSafetensors {
                path: path.to_path_buf(),
                reason: format!("index is not valid JSON: {e}"),
            })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::InvalidSafetensors {
                path: path.to_path_buf(),
                reason: "index has no `weight_map` object".into(),
            })?;
        let directory = path.parent().unwrap_or(Path::new("."));
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|v| v.as_str())
            .map(|f| directory.join(f))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    if let Some((prefix, count)) = shard_pattern(&name) {
        let directory = path.parent().unwrap_or(Path::new("."));
        let mut files = Vec::with_capacity(count);
        for i in 1..=count {
            let shard = directory.join(format!("{prefix}{i:05}-of-{count:05}.safetensors"));
            if !shard.exists() {
                return Err(Error::io(
                    &shard,
                    format!(
                        "shard {i} of {count} is missing (expanded from {})",
                        path.display()
                    ),
                    std::io::Error::from(std::io::ErrorKind::NotFound),
                ));
            }
            files.push(shard);
        }
        return Ok(files);
    }
    Ok(vec![path.to_path_buf()])
}

impl Checkpoint {
    /// Opens a single file, the first shard of a split checkpoint, or an `*.index.json`.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::io(
                path,
                "file not found",
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ));
        }
        let files = checkpoint_files(path)?
            .iter()
            .map(|p| SafetensorsFile::open(p))
            .collect::<Result<Vec<_>>>()?;
        let mut index = BTreeMap::new();
        for (i, file) in files.iter().enumerate() {
            for key in file.tensors().keys() {
                index.insert(key.clone(), i);
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            files,
            index,
        })
    }

    /// The path given to [`Checkpoint::open`].
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All tensor names.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True when the checkpoint holds no tensors.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The header entry of `key` and the file it is in.
    pub fn entry(&self, key: &str) -> Option<(&SafetensorsFile, &TensorEntry)> {
        let file = &self.files[*self.index.get(key)?];
        Some((file, file.tensors().get(key)?))
    }

    /// The shape of `key`, or a missing-key error.
    pub fn shape(&self, key: &str) -> Result<&[usize]> {
        self.entry(key)
            .map(|(_, e)| e.shape.as_slice())
            .ok_or_else(|| Error::MissingKey {
                path: self.path.clone(),
                key: key.to_string(),
                expected: Vec::new(),
            })
    }

    /// The metadata of the first file.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        self.files[0].metadata()
    }

    /// Loads `key` onto `device` as `dtype`.
    pub fn load(&self, key: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let (file, _) = self.entry(key).ok_or_else(|| Error::MissingKey {
            path: self.path.clone(),
            key: key.to_string(),
            expected: Vec::new(),
        })?;
        file.load(key, dtype, device)
    }

    /// Checks that every spec is present with its shape and a float weight dtype, and that nothing
    /// else is there except keys accepted by `harmless_extra`. Runs on headers only.
    pub fn validate(&self, specs: &[KeySpec], harmless_extra: impl Fn(&str) -> bool) -> Result<()> {
        let mut missing = Vec::new();
        for spec in specs {
            let Some((file, entry)) = self.entry(&spec.key) else {
                missing.push(spec);
                continue;
            };
            if entry.shape != spec.shape {
                return Err(Error::WrongShape {
                    path: file.path().to_path_buf(),
                    key: spec.key.clone(),
                    expected: spec.shape.clone(),
                    found: entry.shape.clone(),
                });
            }
            if !entry.dtype.is_weight_float() {
                return Err(Error::WrongDtype {
                    path: file.path().to_path_buf(),
                    key: spec.key.clone(),
                    expected: "BF16, F16, F32 or F8_E4M3".into(),
                    found: entry.dtype.name().into(),
                });
            }
        }
        match missing.as_slice() {
            [] => {}
            [one] => {
                return Err(Error::MissingKey {
                    path: self.path.clone(),
                    key: one.key.clone(),
                    expected: one.shape.clone(),
                })
            }
            [first, ..] => {
                return Err(Error::MissingKeys {
                    path: self.path.clone(),
                    count: missing.len(),
                    first: format!("`{}` {:?}", first.key, first.shape),
                })
            }
        }
        let expected: std::collections::HashSet<&str> =
            specs.iter().map(|s| s.key.as_str()).collect();
        let extra: Vec<&str> = self
            .keys()
            .filter(|k| !expected.contains(k) && !harmless_extra(k))
            .collect();
        if let Some(first) = extra.first() {
            return Err(Error::UnexpectedKeys {
                path: self.path.clone(),
                count: extra.len(),
                first: (*first).to_string(),
                hint:
                    "the file holds tensors this model does not have: is it the right kind of file?"
                        .into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names_follow_musubi() {
        assert_eq!(
            shard_pattern("model-00001-of-00003.safetensors"),
            Some(("model-".to_string(), 3))
        );
        assert_eq!(
            shard_pattern("00002-of-00004.safetensors"),
            Some((String::new(), 4))
        );
        assert_eq!(shard_pattern("flux2-dev.safetensors"), None);
        assert_eq!(shard_pattern("model-of-3.safetensors"), None);
    }
}
