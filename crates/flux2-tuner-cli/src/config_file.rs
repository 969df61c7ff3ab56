//! `train --config_file FILE`: a TOML file holding the same options as the flags (Musubi's
//! `read_config_from_file`: tables are flattened, keys are flag names without `--`). Its options
//! are placed before the command-line flags, and later flags override earlier ones, so flags given
//! on the command line win.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// The flags a config file stands for.
pub fn flags_from_file(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --config_file {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("--config_file {} is not valid TOML", path.display()))?;
    let mut flags = Vec::new();
    flatten(&table, path, &mut flags)?;
    Ok(flags)
}

fn scalar(value: &toml::Value, key: &str, path: &Path) -> Result<String> {
    Ok(match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        other => bail!(
            "{}: `{key}` has a {} value where a string, number or list is expected",
            path.display(),
            other.type_str()
        ),
    })
}

fn flatten(table: &toml::Table, path: &Path, flags: &mut Vec<String>) -> Result<()> {
    for (key, value) in table {
        if key == "config_file" {
            bail!(
                "{}: a config file cannot name another config file",
                path.display()
            );
        }
        match value {
            toml::Value::Table(inner) => flatten(inner, path, flags)?,
            toml::Value::Boolean(true) => flags.push(format!("--{key}")),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                flags.push(format!("--{key}"));
                for item in items {
                    flags.push(scalar(item, key, path)?);
                }
            }
            other => {
                flags.push(format!("--{key}"));
                flags.push(scalar(other, key, path)?);
            }
        }
    }
    Ok(())
}

/// Expands `train ... --config_file FILE ...` into `train <file flags> ...` (the command line's
/// own flags after, so they override).
pub fn expand(arguments: Vec<String>) -> Result<Vec<String>> {
    if arguments.get(1).map(String::as_str) != Some("train") {
        return Ok(arguments);
    }
    let Some(position) = arguments
        .iter()
        .position(|a| a == "--config_file" || a.starts_with("--config_file="))
    else {
        return Ok(arguments);
    };
    let (file, consumed) = match arguments[position].split_once('=') {
        Some((_, file)) => (file.to_string(), 1),
        None => (
            arguments
                .get(position + 1)
                .cloned()
                .context("--config_file needs a file")?,
            2,
        ),
    };
    let mut rest = arguments.clone();
    rest.drain(position..position + consumed);
    let mut expanded = rest[..2].to_vec();
    expanded.extend(flags_from_file(Path::new(&file))?);
    expanded.extend(rest[2..].iter().cloned());
    Ok(expanded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_flatten_into_flags_before_the_command_line() {
        let dir = std::env::temp_dir().join(format!("flux2-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("run.toml");
        std::fs::write(
            &file,
            "[model]\ndit = \"dit.safetensors\"\nmodel_version = \"klein-4b\"\n[training]\nlearning_rate = 1e-4\n\
             gradient_checkpointing = true\nsave_state = false\nnetwork_args = [\"rank_dropout=0.1\"]\n",
        )
        .unwrap();
        let arguments: Vec<String> = [
            "flux2-tuner",
            "train",
            "--config_file",
            file.to_str().unwrap(),
            "--learning_rate",
            "2e-4",
        ]
        .map(String::from)
        .to_vec();
        let expanded = expand(arguments).unwrap();
        assert_eq!(&expanded[..2], &["flux2-tuner", "train"]);
        assert!(expanded
            .windows(2)
            .any(|w| w == ["--dit", "dit.safetensors"]));
        assert!(expanded.contains(&"--gradient_checkpointing".to_string()));
        assert!(!expanded.contains(&"--save_state".to_string()));
        assert!(expanded
            .windows(2)
            .any(|w| w == ["--network_args", "rank_dropout=0.1"]));
        // The command line's flag comes last, so it overrides the file's.
        assert_eq!(
            &expanded[expanded.len() - 2..],
            &["--learning_rate", "2e-4"]
        );
    }
}
