//! One memory-mapped safetensors file, parsed and checked by hand so that every problem (truncated
//! file, header that is not JSON, absurd header length, bad offsets) becomes an error that names the
//! file and the tensor, never a panic.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Headers larger than this are refused: real checkpoints have headers of a few hundred kilobytes.
const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

/// The element types a safetensors header may name, with their candle equivalents where one exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageDtype {
    Bool,
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F16,
    BF16,
    F32,
    F64,
    F8E4M3,
    F8E5M2,
}

impl StorageDtype {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "BOOL" => Self::Bool,
            "U8" => Self::U8,
            "I8" => Self::I8,
            "I16" => Self::I16,
            "U16" => Self::U16,
            "I32" => Self::I32,
            "U32" => Self::U32,
            "I64" => Self::I64,
            "U64" => Self::U64,
            "F16" => Self::F16,
            "BF16" => Self::BF16,
            "F32" => Self::F32,
            "F64" => Self::F64,
            "F8_E4M3" => Self::F8E4M3,
            "F8_E5M2" => Self::F8E5M2,
            _ => return None,
        })
    }

    /// The name used in safetensors headers.
    pub fn name(self) -> &'static str {
        match self {
            Self::Bool => "BOOL",
            Self::U8 => "U8",
            Self::I8 => "I8",
            Self::I16 => "I16",
            Self::U16 => "U16",
            Self::I32 => "I32",
            Self::U32 => "U32",
            Self::I64 => "I64",
            Self::U64 => "U64",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::F32 => "F32",
            Self::F64 => "F64",
            Self::F8E4M3 => "F8_E4M3",
            Self::F8E5M2 => "F8_E5M2",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::Bool | Self::U8 | Self::I8 | Self::F8E4M3 | Self::F8E5M2 => 1,
            Self::I16 | Self::U16 | Self::F16 | Self::BF16 => 2,
            Self::I32 | Self::U32 | Self::F32 => 4,
            Self::I64 | Self::U64 | Self::F64 => 8,
        }
    }

    /// The candle dtype that holds this storage type, if candle has one.
    pub fn candle(self) -> Option<DType> {
        Some(match self {
            Self::U8 | Self::Bool => DType::U8,
            Self::I16 => DType::I16,
            Self::I32 => DType::I32,
            Self::U32 => DType::U32,
            Self::I64 => DType::I64,
            Self::F16 => DType::F16,
            Self::BF16 => DType::BF16,
            Self::F32 => DType::F32,
            Self::F64 => DType::F64,
            Self::F8E4M3 => DType::F8E4M3,
            Self::I8 | Self::U16 | Self::U64 | Self::F8E5M2 => return None,
        })
    }

    /// True for the floating-point types model weights may be stored in.
    pub fn is_weight_float(self) -> bool {
        matches!(self, Self::F16 | Self::BF16 | Self::F32 | Self::F8E4M3)
    }
}

/// Where one tensor lives inside its file.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub dtype: StorageDtype,
    pub shape: Vec<usize>,
    /// Byte range inside the data section (after the header).
    pub start: usize,
    pub end: usize,
}

/// A parsed, memory-mapped safetensors file.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    data_start: usize,
    tensors: BTreeMap<String, TensorEntry>,
    metadata: BTreeMap<String, String>,
}

fn invalid(path: &Path, reason: impl Into<String>) -> Error {
    Error::InvalidSafetensors {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl SafetensorsFile {
    /// Opens and memory-maps `path`, parsing and checking its header. No tensor data is read.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, "cannot open file", e))?;
        let file_len = file
            .metadata()
            .map_err(|e| Error::io(path, "cannot read file size", e))?
            .len();
        if file_len < 8 {
            return Err(invalid(
                path,
                format!("file is {file_len} bytes long, shorter than the 8-byte header length"),
            ));
        }
        // SAFETY: the file is opened read-only; like every mmap-based loader (safetensors, candle)
        // we rely on the user not truncating the file while it is in use.
        #[allow(unsafe_code)]
        let mmap = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| Error::io(path, "cannot memory-map file", e))?;
        let mut length_bytes = [0u8; 8];
        length_bytes.copy_from_slice(&mmap[..8]);
        let header_len = u64::from_le_bytes(length_bytes);
        if header_len > MAX_HEADER_BYTES {
            return Err(invalid(
                path,
                format!(
                    "header length field says {header_len} bytes, more than the {MAX_HEADER_BYTES} \
                     allowed (is this a safetensors file?)"
                ),
            ));
        }
        if 8 + header_len > file_len {
            return Err(invalid(
                path,
                format!(
                    "header length field says {header_len} bytes but the file has only {} bytes \
                     after it (truncated file?)",
                    file_len - 8
                ),
            ));
        }
        let data_start = 8 + header_len as usize;
        let header_text = std::str::from_utf8(&mmap[8..data_start])
            .map_err(|_| invalid(path, "header is not UTF-8 text"))?;
        let header: serde_json::Value = serde_json::from_str(header_text.trim_end())
            .map_err(|e| invalid(path, format!("header is not valid JSON: {e}")))?;
        let header = header
            .as_object()
            .ok_or_else(|| invalid(path, "header is not a JSON object"))?;

        let data_len = (file_len as usize) - data_start;
        let mut tensors = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        for (key, value) in header {
            if key == "__metadata__" {
                if let Some(map) = value.as_object() {
                    for (name, text) in map {
                        if let Some(text) = text.as_str() {
                            metadata.insert(name.clone(), text.to_string());
                        }
                    }
                }
                continue;
            }
            let entry = parse_entry(path, key, value)?;
            if entry.end > data_len {
                return Err(invalid(
                    path,
                    format!(
                        "tensor `{key}` ends at byte {} of the data section, which has only {data_len} \
                         bytes (truncated file?)",
                        entry.end
                    ),
                ));
            }
            tensors.insert(key.clone(), entry);
        }
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            data_start,
            tensors,
            metadata,
        })
    }

    /// The path this file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every tensor in the file, by name.
    pub fn tensors(&self) -> &BTreeMap<String, TensorEntry> {
        &self.tensors
    }

    /// The `__metadata__` string map.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The raw bytes of one tensor.
    pub fn bytes(&self, entry: &TensorEntry) -> &[u8] {
        &self.mmap[self.data_start + entry.start..self.data_start + entry.end]
    }

    /// Drops the mapped pages of a tensor that has just been copied out of the map. Without it
    /// they stay in the process's resident set until the file is closed, so loading a model peaked
    /// at up to two copies of its weights (issue 9 point 5). The pages remain in the page cache
    /// and are read again from it if the tensor is loaded again.
    #[cfg(unix)]
    fn release_pages(&self, entry: &TensorEntry) {
        let offset = self.data_start + entry.start;
        // SAFETY: the map is a read-only shared mapping of a file: MADV_DONTNEED only unmaps the
        // pages, and a later access (another tensor on a shared page, the header) faults them in
        // again with the file's contents, so no reference into the map ever sees other data. A
        // failure leaves the pages resident, which is harmless.
        #[allow(unsafe_code)]
        unsafe {
            let _ = self.mmap.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                offset,
                entry.end - entry.start,
            );
        }
    }

    #[cfg(not(unix))]
    fn release_pages(&self, _entry: &TensorEntry) {}

    /// Loads tensor `key` onto `device`, converted to `dtype`.
    pub fn load(&self, key: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let entry = self.tensors.get(key).ok_or_else(|| Error::MissingKey {
            path: self.path.clone(),
            key: key.to_string(),
            expected: Vec::new(),
        })?;
        let stored = entry.dtype.candle().ok_or_else(|| Error::WrongDtype {
            path: self.path.clone(),
            key: key.to_string(),
            expected: "a dtype candle can hold (F32, F16, BF16, F8_E4M3, integers)".into(),
            found: entry.dtype.name().into(),
        })?;
        // Loading goes through the host; copying straight from the mmap keeps one copy at a time.
        let tensor =
            Tensor::from_raw_buffer(self.bytes(entry), stored, &entry.shape, &Device::Cpu)?;
        self.release_pages(entry);
        let tensor = if stored == dtype {
            tensor
        } else if stored == DType::F8E4M3 && dtype != DType::F32 {
            // candle casts F8E4M3 to f32 on every backend; go through it for the other float types.
            tensor.to_dtype(DType::F32)?.to_dtype(dtype)?
        } else {
            tensor.to_dtype(dtype)?
        };
        Ok(tensor.to_device(device)?)
    }
}

fn parse_entry(path: &Path, key: &str, value: &serde_json::Value) -> Result<TensorEntry> {
    let bad = |what: &str| invalid(path, format!("tensor `{key}`: {what}"));
    let object = value
        .as_object()
        .ok_or_else(|| bad("entry is not an object"))?;
    let dtype_name = object
        .get("dtype")
        .and_then(|v| v.as_str())
        .ok_or_else(|| bad("no dtype"))?;
    let dtype = StorageDtype::parse(dtype_name)
        .ok_or_else(|| bad(&format!("unknown dtype `{dtype_name}`")))?;
    let shape = object
        .get("shape")
        .and_then(|v| v.as_array())
        .ok_or_else(|| bad("no shape"))?
        .iter()
        .map(|d| d.as_u64().map(|d| d as usize))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| bad("shape is not a list of non-negative integers"))?;
    let offsets = object
        .get("data_offsets")
        .and_then(|v| v.as_array())
        .ok_or_else(|| bad("no data_offsets"))?;
    let (start, end) = match offsets.as_slice() {
        [s, e] => match (s.as_u64(), e.as_u64()) {
            (Some(s), Some(e)) if s <= e => (s as usize, e as usize),
            _ => return Err(bad("data_offsets are not two increasing integers")),
        },
        _ => return Err(bad("data_offsets is not a pair")),
    };
    let elements = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad("shape overflows"))?;
    if elements.checked_mul(dtype.size()) != Some(end - start) {
        return Err(bad(&format!(
            "shape {shape:?} of {dtype_name} needs {} bytes but data_offsets span {}",
            elements.saturating_mul(dtype.size()),
            end - start
        )));
    }
    Ok(TensorEntry {
        dtype,
        shape,
        start,
        end,
    })
}
