//! Musubi's split of `--blocks_to_swap N` between double and single blocks
//! (`Flux2.enable_block_swap`, training-and-data.md §6.2): one double block counts as two single
//! blocks, so `N ≈ double + single / 2`; the last blocks of each list are the swapped ones.

use crate::error::{Error, Result};

/// How many blocks of each kind `--blocks_to_swap` moves to host memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SwapSplit {
    pub double: usize,
    pub single: usize,
}

/// Python's `round`: halves go to the even neighbour.
fn round_half_even(value: f64) -> i64 {
    let floor = value.floor();
    let fraction = value - floor;
    let floor = floor as i64;
    if fraction > 0.5 || (fraction == 0.5 && floor % 2 != 0) {
        floor + 1
    } else {
        floor
    }
}

/// The split of `blocks_to_swap` over `double_blocks` double and `single_blocks` single blocks,
/// or an error when Musubi's assertion (at most `n - 2` swapped blocks of each kind) fails.
pub fn split_blocks_to_swap(
    blocks_to_swap: usize,
    double_blocks: usize,
    single_blocks: usize,
) -> Result<SwapSplit> {
    if blocks_to_swap == 0 {
        return Ok(SwapSplit::default());
    }
    let refuse = |message: String| {
        Err(Error::InvalidArgument {
            name: "--blocks_to_swap".into(),
            message,
        })
    };
    if double_blocks == 0 || single_blocks == 0 {
        return refuse(format!(
            "{blocks_to_swap}: a model with {double_blocks} double and {single_blocks} single \
             blocks cannot swap blocks"
        ));
    }
    let ratio = single_blocks as f64 / double_blocks as f64;
    let mut double = round_half_even(blocks_to_swap as f64 / (1.0 + ratio / 2.0));
    let mut single = round_half_even(double as f64 * ratio);
    let (n_double, n_single) = (double_blocks as i64, single_blocks as i64);
    if 2 * n_double < n_single {
        while double > n_double - 2 {
            double -= 1;
            single += 2;
        }
    } else {
        while single > n_single - 2 {
            single -= 2;
            double += 1;
        }
    }
    if double <= 0 && single <= 0 {
        if n_single >= n_double {
            single = 1;
        } else {
            double = 1;
        }
    }
    let (double, single) = (double.max(0), single.max(0));
    if double > n_double - 2 || single > n_single - 2 {
        return refuse(format!(
            "{blocks_to_swap} gives {double} double + {single} single blocks, but at most {} \
             double and {} single blocks may be swapped",
            (n_double - 2).max(0),
            (n_single - 2).max(0)
        ));
    }
    Ok(SwapSplit {
        double: double as usize,
        single: single as usize,
    })
}

/// The largest `--blocks_to_swap` the split rule accepts for this block layout.
pub fn max_blocks_to_swap(double_blocks: usize, single_blocks: usize) -> usize {
    (1..=double_blocks + single_blocks)
        .rev()
        .find(|&n| split_blocks_to_swap(n, double_blocks, single_blocks).is_ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked examples of the spec (§6.2).
    #[test]
    fn documented_examples() {
        let split = |n, d, s| split_blocks_to_swap(n, d, s).unwrap();
        assert_eq!(
            split(29, 8, 48),
            SwapSplit {
                double: 6,
                single: 44
            }
        );
        assert_eq!(
            split(16, 8, 24),
            SwapSplit {
                double: 6,
                single: 18
            }
        );
        assert_eq!(
            split(13, 5, 20),
            SwapSplit {
                double: 3,
                single: 18
            }
        );
        assert_eq!(split(0, 8, 48), SwapSplit::default());
    }

    #[test]
    fn documented_maxima_are_the_largest_accepted() {
        assert_eq!(max_blocks_to_swap(8, 48), 29);
        assert_eq!(max_blocks_to_swap(8, 24), 16);
        assert_eq!(max_blocks_to_swap(5, 20), 13);
        assert!(split_blocks_to_swap(30, 8, 48).is_err());
    }

    #[test]
    fn python_rounding() {
        assert_eq!(round_half_even(2.5), 2);
        assert_eq!(round_half_even(3.5), 4);
        assert_eq!(round_half_even(7.25), 7);
    }
}
