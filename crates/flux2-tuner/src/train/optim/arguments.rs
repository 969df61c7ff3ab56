//! `--optimizer_args` as Musubi reads them (`trainer_base.get_optimizer`): each `key=value` is
//! split on `=` and the value goes through `ast.literal_eval`. Each optimiser takes the keys it
//! knows; any key left over is an error naming it and listing the known ones. The keys keep
//! their order because Musubi writes them into `ss_optimizer` as given.

use crate::error::{Error, Result};
use crate::train::optim::python_literal::{parse_python_literal, PythonValue};

/// The parsed `--optimizer_args`, in the order given.
#[derive(Debug, Clone, Default)]
pub struct OptimizerArguments {
    entries: Vec<(String, PythonValue)>,
    taken: Vec<String>,
}

fn invalid(key: &str, message: String) -> Error {
    Error::InvalidArgument {
        name: format!("--optimizer_args {key}"),
        message,
    }
}

impl OptimizerArguments {
    /// Parses `key=value` strings; a repeated key keeps its last value (a Python dict).
    pub fn parse(arguments: &[String]) -> Result<Self> {
        let mut entries: Vec<(String, PythonValue)> = Vec::new();
        for argument in arguments {
            let (key, value) = argument
                .split_once('=')
                .ok_or_else(|| Error::InvalidArgument {
                    name: "--optimizer_args".into(),
                    message: format!("`{argument}` is not key=value"),
                })?;
            let key = key.trim();
            if key.is_empty() {
                return Err(Error::InvalidArgument {
                    name: "--optimizer_args".into(),
                    message: format!("`{argument}` has no key before `=`"),
                });
            }
            let value = parse_python_literal(value).map_err(|message| {
                invalid(key, format!("`{value}` is not a Python literal: {message}"))
            })?;
            match entries.iter_mut().find(|(k, _)| k == key) {
                Some(entry) => entry.1 = value,
                None => entries.push((key.to_string(), value)),
            }
        }
        Ok(Self {
            entries,
            taken: Vec::new(),
        })
    }

    /// Whether `key` was given.
    pub fn contains(&self, key: &str) -> bool {
        self.entries.iter().any(|(k, _)| k == key)
    }

    /// Sets a key as Musubi does before building the optimiser (Adafactor's `relative_step`);
    /// it then appears in the description too.
    pub fn insert(&mut self, key: &str, value: PythonValue) {
        match self.entries.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => self.entries.push((key.to_string(), value)),
        }
    }

    fn take(&mut self, key: &str) -> Option<&PythonValue> {
        self.taken.push(key.to_string());
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// A number (int or float).
    pub fn float(&mut self, key: &str, default: f64) -> Result<f64> {
        match self.take(key) {
            None => Ok(default),
            Some(value) => as_float(key, value),
        }
    }

    /// A number or None.
    pub fn optional_float(&mut self, key: &str, default: Option<f64>) -> Result<Option<f64>> {
        match self.take(key) {
            None => Ok(default),
            Some(PythonValue::None) => Ok(None),
            Some(value) => as_float(key, value).map(Some),
        }
    }

    /// A non-negative integer.
    pub fn count(&mut self, key: &str, default: usize) -> Result<usize> {
        match self.take(key) {
            None => Ok(default),
            Some(PythonValue::Int(i)) if *i >= 0 => Ok(*i as usize),
            Some(value) => Err(invalid(
                key,
                format!("expected a non-negative integer, found {value}"),
            )),
        }
    }

    /// A boolean (Python also takes 0/1 here).
    pub fn flag(&mut self, key: &str, default: bool) -> Result<bool> {
        match self.take(key) {
            None => Ok(default),
            Some(PythonValue::Bool(b)) => Ok(*b),
            Some(PythonValue::Int(i)) => Ok(*i != 0),
            Some(value) => Err(invalid(
                key,
                format!(
                    "expected True or False, found {} `{value}`",
                    value.type_name()
                ),
            )),
        }
    }

    /// A tuple or list of exactly `N` numbers.
    pub fn floats<const N: usize>(&mut self, key: &str, default: [f64; N]) -> Result<[f64; N]> {
        let value = match self.take(key) {
            None => return Ok(default),
            Some(value) => value.clone(),
        };
        let items = match &value {
            PythonValue::Tuple(items) | PythonValue::List(items) => items,
            other => {
                return Err(invalid(
                    key,
                    format!("expected a tuple of {N} numbers, found {other}"),
                ))
            }
        };
        if items.len() != N {
            return Err(invalid(
                key,
                format!(
                    "expected a tuple of {N} numbers, found {} items in {value}",
                    items.len()
                ),
            ));
        }
        let mut out = default;
        for (slot, item) in out.iter_mut().zip(items) {
            *slot = as_float(key, item)?;
        }
        Ok(out)
    }

    /// Fails on any key no getter asked for; `optimizer` names the class for the message.
    pub fn finish(&self, optimizer: &str) -> Result<()> {
        if let Some((key, _)) = self
            .entries
            .iter()
            .find(|(k, _)| !self.taken.iter().any(|t| t == k))
        {
            let mut known = self.taken.clone();
            known.sort();
            known.dedup();
            let hint = if key == "lr" {
                " (Musubi passes --learning_rate as lr; set that instead)"
            } else {
                ""
            };
            return Err(invalid(
                key,
                format!(
                    "{optimizer} has no option `{key}`{hint}; known: {}",
                    known.join(", ")
                ),
            ));
        }
        Ok(())
    }

    /// Musubi's `ss_optimizer`: `module.Class` then `(k=v,...)` with Python `str()` values when
    /// any arguments were given.
    pub fn describe(&self, class_path: &str) -> String {
        if self.entries.is_empty() {
            return class_path.to_string();
        }
        let arguments: Vec<String> = self
            .entries
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!("{class_path}({})", arguments.join(","))
    }
}

fn as_float(key: &str, value: &PythonValue) -> Result<f64> {
    match value {
        PythonValue::Int(i) => Ok(*i as f64),
        PythonValue::Float(f) => Ok(*f),
        other => Err(invalid(
            key,
            format!("expected a number, found {} `{other}`", other.type_name()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arguments(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn reads_typed_values_and_describes_them_as_musubi() {
        let mut parsed = OptimizerArguments::parse(&arguments(&[
            "weight_decay=0.01",
            "betas=(0.9,0.99)",
            "decouple=True",
        ]))
        .unwrap();
        assert_eq!(parsed.float("weight_decay", 0.0).unwrap(), 0.01);
        assert_eq!(parsed.floats("betas", [0.0, 0.0]).unwrap(), [0.9, 0.99]);
        assert!(parsed.flag("decouple", false).unwrap());
        assert_eq!(parsed.float("eps", 1e-8).unwrap(), 1e-8);
        parsed.finish("Test").unwrap();
        assert_eq!(
            parsed.describe("prodigyopt.prodigy.Prodigy"),
            "prodigyopt.prodigy.Prodigy(weight_decay=0.01,betas=(0.9, 0.99),decouple=True)"
        );
    }

    #[test]
    fn errors_name_the_key() {
        let error = OptimizerArguments::parse(&arguments(&["eps=abc"]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("eps") && error.contains("abc"), "{error}");
        let mut parsed = OptimizerArguments::parse(&arguments(&["betas=(0.9,)"])).unwrap();
        let error = parsed
            .floats("betas", [0.9, 0.999])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("betas") && error.contains("2 numbers"),
            "{error}"
        );
        let mut parsed = OptimizerArguments::parse(&arguments(&["momentum=0.9"])).unwrap();
        parsed.float("weight_decay", 0.0).unwrap();
        let error = parsed.finish("AdamW").unwrap_err().to_string();
        assert!(
            error.contains("momentum") && error.contains("known: weight_decay"),
            "{error}"
        );
        let error = OptimizerArguments::parse(&arguments(&["weight_decay"]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("key=value"), "{error}");
    }
}
