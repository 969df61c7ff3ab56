//! The five FLUX.2 versions in one table: architecture, text encoder and sampling defaults.
//! Sources: Musubi `flux_2/flux2_models.py` (`Flux2Params`, `Klein4BParams`, `Klein9BParams`),
//! `flux_2/flux2_utils.py` (`FLUX2_MODEL_INFO`), BFL `scripts/cli.py` (fixed klein parameters).

use std::fmt;
use std::str::FromStr;

use crate::error::Error;
use crate::models::dit::DitConfig;

/// A FLUX.2 model version, as named by `--model_version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelVersion {
    Dev,
    Klein4b,
    KleinBase4b,
    Klein9b,
    KleinBase9b,
}

/// Which text encoder conditions a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextEncoderKind {
    /// Mistral-Small-3.x 24B (dev).
    Mistral3,
    /// Qwen3 4B (klein 4B) or 8B (klein 9B).
    Qwen3,
}

/// How guidance enters sampling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuidanceMode {
    /// Guidance is an input of the model (`guidance_in`), one forward per step (dev).
    Embedded,
    /// Distilled: no guidance at all, one forward per step (klein).
    None,
    /// True classifier-free guidance with a negative prompt, two forwards per step (klein-base).
    ClassifierFree,
}

/// Everything that differs between versions.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionInfo {
    pub version: ModelVersion,
    pub dit: DitConfig,
    pub text_encoder: TextEncoderKind,
    /// Hidden size of the text encoder; the DiT context is three stacked layers of it.
    pub text_encoder_hidden_size: usize,
    /// `hidden_states[k]` taken from the text encoder, stacked along features.
    pub text_encoder_layers: [usize; 3],
    pub guidance: GuidanceMode,
    /// Default number of sampling steps.
    pub default_steps: usize,
    /// Default guidance value (embedded for dev, CFG scale for base, 1.0 = none for klein).
    pub default_guidance: f64,
    /// Largest `--blocks_to_swap` Musubi documents for the version.
    pub max_blocks_to_swap: usize,
    /// Three-letter cache architecture tag Musubi writes into cache file names.
    pub cache_architecture: &'static str,
}

impl ModelVersion {
    /// All versions, in the order `--help` lists them.
    pub const ALL: [ModelVersion; 5] = [
        ModelVersion::Dev,
        ModelVersion::Klein4b,
        ModelVersion::KleinBase4b,
        ModelVersion::Klein9b,
        ModelVersion::KleinBase9b,
    ];

    /// The `--model_version` name.
    pub fn name(self) -> &'static str {
        match self {
            ModelVersion::Dev => "dev",
            ModelVersion::Klein4b => "klein-4b",
            ModelVersion::KleinBase4b => "klein-base-4b",
            ModelVersion::Klein9b => "klein-9b",
            ModelVersion::KleinBase9b => "klein-base-9b",
        }
    }

    /// The version's row of the table.
    pub fn info(self) -> VersionInfo {
        let (dit, text_encoder, text_encoder_hidden_size, layers, max_swap, cache) = match self {
            ModelVersion::Dev => (
                DitConfig::real(6144, 48, 8, 48, 15360, true),
                TextEncoderKind::Mistral3,
                5120,
                [10, 20, 30],
                29,
                "f2d",
            ),
            ModelVersion::Klein4b | ModelVersion::KleinBase4b => (
                DitConfig::real(3072, 24, 5, 20, 7680, false),
                TextEncoderKind::Qwen3,
                2560,
                [9, 18, 27],
                13,
                "f2k4b",
            ),
            ModelVersion::Klein9b | ModelVersion::KleinBase9b => (
                DitConfig::real(4096, 32, 8, 24, 12288, false),
                TextEncoderKind::Qwen3,
                4096,
                [9, 18, 27],
                16,
                "f2k9b",
            ),
        };
        let (guidance, default_steps, default_guidance) = match self {
            ModelVersion::Dev => (GuidanceMode::Embedded, 50, 4.0),
            ModelVersion::Klein4b | ModelVersion::Klein9b => (GuidanceMode::None, 4, 1.0),
            ModelVersion::KleinBase4b | ModelVersion::KleinBase9b => {
                (GuidanceMode::ClassifierFree, 50, 4.0)
            }
        };
        VersionInfo {
            version: self,
            dit,
            text_encoder,
            text_encoder_hidden_size,
            text_encoder_layers: layers,
            guidance,
            default_steps,
            default_guidance,
            max_blocks_to_swap: max_swap,
            cache_architecture: cache,
        }
    }

    /// The versions whose architecture is exactly `config` (base and distilled klein share one).
    pub fn matching_architecture(config: &DitConfig) -> Vec<ModelVersion> {
        Self::ALL
            .into_iter()
            .filter(|v| v.info().dit == *config)
            .collect()
    }
}

impl fmt::Display for ModelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ModelVersion {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Self::ALL
            .into_iter()
            .find(|v| v.name() == s)
            .ok_or_else(|| Error::InvalidArgument {
                name: "--model_version".into(),
                message: format!(
                    "`{s}` is not a FLUX.2 version; expected one of {}",
                    Self::ALL.map(|v| v.name()).join(", ")
                ),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parameter counts computed from the checkpoint shapes (spec §1.1).
    #[test]
    fn parameter_counts_match_the_published_sizes() {
        assert_eq!(
            ModelVersion::Dev.info().dit.parameter_count(),
            32_223_281_152
        );
        assert_eq!(
            ModelVersion::Klein4b.info().dit.parameter_count(),
            3_875_544_576
        );
        assert_eq!(
            ModelVersion::Klein9b.info().dit.parameter_count(),
            9_078_581_248
        );
    }

    #[test]
    fn tensor_counts_match_the_real_checkpoints() {
        assert_eq!(ModelVersion::Dev.info().dit.expected_keys().len(), 299);
        assert_eq!(ModelVersion::Klein9b.info().dit.expected_keys().len(), 201);
        assert_eq!(ModelVersion::Klein4b.info().dit.expected_keys().len(), 149);
    }

    #[test]
    fn names_round_trip_and_bad_names_are_rejected() {
        for v in ModelVersion::ALL {
            assert_eq!(v.name().parse::<ModelVersion>().unwrap(), v);
        }
        let err = "klein-5b".parse::<ModelVersion>().unwrap_err().to_string();
        assert!(
            err.contains("klein-5b") && err.contains("klein-base-9b"),
            "{err}"
        );
    }

    #[test]
    fn context_dim_is_three_text_encoder_layers() {
        for v in ModelVersion::ALL {
            let info = v.info();
            assert_eq!(info.dit.context_in_dim, 3 * info.text_encoder_hidden_size);
        }
    }
}
