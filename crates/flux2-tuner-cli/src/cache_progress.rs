//! Terminal progress for the cache jobs: a bar over items with counts and rate, phase lines, and
//! the closing summary with every deleted, kept or unreadable file listed.

use std::path::Path;

use flux2_tuner::data::{CacheObserver, CacheSummary, ItemOutcome};
use indicatif::{ProgressBar, ProgressStyle};

/// A bar over every item of every dataset.
pub struct CacheProgress {
    bar: Option<ProgressBar>,
}

impl CacheProgress {
    pub fn new() -> Self {
        Self { bar: None }
    }

    fn say(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    /// Closes the bar after an error.
    pub fn abandon(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.abandon();
        }
    }

    /// Closes the bar and prints the summary.
    pub fn finish(&mut self, summary: &CacheSummary) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        for (path, reason) in &summary.bad_images {
            eprintln!("skipped unreadable image {}: {reason}", path.display());
        }
        for path in &summary.removed {
            eprintln!("removed stale cache {}", path.display());
        }
        for path in &summary.kept {
            eprintln!("kept stale cache {} (--keep_cache)", path.display());
        }
        println!(
            "cached {} items, skipped {}, failed {} in {:.1} s",
            summary.cached, summary.skipped, summary.failed, summary.seconds
        );
    }
}

impl CacheObserver for CacheProgress {
    fn phase(&mut self, message: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(message.to_string()),
            None => eprintln!("{message}"),
        }
    }

    fn started(&mut self, total_items: usize) {
        let bar = ProgressBar::new(total_items as u64);
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} items {per_sec} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        self.bar = Some(bar);
    }

    fn item_finished(&mut self, item: &Path, outcome: &ItemOutcome) {
        if let ItemOutcome::Failed(reason) = outcome {
            self.say(&format!("cannot read {}: {reason}", item.display()));
        }
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
    }

    fn stale_cache(&mut self, path: &Path, removed: bool) {
        let what = if removed { "removing" } else { "keeping" };
        self.say(&format!("{what} stale cache {}", path.display()));
    }
}
