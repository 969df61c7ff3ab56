//! Terminal progress for long work: a phase line and a bar over sampling steps.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// A progress bar over every sampling step of every image.
pub struct StepProgress {
    bar: Option<ProgressBar>,
    steps_done: usize,
    sampling: Duration,
    last: Option<Instant>,
}

impl StepProgress {
    pub fn new() -> Self {
        Self {
            bar: None,
            steps_done: 0,
            sampling: Duration::ZERO,
            last: None,
        }
    }

    /// Prints the start of a phase.
    pub fn set_phase(&mut self, message: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(message.to_string()),
            None => eprintln!("{message}"),
        }
        self.last = Some(Instant::now());
    }

    /// Records a finished step.
    pub fn advance(&mut self, image: usize, images: usize, step: usize, steps: usize) {
        let now = Instant::now();
        // Each step is timed from the previous step or from the start of the sampling phase.
        if let Some(last) = self.last {
            self.sampling += now - last;
        }
        self.last = Some(now);
        let bar = self.bar.get_or_insert_with(|| {
            let bar = ProgressBar::new((steps * images) as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {pos}/{len} steps {per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar
        });
        bar.set_message(format!("image {}/{images}", image + 1));
        bar.set_position((image * steps + step + 1) as u64);
        self.steps_done += 1;
    }

    /// Closes the bar; returns the number of steps seen.
    pub fn finish(&mut self) -> usize {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        self.steps_done
    }

    /// Seconds spent in sampling steps (model loading excluded).
    pub fn sampling_seconds(&self) -> f64 {
        self.sampling.as_secs_f64()
    }
}
