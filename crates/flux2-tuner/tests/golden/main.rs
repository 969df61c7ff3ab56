//! Golden parity against the reference implementation (diffusers/transformers, f32) on a fixture
//! set: `cargo test --release --test golden`, fixtures from `FLUX2_GOLDEN_DIR` (default: the copy
//! vendored in `fixtures/golden`, else `../shared/golden`). Every case of the manifest whose kind is
//! implemented runs; nothing about shapes is assumed beyond what the manifest and files say.

mod ae;
mod dit;
mod fixtures;
mod report;
mod sample;
mod schedule;
mod te;
mod train;

use candle_core::DType;
use serde_json::Value;

use dit::LoraMode;
use fixtures::{tolerance, FixtureSet};
use report::Report;

fn main() {
    let dir = fixtures::golden_dir();
    println!("golden fixtures: {}", dir.display());
    let set = match FixtureSet::open(&dir) {
        Ok(set) => set,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let mut report = Report::new();

    match schedule::run(&set) {
        Ok((error, tol)) => report.check("schedule", error, tol),
        Err(e) => report.error("schedule", &e.to_string()),
    }

    ae::run_all(&set, &mut report);

    let empty = serde_json::Map::new();
    let variants = set.manifest["variants"].as_object().unwrap_or(&empty);
    for (variant_name, variant) in variants {
        let cases = variant["cases"].as_object().unwrap_or(&empty);
        for (case_name, case) in cases {
            let id = format!("{variant_name}/{case_name}");
            run_case(&set, variant, case_name, case, &id, &mut report);
        }
    }

    if !report.finish() {
        std::process::exit(1);
    }
}

/// Dispatches a case by its kind (the case name without a variant suffix).
fn run_case(
    set: &FixtureSet,
    variant: &Value,
    name: &str,
    case: &Value,
    id: &str,
    report: &mut Report,
) {
    match name {
        "dit_forward" | "dit_forward_ref" | "lora_forward" => {
            let mut runs = vec![
                (DType::F32, id.to_string(), "f32", LoraMode::Merged),
                (DType::BF16, format!("{id}@bf16"), "bf16", LoraMode::Merged),
            ];
            // LoRA cases also run unmerged (extra low-rank matmuls), against the same golden.
            if case.get("lora_file").is_some() {
                runs.push((
                    DType::F32,
                    format!("{id}@unmerged"),
                    "f32",
                    LoraMode::Unmerged,
                ));
            }
            for (dtype, label, key, mode) in runs {
                let tol = match tolerance(case, &[key]) {
                    Ok(t) => t,
                    Err(e) => return report.error(&label, &e.to_string()),
                };
                match dit::run(set, variant, case, dtype, mode) {
                    Ok(error) => report.check(&label, error, tol),
                    Err(e) => report.error(&label, &e.to_string()),
                }
            }
        }
        "te_encode" => te::run(set, variant, case, id, report),
        name if name.starts_with("sample") => run_sample(set, variant, case, id, report),
        "train_step" => train::run(set, variant, case, id, report),
        _ => println!("golden {id}: not run, this kind of case is not implemented yet"),
    }
}

/// A sampling case in f32 (latents tolerance) and bf16, and the decoded image of the f32 run
/// (`@decoded`, through the fixture set's AE).
fn run_sample(set: &FixtureSet, variant: &Value, case: &Value, id: &str, report: &mut Report) {
    for (dtype, label, key) in [
        (DType::F32, id.to_string(), &["f32", "latents"][..]),
        (DType::BF16, format!("{id}@bf16"), &["bf16"][..]),
    ] {
        let tol = match tolerance(case, key) {
            Ok(t) => t,
            Err(e) => return report.error(&label, &e.to_string()),
        };
        let result = match sample::run(set, variant, case, dtype) {
            Ok(result) => result,
            Err(e) => return report.error(&label, &e.to_string()),
        };
        report.check(&label, result.latents_error, tol);
        if dtype == DType::F32 {
            let label = format!("{id}@decoded");
            match tolerance(case, &["f32", "decoded"])
                .and_then(|tol| Ok((sample::decoded_error(set, case, &result)?, tol)))
            {
                Ok((error, tol)) => report.check(&label, error, tol),
                Err(e) => report.error(&label, &e.to_string()),
            }
        }
    }
}
