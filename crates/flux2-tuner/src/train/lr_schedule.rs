//! Learning-rate schedules (`--lr_scheduler`, training-and-data.md §5.2), as the multiplier of
//! the base learning rate at optimiser step `step` (0-based) of `total` steps. The formulas are
//! those of the diffusers/transformers schedulers Musubi calls.

use std::f64::consts::PI;

use crate::error::{Error, Result};

/// `--lr_scheduler` and its options.
#[derive(Debug, Clone, PartialEq)]
pub enum LrSchedule {
    Constant,
    ConstantWithWarmup {
        warmup: usize,
    },
    Linear {
        warmup: usize,
    },
    Cosine {
        warmup: usize,
    },
    CosineWithRestarts {
        warmup: usize,
        cycles: usize,
    },
    Polynomial {
        warmup: usize,
        power: f64,
        end_ratio: f64,
    },
    CosineWithMinLr {
        warmup: usize,
        min_lr_ratio: f64,
    },
}

/// `--lr_warmup_steps` as Musubi reads it: an integer, a ratio below 1 of the total, or `N%`.
pub fn parse_steps(value: &str, total: usize, flag: &str) -> Result<usize> {
    let bad = || Error::InvalidArgument {
        name: flag.to_string(),
        message: format!("`{value}` is not a step count, a ratio below 1 or a percentage"),
    };
    if let Some(percent) = value.strip_suffix('%') {
        let p: f64 = percent.parse().map_err(|_| bad())?;
        return Ok((total as f64 * p / 100.0) as usize);
    }
    if let Ok(steps) = value.parse::<usize>() {
        return Ok(steps);
    }
    let ratio: f64 = value.parse().map_err(|_| bad())?;
    if (0.0..1.0).contains(&ratio) {
        Ok((total as f64 * ratio) as usize)
    } else {
        Err(bad())
    }
}

impl LrSchedule {
    /// Builds a schedule from Musubi's flags.
    pub fn from_flags(
        name: &str,
        warmup: usize,
        cycles: usize,
        power: f64,
        min_lr_ratio: Option<f64>,
    ) -> Result<Self> {
        Ok(match name {
            "constant" => {
                if warmup > 0 {
                    return Err(Error::InvalidArgument {
                        name: "--lr_warmup_steps".into(),
                        message: "the constant schedule has no warmup; use constant_with_warmup".into(),
                    });
                }
                Self::Constant
            }
            "constant_with_warmup" => Self::ConstantWithWarmup { warmup },
            "linear" => Self::Linear { warmup },
            "cosine" => Self::Cosine { warmup },
            "cosine_with_restarts" => Self::CosineWithRestarts { warmup, cycles: cycles.max(1) },
            "polynomial" => Self::Polynomial {
                warmup,
                power,
                end_ratio: min_lr_ratio.unwrap_or(0.0),
            },
            "cosine_with_min_lr" => Self::CosineWithMinLr {
                warmup,
                min_lr_ratio: min_lr_ratio.ok_or_else(|| Error::InvalidArgument {
                    name: "--lr_scheduler_min_lr_ratio".into(),
                    message: "cosine_with_min_lr needs it".into(),
                })?,
            },
            other => {
                return Err(Error::InvalidArgument {
                    name: "--lr_scheduler".into(),
                    message: format!(
                        "`{other}` is not supported; use constant, constant_with_warmup, linear, cosine, \
                         cosine_with_restarts, polynomial or cosine_with_min_lr"
                    ),
                })
            }
        })
    }

    /// The learning-rate multiplier at optimiser step `step` of `total`.
    pub fn factor(&self, step: usize, total: usize) -> f64 {
        let warmup_factor = |warmup: usize| -> Option<f64> {
            (step < warmup).then(|| step as f64 / warmup.max(1) as f64)
        };
        let progress = |warmup: usize| -> f64 {
            (step - warmup.min(step)) as f64 / (total.saturating_sub(warmup)).max(1) as f64
        };
        match *self {
            Self::Constant => 1.0,
            Self::ConstantWithWarmup { warmup } => warmup_factor(warmup).unwrap_or(1.0),
            Self::Linear { warmup } => {
                warmup_factor(warmup).unwrap_or_else(|| (1.0 - progress(warmup)).max(0.0))
            }
            Self::Cosine { warmup } => warmup_factor(warmup)
                .unwrap_or_else(|| (0.5 * (1.0 + (PI * progress(warmup)).cos())).max(0.0)),
            Self::CosineWithRestarts { warmup, cycles } => {
                warmup_factor(warmup).unwrap_or_else(|| {
                    let p = progress(warmup);
                    if p >= 1.0 {
                        return 0.0;
                    }
                    0.5 * (1.0 + (PI * ((cycles as f64 * p) % 1.0)).cos())
                })
            }
            Self::Polynomial {
                warmup,
                power,
                end_ratio,
            } => warmup_factor(warmup).unwrap_or_else(|| {
                let p = progress(warmup).min(1.0);
                (1.0 - end_ratio) * (1.0 - p).powf(power) + end_ratio
            }),
            Self::CosineWithMinLr {
                warmup,
                min_lr_ratio,
            } => warmup_factor(warmup).unwrap_or_else(|| {
                // transformers' cosine_with_min_lr with num_cycles = 0.5 (Musubi passes cycles/2).
                let cosine = 0.5 * (1.0 + (PI * progress(warmup)).cos());
                cosine * (1.0 - min_lr_ratio) + min_lr_ratio
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each schedule against its closed form at hand-picked points (100 steps, 10 warmup).
    #[test]
    fn schedules_follow_their_formulas() {
        let total = 100;
        let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        close(LrSchedule::Constant.factor(57, total), 1.0);
        let warm = LrSchedule::ConstantWithWarmup { warmup: 10 };
        close(warm.factor(0, total), 0.0);
        close(warm.factor(5, total), 0.5);
        close(warm.factor(10, total), 1.0);
        let linear = LrSchedule::Linear { warmup: 10 };
        close(linear.factor(55, total), 1.0 - 45.0 / 90.0);
        close(linear.factor(100, total), 0.0);
        let cosine = LrSchedule::Cosine { warmup: 10 };
        close(cosine.factor(55, total), 0.5);
        close(cosine.factor(10, total), 1.0);
        let restarts = LrSchedule::CosineWithRestarts {
            warmup: 10,
            cycles: 2,
        };
        close(restarts.factor(10 + 45, total), 1.0); // second cycle starts at half way
        close(
            restarts.factor(10 + 22, total),
            0.5 * (1.0 + (PI * (2.0 * 22.0 / 90.0)).cos()),
        );
        let poly = LrSchedule::Polynomial {
            warmup: 10,
            power: 2.0,
            end_ratio: 0.0,
        };
        close(poly.factor(55, total), 0.25);
        let min = LrSchedule::CosineWithMinLr {
            warmup: 10,
            min_lr_ratio: 0.1,
        };
        close(min.factor(55, total), 0.5 * 0.9 + 0.1);
        close(min.factor(100, total), 0.1);
    }

    #[test]
    fn warmup_steps_accept_counts_ratios_and_percentages() {
        assert_eq!(parse_steps("50", 1000, "--lr_warmup_steps").unwrap(), 50);
        assert_eq!(parse_steps("0.1", 1000, "--lr_warmup_steps").unwrap(), 100);
        assert_eq!(parse_steps("5%", 1000, "--lr_warmup_steps").unwrap(), 50);
        assert!(parse_steps("lots", 1000, "--lr_warmup_steps").is_err());
        assert!(LrSchedule::from_flags("constant", 5, 1, 1.0, None).is_err());
        assert!(LrSchedule::from_flags("rex", 0, 1, 1.0, None)
            .unwrap_err()
            .to_string()
            .contains("rex"));
    }
}
