//! Reading a golden fixture set: where it is, its manifest, its tensors, and the error metric.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use flux2_tuner::checkpoint::Checkpoint;
use serde_json::Value;

pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The fixture directory: `FLUX2_GOLDEN_DIR`, else the copy vendored in the project, else
/// `../shared/golden` beside the repository.
pub fn golden_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FLUX2_GOLDEN_DIR") {
        return PathBuf::from(dir);
    }
    let repository = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let vendored = repository.join("fixtures/golden");
    if vendored.join("manifest.json").exists() {
        return vendored;
    }
    repository.join("../shared/golden")
}

/// The manifest plus the directory it is in.
pub struct FixtureSet {
    pub dir: PathBuf,
    pub manifest: Value,
}

impl FixtureSet {
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("{}: cannot read the golden manifest: {e}", path.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest: serde_json::from_str(&text)?,
        })
    }

    /// Opens a fixture file named relative to the set.
    pub fn tensors(&self, file: &str) -> Result<CaseTensors> {
        Ok(CaseTensors {
            checkpoint: Checkpoint::open(&self.dir.join(file))?,
        })
    }
}

/// The tensors of one case file.
pub struct CaseTensors {
    pub checkpoint: Checkpoint,
}

impl CaseTensors {
    pub fn get(&self, key: &str) -> Result<Tensor> {
        let (_, entry) = self
            .checkpoint
            .entry(key)
            .ok_or_else(|| format!("{}: no tensor `{key}`", self.checkpoint.path().display()))?;
        let dtype = entry.dtype.candle().unwrap_or(DType::F32);
        Ok(self.checkpoint.load(key, dtype, &Device::Cpu)?)
    }

    pub fn f32(&self, key: &str) -> Result<Tensor> {
        Ok(self.get(key)?.to_dtype(DType::F32)?)
    }

    pub fn has(&self, key: &str) -> bool {
        self.checkpoint.entry(key).is_some()
    }
}

/// `max |actual - expected| / max |expected|` (the manifest's metric).
pub fn relative_error(actual: &Tensor, expected: &Tensor) -> Result<f64> {
    let actual = actual.to_dtype(DType::F64)?;
    let expected = expected.to_dtype(DType::F64)?;
    if actual.dims() != expected.dims() {
        return Err(format!(
            "shape {:?} differs from the golden {:?}",
            actual.dims(),
            expected.dims()
        )
        .into());
    }
    let difference = (actual - &expected)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?;
    let scale = expected.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    Ok(if scale > 0.0 {
        difference / scale
    } else {
        difference
    })
}

/// `max |actual - expected|`.
pub fn absolute_error(actual: &Tensor, expected: &Tensor) -> Result<f64> {
    let actual = actual.to_dtype(DType::F64)?;
    let expected = expected.to_dtype(DType::F64)?;
    Ok((actual - expected)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?)
}

/// Tolerance `name` (`f32`, `bf16`, or a nested key such as `f32.latents`) of a case.
pub fn tolerance(case: &Value, path: &[&str]) -> Result<f64> {
    let mut value = case.get("tolerance").ok_or("case has no tolerance")?;
    for key in path {
        value = match value.get(key) {
            Some(v) => v,
            None => return Err(format!("case has no tolerance {}", path.join(".")).into()),
        };
    }
    value
        .as_f64()
        .ok_or_else(|| format!("tolerance {} is not a number", path.join(".")).into())
}
