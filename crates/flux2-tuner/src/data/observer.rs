//! What the cache jobs report while they run, and what they return: the library never prints, a
//! front end (the CLI's progress bars, a test) implements [`CacheObserver`].

use std::path::{Path, PathBuf};

/// What happened to one item.
#[derive(Debug, Clone, PartialEq)]
pub enum ItemOutcome {
    /// Encoded and written.
    Cached,
    /// Its cache was already up to date (`skip_existing`).
    Skipped,
    /// Could not be read; listed and left out (`skip_bad_images`).
    Failed(String),
}

/// Progress callbacks; every method has an empty default.
pub trait CacheObserver {
    /// A phase starts (loading a model, a dataset...).
    fn phase(&mut self, _message: &str) {}
    /// The number of items the run will go through, known once every dataset has been listed.
    fn started(&mut self, _total_items: usize) {}
    /// One item is done (its image path, or its caption's item for text caches).
    fn item_finished(&mut self, _item: &Path, _outcome: &ItemOutcome) {}
    /// A cache that no longer belongs to its dataset was deleted (`removed`) or kept.
    fn stale_cache(&mut self, _path: &Path, _removed: bool) {}
}

/// An observer that ignores everything.
pub struct SilentObserver;

impl CacheObserver for SilentObserver {}

/// The totals of a cache run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CacheSummary {
    pub cached: usize,
    pub skipped: usize,
    pub failed: usize,
    /// Images that could not be read, with the reason (`skip_bad_images`).
    pub bad_images: Vec<(PathBuf, String)>,
    /// Caches deleted because no item of their dataset produces them any more, and half-written
    /// temporaries left by killed runs.
    pub removed: Vec<PathBuf>,
    /// Such caches kept because of `keep_cache`.
    pub kept: Vec<PathBuf>,
    /// Wall time of the whole run, model loading included.
    pub seconds: f64,
}

impl CacheSummary {
    /// Counts an outcome and passes it on to the observer.
    pub(crate) fn record(
        &mut self,
        observer: &mut dyn CacheObserver,
        item: &Path,
        outcome: ItemOutcome,
    ) {
        match &outcome {
            ItemOutcome::Cached => self.cached += 1,
            ItemOutcome::Skipped => self.skipped += 1,
            ItemOutcome::Failed(reason) => {
                self.failed += 1;
                self.bad_images.push((item.to_path_buf(), reason.clone()));
            }
        }
        observer.item_finished(item, &outcome);
    }

    /// Deletes (or, with `keep`, lists) the cache files in `existing` that are not in `produced`.
    pub(crate) fn clean_stale(
        &mut self,
        observer: &mut dyn CacheObserver,
        existing: &[PathBuf],
        produced: &std::collections::HashSet<PathBuf>,
        keep: bool,
    ) -> crate::Result<()> {
        for path in existing {
            if produced.contains(path) {
                continue;
            }
            if keep {
                self.kept.push(path.clone());
            } else {
                std::fs::remove_file(path)
                    .map_err(|e| crate::Error::io(path, "cannot delete the stale cache", e))?;
                self.removed.push(path.clone());
            }
            observer.stale_cache(path, !keep);
        }
        Ok(())
    }
}
