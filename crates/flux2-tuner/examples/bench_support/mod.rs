//! What the benchmark programs share: running a reference script of `tools/bench` with the
//! PyTorch virtual environment (`$FLUX2_REF_PYTHON`, else `/work/venv-ref/bin/python`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The Python interpreter of the reference environment.
pub const DEFAULT_PYTHON: &str = "/work/venv-ref/bin/python";

/// Runs `tools/bench/{script}` with `arguments` and returns its standard output, or why it could
/// not run (no Python, or the script failed: the last lines of its error output).
pub fn run_reference(script: &str, arguments: &[String]) -> Result<String, String> {
    let python = std::env::var_os("FLUX2_REF_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PYTHON));
    if !python.exists() {
        return Err(format!(
            "no Python at {} (set FLUX2_REF_PYTHON)",
            python.display()
        ));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tools/bench")
        .join(script);
    let output = Command::new(&python)
        .arg(&script)
        .args(arguments)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
        return Err(format!("{} failed: {}", script.display(), tail.join(" | ")));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
