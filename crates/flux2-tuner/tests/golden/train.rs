//! `train_step` cases: one Musubi training step's loss and every LoRA gradient (f32), through
//! candle's autograd (`<id>`, `<id>@loss`) and through the direct backward that training uses on
//! the CPU (`<id>@direct`, `<id>@direct_loss`; see `train::direct`).

use candle_core::DType;
use flux2_tuner::checkpoint::Checkpoint;
use flux2_tuner::models::dit::Flux2Dit;
use flux2_tuner::train::network::{LoraNetwork, NetworkConfig};
use flux2_tuner::train::step::{training_forward, training_step, StepBatch};
use flux2_tuner::util::rng::SeededRng;
use serde_json::Value;

use crate::fixtures::{relative_error, tolerance, FixtureSet, Result};
use crate::report::Report;

pub fn run(set: &FixtureSet, variant: &Value, case: &Value, id: &str, report: &mut Report) {
    if let Err(e) = run_inner(set, variant, case, id, report) {
        report.error(id, &e.to_string());
    }
}

fn run_inner(
    set: &FixtureSet,
    variant: &Value,
    case: &Value,
    id: &str,
    report: &mut Report,
) -> Result<()> {
    let device = crate::fixtures::device();
    let dit_file = variant["dit"]["file"]
        .as_str()
        .ok_or("variant has no dit.file")?;
    let mut dit = Flux2Dit::load(
        &Checkpoint::open(&set.dir.join(dit_file))?,
        None,
        DType::F32,
        &device,
    )?;
    let lora_file = set
        .dir
        .join(case["lora_file"].as_str().ok_or("case has no lora_file")?);
    let lora = Checkpoint::open(&lora_file)?;
    let rank = lora
        .keys()
        .find(|k| k.ends_with(".lora_down.weight"))
        .and_then(|k| lora.shape(k).ok().map(|s| s[0]))
        .ok_or("LoRA file has no lora_down")?;
    let config = NetworkConfig {
        dim: rank,
        ..NetworkConfig::default()
    };
    let mut network = LoraNetwork::new(&dit.config, config, &mut SeededRng::new(0), &device)?;
    let loaded = network.load_weights(&lora_file)?;
    if loaded != network.modules.len() {
        return Err(format!(
            "the LoRA file sets {loaded} of {} modules",
            network.modules.len()
        )
        .into());
    }
    let multiplier = case["multiplier"]
        .as_f64()
        .ok_or("case has no multiplier")?;
    network.attach(&mut dit, multiplier)?;

    let tensors = set.tensors(case["file"].as_str().ok_or("case has no file")?)?;
    let to_vec = |key: &str| -> Result<Vec<f64>> {
        Ok(tensors
            .f32(key)?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f64::from)
            .collect())
    };
    let sigmas = to_vec("sigmas")?;
    let model_timesteps = to_vec("dit_timesteps")?;
    let latents = tensors.f32("latents")?;
    let noise = tensors.f32("noise")?;
    let text = tensors.f32("ctx")?;
    let weights = vec![1.0; sigmas.len()];
    let batch = StepBatch {
        latents: &latents,
        noise: &noise,
        sigmas: &sigmas,
        model_timesteps: &model_timesteps,
        text: &text,
        controls: &[],
        guidance: Some(1.0),
        weights: &weights,
    };
    let output = training_forward(&dit, &batch)?;
    report.check(
        &format!("{id}@loss"),
        relative_error(&output.loss.reshape(1)?, &tensors.f32("loss")?)?,
        tolerance(case, &["f32", "loss"])?,
    );
    let gradients = output.loss.backward()?;
    let grad_tolerance = tolerance(case, &["f32", "grads"])?;
    let mut worst = 0f64;
    for module in &network.modules {
        let name = flux2_tuner::lora::musubi_module_name(&module.path);
        for (part, var) in [("lora_down", &module.down), ("lora_up", &module.up)] {
            let key = format!("{name}.{part}.weight.grad");
            let expected = tensors.f32(&key)?;
            let actual = gradients
                .get(var.as_tensor())
                .ok_or_else(|| format!("no gradient reached {name}.{part}"))?;
            worst = worst.max(relative_error(actual, &expected)?);
        }
    }
    report.check(id, worst, grad_tolerance);

    let parameters: Vec<_> = network.parameters().into_iter().map(|(p, _)| p).collect();
    let direct = training_step(&dit, &batch, &parameters, false)?;
    let loss = candle_core::Tensor::new(&[direct.loss], &device)?;
    report.check(
        &format!("{id}@direct_loss"),
        relative_error(&loss, &tensors.f32("loss")?)?,
        tolerance(case, &["f32", "loss"])?,
    );
    let mut worst = 0f64;
    // `parameters()` lists each module's down, then up.
    for (module, pair) in network.modules.iter().zip(direct.gradients.chunks_exact(2)) {
        let name = flux2_tuner::lora::musubi_module_name(&module.path);
        for (part, actual) in [("lora_down", &pair[0]), ("lora_up", &pair[1])] {
            let expected = tensors.f32(&format!("{name}.{part}.weight.grad"))?;
            worst = worst.max(relative_error(actual, &expected)?);
        }
    }
    report.check(&format!("{id}@direct"), worst, grad_tolerance);
    Ok(())
}
