//! Golden parity against the reference implementation (diffusers/transformers, f32) on a fixture
//! set: `cargo test --release --test golden`, fixtures from `FLUX2_GOLDEN_DIR` (default: the copy
//! vendored in `fixtures/golden`, else `../shared/golden`). Every case of the manifest whose kind is
//! implemented runs; nothing about shapes is assumed beyond what the manifest and files say.

mod dit;
mod fixtures;
mod report;
mod schedule;

use candle_core::DType;
use serde_json::Value;

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
fn run_case(set: &FixtureSet, variant: &Value, name: &str, case: &Value, id: &str, report: &mut Report) {
    match name {
        "dit_forward" | "dit_forward_ref" | "lora_forward" => {
            for (dtype, label, key) in [(DType::F32, id.to_string(), "f32"), (DType::BF16, format!("{id}@bf16"), "bf16")] {
                let tol = match tolerance(case, &[key]) {
                    Ok(t) => t,
                    Err(e) => return report.error(&label, &e.to_string()),
                };
                match dit::run(set, variant, case, dtype) {
                    Ok(error) => report.check(&label, error, tol),
                    Err(e) => report.error(&label, &e.to_string()),
                }
            }
        }
        _ => println!("golden {id}: not run, this kind of case is not implemented yet"),
    }
}
