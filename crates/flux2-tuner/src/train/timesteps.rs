//! Timestep (noise level) sampling for flow-matching training, as Musubi's
//! `get_noisy_model_input_and_timesteps` (training-and-data.md §3.2). `t = 1` is pure noise.
//!
//! Decisions (documented in the README):
//! - The model is given `t + 0.001` in every non-`sigma` mode while the noise level is `t`
//!   (Musubi adds 1 to the 0..1000 timestep); kept, so LoRAs behave as Musubi's.
//! - `sigma` mode (Musubi's default) is kept with its mirrored `min/max_timestep`, but
//!   `flux2_shift` is what FLUX.2 should use and what `--help` recommends.

use std::f64::consts::PI;

use crate::error::{Error, Result};
use crate::util::rng::SeededRng;

/// `--timestep_sampling`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSampling {
    Sigma,
    Uniform,
    Sigmoid,
    Shift,
    FluxShift,
    Flux2Shift,
    QwenShift,
    Krea2Shift,
    Ideogram4Shift,
    Logsnr,
    QinglongFlux,
    QinglongQwen,
}

impl TimestepSampling {
    pub const NAMES: [&'static str; 12] = [
        "sigma",
        "uniform",
        "sigmoid",
        "shift",
        "flux_shift",
        "flux2_shift",
        "qwen_shift",
        "krea2_shift",
        "ideogram4_shift",
        "logsnr",
        "qinglong_flux",
        "qinglong_qwen",
    ];

    pub fn parse(name: &str) -> Result<Self> {
        use TimestepSampling::*;
        let all = [
            Sigma,
            Uniform,
            Sigmoid,
            Shift,
            FluxShift,
            Flux2Shift,
            QwenShift,
            Krea2Shift,
            Ideogram4Shift,
            Logsnr,
            QinglongFlux,
            QinglongQwen,
        ];
        Self::NAMES
            .iter()
            .position(|n| *n == name)
            .map(|i| all[i])
            .ok_or_else(|| Error::InvalidArgument {
                name: "--timestep_sampling".into(),
                message: format!("`{name}` is not one of {}", Self::NAMES.join(", ")),
            })
    }
}

/// `--weighting_scheme`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightingScheme {
    None,
    LogitNormal,
    Mode,
    Cosmap,
    SigmaSqrt,
}

impl WeightingScheme {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "none" => Self::None,
            "logit_normal" => Self::LogitNormal,
            "mode" => Self::Mode,
            "cosmap" => Self::Cosmap,
            "sigma_sqrt" => Self::SigmaSqrt,
            other => {
                return Err(Error::InvalidArgument {
                    name: "--weighting_scheme".into(),
                    message: format!(
                        "`{other}` is not one of none, logit_normal, mode, cosmap, sigma_sqrt"
                    ),
                })
            }
        })
    }

    /// The loss weight of a sample at noise level `sigma` (1 for schemes that only shape sampling).
    /// Applied per sample: Musubi's 5-D weight on a 4-D loss averages the weights over the batch;
    /// we do not copy that.
    pub fn loss_weight(self, sigma: f64) -> f64 {
        match self {
            Self::SigmaSqrt => 1.0 / (sigma * sigma).max(1e-12),
            Self::Cosmap => 2.0 / (PI * (1.0 - 2.0 * sigma + 2.0 * sigma * sigma)),
            Self::None | Self::LogitNormal | Self::Mode => 1.0,
        }
    }
}

/// The timestep options of a run.
#[derive(Debug, Clone)]
pub struct TimestepConfig {
    pub sampling: TimestepSampling,
    pub sigmoid_scale: f64,
    pub discrete_flow_shift: f64,
    pub weighting_scheme: WeightingScheme,
    pub logit_mean: f64,
    pub logit_std: f64,
    pub mode_scale: f64,
    /// 0..999 (timestep units).
    pub min_timestep: Option<f64>,
    /// 1..1000 (timestep units).
    pub max_timestep: Option<f64>,
    pub preserve_distribution_shape: bool,
}

impl Default for TimestepConfig {
    fn default() -> Self {
        Self {
            sampling: TimestepSampling::Sigma,
            sigmoid_scale: 1.0,
            discrete_flow_shift: 1.0,
            weighting_scheme: WeightingScheme::None,
            logit_mean: 0.0,
            logit_std: 1.0,
            mode_scale: 1.29,
            min_timestep: None,
            max_timestep: None,
            preserve_distribution_shape: false,
        }
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// `s t / (1 + (s - 1) t)`.
fn shifted(t: f64, shift: f64) -> f64 {
    shift * t / (1.0 + (shift - 1.0) * t)
}

/// The standard normal quantile (Acklam's rational approximation, relative error < 1.2e-9): the
/// same as Musubi's `sqrt(2) erfinv(2u - 1)` for bucketed draws.
pub fn normal_quantile(u: f64) -> f64 {
    let u = u.clamp(1e-7, 1.0 - 1e-7);
    const A: [f64; 6] = [
        -3.969683028665376e+01,
        2.209460984245205e+02,
        -2.759285104469687e+02,
        1.383_577_518_672_69e2,
        -3.066479806614716e+01,
        2.506628277459239e+00,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e+01,
        1.615858368580409e+02,
        -1.556989798598866e+02,
        6.680131188771972e+01,
        -1.328068155288572e+01,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-03,
        -3.223964580411365e-01,
        -2.400758277161838e+00,
        -2.549732539343734e+00,
        4.374664141464968e+00,
        2.938163982698783e+00,
    ];
    const D: [f64; 4] = [
        7.784695709041462e-03,
        3.224671290700398e-01,
        2.445134137142996e+00,
        3.754408661907416e+00,
    ];
    let low = 0.02425;
    if u < low {
        let q = (-2.0 * u.ln()).sqrt();
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else if u <= 1.0 - low {
        let q = u - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        -normal_quantile(1.0 - u)
    }
}

/// Linear function through `(x1, y1)` and `(x2, y2)` evaluated at `x` (Musubi `get_lin_function`).
fn line(x: f64, (x1, y1): (f64, f64), (x2, y2): (f64, f64)) -> f64 {
    let m = (y2 - y1) / (x2 - x1);
    m * x + (y1 - m * x1)
}

/// One draw: where a bucketed uniform `u` is given it replaces the random draws
/// (`uniform` uses it directly, the others use `z = quantile(u)`).
struct Draw<'a> {
    rng: &'a mut SeededRng,
    bucket: Option<f64>,
}

impl Draw<'_> {
    fn uniform(&mut self) -> f64 {
        self.bucket.unwrap_or_else(|| self.rng.uniform())
    }

    fn normal(&mut self) -> f64 {
        match self.bucket {
            Some(u) => normal_quantile(u),
            None => self.rng.normal(),
        }
    }
}

/// Samples one noise level `t` in (0, 1) for a latent of `height x width` packed tokens.
fn sample_one(config: &TimestepConfig, height: usize, width: usize, draw: &mut Draw) -> f64 {
    use TimestepSampling::*;
    let tokens = (height * width) as f64;
    let unpacked_tokens = ((height / 2) * (width / 2)) as f64;
    let logsnr =
        |draw: &mut Draw, mean: f64, std: f64| sigmoid(-(mean + std * draw.normal()) / 2.0);
    let shift_with_mu =
        |draw: &mut Draw, mu: f64| shifted(sigmoid(config.sigmoid_scale * draw.normal()), mu.exp());
    match config.sampling {
        Uniform => draw.uniform(),
        Sigmoid => sigmoid(config.sigmoid_scale * draw.normal()),
        Shift => shifted(
            sigmoid(config.sigmoid_scale * draw.normal()),
            config.discrete_flow_shift,
        ),
        Flux2Shift => shift_with_mu(draw, line(tokens, (256.0, 0.5), (4096.0, 1.15))),
        FluxShift => shift_with_mu(draw, line(unpacked_tokens, (256.0, 0.5), (4096.0, 1.15))),
        QwenShift => shift_with_mu(draw, line(unpacked_tokens, (256.0, 0.5), (8192.0, 0.9))),
        Krea2Shift => shift_with_mu(draw, line(unpacked_tokens, (256.0, 0.5), (6400.0, 1.15))),
        Ideogram4Shift => {
            let mean = 0.5 * ((height * 16 * width * 16) as f64 / (512.0 * 512.0)).ln();
            let t = sigmoid(mean + 1.5 * draw.normal());
            t.clamp(1.0 - sigmoid(7.5), 1.0 - sigmoid(-9.0))
        }
        Logsnr => logsnr(draw, config.logit_mean, config.logit_std),
        QinglongFlux => {
            let p = draw.rng.uniform();
            if p < 0.79 {
                shift_with_mu(draw, line(unpacked_tokens, (256.0, 0.5), (4096.0, 1.15)))
            } else if p < 0.9 {
                logsnr(draw, config.logit_mean, config.logit_std)
            } else {
                logsnr(draw, 5.36, 1.0)
            }
        }
        QinglongQwen => {
            let p = draw.rng.uniform();
            if p < 0.95 {
                shift_with_mu(draw, line(unpacked_tokens, (256.0, 0.5), (8192.0, 0.9)))
            } else {
                logsnr(draw, 5.36, 1.0)
            }
        }
        Sigma => {
            let mut u = match config.weighting_scheme {
                WeightingScheme::LogitNormal => {
                    sigmoid(config.logit_mean + config.logit_std * draw.normal())
                }
                _ => draw.uniform(),
            };
            if config.weighting_scheme == WeightingScheme::Mode {
                u = 1.0 - u - config.mode_scale * ((PI * u / 2.0).cos().powi(2) - 1.0 + u);
            }
            let t_min = config.min_timestep.unwrap_or(0.0);
            let t_max = config.max_timestep.unwrap_or(1000.0);
            // Musubi indexes the descending 1000..1 timestep table: timestep = 1000 - index.
            let index = (u * (t_max - t_min) + t_min).floor().clamp(0.0, 999.0);
            (1000.0 - index) / 1000.0
        }
    }
}

/// A sampled batch: the noise level of each sample and what the DiT is given as its timestep.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledTimesteps {
    /// Noise level `t`: `x_t = (1 - t) x0 + t noise`.
    pub sigmas: Vec<f64>,
    /// DiT timestep input in [0, 1] (`t + 0.001` outside `sigma` mode, Musubi's offset).
    pub model_timesteps: Vec<f64>,
}

/// Samples `batch` noise levels for latents of `height x width` packed tokens. `buckets` gives
/// pre-drawn stratified uniforms (`--num_timestep_buckets`), one per sample.
pub fn sample_timesteps(
    config: &TimestepConfig,
    batch: usize,
    height: usize,
    width: usize,
    rng: &mut SeededRng,
    buckets: Option<&[f64]>,
) -> SampledTimesteps {
    let mut sigmas = Vec::with_capacity(batch);
    for i in 0..batch {
        let bucket = buckets.and_then(|b| b.get(i).copied());
        let mut draw = Draw { rng, bucket };
        let t = if config.sampling == TimestepSampling::Sigma {
            sample_one(config, height, width, &mut draw)
        } else {
            let t_min = config.min_timestep.unwrap_or(0.0) / 1000.0;
            let t_max = config.max_timestep.unwrap_or(1000.0) / 1000.0;
            if config.preserve_distribution_shape {
                // Rejection sampling keeps the distribution's shape inside the range (up to 1000
                // tries, then the last draw is clamped, as Musubi).
                let mut t = sample_one(config, height, width, &mut draw);
                for _ in 0..1000 {
                    if (t_min..=t_max).contains(&t) {
                        break;
                    }
                    draw.bucket = None;
                    t = sample_one(config, height, width, &mut draw);
                }
                t.clamp(t_min, t_max)
            } else {
                sample_one(config, height, width, &mut draw) * (t_max - t_min) + t_min
            }
        };
        sigmas.push(t);
    }
    let model_timesteps = if config.sampling == TimestepSampling::Sigma {
        sigmas.clone()
    } else {
        sigmas.iter().map(|t| (t * 1000.0 + 1.0) / 1000.0).collect()
    };
    SampledTimesteps {
        sigmas,
        model_timesteps,
    }
}

/// Stratified uniforms for one epoch (`--num_timestep_buckets n`): equal numbers from each of `n`
/// sub-intervals of [0, 1], shuffled.
pub fn stratified_uniforms(count: usize, buckets: usize, rng: &mut SeededRng) -> Vec<f64> {
    let mut values: Vec<f64> = (0..count)
        .map(|i| {
            let bucket = (i % buckets) as f64;
            (bucket + rng.uniform()) / buckets as f64
        })
        .collect();
    for i in (1..values.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        values.swap(i, j);
    }
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(sampling: TimestepSampling) -> TimestepConfig {
        TimestepConfig {
            sampling,
            ..TimestepConfig::default()
        }
    }

    /// `flux2_shift` at 1024² (64x64 packed tokens) has shift e^1.15: the median of sigmoid(z)
    /// (0.5) maps to s/(1+s) = 0.7595.
    #[test]
    fn flux2_shift_median_matches_its_formula() {
        let mut rng = SeededRng::new(1);
        let mut values = sample_timesteps(
            &config(TimestepSampling::Flux2Shift),
            20001,
            64,
            64,
            &mut rng,
            None,
        )
        .sigmas;
        values.sort_by(f64::total_cmp);
        let s = 1.15f64.exp();
        assert!(
            (values[10000] - s / (1.0 + s)).abs() < 0.01,
            "{}",
            values[10000]
        );
    }

    #[test]
    fn the_model_gets_the_musubi_offset_outside_sigma_mode() {
        let mut rng = SeededRng::new(2);
        let sampled = sample_timesteps(&config(TimestepSampling::Uniform), 4, 8, 8, &mut rng, None);
        for (t, m) in sampled.sigmas.iter().zip(&sampled.model_timesteps) {
            assert!((m - t - 0.001).abs() < 1e-12);
        }
        let sampled = sample_timesteps(&config(TimestepSampling::Sigma), 4, 8, 8, &mut rng, None);
        assert_eq!(sampled.sigmas, sampled.model_timesteps);
        for t in sampled.sigmas {
            assert!((t * 1000.0 - (t * 1000.0).round()).abs() < 1e-9 && t > 0.0 && t <= 1.0);
        }
    }

    #[test]
    fn ranges_rescale_or_reject() {
        let mut c = config(TimestepSampling::Sigmoid);
        c.min_timestep = Some(200.0);
        c.max_timestep = Some(400.0);
        let mut rng = SeededRng::new(3);
        for preserve in [false, true] {
            c.preserve_distribution_shape = preserve;
            for t in sample_timesteps(&c, 500, 8, 8, &mut rng, None).sigmas {
                assert!((0.2..=0.4).contains(&t), "{t}");
            }
        }
    }

    #[test]
    fn buckets_replace_the_draws() {
        let c = config(TimestepSampling::Uniform);
        let mut rng = SeededRng::new(4);
        let sampled = sample_timesteps(&c, 2, 8, 8, &mut rng, Some(&[0.25, 0.75]));
        assert_eq!(sampled.sigmas, vec![0.25, 0.75]);
        let strata = stratified_uniforms(8, 4, &mut rng);
        for k in 0..4 {
            let in_bucket = strata
                .iter()
                .filter(|u| (**u * 4.0).floor() as usize == k)
                .count();
            assert_eq!(in_bucket, 2);
        }
        assert!((normal_quantile(0.975) - 1.959964).abs() < 1e-6);
    }

    #[test]
    fn weights_follow_their_formulas() {
        assert!((WeightingScheme::SigmaSqrt.loss_weight(0.5) - 4.0).abs() < 1e-12);
        assert!((WeightingScheme::Cosmap.loss_weight(0.5) - 2.0 / (PI * 0.5)).abs() < 1e-12);
        assert_eq!(WeightingScheme::None.loss_weight(0.3), 1.0);
        assert!(TimestepSampling::parse("flux2_shift").is_ok());
        assert!(TimestepSampling::parse("flux3")
            .unwrap_err()
            .to_string()
            .contains("flux3"));
    }
}
