//! The masked loss on a small random model: a mask of ones is the unmasked loss exactly; a half
//! mask gives the hand-computed masked mean; its LoRA gradients equal those of an unmasked loss
//! whose target is blended towards the (constant) prediction by the mask, an independent
//! formulation with the same gradient; the checkpointed backward agrees; and targets under a zero
//! mask do not change the loss.

use candle_core::{DType, Device, Tensor, Var};
use flux2_tuner::models::dit::Flux2Dit;
use flux2_tuner::train::masked_loss::apply_loss_mask;
use flux2_tuner::train::step::{
    training_forward_masked, training_step, training_step_masked, StepBatch, StepGradients,
};
use flux2_tuner::util::rng::SeededRng;

mod common;
use common::{attach_random_lora, random, random_dit};

const SIGMAS: [f64; 2] = [0.3, 0.8];
const WEIGHTS: [f64; 2] = [1.0, 2.0];

struct Setup {
    dit: Flux2Dit,
    parameters: Vec<Var>,
    latents: Tensor,
    noise: Tensor,
    text: Tensor,
}

fn setup(name: &str) -> Setup {
    let dir = std::env::temp_dir().join(format!("flux2-masked-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut dit = random_dit(&dir.join("dit.safetensors"), 21);
    let mut rng = SeededRng::new(9);
    let network = attach_random_lora(&mut dit, &mut rng, 0.1);
    let parameters = network.parameters().into_iter().map(|(p, _)| p).collect();
    Setup {
        dit,
        parameters,
        latents: random(&[2, 128, 2, 4], &mut rng),
        noise: random(&[2, 128, 2, 4], &mut rng),
        text: random(&[2, 5, 24], &mut rng),
    }
}

fn batch<'a>(latents: &'a Tensor, noise: &'a Tensor, text: &'a Tensor) -> StepBatch<'a> {
    StepBatch {
        latents,
        noise,
        sigmas: &SIGMAS,
        model_timesteps: &SIGMAS,
        text,
        controls: &[],
        guidance: Some(1.0),
        weights: &WEIGHTS,
    }
}

/// Sample 0 trains on the left half of its 2x4 grid, sample 1 on one cell at 0.5 and one at 1.
fn half_mask() -> Tensor {
    let values = [
        1.0f32, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, //
        0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0,
    ];
    Tensor::from_vec(values.to_vec(), (2, 1, 2, 4), &Device::Cpu).unwrap()
}

fn host(tensor: &Tensor) -> Vec<f32> {
    tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// The largest difference between two gradient lists relative to the largest gradient.
fn relative_difference(a: &StepGradients, b: &StepGradients) -> f32 {
    let mut worst = 0f32;
    let mut scale = 0f32;
    for (x, y) in a.gradients.iter().zip(&b.gradients) {
        for (p, q) in host(x).iter().zip(host(y)) {
            worst = worst.max((p - q).abs());
            scale = scale.max(p.abs());
        }
    }
    assert!(scale > 0.0, "all gradients are zero");
    worst / scale
}

#[test]
fn a_mask_of_ones_is_the_unmasked_loss_exactly() {
    let s = setup("ones");
    let b = batch(&s.latents, &s.noise, &s.text);
    let ones = Tensor::ones((2, 1, 2, 4), DType::F32, &Device::Cpu).unwrap();
    for checkpointing in [false, true] {
        let plain = training_step(&s.dit, &b, &s.parameters, checkpointing).unwrap();
        let masked =
            training_step_masked(&s.dit, &b, Some(&ones), &s.parameters, checkpointing, None)
                .unwrap();
        assert_eq!(plain.loss.to_bits(), masked.loss.to_bits());
        for (x, y) in plain.gradients.iter().zip(&masked.gradients) {
            assert_eq!(host(x), host(y));
        }
    }
}

#[test]
fn a_half_mask_gives_the_masked_mean_and_its_gradients() {
    let s = setup("half");
    let b = batch(&s.latents, &s.noise, &s.text);
    let mask = half_mask();

    // The loss against the formula, on the host in f64: sum(mask * w * (p - t)^2) / (2*128*2*4).
    let output = training_forward_masked(&s.dit, &b, Some(&mask)).unwrap();
    let prediction = host(&output.prediction);
    let target = host(&(&s.noise - &s.latents).unwrap());
    let mask_values = host(&mask);
    let mut sum = 0f64;
    for (index, (p, t)) in prediction.iter().zip(&target).enumerate() {
        let (sample, cell) = (index / (128 * 8), index % 8);
        let error = (*p as f64) - (*t as f64);
        sum += mask_values[sample * 8 + cell] as f64 * WEIGHTS[sample] * error * error;
    }
    let expected = sum / prediction.len() as f64;
    let loss = output.loss.to_scalar::<f32>().unwrap() as f64;
    assert!(
        (loss - expected).abs() <= 1e-6 * expected,
        "loss {loss} vs hand {expected}"
    );
    let unmasked = training_step(&s.dit, &b, &s.parameters, false).unwrap();
    assert!(
        loss < 0.5 * unmasked.loss as f64,
        "the mask removed little: {loss} vs {}",
        unmasked.loss
    );

    // Reference: no mask, but the target is t' = m t + (1 - m) p with p the prediction held
    // constant: d/dp (p - t')^2 = 2 m (p - t) at p, the masked loss's gradient for any m (its value
    // is m^2 (p - t)^2, so only the gradients are compared). t' goes in as latents/noise that keep
    // the noisy input x_t unchanged: x0' = x_t - s t', n' = x_t + (1 - s) t'.
    let p = output.prediction.detach();
    let t = (&s.noise - &s.latents).unwrap();
    let t_prime = (&p + (&t - &p).unwrap().broadcast_mul(&mask).unwrap()).unwrap();
    let sigma = Tensor::from_vec(
        SIGMAS.iter().map(|v| *v as f32).collect::<Vec<_>>(),
        (2, 1, 1, 1),
        &Device::Cpu,
    )
    .unwrap();
    let x_t = (s.latents.broadcast_mul(&(1.0 - &sigma).unwrap()).unwrap()
        + s.noise.broadcast_mul(&sigma).unwrap())
    .unwrap();
    let latents = (&x_t - t_prime.broadcast_mul(&sigma).unwrap()).unwrap();
    let noise = (&x_t + t_prime.broadcast_mul(&(1.0 - &sigma).unwrap()).unwrap()).unwrap();
    let reference_batch = batch(&latents, &noise, &s.text);
    let reference = training_step(&s.dit, &reference_batch, &s.parameters, false).unwrap();
    let masked = training_step_masked(&s.dit, &b, Some(&mask), &s.parameters, false, None).unwrap();
    assert!((masked.loss as f64 - loss).abs() <= 1e-6 * loss);
    let difference = relative_difference(&masked, &reference);
    println!(
        "masked loss {loss:.7} hand {expected:.7} unmasked {:.7}; gradient vs reference {difference:.2e}",
        unmasked.loss
    );
    assert!(
        difference < 1e-4,
        "masked gradients differ from the reference by {difference}"
    );
    // ... and they are not the unmasked gradients.
    assert!(relative_difference(&masked, &unmasked) > 0.05);

    // The checkpointed backward gives the same masked gradients.
    let checkpointed =
        training_step_masked(&s.dit, &b, Some(&mask), &s.parameters, true, None).unwrap();
    assert!((checkpointed.loss - masked.loss).abs() <= 1e-6 * masked.loss);
    let difference = relative_difference(&masked, &checkpointed);
    println!("checkpointed masked gradients differ by {difference:.2e}");
    assert!(
        difference < 1e-5,
        "checkpointed masked gradients differ by {difference}"
    );
}

#[test]
fn targets_under_a_zero_mask_do_not_change_the_loss() {
    let s = setup("zero");
    let mask = half_mask();
    let b = batch(&s.latents, &s.noise, &s.text);
    let before = training_step_masked(&s.dit, &b, Some(&mask), &s.parameters, false, None).unwrap();
    // Move the target by 5 where the mask is 0, keeping the DiT's input x_t: x0 += d, n -= d (1 -
    // s) / s with d = -5 s on masked-out cells, so the target n - x0 moves by -d / s = 5.
    let zero = mask.eq(0.0).unwrap().to_dtype(DType::F32).unwrap();
    let sigma = Tensor::from_vec(vec![0.3f32, 0.8], (2, 1, 1, 1), &Device::Cpu).unwrap();
    let shift = zero
        .broadcast_mul(&(sigma.clone() * -5.0).unwrap())
        .unwrap()
        .broadcast_as((2, 128, 2, 4))
        .unwrap()
        .contiguous()
        .unwrap();
    let latents = (&s.latents + &shift).unwrap();
    let ratio = ((1.0 - &sigma).unwrap() / &sigma).unwrap();
    let noise = (&s.noise - shift.broadcast_mul(&ratio).unwrap()).unwrap();
    let moved = batch(&latents, &noise, &s.text);
    let target_change = ((&noise - &latents).unwrap() - (&s.noise - &s.latents).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((target_change - 5.0).abs() < 1e-4, "{target_change}");
    let after =
        training_step_masked(&s.dit, &moved, Some(&mask), &s.parameters, false, None).unwrap();
    assert!(
        ((after.loss - before.loss) / before.loss).abs() < 1e-5,
        "{} vs {}",
        before.loss,
        after.loss
    );
    let difference = relative_difference(&before, &after);
    println!(
        "target moved under the zero mask: loss {} -> {}, gradients differ by {difference:.2e}",
        before.loss, after.loss
    );
    assert!(difference < 1e-4);
    // Without the mask the same move changes the loss a lot.
    let plain_before = training_step(&s.dit, &b, &s.parameters, false).unwrap();
    let plain_after = training_step(&s.dit, &moved, &s.parameters, false).unwrap();
    assert!(plain_after.loss > 2.0 * plain_before.loss);
}

#[test]
fn a_mask_of_the_wrong_shape_is_refused() {
    let squared = Tensor::ones((2, 128, 2, 4), DType::F32, &Device::Cpu).unwrap();
    let mask = Tensor::ones((2, 1, 4, 2), DType::F32, &Device::Cpu).unwrap();
    let error = apply_loss_mask(&squared, Some(&mask))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("[2, 1, 4, 2]") && error.contains("[2, 1, 2, 4]"),
        "{error}"
    );
    let same = apply_loss_mask(&squared, None).unwrap();
    assert_eq!(host(&same), host(&squared));
}
