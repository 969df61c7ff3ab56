//! How `--blocks_to_swap N` is split between double and single blocks (Musubi
//! `Flux2.enable_block_swap`, training-and-data.md §6.2): one double block counts as two single
//! blocks, `N ≈ double + single / 2`, and at most `n − 2` blocks of each type may be swapped.

use crate::error::{Error, Result};

/// How many of the last double and single blocks are swapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SwapSplit {
    pub double: usize,
    pub single: usize,
}

impl SwapSplit {
    /// True when no block is swapped.
    pub fn is_empty(&self) -> bool {
        self.double == 0 && self.single == 0
    }
}

/// The rounding and adjusting of Musubi, before its `n − 2` assertion. Python's `round` rounds
/// halves to even, hence `round_ties_even`.
fn musubi_split(blocks_to_swap: usize, double_blocks: usize, single_blocks: usize) -> (i64, i64) {
    let (n, doubles, singles) = (
        blocks_to_swap as i64,
        double_blocks as i64,
        single_blocks as i64,
    );
    if n <= 0 {
        return (0, 0);
    }
    if doubles == 0 {
        return (0, n);
    }
    if singles == 0 {
        return (n, 0);
    }
    let ratio = singles as f64 / doubles as f64;
    let mut double = (n as f64 / (1.0 + ratio / 2.0)).round_ties_even() as i64;
    let mut single = (double as f64 * ratio).round_ties_even() as i64;
    if doubles * 2 < singles {
        while double >= 1 && double > doubles - 2 {
            double -= 1;
            single += 2;
        }
    } else {
        while single >= 2 && single > singles - 2 {
            single -= 2;
            double += 1;
        }
    }
    if double == 0 && single == 0 {
        if singles >= doubles {
            single = 1;
        } else {
            double = 1;
        }
    }
    (double, single)
}

/// Splits `blocks_to_swap` as Musubi does, or explains why the model cannot swap that many.
///
/// The error names the largest accepted `N` for this model (see [`max_blocks_to_swap`]).
pub fn split_blocks_to_swap(
    blocks_to_swap: usize,
    double_blocks: usize,
    single_blocks: usize,
) -> Result<SwapSplit> {
    // No swap needs no limit (a model with under two blocks of a type has a negative one).
    if blocks_to_swap == 0 {
        return Ok(SwapSplit {
            double: 0,
            single: 0,
        });
    }
    let (double, single) = musubi_split(blocks_to_swap, double_blocks, single_blocks);
    let double_limit = double_blocks as i64 - 2;
    let single_limit = single_blocks as i64 - 2;
    if double > double_limit || single > single_limit {
        let maximum = match max_blocks_to_swap(double_blocks, single_blocks) {
            0 => "this model cannot swap any block".to_string(),
            m => format!("the maximum for this model is {m}"),
        };
        return Err(Error::InvalidArgument {
            name: "--blocks_to_swap".into(),
            message: format!(
                "{blocks_to_swap} would swap {double} of {double_blocks} double and {single} of \
                 {single_blocks} single blocks, but at most {} double and {} single blocks may be \
                 swapped (two of each stay on the device); {maximum}",
                double_limit.max(0),
                single_limit.max(0)
            ),
        });
    }
    Ok(SwapSplit {
        double: double as usize,
        single: single as usize,
    })
}

/// The largest `N` for which every `1..=N` is accepted (0 when none is): 29 for dev (8 + 48
/// blocks), 13 for klein-4B (5 + 20) and 16 for klein-9B (8 + 24).
pub fn max_blocks_to_swap(double_blocks: usize, single_blocks: usize) -> usize {
    (1..=double_blocks + single_blocks)
        .take_while(|&n| split_within_limits(n, double_blocks, single_blocks))
        .last()
        .unwrap_or(0)
}

fn split_within_limits(blocks_to_swap: usize, double_blocks: usize, single_blocks: usize) -> bool {
    let (double, single) = musubi_split(blocks_to_swap, double_blocks, single_blocks);
    double <= double_blocks as i64 - 2 && single <= single_blocks as i64 - 2
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(n: usize, doubles: usize, singles: usize) -> (usize, usize) {
        let s = split_blocks_to_swap(n, doubles, singles).unwrap();
        (s.double, s.single)
    }

    /// The spec's worked examples (training-and-data.md §6.2).
    #[test]
    fn worked_examples() {
        assert_eq!(split(29, 8, 48), (6, 44));
        assert_eq!(split(16, 8, 24), (6, 18));
        assert_eq!(split(13, 5, 20), (3, 18));
    }

    /// Rows derived by hand from the rule.
    #[test]
    fn hand_derived_rows() {
        // dev, N = 10: r = 6, round(10 / 4) = round(2.5) = 2 (half to even), single = 12.
        assert_eq!(split(10, 8, 48), (2, 12));
        // dev, N = 14: round(3.5) = 4 (half to even), single = 24.
        assert_eq!(split(14, 8, 48), (4, 24));
        // klein-4B, N = 4: r = 4, round(4 / 3) = 1, single = 4; 1 <= 3 so no adjustment.
        assert_eq!(split(4, 5, 20), (1, 4));
        // klein-9B, N = 1: r = 3, round(0.4) = 0, single 0: one single block is swapped instead.
        assert_eq!(split(1, 8, 24), (0, 1));
        // Equal counts (2 * 4 >= 4): r = 1, round(3 / 1.5) = 2, single 2 > 4 - 2? no: (2, 2).
        assert_eq!(split(3, 4, 4), (2, 2));
        // N = 0 swaps nothing.
        assert_eq!(split(0, 8, 48), (0, 0));
    }

    #[test]
    fn documented_maxima() {
        assert_eq!(max_blocks_to_swap(8, 48), 29);
        assert_eq!(max_blocks_to_swap(5, 20), 13);
        assert_eq!(max_blocks_to_swap(8, 24), 16);
        // The tiny golden models (2 + 2, 2 + 3) cannot swap under Musubi's rule.
        assert_eq!(max_blocks_to_swap(2, 2), 0);
        assert_eq!(max_blocks_to_swap(2, 3), 0);
    }

    #[test]
    fn too_many_blocks_name_the_maximum() {
        for (n, doubles, singles, maximum) in [(30, 8, 48, 29), (14, 5, 20, 13), (17, 8, 24, 16)] {
            let message = split_blocks_to_swap(n, doubles, singles)
                .unwrap_err()
                .to_string();
            assert!(message.contains("--blocks_to_swap"), "{message}");
            assert!(
                message.contains(&format!("the maximum for this model is {maximum}")),
                "{message}"
            );
        }
        let message = split_blocks_to_swap(1, 2, 2).unwrap_err().to_string();
        assert!(message.contains("cannot swap any block"), "{message}");
    }

    /// No swap is always valid, even for a model with a single block of each type.
    #[test]
    fn zero_is_accepted_for_any_model() {
        for (doubles, singles) in [(1, 1), (2, 2), (8, 48)] {
            let none = split_blocks_to_swap(0, doubles, singles).unwrap();
            assert!(none.is_empty());
        }
    }
}
