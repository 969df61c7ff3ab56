//! Module names across LoRA conventions (peers-and-users.md §3): BFL paths (`double_blocks.0.
//! img_attn.qkv`), Musubi/kohya underscored names (`lora_unet_double_blocks_0_img_attn_qkv`) and
//! diffusers names (`transformer_blocks.0.attn.to_q`), where the fused BFL `qkv` is split in three.

/// Where a diffusers-named module lands in the BFL model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BflTarget {
    /// BFL module path.
    pub module: String,
    /// For split q/k/v: which third of the fused output rows (0 = q, 1 = k, 2 = v).
    pub part: Option<usize>,
    /// diffusers stores the final-layer modulation as (scale, shift); BFL as (shift, scale).
    pub swap_halves: bool,
}

/// The diffusers names of one BFL module path, with the part each covers.
pub fn diffusers_names(bfl: &str) -> Vec<(String, Option<usize>, bool)> {
    let parts: Vec<&str> = bfl.split('.').collect();
    let single = |name: String| vec![(name, None, false)];
    match parts.as_slice() {
        ["double_blocks", i, stream @ ("img_attn" | "txt_attn"), "qkv"] => {
            let names: [&str; 3] = if *stream == "img_attn" {
                ["to_q", "to_k", "to_v"]
            } else {
                ["add_q_proj", "add_k_proj", "add_v_proj"]
            };
            names
                .iter()
                .enumerate()
                .map(|(part, n)| {
                    (
                        format!("transformer_blocks.{i}.attn.{n}"),
                        Some(part),
                        false,
                    )
                })
                .collect()
        }
        ["double_blocks", i, "img_attn", "proj"] => {
            single(format!("transformer_blocks.{i}.attn.to_out.0"))
        }
        ["double_blocks", i, "txt_attn", "proj"] => {
            single(format!("transformer_blocks.{i}.attn.to_add_out"))
        }
        ["double_blocks", i, "img_mlp", "0"] => {
            single(format!("transformer_blocks.{i}.ff.linear_in"))
        }
        ["double_blocks", i, "img_mlp", "2"] => {
            single(format!("transformer_blocks.{i}.ff.linear_out"))
        }
        ["double_blocks", i, "txt_mlp", "0"] => {
            single(format!("transformer_blocks.{i}.ff_context.linear_in"))
        }
        ["double_blocks", i, "txt_mlp", "2"] => {
            single(format!("transformer_blocks.{i}.ff_context.linear_out"))
        }
        ["single_blocks", j, "linear1"] => single(format!(
            "single_transformer_blocks.{j}.attn.to_qkv_mlp_proj"
        )),
        ["single_blocks", j, "linear2"] => {
            single(format!("single_transformer_blocks.{j}.attn.to_out"))
        }
        ["img_in"] => single("x_embedder".into()),
        ["txt_in"] => single("context_embedder".into()),
        ["time_in", layer] => single(format!(
            "time_guidance_embed.timestep_embedder.{}",
            linear_index(layer)
        )),
        ["guidance_in", layer] => single(format!(
            "time_guidance_embed.guidance_embedder.{}",
            linear_index(layer)
        )),
        [modulation, "lin"] => single(format!("{modulation}.linear")),
        ["final_layer", "linear"] => single("proj_out".into()),
        ["final_layer", "adaLN_modulation", "1"] => vec![("norm_out.linear".into(), None, true)],
        _ => Vec::new(),
    }
}

fn linear_index(layer: &str) -> &'static str {
    if layer == "in_layer" {
        "linear_1"
    } else {
        "linear_2"
    }
}

/// Resolves a module name of any convention to its BFL target, given the model's BFL paths.
pub struct NameResolver {
    entries: Vec<(String, BflTarget)>,
}

impl NameResolver {
    pub fn new(bfl_paths: &[String]) -> Self {
        let mut entries = Vec::new();
        for path in bfl_paths {
            let direct = BflTarget {
                module: path.clone(),
                part: None,
                swap_halves: false,
            };
            entries.push((path.clone(), direct.clone()));
            entries.push((path.replace('.', "_"), direct));
            for (name, part, swap_halves) in diffusers_names(path) {
                let target = BflTarget {
                    module: path.clone(),
                    part,
                    swap_halves,
                };
                entries.push((name.replace('.', "_"), target.clone()));
                entries.push((name, target));
            }
        }
        Self { entries }
    }

    /// Strips the known prefixes (`diffusion_model.`, `transformer.`, `base_model.model.`,
    /// `lora_unet_`, `lycoris_`, `lora_transformer_`) and finds the module.
    pub fn resolve(&self, name: &str) -> Option<BflTarget> {
        let mut stripped = name;
        for prefix in [
            "base_model.model.",
            "model.diffusion_model.",
            "diffusion_model.",
            "transformer.",
            "lora_unet_",
            "lycoris_",
            "lora_transformer_",
        ] {
            if let Some(rest) = stripped.strip_prefix(prefix) {
                stripped = rest;
            }
        }
        self.entries
            .iter()
            .find(|(candidate, _)| candidate == stripped)
            .map(|(_, target)| target.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolver() -> NameResolver {
        NameResolver::new(&[
            "double_blocks.3.img_attn.qkv".to_string(),
            "double_blocks.3.txt_attn.proj".to_string(),
            "single_blocks.7.linear1".to_string(),
            "final_layer.adaLN_modulation.1".to_string(),
        ])
    }

    #[test]
    fn every_convention_resolves_to_the_bfl_module() {
        let r = resolver();
        let fused = |module: &str| BflTarget {
            module: module.into(),
            part: None,
            swap_halves: false,
        };
        assert_eq!(
            r.resolve("lora_unet_double_blocks_3_img_attn_qkv"),
            Some(fused("double_blocks.3.img_attn.qkv"))
        );
        assert_eq!(
            r.resolve("diffusion_model.single_blocks.7.linear1"),
            Some(fused("single_blocks.7.linear1"))
        );
        assert_eq!(
            r.resolve("transformer.single_transformer_blocks.7.attn.to_qkv_mlp_proj"),
            Some(fused("single_blocks.7.linear1"))
        );
        assert_eq!(
            r.resolve("transformer.transformer_blocks.3.attn.to_add_out"),
            Some(fused("double_blocks.3.txt_attn.proj"))
        );
        let k = r
            .resolve("transformer.transformer_blocks.3.attn.to_k")
            .unwrap();
        assert_eq!(
            (k.module.as_str(), k.part),
            ("double_blocks.3.img_attn.qkv", Some(1))
        );
        let norm = r.resolve("transformer.norm_out.linear").unwrap();
        assert!(norm.swap_halves);
        assert_eq!(
            r.resolve("lycoris_transformer_blocks_3_attn_to_v")
                .unwrap()
                .part,
            Some(2)
        );
        assert_eq!(r.resolve("lora_unet_double_blocks_9_img_attn_qkv"), None);
    }
}
