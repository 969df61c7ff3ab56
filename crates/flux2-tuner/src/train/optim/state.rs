//! Reading an optimiser state back for `--resume`: every tensor must be there with the shape the
//! parameters need, and no tensor may be left over (a state saved by another optimiser fails
//! here instead of resuming with half its moments).

use std::collections::{HashMap, HashSet};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

fn resume_error(message: String) -> Error {
    Error::InvalidArgument {
        name: "--resume".into(),
        message,
    }
}

/// A scalar as a 0-dim f64 tensor, so the saved value is exact.
pub fn scalar(value: f64) -> Result<Tensor> {
    Ok(Tensor::new(value, &Device::Cpu)?)
}

/// A counter as a 0-dim i64 tensor.
pub fn counter(value: usize) -> Result<Tensor> {
    Ok(Tensor::new(value as i64, &Device::Cpu)?)
}

/// Takes the tensors of one saved optimiser state.
pub struct StateReader<'a> {
    tensors: &'a HashMap<String, Tensor>,
    optimizer: &'static str,
    used: HashSet<String>,
}

impl<'a> StateReader<'a> {
    pub fn new(tensors: &'a HashMap<String, Tensor>, optimizer: &'static str) -> Self {
        Self {
            tensors,
            optimizer,
            used: HashSet::new(),
        }
    }

    fn get(&mut self, key: &str) -> Result<&'a Tensor> {
        self.used.insert(key.to_string());
        self.tensors.get(key).ok_or_else(|| {
            resume_error(format!(
                "the optimizer state has no `{key}` that {} needs (saved by another optimizer?)",
                self.optimizer
            ))
        })
    }

    /// A scalar saved by [`scalar`] (or any number).
    pub fn scalar(&mut self, key: &str) -> Result<f64> {
        Ok(self.get(key)?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
    }

    /// A counter saved by [`counter`].
    pub fn counter(&mut self, key: &str) -> Result<usize> {
        let value = self.get(key)?.to_dtype(DType::I64)?.to_scalar::<i64>()?;
        usize::try_from(value)
            .map_err(|_| resume_error(format!("`{key}` is {value}, expected a count")))
    }

    /// A tensor that must have `shape` and `dtype`, moved to `device`.
    pub fn tensor(
        &mut self,
        key: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let tensor = self.get(key)?;
        if tensor.dims() != shape || tensor.dtype() != dtype {
            return Err(resume_error(format!(
                "optimizer state `{key}` is {:?} {:?}, expected {shape:?} {dtype:?} for {} \
                 (saved for another network?)",
                tensor.dims(),
                tensor.dtype(),
                self.optimizer
            )));
        }
        Ok(tensor.to_device(device)?)
    }

    /// Fails on tensors the optimiser did not read.
    pub fn finish(self) -> Result<()> {
        let mut extra: Vec<&String> = self
            .tensors
            .keys()
            .filter(|k| !self.used.contains(*k))
            .collect();
        extra.sort();
        if let Some(key) = extra.first() {
            return Err(resume_error(format!(
                "the optimizer state holds `{key}`, which {} does not use (saved by another \
                 optimizer or network?)",
                self.optimizer
            )));
        }
        Ok(())
    }
}
