//! The FLUX.2 sigma schedule (BFL/Musubi `get_schedule`, `compute_empirical_mu`) and Musubi's
//! `--flow_shift` variant. Computed in f32 as the reference does.

/// `mu` from the number of generated-image tokens and steps. Linear in the token count above 4300
/// tokens, otherwise interpolated between the 10-step and 200-step lines (the jump at 4300/4301
/// is the reference's).
pub fn empirical_mu(image_tokens: usize, steps: usize) -> f64 {
    let (a1, b1) = (8.73809524e-05, 1.89833333);
    let (a2, b2) = (0.00016927, 0.45666666);
    let tokens = image_tokens as f64;
    if image_tokens > 4300 {
        return a2 * tokens + b2;
    }
    let m200 = a2 * tokens + b2;
    let m10 = a1 * tokens + b1;
    let a = (m200 - m10) / 190.0;
    let b = m200 - 200.0 * a;
    a * steps as f64 + b
}

fn linspace_f32(steps: usize) -> Vec<f32> {
    // torch.linspace(1, 0, n + 1) in float32: start + i * (end - start) / n, mirrored from the end
    // for the second half exactly as torch does.
    let n = steps as f32;
    let step = -1.0f32 / n;
    let half = steps.div_ceil(2);
    (0..=steps)
        .map(|i| {
            if i < half {
                1.0 + step * i as f32
            } else {
                0.0 - step * (steps - i) as f32
            }
        })
        .collect()
}

/// `steps + 1` sigmas from 1 to 0: `e^mu / (e^mu + (1/t - 1))` on `linspace(1, 0, steps + 1)`.
pub fn flux2_schedule(steps: usize, image_tokens: usize) -> Vec<f32> {
    let mu = empirical_mu(image_tokens, steps) as f32;
    let exp_mu = mu.exp();
    linspace_f32(steps)
        .into_iter()
        .map(|t| {
            if t <= 0.0 {
                0.0
            } else {
                exp_mu / (exp_mu + (1.0 / t - 1.0))
            }
        })
        .collect()
}

/// Musubi's `--flow_shift s`: `s t / (1 + (s - 1) t)` on the same linspace.
pub fn shifted_schedule(steps: usize, shift: f64) -> Vec<f32> {
    let s = shift as f32;
    linspace_f32(steps)
        .into_iter()
        .map(|t| s * t / (1.0 + (s - 1.0) * t))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Worked values of spec §5.2.
    #[test]
    fn mu_matches_the_worked_table() {
        assert!((empirical_mu(4096, 4) - 2.2912).abs() < 1e-4);
        assert!((empirical_mu(4096, 50) - 2.0234).abs() < 1e-4);
        assert!((empirical_mu(8192, 7) - 1.8433).abs() < 1e-4);
        let sigmas = flux2_schedule(4, 4096);
        let expected = [1.0, 0.9674, 0.9081, 0.7672, 0.0];
        for (s, e) in sigmas.iter().zip(expected) {
            assert!((s - e).abs() < 1e-4, "{sigmas:?}");
        }
    }
}
