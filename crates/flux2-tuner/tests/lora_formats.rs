//! Every LoRA key format gives the same model as the Musubi file it was converted from: ComfyUI /
//! ai-toolkit (`diffusion_model.<path>.lora_A/B`), diffusers/PEFT (`transformer.<diffusers
//! path>`, q/k/v split and fused back exactly), LyCORIS LoHa and LoKr built to hold the same
//! update, and include/exclude filters.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use flux2_tuner::checkpoint::{save_safetensors, Checkpoint};
use flux2_tuner::lora::names::diffusers_names;
use flux2_tuner::lora::{linear_shapes, KeyFilter, LoraFile};
use flux2_tuner::models::dit::tokens::{image_position_ids, text_position_ids};
use flux2_tuner::models::dit::{DitInput, Flux2Dit};

fn golden() -> PathBuf {
    std::env::var_os("FLUX2_GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/golden"))
}

/// (module path, down, up, alpha) of the golden klein Musubi LoRA.
fn musubi_modules(dit: &mut Flux2Dit) -> Vec<(String, Tensor, Tensor, f32)> {
    let lora = Checkpoint::open(&golden().join("klein/lora.safetensors")).unwrap();
    let device = Device::Cpu;
    let mut out = Vec::new();
    for (path, _) in dit.linears_mut() {
        let name = flux2_tuner::lora::musubi_module_name(&path);
        let Some(_) = lora.entry(&format!("{name}.lora_down.weight")) else {
            continue;
        };
        let down = lora
            .load(&format!("{name}.lora_down.weight"), DType::F32, &device)
            .unwrap();
        let up = lora
            .load(&format!("{name}.lora_up.weight"), DType::F32, &device)
            .unwrap();
        let alpha = lora
            .load(&format!("{name}.alpha"), DType::F32, &device)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        out.push((path, down, up, alpha));
    }
    out
}

fn load_dit() -> Flux2Dit {
    Flux2Dit::load(
        &Checkpoint::open(&golden().join("klein/dit.safetensors")).unwrap(),
        None,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

fn output_with(path: &Path, filter: &KeyFilter) -> Tensor {
    let mut dit = load_dit();
    let shapes = linear_shapes(&dit.linears_mut());
    let file = LoraFile::load(path, &shapes, filter, &Device::Cpu).unwrap();
    file.apply(dit.linears_mut(), 0.8, true).unwrap();
    forward(&dit)
}

fn forward(dit: &Flux2Dit) -> Tensor {
    let device = Device::Cpu;
    let tokens = Tensor::arange(0f32, 8.0 * 128.0, &device)
        .unwrap()
        .reshape((1, 8, 128))
        .unwrap();
    let tokens = (tokens / 500.0).unwrap().sin().unwrap();
    let width = dit.config.context_in_dim;
    let text = (Tensor::arange(0f32, (5 * width) as f32, &device)
        .unwrap()
        .reshape((1, 5, width))
        .unwrap()
        / 77.0)
        .unwrap()
        .cos()
        .unwrap();
    dit.forward(&DitInput {
        image_tokens: &tokens,
        image_position_ids: &image_position_ids(1, 2, 4, 0, &device).unwrap(),
        text_embeddings: &text,
        text_position_ids: &text_position_ids(1, 5, &device).unwrap(),
        timesteps: &Tensor::new(&[0.6f32], &device).unwrap(),
        guidance: None,
    })
    .unwrap()
}

fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn every_format_gives_the_musubi_result() {
    let dir = std::env::temp_dir().join(format!("flux2-lora-formats-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let reference = output_with(
        &golden().join("klein/lora.safetensors"),
        &KeyFilter::default(),
    );
    let base = forward(&load_dit());
    let effect = max_difference(&reference, &base);
    assert!(effect > 1e-3, "the LoRA has no effect");
    let modules = musubi_modules(&mut load_dit());
    let scalar = |v: f32| Tensor::new(v, &Device::Cpu).unwrap();

    // ComfyUI / ai-toolkit: BFL paths with lora_A / lora_B and alpha.
    let mut comfy = Vec::new();
    // diffusers / PEFT: no alpha (scale folded into B), q/k/v split by rows.
    let mut peft = Vec::new();
    // LoHa: (w1a w1b) * (w2a w2b) with w2 all ones is the LoRA update.
    let mut loha = Vec::new();
    // LoKr: kron([[1]], w2) with w2 = w2_a w2_b (decomposed, so alpha/rank applies).
    let mut lokr = Vec::new();
    for (path, down, up, alpha) in &modules {
        comfy.push((
            format!("diffusion_model.{path}.lora_A.weight"),
            down.clone(),
        ));
        comfy.push((format!("diffusion_model.{path}.lora_B.weight"), up.clone()));
        comfy.push((format!("diffusion_model.{path}.alpha"), scalar(*alpha)));
        let rank = down.dims()[0] as f64;
        let folded = (up * (*alpha as f64 / rank)).unwrap();
        let names = diffusers_names(path);
        for (name, part, _) in names {
            let b = match part {
                Some(p) => {
                    let rows = folded.dims()[0] / 3;
                    folded.narrow(0, p * rows, rows).unwrap()
                }
                None => folded.clone(),
            };
            peft.push((format!("transformer.{name}.lora_A.weight"), down.clone()));
            peft.push((format!("transformer.{name}.lora_B.weight"), b));
        }
        let musubi = format!("lora_unet_{}", path.replace('.', "_"));
        let (out, input) = (up.dims()[0], down.dims()[1]);
        loha.push((format!("{musubi}.hada_w1_a"), up.clone()));
        loha.push((format!("{musubi}.hada_w1_b"), down.clone()));
        loha.push((
            format!("{musubi}.hada_w2_a"),
            Tensor::ones((out, 1), DType::F32, &Device::Cpu).unwrap(),
        ));
        loha.push((
            format!("{musubi}.hada_w2_b"),
            Tensor::ones((1, input), DType::F32, &Device::Cpu).unwrap(),
        ));
        loha.push((format!("{musubi}.alpha"), scalar(*alpha)));
        lokr.push((
            format!("{musubi}.lokr_w1"),
            Tensor::ones((1, 1), DType::F32, &Device::Cpu).unwrap(),
        ));
        lokr.push((format!("{musubi}.lokr_w2_a"), up.clone()));
        lokr.push((format!("{musubi}.lokr_w2_b"), down.clone()));
        lokr.push((format!("{musubi}.alpha"), scalar(*alpha)));
    }
    for (name, tensors) in [
        ("comfy", comfy),
        ("peft", peft),
        ("loha", loha),
        ("lokr", lokr),
    ] {
        let path = dir.join(format!("{name}.safetensors"));
        save_safetensors(&path, &tensors, None).unwrap();
        let output = output_with(&path, &KeyFilter::default());
        let error = max_difference(&output, &reference);
        assert!(
            error < 1e-5 * effect.max(1.0),
            "{name}: {error} (effect {effect})"
        );
    }

    // Filters: excluding every single block keeps only the double-block modules.
    let filter = KeyFilter {
        include: None,
        exclude: Some(regex::Regex::new("single_blocks").unwrap()),
    };
    let filtered = output_with(&golden().join("klein/lora.safetensors"), &filter);
    assert!(max_difference(&filtered, &reference) > 1e-6);
    assert!(max_difference(&filtered, &base) > 1e-6);
}
