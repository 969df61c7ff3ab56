//! Collects case results and prints them as `golden <case-id> rel_err=<x> tol=<y> PASS|FAIL`.

pub struct Report {
    passed: usize,
    failed: Vec<String>,
}

impl Report {
    pub fn new() -> Self {
        Self {
            passed: 0,
            failed: Vec::new(),
        }
    }

    /// Records a measured case.
    pub fn check(&mut self, id: &str, error: f64, tolerance: f64) {
        let pass = error.is_finite() && error <= tolerance;
        println!(
            "golden {id} rel_err={error:.3e} tol={tolerance:.1e} {}",
            if pass { "PASS" } else { "FAIL" }
        );
        if pass {
            self.passed += 1;
        } else {
            self.failed.push(id.to_string());
        }
    }

    /// Records a case that could not run (an error before a number was measured).
    pub fn error(&mut self, id: &str, message: &str) {
        // Keep the line to one line: candle errors may carry a backtrace after the first line.
        let first_line = message.lines().next().unwrap_or_default();
        println!("golden {id} rel_err=NaN tol=0 FAIL");
        println!("  reason: {first_line}");
        self.failed.push(id.to_string());
    }

    /// Prints the summary; returns true when every case passed.
    pub fn finish(&self) -> bool {
        if !self.failed.is_empty() {
            println!("failed cases: {}", self.failed.join(", "));
        }
        println!(
            "golden: {} passed, {} failed",
            self.passed,
            self.failed.len()
        );
        self.failed.is_empty()
    }
}
