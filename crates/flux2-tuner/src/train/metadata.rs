//! LoRA file metadata as Musubi writes it (training-and-data.md §4.4): `ss_*` training keys,
//! `modelspec.*` keys and the `sshs_*` hashes, all as strings.

use std::collections::HashMap;

use candle_core::Tensor;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::models::ModelVersion;

/// Values that describe a run, for the metadata.
#[derive(Debug, Clone, Default)]
pub struct RunDescription {
    pub output_name: String,
    pub seed: u64,
    pub training_comment: Option<String>,
    pub learning_rate: f64,
    pub num_train_items: usize,
    pub num_batches_per_epoch: usize,
    pub num_epochs: usize,
    pub max_train_steps: usize,
    pub lr_warmup_steps: usize,
    pub lr_scheduler: String,
    pub steps: usize,
    pub epoch: usize,
    pub gradient_checkpointing: bool,
    pub gradient_checkpointing_cpu_offload: bool,
    pub gradient_accumulation_steps: usize,
    pub mixed_precision: String,
    pub fp8_base: bool,
    pub network_dim: usize,
    pub network_alpha: f64,
    pub network_dropout: Option<f64>,
    pub network_args: Vec<String>,
    pub optimizer: String,
    pub max_grad_norm: f64,
    pub timestep_sampling: String,
    pub weighting_scheme: String,
    pub sigmoid_scale: f64,
    pub discrete_flow_shift: f64,
    pub logit_mean: f64,
    pub logit_std: f64,
    pub mode_scale: f64,
    pub datasets_json: String,
    pub dit_name: String,
    pub vae_name: String,
    pub started_at: f64,
    pub no_metadata: bool,
    pub title: Option<String>,
    pub author: Option<String>,
    pub description: Option<String>,
    pub license: Option<String>,
    pub tags: Option<String>,
    pub resolution: Option<String>,
    pub architecture: Option<String>,
    pub min_timestep: Option<f64>,
    pub max_timestep: Option<f64>,
}

/// Musubi's `ss_base_model_version` name of a version.
pub fn base_model_version(version: ModelVersion) -> &'static str {
    match version {
        ModelVersion::Dev => "flux_2_dev",
        ModelVersion::Klein4b | ModelVersion::KleinBase4b => "flux_2_klein_4b",
        ModelVersion::Klein9b | ModelVersion::KleinBase9b => "flux_2_klein_9b",
    }
}

fn modelspec_architecture(version: ModelVersion) -> &'static str {
    match version {
        ModelVersion::Dev => "Flux.2-dev/lora",
        ModelVersion::Klein4b | ModelVersion::KleinBase4b => "Flux.2-klein-4b/lora",
        ModelVersion::Klein9b | ModelVersion::KleinBase9b => "Flux.2-klein-9b/lora",
    }
}

/// Python's `str()` of a float (`1e-05`, `0.0001`, `1.0`).
fn python_float(value: f64) -> String {
    if value == value.trunc() && value.abs() < 1e16 {
        format!("{value:.1}")
    } else if value.abs() < 1e-4 {
        let text = format!("{value:e}");
        // Rust writes 1e-5; Python writes 1e-05.
        match text.split_once('e') {
            Some((mantissa, exponent)) => {
                let (sign, digits) = exponent
                    .strip_prefix('-')
                    .map(|d| ("-", d))
                    .unwrap_or(("+", exponent));
                format!("{mantissa}e{sign}{digits:0>2}")
            }
            None => text,
        }
    } else {
        format!("{value}")
    }
}

fn now_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The metadata map of a LoRA file (hashes computed from `tensors`).
pub fn build_metadata(
    run: &RunDescription,
    version: ModelVersion,
    tensors: &[(String, Tensor)],
) -> Result<HashMap<String, String>> {
    let mut ss: HashMap<String, String> = HashMap::new();
    let mut set = |key: &str, value: String| {
        ss.insert(key.to_string(), value);
    };
    set("ss_base_model_version", base_model_version(version).into());
    set("ss_network_module", "networks.lora_flux_2".into());
    set("ss_network_dim", run.network_dim.to_string());
    set("ss_network_alpha", python_float(run.network_alpha));
    if !run.network_args.is_empty() {
        let map: serde_json::Map<String, serde_json::Value> = run
            .network_args
            .iter()
            .filter_map(|a| a.split_once('='))
            .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
            .collect();
        set(
            "ss_network_args",
            serde_json::Value::Object(map).to_string(),
        );
    }
    if !run.no_metadata {
        let optional = |v: &Option<f64>| v.map(python_float).unwrap_or_else(|| "None".into());
        set(
            "ss_session_id",
            (now_seconds() as u64 % 2_147_483_647).to_string(),
        );
        set("ss_training_started_at", run.started_at.to_string());
        set("ss_training_finished_at", now_seconds().to_string());
        set("ss_output_name", run.output_name.clone());
        set("ss_seed", run.seed.to_string());
        set(
            "ss_training_comment",
            run.training_comment
                .clone()
                .unwrap_or_else(|| "None".into()),
        );
        set("ss_learning_rate", python_float(run.learning_rate));
        set("ss_num_train_items", run.num_train_items.to_string());
        set(
            "ss_num_batches_per_epoch",
            run.num_batches_per_epoch.to_string(),
        );
        set("ss_num_epochs", run.num_epochs.to_string());
        set("ss_max_train_steps", run.max_train_steps.to_string());
        set("ss_lr_warmup_steps", run.lr_warmup_steps.to_string());
        set("ss_lr_scheduler", run.lr_scheduler.clone());
        set("ss_steps", run.steps.to_string());
        set("ss_epoch", run.epoch.to_string());
        set(
            "ss_gradient_checkpointing",
            python_bool(run.gradient_checkpointing),
        );
        set(
            "ss_gradient_checkpointing_cpu_offload",
            python_bool(run.gradient_checkpointing_cpu_offload),
        );
        set(
            "ss_gradient_accumulation_steps",
            run.gradient_accumulation_steps.to_string(),
        );
        set("ss_mixed_precision", run.mixed_precision.clone());
        set("ss_fp8_base", python_bool(run.fp8_base));
        set("ss_full_fp16", "False".into());
        set("ss_full_bf16", "False".into());
        set("ss_network_dropout", optional(&run.network_dropout));
        set("ss_optimizer", run.optimizer.clone());
        set("ss_max_grad_norm", python_float(run.max_grad_norm));
        set("ss_weighting_scheme", run.weighting_scheme.clone());
        set("ss_logit_mean", python_float(run.logit_mean));
        set("ss_logit_std", python_float(run.logit_std));
        set("ss_mode_scale", python_float(run.mode_scale));
        set("ss_guidance_scale", "1.0".into());
        set("ss_timestep_sampling", run.timestep_sampling.clone());
        set("ss_sigmoid_scale", python_float(run.sigmoid_scale));
        set(
            "ss_discrete_flow_shift",
            python_float(run.discrete_flow_shift),
        );
        set("ss_datasets", run.datasets_json.clone());
        set("ss_sd_model_name", run.dit_name.clone());
        set("ss_vae_name", run.vae_name.clone());
    }
    // Hashes over the file as serialised with the ss_* metadata only (Musubi
    // `precalculate_safetensors_hashes`).
    let bytes = safetensors::serialize(
        tensors.iter().map(|(k, t)| (k.clone(), t.clone())),
        Some(ss.clone()),
    )
    .map_err(|e| Error::Shape(format!("cannot serialise the LoRA for hashing: {e}")))?;
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap_or([0; 8])) as usize;
    let data = &bytes[(8 + header).min(bytes.len())..];
    let model_hash = format!("0x{:x}", Sha256::digest(data));
    let legacy_window = bytes
        .get(0x100000..(0x100000 + 0x10000).min(bytes.len()))
        .unwrap_or(&[]);
    let legacy_hash = format!("{:x}", Sha256::digest(legacy_window));
    let mut metadata = ss;
    metadata.insert("sshs_model_hash".into(), model_hash);
    metadata.insert("sshs_legacy_hash".into(), legacy_hash[..8].to_string());

    let mut spec = |key: &str, value: String| {
        metadata.insert(format!("modelspec.{key}"), value);
    };
    spec("sai_model_spec", "1.0.0".into());
    spec(
        "architecture",
        run.architecture
            .as_ref()
            .map(|a| format!("{a}/lora"))
            .unwrap_or_else(|| modelspec_architecture(version).into()),
    );
    spec(
        "implementation",
        "https://github.com/black-forest-labs/flux2".into(),
    );
    spec(
        "title",
        run.title.clone().unwrap_or_else(|| {
            if run.output_name.is_empty() {
                format!("LoRA@{}", now_seconds() as u64)
            } else {
                run.output_name.clone()
            }
        }),
    );
    spec(
        "resolution",
        run.resolution
            .as_ref()
            .map(|r| r.replace(',', "x"))
            .unwrap_or_else(|| "1280x720".into()),
    );
    spec("date", crate::util::time::iso_date());
    for (key, value) in [
        ("author", &run.author),
        ("description", &run.description),
        ("license", &run.license),
        ("tags", &run.tags),
    ] {
        if let Some(value) = value {
            spec(key, value.clone());
        }
    }
    if run.min_timestep.is_some() || run.max_timestep.is_some() {
        spec(
            "timestep_range",
            format!(
                "{},{}",
                run.min_timestep.unwrap_or(0.0) as i64,
                run.max_timestep.unwrap_or(1000.0) as i64
            ),
        );
    }
    Ok(metadata)
}

fn python_bool(value: bool) -> String {
    if value { "True" } else { "False" }.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_as_python_does() {
        assert_eq!(python_float(1.0), "1.0");
        assert_eq!(python_float(0.0001), "0.0001");
        assert_eq!(python_float(1e-5), "1e-05");
        assert_eq!(python_float(2.5e-6), "2.5e-06");
        assert_eq!(python_float(0.5), "0.5");
    }

    /// In small files Musubi's legacy hash is the hash of empty input.
    #[test]
    fn small_files_have_the_empty_legacy_hash() {
        let tensors = vec![(
            "a.alpha".to_string(),
            Tensor::new(1f32, &candle_core::Device::Cpu).unwrap(),
        )];
        let run = RunDescription {
            output_name: "x".into(),
            network_dim: 4,
            network_alpha: 1.0,
            ..RunDescription::default()
        };
        let metadata = build_metadata(&run, ModelVersion::Klein4b, &tensors).unwrap();
        assert_eq!(metadata["sshs_legacy_hash"], "e3b0c442");
        assert_eq!(metadata["ss_base_model_version"], "flux_2_klein_4b");
        assert_eq!(metadata["modelspec.architecture"], "Flux.2-klein-4b/lora");
        assert_eq!(metadata["ss_network_module"], "networks.lora_flux_2");
        assert!(metadata["sshs_model_hash"].starts_with("0x"));
    }
}
