//! The `schedule` case: sigma schedules for every (steps, tokens) pair and every flow shift.

use flux2_tuner::sample::schedule::{flux2_schedule, shifted_schedule};
use serde_json::Value;

use crate::fixtures::{absolute_error, tolerance, FixtureSet, Result};

/// Returns the largest absolute error over all sub-cases and the tolerance.
pub fn run(set: &FixtureSet) -> Result<(f64, f64)> {
    let schedule = &set.manifest["schedule"];
    let tensors = set.tensors(schedule["file"].as_str().ok_or("schedule has no file")?)?;
    let tol = tolerance(schedule, &["f32"])?;
    let mut worst = 0f64;
    for case in schedule["cases"]
        .as_array()
        .ok_or("schedule has no cases")?
    {
        let steps = case["num_steps"].as_u64().ok_or("case without num_steps")? as usize;
        let (key, sigmas) = match &case["index"] {
            Value::String(name) => {
                let shift = case["flow_shift"]
                    .as_f64()
                    .ok_or("shift case without flow_shift")?;
                (format!("{name}.sigmas_f32"), shifted_schedule(steps, shift))
            }
            index => {
                let tokens = case["image_seq_len"]
                    .as_u64()
                    .ok_or("case without image_seq_len")?;
                (
                    format!("s{index}.sigmas_f32"),
                    flux2_schedule(steps, tokens as usize),
                )
            }
        };
        let expected = tensors.f32(&key)?;
        let actual = candle_core::Tensor::new(sigmas.as_slice(), &candle_core::Device::Cpu)?;
        worst = worst.max(absolute_error(&actual, &expected)?);
    }
    Ok((worst, tol))
}
