//! AE cases of the manifest's top-level `ae` section: `ae/ae_encode` (moments, mean and latents)
//! and `ae/ae_decode` (image and reconstruction), in f32 and bf16. The AE file and every shape come
//! from the manifest and the files.

use candle_core::DType;
use flux2_tuner::checkpoint::Checkpoint;
use flux2_tuner::models::ae::AutoEncoder;
use serde_json::Value;

use crate::fixtures::{relative_error, tolerance, FixtureSet, Result};
use crate::report::Report;

/// Runs every case of the `ae` section that this module knows, in both dtypes.
pub fn run_all(set: &FixtureSet, report: &mut Report) {
    let Some(section) = set.manifest.get("ae") else {
        println!("golden ae: not run, the manifest has no `ae` section");
        return;
    };
    let empty = serde_json::Map::new();
    let cases = section["cases"].as_object().unwrap_or(&empty);
    for (dtype, key, suffix) in [(DType::F32, "f32", ""), (DType::BF16, "bf16", "@bf16")] {
        let autoencoder = section["file"]
            .as_str()
            .ok_or_else(|| "the manifest's ae section has no file".into())
            .and_then(|file| load(set, file, dtype));
        for (name, case) in cases {
            let id = format!("ae/{name}{suffix}");
            let autoencoder = match &autoencoder {
                Ok(autoencoder) => autoencoder,
                Err(e) => {
                    report.error(&id, &e.to_string());
                    continue;
                }
            };
            let tol = match tolerance(case, &[key]) {
                Ok(t) => t,
                Err(e) => {
                    report.error(&id, &e.to_string());
                    continue;
                }
            };
            let result = match name.as_str() {
                "ae_encode" => encode(set, autoencoder, case),
                "ae_decode" => decode(set, autoencoder, case),
                _ => {
                    println!("golden {id}: not run, this kind of case is not implemented yet");
                    continue;
                }
            };
            match result {
                Ok(error) => report.check(&id, error, tol),
                Err(e) => report.error(&id, &e.to_string()),
            }
        }
    }
}

fn load(set: &FixtureSet, file: &str, dtype: DType) -> Result<AutoEncoder> {
    let checkpoint = Checkpoint::open(&set.dir.join(file))?;
    Ok(AutoEncoder::load(
        &checkpoint,
        dtype,
        &crate::fixtures::device(),
    )?)
}

/// Largest relative error over the moments, the mean and the latents of an encode case.
fn encode(set: &FixtureSet, autoencoder: &AutoEncoder, case: &Value) -> Result<f64> {
    let tensors = set.tensors(case["file"].as_str().ok_or("case has no file")?)?;
    let moments = autoencoder.moments(&tensors.f32("image")?)?;
    let z = autoencoder.config().z_channels;
    let mean = moments.narrow(1, 0, z)?;
    let latents = autoencoder.normalise(&mean)?;
    let mut worst = relative_error(&latents, &tensors.f32("latents")?)?;
    if tensors.has("moments") {
        worst = worst.max(relative_error(&moments, &tensors.f32("moments")?)?);
    }
    if tensors.has("mean") {
        worst = worst.max(relative_error(&mean, &tensors.f32("mean")?)?);
    }
    Ok(worst)
}

/// Largest relative error over the decoded `image` and the `reconstruction` of a decode case.
fn decode(set: &FixtureSet, autoencoder: &AutoEncoder, case: &Value) -> Result<f64> {
    let tensors = set.tensors(case["file"].as_str().ok_or("case has no file")?)?;
    let image = autoencoder.decode(&tensors.f32("latents")?)?;
    let mut worst = relative_error(&image, &tensors.f32("image")?)?;
    if tensors.has("reconstruction") {
        let reconstruction = autoencoder.decode(&tensors.f32("encode_latents")?)?;
        worst = worst.max(relative_error(
            &reconstruction,
            &tensors.f32("reconstruction")?,
        )?);
    }
    Ok(worst)
}
