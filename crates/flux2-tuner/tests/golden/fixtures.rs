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

/// The device the cases run on: `FLUX2_DEVICE` (`cpu`, the default, `cuda` or `cuda:N`; CUDA
/// needs a `--features cuda` build). `FLUX2_ATTN_MODE=flash` selects the fused attention kernel
/// (used for bf16 on CUDA).
pub fn device() -> Device {
    static DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();
    DEVICE
        .get_or_init(|| {
            let name = std::env::var("FLUX2_DEVICE").unwrap_or_else(|_| "cpu".into());
            let device = match name.as_str() {
                "cpu" => Ok(Device::Cpu),
                cuda if cuda == "cuda" || cuda.starts_with("cuda:") => cuda
                    .strip_prefix("cuda:")
                    .unwrap_or("0")
                    .parse::<usize>()
                    .map_err(|e| e.to_string())
                    .and_then(|index| Device::new_cuda(index).map_err(|e| e.to_string())),
                other => Err(format!("not cpu, cuda or cuda:N: {other}")),
            };
            let device = device.unwrap_or_else(|e| {
                eprintln!("FLUX2_DEVICE={name}: {e}");
                std::process::exit(1);
            });
            let flash = std::env::var("FLUX2_ATTN_MODE").is_ok_and(|mode| mode == "flash");
            if flash {
                use flux2_tuner::nn::flash::{select, AttentionKernel};
                select(AttentionKernel::Fused);
            }
            println!(
                "golden device: {name}, attention: {}",
                if flash { "flash" } else { "composed" }
            );
            device
        })
        .clone()
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
        Ok(self.checkpoint.load(key, dtype, &device())?)
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
