//! The plan as text: one block per phase with its lines, the peak, whether it fits, and the
//! suggestion.

use std::fmt::Write;

use super::{Plan, Suggestion};

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Bytes as GiB with two decimals.
pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / GIB)
}

/// The whole report. `vram` is the device memory to fit (bytes); `suggestion` is what
/// [`super::suggest`] returned, only looked at when the plan does not fit.
pub fn render(plan: &Plan, vram: Option<u64>, suggestion: Option<&Suggestion>) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "memory plan: {}", plan.title);
    for phase in &plan.phases {
        let _ = writeln!(
            out,
            "phase: {}{}: {}",
            phase.name,
            if phase.separate_command {
                " (separate command)"
            } else {
                ""
            },
            gib(phase.total())
        );
        for item in &phase.items {
            let _ = writeln!(out, "  {:>11}  {}", gib(item.bytes), item.name);
        }
    }
    for note in &plan.notes {
        let _ = writeln!(out, "note: {note}");
    }
    if plan.host_bytes > 0 {
        let _ = writeln!(
            out,
            "host memory for swapped blocks and offloaded activations: {}",
            gib(plan.host_bytes)
        );
    }
    let phase = plan.peak_phase().map(|p| p.name.as_str()).unwrap_or("none");
    let _ = writeln!(out, "peak device memory: {} ({phase})", gib(plan.peak()));
    if let Some(vram) = vram {
        if plan.fits(vram) {
            let _ = writeln!(out, "fits: yes, in {}", gib(vram));
        } else {
            let _ = writeln!(
                out,
                "fits: no, {} needed, {} available",
                gib(plan.peak()),
                gib(vram)
            );
            match suggestion {
                Some(found) if found.fits => {
                    let _ = writeln!(
                        out,
                        "suggestion: add {} (peak {})",
                        found.flags.join(" "),
                        gib(found.plan.peak())
                    );
                }
                Some(found) => {
                    let phase = found
                        .plan
                        .peak_phase()
                        .map(|p| p.name.as_str())
                        .unwrap_or("none");
                    let _ = writeln!(
                        out,
                        "suggestion: none fits; even with {} the peak is {} ({phase}): lower the \
                         resolution or the batch size, or use a larger device",
                        if found.flags.is_empty() {
                            "the settings given".to_string()
                        } else {
                            found.flags.join(" ")
                        },
                        gib(found.plan.peak())
                    );
                }
                None => {}
            }
        }
    }
    out
}
